//! What the controller remembers of one probe's canaries, one track per namespace: the Job in
//! flight, when the last one started, the last complete outcome and fingerprint, and a
//! fingerprint change waiting for its Event. The cluster's Jobs are the source of truth for
//! what runs (see [`Book::observe`]); the outcome outlives the Job's TTL here, and after a
//! restart comes back from status ([`Book::seed`]) until the next run replaces it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;

use super::{Report, job::Run};
use crate::{
    api::{AuthProbeStatus, Stage},
    engine::Finding,
};

/// A Job in flight that the cache no longer shows after this long is taken as gone (deleted
/// before it reported); before that, the cache may only lag behind the create.
const LOST_AFTER: Duration = Duration::from_secs(180);

/// A canary Job as the cache shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobSeen {
    /// Its name.
    pub name: String,
    /// `metadata.creationTimestamp`.
    pub created: Timestamp,
    /// The ServiceAccount it runs as.
    pub service_account: String,
    /// The fingerprint it is compared with.
    pub compare_fingerprint: Option<String>,
    /// What its Pod says.
    pub run: Run,
}

/// The last thing known about a namespace's canary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A complete run's report.
    Reported {
        /// Its Job.
        job: String,
        /// When its Job was made.
        started: Timestamp,
        /// What it found.
        report: Report,
    },
    /// The Job could not run.
    NotScheduled {
        /// Its Job.
        job: String,
        /// Why.
        why: String,
    },
    /// What the status said before a restart, until a run replaces it.
    Carried(Finding),
}

/// A fingerprint that changed between two complete runs, for a `CredentialSourceChanged` Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The namespace.
    pub namespace: String,
    /// The ServiceAccount the canary ran as.
    pub service_account: String,
    /// The Job that saw the new one.
    pub job: String,
    /// Before.
    pub from: String,
    /// Now.
    pub to: String,
}

/// One namespace's canary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Track {
    /// The ServiceAccount its runs use (the workload's).
    pub service_account: Option<String>,
    /// When the last Job was made (or the workload last looked for).
    pub launched: Option<Timestamp>,
    /// The last Job.
    pub job: Option<String>,
    /// Whether the last Job's canary was seen running.
    ran: bool,
    /// Whether the last Job has nothing more to say.
    settled: bool,
    /// The last outcome.
    pub outcome: Option<Outcome>,
    /// The last complete run's fingerprint.
    pub fingerprint: Option<String>,
    change: Option<Change>,
}

impl Track {
    /// Whether a Job runs, or may still run.
    pub fn in_flight(&self) -> bool {
        self.job.is_some() && !self.settled
    }

    /// Whether the last Job's canary was seen running.
    pub fn ran(&self) -> bool {
        self.ran
    }

    /// Whether the last run started before `change` (of the KSA: created, annotated, in scope):
    /// a new one is due at once.
    pub fn predates(&self, change: Timestamp) -> bool {
        self.launched.is_none_or(|l| l < second(change))
    }

    /// Whether the last report comes from a run that started before `change`: its fingerprint no
    /// longer tells whether the pod is the identity authprobe proves now.
    pub fn reported_before(&self, change: Timestamp) -> bool {
        matches!(&self.outcome, Some(Outcome::Reported { started, .. }) if *started < second(change))
    }
}

/// `t` to the second: the precision of the Jobs' `creationTimestamp` it is compared with.
fn second(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

/// A probe's canaries, for one `canary.workload`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Book {
    workload: String,
    tracks: BTreeMap<String, Track>,
}

impl Book {
    /// A book for `workload`, carrying the Canary findings `status` lists (the operator restarted,
    /// or leadership moved) until runs replace them.
    pub fn seed(workload: &str, status: Option<&AuthProbeStatus>) -> Self {
        let tracks = status
            .map(|s| s.failures.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|f| f.stage == Stage::Canary)
            .map(|f| {
                let finding = if f.reason.is_undecided() {
                    Finding::unknown(Stage::Canary, f.reason, f.message.clone())
                } else {
                    Finding::fail(Stage::Canary, f.reason, f.message.clone())
                };
                let track = Track {
                    service_account: Some(f.service_account.clone()),
                    outcome: Some(Outcome::Carried(finding)),
                    ..Track::default()
                };
                (f.namespace.clone(), track)
            })
            .collect();
        Self { workload: workload.to_string(), tracks }
    }

    /// The workload this book is for.
    pub fn workload(&self) -> &str {
        &self.workload
    }

    /// A namespace's track.
    pub fn track(&self, namespace: &str) -> Option<&Track> {
        self.tracks.get(namespace)
    }

    /// Forgets namespaces no longer in scope.
    pub fn retain(&mut self, namespaces: &BTreeSet<String>) {
        self.tracks.retain(|ns, _| namespaces.contains(ns));
    }

    /// Takes in the newest canary Job the cache shows for `namespace`, if any.
    pub fn observe(&mut self, namespace: &str, newest: Option<JobSeen>, now: Timestamp) {
        let track = self.tracks.entry(namespace.to_string()).or_default();
        let Some(seen) = newest.filter(|s| track.launched.is_none_or(|l| s.created >= l)) else {
            // The Job in flight is not (or no longer) in the cache.
            let lost = track.launched.and_then(|l| l.checked_add(LOST_AFTER).ok()).is_some_and(|t| t <= now);
            if track.in_flight() && lost {
                track.settled = true;
            }
            return;
        };
        if track.job.as_deref() != Some(&seen.name) {
            track.job = Some(seen.name.clone());
            track.launched = Some(seen.created);
            track.ran = false;
            track.settled = false;
            track.service_account = Some(seen.service_account.clone());
            if track.fingerprint.is_none() {
                track.fingerprint = seen.compare_fingerprint.clone();
            }
        }
        if track.settled {
            return;
        }
        match seen.run {
            Run::Starting => {}
            Run::Running => track.ran = true,
            Run::Blocked(why) => track.outcome = Some(Outcome::NotScheduled { job: seen.name, why }),
            Run::NeverRan(why) => {
                track.settled = true;
                track.outcome = Some(Outcome::NotScheduled { job: seen.name, why });
            }
            // No verdict from a half result: the last outcome stands.
            Run::Incomplete(_) => track.settled = true,
            Run::Finished(report) => {
                track.settled = true;
                if let Some(to) = &report.fingerprint {
                    if let Some(from) = track.fingerprint.as_ref().filter(|f| *f != to) {
                        track.change = Some(Change {
                            namespace: namespace.to_string(),
                            service_account: seen.service_account.clone(),
                            job: seen.name.clone(),
                            from: from.clone(),
                            to: to.clone(),
                        });
                    }
                    track.fingerprint = Some(to.clone());
                }
                track.outcome = Some(Outcome::Reported { job: seen.name, started: seen.created, report });
            }
        }
    }

    /// Whether `namespace` is due a new canary: none in flight, and none started within `every`
    /// (`forced`: a probe-now pass, any time).
    pub fn due(&self, namespace: &str, every: Duration, now: Timestamp, forced: bool) -> bool {
        let Some(track) = self.tracks.get(namespace) else { return true };
        !track.in_flight()
            && (forced
                || track.launched.and_then(|l| l.checked_add(every).ok()).is_none_or(|next| next <= now))
    }

    /// A Job was made for `namespace`, running as `service_account`, at `created` (the API
    /// server's `creationTimestamp`, the clock the cache's Jobs are compared by).
    pub fn launched(&mut self, namespace: &str, job: String, service_account: String, created: Timestamp) {
        let track = self.tracks.entry(namespace.to_string()).or_default();
        track.job = Some(job);
        track.launched = Some(second(created));
        track.ran = false;
        track.settled = false;
        track.service_account = Some(service_account);
    }

    /// The API server refused `namespace`'s Job (RBAC, quota, admission): it did not run; try
    /// again after `every`.
    pub fn refused(
        &mut self,
        namespace: &str,
        job: String,
        service_account: String,
        why: String,
        now: Timestamp,
    ) {
        let track = self.tracks.entry(namespace.to_string()).or_default();
        track.job = Some(job.clone());
        track.launched = Some(second(now));
        track.ran = false;
        track.settled = true;
        track.service_account = Some(service_account);
        track.outcome = Some(Outcome::NotScheduled { job, why });
    }

    /// No Job was made for `namespace` (no such workload, or its ServiceAccount is not checked):
    /// look again after `every`; what it found before no longer applies.
    pub fn skipped(&mut self, namespace: &str, now: Timestamp) {
        let track = self.tracks.entry(namespace.to_string()).or_default();
        *track = Track { launched: Some(second(now)), ..Track::default() };
    }

    /// When the next canary is due, if no Job is in flight somewhere (whose Pod's changes wake
    /// the controller anyway).
    pub fn next_due(&self, every: Duration) -> Option<Timestamp> {
        self.tracks
            .values()
            .filter(|t| !t.in_flight())
            .filter_map(|t| t.launched?.checked_add(every).ok())
            .min()
    }

    /// The fingerprint changes not yet announced.
    pub fn changes(&self) -> Vec<Change> {
        self.tracks.values().filter_map(|t| t.change.clone()).collect()
    }

    /// The change of `namespace` was announced.
    pub fn announced(&mut self, namespace: &str) {
        if let Some(t) = self.tracks.get_mut(namespace) {
            t.change = None;
        }
    }
}

#[cfg(test)]
mod tests;
