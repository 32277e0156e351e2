//! The fake's state: what Google "has" (service accounts and their policies, pools, providers,
//! who may do what on which target), loaded from a scenario file and changed through `/admin`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything the fake knows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Scenario {
    /// Who the operator is and what it may read.
    pub operator: Operator,
    /// Google service accounts.
    pub service_accounts: Vec<ServiceAccount>,
    /// Workload identity pools with their providers.
    pub pools: Vec<Pool>,
    /// GKE: which clusters' KSA tokens each project's `PROJECT.svc.id.goog` trusts (securetoken).
    pub gke: Vec<GkeProject>,
    /// How Google reaches each cluster issuer's JWKS (a provider without `jwksJson`, and GKE).
    pub clusters: Vec<Cluster>,
    /// Permissions granted directly to federated principals (access: Direct) on targets.
    pub direct_grants: Vec<Grant>,
    /// Services that refuse federated tokens with 401 (e.g. `storage`).
    pub federated_token_unsupported: Vec<String>,
    /// Cloud Run (v2) services. Who may invoke one is a grant on its full resource name
    /// (`//run.googleapis.com/projects/P/locations/L/services/S`, permission `run.routes.invoke`):
    /// in a service account's `grants`, or in `directGrants` for a federated principal.
    pub cloud_run_services: Vec<CloudRunService>,
    /// Injected latency, errors and throttling.
    pub faults: Faults,
    /// Seconds added to the `Date` header (simulates a skewed Google clock relative to the cluster).
    pub clock_skew_seconds: i64,
}

/// The operator's own identity at the fake.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Operator {
    /// Bearer tokens accepted for the operator's reads; empty accepts any non-empty token.
    pub tokens: Vec<String>,
    /// Permissions the operator holds; reads needing others get 403.
    pub permissions: Vec<String>,
}

/// What a least-privilege operator role holds.
pub const OPERATOR_PERMISSIONS: [&str; 5] = [
    "iam.serviceAccounts.get",
    "iam.serviceAccounts.getIamPolicy",
    "iam.workloadIdentityPools.get",
    "iam.workloadIdentityPoolProviders.get",
    "run.services.get",
];

impl Default for Operator {
    fn default() -> Self {
        Self { tokens: vec![], permissions: OPERATOR_PERMISSIONS.iter().map(|p| (*p).to_string()).collect() }
    }
}

/// A Google service account.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct ServiceAccount {
    /// `NAME@PROJECT.iam.gserviceaccount.com`.
    pub email: String,
    /// Disabled accounts get no tokens.
    pub disabled: bool,
    /// Its allow policy.
    pub bindings: Vec<Binding>,
    /// What its access tokens may do: full resource name → permissions.
    pub grants: BTreeMap<String, Vec<String>>,
    /// Principals an IAM deny policy stops from impersonating it (`getIamPolicy` does not show these).
    pub denied_principals: Vec<String>,
}

/// A role binding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Binding {
    /// `roles/...`.
    pub role: String,
    /// Members.
    pub members: Vec<String>,
    /// An IAM condition.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
}

/// A `google.type.Expr`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Condition {
    /// Title.
    pub title: String,
    /// CEL.
    pub expression: String,
}

/// A workload identity pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Pool {
    /// `projects/N/locations/global/workloadIdentityPools/POOL`.
    pub name: String,
    /// Disabled pools exchange nothing and their tokens stop working.
    pub disabled: bool,
    /// `ACTIVE` or `DELETED`.
    pub state: LifeState,
    /// Providers.
    pub providers: Vec<Provider>,
}

/// `ACTIVE` or `DELETED`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LifeState {
    /// In use.
    #[default]
    Active,
    /// Soft-deleted.
    Deleted,
}

/// An OIDC provider.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Provider {
    /// PROVIDER (the last segment).
    pub id: String,
    /// Disabled providers refuse new exchanges.
    pub disabled: bool,
    /// `ACTIVE` or `DELETED`.
    pub state: LifeState,
    /// Must equal the token's `iss`.
    pub issuer_uri: String,
    /// Empty: only the provider's own name (with `//` or `https://`).
    pub allowed_audiences: Vec<String>,
    /// Uploaded keys as a JSON string; empty: fetched from the issuer's discovery.
    pub jwks_json: String,
    /// `google.subject`, `attribute.*` → CEL over `assertion`.
    pub attribute_mapping: BTreeMap<String, String>,
    /// CEL that must hold.
    pub attribute_condition: String,
}

/// A project's GKE workload pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GkeProject {
    /// The project ID (pool `PROJECT.svc.id.goog`).
    pub project_id: String,
    /// The project number.
    pub project_number: String,
    /// Clusters whose KSA tokens this pool trusts.
    pub clusters: Vec<GkeCluster>,
}

/// A GKE cluster, as securetoken knows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct GkeCluster {
    /// `https://container.googleapis.com/v1/projects/P/locations/L/clusters/C`.
    pub url: String,
    /// The cluster's token issuer.
    pub issuer: String,
}

/// How to reach a cluster issuer's discovery and keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Cluster {
    /// The issuer URL (`https://127.0.0.1:PORT`).
    pub issuer: String,
    /// PEM of the CA that signed the issuer's serving certificate.
    pub ca_pem: String,
}

/// A permission grant to a principal on a target.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Grant {
    /// A `principal://` or `principalSet://` member.
    pub member: String,
    /// The full resource name.
    pub resource: String,
    /// The permissions.
    pub permissions: Vec<String>,
}

/// A Cloud Run service, as `GET https://run.googleapis.com/v2/{name}` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct CloudRunService {
    /// `projects/PROJECT/locations/REGION/services/SERVICE` (the path it is read at).
    pub name: String,
    /// The main URL (`https://S-HASH-RC.a.run.app`).
    pub uri: String,
    /// Every URL it answers at; an ID token for any of them (or a custom audience) is accepted.
    pub urls: Vec<String>,
    /// Extra audiences (`gcloud run services update S --add-custom-audiences=AUD`).
    pub custom_audiences: Vec<String>,
    /// Anyone may invoke it, without an IAM check.
    pub invoker_iam_disabled: bool,
    /// `INGRESS_TRAFFIC_ALL` (when empty), `INGRESS_TRAFFIC_INTERNAL_ONLY`,
    /// `INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER` or `INGRESS_TRAFFIC_NONE`.
    pub ingress: String,
}

impl CloudRunService {
    /// A service with Cloud Run's two URL forms, derived deterministically: the project-number
    /// URL `https://S-NUMBER.REGION.run.app` and the hashed `https://S-HASH-RC.a.run.app`
    /// (which is also `uri`), where RC abbreviates the region (`us-central1` → `uc`).
    pub fn new(project: &str, project_number: &str, region: &str, service: &str) -> Self {
        let hash: String = {
            let mut h = fnv(format!("{project}/{region}/{service}").as_bytes());
            (0..10)
                .map(|_| {
                    let c = b"abcdefghijklmnopqrstuvwxyz0123456789"[(h % 36) as usize] as char;
                    h /= 36;
                    c
                })
                .collect()
        };
        let code: String = region.split('-').take(2).filter_map(|part| part.chars().next()).collect();
        let uri = format!("https://{service}-{hash}-{code}.a.run.app");
        Self {
            name: format!("projects/{project}/locations/{region}/services/{service}"),
            urls: vec![format!("https://{service}-{project_number}.{region}.run.app"), uri.clone()],
            uri,
            ..Default::default()
        }
    }

    /// `//run.googleapis.com/projects/P/locations/L/services/S`: where its grants are kept.
    pub fn resource(&self) -> String {
        format!("//run.googleapis.com/{}", self.name)
    }
}

/// Injected faults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every faulted request.
    pub latency_ms: u64,
    /// Fraction of requests answered 503.
    pub error_rate: f64,
    /// Fraction of requests answered 429.
    pub throttle_rate: f64,
    /// `Retry-After` seconds on 429s (0: none).
    pub retry_after_seconds: u64,
    /// API names (`iam.getIamPolicy`, `sts.token`, ...) the faults apply to; empty: all.
    pub apis: Vec<String>,
    /// Spread errors evenly (exactly `errorRate` of the requests, in a fixed pattern) rather than
    /// at random, so that retry counts are reproducible.
    pub evenly: bool,
    /// Answer 200 with a broken body instead of the real answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub malformed: Option<Malformed>,
}

/// Broken answers a proxy or a bug could produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Malformed {
    /// JSON cut off mid-way.
    TruncatedJson,
    /// An HTML error page served with 200.
    HtmlPage,
    /// Valid JSON with fields of the wrong types.
    WrongTypes,
    /// 8 MiB of JSON, streamed without a length.
    HugeBody,
    /// Half-megabyte strings where a boolean or a list belongs, within the read limit: the parse
    /// error quotes them.
    HugeWrongType,
}

impl Scenario {
    /// The service account with this email.
    pub fn service_account(&self, email: &str) -> Option<&ServiceAccount> {
        self.service_accounts.iter().find(|s| s.email == email)
    }

    /// The pool with this full name.
    pub fn pool(&self, name: &str) -> Option<&Pool> {
        self.pools.iter().find(|p| p.name == name)
    }

    /// The Cloud Run service with this name (`projects/P/locations/L/services/S`).
    pub fn cloud_run_service(&self, name: &str) -> Option<&CloudRunService> {
        self.cloud_run_services.iter().find(|s| s.name == name)
    }
}

impl ServiceAccount {
    /// The project ID from the email.
    pub fn project(&self) -> &str {
        self.email
            .split_once('@')
            .and_then(|(_, d)| d.strip_suffix(".iam.gserviceaccount.com"))
            .unwrap_or("-")
    }

    /// A stable numeric ID derived from the email.
    pub fn unique_id(&self) -> String {
        format!("1{:020}", fnv(self.email.as_bytes()) % 10u64.pow(19))
    }

    /// Changes whenever the bindings do, like Google's etag.
    pub fn etag(&self) -> String {
        use base64::Engine as _;
        let text = serde_json::to_string(&self.bindings).unwrap_or_default();
        format!("BwY{}", base64::engine::general_purpose::STANDARD.encode(fnv(text.as_bytes()).to_be_bytes()))
    }
}

/// FNV-1a: stable across runs (std's hasher is not).
pub fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}
