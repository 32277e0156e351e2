//! What the engine knows about Google and the cluster: plain data, deserialized straight from
//! Google's JSON by the IO layer, with fetch failures kept as values so the engine can tell
//! "the namespace is broken" from "authprobe cannot tell".

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::Reason;

/// Why a fact could not be read. Never the namespace's fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchFailure {
    /// What kind of failure: decides the Unknown reason.
    pub kind: FailureKind,
    /// What happened, redacted and short.
    pub detail: String,
}

/// The kinds of fetch failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// Unreachable, 5xx, timeouts, or an answer that does not parse.
    Unavailable,
    /// 429 after retries.
    Throttled,
    /// The operator's own credentials were rejected (401).
    Unauthenticated,
    /// The operator's own identity lacks a permission (403).
    Forbidden,
}

impl FetchFailure {
    /// Builds a failure.
    pub fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Self { kind, detail: detail.into() }
    }

    /// The Unknown reason this failure reports.
    pub fn reason(&self) -> Reason {
        match self.kind {
            FailureKind::Unavailable => Reason::GoogleUnavailable,
            FailureKind::Throttled => Reason::GoogleThrottled,
            FailureKind::Unauthenticated => Reason::CheckerUnauthenticated,
            FailureKind::Forbidden => Reason::CheckerForbidden,
        }
    }
}

/// A fact read from Google: `Ok(None)` when it does not exist.
pub type Fetched<T> = Result<Option<T>, FetchFailure>;

/// A Google service account (`projects.serviceAccounts.get`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct GoogleServiceAccount {
    /// `projects/P/serviceAccounts/EMAIL`.
    pub name: String,
    /// The email.
    pub email: String,
    /// The numeric unique ID.
    pub unique_id: String,
    /// Omitted when false.
    pub disabled: bool,
}

/// A Cloud Run service (`GET run.googleapis.com/v2/projects/P/locations/L/services/S`), as far as
/// ID tokens go: proto3 JSON leaves empty lists and `false` out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RunService {
    /// `projects/P/locations/L/services/S`.
    pub name: String,
    /// The main URL.
    pub uri: String,
    /// Every URL the service answers at; an ID token for any of them is accepted.
    pub urls: Vec<String>,
    /// Further audiences its ID tokens may carry.
    pub custom_audiences: Vec<String>,
    /// Anyone may invoke it: `run.routes.invoke` is not checked.
    pub invoker_iam_disabled: bool,
}

/// An IAM allow policy (`getIamPolicy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Policy {
    /// 1 or 3.
    pub version: i32,
    /// Changes whenever the policy does.
    pub etag: String,
    /// Role bindings.
    pub bindings: Vec<Binding>,
}

/// A role binding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Binding {
    /// `roles/...`.
    pub role: String,
    /// Principal identifiers.
    pub members: Vec<String>,
    /// Set for conditional bindings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub condition: Option<Expr>,
}

/// A `google.type.Expr`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Expr {
    /// The CEL expression.
    pub expression: String,
    /// A short title.
    pub title: String,
    /// A description.
    pub description: String,
}

/// Lifecycle state of a pool or provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum State {
    /// In use.
    Active,
    /// Soft-deleted.
    Deleted,
    /// Anything else.
    #[default]
    #[serde(other)]
    StateUnspecified,
}

/// A workload identity pool.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Pool {
    /// `projects/N/locations/global/workloadIdentityPools/POOL`.
    pub name: String,
    /// ACTIVE or DELETED.
    pub state: State,
    /// A disabled pool exchanges nothing and its tokens stop working.
    pub disabled: bool,
}

/// A workload identity pool provider.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Provider {
    /// `projects/N/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    pub name: String,
    /// ACTIVE or DELETED.
    pub state: State,
    /// A disabled provider exchanges nothing new.
    pub disabled: bool,
    /// `google.subject`, `attribute.*`, `google.groups` → CEL expressions over `assertion`.
    pub attribute_mapping: BTreeMap<String, String>,
    /// A CEL expression that must hold for the credential to be accepted.
    pub attribute_condition: String,
    /// Set for OIDC providers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oidc: Option<Oidc>,
}

/// The OIDC part of a provider.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Oidc {
    /// Must equal the cluster's issuer.
    pub issuer_uri: String,
    /// Empty: only the provider's own name is allowed.
    pub allowed_audiences: Vec<String>,
    /// A JSON string `{"keys":[...]}`; empty: Google fetches the issuer's JWKS.
    pub jwks_json: String,
}

/// What the cluster itself publishes for its ServiceAccount tokens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterIssuer {
    /// `issuer` from `/.well-known/openid-configuration`.
    pub issuer: String,
    /// `/openid/v1/jwks`.
    pub keys: Vec<Jwk>,
}

/// The parts of a JSON Web Key that identify it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Jwk {
    /// Key ID.
    pub kid: String,
    /// RSA or EC.
    pub kty: String,
    /// RSA modulus.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub n: String,
    /// RSA exponent.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub e: String,
    /// EC x.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub x: String,
    /// EC y.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub y: String,
}

/// A JWK set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

impl Jwk {
    /// Whether two keys are the same key material (ids may differ between publishers).
    pub fn same_material(&self, other: &Jwk) -> bool {
        self.kty == other.kty
            && self.n == other.n
            && self.e == other.e
            && self.x == other.x
            && self.y == other.y
    }
}
