//! What a federated token can do: IAM Credentials `generateAccessToken` and `generateIdToken`, and
//! `testIamPermissions` on targets (projects, service accounts, buckets, secrets, topics,
//! subscriptions, Cloud Run services).

use std::time::Duration;

use axum::{
    Json,
    body::Bytes,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Fake, Shared, bearer, errors,
    tokens::{Issued, pool_allows},
};

/// Roles holding `iam.serviceAccounts.getAccessToken`.
const ACCESS_TOKEN_ROLES: [&str; 2] =
    ["roles/iam.workloadIdentityUser", "roles/iam.serviceAccountTokenCreator"];
/// Roles holding `iam.serviceAccounts.getOpenIdToken`.
const ID_TOKEN_ROLES: [&str; 3] = [
    "roles/iam.workloadIdentityUser",
    "roles/iam.serviceAccountTokenCreator",
    "roles/iam.serviceAccountOpenIdTokenCreator",
];

/// The caller behind a bearer token, or the 401 Google would give.
pub(crate) fn caller(fake: &Fake, headers: &HeaderMap, service: &str) -> Result<Issued, Response> {
    let Some(token) = bearer(headers) else {
        return Err(errors::unauthenticated("CREDENTIALS_MISSING", service));
    };
    match fake.tokens.lookup(token) {
        Some(Issued::Federated { pool, .. }) if !pool_allows(&fake.scenario(), &pool) => {
            Err(errors::unauthenticated("ACCESS_TOKEN_EXPIRED", service))
        }
        Some(issued) => Ok(issued),
        None => Err(errors::unauthenticated("ACCESS_TOKEN_EXPIRED", service)),
    }
}

/// `POST /iamcredentials/v1/projects/-/serviceAccounts/EMAIL:METHOD`.
pub(crate) async fn service_account_credentials(
    State(fake): State<Shared>,
    Path((project, account)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match account.rsplit_once(':') {
        Some((email, "generateAccessToken")) => {
            generate_access_token(&fake, &project, email, &headers, &body).await
        }
        Some((email, "generateIdToken")) => generate_id_token(&fake, &project, email, &headers, &body).await,
        _ => errors::not_found(),
    }
}

/// May the bearer of `headers` act as `email` with `permission` (held by `roles`)? A federated
/// principal or a service account needs an unconditional binding of one of `roles` on `email`
/// (a service account as `serviceAccount:CALLER`), and no deny policy.
fn impersonate(
    fake: &Fake,
    headers: &HeaderMap,
    email: &str,
    permission: &str,
    roles: &[&str],
) -> Result<(), Response> {
    let members = match caller(fake, headers, "iamcredentials")? {
        Issued::Federated { principal, .. } => principal.members(),
        Issued::ServiceAccount { email } => vec![format!("serviceAccount:{email}")],
    };
    let scenario = fake.scenario();
    // With `-` for the project a missing account reads as a permission problem (google-wif.md §4.3).
    let Some(sa) = scenario.service_account(email) else {
        return Err(errors::permission_denied(permission));
    };
    if sa.disabled {
        return Err(errors::envelope(
            StatusCode::BAD_REQUEST,
            "FAILED_PRECONDITION",
            &format!("Service account {email} is disabled."),
            None,
        ));
    }
    let denied = members.iter().any(|m| sa.denied_principals.contains(m));
    let bound = sa
        .bindings
        .iter()
        .filter(|b| roles.contains(&b.role.as_str()) && b.condition.is_none())
        .any(|b| b.members.iter().any(|m| members.contains(m)));
    if denied || !bound {
        return Err(errors::permission_denied(permission));
    }
    Ok(())
}

fn project_is_wildcard(project: &str) -> Result<(), Response> {
    if project == "-" {
        Ok(())
    } else {
        Err(errors::invalid_argument(
            "The project must be \"-\": projects/-/serviceAccounts/{ACCOUNT_EMAIL_OR_UNIQUEID}.",
        ))
    }
}

/// `generateAccessToken`.
async fn generate_access_token(
    fake: &Fake,
    project: &str,
    email: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if let Err(r) = fake.begin("iamcredentials.generateAccessToken").await {
        return r;
    }
    if let Err(r) = project_is_wildcard(project) {
        return r;
    }
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    if request["scope"].as_array().is_none_or(Vec::is_empty) {
        return errors::invalid_argument("At least one scope must be specified.");
    }
    let lifetime = match request["lifetime"].as_str().map(|l| l.trim_end_matches('s').parse::<u64>()) {
        None => 3600,
        Some(Ok(0)) => return errors::invalid_argument("Lifetime of access token must be larger then zero."),
        Some(Ok(l)) if l > 3600 => {
            return errors::invalid_argument(
                "can not have lifetimes of more than 1 hour. Use the Org Policy Constraint constraints/iam.allowServiceAccountCredentialLifetimeExtension to allow up to 12 hours.",
            );
        }
        Some(Ok(l)) => l,
        Some(Err(_)) => return errors::invalid_argument("Invalid value at 'lifetime'."),
    };
    if let Err(r) =
        impersonate(fake, headers, email, "iam.serviceAccounts.getAccessToken", &ACCESS_TOKEN_ROLES)
    {
        return r;
    }
    let token = fake.mint_access_token(email, Duration::from_secs(lifetime));
    // Whole seconds: google-auth-python parses "%Y-%m-%dT%H:%M:%SZ".
    let expires = jiff::Timestamp::now().as_second() + i64::try_from(lifetime).unwrap_or(3600);
    let expire_time = jiff::Timestamp::from_second(expires).map(|t| t.to_string()).unwrap_or_default();
    Json(json!({"accessToken": token, "expireTime": expire_time})).into_response()
}

/// `generateIdToken` `{"audience": A, "includeEmail": bool}` → `{"token": JWT}`.
async fn generate_id_token(
    fake: &Fake,
    project: &str,
    email: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    if let Err(r) = fake.begin("iamcredentials.generateIdToken").await {
        return r;
    }
    if let Err(r) = project_is_wildcard(project) {
        return r;
    }
    let request: Value = serde_json::from_slice(body).unwrap_or_default();
    let audience = request["audience"].as_str().unwrap_or_default().trim();
    if audience.is_empty() {
        return errors::invalid_argument("Request contains an invalid argument.");
    }
    let include_email = request["includeEmail"].as_bool().unwrap_or(false);
    if let Err(r) = impersonate(fake, headers, email, "iam.serviceAccounts.getOpenIdToken", &ID_TOKEN_ROLES) {
        return r;
    }
    match fake.mint_id_token(email, audience, include_email) {
        Ok(token) => Json(json!({"token": token})).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "minting an ID token");
            errors::envelope(
                StatusCode::INTERNAL_SERVER_ERROR,
                "INTERNAL",
                "Internal error encountered.",
                None,
            )
        }
    }
}

/// The permissions the caller holds on `resource`, of those `requested`.
pub(crate) fn test(
    fake: &Fake,
    service: &str,
    resource: &str,
    headers: &HeaderMap,
    requested: Vec<String>,
) -> Result<Vec<String>, Response> {
    let scenario = fake.scenario();
    let held: Vec<String> = match caller(fake, headers, service)? {
        Issued::ServiceAccount { email } => scenario
            .service_account(&email)
            .and_then(|sa| sa.grants.get(resource).cloned())
            .unwrap_or_default(),
        Issued::Federated { principal, .. } => {
            if scenario.federated_token_unsupported.iter().any(|s| s == service) {
                return Err(errors::envelope(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHENTICATED",
                    errors::INVALID_CREDENTIALS,
                    None,
                ));
            }
            let members = principal.members();
            scenario
                .direct_grants
                .iter()
                .filter(|g| g.resource == resource && members.contains(&g.member))
                .flat_map(|g| g.permissions.clone())
                .collect()
        }
    };
    Ok(requested.into_iter().filter(|p| held.contains(p)).collect())
}

pub(crate) fn permissions_body(body: &[u8]) -> Vec<String> {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| {
            v["permissions"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
        })
        .unwrap_or_default()
}

pub(crate) fn answer(result: Result<Vec<String>, Response>) -> Response {
    match result {
        Ok(p) if p.is_empty() => Json(json!({})).into_response(),
        Ok(p) => Json(json!({"permissions": p})).into_response(),
        Err(r) => r,
    }
}

/// `POST .../{resource}:testIamPermissions` for the services that take a JSON body.
pub(crate) async fn test_resource(
    fake: &Fake,
    service: &'static str,
    resource: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let api = format!("{service}.testIamPermissions");
    if let Err(r) = fake.begin(&api).await {
        return r;
    }
    answer(test(fake, service, &resource, headers, permissions_body(body)))
}

/// `GET /storage/storage/v1/b/BUCKET/iam/testPermissions?permissions=...`.
pub(crate) async fn storage_test(
    State(fake): State<Shared>,
    Path(bucket): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = fake.begin("storage.testIamPermissions").await {
        return r;
    }
    let requested = query.into_iter().filter(|(k, _)| k == "permissions").map(|(_, v)| v).collect();
    let resource = format!("//storage.googleapis.com/projects/_/buckets/{bucket}");
    match test(&fake, "storage", &resource, &headers, requested) {
        Ok(p) => {
            Json(json!({"kind": "storage#testIamPermissionsResponse", "permissions": p})).into_response()
        }
        Err(r) => r,
    }
}

/// `POST /secretmanager/v1/projects/P/secrets/S:testIamPermissions`.
pub(crate) async fn secret_test(
    State(fake): State<Shared>,
    Path((project, secret)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(secret) = secret.strip_suffix(":testIamPermissions") else { return errors::not_found() };
    test_resource(
        &fake,
        "secretmanager",
        format!("//secretmanager.googleapis.com/projects/{project}/secrets/{secret}"),
        &headers,
        &body,
    )
    .await
}

/// `POST /pubsub/v1/projects/P/{topics|subscriptions}/N:testIamPermissions`.
pub(crate) async fn pubsub_test(
    State(fake): State<Shared>,
    Path((project, kind, name)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(name) = name.strip_suffix(":testIamPermissions") else { return errors::not_found() };
    if kind != "topics" && kind != "subscriptions" {
        return errors::not_found();
    }
    test_resource(
        &fake,
        "pubsub",
        format!("//pubsub.googleapis.com/projects/{project}/{kind}/{name}"),
        &headers,
        &body,
    )
    .await
}

/// `POST /cloudresourcemanager/v1/projects/P:testIamPermissions`.
pub(crate) async fn project_test(
    State(fake): State<Shared>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(project) = project.strip_suffix(":testIamPermissions") else { return errors::not_found() };
    test_resource(
        &fake,
        "cloudresourcemanager",
        format!("//cloudresourcemanager.googleapis.com/projects/{project}"),
        &headers,
        &body,
    )
    .await
}
