//! Watches that list through the API server's streaming list (WatchList: the initial objects
//! arrive one by one as watch events, so no list page and no second copy is held), falling back
//! to paged lists on a server that refuses it.

use std::fmt::Debug;

use futures::{Stream, StreamExt, stream};
use kube::{
    Api, Resource,
    runtime::watcher::{self, Event, watcher},
};
use serde::de::DeserializeOwned;

/// Every object of `api`, then its changes: streaming lists first, paged lists (`config`'s page
/// size) from the first time the server refuses a streaming one.
pub fn listing<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<Event<K>>> + Send
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default,
{
    let streaming = watcher(api.clone(), config.clone().streaming_lists()).boxed();
    stream::unfold((streaming, Some((api, config))), |(mut events, mut fallback)| async move {
        loop {
            let event = events.next().await?;
            if let Err(error) = &event
                && refuses_streaming_lists(error)
                && let Some((api, config)) = fallback.take()
            {
                tracing::info!(
                    kind = %K::kind(&K::DynamicType::default()),
                    %error,
                    "the API server refuses streaming lists; listing in pages"
                );
                events = watcher(api, config).boxed();
                continue;
            }
            return Some((event, (events, fallback)));
        }
    })
}

/// A server without WatchList (disabled, or older than 1.27) refuses `sendInitialEvents` as an
/// invalid or bad request; anything else (RBAC, outages) is the same for paged lists.
fn refuses_streaming_lists(error: &watcher::Error) -> bool {
    matches!(
        error,
        watcher::Error::WatchStartFailed(kube::Error::Api(status)) | watcher::Error::WatchError(status)
            if matches!(status.code, 400 | 422)
    )
}
