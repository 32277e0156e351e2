//! Leader election with a `coordination.k8s.io` Lease: only the holder reconciles, writes status
//! and mints tokens. A graceful stop releases the lease; a standby watches the Lease so it takes
//! over within about a second of a release instead of waiting for the lock to expire.

use std::{convert::Infallible, time::Duration};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};

/// The Lease's name unless `--lease-name` says otherwise (the chart derives it from the release).
pub const DEFAULT_LEASE_NAME: &str = "authprobe-leader";

/// Where the election's Lease lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRef {
    /// Its namespace (the operator's own).
    pub namespace: String,
    /// Its name.
    pub name: String,
}
/// A lock not renewed for this long may be taken over (a crashed leader's worst case).
pub const LEASE_SECONDS: u64 = 15;
/// The holder renews this long before the lock would expire.
const RENEW_BEFORE_SECONDS: u64 = 5;

/// Why leadership ended.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The Lease API failed.
    #[error("lease: {0}")]
    Api(#[from] kube_lease_manager::LeaseManagerError),
    /// Another replica holds the lease now.
    #[error("lost the lease to another replica")]
    Lost,
}

/// Held leadership: renewed in the background until released or lost.
#[derive(Debug)]
pub struct Leadership {
    release: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), LeaseError>>,
}

/// Joins the election for `lease` as `identity`; resolves once this replica leads, or with `None`
/// if `stop` resolves first.
pub async fn acquire(
    client: Client,
    lease: &LeaseRef,
    identity: &str,
    stop: impl Future<Output = ()>,
) -> Result<Option<Leadership>, LeaseError> {
    let LeaseRef { namespace, name } = lease;
    let leases = Api::<Lease>::namespaced(client.clone(), namespace);
    let (held_tx, mut held) = watch::channel(false);
    let campaign = async {
        loop {
            // Releases seen from here on count for this manager, including one that lands while
            // it reads the Lease or before the standby's watch has first listed it.
            held.borrow_and_update();
            // A new manager reads the Lease afresh; one that has seen it held waits for its expiry.
            let manager = LeaseManagerBuilder::new(client.clone(), name)
                .with_namespace(namespace)
                .with_identity(identity)
                .with_duration(LEASE_SECONDS)
                .with_grace(RENEW_BEFORE_SECONDS)
                .build()
                .await?;
            tokio::select! {
                changed = manager.changed() => if changed? { return Ok::<_, LeaseError>(manager) },
                // A graceful stop releases the lock before it expires: campaign again at once.
                () = next_release(&mut held) => {}
            }
        }
    };
    let manager = tokio::select! {
        won = campaign => won?,
        never = follow_held(&leases, name, held_tx) => match never {},
        () = stop => return Ok(None),
    };
    tracing::info!(identity, namespace, lease = name, "acquired the lease: reconciling");
    let (release, released_rx) = oneshot::channel();
    let task = tokio::spawn(hold(manager, name.clone(), released_rx));
    Ok(Some(Leadership { release: Some(release), task }))
}

/// Publishes whether the Lease is held, on every report of its watch.
async fn follow_held(leases: &Api<Lease>, name: &str, held: watch::Sender<bool>) -> Infallible {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(leases.clone(), config).default_backoff().applied_objects().boxed();
    while let Some(event) = events.next().await {
        if let Ok(lease) = event {
            let holder = lease.spec.and_then(|s| s.holder_identity);
            // Sent even when unchanged: the first report may already be the release.
            held.send_replace(holder.is_some_and(|h| !h.is_empty()));
        }
    }
    std::future::pending().await
}

/// Resolves when a report newer than the last one seen shows the Lease without holder.
async fn next_release(held: &mut watch::Receiver<bool>) {
    while held.changed().await.is_ok() {
        if !*held.borrow_and_update() {
            return;
        }
    }
    std::future::pending().await
}

/// Renews the lock until asked to release it.
async fn hold(
    manager: LeaseManager,
    name: String,
    mut release: oneshot::Receiver<()>,
) -> Result<(), LeaseError> {
    loop {
        tokio::select! {
            changed = manager.changed() => match changed {
                Ok(true) => {}
                Ok(false) => return Err(LeaseError::Lost),
                Err(e) => return Err(e.into()),
            },
            _ = &mut release => {
                manager.release().await?;
                tracing::info!(lease = %name, "released the lease");
                return Ok(());
            }
        }
    }
}

impl Leadership {
    /// Resolves if leadership ends by itself (lost, or the Lease API failing): the process must stop.
    pub async fn lost(&mut self) -> LeaseError {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) | Err(_) => LeaseError::Lost,
        }
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(mut self, within: Duration) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
        match tokio::time::timeout(within, self.task).await {
            Ok(Ok(Ok(()))) => {}
            outcome => tracing::warn!(?outcome, "could not release the lease; it expires by itself"),
        }
    }
}
