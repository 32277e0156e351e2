//! IAM v1: `serviceAccounts.get`, `serviceAccounts.getIamPolicy`, pools and providers `get`.

use std::collections::BTreeMap;

use axum::{
    Json,
    extract::{Path, Query, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Fake, Shared, bearer, errors,
    scenario::{Binding, LifeState, ServiceAccount, fnv},
};

/// The operator's own credentials and permissions, as Google would judge them.
pub(crate) fn operator_may(fake: &Fake, headers: &HeaderMap, permission: &str) -> Result<(), Response> {
    if !operator_holds(fake, headers, "iam")?.iter().any(|p| p == permission) {
        return Err(errors::permission_denied(permission));
    }
    Ok(())
}

/// The permissions of the operator, or the 401 `service` gives a request without its token.
pub(crate) fn operator_holds(
    fake: &Fake,
    headers: &HeaderMap,
    service: &str,
) -> Result<Vec<String>, Response> {
    let Some(token) = bearer(headers) else {
        return Err(errors::unauthenticated("CREDENTIALS_MISSING", service));
    };
    let scenario = fake.scenario();
    if !scenario.operator.tokens.is_empty() && !scenario.operator.tokens.iter().any(|t| t == token) {
        return Err(errors::unauthenticated("ACCESS_TOKEN_EXPIRED", service));
    }
    Ok(scenario.operator.permissions)
}

fn account_json(sa: &ServiceAccount) -> Value {
    let mut v = json!({
        "name": format!("projects/{}/serviceAccounts/{}", sa.project(), sa.email),
        "projectId": sa.project(),
        "uniqueId": sa.unique_id(),
        "email": sa.email,
        "etag": "MDEwMjE5MjA=",
        "oauth2ClientId": sa.unique_id(),
    });
    // proto3 JSON omits false booleans.
    if sa.disabled {
        v["disabled"] = json!(true);
    }
    v
}

fn find<'a>(accounts: &'a [ServiceAccount], id: &str) -> Option<&'a ServiceAccount> {
    accounts.iter().find(|s| s.email == id || s.unique_id() == id)
}

pub(crate) async fn get_service_account(
    State(fake): State<Shared>,
    Path((project, account)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = fake.begin("iam.serviceAccounts.get").await {
        return r;
    }
    if let Err(r) = operator_may(&fake, &headers, "iam.serviceAccounts.get") {
        return r;
    }
    let scenario = fake.scenario();
    match find(&scenario.service_accounts, &account) {
        Some(sa) if project == "-" || project == sa.project() => Json(account_json(sa)).into_response(),
        // With the `-` wildcard a missing account reads as a permission problem (google-wif.md §4.3).
        None if project == "-" => errors::permission_denied("iam.serviceAccounts.get"),
        _ => errors::unknown_service_account(),
    }
}

/// `POST .../serviceAccounts/EMAIL:METHOD`.
pub(crate) async fn service_account_method(
    State(fake): State<Shared>,
    Path((project, account)): Path<(String, String)>,
    Query(query): Query<BTreeMap<String, String>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    match account.rsplit_once(':') {
        Some((email, "getIamPolicy")) => {
            get_iam_policy(&fake, &project, email, &query, &headers, &body).await
        }
        _ => errors::not_found(),
    }
}

async fn get_iam_policy(
    fake: &Fake,
    _project: &str,
    email: &str,
    query: &BTreeMap<String, String>,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if let Err(r) = fake.begin("iam.getIamPolicy").await {
        return r;
    }
    if let Err(r) = operator_may(fake, headers, "iam.serviceAccounts.getIamPolicy") {
        return r;
    }
    // Options travel in the query; the body must be empty (an empty object is tolerated).
    let trimmed = String::from_utf8_lossy(body);
    if !trimmed.trim().is_empty() && trimmed.trim() != "{}" {
        return errors::invalid_argument(
            "Invalid JSON payload received. getIamPolicy takes its options in the query string.",
        );
    }
    let requested = match query.get("options.requestedPolicyVersion").map(|v| v.parse::<i32>()) {
        None => 0,
        Some(Ok(v @ (0 | 1 | 3))) => v,
        Some(_) => {
            return errors::invalid_argument("Invalid requestedPolicyVersion. Valid values are 0, 1 and 3.");
        }
    };
    let scenario = fake.scenario();
    let Some(sa) = find(&scenario.service_accounts, email) else {
        return errors::permission_denied("iam.serviceAccounts.getIamPolicy");
    };
    let conditional = sa.bindings.iter().any(|b| b.condition.is_some());
    let version = if conditional && requested == 3 { 3 } else { 1 };
    let bindings: Vec<Value> = sa.bindings.iter().map(|b| binding_json(b, version)).collect();
    let mut policy = json!({"version": version, "etag": sa.etag()});
    if !bindings.is_empty() {
        policy["bindings"] = json!(bindings);
    }
    Json(policy).into_response()
}

/// A binding as Google renders it; below version 3 a conditional role is suffixed `_withcond_…`.
fn binding_json(b: &Binding, version: i32) -> Value {
    match (&b.condition, version) {
        (Some(c), 3) => {
            json!({"role": b.role, "members": b.members, "condition": {"title": c.title, "expression": c.expression}})
        }
        (Some(c), _) => {
            json!({"role": format!("{}_withcond_{:016x}", b.role, fnv(c.expression.as_bytes())), "members": b.members})
        }
        (None, _) => json!({"role": b.role, "members": b.members}),
    }
}

pub(crate) async fn get_pool(
    State(fake): State<Shared>,
    Path((number, pool)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = fake.begin("iam.workloadIdentityPools.get").await {
        return r;
    }
    if let Err(r) = operator_may(&fake, &headers, "iam.workloadIdentityPools.get") {
        return r;
    }
    let name = format!("projects/{number}/locations/global/workloadIdentityPools/{pool}");
    match fake.scenario().pool(&name) {
        Some(p) => {
            let mut v = json!({"name": p.name, "state": state(p.state), "mode": "FEDERATION_ONLY"});
            if p.disabled {
                v["disabled"] = json!(true);
            }
            Json(v).into_response()
        }
        None => errors::not_found(),
    }
}

pub(crate) async fn get_provider(
    State(fake): State<Shared>,
    Path((number, pool, provider)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = fake.begin("iam.providers.get").await {
        return r;
    }
    if let Err(r) = operator_may(&fake, &headers, "iam.workloadIdentityPoolProviders.get") {
        return r;
    }
    let pool_name = format!("projects/{number}/locations/global/workloadIdentityPools/{pool}");
    let scenario = fake.scenario();
    let Some(p) = scenario.pool(&pool_name).and_then(|p| p.providers.iter().find(|x| x.id == provider))
    else {
        return errors::not_found();
    };
    let mut oidc = json!({"issuerUri": p.issuer_uri});
    if !p.allowed_audiences.is_empty() {
        oidc["allowedAudiences"] = json!(p.allowed_audiences);
    }
    if !p.jwks_json.is_empty() {
        oidc["jwksJson"] = json!(p.jwks_json);
    }
    let mut v = json!({
        "name": format!("{pool_name}/providers/{}", p.id),
        "state": state(p.state),
        "attributeMapping": p.attribute_mapping,
        "oidc": oidc,
    });
    if p.disabled {
        v["disabled"] = json!(true);
    }
    if !p.attribute_condition.is_empty() {
        v["attributeCondition"] = json!(p.attribute_condition);
    }
    Json(v).into_response()
}

fn state(s: LifeState) -> &'static str {
    match s {
        LifeState::Active => "ACTIVE",
        LifeState::Deleted => "DELETED",
    }
}
