//! Leader election with a `coordination.k8s.io` Lease: only the holder reconciles, writes status
//! and mints tokens. Lease API errors never stop the process: the holder rides them out until its
//! lease would expire by its own clock (the [`Fence`] stops it acting just before), and a standby
//! retries with backoff. A standby follows the Lease with a watch, so it takes a released lease
//! within about a second instead of waiting for it to expire; a graceful stop releases it.
//!
//! Written by hand rather than with a lease crate because fencing needs the moment each renewal
//! was *sent*, which none exposes.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use tokio::{
    sync::{oneshot, watch},
    task::JoinHandle,
};

use crate::fence::Fence;

/// The Lease's name unless `--lease-name` says otherwise (the chart derives it from the release).
pub const DEFAULT_LEASE_NAME: &str = "authprobe-leader";
/// A lock not renewed for this long may be taken over (a crashed leader's worst case).
pub const LEASE_SECONDS: u64 = 15;
/// The holder renews this often, so two renewals may fail before the fence nears.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// No Lease request waits longer for its answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(4);
/// The fence ends this long before the lease expires, for clock drift between replicas.
const FENCE_MARGIN: Duration = Duration::from_secs(2);
/// A failed attempt is retried after this, doubling up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where the election's Lease lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRef {
    /// Its namespace (the operator's own).
    pub namespace: String,
    /// Its name.
    pub name: String,
}

/// Why a term ended.
#[derive(Debug, thiserror::Error)]
pub enum TermEnded {
    /// Another replica holds the lease now.
    #[error("another replica took the lease")]
    Lost,
    /// No renewal succeeded before the lease would expire.
    #[error("no renewal succeeded in time: the lease expired by this replica's clock")]
    Expired,
}

/// Held leadership: renewed in the background until released or ended.
#[derive(Debug)]
pub struct Leadership {
    release: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), TermEnded>>,
}

/// One replica's side of the election.
#[derive(Clone)]
struct Candidate {
    api: Api<Lease>,
    name: String,
    identity: String,
    fence: Arc<Fence>,
}

/// Joins the election for `lease` as `identity` and campaigns until this replica leads (then
/// `fence` holds), or `stop` resolves (`None`). API errors are retried, never returned.
pub async fn acquire(
    client: Client,
    lease: &LeaseRef,
    identity: &str,
    fence: Arc<Fence>,
    stop: impl Future<Output = ()>,
) -> Option<Leadership> {
    let candidate = Candidate {
        api: Api::namespaced(client, &lease.namespace),
        name: lease.name.clone(),
        identity: identity.to_string(),
        fence,
    };
    let (seen_tx, seen) = watch::channel(None);
    let campaign = candidate.campaign(seen);
    let held = tokio::select! {
        held = campaign => held,
        never = follow(candidate.api.clone(), candidate.name.clone(), seen_tx) => match never {},
        () = stop => return None,
    };
    tracing::info!(identity, namespace = %lease.namespace, lease = %lease.name, "acquired the lease: reconciling");
    let (release, released) = oneshot::channel();
    let task = tokio::spawn(candidate.hold(held, released));
    Some(Leadership { release: Some(release), task })
}

/// Publishes each report of the Lease's watch (`Some(None)`: it does not exist).
async fn follow(
    api: Api<Lease>,
    name: String,
    seen: watch::Sender<Option<Option<Lease>>>,
) -> std::convert::Infallible {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(lease) | watcher::Event::InitApply(lease)) => {
                seen.send_replace(Some(Some(lease)));
            }
            Ok(watcher::Event::Delete(_)) => {
                seen.send_replace(Some(None));
            }
            // An empty list: no Lease yet (a list that holds it reports it first).
            Ok(watcher::Event::InitDone) => {
                seen.send_if_modified(|s| {
                    let first = s.is_none();
                    if first {
                        *s = Some(None);
                    }
                    first
                });
            }
            Ok(watcher::Event::Init) => {}
            Err(error) => tracing::warn!(%error, "lease watch failed; retrying"),
        }
    }
    std::future::pending().await
}

fn holder(lease: &Lease) -> Option<&str> {
    lease.spec.as_ref()?.holder_identity.as_deref().filter(|h| !h.is_empty())
}

/// When the lease expires, by the renewer's clock as written in the Lease.
fn expiry(lease: &Lease) -> Option<Timestamp> {
    let spec = lease.spec.as_ref()?;
    let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref())?.0;
    let seconds = i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS as i32));
    renewed.checked_add(SignedDuration::from_secs(seconds)).ok()
}

fn backoff(attempt: u32) -> Duration {
    RETRY_MIN.saturating_mul(2u32.saturating_pow(attempt.min(8))).min(RETRY_MAX)
}

impl Candidate {
    /// The Lease as this replica holds it from `now`.
    fn held(&self, current: Option<&Lease>, now: Timestamp, new_term: bool) -> Lease {
        let mut spec = current.and_then(|l| l.spec.clone()).unwrap_or_default();
        if new_term {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(current.is_some()));
        }
        let lease_seconds = i32::try_from(LEASE_SECONDS).unwrap_or(i32::MAX);
        Lease {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                resource_version: current.and_then(|l| l.metadata.resource_version.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(lease_seconds),
                renew_time: Some(MicroTime(now)),
                ..spec
            }),
        }
    }

    /// Writes `lease` (create, or replace guarded by its resourceVersion); on success a lease this
    /// replica holds extends the fence to shortly before it expires, counted from when the
    /// request was sent.
    async fn write(&self, lease: &Lease, create: bool) -> Result<Lease, kube::Error> {
        let sent = Instant::now();
        let pp = PostParams::default();
        let call = async {
            if create {
                self.api.create(&pp, lease).await
            } else {
                self.api.replace(&self.name, &pp, lease).await
            }
        };
        let written = tokio::time::timeout(CALL_TIMEOUT, call).await.unwrap_or_else(|_| {
            Err(kube::Error::Service(format!("no answer within {CALL_TIMEOUT:?}").into()))
        })?;
        if holder(&written) == Some(self.identity.as_str()) {
            self.fence.extend_to(sent + Duration::from_secs(LEASE_SECONDS) - FENCE_MARGIN);
        }
        Ok(written)
    }

    /// Campaigns until the lease is this replica's; returns it as written.
    async fn campaign(&self, mut seen: watch::Receiver<Option<Option<Lease>>>) -> Lease {
        let mut attempt = 0;
        loop {
            let current = match seen.wait_for(Option::is_some).await {
                Ok(s) => s.clone().flatten(),
                Err(_) => None,
            };
            let now = Timestamp::now();
            let free = current.as_ref().is_none_or(|l| {
                holder(l).is_none_or(|h| h == self.identity) || expiry(l).is_none_or(|e| e <= now)
            });
            if free {
                let ours = current.as_ref().and_then(holder) == Some(self.identity.as_str());
                match self.write(&self.held(current.as_ref(), now, !ours), current.is_none()).await {
                    Ok(lease) => return lease,
                    // Another replica was quicker, or the watch lags: look again when it moves.
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(error) => tracing::warn!(%error, "cannot take the lease; retrying"),
                }
                let _ = tokio::time::timeout(backoff(attempt), seen.changed()).await;
                attempt += 1;
                continue;
            }
            // Held by another: wait for its release (the watch) or its expiry.
            let wait = current
                .as_ref()
                .and_then(expiry)
                .and_then(|e| Duration::try_from(e.duration_since(now)).ok())
                .unwrap_or(RETRY_MAX);
            attempt = 0;
            let _ = tokio::time::timeout(wait, seen.changed()).await;
        }
    }

    fn expired(&self) -> TermEnded {
        tracing::warn!(lease = %self.name, "no renewal succeeded in time: stopped acting");
        TermEnded::Expired
    }

    /// Renews the lease until asked to release it or the term ends.
    async fn hold(self, mut lease: Lease, mut release: oneshot::Receiver<()>) -> Result<(), TermEnded> {
        let mut attempt = 0;
        let mut next = tokio::time::Instant::now() + RENEW_EVERY;
        loop {
            tokio::select! {
                _ = &mut release => {
                    self.fence.revoke();
                    let mut released = lease.clone();
                    if let Some(spec) = released.spec.as_mut() {
                        spec.holder_identity = None;
                    }
                    match self.write(&released, false).await {
                        Ok(_) => tracing::info!(lease = %self.name, "released the lease"),
                        Err(error) => tracing::warn!(%error, "could not release the lease; it expires by itself"),
                    }
                    return Ok(());
                }
                () = tokio::time::sleep_until(next) => {}
                () = self.fence.lapsed() => return Err(self.expired()),
            }
            // A renewal that hangs past the fence ends the term when the fence does, not when the
            // call gives up.
            let request = self.held(Some(&lease), Timestamp::now(), false);
            let renewal = tokio::select! {
                renewal = self.write(&request, false) => renewal,
                () = self.fence.lapsed() => return Err(self.expired()),
            };
            match renewal {
                Ok(renewed) => {
                    lease = renewed;
                    attempt = 0;
                    next = tokio::time::Instant::now() + RENEW_EVERY;
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {
                    // Someone else wrote the Lease: it is ours only if it still names us.
                    match tokio::time::timeout(CALL_TIMEOUT, self.api.get(&self.name)).await {
                        Ok(Ok(current)) if holder(&current) == Some(self.identity.as_str()) => {
                            lease = current;
                            next = tokio::time::Instant::now();
                        }
                        Ok(Ok(_)) => {
                            self.fence.revoke();
                            tracing::warn!(lease = %self.name, "another replica took the lease: stopped acting");
                            return Err(TermEnded::Lost);
                        }
                        _ => next = tokio::time::Instant::now() + backoff(attempt),
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot renew the lease; retrying until it would expire");
                    next = tokio::time::Instant::now() + backoff(attempt);
                    attempt += 1;
                }
            }
        }
    }
}

impl Leadership {
    /// Resolves when the term ends by itself: the process becomes a standby again.
    pub async fn ended(&mut self) -> TermEnded {
        match (&mut self.task).await {
            Ok(Err(e)) => e,
            Ok(Ok(())) | Err(_) => TermEnded::Lost,
        }
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(mut self, within: Duration) {
        if let Some(tx) = self.release.take() {
            let _ = tx.send(());
        }
        if tokio::time::timeout(within, self.task).await.is_err() {
            tracing::warn!("could not release the lease in time; it expires by itself");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: Option<&str>, renewed: &str) -> Lease {
        Lease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: holder.map(str::to_string),
                lease_duration_seconds: Some(15),
                renew_time: Some(MicroTime(renewed.parse().unwrap())),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn expiry_and_holder_come_from_the_lease() {
        let l = lease(Some("a"), "2026-01-01T00:00:00Z");
        assert_eq!(holder(&l), Some("a"));
        assert_eq!(expiry(&l), Some("2026-01-01T00:00:15Z".parse().unwrap()));
        assert_eq!(holder(&lease(Some(""), "2026-01-01T00:00:00Z")), None, "an empty holder is a release");
    }

    #[test]
    fn retries_back_off_to_a_ceiling() {
        assert_eq!(backoff(0), RETRY_MIN);
        assert_eq!(backoff(1), RETRY_MIN * 2);
        assert_eq!(backoff(30), RETRY_MAX);
    }
}
