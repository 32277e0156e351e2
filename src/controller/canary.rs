//! The canaries of probes that enable one (`spec.canary`): their Jobs and Pods watched (only
//! canary objects, by label, pruned to metadata and status), a Job launched per namespace when
//! one is due and only while the fence holds, and the result read from the Pod's status, never
//! from its logs. The engine's [`Book`] remembers what the runs said; its outcomes become each
//! KSA's stage `Canary` finding.

use std::{collections::HashMap, sync::Arc, time::Duration};

use futures::{StreamExt, stream};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{Pod, PodSpec},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, PostParams},
    runtime::reflector::{ObjectRef, Store},
};

use crate::{
    api::{AuthProbe, Reason},
    engine::{
        CanaryPlan,
        canary::{
            WorkloadKind, WorkloadRef,
            book::{Book, Change, JobSeen},
            job::{self, JobRequest, Run},
        },
        decide::Announcement,
    },
    fence::Fence,
};

/// The KSAs a pass checks (namespace, name), with when each last changed in a way that makes an
/// earlier canary's report stale (creation, annotation, entering the probe's scope).
pub type Checked = HashMap<(String, String), Option<Timestamp>>;

/// No Kubernetes call of a canary waits longer.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Namespaces launched at once.
const LAUNCH_CONCURRENCY: usize = 8;
/// How long a pass waits for the canary caches to fill (they may be forbidden to this operator).
const CACHE_WAIT: Duration = Duration::from_secs(10);

/// What launching and reading canaries needs.
pub struct Canaries {
    client: Client,
    image: String,
    fence: Arc<Fence>,
    /// Canary Jobs, pruned.
    jobs: Store<Job>,
    /// Canary Pods, pruned.
    pods: Store<Pod>,
}

/// Keeps what a canary Job is read for: identity, labels, annotations, creation, status.
pub fn prune_job(job: &mut Job) {
    job.spec = None;
    job.metadata.managed_fields = None;
}

/// Keeps what a canary Pod is read for: its labels and status.
pub fn prune_pod(pod: &mut Pod) {
    pod.spec = None;
    pod.metadata.managed_fields = None;
    pod.metadata.annotations = None;
}

/// The probe a canary object belongs to, by its label.
pub fn probe_of(
    probes: &Store<AuthProbe>,
    labels: &std::collections::BTreeMap<String, String>,
) -> Vec<ObjectRef<AuthProbe>> {
    let Some(uid) = labels.get(job::PROBE_UID_LABEL) else { return vec![] };
    probes
        .state()
        .iter()
        .filter(|p| p.uid().as_deref() == Some(uid.as_str()))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// What a namespace's launch came to.
enum Launch {
    /// A Job was made: its name, ServiceAccount and creation time.
    Made(String, String, Timestamp),
    /// No workload of that name, or it runs as a ServiceAccount the probe does not check.
    Skipped,
    /// The API server refused the Job (RBAC, quota, admission): the Job's name and why.
    Refused(String, String, String),
    /// Nothing happened this pass (a read failed, or the fence does not hold): try again.
    Later,
}

impl Canaries {
    /// Canaries from `image`, made through `client` while `fence` holds.
    pub fn new(client: Client, image: String, fence: Arc<Fence>, jobs: Store<Job>, pods: Store<Pod>) -> Self {
        Self { client, image, fence, jobs, pods }
    }

    /// One pass's canary step for `probe`: takes in what its Jobs' Pods say, launches the Jobs
    /// that are due in `namespaces` (`forced`: a probe-now pass; a KSA changed since its last
    /// run) for the workload's ServiceAccount when the pass checks it. Nothing, when the caches
    /// are not there: what the book says stands.
    pub async fn step(
        &self,
        probe: &AuthProbe,
        plan: &CanaryPlan,
        namespaces: &[String],
        checked: &Checked,
        book: &mut Book,
        forced: bool,
    ) {
        let ready = async { futures::try_join!(self.jobs.wait_until_ready(), self.pods.wait_until_ready()) };
        if !matches!(tokio::time::timeout(CACHE_WAIT, ready).await, Ok(Ok(_))) {
            tracing::warn!(probe = %probe.name_any(), "canary Jobs and Pods are not cached (is the operator allowed to watch them?): no canary this pass");
            return;
        }
        let uid = probe.uid().unwrap_or_default();
        let now = Timestamp::now();
        book.retain(&namespaces.iter().cloned().collect());
        let mut newest = self.newest_jobs(&uid, book);
        for ns in namespaces {
            let seen = newest.remove(ns);
            if let Some(JobSeen { name, run: Run::Incomplete(why), .. }) = &seen
                && book.track(ns).is_some_and(|t| t.in_flight() && t.job.as_deref() == Some(name))
            {
                // No verdict, but a canary that keeps ending like this (a crashing image) should be seen.
                tracing::warn!(probe = %probe.name_any(), namespace = %ns, job = %name, why = %why, "a canary ended without a report: no verdict from it");
            }
            book.observe(ns, seen, now);
        }
        let changed = |ns: &String| {
            let track = book.track(ns)?;
            let change = (*checked.get(&(ns.clone(), track.service_account.clone()?))?)?;
            Some(track.predates(change))
        };
        let due: Vec<(String, Option<String>)> = namespaces
            .iter()
            .filter(|ns| book.due(ns, plan.every, now, forced || changed(ns) == Some(true)))
            .map(|ns| (ns.clone(), book.track(ns).and_then(|t| t.fingerprint.clone())))
            .collect();
        let uid = uid.as_str();
        let launches: Vec<(String, Launch)> = stream::iter(due)
            .map(|(ns, compare): (String, Option<String>)| async move {
                let launch = self.launch(probe, uid, plan, &ns, checked, compare.as_deref(), now).await;
                (ns, launch)
            })
            .buffer_unordered(LAUNCH_CONCURRENCY)
            .collect()
            .await;
        for (ns, launch) in launches {
            match launch {
                Launch::Made(job, ksa, created) => book.launched(&ns, job, ksa, created),
                Launch::Skipped => book.skipped(&ns, now),
                Launch::Refused(job, ksa, why) => book.refused(&ns, job, ksa, why, now),
                Launch::Later => {}
            }
        }
    }

    /// The newest canary Job of the probe with this UID in each namespace, with what its Pod says.
    fn newest_jobs(&self, uid: &str, book: &Book) -> HashMap<String, JobSeen> {
        let pods: HashMap<(String, String), Arc<Pod>> = self
            .pods
            .state()
            .into_iter()
            .filter_map(|p| {
                let job = p.labels().get(job::JOB_NAME_LABEL)?.clone();
                Some(((p.namespace()?, job), p))
            })
            .collect();
        let mut newest: HashMap<String, Arc<Job>> = HashMap::new();
        for j in self.jobs.state() {
            if j.labels().get(job::PROBE_UID_LABEL).map(String::as_str) != Some(uid) {
                continue;
            }
            let (Some(ns), Some(created)) = (j.namespace(), j.creation_timestamp()) else { continue };
            let newer = newest
                .get(&ns)
                .is_none_or(|n| (n.creation_timestamp(), n.name_any()) < (Some(created), j.name_any()));
            if newer {
                newest.insert(ns, j);
            }
        }
        newest
            .into_iter()
            .filter_map(|(ns, j)| {
                let name = j.name_any();
                let pod = pods.get(&(ns.clone(), name.clone()));
                let ran = book.track(&ns).is_some_and(|t| t.job.as_deref() == Some(&name) && t.ran());
                let annotation = |key: &str| j.annotations().get(key).cloned();
                let seen = JobSeen {
                    created: j.creation_timestamp()?.0,
                    service_account: annotation(job::SERVICE_ACCOUNT_ANNOTATION)?,
                    compare_fingerprint: annotation(job::COMPARE_ANNOTATION),
                    run: job::observe(&j, pod.map(AsRef::as_ref), ran),
                    name,
                };
                Some((ns, seen))
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    async fn launch(
        &self,
        probe: &AuthProbe,
        uid: &str,
        plan: &CanaryPlan,
        ns: &str,
        checked: &Checked,
        compare: Option<&str>,
        now: Timestamp,
    ) -> Launch {
        let pod = match self.workload_pod(ns, &plan.workload).await {
            Ok(Some(pod)) => pod,
            Ok(None) => return Launch::Skipped,
            Err(e) => {
                tracing::warn!(namespace = ns, workload = %plan.workload, error = %e, "cannot read the canary's workload; trying again next pass");
                return Launch::Later;
            }
        };
        let ksa = job::service_account(&pod);
        if !checked.contains_key(&(ns.to_string(), ksa.clone())) {
            return Launch::Skipped;
        }
        let request = JobRequest {
            probe: &probe.name_any(),
            probe_uid: uid,
            namespace: ns,
            workload: &plan.workload,
            pod: &pod,
            image: &self.image,
            compare_fingerprint: compare,
            now,
        };
        let name = job::job_name(uid, now);
        let built = match job::build(&request) {
            Ok(job) => job,
            Err(why) => return Launch::Refused(name, ksa, why),
        };
        if !self.fence.holds_for(CALL_TIMEOUT) {
            return Launch::Later;
        }
        let api = Api::<Job>::namespaced(self.client.clone(), ns);
        match tokio::time::timeout(CALL_TIMEOUT, api.create(&PostParams::default(), &built)).await {
            Ok(Ok(made)) => {
                let created = made.creation_timestamp().map_or(now, |t| t.0);
                tracing::info!(probe = %probe.name_any(), namespace = ns, job = %name, serviceaccount = %ksa, "canary Job created");
                Launch::Made(name, ksa, created)
            }
            // Another replica made it this second: the book counts in seconds, as the Jobs do.
            Ok(Err(kube::Error::Api(e))) if e.code == 409 => Launch::Made(name, ksa, now),
            Ok(Err(kube::Error::Api(e))) if (400..500).contains(&e.code) => Launch::Refused(
                name,
                ksa,
                format!(
                    "the API server refused the Job ({} {}): {}",
                    e.code,
                    e.reason,
                    crate::redact::upstream(&e.message)
                ),
            ),
            Ok(Err(e)) => {
                tracing::warn!(namespace = ns, error = %e, "cannot create the canary Job; trying again next pass");
                Launch::Later
            }
            Err(_) => {
                tracing::warn!(namespace = ns, "no answer creating the canary Job; trying again next pass");
                Launch::Later
            }
        }
    }

    /// The named workload's pod template in `ns`; `None` when there is no such workload.
    async fn workload_pod(&self, ns: &str, workload: &WorkloadRef) -> Result<Option<PodSpec>, kube::Error> {
        let client = self.client.clone();
        let name = workload.name.as_str();
        let get = async {
            Ok(match workload.kind {
                WorkloadKind::Deployment => Api::<Deployment>::namespaced(client, ns)
                    .get_opt(name)
                    .await?
                    .and_then(|d| d.spec?.template.spec),
                WorkloadKind::StatefulSet => Api::<StatefulSet>::namespaced(client, ns)
                    .get_opt(name)
                    .await?
                    .and_then(|s| s.spec?.template.spec),
                WorkloadKind::DaemonSet => Api::<DaemonSet>::namespaced(client, ns)
                    .get_opt(name)
                    .await?
                    .and_then(|d| d.spec?.template.spec),
                WorkloadKind::Job => Api::<Job>::namespaced(client, ns)
                    .get_opt(name)
                    .await?
                    .and_then(|j| j.spec?.template.spec),
                WorkloadKind::CronJob => Api::<CronJob>::namespaced(client, ns)
                    .get_opt(name)
                    .await?
                    .and_then(|c| c.spec.job_template.spec?.template.spec),
                WorkloadKind::Pod => {
                    Api::<Pod>::namespaced(client, ns).get_opt(name).await?.and_then(|p| p.spec)
                }
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, get).await.unwrap_or_else(|_| {
            Err(kube::Error::Service(format!("no answer within {CALL_TIMEOUT:?}").into()))
        })
    }

    /// Deletes the probe's canary Jobs still running for another workload than `keep` (the
    /// canary was turned off, or names another workload now).
    pub async fn delete_stale(&self, probe: &AuthProbe, keep: Option<&WorkloadRef>) {
        let uid = probe.uid().unwrap_or_default();
        let keep = keep.map(ToString::to_string);
        let stale: Vec<Arc<Job>> = self
            .jobs
            .state()
            .into_iter()
            .filter(|j| j.labels().get(job::PROBE_UID_LABEL) == Some(&uid))
            .filter(|j| j.annotations().get(job::WORKLOAD_ANNOTATION) != keep.as_ref())
            .filter(|j| {
                !j.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
                    cs.iter().any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
                })
            })
            .collect();
        for j in stale {
            if !self.fence.holds_for(CALL_TIMEOUT) {
                return;
            }
            let api = Api::<Job>::namespaced(self.client.clone(), &j.namespace().unwrap_or_default());
            let (name, params) = (j.name_any(), DeleteParams::background());
            match tokio::time::timeout(CALL_TIMEOUT, api.delete(&name, &params)).await {
                Ok(Ok(_)) => {
                    tracing::info!(probe = %probe.name_any(), job = %j.name_any(), "deleted a canary Job the probe no longer wants")
                }
                Ok(Err(e)) => {
                    tracing::warn!(job = %j.name_any(), error = %e, "cannot delete a stale canary Job")
                }
                Err(_) => tracing::warn!(job = %j.name_any(), "no answer deleting a stale canary Job"),
            }
        }
    }
}

/// The `CredentialSourceChanged` Event of a fingerprint change.
pub fn announcement(change: &Change, workload: &WorkloadRef, probe: &str) -> Announcement {
    Announcement::notice(
        &change.namespace,
        &change.service_account,
        Reason::CredentialSourceChanged,
        &format!(
            "The credential the canary of {workload} obtains as ServiceAccount {}/{} changed: its claim fingerprint went from {} to {} (Job {}/{}, AuthProbe {probe})",
            change.namespace, change.service_account, change.from, change.to, change.namespace, change.job
        ),
    )
}
