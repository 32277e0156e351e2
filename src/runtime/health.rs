//! What `/readyz` and `/healthz` answer. A standby waiting for the lease is ready (it serves
//! nothing but must not be restarted); a leader is ready once the controller's watches synced and
//! while none keeps failing. Any replica is alive unless passes keep being attempted and none
//! completes (a wedged replica the kubelet should restart).

use std::sync::Arc;

use crate::{controller::progress::Progress, fence::Fence};

/// The replica's health, shared with the HTTP server.
#[derive(Debug)]
pub struct Health {
    fence: Arc<Fence>,
    progress: Arc<Progress>,
}

impl Health {
    /// Health as the fence (leading or not) and the controller's progress tell it.
    pub fn new(fence: Arc<Fence>, progress: Arc<Progress>) -> Self {
        Self { fence, progress }
    }

    /// `Ok(description)` when ready, `Err(why not)` otherwise.
    pub fn readiness(&self) -> Result<&'static str, String> {
        if self.fence.holds() { self.progress.readiness() } else { Ok("standby: waiting for the lease") }
    }

    /// `Ok` while the replica makes progress, `Err(why not)` when it is wedged.
    pub fn liveness(&self) -> Result<(), String> {
        self.progress.liveness()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_standby_is_ready_and_a_leader_waits_for_its_watches() {
        let progress = Arc::new(Progress::new(Duration::from_secs(60)));
        let fence = Arc::new(Fence::standby());
        let h = Health::new(fence.clone(), progress.clone());
        assert_eq!(h.readiness(), Ok("standby: waiting for the lease"));
        fence.extend_to(Instant::now() + Duration::from_secs(10));
        assert!(h.readiness().is_err());
        progress.synced();
        assert_eq!(h.readiness(), Ok("ok"));
        assert_eq!(h.liveness(), Ok(()));
    }
}
