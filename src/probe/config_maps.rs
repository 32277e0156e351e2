//! The ConfigMaps workloads mount, read only when a pass needs one (a `GOOGLE_APPLICATION_CREDENTIALS`
//! path resolves to it) and cached by name and resourceVersion. The operator's metadata-only
//! ConfigMap watch reports the versions of mounted ones ([`ConfigMaps::observe`]), so a pass reads a
//! ConfigMap again only after it changed: no ConfigMap data is listed or held that no template
//! mounts, and a steady state makes no request. `authprobe check`, with no watch, reads each once.

use std::{
    collections::HashMap,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::ConfigMap;

use crate::{
    api::Reason,
    engine::workload::{ConfigMapData, ConfigMapRead, ConfigMaps as Read},
    redact,
};

/// A GET gets this long.
const GET_TIMEOUT: Duration = Duration::from_secs(5);
/// GETs at once within a pass.
const CONCURRENCY: usize = 16;
/// A cached ConfigMap no pass asked for this long is dropped (one GET brings it back).
const UNUSED_FOR: Duration = Duration::from_secs(3600);

type Key = (String, String);

#[derive(Debug)]
struct Cached {
    /// The resourceVersion read (`None`: it did not exist).
    version: Option<String>,
    read: ConfigMapRead,
    used: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// What the watch last saw of each mounted ConfigMap (`None`: deleted).
    seen: HashMap<Key, Option<String>>,
    cached: HashMap<Key, Cached>,
}

/// Reads mounted ConfigMaps for the Workload stage.
pub struct ConfigMaps {
    client: kube::Client,
    state: Mutex<State>,
}

impl ConfigMaps {
    /// Reads through `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client, state: Mutex::default() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The watch saw a mounted ConfigMap at `version` (`None`: deleted). Returns whether that
    /// differs from what a pass last read, i.e. whether the probes covering it must look again.
    pub fn observe(&self, namespace: &str, name: &str, version: Option<String>) -> bool {
        let key = (namespace.to_string(), name.to_string());
        let mut state = self.lock();
        let changed = state.cached.get(&key).is_none_or(|c| c.version != version);
        state.seen.insert(key, version);
        changed
    }

    /// A ConfigMap no workload mounts any longer: nothing about it is kept.
    pub fn forget(&self, namespace: &str, name: &str) {
        let key = (namespace.to_string(), name.to_string());
        let mut state = self.lock();
        state.seen.remove(&key);
        state.cached.remove(&key);
    }

    /// Reads `wanted`, from the cache where the watch saw no newer version.
    pub async fn read(&self, wanted: Vec<Key>) -> Read {
        let mut out = Read::new();
        let mut missing = Vec::new();
        {
            let mut state = self.lock();
            let now = Instant::now();
            state.cached.retain(|_, c| now.duration_since(c.used) < UNUSED_FOR);
            let State { seen, cached } = &mut *state;
            for key in wanted {
                match cached.get_mut(&key) {
                    Some(c) if seen.get(&key).is_none_or(|v| *v == c.version) => {
                        c.used = now;
                        out.insert(key, c.read.clone());
                    }
                    _ => missing.push(key),
                }
            }
        }
        let fetched: Vec<(Key, Option<Cached>, ConfigMapRead)> = stream::iter(missing)
            .map(|key| async move {
                let (cached, read) = self.get(&key).await;
                (key, cached, read)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut state = self.lock();
        for (key, cached, read) in fetched {
            if let Some(c) = cached {
                state.cached.insert(key.clone(), c);
            }
            out.insert(key, read);
        }
        out
    }

    /// One GET; what to cache (nothing for a failure) and what the pass sees.
    async fn get(&self, (namespace, name): &Key) -> (Option<Cached>, ConfigMapRead) {
        let api = kube::Api::<ConfigMap>::namespaced(self.client.clone(), namespace);
        let cached = |version, read: ConfigMapRead| {
            (Some(Cached { version, read: read.clone(), used: Instant::now() }), read)
        };
        let unreadable = |reason, detail: String| (None, ConfigMapRead::Unreadable { reason, detail });
        match tokio::time::timeout(GET_TIMEOUT, api.get_opt(name)).await {
            Ok(Ok(Some(cm))) => cached(
                cm.metadata.resource_version.clone(),
                ConfigMapRead::Found(ConfigMapData::from_config_map(&cm).into()),
            ),
            Ok(Ok(None)) => cached(None, ConfigMapRead::Missing),
            Ok(Err(kube::Error::Api(s))) if s.code == 403 => unreadable(
                Reason::CheckerForbidden,
                format!(
                    "authprobe may not get ConfigMaps in {namespace} ({}); its RBAC needs get, list and watch on configmaps",
                    redact::upstream(&s.message)
                ),
            ),
            Ok(Err(e)) => unreadable(Reason::KubernetesUnavailable, redact::upstream(&e.to_string())),
            Err(_) => unreadable(Reason::KubernetesUnavailable, format!("no answer within {GET_TIMEOUT:?}")),
        }
    }
}
