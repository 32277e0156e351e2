//! The canary Job, built from the named workload's pod template, and what its Pod's status says.
//!
//! The Job runs `authprobe canary` from the operator's image as the workload's ServiceAccount,
//! in its namespace, with what decides where ADC resolves in the workload: from its first
//! container that sets `GOOGLE_APPLICATION_CREDENTIALS` or `CLOUDSDK_CONFIG` (else its first
//! container), the variables [`AUTH_ENV`] (values and `valueFrom` alike), the mounts ADC reads
//! through (the credential file's, `CLOUDSDK_CONFIG`'s, gcloud's `.config/gcloud`, projected
//! ServiceAccount tokens; with a variable set through `valueFrom`, every ConfigMap, Secret,
//! projected and CSI mount) and their volumes (ConfigMap, Secret, projected, downward API, CSI,
//! emptyDir only), read-only; the pod's `automountServiceAccountToken`, and where it may be
//! scheduled (node selector, tolerations, node affinity), so the canary lands on the workload's
//! node pool. Its security context is restricted, its life bounded.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        batch::v1::{Job, JobSpec},
        core::v1::{
            Affinity, Capabilities, Container, EnvVar, Pod, PodSecurityContext, PodSpec, PodTemplateSpec,
            ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{ObjectMeta, OwnerReference},
    },
    jiff::Timestamp,
};
use sha2::{Digest, Sha256};

use super::{Report, WorkloadRef};

/// Labels every canary Job and Pod carries; the operator watches exactly these.
pub const SELECTOR: &str = "app.kubernetes.io/managed-by=authprobe,app.kubernetes.io/component=canary";
/// The UID of the AuthProbe a canary belongs to.
pub const PROBE_UID_LABEL: &str = "authprobe.io/probe-uid";
/// The Job controller's label naming a pod's Job.
pub const JOB_NAME_LABEL: &str = "job-name";
/// The ServiceAccount the canary runs as.
pub const SERVICE_ACCOUNT_ANNOTATION: &str = "authprobe.io/service-account";
/// The fingerprint the run is compared with, so a change is seen across operator restarts.
pub const COMPARE_ANNOTATION: &str = "authprobe.io/compare-fingerprint";
/// The workload the canary copies.
pub const WORKLOAD_ANNOTATION: &str = "authprobe.io/workload";
/// The canary's container.
pub const CONTAINER: &str = "canary";
/// The environment variables that decide where ADC resolves.
pub const AUTH_ENV: [&str; 4] =
    ["GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "HOME", "GCE_METADATA_HOST"];
/// The Job's bound on its run (the canary itself stops polling after 60 s).
pub const ACTIVE_DEADLINE_SECONDS: i64 = 120;
/// Finished Jobs (and their Pods) are removed this long after they end.
pub const TTL_SECONDS_AFTER_FINISHED: i32 = 600;
/// The canary's user and group: not root, and no user of the image.
const CANARY_USER: i64 = 65532;

/// What a canary Job is built from.
#[derive(Clone, Copy, Debug)]
pub struct JobRequest<'a> {
    /// The AuthProbe's name.
    pub probe: &'a str,
    /// The AuthProbe's UID (owner reference and labels).
    pub probe_uid: &'a str,
    /// Where it runs.
    pub namespace: &'a str,
    /// The workload it copies.
    pub workload: &'a WorkloadRef,
    /// The workload's pod template.
    pub pod: &'a PodSpec,
    /// The operator's image.
    pub image: &'a str,
    /// The last fingerprint, which the run is compared with.
    pub compare_fingerprint: Option<&'a str>,
    /// Now: the name's suffix.
    pub now: Timestamp,
}

/// The ServiceAccount a pod template runs as.
pub fn service_account(pod: &PodSpec) -> String {
    pod.service_account_name
        .clone()
        .or_else(|| pod.service_account.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// The Job's name: the probe's hash and the second it was made (at most one per probe and
/// namespace in flight), short enough for the `job-name` label.
pub fn job_name(probe_uid: &str, now: Timestamp) -> String {
    let hash: String =
        Sha256::digest(probe_uid.as_bytes()).iter().take(4).map(|b| format!("{b:02x}")).collect();
    format!("authprobe-canary-{hash}-{}", now.as_second())
}

/// Builds the canary Job; `Err` when the template has no container to copy.
pub fn build(req: &JobRequest<'_>) -> Result<Job, String> {
    let source = req
        .pod
        .containers
        .iter()
        .find(|c| {
            c.env
                .iter()
                .flatten()
                .any(|e| e.name == "GOOGLE_APPLICATION_CREDENTIALS" || e.name == "CLOUDSDK_CONFIG")
        })
        .or_else(|| req.pod.containers.first())
        .ok_or_else(|| format!("{} has no container to copy", req.workload))?;
    let mut env: Vec<EnvVar> =
        source.env.iter().flatten().filter(|e| AUTH_ENV.contains(&e.name.as_str())).cloned().collect();
    let volumes: BTreeMap<&str, &Volume> =
        req.pod.volumes.iter().flatten().filter(|v| copyable(v)).map(|v| (v.name.as_str(), v)).collect();
    let mounts: Vec<VolumeMount> = source
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| volumes.get(m.name.as_str()).is_some_and(|v| reads_adc(m, v, &env)))
        .map(|m| VolumeMount {
            name: m.name.clone(),
            mount_path: m.mount_path.clone(),
            sub_path: m.sub_path.clone(),
            read_only: Some(true),
            ..Default::default()
        })
        .collect();
    let used: Vec<Volume> =
        volumes.values().filter(|v| mounts.iter().any(|m| m.name == v.name)).map(|v| (*v).clone()).collect();
    // gcloud's credentials mounted under a home directory the image sets: the canary looks there too.
    if !env.iter().any(|e| e.name == "HOME")
        && let Some(home) = mounts.iter().find_map(|m| home_of(&m.mount_path))
    {
        env.push(EnvVar { name: "HOME".into(), value: Some(home), ..Default::default() });
    }

    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "authprobe".to_string()),
        ("app.kubernetes.io/managed-by".to_string(), "authprobe".to_string()),
        ("app.kubernetes.io/component".to_string(), "canary".to_string()),
        (PROBE_UID_LABEL.to_string(), req.probe_uid.to_string()),
    ]);
    let ksa = service_account(req.pod);
    let mut annotations = BTreeMap::from([
        ("authprobe.io/probe".to_string(), req.probe.to_string()),
        (WORKLOAD_ANNOTATION.to_string(), req.workload.to_string()),
        ("authprobe.io/container".to_string(), source.name.clone()),
        (SERVICE_ACCOUNT_ANNOTATION.to_string(), ksa.clone()),
    ]);
    if let Some(fp) = req.compare_fingerprint {
        annotations.insert(COMPARE_ANNOTATION.to_string(), fp.to_string());
    }
    let affinity = req
        .pod
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.clone())
        .map(|n| Affinity { node_affinity: Some(n), ..Default::default() });
    let container = Container {
        name: CONTAINER.into(),
        image: Some(req.image.to_string()),
        args: Some(vec!["canary".into()]),
        env: (!env.is_empty()).then_some(env),
        volume_mounts: (!mounts.is_empty()).then_some(mounts),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".to_string(), Quantity("64Mi".into()))])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        termination_message_policy: Some("File".into()),
        ..Default::default()
    };
    let spec = PodSpec {
        service_account_name: Some(ksa),
        automount_service_account_token: req.pod.automount_service_account_token,
        restart_policy: Some("Never".into()),
        enable_service_links: Some(false),
        node_selector: req.pod.node_selector.clone(),
        tolerations: req.pod.tolerations.clone(),
        affinity,
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(CANARY_USER),
            run_as_group: Some(CANARY_USER),
            fs_group: Some(CANARY_USER),
            seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
            ..Default::default()
        }),
        containers: vec![container],
        volumes: (!used.is_empty()).then_some(used),
        ..Default::default()
    };
    Ok(Job {
        metadata: ObjectMeta {
            name: Some(job_name(req.probe_uid, req.now)),
            namespace: Some(req.namespace.to_string()),
            labels: Some(labels.clone()),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "authprobe.io/v1alpha1".into(),
                kind: "AuthProbe".into(),
                name: req.probe.to_string(),
                uid: req.probe_uid.to_string(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(ACTIVE_DEADLINE_SECONDS),
            ttl_seconds_after_finished: Some(TTL_SECONDS_AFTER_FINISHED),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(spec),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// Volume types a restricted pod may use and that can carry a credential.
fn copyable(v: &Volume) -> bool {
    v.config_map.is_some()
        || v.secret.is_some()
        || v.projected.is_some()
        || v.downward_api.is_some()
        || v.csi.is_some()
        || v.empty_dir.is_some()
}

/// Whether ADC reads through this mount, given the container's environment.
fn reads_adc(mount: &VolumeMount, volume: &Volume, env: &[EnvVar]) -> bool {
    let path = mount.mount_path.trim_end_matches('/');
    let under =
        |file: &str| file == path || file.strip_prefix(path).is_some_and(|rest| rest.starts_with('/'));
    let value = |name: &str| env.iter().find(|e| e.name == name);
    let projected_token = volume
        .projected
        .as_ref()
        .is_some_and(|p| p.sources.iter().flatten().any(|s| s.service_account_token.is_some()));
    let indirect = ["GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG"]
        .iter()
        .any(|n| value(n).is_some_and(|e| e.value_from.is_some()));
    let carries_files = volume.config_map.is_some()
        || volume.secret.is_some()
        || volume.projected.is_some()
        || volume.csi.is_some();
    let literal = |name: &str| value(name).and_then(|e| e.value.clone());
    let files = [
        literal("GOOGLE_APPLICATION_CREDENTIALS"),
        literal("CLOUDSDK_CONFIG").map(|d| format!("{}/{}", d.trim_end_matches('/'), super::WELL_KNOWN_FILE)),
        literal("HOME")
            .map(|h| format!("{}/.config/gcloud/{}", h.trim_end_matches('/'), super::WELL_KNOWN_FILE)),
    ];
    projected_token
        || (indirect && carries_files)
        || files.iter().flatten().any(|f| under(f))
        || home_of(path).is_some()
}

/// The home directory a gcloud credential mount sits in (`/home/app/.config/gcloud` → `/home/app`).
fn home_of(mount_path: &str) -> Option<String> {
    let path = mount_path.trim_end_matches('/');
    ["/.config/gcloud/application_default_credentials.json", "/.config/gcloud", "/.config"]
        .iter()
        .find_map(|suffix| path.strip_suffix(suffix))
        .map(|home| if home.is_empty() { "/".to_string() } else { home.to_string() })
}

/// What a canary Job's Pod status says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Run {
    /// Created, not running yet, nothing conclusive.
    Starting,
    /// Held back by something that keeps it from running (unschedulable, image pull, configuration).
    Blocked(String),
    /// The canary runs.
    Running,
    /// It finished and reported.
    Finished(Report),
    /// It ran and ended without a complete report (killed, deleted, crashed): no verdict.
    Incomplete(String),
    /// The Job ended without the canary ever starting.
    NeverRan(String),
}

/// Waiting reasons that keep a container from ever starting on its own.
const BLOCKING_WAITS: [&str; 6] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
];

/// Reads a canary Job and its Pod; `ran` says whether an earlier look saw the canary running.
pub fn observe(job: &Job, pod: Option<&Pod>, ran: bool) -> Run {
    let status = pod.and_then(|p| p.status.as_ref());
    let container = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == CONTAINER));
    let state = container.and_then(|c| c.state.as_ref());
    if let Some(t) = state.and_then(|s| s.terminated.as_ref()) {
        let report = t.message.as_deref().and_then(Report::parse);
        return match report {
            Some(report) if t.exit_code == 0 || t.exit_code == 1 => Run::Finished(report),
            _ => Run::Incomplete(format!(
                "the canary ended with exit code {}{} and no complete report",
                t.exit_code,
                t.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            )),
        };
    }
    if state.is_some_and(|s| s.running.is_some()) {
        return Run::Running;
    }
    let blocked = state.and_then(|s| s.waiting.as_ref()).and_then(|w| {
        let reason = w.reason.as_deref().filter(|r| BLOCKING_WAITS.contains(r))?;
        Some(format!("{reason}: {}", w.message.as_deref().unwrap_or_default()))
    });
    let unschedulable = status.and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        let c = cs.iter().find(|c| {
            c.type_ == "PodScheduled" && c.status == "False" && c.reason.as_deref() == Some("Unschedulable")
        })?;
        Some(format!("unschedulable: {}", c.message.as_deref().unwrap_or_default()))
    });
    let held = blocked.or(unschedulable);
    let ended = job.status.as_ref().and_then(|s| s.conditions.as_ref()).and_then(|cs| {
        cs.iter().find(|c| (c.type_ == "Failed" || c.type_ == "Complete") && c.status == "True")
    });
    match (ended, held) {
        (None, Some(why)) => Run::Blocked(why),
        (None, None) => Run::Starting,
        (Some(_), _) if ran => Run::Incomplete("the canary was stopped before it reported".into()),
        (Some(c), held) if c.reason.as_deref() == Some("DeadlineExceeded") => Run::NeverRan(format!(
            "it did not start within the Job's {ACTIVE_DEADLINE_SECONDS}s{}",
            held.map(|h| format!(" ({h})")).unwrap_or_default()
        )),
        (Some(c), _) => Run::Incomplete(format!(
            "the Job ended ({}) before the canary reported",
            c.reason.as_deref().unwrap_or("no reason")
        )),
    }
}

#[cfg(test)]
mod tests;
