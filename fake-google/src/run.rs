//! Cloud Run Admin API v2: `services.get` with the operator's credentials, and
//! `services.testIamPermissions` with a workload's token (google-wif.md §11).

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State},
    http::HeaderMap,
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

use crate::{
    Shared, access, errors,
    iam::operator_holds,
    scenario::{CloudRunService, fnv},
};

/// The service as v2 renders it; proto3 JSON leaves out empty lists and false booleans.
fn service_json(s: &CloudRunService) -> Value {
    let mut v = json!({
        "name": s.name,
        "uid": format!("{:016x}", fnv(s.name.as_bytes())),
        "generation": "1",
        "ingress": if s.ingress.is_empty() { "INGRESS_TRAFFIC_ALL" } else { s.ingress.as_str() },
        "launchStage": "GA",
        "uri": s.uri,
        "etag": format!("\"{:x}\"", fnv(serde_json::to_string(s).unwrap_or_default().as_bytes())),
    });
    if !s.urls.is_empty() {
        v["urls"] = json!(s.urls);
    }
    if !s.custom_audiences.is_empty() {
        v["customAudiences"] = json!(s.custom_audiences);
    }
    if s.invoker_iam_disabled {
        v["invokerIamDisabled"] = json!(true);
    }
    v
}

/// `GET /run/v2/projects/P/locations/L/services/S`.
pub(crate) async fn get_service(
    State(fake): State<Shared>,
    Path((project, location, service)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = fake.begin("run.services.get").await {
        return r;
    }
    let name = format!("projects/{project}/locations/{location}/services/{service}");
    match operator_holds(&fake, &headers, "run") {
        Ok(held) if held.iter().any(|p| p == "run.services.get") => {}
        Ok(_) => return errors::permission_denied_on("run.services.get", &name),
        Err(r) => return r,
    }
    match fake.scenario().cloud_run_service(&name) {
        Some(s) => Json(service_json(s)).into_response(),
        None => errors::run_service_not_found(&project, &location, &service),
    }
}

/// `POST /run/v2/projects/P/locations/L/services/S:testIamPermissions {"permissions": [...]}`
/// with a workload's token (a service account's or a federated one): the subset it holds.
pub(crate) async fn service_method(
    State(fake): State<Shared>,
    Path((project, location, service)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(service) = service.strip_suffix(":testIamPermissions") else { return errors::not_found() };
    if let Err(r) = fake.begin("run.testIamPermissions").await {
        return r;
    }
    if let Err(r) = access::caller(&fake, &headers, "run") {
        return r;
    }
    let name = format!("projects/{project}/locations/{location}/services/{service}");
    let Some(resource) = fake.scenario().cloud_run_service(&name).map(CloudRunService::resource) else {
        return errors::run_service_not_found(&project, &location, service);
    };
    access::answer(access::test(&fake, "run", &resource, &headers, access::permissions_body(&body)))
}
