//! The pure check engine: turns a KSA, its namespace, the probe spec and the Google facts fetched
//! for it into a result with a stage, a reason and a message that names the fix. No Kubernetes or
//! Google IO happens here; the controller and `authprobe check` feed it data.

pub mod annotation;
pub mod canary;
pub mod decide;
pub mod facts;
pub mod grace;
pub mod history;
mod plan;
pub mod policy;
pub mod principal;
pub mod report;
pub mod schedule;
pub mod selector;
pub mod stage;
pub mod target;
pub mod workload;

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::jiff::Timestamp;

use self::{
    annotation::GsaEmail,
    facts::{ClusterIssuer, FetchFailure, Fetched, GoogleServiceAccount, Policy},
};
pub use self::{
    grace::within_grace,
    plan::{CanaryPlan, ClusterView, FederationPlan, KsaRef, Plan, Selection, TargetPlan},
    stage::provider::ProviderFacts,
};
use crate::api::{Reason, Stage};

/// Definitely broken, or undecided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// The namespace's setup is broken: alerts fire.
    Fail,
    /// authprobe cannot tell: never pages a namespace owner.
    Unknown,
}

/// Why a KSA did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The step that failed.
    pub stage: Stage,
    /// The stable reason.
    pub reason: Reason,
    /// Fail or Unknown.
    pub verdict: Verdict,
    /// The KSA, the principal, the GSA or provider, the upstream error and the fix.
    pub message: String,
    /// Stage `Workload`: the workloads with this reason, as `Kind/name`, sorted, at most 5.
    pub workloads: Vec<String>,
}

impl Finding {
    /// A definite failure.
    pub fn fail(stage: Stage, reason: Reason, message: impl Into<String>) -> Self {
        Self { stage, reason, verdict: Verdict::Fail, message: message.into(), workloads: vec![] }
    }

    /// An undecided result.
    pub fn unknown(stage: Stage, reason: Reason, message: impl Into<String>) -> Self {
        Self { stage, reason, verdict: Verdict::Unknown, message: message.into(), workloads: vec![] }
    }

    /// Of an earlier stage's finding and a later one's, the one that decides: failing before
    /// undecided, else the earlier (an undecided finding does not stop the later stages).
    pub fn decisive<'a>(earlier: Option<&'a Finding>, later: Option<&'a Finding>) -> Option<&'a Finding> {
        match (earlier, later) {
            (Some(e), Some(l)) if e.verdict == Verdict::Unknown && l.verdict == Verdict::Fail => Some(l),
            (e, l) => e.or(l),
        }
    }

    /// An undecided result from a fetch failure.
    pub fn from_fetch(stage: Stage, failure: &FetchFailure, what: &str) -> Self {
        Self::unknown(stage, failure.reason(), format!("cannot read {what}: {}", failure.detail))
    }
}

/// A ServiceAccount as the engine sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ksa {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// The `iam.gke.io/gcp-service-account` value.
    pub gsa_annotation: Option<String>,
    /// `metadata.creationTimestamp`.
    pub created: Option<Timestamp>,
}

/// A KSA to check: `ksa` is `None` for a required name that does not exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object, when it exists.
    pub ksa: Option<Ksa>,
}

/// A KSA that passed the static checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The object.
    pub ksa: Ksa,
    /// The GSA it impersonates (`access: Impersonation`).
    pub gsa: Option<GsaEmail>,
}

/// What was read from Google for one GSA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GsaFacts {
    /// `serviceAccounts.get`; `Ok(None)`: not found.
    pub account: Fetched<GoogleServiceAccount>,
    /// `getIamPolicy`; `Ok(None)` when not read because the account does not exist.
    pub policy: Fetched<Policy>,
}

/// Everything the mapping stages need for one probe pass.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// Per annotated GSA.
    pub gsas: &'a BTreeMap<GsaEmail, Arc<GsaFacts>>,
    /// Federation only.
    pub provider: Option<&'a ProviderFacts>,
    /// Federation only: the cluster's issuer and keys.
    pub cluster: Option<&'a Result<ClusterIssuer, FetchFailure>>,
    /// Unix seconds, for the claims built from the KSA.
    pub now: i64,
}

/// A minted KSA token's claims and signing key id (when the live chain ran).
#[derive(Clone, Copy, Debug)]
pub struct TokenClaims<'a> {
    /// The decoded payload.
    pub claims: &'a serde_json::Value,
    /// The header's `kid`.
    pub kid: Option<&'a str>,
}

#[cfg(test)]
mod tests;
