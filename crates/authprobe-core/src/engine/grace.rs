//! The propagation grace: IAM and provider changes take minutes to reach every Google front end,
//! so a failure soon after a change is Unknown/PropagationPending rather than False.

use std::time::Duration;

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
