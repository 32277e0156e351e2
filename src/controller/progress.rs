//! How far the controller has come: whether every watch has synced and whether one keeps failing
//! (a silent operator reporting "ok" is worse than a restart), for `/readyz`; and whether probe
//! passes complete, for `/healthz`: passes attempted for `stuck_after` without one completing
//! mean a wedged replica.

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

#[derive(Debug, Default)]
struct State {
    synced: bool,
    /// Per watch: since when it has been failing without a success in between, and the last failure.
    failing_since: BTreeMap<&'static str, (Instant, Instant)>,
    /// Since when passes have been attempted without one completing.
    attempting_since: Option<Instant>,
}

/// Shared between the controller and the HTTP server.
#[derive(Debug)]
pub struct Progress {
    state: Mutex<State>,
    stuck_after: Duration,
}

impl Progress {
    /// Progress of a controller whose passes count as stuck when none completes for `stuck_after`.
    pub fn new(stuck_after: Duration) -> Self {
        Self { state: Mutex::new(State::default()), stuck_after }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        f(&mut state)
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

    /// A probe pass starts.
    pub fn pass_started(&self) {
        self.with(|s| {
            s.attempting_since.get_or_insert_with(Instant::now);
        });
    }

    /// A probe pass completed (its verdict decided, written if need be).
    pub fn pass_completed(&self) {
        self.with(|s| s.attempting_since = None);
    }

    /// `Err(why)` when passes have been attempted for longer than `stuck_after` and none completed.
    pub fn liveness(&self) -> Result<(), String> {
        self.with(|s| match s.attempting_since {
            Some(since) if since.elapsed() > self.stuck_after => Err(format!(
                "no probe pass has completed for {}s (bound {}s)",
                since.elapsed().as_secs(),
                self.stuck_after.as_secs()
            )),
            _ => Ok(()),
        })
    }

    /// `Ok(description)` when ready, `Err(why not)` otherwise.
    pub fn readiness(&self) -> Result<&'static str, String> {
        self.with(|s| {
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
    fn passes_attempted_without_completing_are_stuck() {
        let p = Progress::new(Duration::from_secs(60));
        assert_eq!(p.liveness(), Ok(()), "no pass attempted: alive");
        p.pass_started();
        assert_eq!(p.liveness(), Ok(()));
        p.with(|s| s.attempting_since = Some(Instant::now() - Duration::from_secs(61)));
        p.pass_started();
        assert!(p.liveness().unwrap_err().contains("no probe pass has completed"));
        p.pass_completed();
        assert_eq!(p.liveness(), Ok(()));
    }

    #[test]
    fn ready_after_sync_and_unready_while_a_watch_stalls() {
        let h = Progress::new(Duration::from_secs(60));
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
