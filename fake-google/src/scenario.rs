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
pub const OPERATOR_PERMISSIONS: [&str; 4] = [
    "iam.serviceAccounts.get",
    "iam.serviceAccounts.getIamPolicy",
    "iam.workloadIdentityPools.get",
    "iam.workloadIdentityPoolProviders.get",
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
