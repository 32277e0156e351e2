//! Federation provider checks that need no minted token: pool and provider state, issuer, signing
//! keys, audience, attribute mapping (evaluated with a real CEL engine), the 127-byte subject limit
//! and the attribute condition, all over the claims a KSA's token carries.

use std::{collections::BTreeMap, sync::Arc};

use cel::{Context, Env, Program, Value};
use serde_json::json;

use crate::{
    api::{Reason, Stage},
    engine::{
        Facts, FederationPlan, Finding, Ksa, Plan, TokenClaims,
        annotation::{quote, truncate},
        facts::{ClusterIssuer, FailureKind, FetchFailure, Fetched, JwkSet, Pool, Provider, State},
    },
};

/// Google's limit on the mapped `google.subject`, in bytes.
pub const MAX_SUBJECT_BYTES: usize = 127;

/// What the provider maps a KSA's claims to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mapped {
    /// `google.subject`.
    pub subject: String,
    /// `attribute.NAME` values, keyed by NAME.
    pub attributes: BTreeMap<String, String>,
    /// `google.groups`.
    pub groups: Vec<String>,
}

/// Why the provider stage fails for a KSA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProviderProblem {
    /// The pool or provider could not be read.
    Unreadable(FetchFailure),
    /// The cluster's issuer or keys could not be read.
    ClusterUnreadable(FetchFailure),
    /// Missing or deleted (`what` is "pool" or "provider").
    NotFound { what: &'static str },
    /// `disabled: true` on the provider.
    ProviderDisabled,
    /// `disabled: true` on the pool.
    PoolDisabled,
    /// Not an OIDC provider.
    NotOidc,
    /// `issuerUri` is not the cluster's issuer.
    IssuerMismatch { provider: String, cluster: String },
    /// The uploaded JWKS lacks the cluster's signing key(s), or cannot be parsed.
    KeyNotTrusted { detail: String },
    /// The audience the KSA token carries is not accepted.
    AudienceNotAllowed { audience: String, allowed: Vec<String> },
    /// A mapping expression failed for these claims.
    MappingInvalid { attribute: String, detail: String },
    /// The mapped subject is over 127 bytes.
    SubjectTooLong { subject: String },
    /// The condition is false (or fails) for these claims.
    ConditionRejected { clause: String, detail: String },
}

/// The claims a KSA token for `audience` carries (google-wif.md §7.2), built without minting one.
pub fn claims_for(
    issuer: &str,
    audience: &str,
    namespace: &str,
    name: &str,
    uid: &str,
    now: i64,
) -> serde_json::Value {
    json!({
        "iss": issuer,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "aud": [audience],
        "iat": now, "nbf": now, "exp": now + 600,
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
    })
}

/// The audience Google accepts by default: the provider's full name with `//` or `https://` in front.
pub fn default_audiences(provider_name: &str) -> [String; 2] {
    [format!("//iam.googleapis.com/{provider_name}"), format!("https://iam.googleapis.com/{provider_name}")]
}

/// What was read for a Federation provider, with its rules compiled once.
#[derive(Debug)]
pub struct ProviderFacts {
    /// The pool.
    pub pool: Fetched<Pool>,
    /// The provider.
    pub provider: Fetched<Provider>,
    rules: Option<Rules>,
}

impl ProviderFacts {
    /// The facts, compiling the provider's mapping and condition when it was read.
    pub fn new(pool: Fetched<Pool>, provider: Fetched<Provider>) -> Self {
        let rules = match &provider {
            Ok(Some(p)) => Some(Rules::compile(&p.attribute_mapping, &p.attribute_condition)),
            _ => None,
        };
        Self { pool, provider, rules }
    }
}

/// Runs the provider stage. `signing_kid`, when known from a minted token, narrows the key check
/// to the key that actually signs.
pub fn check(
    facts: &ProviderFacts,
    cluster: &Result<ClusterIssuer, FetchFailure>,
    audience: &str,
    claims: &serde_json::Value,
    signing_kid: Option<&str>,
) -> Result<Mapped, ProviderProblem> {
    let pool = facts.pool.as_ref().map_err(|f| ProviderProblem::Unreadable(f.clone()))?;
    let provider = facts.provider.as_ref().map_err(|f| ProviderProblem::Unreadable(f.clone()))?;
    match pool {
        None => return Err(ProviderProblem::NotFound { what: "pool" }),
        Some(p) if p.state == State::Deleted => return Err(ProviderProblem::NotFound { what: "pool" }),
        Some(p) if p.disabled => return Err(ProviderProblem::PoolDisabled),
        Some(_) => {}
    }
    let provider = match provider {
        Some(p) if p.state != State::Deleted => p,
        _ => return Err(ProviderProblem::NotFound { what: "provider" }),
    };
    if provider.disabled {
        return Err(ProviderProblem::ProviderDisabled);
    }
    let oidc = provider.oidc.as_ref().ok_or(ProviderProblem::NotOidc)?;
    let cluster = cluster.as_ref().map_err(|f| ProviderProblem::ClusterUnreadable(f.clone()))?;
    if oidc.issuer_uri != cluster.issuer {
        return Err(ProviderProblem::IssuerMismatch {
            provider: oidc.issuer_uri.clone(),
            cluster: cluster.issuer.clone(),
        });
    }
    check_keys(&oidc.jwks_json, cluster, signing_kid)?;
    let allowed = if oidc.allowed_audiences.is_empty() {
        default_audiences(&provider.name).to_vec()
    } else {
        oidc.allowed_audiences.clone()
    };
    if !allowed.iter().any(|a| a == audience) {
        return Err(ProviderProblem::AudienceNotAllowed { audience: audience.into(), allowed });
    }
    let Some(rules) = &facts.rules else {
        return Err(ProviderProblem::NotFound { what: "provider" });
    };
    let mapped = rules.map(claims)?;
    if mapped.subject.len() > MAX_SUBJECT_BYTES {
        return Err(ProviderProblem::SubjectTooLong { subject: mapped.subject });
    }
    rules.condition(claims, &mapped)?;
    Ok(mapped)
}

/// An uploaded JWKS must hold the cluster's signing key (by kid and key material). Without a
/// minted token the signer is not known, so every key the cluster publishes must be trusted.
fn check_keys(
    jwks_json: &str,
    cluster: &ClusterIssuer,
    signing_kid: Option<&str>,
) -> Result<(), ProviderProblem> {
    if jwks_json.is_empty() {
        // Google fetches the issuer's own JWKS: nothing uploaded can drift.
        return Ok(());
    }
    let uploaded: JwkSet = serde_json::from_str(jwks_json).map_err(|e| ProviderProblem::KeyNotTrusted {
        detail: format!("the provider's uploaded jwksJson does not parse ({e})"),
    })?;
    let trusted = |kid: &str| {
        cluster
            .keys
            .iter()
            .filter(|k| k.kid == kid)
            .all(|k| uploaded.keys.iter().any(|u| u.kid == kid && u.same_material(k)))
            && uploaded.keys.iter().any(|u| u.kid == kid)
    };
    let needed: Vec<&str> = match signing_kid {
        Some(kid) => vec![kid],
        None => cluster.keys.iter().map(|k| k.kid.as_str()).collect(),
    };
    let missing: Vec<&str> = needed.into_iter().filter(|kid| !trusted(kid)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let have: Vec<&str> = uploaded.keys.iter().map(|k| k.kid.as_str()).collect();
    Err(ProviderProblem::KeyNotTrusted {
        detail: format!(
            "the cluster signs with key(s) {missing:?}, which the provider's uploaded JWKS (keys {have:?}) does not hold with the same material"
        ),
    })
}

/// A provider's attribute mapping and condition, compiled once per provider read and shared by
/// every KSA the provider is checked for.
pub struct Rules {
    env: Result<Arc<Env>, String>,
    /// `google.subject`, `attribute.*` and `google.groups`, in mapping order.
    mapping: Vec<(String, Compiled)>,
    /// The condition's top-level `&&` clauses, each compiled on its own so a rejection names one.
    clauses: Vec<(String, Compiled)>,
}

type Compiled = Result<Program, String>;

impl std::fmt::Debug for Rules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = |v: &[(String, Compiled)]| v.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
        f.debug_struct("Rules")
            .field("mapping", &keys(&self.mapping))
            .field("clauses", &keys(&self.clauses))
            .finish_non_exhaustive()
    }
}

impl Rules {
    /// Compiles `mapping` and the clauses of `condition` (empty: every credential is accepted).
    pub fn compile(mapping: &BTreeMap<String, String>, condition: &str) -> Self {
        let env = env();
        let compile = |source: &str| match &env {
            Ok(env) => env
                .compile(source)
                .map_err(|e| format!("does not compile: {}", truncate(&e.to_string(), 300))),
            Err(e) => Err(e.clone()),
        };
        let mut mapping: Vec<(String, Compiled)> = mapping
            .iter()
            .filter(|(k, _)| *k == "google.subject" || *k == "google.groups" || k.starts_with("attribute."))
            .map(|(k, expression)| (k.clone(), compile(expression)))
            .collect();
        // The subject first: without it nothing else matters.
        mapping.sort_by_key(|(k, _)| k != "google.subject");
        let clauses = top_level_clauses(condition)
            .into_iter()
            .map(|clause| (clause.to_string(), compile(clause)))
            .collect();
        Self { env, mapping, clauses }
    }

    fn run(&self, program: &Compiled, variables: &[(&str, &serde_json::Value)]) -> Result<Value, String> {
        let (env, program) = match (&self.env, program) {
            (Ok(env), Ok(program)) => (env, program),
            (Err(e), _) | (_, Err(e)) => return Err(e.clone()),
        };
        let mut context = Context::with_env(env.clone());
        for (name, value) in variables {
            let value = cel::to_value(value).map_err(|e| format!("cannot bind {name}: {e}"))?;
            context.add_variable_from_value(*name, value);
        }
        program.execute(&context).map_err(|e| truncate(&e.to_string(), 300))
    }

    /// Evaluates the attribute mapping over `claims`.
    pub fn map(&self, claims: &serde_json::Value) -> Result<Mapped, ProviderProblem> {
        let assertion = [("assertion", claims)];
        let invalid = |attribute: &str, detail: String| ProviderProblem::MappingInvalid {
            attribute: attribute.into(),
            detail,
        };
        if !self.mapping.iter().any(|(k, _)| k == "google.subject") {
            return Err(invalid(
                "google.subject",
                "is not mapped; OIDC providers must map it (e.g. assertion.sub)".into(),
            ));
        }
        let mut mapped = Mapped::default();
        for (key, program) in &self.mapping {
            let value = self.run(program, &assertion).map_err(|e| invalid(key, e))?;
            match (key.as_str(), value) {
                ("google.subject", Value::String(s)) => mapped.subject = s.to_string(),
                ("google.groups", Value::List(items)) => {
                    for item in items.iter() {
                        match item {
                            Value::String(s) => mapped.groups.push(s.to_string()),
                            other => {
                                return Err(invalid(key, format!("holds {}, not strings", type_name(other))));
                            }
                        }
                    }
                }
                ("google.groups", other) => {
                    return Err(invalid(key, format!("evaluates to {}, not a list", type_name(&other))));
                }
                (_, Value::String(s)) => {
                    let name = key.strip_prefix("attribute.").unwrap_or(key);
                    mapped.attributes.insert(name.to_string(), s.to_string());
                }
                (_, other) => {
                    return Err(invalid(key, format!("evaluates to {}, not a string", type_name(&other))));
                }
            }
        }
        Ok(mapped)
    }

    /// Evaluates the attribute condition; on failure names the first top-level `&&` clause that is false.
    pub fn condition(&self, claims: &serde_json::Value, mapped: &Mapped) -> Result<(), ProviderProblem> {
        if self.clauses.is_empty() {
            return Ok(());
        }
        let google = json!({"subject": mapped.subject, "groups": mapped.groups});
        let attribute = serde_json::to_value(&mapped.attributes).unwrap_or_default();
        let vars = [("assertion", claims), ("google", &google), ("attribute", &attribute)];
        for (clause, program) in &self.clauses {
            let rejected =
                |detail: String| ProviderProblem::ConditionRejected { clause: truncate(clause, 300), detail };
            match self.run(program, &vars) {
                Ok(Value::Bool(true)) => {}
                Ok(Value::Bool(false)) => {
                    return Err(rejected("is false for this ServiceAccount's claims".into()));
                }
                Ok(other) => {
                    return Err(rejected(format!("evaluates to {}, not a bool", type_name(&other))));
                }
                Err(e) => return Err(rejected(format!("fails: {e}"))),
            }
        }
        Ok(())
    }
}

/// Evaluates an attribute mapping over `claims` (compiling it first).
pub fn map_attributes(
    mapping: &BTreeMap<String, String>,
    claims: &serde_json::Value,
) -> Result<Mapped, ProviderProblem> {
    Rules::compile(mapping, "").map(claims)
}

/// Evaluates an attribute condition (compiling it first).
pub fn check_condition(
    condition: &str,
    claims: &serde_json::Value,
    mapped: &Mapped,
) -> Result<(), ProviderProblem> {
    Rules::compile(&BTreeMap::new(), condition).condition(claims, mapped)
}

fn env() -> Result<Arc<Env>, String> {
    let mut env = Env::stdlib();
    // Google's attribute expressions use the string helpers (split, join, lowerAscii, ...) and `extract`.
    env.add_extension(cel::extensions::strings)
        .and_then(|()| {
            cel::add_member_overload!(env, fn extract: (cel::common::types::CelString, cel::common::types::CelString) -> cel::common::types::CelString)
        })
        .map_err(|e| format!("cannot be evaluated: the CEL string helpers are unavailable ({e})"))?;
    Ok(Arc::new(env))
}

/// Google's `extract`: the part of the string matched by `{name}` in a template such as
/// `'/users/{sub}'`; empty when the template's fixed parts are not found.
fn extract(
    this: &cel::common::types::CelString<'_>,
    template: &cel::common::types::CelString<'_>,
) -> cel::common::types::CelString<'static> {
    let (s, t) = (this.inner(), template.inner());
    let found = (|| {
        let (prefix, rest) = t.split_once('{')?;
        let (_, suffix) = rest.split_once('}')?;
        let start = s.find(prefix)? + prefix.len();
        let tail = &s[start..];
        let end = if suffix.is_empty() { tail.len() } else { tail.find(suffix)? };
        Some(tail[..end].to_string())
    })();
    found.unwrap_or_default().into()
}

/// Splits `a && (b || c) && d` into `a`, `(b || c)`, `d`, respecting parentheses, brackets and quotes.
fn top_level_clauses(expression: &str) -> Vec<&str> {
    let bytes = expression.as_bytes();
    let (mut depth, mut quote, mut start, mut i) = (0i32, None::<u8>, 0, 0);
    let mut clauses = Vec::new();
    while i < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(_) if b == b'\\' => i += 1,
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                b'&' if depth == 0 && bytes.get(i + 1) == Some(&b'&') => {
                    clauses.push(expression[start..i].trim());
                    start = i + 2;
                    i += 1;
                }
                _ => {}
            },
        }
        i += 1;
    }
    clauses.push(expression[start..].trim());
    clauses.retain(|c| !c.is_empty());
    clauses
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a bool",
        Value::Int(_) | Value::UInt(_) | Value::Float(_) => "a number",
        Value::String(_) => "a string",
        Value::List(_) => "a list",
        Value::Map(_) => "a map",
        _ => "another type",
    }
}

impl Plan {
    pub(super) fn provider_stage(
        &self,
        ksa: &Ksa,
        federation: &FederationPlan,
        facts: &Facts<'_>,
        token: Option<TokenClaims<'_>>,
    ) -> Result<Mapped, Finding> {
        let p = &federation.provider;
        let not_fetched = Err(FetchFailure::new(FailureKind::Unavailable, "not fetched"));
        let Some(provider_facts) = facts.provider else {
            return Err(Finding::from_fetch(
                Stage::Provider,
                &FetchFailure::new(FailureKind::Unavailable, "not fetched"),
                &format!("workload identity provider {p}"),
            ));
        };
        let cluster = facts.cluster.unwrap_or(&not_fetched);
        let issuer = cluster.as_ref().map(|c| c.issuer.as_str()).unwrap_or_default();
        let built;
        let (claims, kid) = match token {
            Some(t) => (t.claims, t.kid),
            None => {
                built =
                    claims_for(issuer, &federation.audience, &ksa.namespace, &ksa.name, &ksa.uid, facts.now);
                (&built, None)
            }
        };
        let who = format!("ServiceAccount {}/{}", ksa.namespace, ksa.name);
        let pool_name = &federation.pool;
        check(provider_facts, cluster, &federation.audience, claims, kid).map_err(|problem| match problem {
            ProviderProblem::Unreadable(f) => Finding::from_fetch(Stage::Provider, &f, &format!("workload identity provider {p}")),
            ProviderProblem::ClusterUnreadable(f) => {
                Finding::from_fetch(Stage::Provider, &f, "the cluster's issuer and signing keys")
            }
            ProviderProblem::NotFound { what: "pool" } => Finding::fail(Stage::Provider, Reason::ProviderNotFound, format!(
                "{who}: workload identity pool {pool_name} does not exist or is deleted, so every exchange is refused (invalid_target). Fix: gcloud iam workload-identity-pools undelete {} --location=global --project={}, or point identity.federation.provider at a live pool",
                federation.pool_id, federation.project_number
            )),
            ProviderProblem::NotFound { .. } => Finding::fail(Stage::Provider, Reason::ProviderNotFound, format!(
                "{who}: provider {p} does not exist or is deleted, so every exchange is refused (invalid_target). Fix: create or undelete it (gcloud iam workload-identity-pools providers undelete ...), or correct identity.federation.provider"
            )),
            ProviderProblem::ProviderDisabled => Finding::fail(Stage::Provider, Reason::ProviderDisabled, format!(
                "{who}: provider {p} is disabled, so new exchanges are refused (invalid_target). Fix: gcloud iam workload-identity-pools providers update-oidc {} --workload-identity-pool={} --location=global --project={} --no-disabled",
                p.rsplit('/').next().unwrap_or_default(), federation.pool_id, federation.project_number
            )),
            ProviderProblem::PoolDisabled => Finding::fail(Stage::Provider, Reason::PoolDisabled, format!(
                "{who}: pool {pool_name} is disabled, so exchanges are refused and issued tokens stop working. Fix: gcloud iam workload-identity-pools update {} --location=global --project={} --no-disabled",
                federation.pool_id, federation.project_number
            )),
            ProviderProblem::NotOidc => Finding::fail(Stage::Provider, Reason::IssuerMismatch, format!(
                "{who}: provider {p} is not an OIDC provider, so it cannot trust Kubernetes tokens. Fix: create an OIDC provider with --issuer-uri={issuer}"
            )),
            ProviderProblem::IssuerMismatch { provider, cluster } => Finding::fail(Stage::Provider, Reason::IssuerMismatch, format!(
                "{who}: provider {p} trusts issuer {} but the cluster's tokens carry iss {}, so Google answers \"The issuer in ID Token {cluster} does not match the expected one in config: {provider}\". Fix: gcloud iam workload-identity-pools providers update-oidc ... --issuer-uri={cluster}",
                quote(&provider), quote(&cluster)
            )),
            ProviderProblem::KeyNotTrusted { detail } => Finding::fail(Stage::Provider, Reason::SigningKeyNotTrusted, format!(
                "{who}: {detail}; tokens signed after a key rotation are refused (\"Error connecting to the given credential's issuer\"). Fix: kubectl get --raw /openid/v1/jwks > jwks.json && gcloud iam workload-identity-pools providers update-oidc ... --jwk-json-path=jwks.json"
            )),
            ProviderProblem::AudienceNotAllowed { audience, allowed } => Finding::fail(Stage::Provider, Reason::AudienceNotAllowed, format!(
                "{who}: its tokens carry audience {} but provider {p} accepts only {allowed:?}. Fix: set identity.federation.audience and the pods' token audience to one of them, or gcloud iam workload-identity-pools providers update-oidc ... --allowed-audiences={audience}",
                quote(&audience)
            )),
            ProviderProblem::MappingInvalid { attribute, detail } => Finding::fail(Stage::Provider, Reason::AttributeMappingInvalid, format!(
                "{who}: provider {p}'s attribute mapping for {attribute} {detail} for this ServiceAccount's token claims. Fix: correct --attribute-mapping on the provider (e.g. google.subject=assertion.sub)"
            )),
            ProviderProblem::SubjectTooLong { subject } => Finding::fail(Stage::Static, Reason::SubjectTooLong, format!(
                "{who}: the mapped google.subject {} is {} bytes, over Google's 127-byte limit, so every exchange is refused. Fix: shorten the namespace or ServiceAccount name, or map google.subject to something shorter (e.g. assertion['kubernetes.io']['serviceaccount']['uid'])",
                quote(&subject), subject.len()
            )),
            ProviderProblem::ConditionRejected { clause, detail } => Finding::fail(Stage::Provider, Reason::AttributeConditionRejected, format!(
                "{who}: provider {p}'s attribute condition clause {} {detail}, so Google answers \"The given credential is rejected by the attribute condition.\" Fix: widen the condition (gcloud iam workload-identity-pools providers update-oidc ... --attribute-condition=...) or move the workload to an admitted namespace",
                quote(&clause)
            )),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(pool: &Fetched<Pool>, provider: &Fetched<Provider>) -> ProviderFacts {
        ProviderFacts::new(pool.clone(), provider.clone())
    }
    use crate::engine::facts::{Jwk, Oidc};

    const PROVIDER: &str =
        "projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s";
    const ISSUER: &str = "https://127.0.0.1:6443";

    fn key(kid: &str, n: &str) -> Jwk {
        Jwk { kid: kid.into(), kty: "RSA".into(), n: n.into(), e: "AQAB".into(), ..Default::default() }
    }

    fn cluster() -> Result<ClusterIssuer, FetchFailure> {
        Ok(ClusterIssuer { issuer: ISSUER.into(), keys: vec![key("k1", "n1")] })
    }

    fn provider() -> Provider {
        Provider {
            name: PROVIDER.into(),
            state: State::Active,
            attribute_mapping: BTreeMap::from([
                ("google.subject".into(), "assertion.sub".into()),
                ("attribute.namespace".into(), "assertion['kubernetes.io']['namespace']".into()),
            ]),
            oidc: Some(Oidc {
                issuer_uri: ISSUER.into(),
                allowed_audiences: vec![],
                jwks_json: serde_json::to_string(&JwkSet { keys: vec![key("k1", "n1")] }).unwrap(),
            }),
            ..Default::default()
        }
    }

    fn pool() -> Fetched<Pool> {
        Ok(Some(Pool {
            name: "projects/123456789012/locations/global/workloadIdentityPools/onprem".into(),
            state: State::Active,
            disabled: false,
        }))
    }

    fn claims(ns: &str, name: &str) -> serde_json::Value {
        claims_for(ISSUER, &format!("//iam.googleapis.com/{PROVIDER}"), ns, name, "uid-1", 1_700_000_000)
    }

    fn run(provider: Provider, claims: &serde_json::Value) -> Result<Mapped, ProviderProblem> {
        check(
            &facts(&pool(), &Ok(Some(provider))),
            &cluster(),
            &format!("//iam.googleapis.com/{PROVIDER}"),
            claims,
            None,
        )
    }

    #[test]
    fn a_healthy_provider_maps_subject_and_attributes() {
        let mapped = run(provider(), &claims("checkout", "app")).unwrap();
        assert_eq!(mapped.subject, "system:serviceaccount:checkout:app");
        assert_eq!(mapped.attributes.get("namespace").map(String::as_str), Some("checkout"));
    }

    #[test]
    fn pool_and_provider_state() {
        let c = claims("a", "b");
        let aud = format!("//iam.googleapis.com/{PROVIDER}");
        let disabled_pool = Ok(Some(Pool { disabled: true, ..pool().unwrap().unwrap() }));
        assert_eq!(
            check(&facts(&disabled_pool, &Ok(Some(provider()))), &cluster(), &aud, &c, None),
            Err(ProviderProblem::PoolDisabled)
        );
        let deleted_pool = Ok(Some(Pool { state: State::Deleted, ..pool().unwrap().unwrap() }));
        assert_eq!(
            check(&facts(&deleted_pool, &Ok(Some(provider()))), &cluster(), &aud, &c, None),
            Err(ProviderProblem::NotFound { what: "pool" })
        );
        assert_eq!(
            check(&facts(&Ok(None), &Ok(Some(provider()))), &cluster(), &aud, &c, None),
            Err(ProviderProblem::NotFound { what: "pool" })
        );
        assert_eq!(
            check(&facts(&pool(), &Ok(None)), &cluster(), &aud, &c, None),
            Err(ProviderProblem::NotFound { what: "provider" })
        );
        let deleted = Provider { state: State::Deleted, ..provider() };
        assert_eq!(run(deleted, &c), Err(ProviderProblem::NotFound { what: "provider" }));
        assert_eq!(
            run(Provider { disabled: true, ..provider() }, &c),
            Err(ProviderProblem::ProviderDisabled)
        );
        assert_eq!(run(Provider { oidc: None, ..provider() }, &c), Err(ProviderProblem::NotOidc));
        let unreadable = Err(FetchFailure::new(crate::engine::facts::FailureKind::Unavailable, "503"));
        assert!(matches!(
            check(&facts(&unreadable, &Ok(Some(provider()))), &cluster(), &aud, &c, None),
            Err(ProviderProblem::Unreadable(_))
        ));
    }

    #[test]
    fn issuer_must_match_exactly() {
        let mut p = provider();
        if let Some(o) = p.oidc.as_mut() {
            o.issuer_uri = format!("{ISSUER}/");
        }
        assert!(matches!(run(p, &claims("a", "b")), Err(ProviderProblem::IssuerMismatch { .. })));
    }

    #[test]
    fn uploaded_keys_must_hold_the_signing_key_material() {
        let c = claims("a", "b");
        let with_keys = |keys: Vec<Jwk>| {
            let mut p = provider();
            if let Some(o) = p.oidc.as_mut() {
                o.jwks_json = serde_json::to_string(&JwkSet { keys }).unwrap();
            }
            p
        };
        assert!(matches!(
            run(with_keys(vec![key("k0", "n0")]), &c),
            Err(ProviderProblem::KeyNotTrusted { .. })
        ));
        assert!(matches!(
            run(with_keys(vec![key("k1", "other")]), &c),
            Err(ProviderProblem::KeyNotTrusted { .. })
        ));
        assert!(run(with_keys(vec![key("k0", "n0"), key("k1", "n1")]), &c).is_ok());
        let mut garbage = provider();
        if let Some(o) = garbage.oidc.as_mut() {
            o.jwks_json = "{not json".into();
        }
        assert!(matches!(run(garbage, &c), Err(ProviderProblem::KeyNotTrusted { .. })));
        // With a known signer only that key matters, even while the cluster still publishes an old one.
        let rotating =
            Ok(ClusterIssuer { issuer: ISSUER.into(), keys: vec![key("k0", "n0"), key("k1", "n1")] });
        let aud = format!("//iam.googleapis.com/{PROVIDER}");
        let only_new = Ok(Some(with_keys(vec![key("k1", "n1")])));
        assert!(check(&facts(&pool(), &only_new), &rotating, &aud, &c, Some("k1")).is_ok());
        assert!(check(&facts(&pool(), &only_new), &rotating, &aud, &c, None).is_err());
    }

    #[test]
    fn audiences_follow_the_default_rule_and_the_allow_list() {
        let c = claims("a", "b");
        let https = format!("https://iam.googleapis.com/{PROVIDER}");
        assert!(check(&facts(&pool(), &Ok(Some(provider()))), &cluster(), &https, &c, None).is_ok());
        let other = check(&facts(&pool(), &Ok(Some(provider()))), &cluster(), "sts.googleapis.com", &c, None);
        assert!(matches!(other, Err(ProviderProblem::AudienceNotAllowed { .. })));
        let mut listed = provider();
        if let Some(o) = listed.oidc.as_mut() {
            o.allowed_audiences = vec!["my-cluster".into()];
        }
        let default_now_refused =
            check(&facts(&pool(), &Ok(Some(listed.clone()))), &cluster(), &https, &c, None);
        assert!(matches!(default_now_refused, Err(ProviderProblem::AudienceNotAllowed { .. })));
        assert!(check(&facts(&pool(), &Ok(Some(listed))), &cluster(), "my-cluster", &c, None).is_ok());
    }

    #[test]
    fn mappings_are_evaluated_with_cel() {
        let c = claims("checkout", "app");
        let mapping =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        let m = map_attributes(
            &mapping(&[
                ("google.subject", "'k8s::' + assertion['kubernetes.io']['namespace'] + '::' + assertion['kubernetes.io']['serviceaccount']['name']"),
                ("attribute.ns_upper", "assertion['kubernetes.io']['namespace'].upperAscii()"),
                ("attribute.first", "assertion.sub.split(':')[2]"),
                ("attribute.extracted", "assertion.sub.extract('serviceaccount:{ns}:')"),
                ("google.groups", "['payments', assertion['kubernetes.io']['namespace']]"),
            ]),
            &c,
        )
        .unwrap();
        assert_eq!(m.subject, "k8s::checkout::app");
        assert_eq!(m.attributes["ns_upper"], "CHECKOUT");
        assert_eq!(m.attributes["first"], "checkout");
        assert_eq!(m.attributes["extracted"], "checkout");
        assert_eq!(m.groups, vec!["payments".to_string(), "checkout".to_string()]);

        for (bad, attribute) in [
            (mapping(&[("attribute.namespace", "assertion.sub")]), "google.subject"),
            (mapping(&[("google.subject", "assertion.missing_claim")]), "google.subject"),
            (mapping(&[("google.subject", "assertion.iat")]), "google.subject"),
            (
                mapping(&[("google.subject", "assertion.sub"), ("attribute.x", "assertion.sub +")]),
                "attribute.x",
            ),
        ] {
            match map_attributes(&bad, &c) {
                Err(ProviderProblem::MappingInvalid { attribute: a, .. }) => assert_eq!(a, attribute),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn long_subjects_are_caught_before_google_refuses_them() {
        let long_ns = "n".repeat(63);
        let long_name = "s".repeat(60);
        assert!(matches!(
            run(provider(), &claims(&long_ns, &long_name)),
            Err(ProviderProblem::SubjectTooLong { .. })
        ));
        // 22 + 63 + 1 + 41 = 127 bytes: exactly at the limit passes.
        assert!(run(provider(), &claims(&long_ns, &"s".repeat(41))).is_ok());
    }

    #[test]
    fn the_condition_names_the_clause_that_rejects() {
        let mut p = provider();
        p.attribute_condition =
            "assertion.iss == 'https://127.0.0.1:6443' && assertion['kubernetes.io']['namespace'] in ['billing', 'ledger'] && attribute.namespace != ''".into();
        assert!(run(p.clone(), &claims("billing", "app")).is_ok());
        assert!(run(p.clone(), &claims("ledger", "app")).is_ok());
        match run(p, &claims("checkout", "app")) {
            Err(ProviderProblem::ConditionRejected { clause, .. }) => {
                assert_eq!(clause, "assertion['kubernetes.io']['namespace'] in ['billing', 'ledger']");
            }
            other => panic!("{other:?}"),
        }
        let mut bad = provider();
        bad.attribute_condition = "assertion.sub".into();
        assert!(matches!(run(bad, &claims("a", "b")), Err(ProviderProblem::ConditionRejected { .. })));
        let mut grouped = provider();
        grouped.attribute_condition =
            "(google.subject.startsWith('system:') || false) && 'x && y' == \"x && y\"".into();
        assert_eq!(top_level_clauses(&grouped.attribute_condition).len(), 2);
        assert!(run(grouped, &claims("a", "b")).is_ok());
    }
}
