//! What the controller remembers per probe between passes, keyed by the probe's UID: a probe
//! deleted and recreated under the same name starts fresh. A probe's state is forgotten when its
//! Delete event arrives, or when a re-list no longer shows it.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::{
    api::{AuthProbe, AuthProbeStatus},
    engine::{
        Plan, canary::book::Book, decide::Memory, schedule::LiveLedger, stage::endpoint::EndpointAllow,
    },
};

/// How long a namespace's entry into a probe's scope keeps opening the propagation grace (longer
/// than the longest grace).
const ENTERED_KEPT: Duration = Duration::from_secs(3600);

/// A probe's checked spec and the generation it was checked at.
type CachedPlan = (Option<i64>, Arc<Result<Plan, String>>);

/// One probe's state.
#[derive(Debug, Default)]
struct ProbeState {
    name: String,
    /// The engine's memory; out of the map while a pass works with it.
    memory: Option<Memory>,
    /// The live chain's verifications; out of the map while a pass works with it.
    ledger: Option<LiveLedger>,
    /// What the probe's canaries said; out of the map while a pass works with it.
    canary: Option<Book>,
    plan: Option<CachedPlan>,
    /// Namespaces selected in the last pass (compact keys), to notice coverage being lost or gained.
    scope: Option<HashSet<u64>>,
    /// When a namespace entered the probe's scope, for the propagation grace.
    entered: HashMap<u64, Timestamp>,
    /// Reconcile failures in a row, for the error backoff.
    failures: u32,
}

/// Every probe's state.
#[derive(Debug, Default)]
pub struct States {
    by_uid: Mutex<HashMap<String, ProbeState>>,
    /// The hosts endpoints may name; a plan naming another is `InvalidSpec`.
    endpoint_allow: EndpointAllow,
}

fn uid(probe: &AuthProbe) -> String {
    probe.uid().unwrap_or_default()
}

impl States {
    /// No probe's state yet; plans admit endpoints on the hosts of `endpoint_allow` only.
    pub fn new(endpoint_allow: EndpointAllow) -> Self {
        Self { by_uid: Mutex::default(), endpoint_allow }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, ProbeState>> {
        self.by_uid.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Runs `f` on the probe's state, creating it: only the start of a pass does that.
    fn with<T>(&self, probe: &AuthProbe, f: impl FnOnce(&mut ProbeState) -> T) -> T {
        let mut states = self.lock();
        let state = states.entry(uid(probe)).or_default();
        state.name = probe.name_any();
        f(state)
    }

    /// Runs `f` on the probe's state if it is remembered.
    fn peek<T>(&self, probe: &AuthProbe, f: impl FnOnce(&mut ProbeState) -> T) -> Option<T> {
        self.lock().get_mut(&uid(probe)).map(f)
    }

    /// The checked spec of `probe`, parsed once per generation.
    pub fn plan(&self, probe: &AuthProbe) -> Arc<Result<Plan, String>> {
        let generation = probe.metadata.generation;
        self.with(probe, |s| match &s.plan {
            Some((g, plan)) if *g == generation => plan.clone(),
            _ => {
                let plan = Arc::new(Plan::parse_allowing(&probe.spec, &self.endpoint_allow));
                s.plan = Some((generation, plan.clone()));
                plan
            }
        })
    }

    /// Takes the probe's memory for a pass (a fresh one for a new probe).
    pub fn take_memory(&self, probe: &AuthProbe) -> Memory {
        self.with(probe, |s| s.memory.take().unwrap_or_default())
    }

    /// Puts the memory back after a pass; returns false (and drops it) when the probe was
    /// forgotten meanwhile, so nothing about a deleted probe is reported.
    pub fn put_memory(&self, probe: &AuthProbe, memory: Memory) -> bool {
        self.peek(probe, |s| s.memory = Some(memory)).is_some()
    }

    /// Takes the probe's live verifications for a pass (none yet for a new probe).
    pub fn take_ledger(&self, probe: &AuthProbe) -> LiveLedger {
        self.with(probe, |s| s.ledger.take().unwrap_or_default())
    }

    /// Puts the live verifications back after a pass (dropped if the probe was forgotten meanwhile).
    pub fn put_ledger(&self, probe: &AuthProbe, ledger: LiveLedger) {
        self.peek(probe, |s| s.ledger = Some(ledger));
    }

    /// Takes the probe's canary book for `workload` for a pass: a new one, carrying what
    /// `status` says, when there is none or it was kept for another workload.
    pub fn take_book(&self, probe: &AuthProbe, workload: &str, status: Option<&AuthProbeStatus>) -> Book {
        self.with(probe, |s| match s.canary.take() {
            Some(book) if book.workload() == workload => book,
            _ => Book::seed(workload, status),
        })
    }

    /// Puts the canary book back after a pass (nothing, if the probe was forgotten meanwhile).
    pub fn put_book(&self, probe: &AuthProbe, book: Book) {
        self.peek(probe, |s| s.canary = Some(book));
    }

    /// Forgets every probe's memory of Events and writes, and of its canaries: they are seeded
    /// again from status and the cluster's Jobs, as after a restart (another replica may have led
    /// in between).
    pub fn reset_memories(&self) {
        for state in self.lock().values_mut() {
            state.memory = None;
            state.canary = None;
        }
    }

    /// Records the namespaces a pass selected (compact keys) and when each new one entered.
    pub fn record_scope(&self, probe: &AuthProbe, keys: HashSet<u64>, now: Timestamp) {
        self.with(probe, |s| {
            if let Some(previous) = &s.scope {
                for k in keys.iter().filter(|k| !previous.contains(*k)) {
                    s.entered.insert(*k, now);
                }
            }
            s.entered
                .retain(|k, at| keys.contains(k) && at.checked_add(ENTERED_KEPT).is_ok_and(|end| end > now));
            s.scope = Some(keys);
        });
    }

    /// When a namespace entered the probe's scope, if it did while watched.
    pub fn entered(&self, probe: &AuthProbe, namespace_key: u64) -> Option<Timestamp> {
        self.peek(probe, |s| s.entered.get(&namespace_key).copied()).flatten()
    }

    /// Whether the probe with this UID selected the namespace in its last pass.
    pub fn covered_last_pass(&self, probe_uid: &str, namespace_key: u64) -> bool {
        self.lock()
            .get(probe_uid)
            .and_then(|s| s.scope.as_ref())
            .is_some_and(|scope| scope.contains(&namespace_key))
    }

    /// Counts a failed reconcile; returns how many failed in a row.
    pub fn failed(&self, probe: &AuthProbe) -> u32 {
        self.peek(probe, |s| {
            s.failures = s.failures.saturating_add(1);
            s.failures
        })
        .unwrap_or(1)
    }

    /// A reconcile succeeded.
    pub fn succeeded(&self, probe: &AuthProbe) {
        self.peek(probe, |s| s.failures = 0);
    }

    /// Forgets the probe with this UID; returns its name when no other remembered probe has it
    /// (a probe recreated under the same name keeps its metric series).
    pub fn forget(&self, probe_uid: &str) -> Option<String> {
        let mut states = self.lock();
        let gone = states.remove(probe_uid)?;
        (!states.values().any(|s| s.name == gone.name)).then_some(gone.name)
    }

    /// Forgets every probe whose UID is not in `live` (after a re-list, which reports no Delete
    /// for objects deleted while the watch was down); returns the names no longer in use.
    pub fn retain(&self, live: &HashSet<String>) -> Vec<String> {
        let gone: Vec<String> = self.lock().keys().filter(|uid| !live.contains(*uid)).cloned().collect();
        gone.iter().filter_map(|uid| self.forget(uid)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AuthProbeSpec;

    fn probe(name: &str, uid: &str) -> AuthProbe {
        let spec: AuthProbeSpec = serde_json::from_value(serde_json::json!({
            "namespaceSelector": {},
            "identity": {"platform": "GKE", "projectId": "acme-prod"}
        }))
        .unwrap();
        let mut p = AuthProbe::new(name, spec);
        p.metadata.uid = Some(uid.into());
        p
    }

    #[test]
    fn state_is_per_uid_and_forgotten_with_the_probe() {
        let states = States::default();
        let old = probe("payments", "u1");
        states.record_scope(&old, HashSet::from([1]), Timestamp::UNIX_EPOCH);
        assert!(states.covered_last_pass("u1", 1));
        // Recreated under the same name: a new UID starts fresh.
        let new = probe("payments", "u2");
        states.record_scope(&new, HashSet::new(), Timestamp::UNIX_EPOCH);
        assert!(!states.covered_last_pass("u2", 1));
        assert_eq!(states.forget("u1"), None, "the name lives on in the new probe");
        assert!(!states.covered_last_pass("u1", 1));
        assert_eq!(states.forget("u2"), Some("payments".into()));
        assert_eq!(states.forget("u2"), None);
    }

    #[test]
    fn a_pass_finishing_after_the_delete_puts_nothing_back() {
        let states = States::default();
        let p = probe("payments", "u1");
        let memory = states.take_memory(&p);
        assert_eq!(states.forget("u1"), Some("payments".into()));
        assert!(!states.put_memory(&p, memory));
        assert_eq!(states.forget("u1"), None, "nothing was put back");
    }

    #[test]
    fn a_relist_forgets_probes_it_no_longer_shows() {
        let states = States::default();
        states.take_memory(&probe("a", "u1"));
        states.take_memory(&probe("b", "u2"));
        assert_eq!(states.retain(&HashSet::from(["u2".to_string()])), vec!["a".to_string()]);
        assert_eq!(states.forget("u2"), Some("b".into()));
    }
}
