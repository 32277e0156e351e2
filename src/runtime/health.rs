//! What `/readyz` answers: a standby replica waiting for the lease is ready (it serves nothing but
//! must not be restarted); an active one is ready once the controller's watches synced and while
//! none keeps failing.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use crate::controller::progress::Progress;

/// The replica's health, shared with the HTTP server.
#[derive(Debug)]
pub struct Health {
    active: AtomicBool,
    progress: Arc<Progress>,
}

impl Health {
    /// A replica that starts active, or as a standby waiting for the lease.
    pub fn new(active: bool, progress: Arc<Progress>) -> Self {
        Self { active: AtomicBool::new(active), progress }
    }

    /// This replica now reconciles.
    pub fn activate(&self) {
        self.active.store(true, Ordering::SeqCst);
    }

    /// `Ok(description)` when ready, `Err(why not)` otherwise.
    pub fn readiness(&self) -> Result<&'static str, String> {
        if self.active.load(Ordering::SeqCst) {
            self.progress.readiness()
        } else {
            Ok("standby: waiting for the lease")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_standby_is_ready_and_an_active_replica_waits_for_its_watches() {
        let progress = Arc::new(Progress::default());
        let h = Health::new(false, progress.clone());
        assert_eq!(h.readiness(), Ok("standby: waiting for the lease"));
        h.activate();
        assert!(h.readiness().is_err());
        progress.synced();
        assert_eq!(h.readiness(), Ok("ok"));
    }
}
