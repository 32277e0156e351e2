//! What `/readyz` answers: ready once every watch has synced, not ready while one keeps failing
//! (a silent operator reporting "ok" is worse than a restart), and ready as a standby replica that
//! waits for the lease.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A watch failing this long makes the replica unready.
pub const STALL_AFTER: Duration = Duration::from_secs(60);
/// A retried watch that succeeds resumes silently (no event until something changes), so a watch
/// whose last error is older than this (three times the longest retry wait) counts as recovered.
const RECOVERED_AFTER: Duration = Duration::from_secs(15);

/// The replica's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Waiting for the lease: healthy, not reconciling.
    Standby,
    /// Reconciling; ready once the watches synced.
    Active,
}

#[derive(Debug)]
struct State {
    role: Role,
    synced: bool,
    /// Per watch: since when it has been failing without a success in between, and the last failure.
    failing_since: BTreeMap<&'static str, (Instant, Instant)>,
}

/// Shared between the watches and the HTTP server.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
}

impl Health {
    /// A replica in `role`, not yet synced.
    pub fn new(role: Role) -> Self {
        Self { state: Mutex::new(State { role, synced: false, failing_since: BTreeMap::new() }) }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut state)
    }

    /// This replica now reconciles.
    pub fn activate(&self) {
        self.with(|s| s.role = Role::Active);
    }

    /// Every watch has listed its objects.
    pub fn synced(&self) {
        self.with(|s| s.synced = true);
    }

    /// A watch delivered something.
    pub fn watch_ok(&self, watch: &'static str) {
        self.with(|s| s.failing_since.remove(watch));
    }

    /// A watch failed (it retries with backoff).
    pub fn watch_failed(&self, watch: &'static str) {
        self.with(|s| {
            let now = Instant::now();
            s.failing_since.entry(watch).or_insert((now, now)).1 = now;
        });
    }

    /// `Ok(description)` when ready, `Err(why not)` otherwise.
    pub fn readiness(&self) -> Result<&'static str, String> {
        self.with(|s| {
            if s.role == Role::Standby {
                return Ok("standby: waiting for the lease");
            }
            if !s.synced {
                return Err("watches not synced yet".into());
            }
            let stalled = |(since, last): &(Instant, Instant)| {
                since.elapsed() > STALL_AFTER && last.elapsed() < RECOVERED_AFTER
            };
            match s.failing_since.iter().find(|(_, f)| stalled(f)) {
                Some((watch, (since, _))) => {
                    Err(format!("the {watch} watch has been failing for {}s", since.elapsed().as_secs()))
                }
                None => Ok("ok"),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_after_sync_and_unready_while_a_watch_stalls() {
        let h = Health::new(Role::Standby);
        assert_eq!(h.readiness(), Ok("standby: waiting for the lease"));
        h.activate();
        assert!(h.readiness().is_err());
        h.synced();
        assert_eq!(h.readiness(), Ok("ok"));
        h.watch_failed("ServiceAccount");
        assert_eq!(h.readiness(), Ok("ok"), "a short failure is retried quietly");
        let long_ago = Instant::now() - STALL_AFTER - Duration::from_secs(1);
        h.with(|s| s.failing_since.insert("ServiceAccount", (long_ago, Instant::now())));
        assert!(h.readiness().unwrap_err().contains("ServiceAccount watch has been failing"));
        h.watch_ok("ServiceAccount");
        assert_eq!(h.readiness(), Ok("ok"));
        // Failing long ago but quiet since: the retry resumed silently.
        h.with(|s| s.failing_since.insert("Namespace", (long_ago, Instant::now() - RECOVERED_AFTER)));
        assert_eq!(h.readiness(), Ok("ok"));
    }
}
