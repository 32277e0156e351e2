//! The canary's pure parts, shared by `authprobe canary` (inside the pod) and the controller: the
//! report it writes to its termination message, where Application Default Credentials resolve
//! from a given environment, the claim fingerprint, the Job (see [`job`]) and what the controller
//! remembers of the runs (see [`book`]).
//!
//! The fingerprint is the first 12 hex digits of SHA-256 over `iss|aud|sub` of the credential the
//! pod presents, never the token. What is fingerprinted depends on the source ([`FingerprintOf`]):
//! - the metadata server: the ID token it hands out for [`AUDIENCE`] (`.../identity?audience=`),
//!   as Google signs it: `https://accounts.google.com`, the audience, the GSA's unique ID;
//! - an `external_account` file (Federation): the subject token its `credential_source.file`
//!   names, the Kubernetes token STS receives: the cluster's issuer, the provider audience,
//!   `system:serviceaccount:NS:NAME`. A federated principal gets no ID token from Google, and
//!   these claims decide the principal;
//! - a `service_account` key file: the claims Google's ID token for that key's account carries
//!   (`https://accounts.google.com`, the audience, the key's `client_id`, which is the account's
//!   unique ID), read from the file: minting one would send a key-signed assertion out of the
//!   namespace only to learn the same three values;
//! - other sources (user credentials, impersonation configurations): none; Google's ID token for
//!   them names an account the pod cannot learn without calling out.
//!
//! The operator computes the same value for the KSA ([`expected_fingerprint`]) from what it reads
//! anyway: GKE with a GSA: `https://accounts.google.com|AUDIENCE|<the GSA's uniqueId from
//! serviceAccounts.get>`; Federation: `<the cluster's issuer>|<the provider audience>|
//! system:serviceaccount:NS:NAME`. GKE without a GSA (`access: Direct`) has no ID token: no
//! fingerprint, and no drift is judged.

pub mod book;
pub mod job;

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    Ksa, Plan,
    facts::{ClusterIssuer, GoogleServiceAccount},
};
use crate::api::Platform;

/// The audience of the ID token the canary asks the metadata server for.
pub const AUDIENCE: &str = "https://authprobe.io/canary";
/// Google's ID token issuer.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";
/// The client libraries' default metadata server timeout: one attempt waits this long, and a
/// first token later than this is a slow start.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// The canary polls for its first token until this long after its container started.
pub const DEADLINE: Duration = Duration::from_secs(60);
/// The kubelet keeps at most this much of a termination message.
pub const MAX_REPORT_BYTES: usize = 4096;
/// The report's schema version.
pub const REPORT_VERSION: u32 = 1;
/// The metadata server's host when `GCE_METADATA_HOST` is not set.
pub const DEFAULT_METADATA_HOST: &str = "metadata.google.internal";
/// The gcloud well-known file under `CLOUDSDK_CONFIG` (or `$HOME/.config/gcloud`).
pub const WELL_KNOWN_FILE: &str = "application_default_credentials.json";

/// Where Application Default Credentials resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Source {
    /// The file `GOOGLE_APPLICATION_CREDENTIALS` names.
    #[serde(rename = "GOOGLE_APPLICATION_CREDENTIALS")]
    CredentialsFile,
    /// gcloud's `application_default_credentials.json`.
    GcloudWellKnownFile,
    /// The metadata server.
    MetadataServer,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::CredentialsFile => "the file GOOGLE_APPLICATION_CREDENTIALS names",
            Source::GcloudWellKnownFile => "gcloud's application_default_credentials.json",
            Source::MetadataServer => "the metadata server",
        })
    }
}

/// The environment variables ADC reads, as the container has them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AdcEnv {
    /// `GOOGLE_APPLICATION_CREDENTIALS`.
    pub credentials: Option<String>,
    /// `CLOUDSDK_CONFIG`: gcloud's configuration directory.
    pub cloudsdk_config: Option<String>,
    /// `HOME`.
    pub home: Option<String>,
    /// `GCE_METADATA_HOST`: the metadata server's `host[:port]`.
    pub metadata_host: Option<String>,
}

impl AdcEnv {
    /// Reads the variables through `var` (empty values count as unset, as google-auth has it).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let get = |name: &str| var(name).filter(|v| !v.is_empty());
        Self {
            credentials: get("GOOGLE_APPLICATION_CREDENTIALS"),
            cloudsdk_config: get("CLOUDSDK_CONFIG"),
            home: get("HOME"),
            metadata_host: get("GCE_METADATA_HOST"),
        }
    }
}

/// What ADC resolves to, before any token is asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resolved {
    /// A credential file (whether or not it exists: ADC then fails rather than going on).
    File {
        /// Which of the two files.
        source: Source,
        /// Its path.
        path: PathBuf,
    },
    /// The metadata server at `host`.
    MetadataServer {
        /// `GCE_METADATA_HOST`, or `metadata.google.internal`.
        host: String,
    },
}

/// google-auth's order: `GOOGLE_APPLICATION_CREDENTIALS` (a missing file is an error, not a
/// fall-through), then gcloud's well-known file (`$CLOUDSDK_CONFIG/` or `$HOME/.config/gcloud/`
/// `application_default_credentials.json`) when it exists, then the metadata server.
pub fn resolve(env: &AdcEnv, exists: impl Fn(&Path) -> bool) -> Resolved {
    if let Some(path) = &env.credentials {
        return Resolved::File { source: Source::CredentialsFile, path: PathBuf::from(path) };
    }
    let config_dir = match (&env.cloudsdk_config, &env.home) {
        (Some(dir), _) => Some(PathBuf::from(dir)),
        (None, Some(home)) => Some(Path::new(home).join(".config/gcloud")),
        (None, None) => None,
    };
    if let Some(path) = config_dir.map(|d| d.join(WELL_KNOWN_FILE)).filter(|p| exists(p)) {
        return Resolved::File { source: Source::GcloudWellKnownFile, path };
    }
    Resolved::MetadataServer {
        host: env.metadata_host.clone().unwrap_or_else(|| DEFAULT_METADATA_HOST.to_string()),
    }
}

/// The shape of the first token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenType {
    /// An opaque OAuth access token (the metadata server, STS, impersonation, user credentials).
    AccessToken,
    /// A JWT sent as the bearer token itself (a service account key's self-signed token).
    #[serde(rename = "JWT")]
    Jwt,
}

impl TokenType {
    /// A token's shape: three dot-separated parts whose first is a JOSE header (base64url JSON
    /// with `alg`) make a JWT; anything else (Google's `ya29.` tokens have dots too) is opaque.
    pub fn of(token: &str) -> Self {
        let parts: Vec<&str> = token.trim().split('.').collect();
        let header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts[0].trim_end_matches('='))
            .ok()
            .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok());
        if parts.len() == 3 && header.is_some_and(|h| h.get("alg").is_some()) {
            TokenType::Jwt
        } else {
            TokenType::AccessToken
        }
    }
}

/// What a fingerprint was computed over (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FingerprintOf {
    /// The metadata server's ID token for [`AUDIENCE`].
    IdToken,
    /// The subject token an `external_account` file's `credential_source.file` names.
    SubjectToken,
    /// A `service_account` key's account, as Google's ID token for it would name it.
    ServiceAccountKey,
}

/// What `authprobe canary` writes to its termination message: JSON, under 4 KiB, never a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    /// [`REPORT_VERSION`].
    pub version: u32,
    /// Where ADC resolved.
    pub source: Source,
    /// The credential file (file sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The metadata server asked (`host[:port]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata_host: Option<String>,
    /// The file's `type` (`external_account`, `service_account`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_type: Option<String>,
    /// The first token's shape; absent when there was none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<TokenType>,
    /// Milliseconds from the container's start to the first token; absent when none came by the deadline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_token_ms: Option<u64>,
    /// Token requests made.
    pub attempts: u32,
    /// The claim fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    /// What the fingerprint is of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fingerprint_of: Option<FingerprintOf>,
    /// Why there is no token or no fingerprint: the last error, redacted and short.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Report {
    /// A report of this version from `source` with nothing measured yet.
    pub fn new(source: Source) -> Self {
        Self {
            version: REPORT_VERSION,
            source,
            path: None,
            metadata_host: None,
            credential_type: None,
            token_type: None,
            first_token_ms: None,
            attempts: 0,
            fingerprint: None,
            fingerprint_of: None,
            error: None,
        }
    }

    /// The report as its termination message: JSON, token-like text redacted, every free-text
    /// field flattened and cut so that even fully escaped it stays under 4 KiB.
    pub fn to_message(&self) -> String {
        let cut = |s: &Option<String>, max: usize| {
            s.as_deref().map(|s| {
                let flat: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
                crate::redact::message(&flat, max)
            })
        };
        let report = Report {
            path: cut(&self.path, 512),
            metadata_host: cut(&self.metadata_host, 256),
            credential_type: cut(&self.credential_type, 64),
            error: cut(&self.error, 768),
            ..self.clone()
        };
        serde_json::to_string(&report).unwrap_or_default()
    }

    /// Parses a termination message; `None` for anything that is not a complete report of this version.
    pub fn parse(message: &str) -> Option<Self> {
        serde_json::from_str::<Self>(message.trim()).ok().filter(|r| r.version == REPORT_VERSION)
    }

    /// The first token's delay after the container started.
    pub fn first_token(&self) -> Option<Duration> {
        self.first_token_ms.map(Duration::from_millis)
    }
}

/// The first 12 hex digits of SHA-256 over `iss|aud|sub`.
pub fn fingerprint(iss: &str, aud: &str, sub: &str) -> String {
    let digest = Sha256::digest(format!("{iss}|{aud}|{sub}").as_bytes());
    digest.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

/// Why a JWT's claims could not be fingerprinted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClaimsError {
    /// Not three dot-separated parts with a base64url JSON payload.
    #[error("not a JWT")]
    NotAJwt,
    /// `iss`, `aud` or `sub` is missing or not a string (a one-element `aud` list counts).
    #[error("iss, aud or sub is missing")]
    MissingClaim,
}

/// The fingerprint of a JWT's `iss|aud|sub` (its signature is not checked: the canary reports
/// what the pod holds, and the operator compares). A one-element `aud` list counts as its element.
pub fn jwt_fingerprint(token: &str) -> Result<String, ClaimsError> {
    let mut parts = token.trim().split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(ClaimsError::NotAJwt);
    };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| ClaimsError::NotAJwt)?;
    let claims: serde_json::Value = serde_json::from_slice(&json).map_err(|_| ClaimsError::NotAJwt)?;
    let text = |name: &str| match &claims[name] {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(a) if a.len() == 1 => a[0].as_str().map(str::to_string),
        _ => None,
    };
    match (text("iss"), text("aud"), text("sub")) {
        (Some(iss), Some(aud), Some(sub)) => Ok(fingerprint(&iss, &aud, &sub)),
        _ => Err(ClaimsError::MissingClaim),
    }
}

/// The fingerprint of a `service_account` key file's account (see the module's documentation).
pub fn service_account_key_fingerprint(key: &serde_json::Value) -> Option<String> {
    let client_id = key.get("client_id")?.as_str().filter(|id| !id.is_empty())?;
    Some(fingerprint(GOOGLE_ISSUER, AUDIENCE, client_id))
}

/// What the operator expects the canary of `ksa` to fingerprint to, from what it read for the
/// pass; `None` when it cannot tell (no GSA, a failed read, `access: Direct` on GKE).
pub fn expected_fingerprint(
    plan: &Plan,
    ksa: &Ksa,
    gsa: Option<&GoogleServiceAccount>,
    cluster: Option<&ClusterIssuer>,
) -> Option<String> {
    match (plan.platform, &plan.federation) {
        (Platform::Gke, _) => {
            let account = gsa.filter(|a| !a.unique_id.is_empty())?;
            Some(fingerprint(GOOGLE_ISSUER, AUDIENCE, &account.unique_id))
        }
        (Platform::Federation, Some(federation)) => Some(fingerprint(
            &cluster?.issuer,
            &federation.audience,
            &format!("system:serviceaccount:{}:{}", ksa.namespace, ksa.name),
        )),
        (Platform::Federation, None) => None,
    }
}

/// The kinds of workload a canary can take its environment from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WorkloadKind {
    /// `apps/v1` Deployment.
    Deployment,
    /// `apps/v1` StatefulSet.
    StatefulSet,
    /// `apps/v1` DaemonSet.
    DaemonSet,
    /// `batch/v1` Job.
    Job,
    /// `batch/v1` CronJob.
    CronJob,
    /// `v1` Pod.
    Pod,
}

impl WorkloadKind {
    /// As written in `canary.workload`.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
            WorkloadKind::Pod => "Pod",
        }
    }
}

/// `canary.workload`, checked.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadRef {
    /// Its kind.
    pub kind: WorkloadKind,
    /// Its name.
    pub name: String,
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind.as_str(), self.name)
    }
}

impl FromStr for WorkloadRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "canary.workload {} must be Kind/name, Kind one of Deployment, StatefulSet, DaemonSet, Job, CronJob, Pod",
                super::annotation::quote(s)
            )
        };
        let (kind, name) = s.split_once('/').ok_or_else(bad)?;
        let kind = match kind {
            "Deployment" => WorkloadKind::Deployment,
            "StatefulSet" => WorkloadKind::StatefulSet,
            "DaemonSet" => WorkloadKind::DaemonSet,
            "Job" => WorkloadKind::Job,
            "CronJob" => WorkloadKind::CronJob,
            "Pod" => WorkloadKind::Pod,
            _ => return Err(bad()),
        };
        let dns_subdomain = (1..=253).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !dns_subdomain {
            return Err(bad());
        }
        Ok(WorkloadRef { kind, name: name.to_string() })
    }
}

#[cfg(test)]
mod tests;
