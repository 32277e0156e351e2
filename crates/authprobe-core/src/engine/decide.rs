//! What a probe pass leads to, as data: the status to write (or none), the Events to publish and
//! when to look again. The controller executes the decision and hands back which Events failed,
//! so the probe's memory records only what really went out.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{
    history::{History, Transition},
    report::{KsaOutcome, Report, Status, same_verdict, to_status},
    workload::WorkloadKind,
};
use crate::{
    api::{AuthProbeStatus, Reason, condition},
    redact,
};

/// Periodic passes come `interval` plus up to this fraction later, so probes created together
/// spread out, and never earlier, so every pass finds the last pass's Google reads expired.
pub const JITTER: f64 = 0.1;

/// The interval of a probe whose spec cannot be checked: it is looked at again when it changes.
pub const INVALID_SPEC_INTERVAL: Duration = Duration::from_secs(600);

/// Event notes are limited to 1 KiB by the API server.
pub const MAX_NOTE_BYTES: usize = 1024;

/// A requeue never comes sooner than this.
const MIN_REQUEUE: Duration = Duration::from_secs(1);

/// What one probe remembers between passes.
#[derive(Clone, Debug, Default)]
pub struct Memory {
    history: History,
    /// The status this replica last wrote: the cached object can lag behind it by a watch event.
    written: Option<AuthProbeStatus>,
    /// The last `authprobe.io/probe-now` value acted on.
    probe_now: Option<String>,
}

impl Memory {
    /// Whether `probe_now` (the annotation's value) asks for a pass not yet made.
    pub fn forced_by(&self, probe_now: Option<&str>) -> bool {
        probe_now.is_some() && probe_now != self.probe_now.as_deref()
    }
}

/// Everything a pass found, for [`decide`].
#[derive(Clone, Copy, Debug)]
pub struct PassResult<'a> {
    /// The probe's name, for Event notes.
    pub probe: &'a str,
    /// The verdict.
    pub report: &'a Report,
    /// Per KSA (empty for an invalid spec).
    pub outcomes: &'a [KsaOutcome],
    /// The status the cache holds.
    pub cached: Option<&'a AuthProbeStatus>,
    /// `metadata.generation`.
    pub generation: Option<i64>,
    /// The `authprobe.io/probe-now` annotation (`None` for an invalid spec: nothing is probed).
    pub probe_now: Option<&'a str>,
    /// The periodic interval.
    pub interval: Duration,
    /// When a propagation grace that softened a failure ends.
    pub recheck_at: Option<Timestamp>,
    /// When the live chain's next scheduled KSAs are due (see [`super::schedule`]).
    pub chain_due: Option<Timestamp>,
    /// The pass's clock.
    pub now: Timestamp,
    /// A random number in `[0, 1)`, spreading periodic passes (see [`JITTER`]).
    pub jitter: f64,
}

/// Normal or Warning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// A recovery or a passing probe.
    Normal,
    /// A failure.
    Warning,
}

/// What an Event is about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Regarding {
    /// The AuthProbe itself.
    Probe,
    /// A checked ServiceAccount.
    ServiceAccount {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A workload running as a checked ServiceAccount (stage `Workload`).
    Workload {
        /// Its namespace.
        namespace: String,
        /// What it is.
        kind: WorkloadKind,
        /// Its name.
        name: String,
    },
}

/// An Event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// What it is about.
    pub regarding: Regarding,
    /// Normal or Warning.
    pub severity: Severity,
    /// The Event's reason.
    pub reason: Reason,
    /// The Event's note.
    pub note: String,
    kind: Announced,
}

/// What an announcement moves in the probe's memory, to take back if it fails to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Announced {
    Ksa(Transition),
    Ready,
    CheckerFailure,
    /// Outside the verdict: whoever raised it keeps track of its publication.
    Notice,
}

impl Announcement {
    /// A Normal Event on a ServiceAccount that reports a change, not a verdict (a canary's
    /// `CredentialSourceChanged`).
    pub fn notice(namespace: &str, name: &str, reason: Reason, note: &str) -> Self {
        Self {
            regarding: Regarding::ServiceAccount { namespace: namespace.to_string(), name: name.to_string() },
            severity: Severity::Normal,
            reason,
            note: redact::message(note, MAX_NOTE_BYTES),
            kind: Announced::Notice,
        }
    }
}

/// What to do after a pass.
#[derive(Debug)]
pub struct Decision {
    /// The status the pass computed.
    pub status: AuthProbeStatus,
    /// Whether to write it: the verdict changed, the periodic pass is due, or a pass was forced.
    pub write: bool,
    /// Events to publish, in order.
    pub announcements: Vec<Announcement>,
    /// When to look again.
    pub requeue_after: Duration,
    before: Memory,
    next: Memory,
}

impl Decision {
    /// The memory to keep once the status was written (if asked) and the announcements were
    /// published, `failed` being the indexes of those the API server refused: they are taken
    /// back, so the next pass announces them again.
    pub fn settle(self, failed: &[usize]) -> Memory {
        let Decision { announcements, before, mut next, .. } = self;
        let mut lost = Vec::new();
        for a in failed.iter().filter_map(|i| announcements.get(*i)) {
            match &a.kind {
                Announced::Ksa(t) => lost.push(t.clone()),
                Announced::Ready => next.history.ready_announced = before.history.ready_announced.clone(),
                Announced::CheckerFailure => {
                    next.history.checker_failure_announced = before.history.checker_failure_announced
                }
                Announced::Notice => {}
            }
        }
        next.history.unpublished(&before.history, &lost);
        next
    }

    /// The memory as it was before the pass, for a pass whose status could not be written.
    pub fn abandon(self) -> Memory {
        self.before
    }
}

/// Decides what a pass leads to. `memory` is the probe's; [`Decision::settle`] gives it back.
pub fn decide(mut memory: Memory, pass: PassResult<'_>) -> Decision {
    let previous = newest(pass.cached, memory.written.as_ref()).cloned();
    if !memory.history.is_seeded() {
        memory.history.seed(previous.as_ref());
    }
    let forced = memory.forced_by(pass.probe_now);
    let (since, transitions, mut history) = memory.history.update(pass.outcomes, pass.now);
    let status = to_status(pass.report, previous.as_ref(), pass.generation, pass.now, &since);

    let last_probe = previous.as_ref().and_then(|p| p.last_probe_time.as_ref()).map(|t| t.0);
    let due = last_probe.is_none_or(|t| t.checked_add(pass.interval).is_ok_and(|d| d <= pass.now));
    let changed = previous.as_ref().is_none_or(|p| !same_verdict(p, &status));
    // A forced pass (probe-now) writes too, so its lastProbeTime shows the re-check happened.
    let write = changed || due || forced;

    let mut announcements: Vec<Announcement> =
        transitions.into_iter().map(|t| ksa_announcement(t, pass.probe)).collect();
    if let Some(ready) = pass.report.condition(condition::READY) {
        let verdict = (ready.status.as_str().to_string(), ready.reason.as_str().to_string());
        if history.ready_announced.as_ref() != Some(&verdict) {
            let (severity, reason) = match ready.status {
                Status::True => (Severity::Normal, Reason::Verified),
                _ => (Severity::Warning, ready.reason),
            };
            announcements.push(Announcement {
                regarding: Regarding::Probe,
                severity,
                reason,
                note: redact::message(&ready.message, MAX_NOTE_BYTES),
                kind: Announced::Ready,
            });
            history.ready_announced = Some(verdict);
        }
    }
    if let Some(checker) = pass.report.condition(condition::CHECKER_HEALTHY) {
        if checker.status != Status::False {
            history.checker_failure_announced = false;
        } else if !history.checker_failure_announced {
            announcements.push(Announcement {
                regarding: Regarding::Probe,
                severity: Severity::Warning,
                reason: checker.reason,
                note: redact::message(&checker.message, MAX_NOTE_BYTES),
                kind: Announced::CheckerFailure,
            });
            history.checker_failure_announced = true;
        }
    }

    let last = if write { pass.now } else { last_probe.unwrap_or(pass.now) };
    let periodic = last.checked_add(pass.interval.mul_f64(1.0 + pass.jitter * JITTER)).unwrap_or(pass.now);
    // A failure waiting out its propagation grace is judged again as soon as the grace ends.
    // So is the live chain's next scheduled KSA.
    let next_due = [pass.recheck_at, pass.chain_due].into_iter().flatten().fold(periodic, Timestamp::min);
    let requeue_after =
        Duration::try_from(next_due.duration_since(pass.now)).unwrap_or(Duration::ZERO).max(MIN_REQUEUE);

    let next = Memory {
        history,
        written: if write { Some(status.clone()) } else { memory.written.clone() },
        probe_now: if forced { pass.probe_now.map(str::to_string) } else { memory.probe_now.clone() },
    };
    Decision { status, write, announcements, requeue_after, before: memory, next }
}

fn ksa_announcement(transition: Transition, probe: &str) -> Announcement {
    let (namespace, name, workload, severity, reason, note) = match &transition {
        Transition::Failing { namespace, name, workload, reason, message } => {
            (namespace, name, workload, Severity::Warning, *reason, message.clone())
        }
        Transition::Recovered { namespace, name, workload } => {
            let note = match workload {
                None => format!(
                    "ServiceAccount {namespace}/{name} maps to its Google identity again (AuthProbe {probe})"
                ),
                Some(w) => format!(
                    "{w} passes the workload checks for ServiceAccount {namespace}/{name} again (AuthProbe {probe})"
                ),
            };
            (namespace, name, workload, Severity::Normal, Reason::Verified, note)
        }
    };
    let kind_and_name = workload
        .as_deref()
        .and_then(|w| w.split_once('/'))
        .and_then(|(kind, name)| Some((kind.parse::<WorkloadKind>().ok()?, name)));
    let regarding = match kind_and_name {
        Some((kind, workload)) => {
            Regarding::Workload { namespace: namespace.clone(), kind, name: workload.to_string() }
        }
        None => Regarding::ServiceAccount { namespace: namespace.clone(), name: name.clone() },
    };
    Announcement {
        regarding,
        severity,
        reason,
        note: redact::message(&note, MAX_NOTE_BYTES),
        kind: Announced::Ksa(transition),
    }
}

/// The more recent of the cached status and the one this replica last wrote.
fn newest<'a>(
    cached: Option<&'a AuthProbeStatus>,
    written: Option<&'a AuthProbeStatus>,
) -> Option<&'a AuthProbeStatus> {
    let time = |s: &AuthProbeStatus| s.last_probe_time.as_ref().map(|t| t.0);
    match (cached, written) {
        (Some(c), Some(w)) if time(w) > time(c) => Some(w),
        (None, w) => w,
        (c, _) => c,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::Stage,
        engine::{Finding, report::Report},
    };

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn outcome(ns: &str, failing: Option<Reason>) -> KsaOutcome {
        KsaOutcome {
            namespace: ns.into(),
            name: "app".into(),
            mapping: failing.map(|r| Finding::fail(Stage::IamPolicy, r, "broken")),
            chain: None,
            canary: None,
        }
    }

    struct Run {
        outcomes: Vec<KsaOutcome>,
        report: Report,
        cached: Option<AuthProbeStatus>,
        probe_now: Option<&'static str>,
        now: Timestamp,
    }

    impl Run {
        fn new(outcomes: Vec<KsaOutcome>, now: &str) -> Self {
            let report = Report::build(&outcomes, 2, false);
            Self { outcomes, report, cached: None, probe_now: None, now: at(now) }
        }

        fn decide(&self, memory: Memory) -> Decision {
            decide(
                memory,
                PassResult {
                    probe: "payments",
                    report: &self.report,
                    outcomes: &self.outcomes,
                    cached: self.cached.as_ref(),
                    generation: Some(1),
                    probe_now: self.probe_now,
                    interval: Duration::from_secs(600),
                    recheck_at: None,
                    chain_due: None,
                    now: self.now,
                    jitter: 0.0,
                },
            )
        }
    }

    fn reasons(d: &Decision) -> Vec<(Severity, Reason, bool)> {
        d.announcements.iter().map(|a| (a.severity, a.reason, a.regarding == Regarding::Probe)).collect()
    }

    #[test]
    fn the_first_pass_writes_and_announces_ready() {
        let d = Run::new(vec![outcome("a", None), outcome("b", None)], "2026-01-01T00:00:00Z")
            .decide(Memory::default());
        assert!(d.write);
        assert_eq!(reasons(&d), vec![(Severity::Normal, Reason::Verified, true)]);
        assert_eq!(d.requeue_after, Duration::from_secs(600));
    }

    #[test]
    fn the_same_verdict_before_the_interval_writes_nothing_and_announces_nothing() {
        let first = Run::new(vec![outcome("a", Some(Reason::PrincipalNotMapped))], "2026-01-01T00:00:00Z");
        let memory = first.decide(Memory::default()).settle(&[]);
        let d = Run::new(vec![outcome("a", Some(Reason::PrincipalNotMapped))], "2026-01-01T00:01:00Z")
            .decide(memory);
        assert!(!d.write, "a repeated verdict is not written between periodic passes");
        assert!(d.announcements.is_empty());
        // The periodic pass is still due ten minutes after the last write.
        assert_eq!(d.requeue_after, Duration::from_secs(540));
    }

    #[test]
    fn a_changed_verdict_writes_and_announces_each_transition_once() {
        let first = Run::new(vec![outcome("a", None), outcome("b", None)], "2026-01-01T00:00:00Z");
        let memory = first.decide(Memory::default()).settle(&[]);
        let d = Run::new(
            vec![outcome("a", Some(Reason::PrincipalNotMapped)), outcome("b", None)],
            "2026-01-01T00:01:00Z",
        )
        .decide(memory);
        assert!(d.write);
        assert_eq!(
            reasons(&d),
            vec![
                (Severity::Warning, Reason::PrincipalNotMapped, false),
                (Severity::Warning, Reason::PrincipalNotMapped, true)
            ]
        );
        let memory = d.settle(&[]);
        let again = Run::new(
            vec![outcome("a", Some(Reason::PrincipalNotMapped)), outcome("b", None)],
            "2026-01-01T00:02:00Z",
        )
        .decide(memory);
        assert!(again.announcements.is_empty());
    }

    #[test]
    fn a_due_interval_writes_the_same_verdict() {
        let first = Run::new(vec![outcome("a", None)], "2026-01-01T00:00:00Z");
        let memory = first.decide(Memory::default()).settle(&[]);
        let d = Run::new(vec![outcome("a", None)], "2026-01-01T00:10:00Z").decide(memory);
        assert!(d.write, "the periodic pass moves lastProbeTime");
        assert!(d.announcements.is_empty());
    }

    #[test]
    fn probe_now_forces_a_write_once_per_value() {
        let first = Run::new(vec![outcome("a", None)], "2026-01-01T00:00:00Z");
        let memory = first.decide(Memory::default()).settle(&[]);
        assert!(memory.forced_by(Some("1")));
        let mut run = Run::new(vec![outcome("a", None)], "2026-01-01T00:01:00Z");
        run.probe_now = Some("1");
        let d = run.decide(memory);
        assert!(d.write);
        let memory = d.settle(&[]);
        assert!(!memory.forced_by(Some("1")), "the same value does not force again");
        let mut run = Run::new(vec![outcome("a", None)], "2026-01-01T00:02:00Z");
        run.probe_now = Some("1");
        assert!(!run.decide(memory).write);
    }

    #[test]
    fn an_invalid_spec_writes_once_and_announces_its_ready_false() {
        let report = Report::invalid("namespaceSelector: bad key");
        let run =
            Run { outcomes: vec![], report, cached: None, probe_now: None, now: at("2026-01-01T00:00:00Z") };
        let d = decide(
            Memory::default(),
            PassResult {
                probe: "payments",
                report: &run.report,
                outcomes: &[],
                cached: None,
                generation: Some(2),
                probe_now: None,
                interval: INVALID_SPEC_INTERVAL,
                recheck_at: None,
                chain_due: None,
                now: run.now,
                jitter: 0.0,
            },
        );
        assert!(d.write);
        assert_eq!(reasons(&d), vec![(Severity::Warning, Reason::InvalidSpec, true)]);
        assert_eq!(d.status.summary, Some(crate::api::Summary::default()));
    }

    #[test]
    fn an_event_that_failed_to_publish_is_announced_again() {
        let first = Run::new(vec![outcome("a", None)], "2026-01-01T00:00:00Z");
        let memory = first.decide(Memory::default()).settle(&[]);
        let broken = Run::new(vec![outcome("a", Some(Reason::MappingDeleted))], "2026-01-01T00:01:00Z");
        let d = broken.decide(memory);
        assert_eq!(d.announcements.len(), 2);
        // Both the ServiceAccount's Warning and the probe's Ready event were refused.
        let memory = d.settle(&[0, 1]);
        let again =
            Run::new(vec![outcome("a", Some(Reason::MappingDeleted))], "2026-01-01T00:02:00Z").decide(memory);
        assert_eq!(
            reasons(&again),
            vec![
                (Severity::Warning, Reason::MappingDeleted, false),
                (Severity::Warning, Reason::MappingDeleted, true)
            ]
        );
        // Once they are out, nothing repeats.
        let memory = again.settle(&[]);
        assert!(
            Run::new(vec![outcome("a", Some(Reason::MappingDeleted))], "2026-01-01T00:03:00Z")
                .decide(memory)
                .announcements
                .is_empty()
        );
    }

    #[test]
    fn a_long_warning_keeps_its_fix_whole_and_fits_an_event() {
        let principal = format!(
            "principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/subject/ns/{}/sa/app",
            "checkout-".repeat(6)
        );
        let near_misses: Vec<String> = (0..3)
            .map(|i| format!("principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/subject/ns/team-{i}-{}/sa/app (the same ServiceAccount name in another namespace)", "x".repeat(60)))
            .collect();
        let fix = format!(
            " Fix: gcloud iam service-accounts add-iam-policy-binding payments@acme-prod.iam.gserviceaccount.com --project=acme-prod --role=roles/iam.workloadIdentityUser --member=\"{principal}\""
        );
        let message = format!(
            "ServiceAccount a/app ({principal}) is not granted roles/iam.workloadIdentityUser on payments@acme-prod.iam.gserviceaccount.com; the policy grants it to {} instead.{fix}",
            near_misses.join(", ")
        );
        assert!(message.len() > MAX_NOTE_BYTES);
        let outcomes = vec![KsaOutcome {
            namespace: "a".into(),
            name: "app".into(),
            mapping: Some(Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, message)),
            chain: None,
            canary: None,
        }];
        let run = Run {
            report: Report::build(&outcomes, 1, false),
            outcomes,
            cached: None,
            probe_now: None,
            now: at("2026-01-01T00:00:00Z"),
        };
        for a in run.decide(Memory::default()).announcements {
            assert!(a.note.len() <= MAX_NOTE_BYTES, "{}", a.note.len());
            if a.regarding != Regarding::Probe {
                assert!(a.note.ends_with(&fix), "the Warning keeps the fix whole: {}", a.note);
            }
        }
    }

    #[test]
    fn a_grace_ending_before_the_interval_brings_the_next_pass_forward() {
        let run = Run::new(vec![outcome("a", None)], "2026-01-01T00:00:00Z");
        let d = decide(
            Memory::default(),
            PassResult {
                probe: "payments",
                report: &run.report,
                outcomes: &run.outcomes,
                cached: None,
                generation: Some(1),
                probe_now: None,
                interval: Duration::from_secs(600),
                recheck_at: Some(at("2026-01-01T00:02:00Z")),
                chain_due: None,
                now: run.now,
                jitter: 0.5,
            },
        );
        assert_eq!(d.requeue_after, Duration::from_secs(120));
        let d = decide(
            Memory::default(),
            PassResult {
                probe: "payments",
                report: &run.report,
                outcomes: &run.outcomes,
                cached: None,
                generation: Some(1),
                probe_now: None,
                interval: Duration::from_secs(600),
                recheck_at: Some(at("2026-01-01T00:02:00Z")),
                chain_due: Some(at("2026-01-01T00:00:05Z")),
                now: run.now,
                jitter: 0.5,
            },
        );
        assert_eq!(d.requeue_after, Duration::from_secs(5), "the next KSA due for its live chain");
    }

    #[test]
    fn a_notice_is_a_bounded_normal_event_on_the_service_account() {
        let long = format!("from x to y {}", "z".repeat(4 * MAX_NOTE_BYTES));
        let notice = Announcement::notice("a", "app", Reason::CredentialSourceChanged, &long);
        assert_eq!(
            (&notice.regarding, notice.severity, notice.reason),
            (
                &Regarding::ServiceAccount { namespace: "a".into(), name: "app".into() },
                Severity::Normal,
                Reason::CredentialSourceChanged
            )
        );
        assert!(notice.note.len() <= MAX_NOTE_BYTES && notice.note.starts_with("from x to y"));
    }

    #[test]
    fn workload_failures_are_announced_on_the_workload_not_the_service_account() {
        let first = Run::new(vec![outcome("a", None)], "2026-01-01T00:00:00Z");
        let memory = first.decide(Memory::default()).settle(&[]);
        let mut finding =
            Finding::fail(Stage::Workload, Reason::CredentialFileOverridesWorkloadIdentity, "x");
        finding.workloads = vec!["Deployment/api".into()];
        let broken = KsaOutcome {
            namespace: "a".into(),
            name: "app".into(),
            mapping: Some(finding),
            chain: None,
            canary: None,
        };
        let d = Run::new(vec![broken], "2026-01-01T00:01:00Z").decide(memory);
        let regarding: Vec<&Regarding> = d.announcements.iter().map(|a| &a.regarding).collect();
        assert_eq!(
            regarding,
            [
                &Regarding::Workload {
                    namespace: "a".into(),
                    kind: WorkloadKind::Deployment,
                    name: "api".into()
                },
                &Regarding::Probe
            ]
        );
        let memory = d.settle(&[]);
        let healed = Run::new(vec![outcome("a", None)], "2026-01-01T00:02:00Z").decide(memory);
        let normal = &healed.announcements[0];
        assert_eq!((normal.severity, normal.reason), (Severity::Normal, Reason::Verified));
        assert!(matches!(&normal.regarding, Regarding::Workload { name, .. } if name == "api"));
        assert!(normal.note.contains("Deployment/api passes the workload checks"), "{}", normal.note);
    }
}
