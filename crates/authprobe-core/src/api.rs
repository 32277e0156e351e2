//! The `AuthProbe` custom resource (group `authprobe.io`, version `v1alpha1`): the user-facing contract.
//!
//! Admission-time validation lives here as schema and CEL rules, so the API server refuses what can be
//! refused before the controller ever sees it; what only the controller can judge becomes `InvalidSpec`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The annotation on a KSA naming the Google service account it impersonates.
pub const GSA_ANNOTATION: &str = "iam.gke.io/gcp-service-account";
/// Setting or changing this annotation on an AuthProbe re-checks it at once, with fresh Google reads.
pub const PROBE_NOW_ANNOTATION: &str = "authprobe.io/probe-now";
/// At most this many entries are kept in `status.failures`.
pub const MAX_FAILURES: usize = 20;
/// At most this many `spec.endpoints` (the schema's bound, checked again for `authprobe check`).
pub const MAX_ENDPOINTS: usize = 10;

/// What the namespaces and ServiceAccounts selected here must be able to become in Google Cloud.
// Each printcolumn repeats the same keys, which this lint mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "authprobe.io",
    version = "v1alpha1",
    kind = "AuthProbe",
    plural = "authprobes",
    shortname = "ap",
    status = "AuthProbeStatus",
    doc = "Checks that every selected Kubernetes ServiceAccount maps to its Google identity",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(name = "Namespaces", type_ = "integer", json_path = ".status.summary.namespaces"),
    printcolumn(name = "ServiceAccounts", type_ = "integer", json_path = ".status.summary.serviceAccounts"),
    printcolumn(name = "Failing", type_ = "integer", json_path = ".status.summary.failing"),
    printcolumn(name = "Last Probe", type_ = "date", json_path = ".status.lastProbeTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new(
    "!(self.identity.platform == 'GKE' && self.probe.tokenExchange) || has(self.identity.gke)"
).message("identity.gke (clusterLocation, clusterName) is required when platform is GKE and probe.tokenExchange is true"))]
#[x_kube(validation = Rule::new("!has(self.endpoints) || size(self.endpoints) == 0 || self.probe.tokenExchange")
    .message("endpoints need probe.tokenExchange: true: the tokens they are sent are minted by the live chain"))]
#[serde(rename_all = "camelCase")]
pub struct AuthProbeSpec {
    /// Which namespaces to check; `{}` selects every namespace.
    #[x_kube(validation = Rule::new(SELECTOR_OPERATORS_RULE).message(SELECTOR_OPERATORS_MESSAGE))]
    #[x_kube(validation = Rule::new(SELECTOR_VALUES_RULE).message(SELECTOR_VALUES_MESSAGE))]
    pub namespace_selector: LabelSelector,

    /// Which KSAs in each selected namespace; absent: every KSA carrying `iam.gke.io/gcp-service-account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_accounts: Option<ServiceAccountSelection>,

    /// The Google identity every selected KSA must map to.
    pub identity: Identity,

    /// What each identity must be able to do, tested through the live chain.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub targets: Vec<Target>,

    /// URLs the workloads call with a Google token, each probed through the real path as a client
    /// would call it; only hosts in the operator's `--endpoint-allow` list are ever called.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 10))]
    pub endpoints: Vec<Endpoint>,

    /// How and how often to probe.
    #[serde(default)]
    pub probe: ProbeSettings,

    /// A Job in each selected namespace that runs as the named workload's ServiceAccount, with its
    /// credential environment and volumes, and times the pod's own first Google token. Off by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySettings>,
}

const SELECTOR_OPERATORS_RULE: &str = "!has(self.matchExpressions) || self.matchExpressions.all(e, e.operator in ['In', 'NotIn', 'Exists', 'DoesNotExist'])";
const SELECTOR_OPERATORS_MESSAGE: &str = "selector operators must be In, NotIn, Exists or DoesNotExist";
const SELECTOR_VALUES_RULE: &str = "!has(self.matchExpressions) || self.matchExpressions.all(e, (e.operator in ['In', 'NotIn']) == (has(e.values) && size(e.values) > 0))";
const SELECTOR_VALUES_MESSAGE: &str =
    "selector values must be non-empty for In and NotIn, and absent for Exists and DoesNotExist";

/// Which ServiceAccounts to check in every selected namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountSelection {
    /// KSAs that must exist in every selected namespace; a missing one fails with `ServiceAccountMissing`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(min = 1, max = 253)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new(
        "self.all(n, n.matches('^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$'))"
    ).message("names must be ServiceAccount names: lowercase letters, digits, '-' and '.', at most 253 characters"))]
    pub names: Vec<String>,

    /// KSAs whose labels match are checked too, in addition to `names`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(SELECTOR_OPERATORS_RULE).message(SELECTOR_OPERATORS_MESSAGE))]
    #[x_kube(validation = Rule::new(SELECTOR_VALUES_RULE).message(SELECTOR_VALUES_MESSAGE))]
    pub selector: Option<LabelSelector>,
}

/// The Google side of the mapping.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.platform != 'Federation' || has(self.federation)")
    .message("identity.federation is required when platform is Federation"))]
#[x_kube(validation = Rule::new("self.platform == 'Federation' || !has(self.federation)")
    .message("identity.federation is only allowed when platform is Federation"))]
#[x_kube(validation = Rule::new("self.platform != 'GKE' || has(self.projectId)")
    .message("identity.projectId is required when platform is GKE"))]
#[x_kube(validation = Rule::new(
    "!has(self.federation) || !has(self.projectNumber) || self.federation.provider.startsWith('projects/' + self.projectNumber + '/')"
).message("identity.federation.provider must belong to identity.projectNumber"))]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    /// Where the KSAs run: `GKE` (the project's `PROJECT_ID.svc.id.goog` pool) or `Federation`.
    pub platform: Platform,

    /// The Google Cloud project ID (the GKE workload pool is `PROJECT_ID.svc.id.goog`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 30))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z][-a-z0-9]{4,28}[a-z0-9]$')")
        .message("projectId must be a Google Cloud project ID: 6 to 30 lowercase letters, digits or hyphens, starting with a letter"))]
    pub project_id: Option<String>,

    /// The project number, needed for `principal://` identifiers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 20))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]{1,20}$')")
        .message("projectNumber must be digits only, like \"123456789012\""))]
    pub project_number: Option<String>,

    /// `Impersonation` (KSA -> GSA through `roles/iam.workloadIdentityUser`) or `Direct` (roles granted to the principal).
    #[serde(default)]
    pub access: Access,

    /// When set, every GSA named by a KSA must live in one of these projects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub service_account_projects: Vec<String>,

    /// The GKE cluster the KSAs live in, needed for the live GKE token exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gke: Option<GkeCluster>,

    /// The workload identity pool provider (platform `Federation` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federation: Option<Federation>,
}

/// Where the KSAs run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// Workload Identity Federation for GKE.
    #[serde(rename = "GKE")]
    Gke,
    /// A workload identity pool provider trusting the cluster's issuer.
    Federation,
}

/// How the principal reaches Google APIs.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Access {
    /// The KSA impersonates the GSA named in its annotation.
    #[default]
    Impersonation,
    /// Roles are granted to the federated principal itself; no annotation is needed.
    Direct,
}

/// A GKE cluster.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GkeCluster {
    /// The cluster's location, e.g. `us-central1`.
    #[schemars(length(min = 1, max = 64))]
    pub cluster_location: String,
    /// The cluster's name.
    #[schemars(length(min = 1, max = 64))]
    pub cluster_name: String,
}

/// A workload identity pool provider.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Federation {
    /// `projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new(
        "self.matches('^projects/[0-9]{1,20}/locations/global/workloadIdentityPools/[a-z0-9-]{1,32}/providers/[a-z0-9-]{1,32}$')"
    ).message("federation.provider must look like projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER"))]
    pub provider: String,

    /// The audience KSA tokens carry; empty means the provider's default `//iam.googleapis.com/<provider>`.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub audience: String,
}

/// A Google resource the identity must be able to act on.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(format!("{CLOUD_RUN_RULE} || has(self.permissions)"))
    .message("permissions are required, except for Cloud Run services (default [run.routes.invoke])"))]
#[x_kube(validation = Rule::new(format!("{CLOUD_RUN_RULE} || !has(self.audience)"))
    .message("audience applies to Cloud Run services only"))]
#[serde(rename_all = "camelCase")]
pub struct Target {
    /// A full resource name, e.g. `//storage.googleapis.com/projects/_/buckets/NAME` or
    /// `//run.googleapis.com/projects/P/locations/L/services/S`.
    #[schemars(length(max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('//')")
        .message("target resource must be a full resource name like //storage.googleapis.com/projects/_/buckets/NAME"))]
    pub resource: String,

    /// IAM permissions the identity needs there, e.g. `storage.objects.get`; for a Cloud Run
    /// service `[run.routes.invoke]` when left out.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 32), inner(length(max = 128)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(p, p.matches('^[a-z][a-zA-Z0-9]*([.][a-zA-Z0-9]+){2}$'))")
        .message("permissions must look like service.resource.verb, e.g. storage.objects.get"))]
    pub permissions: Vec<String>,

    /// Cloud Run only: the audience the workloads mint their ID tokens for; it must be one of the
    /// service's URLs or custom audiences. Left out: the service's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub audience: Option<String>,
}

const CLOUD_RUN_RULE: &str = "self.resource.startsWith('//run.googleapis.com/')";

/// A URL a workload calls with a Google token, probed the way a client calls it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("self.tokenType == 'IDToken' || !has(self.audience)")
    .message("audience applies to IDToken endpoints only: an access token has no audience"))]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The URL the workload calls (`https://`; plain `http://` only for loopback hosts or hosts
    /// allowed as `http://HOST`). Requested with GET; no redirect is followed to another host.
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(URL_RULE).message("url must be an http(s) URL, like https://api.example.com/healthz"))]
    pub url: String,

    /// The token the workload sends: a Google-signed `IDToken` or an OAuth `AccessToken`.
    pub token_type: TokenType,

    /// IDToken only: the audience the workload mints for; left out: the URL's origin
    /// (`https://HOST[:PORT]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub audience: Option<String>,

    /// The service behind the proxy, called directly with the same token to tell a proxy that
    /// drops `Authorization` (`AuthorizationStripped`) from an endpoint that refuses the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2048))]
    #[x_kube(validation = Rule::new(URL_RULE).message("origin must be an http(s) URL, like http://api.payments.svc:8080/healthz"))]
    pub origin: Option<String>,
}

const URL_RULE: &str = "self.startsWith('https://') || self.startsWith('http://')";

/// Which Google token an endpoint is sent.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    /// An ID token from `generateIdToken` on the GSA: Cloud Run, IAP, services verifying Google OIDC.
    #[serde(rename = "IDToken")]
    IdToken,
    /// An OAuth access token (`generateAccessToken`): Google APIs and services that introspect it.
    AccessToken,
}

impl TokenType {
    /// As written in the spec.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenType::IdToken => "IDToken",
            TokenType::AccessToken => "AccessToken",
        }
    }
}

/// How and how often to probe.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProbeSettings {
    /// Periodic re-check; changes to KSAs, Namespaces and the spec re-check at once. 30s to 24h.
    #[serde(default = "default_interval")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{DURATION_SHAPE} && duration(self) >= duration('30s') && duration(self) <= duration('24h')"))
        .message("probe.interval must be a duration from 30s to 24h, like 90s, 10m or 1h30m"))]
    pub interval: String,

    /// Run the live chain (TokenRequest, exchange, impersonation, targets); false: no token is ever minted.
    #[serde(default)]
    pub token_exchange: bool,

    /// How often each KSA's live chain must run, spread evenly over this window; the mapping
    /// checks keep running every `interval`. 30s to 24h; absent: `interval`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{DURATION_SHAPE} && duration(self) >= duration('30s') && duration(self) <= duration('24h')"))
        .message("probe.tokenExchangeInterval must be a duration from 30s to 24h, like 10m, 1h or 6h"))]
    pub token_exchange_interval: Option<String>,

    /// Failures within this long after a change are Unknown/PropagationPending instead of False. 0s to 1h.
    #[serde(default = "default_propagation_grace")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{DURATION_SHAPE} && duration(self) >= duration('0s') && duration(self) <= duration('1h')"))
        .message("probe.propagationGrace must be a duration from 0s to 1h, like 0s, 90s or 7m"))]
    pub propagation_grace: String,

    /// Check which credential each workload running as a selected KSA really loads (stage `Workload`):
    /// its pod template's environment and volumes, and the ConfigMaps it mounts. Secrets are never read.
    #[serde(default = "default_true")]
    pub inspect_workloads: bool,
}

/// The canary: the pod's own first token, from inside the namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CanarySettings {
    /// Run the canary.
    #[serde(default)]
    pub enabled: bool,

    /// `Kind/name` of the workload whose ServiceAccount, credential environment and volumes the
    /// canary takes, in each selected namespace: Deployment, StatefulSet, DaemonSet, Job, CronJob or Pod.
    #[schemars(length(min = 3, max = 270))]
    #[x_kube(validation = Rule::new(CANARY_WORKLOAD_RULE)
        .message("canary.workload must be Kind/name, Kind one of Deployment, StatefulSet, DaemonSet, Job, CronJob, Pod"))]
    pub workload: String,

    /// At most one canary Job per namespace this often; changing `authprobe.io/probe-now` starts
    /// one sooner. 5m to 24h.
    #[serde(default = "default_canary_every")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(format!("{DURATION_SHAPE} && duration(self) >= duration('5m') && duration(self) <= duration('24h')"))
        .message("canary.every must be a duration from 5m to 24h, like 30m or 1h"))]
    pub every: String,
}

const CANARY_WORKLOAD_RULE: &str = "self.matches('^(Deployment|StatefulSet|DaemonSet|Job|CronJob|Pod)/[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$')";

fn default_canary_every() -> String {
    "1h".into()
}

/// A Go/Kubernetes duration such as `90s`, `5m` or `1h30m`; checked first so `duration()` never errors.
const DURATION_SHAPE: &str = r"self.matches('^([0-9]+([.][0-9]+)?(ns|us|µs|ms|s|m|h))+$')";

fn default_interval() -> String {
    "10m".into()
}

fn default_propagation_grace() -> String {
    "7m".into()
}

fn default_true() -> bool {
    true
}

impl Default for ProbeSettings {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            token_exchange: false,
            token_exchange_interval: None,
            propagation_grace: default_propagation_grace(),
            inspect_workloads: true,
        }
    }
}

/// What the last probe pass found.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthProbeStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// When the last probe pass finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe_time: Option<Time>,

    /// Counts over every checked KSA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<Summary>,

    /// `Ready`, `MappingsVerified`, `TokenExchangeVerified` and `CheckerHealthy`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// Failing entries first, then unknown ones, at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub failures: Vec<Failure>,
}

/// Counts over every checked KSA.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    /// Selected namespaces.
    #[schemars(schema_with = "count")]
    pub namespaces: u32,
    /// Checked KSAs, including required names that do not exist.
    #[schemars(schema_with = "count")]
    pub service_accounts: u32,
    /// KSAs that passed every enabled check.
    #[schemars(schema_with = "count")]
    pub passing: u32,
    /// KSAs that are definitely broken.
    #[schemars(schema_with = "count")]
    pub failing: u32,
    /// KSAs authprobe could not decide.
    #[schemars(schema_with = "count")]
    pub unknown: u32,
    /// With the live chain: KSAs whose live chain succeeded within the last
    /// `tokenExchangeInterval` (the current window).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_count")]
    pub live_verified: Option<u32>,
}

/// A count, in a format Kubernetes knows (`uint32` is not one).
fn count(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "format": "int32", "minimum": 0})
}

fn optional_count(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({"type": "integer", "format": "int32", "minimum": 0})
}

/// One KSA that is failing or could not be decided.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Failure {
    /// The KSA's namespace.
    pub namespace: String,
    /// The KSA's name.
    pub service_account: String,
    /// The step of the chain that failed.
    pub stage: Stage,
    /// Why, as a stable reason.
    pub reason: Reason,
    /// What failed, the upstream error (redacted, at most 1 KiB) and the fix.
    pub message: String,
    /// When this reason was first seen for this KSA.
    pub since: Time,
    /// Stage `Workload`: the workloads with this reason, as `Kind/name`, sorted, at most 5.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 5))]
    pub workloads: Vec<String>,
}

/// The steps of the chain, in the order a workload goes through them.
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
)]
pub enum Stage {
    /// The KSA, its annotation and the spec.
    Static,
    /// Which credential the workloads running as the KSA load.
    Workload,
    /// The GSA's allow policy and the GSA itself.
    #[serde(rename = "IAMPolicy")]
    #[strum(serialize = "IAMPolicy")]
    IamPolicy,
    /// The workload identity pool and provider (Federation).
    Provider,
    /// TokenRequest and the STS or GKE exchange.
    TokenExchange,
    /// `generateAccessToken` on the GSA.
    Impersonation,
    /// `testIamPermissions` on a target; a Cloud Run service's audiences and ID token.
    Target,
    /// `spec.endpoints`: the token sent through the real path to a URL.
    Endpoint,
    /// The canary: the pod's own first token, from inside the namespace.
    Canary,
}

impl Stage {
    /// The stage as written in status, events and metrics.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Stable reasons: alerts and dashboards match on them.
#[derive(
    JsonSchema,
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    strum::IntoStaticStr,
    strum::Display,
    strum::VariantArray,
)]
pub enum Reason {
    /// A KSA named in `serviceAccounts.names` does not exist.
    ServiceAccountMissing,
    /// The KSA has no `iam.gke.io/gcp-service-account` annotation.
    AnnotationMissing,
    /// The annotation is not a service-account email.
    AnnotationInvalid,
    /// The annotated GSA lives outside `serviceAccountProjects`, or in another project than expected.
    ServiceAccountProjectNotAllowed,
    /// The mapped subject exceeds Google's 127-byte limit.
    SubjectTooLong,
    /// The spec cannot be checked as written.
    InvalidSpec,
    /// GKE: a container sets `GOOGLE_APPLICATION_CREDENTIALS`, so ADC loads that file, not Workload Identity.
    CredentialFileOverridesWorkloadIdentity,
    /// A volume puts a gcloud user credential in a container, or `CLOUDSDK_CONFIG` is set.
    UserCredentialsMounted,
    /// GKE: `hostNetwork: true` pods reach the node's metadata server, not Workload Identity.
    HostNetworkBypassesWorkloadIdentity,
    /// Federation: no credential configuration is set, mounted, or its ConfigMap or key exists.
    CredentialConfigMissing,
    /// Federation: the credential configuration is not JSON or not `external_account`.
    CredentialConfigInvalid,
    /// Federation: the credential configuration names another provider, endpoint, token type or GSA.
    CredentialConfigMismatch,
    /// Federation: `credential_source.file` is not a projected ServiceAccount token.
    CredentialSourceNotMounted,
    /// The credential configuration comes from a Secret or `valueFrom`, which authprobe does not read.
    CredentialConfigUnreadable,
    /// No `roles/iam.workloadIdentityUser` binding maps the KSA's principal.
    PrincipalNotMapped,
    /// The only binding holds under an IAM condition.
    MappingConditional,
    /// The binding's member was deleted.
    MappingDeleted,
    /// The annotated GSA does not exist.
    GoogleServiceAccountNotFound,
    /// The annotated GSA is disabled.
    GoogleServiceAccountDisabled,
    /// The pool or provider does not exist or is deleted.
    ProviderNotFound,
    /// The provider is disabled.
    ProviderDisabled,
    /// The pool is disabled.
    PoolDisabled,
    /// The KSA token's audience (stage `Provider`), or a workload's projected token audience (stage
    /// `Workload`), is not allowed by the provider.
    AudienceNotAllowed,
    /// The provider's issuer is not the cluster's issuer.
    IssuerMismatch,
    /// The cluster's signing key is not in the provider's JWKS.
    SigningKeyNotTrusted,
    /// The provider's attribute condition rejects the KSA's claims.
    AttributeConditionRejected,
    /// The provider's attribute mapping cannot be evaluated for the KSA's claims.
    AttributeMappingInvalid,
    /// STS rejected the exchange for a reason nothing more precise covers.
    ExchangeRejected,
    /// `generateAccessToken` on the GSA was denied.
    ImpersonationDenied,
    /// The identity lacks permissions on a target.
    PermissionMissing,
    /// A target's API refuses federated tokens.
    FederatedTokenUnsupported,
    /// The cluster's clock and Google's disagree.
    ClockSkew,
    /// A Cloud Run service accepts no ID token for the target's audience.
    AudienceNotAccepted,
    /// An endpoint redirects to another host, where clients drop `Authorization`.
    CrossHostRedirect,
    /// The origin accepts the token, but through the endpoint's path it is refused: a proxy drops it.
    AuthorizationStripped,
    /// The endpoint refuses the declared token type and accepts the other one.
    TokenTypeMismatch,
    /// The endpoint refuses the token of both types.
    EndpointRejected,
    /// The endpoint could not be reached, timed out or failed (5xx).
    EndpointUnavailable,
    /// A recent change may not have propagated yet.
    PropagationPending,
    /// Google could not be reached or kept failing.
    GoogleUnavailable,
    /// Google throttled the checker.
    GoogleThrottled,
    /// Google rejected the operator's own credentials.
    CheckerUnauthenticated,
    /// The operator's own identity lacks a permission.
    CheckerForbidden,
    /// The operator may not mint the KSA's token.
    TokenRequestDenied,
    /// The Kubernetes API failed, throttled or timed out a call authprobe needed.
    KubernetesUnavailable,
    /// Canary: the pod's first token from the metadata server took longer than the client
    /// libraries' 3 s metadata timeout.
    MetadataServerSlowStart,
    /// Canary: no token from the metadata server by the canary's 60 s deadline.
    MetadataServerUnreachable,
    /// Canary: ADC resolved from another source than the platform implies (GKE: the metadata
    /// server; Federation: an `external_account` file).
    AdcSourceUnexpected,
    /// Canary: the pod's credential fingerprints differently from the identity authprobe proves.
    CredentialSourceDrift,
    /// Canary: the Job never ran (no node fits, quota, image pull, configuration).
    CanaryNotScheduled,
    /// Event only: the canary's credential fingerprint changed between two runs.
    CredentialSourceChanged,
    /// Everything passed.
    Verified,
    /// The live chain is off.
    Disabled,
}

impl Reason {
    /// The reason as written in status, events and metrics.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// Whether this reason means "authprobe cannot tell" (Unknown, never False).
    pub fn is_undecided(self) -> bool {
        matches!(
            self,
            Reason::PropagationPending
                | Reason::GoogleUnavailable
                | Reason::GoogleThrottled
                | Reason::CheckerUnauthenticated
                | Reason::CheckerForbidden
                | Reason::TokenRequestDenied
                | Reason::KubernetesUnavailable
                | Reason::CredentialConfigUnreadable
                | Reason::EndpointUnavailable
                | Reason::CanaryNotScheduled
        )
    }

    /// Whether this reason says the operator's own access is at fault (CheckerHealthy False).
    pub fn blames_the_checker(self) -> bool {
        matches!(self, Reason::CheckerUnauthenticated | Reason::CheckerForbidden | Reason::TokenRequestDenied)
    }
}

/// Condition types.
pub mod condition {
    /// Every checked KSA passed every enabled check.
    pub const READY: &str = "Ready";
    /// Static, IAM-policy and provider checks passed.
    pub const MAPPINGS_VERIFIED: &str = "MappingsVerified";
    /// The live chain succeeded for every KSA.
    pub const TOKEN_EXCHANGE_VERIFIED: &str = "TokenExchangeVerified";
    /// The operator's own access to Kubernetes and Google works.
    pub const CHECKER_HEALTHY: &str = "CheckerHealthy";
    /// All four, in the order they are written.
    pub const ALL: [&str; 4] = [READY, MAPPINGS_VERIFIED, TOKEN_EXCHANGE_VERIFIED, CHECKER_HEALTHY];
}

/// The CRD as YAML, exactly what `crds/authprobe.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_saphyr::SerializeError> {
    let yaml = serde_saphyr::to_string(&AuthProbe::crd())?;
    Ok(format!("# Generated by `authprobe crd` from src/api.rs. Do not edit; run `make crd`.\n---\n{yaml}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The committed CRD is what the Rust types generate; regenerate with `make crd`.
    #[test]
    fn committed_crd_matches_the_rust_types() {
        let committed = include_str!("../../../crds/authprobe.yaml");
        let generated = crd_yaml().expect("the CRD renders");
        assert!(
            committed == generated,
            "crds/authprobe.yaml drifted from src/api.rs: run `make crd` and commit it"
        );
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let spec: AuthProbeSpec = serde_json::from_value(serde_json::json!({
            "namespaceSelector": {},
            "identity": {"platform": "GKE", "projectId": "acme-prod"}
        }))
        .expect("a minimal spec parses");
        assert_eq!(spec.probe.interval, "10m");
        assert_eq!(spec.probe.propagation_grace, "7m");
        assert!(!spec.probe.token_exchange);
        assert!(spec.probe.inspect_workloads);
        assert_eq!(spec.probe.token_exchange_interval, None, "absent: the probe's interval");
        assert_eq!(spec.identity.access, Access::Impersonation);
    }

    #[test]
    fn reasons_and_stages_serialize_as_the_design_spells_them() {
        for reason in <Reason as strum::VariantArray>::VARIANTS {
            assert_eq!(serde_json::to_value(reason).expect("serializes"), reason.as_str());
        }
        assert_eq!(serde_json::to_value(Stage::IamPolicy).expect("serializes"), "IAMPolicy");
        assert_eq!(serde_json::to_value(Platform::Gke).expect("serializes"), "GKE");
    }
}
