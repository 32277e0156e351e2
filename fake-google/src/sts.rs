//! STS `v1/token` (workload identity pools) and securetoken `v1/identitybindingtoken` (GKE), with the
//! error bodies of google-wif.md §1.5. Strings marked UNCONFIRMED there are the fake's best guess.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Shared,
    errors::sts_error,
    google_now,
    scenario::{LifeState, Provider, Scenario},
    tokens::{Issued, Principal},
    verify::{self, Rejection},
};

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const INVALID_TARGET: &str = "The target service indicated by the \"audience\" parameters is invalid. This might either be because the pool or provider is disabled or deleted or because it doesn't exist.";
const CONNECTING: &str = "Error connecting to the given credential's issuer.";
/// Google tolerates about this much clock difference on `iat` and `exp`.
const SKEW_TOLERANCE: i64 = 60;

/// The request fields, whichever encoding and spelling they came in.
fn fields(headers: &HeaderMap, body: &[u8]) -> BTreeMap<String, String> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/json"));
    let raw: Vec<(String, String)> = if json {
        serde_json::from_slice::<BTreeMap<String, Value>>(body)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k, s.to_string())))
            .collect()
    } else {
        url::form_urlencoded::parse(body).into_owned().collect()
    };
    // camelCase and snake_case alike.
    raw.into_iter()
        .map(|(k, v)| {
            (
                k.chars()
                    .flat_map(|c| {
                        if c.is_ascii_uppercase() { vec!['_', c.to_ascii_lowercase()] } else { vec![c] }
                    })
                    .collect(),
                v,
            )
        })
        .collect()
}

fn bad(error: &str, description: &str) -> Response {
    sts_error(StatusCode::BAD_REQUEST, error, description)
}

fn granted(token: String, lifetime: i64) -> Response {
    Json(json!({"access_token": token, "issued_token_type": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": lifetime})).into_response()
}

/// Checks the request envelope common to both endpoints.
fn envelope(f: &BTreeMap<String, String>) -> Result<(), Response> {
    let get = |k: &str| f.get(k).map(String::as_str).unwrap_or_default();
    if get("grant_type") != TOKEN_EXCHANGE {
        return Err(bad("invalid_request", "Invalid value for grant_type."));
    }
    if !matches!(
        get("requested_token_type"),
        ACCESS_TOKEN | "urn:ietf:params:oauth:token-type:access_boundary_intermediate_token"
    ) {
        return Err(bad("invalid_request", "Invalid value of requested_token_type in request."));
    }
    if get("scope").trim().is_empty() {
        return Err(bad("invalid_request", "Scope(s) must be provided."));
    }
    if !matches!(
        get("subject_token_type"),
        "urn:ietf:params:oauth:token-type:jwt" | "urn:ietf:params:oauth:token-type:id_token"
    ) {
        return Err(bad("invalid_request", "Invalid value for subject_token_type."));
    }
    Ok(())
}

/// Verifies a KSA token: keys, signature, issuer, audience and times. Returns its claims.
async fn verified(
    fake: &crate::Fake,
    scenario: &Scenario,
    token: &str,
    uploaded_jwks: &str,
    expected_issuer: &str,
    audience_ok: impl Fn(&str) -> bool,
) -> Result<Value, Response> {
    fake.tokens.witness(token);
    let Some((_, _, claims)) = verify::peek(token) else {
        return Err(bad("invalid_grant", "Unable to parse the ID Token."));
    };
    let keys = if uploaded_jwks.is_empty() {
        fake.keys.of_issuer(claims["iss"].as_str().unwrap_or_default(), &scenario.clusters).await
    } else {
        serde_json::from_str(uploaded_jwks).ok()
    };
    let keys = keys.ok_or_else(|| bad("invalid_grant", CONNECTING))?;
    match verify::signature(token, &keys) {
        Ok(()) => {}
        Err(Rejection::Issuer) => return Err(bad("invalid_grant", CONNECTING)),
        Err(Rejection::Signature) => {
            return Err(bad("invalid_grant", "Unable to verify the ID Token signature."));
        }
    }
    let iss = claims["iss"].as_str().map_or_else(|| "null".to_string(), str::to_string);
    if iss != expected_issuer {
        return Err(bad(
            "invalid_grant",
            &format!(
                "The issuer in ID Token {iss} does not match the expected one in config: {expected_issuer}"
            ),
        ));
    }
    let auds: Vec<String> = match &claims["aud"] {
        Value::String(a) => vec![a.clone()],
        Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
        _ => vec![],
    };
    if !auds.iter().any(|a| audience_ok(a)) {
        return Err(bad(
            "invalid_grant",
            &format!("The audience in ID Token [{}] does not match the expected audience.", auds.join(", ")),
        ));
    }
    let now = google_now(scenario);
    let (iat, exp) = (claims["iat"].as_i64(), claims["exp"].as_i64());
    let fresh =
        matches!((iat, exp), (Some(i), Some(e)) if i <= now + SKEW_TOLERANCE && e >= now - SKEW_TOLERANCE);
    if !fresh {
        let shown = iat.map_or_else(|| "null".to_string(), |i| i.to_string());
        return Err(bad("invalid_grant", &format!("ID Token issued at {shown} is stale to sign-in.")));
    }
    Ok(claims)
}

fn lifetime(claims: &Value, scenario: &Scenario) -> i64 {
    (claims["exp"].as_i64().unwrap_or_default() - google_now(scenario)).clamp(1, 3600)
}

/// `POST /sts/v1/token`.
pub(crate) async fn token(State(fake): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = fake.begin("sts.token").await {
        return r;
    }
    let f = fields(&headers, &body);
    if let Err(r) = envelope(&f) {
        return r;
    }
    let audience = f.get("audience").cloned().unwrap_or_default();
    let Some((pool_name, provider_id)) = audience
        .strip_prefix("//iam.googleapis.com/")
        .and_then(|r| r.split_once("/providers/"))
        .filter(|(pool, id)| {
            pool.starts_with("projects/") && pool.contains("/workloadIdentityPools/") && !id.is_empty()
        })
    else {
        return bad(
            "invalid_request",
            "Invalid value for \"audience\". This value should be the full resource name of the Identity Provider. See https://cloud.google.com/iam/docs/reference/sts/rest/v1/TopLevel/token for the list of possible formats.",
        );
    };
    let scenario = fake.scenario();
    let Some(pool) = scenario.pool(pool_name).filter(|p| !p.disabled && p.state == LifeState::Active) else {
        return bad("invalid_target", INVALID_TARGET);
    };
    let Some(provider) =
        pool.providers.iter().find(|p| p.id == provider_id && !p.disabled && p.state == LifeState::Active)
    else {
        return bad("invalid_target", INVALID_TARGET);
    };
    let subject_token = f.get("subject_token").cloned().unwrap_or_default();
    let defaults = [
        format!("//iam.googleapis.com/{pool_name}/providers/{provider_id}"),
        format!("https://iam.googleapis.com/{pool_name}/providers/{provider_id}"),
    ];
    let allowed = |aud: &str| {
        if provider.allowed_audiences.is_empty() {
            defaults.iter().any(|d| d == aud)
        } else {
            provider.allowed_audiences.iter().any(|a| a == aud)
        }
    };
    let claims =
        match verified(&fake, &scenario, &subject_token, &provider.jwks_json, &provider.issuer_uri, allowed)
            .await
        {
            Ok(c) => c,
            Err(r) => return r,
        };
    let principal = match map(provider, pool_name, &claims) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let token = fake
        .tokens
        .issue(Issued::Federated { principal, pool: pool_name.to_string() }, Duration::from_secs(3600));
    granted(token, lifetime(&claims, &scenario))
}

/// Applies the provider's attribute mapping and condition to the claims.
fn map(provider: &Provider, pool_name: &str, claims: &Value) -> Result<Principal, Response> {
    let assertion = [("assertion", claims)];
    let Some(subject_expr) = provider.attribute_mapping.get("google.subject") else {
        return Err(bad("invalid_request", "The attribute mapping does not map google.subject."));
    };
    let subject = match cel_eval(subject_expr, &assertion) {
        Ok(Value::String(s)) => s,
        _ => {
            return Err(bad(
                "invalid_request",
                "The mapped attribute google.subject could not be evaluated.",
            ));
        }
    };
    if subject.len() > 127 {
        return Err(bad(
            "invalid_request",
            "The size of mapped attribute google.subject exceeds the 127 bytes limit. Either modify your attribute mapping or the incoming assertion to produce a mapped attribute that is less than 127 bytes.",
        ));
    }
    let mut attributes = BTreeMap::new();
    let mut groups = vec![];
    for (key, expr) in &provider.attribute_mapping {
        match (key.strip_prefix("attribute."), key.as_str(), cel_eval(expr, &assertion)) {
            (Some(name), _, Ok(Value::String(v))) => {
                attributes.insert(name.to_string(), v);
            }
            (None, "google.groups", Ok(Value::Array(g))) => {
                groups = g.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
            }
            (None, "google.subject", _) => {}
            _ => {
                return Err(bad(
                    "invalid_request",
                    &format!("The mapped attribute {key} could not be evaluated."),
                ));
            }
        }
    }
    if !provider.attribute_condition.trim().is_empty() {
        let google = json!({"subject": subject, "groups": groups});
        let attribute = json!(attributes);
        let vars = [("assertion", claims), ("google", &google), ("attribute", &attribute)];
        if cel_eval(&provider.attribute_condition, &vars) != Ok(Value::Bool(true)) {
            return Err(sts_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "The given credential is rejected by the attribute condition.",
            ));
        }
    }
    let (project_number, pool_id) = pool_name
        .strip_prefix("projects/")
        .and_then(|r| r.split_once("/locations/global/workloadIdentityPools/"))
        .map(|(n, p)| (n.to_string(), p.to_string()))
        .unwrap_or_default();
    Ok(Principal::Pool { project_number, pool_id, subject, attributes, groups })
}

/// Evaluates a CEL expression over JSON variables, with the standard library and string helpers.
fn cel_eval(expression: &str, vars: &[(&str, &Value)]) -> Result<Value, String> {
    let mut env = cel::Env::stdlib();
    env.add_extension(cel::extensions::strings).map_err(|e| e.to_string())?;
    let env = Arc::new(env);
    let program = env.compile(expression).map_err(|e| e.to_string())?;
    let mut context = cel::Context::with_env(env);
    for (name, value) in vars {
        context.add_variable_from_value(*name, cel::to_value(value).map_err(|e| e.to_string())?);
    }
    program.execute(&context).map_err(|e| e.to_string())?.json().map_err(|e| e.to_string())
}

/// `POST /securetoken/v1/identitybindingtoken`: a GKE KSA token for a federated token of the
/// project's `PROJECT.svc.id.goog` pool.
pub(crate) async fn identity_binding_token(
    State(fake): State<Shared>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(r) = fake.begin("securetoken.identitybindingtoken").await {
        return r;
    }
    let f = fields(&headers, &body);
    if let Err(r) = envelope(&f) {
        return r;
    }
    let audience = f.get("audience").cloned().unwrap_or_default();
    let Some((trust_domain, cluster_url)) =
        audience.strip_prefix("identitynamespace:").and_then(|r| r.split_once(':'))
    else {
        return bad("invalid_request", "Invalid value for \"audience\".");
    };
    let scenario = fake.scenario();
    let project = scenario.gke.iter().find(|p| format!("{}.svc.id.goog", p.project_id) == trust_domain);
    let Some((project, cluster)) =
        project.and_then(|p| p.clusters.iter().find(|c| c.url == cluster_url).map(|c| (p, c)))
    else {
        return bad("invalid_target", INVALID_TARGET);
    };
    let subject_token = f.get("subject_token").cloned().unwrap_or_default();
    let claims = match verified(&fake, &scenario, &subject_token, "", &cluster.issuer, |aud| {
        aud == trust_domain
    })
    .await
    {
        Ok(c) => c,
        Err(r) => return r,
    };
    let k8s = &claims["kubernetes.io"];
    let principal = Principal::Gke {
        project_id: project.project_id.clone(),
        project_number: project.project_number.clone(),
        namespace: k8s["namespace"].as_str().unwrap_or_default().to_string(),
        name: k8s["serviceaccount"]["name"].as_str().unwrap_or_default().to_string(),
        uid: k8s["serviceaccount"]["uid"].as_str().unwrap_or_default().to_string(),
        cluster: cluster.url.clone(),
    };
    let token =
        fake.tokens.issue(Issued::Federated { principal, pool: String::new() }, Duration::from_secs(3600));
    granted(token, lifetime(&claims, &scenario))
}
