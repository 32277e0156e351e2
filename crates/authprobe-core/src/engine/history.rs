//! What a probe remembers between passes about its non-passing KSAs: since when each reason holds,
//! and which Warning each KSA last got, so events fire once per transition, never once per pass.

use std::collections::HashMap;

use k8s_openapi::jiff::Timestamp;

use crate::{
    api::{AuthProbeStatus, Reason, Stage, condition},
    engine::{
        Finding, Verdict,
        report::{KsaOutcome, Since},
    },
};

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    reason: Reason,
    since: Timestamp,
    /// The reason of the last Warning event this KSA got (None: none since it last passed).
    warned: Option<Reason>,
    /// What got that Warning: the KSA (`None`) or, for stage `Workload`, each listed workload.
    warned_on: Vec<Option<String>>,
}

/// An event a pass calls for on a ServiceAccount, or on one of its workloads (`Kind/name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Transition {
    /// A failure appeared or changed reason, or a workload joined a Workload failure.
    Failing { namespace: String, name: String, workload: Option<String>, reason: Reason, message: String },
    /// A KSA that had a Warning passes again, or a workload that had one no longer fails.
    Recovered { namespace: String, name: String, workload: Option<String> },
}

/// What a finding's Warning goes on: the workloads a Workload finding lists, else the KSA.
fn targets(finding: &Finding) -> Vec<Option<String>> {
    if finding.stage == Stage::Workload && !finding.workloads.is_empty() {
        finding.workloads.iter().cloned().map(Some).collect()
    } else {
        vec![None]
    }
}

/// A probe's memory of its non-passing KSAs.
#[derive(Clone, Debug, Default)]
pub struct History {
    ksas: HashMap<(String, String), Entry>,
    /// After a restart, status lists at most 20 failures: KSAs failing beyond those are taken as
    /// already warned on the first pass rather than warned again.
    assume_warned_once: bool,
    seeded: bool,
    /// The Ready (status, reason) the probe's last Ready event announced.
    pub ready_announced: Option<(String, String)>,
    /// Whether CheckerHealthy=False has been announced since it last held True.
    pub checker_failure_announced: bool,
}

impl History {
    /// Whether [`History::seed`] already ran.
    pub fn is_seeded(&self) -> bool {
        self.seeded
    }

    /// Restores what the last status says (the operator restarted, or leadership moved).
    pub fn seed(&mut self, status: Option<&AuthProbeStatus>) {
        self.seeded = true;
        let Some(status) = status else { return };
        let condition_of = |type_: &str| status.conditions.iter().find(|c| c.type_ == type_);
        self.ready_announced = condition_of(condition::READY).map(|c| (c.status.clone(), c.reason.clone()));
        self.checker_failure_announced =
            condition_of(condition::CHECKER_HEALTHY).is_some_and(|c| c.status == "False");
        let mut listed_failing = 0u32;
        for f in &status.failures {
            let failing = !f.reason.is_undecided();
            listed_failing += u32::from(failing);
            let warned_on = if f.stage == Stage::Workload && !f.workloads.is_empty() {
                f.workloads.iter().cloned().map(Some).collect()
            } else {
                vec![None]
            };
            self.ksas.insert(
                (f.namespace.clone(), f.service_account.clone()),
                Entry {
                    reason: f.reason,
                    since: f.since.0,
                    warned: failing.then_some(f.reason),
                    warned_on: if failing { warned_on } else { vec![] },
                },
            );
        }
        self.assume_warned_once = status.summary.is_some_and(|s| s.failing > listed_failing);
    }

    /// Compares a pass with what is remembered: when each current reason started, the events to
    /// publish, and the history to keep once they are out.
    pub fn update(&self, outcomes: &[KsaOutcome], now: Timestamp) -> (Since, Vec<Transition>, History) {
        let mut since = Since::new();
        let mut transitions = Vec::new();
        let mut next = HashMap::with_capacity(self.ksas.len());
        for o in outcomes {
            let id = (o.namespace.clone(), o.name.clone());
            let previous = self.ksas.get(&id).cloned();
            let recovered = |workload: Option<String>| Transition::Recovered {
                namespace: o.namespace.clone(),
                name: o.name.clone(),
                workload,
            };
            let Some(finding) = o.finding() else {
                if let Some(p) = previous.filter(|p| p.warned.is_some()) {
                    transitions.extend(p.warned_on.into_iter().map(recovered));
                }
                continue;
            };
            let started = previous.as_ref().filter(|p| p.reason == finding.reason).map_or(now, |p| p.since);
            let (mut warned, mut warned_on) = match previous {
                Some(p) => (p.warned, p.warned_on),
                None if self.assume_warned_once && finding.verdict == Verdict::Fail => {
                    (Some(finding.reason), targets(finding))
                }
                None => (None, vec![]),
            };
            if finding.verdict == Verdict::Fail {
                let now_on = targets(finding);
                // A new reason warns every target again; the same one warns only those new to it.
                let same = warned == Some(finding.reason);
                for target in now_on.iter().filter(|t| !same || !warned_on.contains(t)) {
                    transitions.push(Transition::Failing {
                        namespace: o.namespace.clone(),
                        name: o.name.clone(),
                        workload: target.clone(),
                        reason: finding.reason,
                        message: finding.message.clone(),
                    });
                }
                // A workload no longer failing gets its Normal event; the KSA only once it passes.
                for gone in warned_on.iter().filter(|t| t.is_some() && !now_on.contains(t)) {
                    transitions.push(recovered(gone.clone()));
                }
                warned = Some(finding.reason);
                warned_on = now_on;
            }
            since.insert(id.clone(), (finding.reason, started));
            next.insert(id, Entry { reason: finding.reason, since: started, warned, warned_on });
        }
        let history = History {
            ksas: next,
            assume_warned_once: false,
            seeded: true,
            ready_announced: self.ready_announced.clone(),
            checker_failure_announced: self.checker_failure_announced,
        };
        (since, transitions, history)
    }

    /// Takes back what `before` remembered for KSAs whose event could not be published, so the
    /// next pass sees the same transition and publishes it again.
    pub fn unpublished(&mut self, before: &History, transitions: &[Transition]) {
        for t in transitions {
            match t {
                Transition::Failing { namespace, name, workload, .. } => {
                    let id = (namespace.clone(), name.clone());
                    if let Some(entry) = self.ksas.get_mut(&id) {
                        entry.warned_on.retain(|w| w != workload);
                        if entry.warned_on.is_empty() {
                            entry.warned = before.ksas.get(&id).and_then(|p| p.warned);
                            entry.warned_on =
                                before.ksas.get(&id).map(|p| p.warned_on.clone()).unwrap_or_default();
                        }
                    }
                }
                Transition::Recovered { namespace, name, workload } => {
                    let id = (namespace.clone(), name.clone());
                    match self.ksas.get_mut(&id) {
                        Some(entry) => entry.warned_on.push(workload.clone()),
                        None => {
                            if let Some(entry) = before.ksas.get(&id) {
                                let mut entry = entry.clone();
                                entry.warned_on = vec![workload.clone()];
                                self.ksas.insert(id, entry);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    use super::*;
    use crate::{
        api::{Failure, Stage, Summary},
        engine::Finding,
    };

    fn out(ns: &str, finding: Option<Finding>) -> KsaOutcome {
        KsaOutcome { namespace: ns.into(), name: "app".into(), mapping: finding, chain: None, canary: None }
    }
    fn fail(reason: Reason) -> Option<Finding> {
        Some(Finding::fail(Stage::IamPolicy, reason, "broken"))
    }
    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn one_event_per_transition() {
        let mut h = History::default();
        h.seed(None);
        let pass = |h: &mut History, outcomes: &[KsaOutcome], at: &str| {
            let (since, ev, next) = h.update(outcomes, t(at));
            *h = next;
            (since, ev)
        };
        let (_, ev) = pass(
            &mut h,
            &[out("a", fail(Reason::PrincipalNotMapped)), out("b", None)],
            "2026-01-01T00:00:00Z",
        );
        assert_eq!(ev.len(), 1);
        // Same reason next pass: nothing.
        let (since, ev) = pass(
            &mut h,
            &[out("a", fail(Reason::PrincipalNotMapped)), out("b", None)],
            "2026-01-01T00:10:00Z",
        );
        assert!(ev.is_empty());
        assert_eq!(since[&("a".into(), "app".into())].1, t("2026-01-01T00:00:00Z"));
        // Reason changes: one Warning, and since restarts.
        let (since, ev) = pass(&mut h, &[out("a", fail(Reason::MappingDeleted))], "2026-01-01T00:20:00Z");
        assert!(matches!(&ev[..], [Transition::Failing { reason: Reason::MappingDeleted, .. }]));
        assert_eq!(since[&("a".into(), "app".into())].1, t("2026-01-01T00:20:00Z"));
        // Undecided: no event either way.
        let unknown = Some(Finding::unknown(Stage::IamPolicy, Reason::GoogleUnavailable, "503"));
        let (_, ev) = pass(&mut h, &[out("a", unknown)], "2026-01-01T00:30:00Z");
        assert!(ev.is_empty());
        // Recovery after a Warning: one Normal; passing again later: nothing more.
        let (_, ev) = pass(&mut h, &[out("a", None)], "2026-01-01T00:40:00Z");
        assert_eq!(
            ev,
            vec![Transition::Recovered { namespace: "a".into(), name: "app".into(), workload: None }]
        );
        let (_, ev) = pass(&mut h, &[out("a", None)], "2026-01-01T00:50:00Z");
        assert!(ev.is_empty());
    }

    #[test]
    fn an_unpublished_event_is_published_next_pass() {
        let mut before = History::default();
        before.seed(None);
        let (_, ev, mut next) =
            before.update(&[out("a", fail(Reason::PrincipalNotMapped))], t("2026-01-01T00:00:00Z"));
        next.unpublished(&before, &ev);
        let (_, again, mut after) =
            next.update(&[out("a", fail(Reason::PrincipalNotMapped))], t("2026-01-01T00:10:00Z"));
        assert_eq!(again, ev, "the lost Warning comes again");
        let (_, recovered, mut passing) = after.update(&[out("a", None)], t("2026-01-01T00:20:00Z"));
        assert_eq!(recovered.len(), 1);
        passing.unpublished(&after, &recovered);
        let (_, again, _) = passing.update(&[out("a", None)], t("2026-01-01T00:30:00Z"));
        assert_eq!(again, recovered, "the lost Normal comes again");
        // Published events are not repeated.
        after.unpublished(&next, &[]);
        assert!(
            after
                .update(&[out("a", fail(Reason::PrincipalNotMapped))], t("2026-01-01T00:40:00Z"))
                .1
                .is_empty()
        );
    }

    #[test]
    fn unknown_only_ksas_never_warn_or_recover() {
        let mut h = History::default();
        h.seed(None);
        let unknown = Some(Finding::unknown(Stage::IamPolicy, Reason::GoogleThrottled, "429"));
        let (_, ev, next) = h.update(&[out("a", unknown)], t("2026-01-01T00:00:00Z"));
        assert!(ev.is_empty());
        assert!(next.update(&[out("a", None)], t("2026-01-01T00:10:00Z")).1.is_empty());
    }

    #[test]
    fn a_restart_does_not_repeat_warnings() {
        let listed = Failure {
            namespace: "a".into(),
            service_account: "app".into(),
            stage: Stage::IamPolicy,
            reason: Reason::PrincipalNotMapped,
            message: "x".into(),
            since: Time(t("2026-01-01T00:00:00Z")),
            workloads: vec![],
        };
        let status = AuthProbeStatus {
            summary: Some(Summary {
                namespaces: 30,
                service_accounts: 30,
                passing: 0,
                failing: 30,
                unknown: 0,
                live_verified: None,
            }),
            failures: vec![listed],
            ..Default::default()
        };
        let mut h = History::default();
        h.seed(Some(&status));
        let outcomes: Vec<KsaOutcome> =
            ["a", "b", "c"].iter().map(|ns| out(ns, fail(Reason::PrincipalNotMapped))).collect();
        let (since, ev, next) = h.update(&outcomes, t("2026-01-01T01:00:00Z"));
        assert!(ev.is_empty(), "failures listed or beyond the 20 shown were already warned: {ev:?}");
        assert_eq!(since[&("a".into(), "app".into())].1, t("2026-01-01T00:00:00Z"));
        // Later transitions are reported normally.
        let (_, ev, _) = next.update(&[out("b", None)], t("2026-01-01T01:10:00Z"));
        assert_eq!(
            ev,
            vec![Transition::Recovered { namespace: "b".into(), name: "app".into(), workload: None }]
        );
    }

    fn on(workloads: &[&str], reason: Reason) -> Option<Finding> {
        let mut f = Finding::fail(Stage::Workload, reason, "broken");
        f.workloads = workloads.iter().map(|w| (*w).to_string()).collect();
        Some(f)
    }

    fn targets_of(ev: &[Transition]) -> Vec<(bool, Option<String>)> {
        ev.iter()
            .map(|t| match t {
                Transition::Failing { workload, .. } => (true, workload.clone()),
                Transition::Recovered { workload, .. } => (false, workload.clone()),
            })
            .collect()
    }

    #[test]
    fn workload_failures_warn_each_workload_and_recover_there() {
        let mut h = History::default();
        h.seed(None);
        let mut pass = |outcomes: &[KsaOutcome], at: &str| {
            let (_, ev, next) = h.update(outcomes, t(at));
            h = next;
            targets_of(&ev)
        };
        let w = |s: &str| Some(s.to_string());
        let overrides = Reason::CredentialFileOverridesWorkloadIdentity;
        assert_eq!(
            pass(&[out("a", on(&["Deployment/api", "Job/x"], overrides))], "2026-01-01T00:00:00Z"),
            vec![(true, w("Deployment/api")), (true, w("Job/x"))]
        );
        // Same reason: only a workload new to it is warned, and one no longer failing recovers.
        assert_eq!(
            pass(&[out("a", on(&["Deployment/api", "Pod/p"], overrides))], "2026-01-01T00:10:00Z"),
            vec![(true, w("Pod/p")), (false, w("Job/x"))]
        );
        // Another stage takes over: the KSA is warned, the workloads recover.
        assert_eq!(
            pass(&[out("a", fail(Reason::PrincipalNotMapped))], "2026-01-01T00:20:00Z"),
            vec![(true, None), (false, w("Deployment/api")), (false, w("Pod/p"))]
        );
        // Back to a workload failure, then passing: its Normal goes to the workload.
        assert_eq!(
            pass(
                &[out("a", on(&["Deployment/api"], Reason::HostNetworkBypassesWorkloadIdentity))],
                "2026-01-01T00:30:00Z"
            ),
            vec![(true, w("Deployment/api"))]
        );
        assert_eq!(pass(&[out("a", None)], "2026-01-01T00:40:00Z"), vec![(false, w("Deployment/api"))]);
    }

    #[test]
    fn a_lost_workload_event_is_published_again_alone() {
        let mut before = History::default();
        before.seed(None);
        let overrides = Reason::CredentialFileOverridesWorkloadIdentity;
        let failing = [out("a", on(&["Deployment/api", "Job/x"], overrides))];
        let (_, ev, mut next) = before.update(&failing, t("2026-01-01T00:00:00Z"));
        // Only the Job's Warning was lost: only it comes again.
        next.unpublished(&before, &ev[1..]);
        let (_, again, after) = next.update(&failing, t("2026-01-01T00:10:00Z"));
        assert_eq!(targets_of(&again), vec![(true, Some("Job/x".into()))]);
        // Recovery of both, one Normal lost: only it comes again.
        let (_, recovered, mut passing) = after.update(&[out("a", None)], t("2026-01-01T00:20:00Z"));
        assert_eq!(recovered.len(), 2);
        passing.unpublished(&after, &recovered[..1]);
        let (_, again, _) = passing.update(&[out("a", None)], t("2026-01-01T00:30:00Z"));
        assert_eq!(targets_of(&again), vec![(false, Some("Deployment/api".into()))]);
    }

    #[test]
    fn a_restart_remembers_which_workloads_were_warned() {
        let listed = Failure {
            namespace: "a".into(),
            service_account: "app".into(),
            stage: Stage::Workload,
            reason: Reason::HostNetworkBypassesWorkloadIdentity,
            message: "x".into(),
            since: Time(t("2026-01-01T00:00:00Z")),
            workloads: vec!["Deployment/api".into()],
        };
        let status = AuthProbeStatus { failures: vec![listed], ..Default::default() };
        let mut h = History::default();
        h.seed(Some(&status));
        let (_, ev, _) = h.update(&[out("a", None)], t("2026-01-01T01:00:00Z"));
        assert_eq!(targets_of(&ev), vec![(false, Some("Deployment/api".into()))]);
    }
}
