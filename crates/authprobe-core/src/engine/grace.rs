//! The propagation grace: IAM and provider changes take minutes to reach every Google front end,
//! so a failure soon after a change is Unknown/PropagationPending rather than False.

use std::{collections::HashMap, hash::Hash, time::Duration};

use k8s_openapi::jiff::Timestamp;

use super::{Finding, Verdict};
use crate::api::{Reason, Stage};

/// Turns a failure within the propagation grace of a change into Unknown/PropagationPending.
/// Static and Workload failures are read from Kubernetes objects, so they never wait for Google to
/// catch up.
pub fn within_grace(
    finding: Finding,
    changed_at: Option<Timestamp>,
    now: Timestamp,
    grace: Duration,
) -> Finding {
    let Some(changed_at) = changed_at else {
        return finding;
    };
    let grace_ends = changed_at.checked_add(grace).unwrap_or(changed_at);
    if finding.verdict != Verdict::Fail
        || matches!(finding.stage, Stage::Static | Stage::Workload)
        || now >= grace_ends
    {
        return finding;
    }
    Finding::unknown(
        finding.stage,
        Reason::PropagationPending,
        format!(
            "{} ({}) within the {}s propagation grace after a change at {changed_at}; it turns False if it persists after {grace_ends}",
            finding.message,
            finding.reason,
            grace.as_secs()
        ),
    )
}

/// Judges the findings of a pass against the grace each KSA's latest change opened, and
/// remembers the earliest end of a grace that softened a failure: the probe looks again then.
#[derive(Clone, Copy, Debug)]
pub struct Grace {
    length: Duration,
    now: Timestamp,
    recheck_at: Option<Timestamp>,
}

impl Grace {
    /// A grace of `length` for a pass at `now`.
    pub fn new(length: Duration, now: Timestamp) -> Self {
        Self { length, now, recheck_at: None }
    }

    /// `finding`, softened to PropagationPending if it falls within the grace after `changed_at`.
    pub fn judge(&mut self, finding: Finding, changed_at: Option<Timestamp>) -> Finding {
        let was = finding.reason;
        let judged = within_grace(finding, changed_at, self.now, self.length);
        if judged.reason == Reason::PropagationPending && was != Reason::PropagationPending {
            let ends = changed_at.and_then(|c| c.checked_add(self.length).ok());
            self.recheck_at = [self.recheck_at, ends].into_iter().flatten().min();
        }
        judged
    }

    /// The earliest end of a grace that softened a failure.
    pub fn recheck_at(&self) -> Option<Timestamp> {
        self.recheck_at
    }
}

/// The longest propagation grace a spec may ask for; a change older than this opens none.
pub const MAX_GRACE: Duration = Duration::from_secs(3600);

/// When keys (GSAs, ServiceAccounts) last changed, kept only while a change can still open a
/// grace, so the map stays bounded however many keys untrusted input names.
#[derive(Debug)]
pub struct Changes<K> {
    at: HashMap<K, Timestamp>,
    /// The size after the last pruning: pruning again once it doubles keeps inserts O(1).
    pruned_at: usize,
}

impl<K> Default for Changes<K> {
    fn default() -> Self {
        Self { at: HashMap::new(), pruned_at: 0 }
    }
}

impl<K: Hash + Eq> Changes<K> {
    /// `key` changed at `now`.
    pub fn record(&mut self, key: K, now: Timestamp) {
        if self.at.len() >= (2 * self.pruned_at).max(64) {
            self.at.retain(|_, t| opens_grace(*t, now));
            self.pruned_at = self.at.len();
        }
        self.at.insert(key, now);
    }

    /// When `key` last changed, if that can still open a grace at `now`.
    pub fn get(&self, key: &K, now: Timestamp) -> Option<Timestamp> {
        self.at.get(key).copied().filter(|t| opens_grace(*t, now))
    }

    /// Forgets `key` (its object is gone).
    pub fn forget(&mut self, key: &K) {
        self.at.remove(key);
    }
}

fn opens_grace(changed: Timestamp, now: Timestamp) -> bool {
    changed.checked_add(MAX_GRACE).is_ok_and(|end| end > now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_older_than_the_longest_grace_are_forgotten() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let mut changes = Changes::default();
        for i in 0..10_000 {
            changes.record(i, t0);
        }
        assert_eq!(changes.get(&7, t0), Some(t0));
        let later = t0.checked_add(MAX_GRACE).unwrap();
        assert_eq!(changes.get(&7, later), None, "an hour-old change opens no grace");
        // New keys an hour later prune the old ones as they come: the map holds at most twice
        // the changes of the last hour.
        for i in 10_000..30_000 {
            changes.record(i, later);
        }
        assert!(!changes.at.contains_key(&7), "old changes were pruned");
        assert!(changes.at.len() <= 2 * 20_000, "{} kept", changes.at.len());
        changes.forget(&10_000);
        assert_eq!(changes.get(&10_000, later), None);
    }
}
