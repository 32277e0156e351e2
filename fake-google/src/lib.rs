//! A loopback stand-in for the Google endpoints authprobe talks to. It is a real HTTP server that
//! answers with the exact bodies and status codes of google-wif.md, keeps its state in a
//! [`Scenario`] that can be replaced while it runs (`/admin`), injects latency, 5xx and 429 at given
//! rates, and counts requests per API (`SERVICE.method`, e.g. `run.services.get`).
//!
//! Every service lives under its own path prefix (`/iam`, `/sts`, ...; all in [`SERVICES`]), so
//! authprobe reaches it with `--google-endpoint iam=http://ADDR/iam` and so on
//! ([`Running::endpoints`], [`Running::endpoints_with`]).
//!
//! What it serves:
//! - IAM v1: service accounts, their policies, pools and providers (the operator's reads);
//! - STS `v1/token` and securetoken `v1/identitybindingtoken`, verifying real KSA token
//!   signatures against the provider's uploaded JWKS or the cluster issuer's;
//! - IAM Credentials `generateAccessToken` and `generateIdToken` (a federated or service account
//!   bearer needs an unconditional binding on the target: `roles/iam.workloadIdentityUser` or
//!   `roles/iam.serviceAccountTokenCreator`, and for ID tokens also
//!   `roles/iam.serviceAccountOpenIdTokenCreator`);
//! - `testIamPermissions` on projects, buckets, secrets, topics, subscriptions and Cloud Run
//!   services, answering the held subset from the scenario's grants;
//! - Cloud Run v2 `services.get` (`/run/v2/projects/P/locations/L/services/S`, the operator's read);
//! - Google's ID-token keys at `/www/oauth2/v3/certs` (`https://www.googleapis.com/oauth2/v3/certs`).
//!
//! ID tokens are RS256 JWTs signed with the fake's own Google key (made on first use, one stable
//! `kid` per [`Fake`]): `iss` `https://accounts.google.com`, `aud`, `azp` and `sub` (the service
//! account's unique ID), `email` and `email_verified` (with `includeEmail`), `iat`, `exp` = `iat` +
//! 3600. [`verify_id_token`] checks one as a relying party would. Every token the fake mints
//! (access, federated, ID) is recorded in [`Fake::credentials_seen`]; [`Fake::mint_id_token`] and
//! [`Fake::mint_access_token`] hand tests tokens the fake honours, and
//! [`Fake::access_token_caller`] says whose an access token is.
//!
//! Two more servers model the workload's own path (google-wif.md §10–§12), each on its own
//! address and sharing the [`Fake`]'s tokens and keys:
//! - [`origin`]: the service a workload calls with its token (ID token for an audience, or access
//!   token), with 401/403 answers, redirects, and a record of whether `Authorization` arrived;
//! - [`metadata`]: a GKE metadata server with per-pod identities, cold start per client IP and
//!   outage windows.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use fake_google::{metadata, origin, scenario::Scenario};
//! let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
//! let google = fake_google::start(loopback, Scenario::default()).await?;
//! let site = origin::start(loopback, origin::OriginConfig::id_token(google.fake.clone(), "")).await?;
//! let gsa = "app@acme-prod.iam.gserviceaccount.com";
//! let md = metadata::start(
//!     loopback,
//!     metadata::MetadataConfig::new(google.fake.clone(), "acme-prod", metadata::Identity::ServiceAccount(gsa.into())),
//! )
//! .await?;
//! let token = google.fake.mint_id_token(gsa, &site.url(), true)?;
//! # let _ = (md, token);
//! # Ok(())
//! # }
//! ```

// Handlers answer `Result<_, Response>`, axum's idiom; a boxed error would only add noise.
#![allow(clippy::result_large_err)]

mod access;
mod errors;
mod google_keys;
mod iam;
pub mod metadata;
pub mod origin;
mod run;
pub mod scenario;
mod sts;
mod tokens;
mod verify;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, OnceLock, RwLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use serde_json::json;

pub use google_keys::{GOOGLE_ISSUER, GoogleKeys, IdTokenClaims, Signer, verify_id_token};
pub use scenario::Scenario;

/// The services the fake answers for, by path prefix (`www` is `www.googleapis.com`, where
/// Google publishes its ID-token keys at `/oauth2/v3/certs`).
pub const SERVICES: [&str; 10] = [
    "sts",
    "securetoken",
    "iam",
    "iamcredentials",
    "cloudresourcemanager",
    "storage",
    "secretmanager",
    "pubsub",
    "run",
    "www",
];

/// The services [`Running::endpoints`] names: every one authprobe's `--google-endpoint` knows
/// (all of [`SERVICES`] but `www`, which only relying parties read).
pub const ENDPOINT_SERVICES: [&str; 9] = [
    "sts",
    "securetoken",
    "iam",
    "iamcredentials",
    "cloudresourcemanager",
    "storage",
    "secretmanager",
    "pubsub",
    "run",
];

/// Who an access token the fake issued stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A service account's token (generateAccessToken, the metadata server, [`Fake::mint_access_token`]).
    ServiceAccount {
        /// Its email.
        email: String,
    },
    /// A federated token (STS, securetoken): every IAM member string that names its principal.
    Federated {
        /// `principal://…`, `principalSet://…` and legacy `serviceAccount:P.svc.id.goog[NS/KSA]`.
        members: Vec<String>,
    },
}

/// Shared state behind every handler.
#[derive(Debug)]
pub struct Fake {
    scenario: RwLock<Scenario>,
    counts: Mutex<BTreeMap<String, u64>>,
    /// Requests subject to faults so far, for evenly spread errors.
    faulted: std::sync::atomic::AtomicU64,
    tokens: tokens::Registry,
    keys: verify::Keys,
    /// Google's own signing key, made on first use (RSA generation takes a while on a busy
    /// machine, and most fakes never mint an ID token).
    google_key: OnceLock<Option<Signer>>,
}

type Shared = Arc<Fake>;

impl Fake {
    fn new(scenario: Scenario) -> Self {
        Self {
            scenario: RwLock::new(scenario),
            counts: Mutex::new(BTreeMap::new()),
            faulted: std::sync::atomic::AtomicU64::new(0),
            tokens: tokens::Registry::default(),
            keys: verify::Keys::default(),
            google_key: OnceLock::new(),
        }
    }

    fn signer(&self) -> Option<&Signer> {
        self.google_key
            .get_or_init(|| {
                Signer::generate().map_err(|e| tracing::error!(error = %e, "no Google signing key")).ok()
            })
            .as_ref()
    }

    /// Google's ID-token keys, as `/www/oauth2/v3/certs` serves them.
    pub fn google_jwks(&self) -> Option<jsonwebtoken::jwk::JwkSet> {
        self.signer().map(Signer::jwks)
    }

    /// An ID token for `email` with audience `audience`, exactly as `generateIdToken` would mint
    /// it (without checking who may), signed with Google's key and recorded like every token
    /// the fake issues. `iat` is Google's clock (the scenario's skew applies).
    pub fn mint_id_token(&self, email: &str, audience: &str, include_email: bool) -> anyhow::Result<String> {
        let signer = self.signer().ok_or_else(|| anyhow::anyhow!("no Google signing key"))?;
        let unique_id =
            scenario::ServiceAccount { email: email.to_string(), ..Default::default() }.unique_id();
        let now = google_now(&self.scenario());
        let token =
            signer.sign(&google_keys::id_token_claims(email, &unique_id, audience, include_email, now))?;
        self.tokens.witness(&token);
        Ok(token)
    }

    /// An access token of the service account `email`, valid at the fake's APIs for `lifetime`,
    /// as generateAccessToken or the metadata server would hand out (who may is not checked).
    pub fn mint_access_token(&self, email: &str, lifetime: Duration) -> String {
        self.tokens.issue(tokens::Issued::ServiceAccount { email: email.to_string() }, lifetime)
    }

    /// Who a live access token the fake issued stands for; `None` for a token it did not issue,
    /// an expired one, or a federated one whose pool is now disabled or deleted.
    pub fn access_token_caller(&self, token: &str) -> Option<Caller> {
        match self.tokens.lookup(token)? {
            tokens::Issued::ServiceAccount { email } => Some(Caller::ServiceAccount { email }),
            tokens::Issued::Federated { principal, pool } => tokens::pool_allows(&self.scenario(), &pool)
                .then(|| Caller::Federated { members: principal.members() }),
        }
    }

    /// A snapshot of the scenario.
    pub fn scenario(&self) -> Scenario {
        self.scenario.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Replaces the scenario.
    pub fn set_scenario(&self, scenario: Scenario) {
        if let Ok(mut s) = self.scenario.write() {
            *s = scenario;
        }
    }

    /// Changes the scenario in place.
    pub fn update(&self, f: impl FnOnce(&mut Scenario)) {
        if let Ok(mut s) = self.scenario.write() {
            f(&mut s);
        }
    }

    /// Requests per API name since start (or the last reset).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Every KSA token presented to STS or securetoken and every access and ID token issued
    /// (also those handed out by a [`metadata`] server on this fake), most recent 4096: what must
    /// never appear in logs, Events, status, metrics or files.
    pub fn credentials_seen(&self) -> Vec<String> {
        self.tokens.witnessed()
    }

    /// Zeroes the counters, and restarts the pattern of evenly spread errors.
    pub fn reset_counts(&self) {
        if let Ok(mut c) = self.counts.lock() {
            c.clear();
        }
        self.faulted.store(0, std::sync::atomic::Ordering::SeqCst);
    }

    /// Counts a request to `api` and applies the scenario's faults: `Err` is the injected answer.
    async fn begin(&self, api: &str) -> Result<(), Response> {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(api.to_string()).or_default() += 1;
        }
        let faults = self.scenario.read().map(|s| s.faults.clone()).unwrap_or_default();
        if !faults.apis.is_empty() && !faults.apis.iter().any(|a| a == api) {
            return Ok(());
        }
        if faults.latency_ms > 0 {
            tokio::time::sleep(Duration::from_millis(faults.latency_ms)).await;
        }
        if let Some(kind) = faults.malformed {
            return Err(errors::malformed(kind));
        }
        let failed = if faults.evenly {
            // Request n fails when the running share of failures would otherwise fall behind the rate.
            let n = self.faulted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) as f64;
            ((n + 1.0) * faults.error_rate).floor() > (n * faults.error_rate).floor()
        } else {
            rand::random::<f64>() < faults.error_rate
        };
        if failed {
            return Err(errors::unavailable());
        }
        let roll: f64 = rand::random();
        if roll < faults.throttle_rate {
            return Err(errors::throttled(api, faults.retry_after_seconds));
        }
        Ok(())
    }
}

/// A started fake.
#[derive(Debug)]
pub struct Running {
    /// Where it listens (always loopback).
    pub addr: SocketAddr,
    /// Its state, for tests to change directly.
    pub fake: Arc<Fake>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    /// `SERVICE=http://ADDR/SERVICE` for every service of [`ENDPOINT_SERVICES`], comma-separated
    /// (`AUTHPROBE_GOOGLE_ENDPOINTS`).
    pub fn endpoints(&self) -> String {
        self.endpoints_with(&[])
    }

    /// [`Running::endpoints`] plus `extra` services (e.g. `&["www"]`).
    pub fn endpoints_with(&self, extra: &[&str]) -> String {
        ENDPOINT_SERVICES
            .iter()
            .chain(extra.iter().filter(|e| !ENDPOINT_SERVICES.contains(e)))
            .map(|s| format!("{s}={}", self.endpoint(s)))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The base URL of one service: `http://ADDR/SERVICE`.
    pub fn endpoint(&self, service: &str) -> String {
        format!("http://{}/{service}", self.addr)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts the fake on `addr` (which must be a loopback address) in the current runtime.
pub async fn start(addr: SocketAddr, scenario: Scenario) -> anyhow::Result<Running> {
    anyhow::ensure!(addr.ip().is_loopback(), "the fake listens on loopback only, not {addr}");
    let fake = Arc::new(Fake::new(scenario));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let app = router(fake.clone());
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "fake Google stopped");
        }
    });
    Ok(Running { addr, fake, shutdown: Some(tx) })
}

fn router(fake: Shared) -> Router {
    Router::new()
        .route(
            "/iam/v1/projects/{project}/serviceAccounts/{account}",
            get(iam::get_service_account).post(iam::service_account_method),
        )
        .route("/iam/v1/projects/{number}/locations/global/workloadIdentityPools/{pool}", get(iam::get_pool))
        .route(
            "/iam/v1/projects/{number}/locations/global/workloadIdentityPools/{pool}/providers/{provider}",
            get(iam::get_provider),
        )
        .route("/sts/v1/token", post(sts::token))
        .route("/securetoken/v1/identitybindingtoken", post(sts::identity_binding_token))
        .route(
            "/iamcredentials/v1/projects/{project}/serviceAccounts/{account}",
            post(access::service_account_credentials),
        )
        .route("/storage/storage/v1/b/{bucket}/iam/testPermissions", get(access::storage_test))
        .route("/secretmanager/v1/projects/{project}/secrets/{secret}", post(access::secret_test))
        .route("/pubsub/v1/projects/{project}/{kind}/{name}", post(access::pubsub_test))
        .route("/cloudresourcemanager/v1/projects/{project}", post(access::project_test))
        .route(
            "/run/v2/projects/{project}/locations/{location}/services/{service}",
            get(run::get_service).post(run::service_method),
        )
        .route("/www/oauth2/v3/certs", get(google_keys::certs))
        .route("/admin/scenario", get(admin_get_scenario).put(admin_put_scenario))
        .route("/admin/faults", put(admin_put_faults))
        .route("/admin/counts", get(admin_counts))
        .route("/admin/counts/reset", post(admin_reset_counts))
        .route("/admin/serviceAccounts/{email}/members", post(admin_add_member))
        .route("/admin/serviceAccounts/{email}/idToken", post(admin_id_token))
        .route("/admin/serviceAccounts/{email}/accessToken", post(admin_access_token))
        .fallback(|| async { errors::not_found() })
        .layer(axum::middleware::map_response_with_state(fake.clone(), skew_date))
        .with_state(fake)
}

/// Google's clock as the scenario wants it: the `Date` header moved by `clockSkewSeconds`.
async fn skew_date(State(fake): State<Shared>, mut response: Response) -> Response {
    let skew = fake.scenario.read().map(|s| s.clock_skew_seconds).unwrap_or_default();
    let at = std::time::SystemTime::now()
        .checked_add(Duration::from_secs(skew.unsigned_abs()))
        .filter(|_| skew >= 0)
        .or_else(|| std::time::SystemTime::now().checked_sub(Duration::from_secs(skew.unsigned_abs())))
        .unwrap_or_else(std::time::SystemTime::now);
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(at)) {
        response.headers_mut().insert(header::DATE, v);
    }
    response
}

/// Google's clock, moved by the scenario's skew (Unix seconds).
pub(crate) fn google_now(scenario: &Scenario) -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    i64::try_from(now).unwrap_or_default() + scenario.clock_skew_seconds
}

/// The bearer token of a request, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

async fn admin_get_scenario(State(fake): State<Shared>) -> Json<Scenario> {
    Json(fake.scenario())
}

async fn admin_put_scenario(State(fake): State<Shared>, Json(scenario): Json<Scenario>) -> StatusCode {
    fake.set_scenario(scenario);
    StatusCode::NO_CONTENT
}

async fn admin_put_faults(State(fake): State<Shared>, Json(faults): Json<scenario::Faults>) -> StatusCode {
    fake.update(|s| s.faults = faults);
    StatusCode::NO_CONTENT
}

async fn admin_counts(State(fake): State<Shared>) -> Json<BTreeMap<String, u64>> {
    Json(fake.counts())
}

async fn admin_reset_counts(State(fake): State<Shared>) -> StatusCode {
    fake.reset_counts();
    StatusCode::NO_CONTENT
}

/// `POST /admin/serviceAccounts/EMAIL/members {"role": "...", "member": "..."}`: what
/// `gcloud iam service-accounts add-iam-policy-binding` does.
async fn admin_add_member(
    State(fake): State<Shared>,
    Path(email): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let (Some(role), Some(member)) = (body["role"].as_str(), body["member"].as_str()) else {
        return errors::invalid_argument("body must be {\"role\": ..., \"member\": ...}");
    };
    let mut found = false;
    fake.update(|s| {
        if let Some(sa) = s.service_accounts.iter_mut().find(|sa| sa.email == email) {
            found = true;
            match sa.bindings.iter_mut().find(|b| b.role == role && b.condition.is_none()) {
                Some(b) if !b.members.iter().any(|m| m == member) => b.members.push(member.to_string()),
                Some(_) => {}
                None => sa.bindings.push(scenario::Binding {
                    role: role.into(),
                    members: vec![member.into()],
                    condition: None,
                }),
            }
        }
    });
    if found {
        let etag = fake.scenario().service_account(&email).map(scenario::ServiceAccount::etag);
        (StatusCode::OK, Json(json!({"etag": etag}))).into_response()
    } else {
        errors::unknown_service_account()
    }
}

/// `POST /admin/serviceAccounts/EMAIL/idToken {"audience": A, "includeEmail": bool}` →
/// `{"token": JWT}`: [`Fake::mint_id_token`] for a test in another process.
async fn admin_id_token(
    State(fake): State<Shared>,
    Path(email): Path<String>,
    Json(body): Json<serde_json::Value>,
) -> Response {
    let Some(audience) = body["audience"].as_str().filter(|a| !a.is_empty()) else {
        return errors::invalid_argument("body must be {\"audience\": ..., \"includeEmail\": ...}");
    };
    match fake.mint_id_token(&email, audience, body["includeEmail"].as_bool().unwrap_or(false)) {
        Ok(token) => Json(json!({"token": token})).into_response(),
        Err(e) => errors::envelope(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", &e.to_string(), None),
    }
}

/// `POST /admin/serviceAccounts/EMAIL/accessToken {"lifetimeSeconds": N}` (default 3600) →
/// `{"accessToken": ...}`: [`Fake::mint_access_token`] for a test in another process.
async fn admin_access_token(
    State(fake): State<Shared>,
    Path(email): Path<String>,
    body: axum::body::Bytes,
) -> Json<serde_json::Value> {
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let lifetime = Duration::from_secs(body["lifetimeSeconds"].as_u64().unwrap_or(3600));
    Json(json!({"accessToken": fake.mint_access_token(&email, lifetime)}))
}
