//! What the `Workload` stage reads of a workload: its pod template (or a bare Pod's spec) pruned to
//! what decides which credential Application Default Credentials load, and the ConfigMaps those
//! templates mount. Pruning happens here, once per watched object, so the operator caches only
//! this and `authprobe check` prunes the same way.

use std::{borrow::Cow, collections::BTreeMap, sync::Arc};

use internment::ArcIntern;
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{ConfigMap, Pod},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference},
};
use serde::{Deserialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::api::Reason;

/// The environment variable ADC reads first.
pub const CREDENTIALS_VAR: &str = "GOOGLE_APPLICATION_CREDENTIALS";
/// gcloud's configuration directory, where a user credential lives.
pub const CLOUDSDK_CONFIG_VAR: &str = "CLOUDSDK_CONFIG";
/// A ConfigMap value longer than this is kept as its length only: no credential configuration is
/// that large, and a cached ConfigMap must not hold megabytes.
pub const MAX_CONFIG_VALUE_BYTES: usize = 16 * 1024;

/// The kinds of object that run pods as a ServiceAccount.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
pub enum WorkloadKind {
    /// batch/v1.
    CronJob,
    /// apps/v1.
    DaemonSet,
    /// apps/v1.
    Deployment,
    /// batch/v1, unless a CronJob owns it (or an AuthProbe: a canary's).
    Job,
    /// v1, only without an owner.
    Pod,
    /// apps/v1.
    StatefulSet,
}

impl WorkloadKind {
    /// Every kind, in declaration order.
    pub const ALL: &'static [WorkloadKind] = <WorkloadKind as strum::VariantArray>::VARIANTS;

    /// The API group and version.
    pub fn api_version(self) -> &'static str {
        match self {
            WorkloadKind::DaemonSet | WorkloadKind::Deployment | WorkloadKind::StatefulSet => "apps/v1",
            WorkloadKind::CronJob | WorkloadKind::Job => "batch/v1",
            WorkloadKind::Pod => "v1",
        }
    }

    /// The resource as `kubectl` names it.
    pub fn resource(self) -> &'static str {
        match self {
            WorkloadKind::CronJob => "cronjob",
            WorkloadKind::DaemonSet => "daemonset",
            WorkloadKind::Deployment => "deployment",
            WorkloadKind::Job => "job",
            WorkloadKind::Pod => "pod",
            WorkloadKind::StatefulSet => "statefulset",
        }
    }

    /// The JSON pointer to the pod spec within an object of this kind.
    pub fn pod_spec_pointer(self) -> &'static str {
        match self {
            WorkloadKind::CronJob => "/spec/jobTemplate/spec/template/spec",
            WorkloadKind::Pod => "/spec",
            _ => "/spec/template/spec",
        }
    }

    /// Whether the pod spec can be changed in place (a Job's template and a Pod's spec cannot).
    pub fn mutable(self) -> bool {
        !matches!(self, WorkloadKind::Job | WorkloadKind::Pod)
    }
}

/// Text the pruned views keep, interned process-wide: a namespace, a container's name, a mount
/// path or a ConfigMap's name repeats across many workloads and is held once for all of them.
pub type Text = ArcIntern<str>;

/// A workload, pruned to what the stage reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// What it is.
    pub kind: WorkloadKind,
    /// Namespace.
    pub namespace: Text,
    /// Name.
    pub name: Text,
    /// UID, for Events about it.
    pub uid: Uid,
    /// What its pods run, as far as the stage reads. Interned: the workloads of one chart installed
    /// in many namespaces, or whose templates differ only in what pruning drops (images,
    /// resources, probes, other variables), hold one copy.
    pub pod: ArcIntern<PodView>,
}

/// A UID: the API server writes UUIDs, held as their 16 bytes; any other as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uid {
    /// A UUID in the API server's form (lowercase, hyphenated), which it gives back exactly.
    Uuid(Uuid),
    /// Anything else.
    Other(Box<str>),
}

impl Uid {
    /// `uid` as stored: as a UUID only when that writes it back unchanged.
    pub fn new(uid: &str) -> Self {
        match Uuid::try_parse(uid) {
            Ok(u) if *u.hyphenated().encode_lower(&mut Uuid::encode_buffer()) == *uid => Uid::Uuid(u),
            _ => Uid::Other(uid.into()),
        }
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Uid::Uuid(u) => u.hyphenated().fmt(f),
            Uid::Other(s) => f.write_str(s),
        }
    }
}

/// A pod spec, pruned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PodView {
    /// `serviceAccountName`, `default` when empty.
    pub service_account: Text,
    /// `hostNetwork`.
    pub host_network: bool,
    /// Init containers first, then containers, each list in spec order.
    pub containers: Box<[Container]>,
    /// Volumes.
    pub volumes: Box<[Volume]>,
}

/// A container, pruned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Container {
    /// Name.
    pub name: Text,
    /// Whether it is an init container.
    pub init: bool,
    /// Its index in `containers` or `initContainers`.
    pub index: u16,
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    pub credentials: Option<EnvValue>,
    /// `CLOUDSDK_CONFIG`.
    pub cloudsdk_config: Option<EnvValue>,
    /// Whether it has `envFrom`, which may set either variable unseen.
    pub env_from: bool,
    /// Every volume mount, in spec order.
    pub mounts: Box<[Mount]>,
}

/// An environment variable's value as the spec gives it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EnvValue {
    /// A literal (with `$(VAR)` references to earlier literals expanded).
    Value(Text),
    /// `valueFrom`, or a reference to a variable that is: known only in the running pod.
    ValueFrom,
}

/// A volume mount.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mount {
    /// The volume's name.
    pub volume: Text,
    /// `mountPath`.
    pub path: Text,
    /// `subPath`, or `subPathExpr` (kept with its `$(…)`, so it never resolves to a file).
    pub sub_path: Option<Text>,
}

/// A volume, by what it serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Volume {
    /// Name.
    pub name: Text,
    /// What serves its files.
    pub source: VolumeSource,
}

/// What serves a volume's files.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum VolumeSource {
    /// A ConfigMap's keys (`items` empty: every key, under its own name).
    ConfigMap {
        /// The ConfigMap.
        name: Text,
        /// `items`.
        items: Box<[KeyToPath]>,
    },
    /// A Secret's keys: only its name is ever looked at.
    Secret {
        /// The Secret.
        name: Text,
        /// `items`.
        items: Box<[KeyToPath]>,
    },
    /// Several sources in one directory.
    Projected(Box<[Projection]>),
    /// Anything else (emptyDir, hostPath, CSI, …), by its field name.
    Other(&'static str),
}

/// A source of a projected volume.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Projection {
    /// A ServiceAccount token.
    ServiceAccountToken {
        /// `audience`; absent: the API server's own audience.
        audience: Option<Text>,
        /// `path` within the volume.
        path: Text,
    },
    /// A ConfigMap's keys.
    ConfigMap {
        /// The ConfigMap.
        name: Text,
        /// `items`.
        items: Box<[KeyToPath]>,
    },
    /// A Secret's keys.
    Secret {
        /// The Secret.
        name: Text,
        /// `items`.
        items: Box<[KeyToPath]>,
    },
    /// downwardAPI, clusterTrustBundle, podCertificate.
    Other,
}

/// A key projected to a path.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct KeyToPath {
    /// The key.
    pub key: Text,
    /// The path within the volume.
    pub path: Text,
}

impl Workload {
    /// `Kind/name`, as status lists it.
    pub fn reference(&self) -> String {
        format!("{}/{}", self.kind, self.name)
    }

    /// Whether its pods run as the ServiceAccount `name`.
    pub fn runs_as(&self, name: &str) -> bool {
        self.pod.service_account == name
    }

    /// Whether any volume serves keys of ConfigMap `name`.
    pub fn mounts_config_map(&self, name: &str) -> bool {
        self.pod.volumes.iter().any(|v| match &v.source {
            VolumeSource::ConfigMap { name: n, .. } => *n == name,
            VolumeSource::Projected(sources) => {
                sources.iter().any(|p| matches!(p, Projection::ConfigMap { name: n, .. } if *n == name))
            }
            _ => false,
        })
    }
}

/// An object that runs pods, decoded lean for the watches and lists: metadata without labels,
/// annotations or managedFields, and of the spec only the pod spec's fields this stage reads.
/// Every other field is skipped while parsing, never allocated, so a large object costs no more
/// than its pruned view, even while a page of a list is in flight.
#[derive(Clone, Debug, Deserialize)]
#[serde(bound(deserialize = ""))]
pub struct Lean<K: LeanKind> {
    /// Identity, version and owners.
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    spec: K::Spec,
}

/// A kind of object that runs pods: where its pod spec is and whether it is a workload of its own.
pub trait LeanKind: k8s_openapi::Resource + Clone + std::fmt::Debug + Send + Sync + 'static {
    /// Its kind.
    const WORKLOAD: WorkloadKind;
    /// Its spec, as far as the way to the pod spec.
    type Spec: DeserializeOwned + Clone + std::fmt::Debug + Default + Send + Sync;
    /// Its pod spec.
    fn pod_spec(spec: &Self::Spec) -> Option<&lean::PodSpec>;
    /// Whether it counts on its own: a CronJob's Job and an owned Pod are counted through their owner.
    fn counted(_owners: &[OwnerReference]) -> bool {
        true
    }
}

impl<K: LeanKind> kube::Resource for Lean<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(_: &()) -> Cow<'_, str> {
        K::KIND.into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        K::GROUP.into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        K::VERSION.into()
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        K::API_VERSION.into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        K::URL_PATH_SEGMENT.into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata a lean object keeps: what names it, its version (where a watch resumes) and owners.
fn lean_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Meta {
        name: Option<String>,
        namespace: Option<String>,
        uid: Option<String>,
        resource_version: Option<String>,
        owner_references: Option<Vec<OwnerReference>>,
    }
    let m = Meta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        owner_references: m.owner_references,
        ..Default::default()
    })
}

/// The parts of Kubernetes' pod spec (and the specs around it) the stage reads; unknown fields are
/// skipped.
pub mod lean {
    use serde::{Deserialize, de::IgnoredAny};

    /// `spec.template` of a Deployment, StatefulSet, DaemonSet or Job.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct TemplateSpec {
        pub(super) template: Template,
    }

    /// A pod template.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct Template {
        pub(super) spec: Option<PodSpec>,
    }

    /// A CronJob's spec.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct CronJobSpec {
        pub(super) job_template: JobTemplate,
    }

    /// A CronJob's job template.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct JobTemplate {
        pub(super) spec: Option<TemplateSpec>,
    }

    /// A pod spec.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct PodSpec {
        pub(super) service_account_name: Option<String>,
        pub(super) service_account: Option<String>,
        pub(super) host_network: Option<bool>,
        pub(super) init_containers: Vec<Container>,
        pub(super) containers: Vec<Container>,
        pub(super) volumes: Vec<Volume>,
    }

    /// A container.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Container {
        pub(super) name: String,
        pub(super) env: Vec<EnvVar>,
        pub(super) env_from: Vec<IgnoredAny>,
        pub(super) volume_mounts: Vec<VolumeMount>,
    }

    /// An environment variable.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct EnvVar {
        pub(super) name: String,
        pub(super) value: Option<String>,
        pub(super) value_from: Option<IgnoredAny>,
    }

    /// A volume mount.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct VolumeMount {
        pub(super) name: String,
        pub(super) mount_path: String,
        pub(super) sub_path: Option<String>,
        pub(super) sub_path_expr: Option<String>,
    }

    /// A volume: the sources the stage follows, and which other kind it is.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Volume {
        pub(super) name: String,
        pub(super) config_map: Option<Keys>,
        pub(super) secret: Option<Keys>,
        pub(super) projected: Option<Projected>,
        pub(super) empty_dir: Option<IgnoredAny>,
        pub(super) host_path: Option<IgnoredAny>,
        pub(super) csi: Option<IgnoredAny>,
        pub(super) persistent_volume_claim: Option<IgnoredAny>,
        pub(super) downward_api: Option<IgnoredAny>,
        pub(super) ephemeral: Option<IgnoredAny>,
        pub(super) image: Option<IgnoredAny>,
    }

    /// A ConfigMap or Secret source (a Secret volume names it `secretName`).
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Keys {
        pub(super) name: Option<String>,
        pub(super) secret_name: Option<String>,
        pub(super) items: Vec<KeyToPath>,
    }

    /// A projected volume.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct Projected {
        pub(super) sources: Vec<Projection>,
    }

    /// A projected source.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default, rename_all = "camelCase")]
    pub struct Projection {
        pub(super) service_account_token: Option<Token>,
        pub(super) config_map: Option<Keys>,
        pub(super) secret: Option<Keys>,
    }

    /// A projected ServiceAccount token.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct Token {
        pub(super) audience: Option<String>,
        pub(super) path: String,
    }

    /// A key projected to a path.
    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct KeyToPath {
        pub(super) key: String,
        pub(super) path: String,
    }
}

impl LeanKind for Deployment {
    const WORKLOAD: WorkloadKind = WorkloadKind::Deployment;
    type Spec = lean::TemplateSpec;
    fn pod_spec(spec: &Self::Spec) -> Option<&lean::PodSpec> {
        spec.template.spec.as_ref()
    }
}

impl LeanKind for StatefulSet {
    const WORKLOAD: WorkloadKind = WorkloadKind::StatefulSet;
    type Spec = lean::TemplateSpec;
    fn pod_spec(spec: &Self::Spec) -> Option<&lean::PodSpec> {
        spec.template.spec.as_ref()
    }
}

impl LeanKind for DaemonSet {
    const WORKLOAD: WorkloadKind = WorkloadKind::DaemonSet;
    type Spec = lean::TemplateSpec;
    fn pod_spec(spec: &Self::Spec) -> Option<&lean::PodSpec> {
        spec.template.spec.as_ref()
    }
}

impl LeanKind for Job {
    const WORKLOAD: WorkloadKind = WorkloadKind::Job;
    type Spec = lean::TemplateSpec;
    fn pod_spec(spec: &Self::Spec) -> Option<&lean::PodSpec> {
        spec.template.spec.as_ref()
    }
    /// A CronJob's Jobs count through it; a canary's Job (an AuthProbe owns it) is authprobe's own
    /// copy of a workload, not one of the namespace's.
    fn counted(owners: &[OwnerReference]) -> bool {
        !owners.iter().any(|o| {
            o.kind == "CronJob" || (o.kind == "AuthProbe" && o.api_version.starts_with("authprobe.io/"))
        })
    }
}

impl LeanKind for CronJob {
    const WORKLOAD: WorkloadKind = WorkloadKind::CronJob;
    type Spec = lean::CronJobSpec;
    fn pod_spec(spec: &Self::Spec) -> Option<&lean::PodSpec> {
        spec.job_template.spec.as_ref()?.template.spec.as_ref()
    }
}

impl LeanKind for Pod {
    const WORKLOAD: WorkloadKind = WorkloadKind::Pod;
    type Spec = lean::PodSpec;
    fn pod_spec(spec: &Self::Spec) -> Option<&lean::PodSpec> {
        Some(spec)
    }
    fn counted(owners: &[OwnerReference]) -> bool {
        owners.is_empty()
    }
}

/// The pruned view of `object`, or `None` when it is not a workload of its own.
pub fn prune<K: LeanKind>(object: &Lean<K>) -> Option<Workload> {
    let meta = &object.metadata;
    if !K::counted(meta.owner_references.as_deref().unwrap_or_default()) {
        return None;
    }
    let spec = K::pod_spec(&object.spec);
    let service_account = spec
        .and_then(|s| s.service_account_name.as_deref().or(s.service_account.as_deref()))
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    let init = spec.map(|s| s.init_containers.as_slice()).unwrap_or_default();
    let regular = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
    let containers = init
        .iter()
        .enumerate()
        .map(|(i, c)| container(c, true, i))
        .chain(regular.iter().enumerate().map(|(i, c)| container(c, false, i)))
        .collect();
    let text = |s: &Option<String>| Text::from(s.as_deref().unwrap_or_default());
    Some(Workload {
        kind: K::WORKLOAD,
        namespace: text(&meta.namespace),
        name: text(&meta.name),
        uid: Uid::new(meta.uid.as_deref().unwrap_or_default()),
        pod: ArcIntern::new(PodView {
            service_account: service_account.into(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            containers,
            volumes: spec.map(|s| s.volumes.as_slice()).unwrap_or_default().iter().map(volume).collect(),
        }),
    })
}

fn container(c: &lean::Container, init: bool, index: usize) -> Container {
    // Each variable's value, `None` for `valueFrom` (known only in the running pod). Later entries
    // of the same name win, and `$(VAR)` refers to entries before it, as the kubelet resolves them.
    let mut seen: BTreeMap<&str, Option<String>> = BTreeMap::new();
    for e in &c.env {
        let value = match (&e.value_from, &e.value) {
            (Some(_), _) => None,
            (None, value) => expand(value.as_deref().unwrap_or_default(), &seen),
        };
        seen.insert(&e.name, value);
    }
    // Only the two variables the stage reads are kept, so only they are interned.
    let mut kept =
        |name| seen.remove(name).map(|v| v.map_or(EnvValue::ValueFrom, |v| EnvValue::Value(v.into())));
    Container {
        name: c.name.as_str().into(),
        init,
        // An object of at most 1.5 MiB (etcd's limit) has fewer containers than a u16 counts.
        index: u16::try_from(index).unwrap_or(u16::MAX),
        credentials: kept(CREDENTIALS_VAR),
        cloudsdk_config: kept(CLOUDSDK_CONFIG_VAR),
        env_from: !c.env_from.is_empty(),
        mounts: c
            .volume_mounts
            .iter()
            .map(|m| Mount {
                volume: m.name.as_str().into(),
                path: m.mount_path.as_str().into(),
                sub_path: m
                    .sub_path_expr
                    .as_deref()
                    .or(m.sub_path.as_deref())
                    .filter(|s| !s.is_empty())
                    .map(Text::from),
            })
            .collect(),
    }
}

/// Kubernetes' `$(VAR)` expansion against earlier variables; `$$` is a literal `$`, and an
/// unknown reference stays as written. A reference to a `valueFrom` variable is unknowable here:
/// `None`.
fn expand(value: &str, earlier: &BTreeMap<&str, Option<String>>) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')')) {
            match earlier.get(name) {
                Some(Some(v)) => out.push_str(v),
                Some(None) => return None,
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    Some(out)
}

fn keys(k: &lean::Keys) -> (Text, Box<[KeyToPath]>) {
    let name = k.name.as_deref().or(k.secret_name.as_deref()).unwrap_or_default();
    let items =
        k.items.iter().map(|i| KeyToPath { key: i.key.as_str().into(), path: i.path.as_str().into() });
    (name.into(), items.collect())
}

fn volume(v: &lean::Volume) -> Volume {
    let source = if let Some(c) = &v.config_map {
        let (name, items) = keys(c);
        VolumeSource::ConfigMap { name, items }
    } else if let Some(s) = &v.secret {
        let (name, items) = keys(s);
        VolumeSource::Secret { name, items }
    } else if let Some(p) = &v.projected {
        VolumeSource::Projected(p.sources.iter().map(projection).collect())
    } else {
        VolumeSource::Other(other_kind(v))
    };
    Volume { name: v.name.as_str().into(), source }
}

fn projection(p: &lean::Projection) -> Projection {
    if let Some(t) = &p.service_account_token {
        Projection::ServiceAccountToken {
            audience: t.audience.as_deref().map(Text::from),
            path: t.path.as_str().into(),
        }
    } else if let Some(c) = &p.config_map {
        let (name, items) = keys(c);
        Projection::ConfigMap { name, items }
    } else if let Some(s) = &p.secret {
        let (name, items) = keys(s);
        Projection::Secret { name, items }
    } else {
        Projection::Other
    }
}

fn other_kind(v: &lean::Volume) -> &'static str {
    [
        (v.empty_dir.is_some(), "emptyDir"),
        (v.host_path.is_some(), "hostPath"),
        (v.csi.is_some(), "csi"),
        (v.persistent_volume_claim.is_some(), "persistentVolumeClaim"),
        (v.downward_api.is_some(), "downwardAPI"),
        (v.ephemeral.is_some(), "ephemeral"),
        (v.image.is_some(), "image"),
    ]
    .into_iter()
    .find_map(|(present, kind)| present.then_some(kind))
    .unwrap_or("other")
}

/// A ConfigMap's keys, as the stage reads them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConfigMapData {
    /// `data` and `binaryData` keys.
    pub keys: BTreeMap<String, ConfigValue>,
}

/// One ConfigMap value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigValue {
    /// Text of at most [`MAX_CONFIG_VALUE_BYTES`].
    Text(String),
    /// A `binaryData` key.
    Binary,
    /// Text longer than [`MAX_CONFIG_VALUE_BYTES`], by its length.
    TooLarge(usize),
}

impl ConfigMapData {
    /// A read ConfigMap, its large values dropped.
    pub fn from_config_map(cm: &ConfigMap) -> Self {
        let text = cm.data.iter().flatten().map(|(k, v)| {
            let value = if v.len() > MAX_CONFIG_VALUE_BYTES {
                ConfigValue::TooLarge(v.len())
            } else {
                ConfigValue::Text(v.clone())
            };
            (k.clone(), value)
        });
        let binary = cm.binary_data.iter().flatten().map(|(k, _)| (k.clone(), ConfigValue::Binary));
        Self { keys: text.chain(binary).collect() }
    }
}

/// What reading a mounted ConfigMap gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigMapRead {
    /// It exists.
    Found(Arc<ConfigMapData>),
    /// It does not exist.
    Missing,
    /// It could not be read: never the namespace's fault.
    Unreadable {
        /// `KubernetesUnavailable`, or `CheckerForbidden` when the operator may not read it.
        reason: Reason,
        /// What happened.
        detail: String,
    },
}

/// Mounted ConfigMaps read for a pass, by (namespace, name).
pub type ConfigMaps = BTreeMap<(String, String), ConfigMapRead>;

/// Why the workloads cannot be judged: some kind was never listed (the operator's RBAC, or the
/// API server). Never the namespace's fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unavailable {
    /// `CheckerForbidden` when the API server refused the operator, else `KubernetesUnavailable`.
    pub reason: Reason,
    /// Which kinds, and the last error.
    pub detail: String,
}

/// Whatever holds the workloads (the operator's inventory, the lists `authprobe check` makes),
/// lent to the stage.
pub trait WorkloadView {
    /// Calls `f` with at least every workload in `namespace`.
    fn each_workload(&self, namespace: &str, f: &mut dyn FnMut(&Arc<Workload>));
    /// Why the view cannot be trusted to hold every workload, if so.
    fn unavailable(&self) -> Option<Unavailable>;
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment(spec: serde_json::Value) -> Lean<Deployment> {
        serde_json::from_value(json!({
            "metadata": {"name": "api", "namespace": "checkout", "uid": "u1",
                         "managedFields": [{"manager": "kubectl"}], "annotations": {"big": "x"}},
            "spec": {"selector": {}, "template": {"spec": spec}}
        }))
        .unwrap()
    }

    #[test]
    fn pruning_keeps_what_decides_the_credential() {
        let d = deployment(json!({
            "hostNetwork": true,
            "initContainers": [{"name": "setup", "env": [{"name": CREDENTIALS_VAR, "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}],
            "containers": [{
                "name": "api", "image": "x",
                "env": [
                    {"name": "DIR", "value": "/etc/wi"},
                    {"name": CREDENTIALS_VAR, "value": "wrong"},
                    {"name": CREDENTIALS_VAR, "value": "$(DIR)/cred.json"},
                    {"name": CLOUDSDK_CONFIG_VAR, "value": "$$HOME/$(UNKNOWN)"},
                    {"name": "OTHER", "value": "ignored"}
                ],
                "envFrom": [{"configMapRef": {"name": "env"}}],
                "volumeMounts": [{"name": "cred", "mountPath": "/etc/wi"}, {"name": "cache", "mountPath": "/tmp", "subPathExpr": "$(POD)"}]
            }],
            "volumes": [
                {"name": "cred", "configMap": {"name": "wi", "items": [{"key": "k", "path": "cred.json"}]}},
                {"name": "key", "secret": {"secretName": "sa-key"}},
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"audience": "aud", "path": "token"}}, {"downwardAPI": {}}]}},
                {"name": "cache", "emptyDir": {}}
            ]
        }));
        let w = prune(&d).expect("a Deployment is a workload");
        assert_eq!(
            (w.reference(), &*w.pod.service_account, w.pod.host_network),
            ("Deployment/api".into(), "default", true)
        );
        let [setup, api] = &w.pod.containers[..] else { panic!("two containers: {w:?}") };
        assert!(setup.init && setup.credentials == Some(EnvValue::ValueFrom));
        assert!(!api.init && api.index == 0 && api.env_from);
        assert_eq!(
            api.credentials,
            Some(EnvValue::Value("/etc/wi/cred.json".into())),
            "the last entry wins, expanded"
        );
        assert_eq!(api.cloudsdk_config, Some(EnvValue::Value("$HOME/$(UNKNOWN)".into())));
        assert_eq!(api.mounts[1].sub_path.as_deref(), Some("$(POD)"));
        assert!(w.mounts_config_map("wi") && !w.mounts_config_map("sa-key"));
        assert_eq!(w.pod.volumes[1].source, VolumeSource::Secret { name: "sa-key".into(), items: [].into() });
        assert_eq!(w.pod.volumes[3].source, VolumeSource::Other("emptyDir"));
        assert!(matches!(&w.pod.volumes[2].source, VolumeSource::Projected(p) if p.len() == 2));
    }

    #[test]
    fn workloads_with_the_same_pruned_pod_spec_share_it() {
        let a = prune(&deployment(json!({"containers": [{"name": "api", "image": "a:1"}]}))).unwrap();
        let b = prune(&deployment(json!({"containers": [{"name": "api", "image": "a:2"}]}))).unwrap();
        assert!(std::ptr::eq(&*a.pod, &*b.pod), "the image is pruned away, so the views are one");
        let c = prune(&deployment(json!({"containers": [{"name": "web"}]}))).unwrap();
        assert_ne!(a.pod, c.pod);
    }

    #[test]
    fn a_uid_is_kept_as_written() {
        let uuid = "3c2b1a09-0000-4000-8000-000000000001";
        assert!(matches!(Uid::new(uuid), Uid::Uuid(_)));
        for uid in [uuid, "3C2B1A09-0000-4000-8000-000000000001", "u1", ""] {
            assert_eq!(Uid::new(uid).to_string(), uid);
        }
    }

    #[test]
    fn a_cronjobs_jobs_canary_jobs_and_owned_pods_are_not_workloads_of_their_own() {
        let owned = |kind: &str| json!({"name": "x", "namespace": "n", "ownerReferences": [{"apiVersion": "v1", "kind": kind, "name": "o", "uid": "u"}]});
        let job = |meta| {
            serde_json::from_value::<Lean<Job>>(
                json!({"metadata": meta, "spec": {"template": {"spec": {"containers": []}}}}),
            )
            .unwrap()
        };
        assert!(prune(&job(owned("CronJob"))).is_none());
        assert!(prune(&job(owned("Workflow"))).is_some(), "only a CronJob's Jobs are counted through it");
        let canary = json!({"name": "x", "namespace": "n", "ownerReferences": [
            {"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "name": "p", "uid": "u"}]});
        assert!(prune(&job(canary)).is_none(), "a canary's Job is not a workload of the namespace");
        let pod = |meta| {
            serde_json::from_value::<Lean<Pod>>(
                json!({"metadata": meta, "spec": {"containers": [], "serviceAccountName": "app"}}),
            )
            .unwrap()
        };
        assert!(prune(&pod(owned("ReplicaSet"))).is_none());
        let bare = prune(&pod(json!({"name": "x", "namespace": "n"}))).expect("a bare Pod");
        assert!(bare.runs_as("app"));
    }

    #[test]
    fn a_config_map_keeps_small_text_only() {
        let cm: ConfigMap = serde_json::from_value(json!({
            "metadata": {"name": "wi"},
            "data": {"small": "{}", "large": "x".repeat(MAX_CONFIG_VALUE_BYTES + 1)},
            "binaryData": {"bin": "AAAA"}
        }))
        .unwrap();
        let data = ConfigMapData::from_config_map(&cm);
        assert_eq!(data.keys["small"], ConfigValue::Text("{}".into()));
        assert_eq!(data.keys["large"], ConfigValue::TooLarge(MAX_CONFIG_VALUE_BYTES + 1));
        assert_eq!(data.keys["bin"], ConfigValue::Binary);
    }
}
