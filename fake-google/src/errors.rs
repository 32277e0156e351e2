//! Google's error bodies, verbatim from google-wif.md (§1.5, §4.4, §5, §8, Appendix A).

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

/// The message Google sends with most 401s.
pub const INVALID_CREDENTIALS: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";

/// `{"error":{"code","message","status"[,"details"]}}`.
pub fn envelope(code: StatusCode, status: &str, message: &str, details: Option<Value>) -> Response {
    let mut error = json!({"code": code.as_u16(), "message": message, "status": status});
    if let Some(details) = details {
        error["details"] = details;
    }
    (code, Json(json!({ "error": error }))).into_response()
}

/// 403 `IAM_PERMISSION_DENIED` for `permission`.
pub fn permission_denied(permission: &str) -> Response {
    envelope(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        &format!("Permission '{permission}' denied on resource (or it may not exist)."),
        Some(json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com",
            "metadata": {"permission": permission}
        }])),
    )
}

/// 403 in Cloud Run's wording, which names the resource:
/// `Permission 'run.services.get' denied on resource 'projects/P/locations/L/services/S' (or resource may not exist).`
pub fn permission_denied_on(permission: &str, resource: &str) -> Response {
    envelope(
        StatusCode::FORBIDDEN,
        "PERMISSION_DENIED",
        &format!("Permission '{permission}' denied on resource '{resource}' (or resource may not exist)."),
        Some(json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com",
            "metadata": {"permission": permission}
        }])),
    )
}

/// Cloud Run's 404 for a service that does not exist (gcloud shows it as
/// `NOT_FOUND: Resource 'S' of kind 'SERVICE' in region 'L' in project 'P' does not exist.`).
pub fn run_service_not_found(project: &str, region: &str, service: &str) -> Response {
    envelope(
        StatusCode::NOT_FOUND,
        "NOT_FOUND",
        &format!(
            "Resource '{service}' of kind 'SERVICE' in region '{region}' in project '{project}' does not exist."
        ),
        None,
    )
}

/// 401 with an ErrorInfo reason (`ACCESS_TOKEN_EXPIRED`, `ACCESS_TOKEN_TYPE_UNSUPPORTED`, `CREDENTIALS_MISSING`).
pub fn unauthenticated(reason: &str, service: &str) -> Response {
    let message = if reason == "CREDENTIALS_MISSING" {
        "Request is missing required authentication credential. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project."
    } else {
        INVALID_CREDENTIALS
    };
    envelope(
        StatusCode::UNAUTHORIZED,
        "UNAUTHENTICATED",
        message,
        Some(json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": "googleapis.com",
            "metadata": {"service": format!("{service}.googleapis.com")}
        }])),
    )
}

/// 404 for a service account.
pub fn unknown_service_account() -> Response {
    envelope(StatusCode::NOT_FOUND, "NOT_FOUND", "Unknown service account", None)
}

/// 404 for other entities.
pub fn not_found() -> Response {
    envelope(StatusCode::NOT_FOUND, "NOT_FOUND", "Requested entity was not found.", None)
}

/// 400 `INVALID_ARGUMENT`.
pub fn invalid_argument(message: &str) -> Response {
    envelope(StatusCode::BAD_REQUEST, "INVALID_ARGUMENT", message, None)
}

/// An injected 503.
pub fn unavailable() -> Response {
    envelope(StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE", "The service is currently unavailable.", None)
}

/// An injected 429, in the shape the API uses (OAuth style for STS).
pub fn throttled(api: &str, retry_after_seconds: u64) -> Response {
    let mut response = if api.starts_with("sts.") || api.starts_with("securetoken.") {
        sts_error(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            "The request was throttled due to rate limit: sts.googleapis.com/requests. Please retry after a few seconds.",
        )
    } else {
        let service = api.split('.').next().unwrap_or("iam");
        envelope(
            StatusCode::TOO_MANY_REQUESTS,
            "RESOURCE_EXHAUSTED",
            &format!(
                "Quota exceeded for quota metric 'Requests' and limit 'Requests per minute' of service '{service}.googleapis.com'."
            ),
            None,
        )
    };
    if retry_after_seconds > 0
        && let Ok(v) = HeaderValue::from_str(&retry_after_seconds.to_string())
    {
        response.headers_mut().insert(header::RETRY_AFTER, v);
    }
    response
}

/// STS's flat OAuth error: `{"error":"...","error_description":"..."}`.
pub fn sts_error(code: StatusCode, error: &str, description: &str) -> Response {
    (code, Json(json!({"error": error, "error_description": description}))).into_response()
}

/// A broken 200 answer.
pub fn malformed(kind: crate::scenario::Malformed) -> Response {
    use crate::scenario::Malformed;
    match kind {
        Malformed::TruncatedJson => {
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], r#"{"version":1,"etag":"BwX","bindings":[{"role":"roles/iam.workloadIdent"#).into_response()
        }
        Malformed::HtmlPage => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/html")],
            "<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body><h1>Bad Gateway</h1><p>The proxy received an invalid response.</p></body></html>",
        )
            .into_response(),
        Malformed::WrongTypes => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            // A field of every API's answer, each of a wrong type, so that no parser finds what it
            // needs: policies and accounts, pools and providers, STS and securetoken, IAM
            // Credentials, testIamPermissions.
            r#"{"version":"three","etag":7,"bindings":"none","disabled":"maybe","email":["x"],"state":4,"permissions":"all","access_token":7,"expires_in":[],"accessToken":false,"expireTime":12,"token":{}}"#,
        )
            .into_response(),
        Malformed::HugeWrongType => {
            // Just under the 1 MiB the operator reads, so it parses it and serde quotes the value.
            let value = "A".repeat(500_000);
            let body = format!(r#"{{"disabled":"{value}","permissions":"{value}"}}"#);
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Malformed::HugeBody => {
            let chunk = bytes_of_members();
            let chunks = (0..128).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
            let body = axum::body::Body::from_stream(futures::stream::iter(chunks));
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
    }
}

/// 64 KiB of policy members, repeated to make a body far larger than any real answer.
fn bytes_of_members() -> axum::body::Bytes {
    let member = "\"serviceAccount:acme-prod.svc.id.goog[ns/ksa]\",";
    axum::body::Bytes::from(member.repeat(64 * 1024 / member.len()))
}
