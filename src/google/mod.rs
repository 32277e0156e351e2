//! Google IO: the operator's own reads (service accounts, allow policies, pools and providers,
//! Cloud Run services), shared by every probe through a per-interval cache, classified into facts
//! for the engine.

pub mod cache;
pub mod client;
pub mod credentials;
pub mod endpoints;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use self::{
    cache::FetchCache,
    client::{Answer, Api, Auth, Body, GoogleClient, SendError},
    endpoints::Endpoints,
};
use crate::engine::{
    FederationPlan, GsaFacts, ProviderFacts,
    annotation::GsaEmail,
    facts::{FailureKind, FetchFailure, Fetched, RunService},
    grace::Changes,
};

/// Google as the operator sees it.
#[derive(Debug)]
pub struct Google {
    client: GoogleClient,
    endpoints: Endpoints,
    gsas: FetchCache<GsaEmail, Arc<GsaFacts>>,
    providers: FetchCache<String, Arc<ProviderFacts>>,
    run_services: FetchCache<String, Arc<Fetched<RunService>>>,
    policy_changes: Mutex<Changes<GsaEmail>>,
}

impl Google {
    /// Google behind `endpoints`.
    pub fn new(client: GoogleClient, endpoints: Endpoints) -> Self {
        Self {
            client,
            endpoints,
            gsas: FetchCache::default(),
            providers: FetchCache::default(),
            run_services: FetchCache::default(),
            policy_changes: Mutex::new(Changes::default()),
        }
    }

    /// The HTTP client, for the live chain.
    pub fn client(&self) -> &GoogleClient {
        &self.client
    }

    /// The endpoints, for the live chain.
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    /// The GSA's account and allow policy, read at most once per `max_age` for all probes.
    pub async fn gsa(&self, gsa: &GsaEmail, max_age: Duration) -> Arc<GsaFacts> {
        let (facts, previous) =
            self.gsas.get(gsa, max_age, async { Arc::new(self.fetch_gsa(gsa).await) }).await;
        let etag = |f: &GsaFacts| f.policy.as_ref().ok().and_then(Option::as_ref).map(|p| p.etag.clone());
        if let Some(previous) = previous
            && let (Some(before), Some(now)) = (etag(&previous), etag(&facts))
            && before != now
            && let Ok(mut changes) = self.policy_changes.lock()
        {
            changes.record(gsa.clone(), Timestamp::now());
        }
        facts
    }

    /// When authprobe last saw the GSA's policy etag change (never for the first read).
    pub fn policy_changed_at(&self, gsa: &GsaEmail) -> Option<Timestamp> {
        self.policy_changes.lock().ok().and_then(|c| c.get(gsa, Timestamp::now()))
    }

    /// The Federation pool and provider, read at most once per `max_age` for all probes.
    pub async fn provider(&self, federation: &FederationPlan, max_age: Duration) -> Arc<ProviderFacts> {
        let fetch = async {
            let (pool_path, provider_path) =
                (format!("/v1/{}", federation.pool), format!("/v1/{}", federation.provider));
            let (pool, provider) = tokio::join!(
                self.read(Api::GetPool, &pool_path),
                self.read(Api::GetProvider, &provider_path)
            );
            Arc::new(ProviderFacts::new(pool, provider))
        };
        self.providers.get(&federation.provider, max_age, fetch).await.0
    }

    /// A Cloud Run service (`projects/P/locations/L/services/S`), read at most once per `max_age`
    /// for all probes.
    pub async fn run_service(&self, name: &str, max_age: Duration) -> Arc<Fetched<RunService>> {
        let fetch = async {
            let path = format!("/v2/{name}");
            Arc::new(self.call("run", Api::GetRunService, Method::GET, &path).await)
        };
        self.run_services.get(&name.to_string(), max_age, fetch).await.0
    }

    async fn fetch_gsa(&self, gsa: &GsaEmail) -> GsaFacts {
        let path = format!("/v1/projects/{}/serviceAccounts/{gsa}", gsa.url_project());
        let account = self.read(Api::GetServiceAccount, &path).await;
        let policy = match &account {
            Ok(Some(_)) => {
                let path = format!("{path}:getIamPolicy?options.requestedPolicyVersion=3");
                self.call("iam", Api::GetIamPolicy, Method::POST, &path).await
            }
            // Not found, or unreadable: the policy would say nothing more.
            _ => Ok(None),
        };
        GsaFacts { account, policy }
    }

    async fn read<T: DeserializeOwned>(&self, api: Api, path: &str) -> Fetched<T> {
        self.call("iam", api, Method::GET, path).await
    }

    async fn call<T: DeserializeOwned>(
        &self,
        service: &str,
        api: Api,
        method: Method,
        path: &str,
    ) -> Fetched<T> {
        let url =
            self.endpoints.url(service, path).map_err(|e| FetchFailure::new(FailureKind::Unavailable, e))?;
        let answer = self.client.send(api, method, url, &Body::Empty, Auth::Operator).await;
        classify_read(api, answer)
    }
}

/// How the operator's own read ended, as a fact: missing is `Ok(None)`, anything undecidable a failure.
pub fn classify_read<T: DeserializeOwned>(api: Api, answer: Result<Answer, SendError>) -> Fetched<T> {
    let answer = answer.map_err(|e| match e {
        SendError::Credentials(c) => FetchFailure::new(FailureKind::Unauthenticated, c.to_string()),
        other => FetchFailure::new(FailureKind::Unavailable, crate::redact::upstream(&other.to_string())),
    })?;
    let kind = match answer.status {
        s if s.is_success() => {
            // serde quotes the offending value: redacted and bounded like any upstream text.
            return serde_json::from_slice(&answer.body).map(Some).map_err(|e| {
                FetchFailure::new(
                    FailureKind::Unavailable,
                    crate::redact::upstream(&format!("{}: malformed response ({e})", api.as_str())),
                )
            });
        }
        StatusCode::NOT_FOUND => return Ok(None),
        StatusCode::UNAUTHORIZED => FailureKind::Unauthenticated,
        StatusCode::FORBIDDEN => FailureKind::Forbidden,
        StatusCode::TOO_MANY_REQUESTS => FailureKind::Throttled,
        _ => FailureKind::Unavailable,
    };
    Err(FetchFailure::new(kind, format!("{} answered {}", api.as_str(), describe(&answer))))
}

/// The error code and text of a Google answer: `(status, message)` from the envelope of most
/// APIs, `(error, error_description)` from STS's OAuth-style body, or `("", raw body)`.
pub fn error_parts(answer: &Answer) -> (String, String) {
    let json: serde_json::Value = serde_json::from_slice(&answer.body).unwrap_or_default();
    let field = |v: &serde_json::Value, k: &str| {
        v.get(k).and_then(serde_json::Value::as_str).unwrap_or_default().to_string()
    };
    match json.get("error") {
        // {"error":{"code":403,"message":"...","status":"PERMISSION_DENIED"}}
        Some(e @ serde_json::Value::Object(_)) => (field(e, "status"), field(e, "message")),
        // {"error":"invalid_grant","error_description":"..."}
        Some(serde_json::Value::String(code)) => (code.clone(), field(&json, "error_description")),
        _ => (String::new(), String::from_utf8_lossy(&answer.body).into_owned()),
    }
}

/// `STATUS CODE: text` of a Google answer, redacted and cut to 1 KiB.
pub fn describe(answer: &Answer) -> String {
    let (code, text) = error_parts(answer);
    let head = if code.is_empty() {
        answer.status.as_u16().to_string()
    } else {
        format!("{} {code}:", answer.status.as_u16())
    };
    crate::redact::upstream(&format!("{head} {}", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::facts::Policy;

    fn answer(status: u16, body: &str) -> Result<Answer, SendError> {
        Ok(Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: body.as_bytes().to_vec(),
            date: None,
            retry_after: None,
        })
    }

    #[test]
    fn reads_are_classified_into_facts() {
        let policy: Fetched<Policy> =
            classify_read(Api::GetIamPolicy, answer(200, r#"{"version":1,"etag":"BwX","bindings":[]}"#));
        assert_eq!(policy.unwrap().unwrap().etag, "BwX");
        let missing: Fetched<Policy> = classify_read(
            Api::GetServiceAccount,
            answer(404, r#"{"error":{"code":404,"message":"Unknown service account","status":"NOT_FOUND"}}"#),
        );
        assert_eq!(missing, Ok(None));
        for (status, kind) in [
            (401, FailureKind::Unauthenticated),
            (403, FailureKind::Forbidden),
            (429, FailureKind::Throttled),
            (503, FailureKind::Unavailable),
            (400, FailureKind::Unavailable),
        ] {
            let r: Fetched<Policy> = classify_read(
                Api::GetIamPolicy,
                answer(status, r#"{"error":{"code":1,"message":"nope","status":"X"}}"#),
            );
            assert_eq!(r.unwrap_err().kind, kind, "{status}");
        }
    }

    #[test]
    fn malformed_answers_are_unavailable_never_a_verdict() {
        for body in [
            "{\"version\": 1, \"bindings\": [",
            "<html><body>502 Bad Gateway</body></html>",
            r#"{"bindings": "not a list"}"#,
            "",
        ] {
            let r: Fetched<Policy> = classify_read(Api::GetIamPolicy, answer(200, body));
            let failure = r.unwrap_err();
            assert_eq!(failure.kind, FailureKind::Unavailable);
            assert!(failure.detail.contains("malformed response"), "{}", failure.detail);
        }
        let token = format!("ya29.{}", "x".repeat(40));
        let quoted = format!(r#"{{"bindings": "{token}{}"}}"#, "y".repeat(1 << 20));
        let failure = classify_read::<Policy>(Api::GetIamPolicy, answer(200, &quoted)).unwrap_err();
        assert!(
            failure.detail.len() <= crate::redact::MAX_UPSTREAM_BYTES && !failure.detail.contains("ya29."),
            "a quoted field is redacted and bounded: {} bytes",
            failure.detail.len()
        );
        let too_large: Fetched<Policy> =
            classify_read(Api::GetIamPolicy, Err(SendError::TooLarge { api: "iam.getIamPolicy" }));
        assert_eq!(too_large.unwrap_err().kind, FailureKind::Unavailable);
    }

    #[test]
    fn upstream_errors_are_described_redacted() {
        let a = answer(403, r#"{"error":{"code":403,"message":"Permission 'iam.serviceAccounts.getIamPolicy' denied on resource (or it may not exist).","status":"PERMISSION_DENIED"}}"#).unwrap();
        assert_eq!(
            describe(&a),
            "403 PERMISSION_DENIED: Permission 'iam.serviceAccounts.getIamPolicy' denied on resource (or it may not exist)."
        );
        let sts = answer(400, r#"{"error":"invalid_grant","error_description":"bad token eyJabc.def.ghi"}"#)
            .unwrap();
        assert_eq!(describe(&sts), "400 invalid_grant: bad token [REDACTED]");
        let html = answer(502, "<html>\n<b>gateway</b></html>").unwrap();
        assert_eq!(describe(&html), "502 <html> <b>gateway</b></html>");
    }
}
