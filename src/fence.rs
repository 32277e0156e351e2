//! Whether this replica may act (reconcile, mint tokens, write status and Events), by its own
//! clock. With leader election the fence holds until shortly before the Lease this replica last
//! renewed would expire, so a leader that cannot renew (its requests hang, the API server is
//! gone) stops acting before a standby may take over: no split brain, even while a renew hangs.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use tokio::sync::watch;

/// The fence of one replica.
#[derive(Debug)]
pub struct Fence {
    until: Mutex<Holds>,
    /// Counts the terms this replica started leading; a new term re-reads what others wrote.
    terms: watch::Sender<u64>,
}

#[derive(Clone, Copy, Debug)]
enum Holds {
    Never,
    Until(Instant),
    Always,
}

impl Fence {
    /// A replica without leader election: it always acts.
    pub fn always() -> Self {
        Self { until: Mutex::new(Holds::Always), terms: watch::Sender::new(1) }
    }

    /// A standby: it acts once it leads.
    pub fn standby() -> Self {
        Self { until: Mutex::new(Holds::Never), terms: watch::Sender::new(0) }
    }

    fn holds_now(&self) -> Holds {
        *self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this replica may act now.
    pub fn holds(&self) -> bool {
        self.holds_for(Duration::ZERO)
    }

    /// Whether this replica may act for at least `duration` more: a write that may take that long
    /// is started only then, so it ends before the fence does.
    pub fn holds_for(&self, duration: Duration) -> bool {
        match self.holds_now() {
            Holds::Never => false,
            Holds::Always => true,
            Holds::Until(until) => Instant::now() + duration < until,
        }
    }

    /// Resolves when the fence, as it stands now, stops holding (never for a replica without
    /// leader election), so whoever waits on it learns of the end at the moment it comes.
    pub async fn lapsed(&self) {
        match self.holds_now() {
            Holds::Never => {}
            Holds::Always => std::future::pending().await,
            Holds::Until(until) => tokio::time::sleep_until(until.into()).await,
        }
    }

    /// The replica leads until `until`; a new term when it did not lead before.
    pub fn extend_to(&self, until: Instant) {
        let was = {
            let mut holds = self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *holds, Holds::Until(until))
        };
        let leading_before = match was {
            Holds::Until(previous) => previous > Instant::now(),
            Holds::Always => true,
            Holds::Never => false,
        };
        if !leading_before {
            self.terms.send_modify(|t| *t += 1);
        }
    }

    /// The replica stops acting at once.
    pub fn revoke(&self) {
        *self.until.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Holds::Never;
    }

    /// A receiver that sees each new term.
    pub fn terms(&self) -> watch::Receiver<u64> {
        self.terms.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fence_holds_until_its_time_and_counts_terms() {
        let fence = Fence::standby();
        let terms = fence.terms();
        assert!(!fence.holds());
        fence.extend_to(Instant::now() + Duration::from_secs(10));
        assert!(fence.holds() && fence.holds_for(Duration::from_secs(5)));
        assert!(
            !fence.holds_for(Duration::from_secs(11)),
            "a write that would outlive the fence is not started"
        );
        assert_eq!(*terms.borrow(), 1);
        // A renewal within the term is no new term.
        fence.extend_to(Instant::now() + Duration::from_secs(20));
        assert_eq!(*terms.borrow(), 1);
        fence.revoke();
        assert!(!fence.holds());
        fence.extend_to(Instant::now() + Duration::from_secs(10));
        assert_eq!(*terms.borrow(), 2, "leading again is a new term");
        // An expired fence no longer holds, and extending it starts a new term too.
        fence.extend_to(Instant::now());
        assert!(!fence.holds());
        fence.extend_to(Instant::now() + Duration::from_secs(10));
        assert_eq!(*terms.borrow(), 3);
        assert!(Fence::always().holds_for(Duration::from_secs(3600)));
    }

    #[tokio::test]
    async fn lapsed_resolves_when_the_fence_ends_and_never_without_election() {
        let fence = Fence::standby();
        let until = Instant::now() + Duration::from_millis(200);
        fence.extend_to(until);
        tokio::time::timeout(Duration::from_secs(10), fence.lapsed()).await.expect("the fence lapses");
        assert!(Instant::now() >= until && !fence.holds());
        let always = Fence::always();
        let never = tokio::time::timeout(Duration::from_millis(300), always.lapsed()).await;
        assert!(never.is_err(), "a replica without election never lapses");
    }
}
