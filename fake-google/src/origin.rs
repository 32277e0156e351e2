//! An origin server for endpoint tests: the service a workload calls with its Google token.
//!
//! It accepts either Google ID tokens for one audience (verified against the fake Google's keys:
//! signature, `iss`, `exp`, `aud`) or access tokens the in-process [`Fake`] issued and still
//! honours (a service account's token or a federated one). It answers
//! - 200 `{"principal": …, "tokenType": "IdToken"|"AccessToken"}` for an accepted token;
//! - 401 with `WWW-Authenticate: Bearer realm="origin"` and a short body when there is no
//!   `Authorization` header, and `WWW-Authenticate: Bearer realm="origin", error="invalid_token",
//!   error_description="…"` when its token is refused (RFC 6750 §3.1: no error code for a request
//!   without credentials);
//! - 403 `RBAC: access denied` (Istio's body) for a valid token of a principal outside
//!   [`OriginConfig::allowed`], when that list is set;
//! - the configured redirect (e.g. 307 `Location: http://other-host/…`) on a path in
//!   [`OriginConfig::redirects`], before looking at any token.
//!
//! Every request is recorded with whether it carried an `Authorization` header.

use std::{
    collections::VecDeque,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
};

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{Caller, Fake, verify_id_token};

/// The requests remembered (the oldest are dropped first).
const REMEMBERED: usize = 4096;

/// Which token type the origin takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Accepts {
    /// Google ID tokens for `audience`; empty means the origin's own `http://ADDR`, which is
    /// what authprobe mints for when an endpoint's `audience` is not set.
    IdToken {
        /// The `aud` required.
        audience: String,
    },
    /// Access tokens the fake issued.
    AccessToken,
}

/// A redirect the origin answers on `path` (any method), before any token check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The exact request path, e.g. `/moved`.
    pub path: String,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    /// The `Location` header, e.g. `http://other-host:8080/moved`.
    pub location: String,
}

/// What the origin accepts. Change it while it runs with [`Running::update`].
#[derive(Clone, Debug)]
pub struct OriginConfig {
    /// The fake Google whose keys and tokens count.
    pub fake: Arc<Fake>,
    /// The token type taken.
    pub accepts: Accepts,
    /// `None`: any valid token is accepted. `Some`: only principals named here; a valid token of
    /// anyone else gets 403. A principal is named by its service account email (ID tokens and
    /// service account access tokens; `serviceAccount:EMAIL` also works) or by any IAM member
    /// string of a federated principal (`principal://…`, `principalSet://…`).
    pub allowed: Option<Vec<String>>,
    /// Paths answered with a redirect.
    pub redirects: Vec<Redirect>,
}

impl OriginConfig {
    /// An origin taking ID tokens for `audience` (empty: its own `http://ADDR`).
    pub fn id_token(fake: Arc<Fake>, audience: impl Into<String>) -> Self {
        Self {
            fake,
            accepts: Accepts::IdToken { audience: audience.into() },
            allowed: None,
            redirects: vec![],
        }
    }

    /// An origin taking the fake's access tokens.
    pub fn access_token(fake: Arc<Fake>) -> Self {
        Self { fake, accepts: Accepts::AccessToken, allowed: None, redirects: vec![] }
    }
}

/// One request the origin saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `GET`, `POST`, ….
    pub method: String,
    /// The path (no query).
    pub path: String,
    /// Whether it carried an `Authorization` header (of any scheme).
    pub authorization: bool,
    /// The status answered.
    pub status: u16,
}

#[derive(Debug)]
struct Shared {
    config: RwLock<OriginConfig>,
    seen: Mutex<(u64, VecDeque<Seen>)>,
    addr: SocketAddr,
}

/// A started origin; stops when dropped.
#[derive(Debug)]
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Running {
    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests so far (the last 4096), oldest first.
    pub fn requests(&self) -> Vec<Seen> {
        self.shared.seen.lock().map(|s| s.1.iter().cloned().collect()).unwrap_or_default()
    }

    /// How many requests arrived since start (or the last reset).
    pub fn count(&self) -> u64 {
        self.shared.seen.lock().map(|s| s.0).unwrap_or_default()
    }

    /// Forgets the requests seen.
    pub fn reset(&self) {
        if let Ok(mut s) = self.shared.seen.lock() {
            *s = (0, VecDeque::new());
        }
    }

    /// Changes what it accepts.
    pub fn update(&self, f: impl FnOnce(&mut OriginConfig)) {
        if let Ok(mut c) = self.shared.config.write() {
            f(&mut c);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts an origin on `addr` in the current runtime.
pub async fn start(addr: SocketAddr, config: OriginConfig) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared { config: RwLock::new(config), seen: Mutex::default(), addr });
    let app = Router::new().fallback(serve).with_state(shared.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async {
            let _ = rx.await;
        });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "origin stopped");
        }
    });
    Ok(Running { addr, shared, shutdown: Some(tx) })
}

async fn serve(State(shared): State<Arc<Shared>>, method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let response = answer(&shared, uri.path(), &headers);
    if let Ok(mut seen) = shared.seen.lock() {
        seen.0 += 1;
        if seen.1.len() == REMEMBERED {
            seen.1.pop_front();
        }
        seen.1.push_back(Seen {
            method: method.to_string(),
            path: uri.path().to_string(),
            authorization: headers.contains_key(header::AUTHORIZATION),
            status: response.status().as_u16(),
        });
    }
    response
}

fn answer(shared: &Shared, path: &str, headers: &HeaderMap) -> Response {
    let Ok(config) = shared.config.read().map(|c| c.clone()) else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    if let Some(r) = config.redirects.iter().find(|r| r.path == path) {
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::TEMPORARY_REDIRECT);
        return (status, [(header::LOCATION, r.location.clone())]).into_response();
    }
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return unauthorized(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
        .filter(|t| !t.is_empty());
    let Some(token) = token else {
        return unauthorized(Some("the Authorization header does not carry a bearer token"));
    };
    let (names, token_type) = match &config.accepts {
        Accepts::IdToken { audience } => {
            let own = format!("http://{}", shared.addr);
            let audience = if audience.is_empty() { &own } else { audience };
            match verify_id_token(&config.fake, token, audience) {
                Ok(claims) => {
                    let mut names: Vec<String> = claims.email.iter().cloned().collect();
                    names.extend(claims.email.iter().map(|e| format!("serviceAccount:{e}")));
                    names.push(claims.sub);
                    (names, "IdToken")
                }
                Err(e) => return unauthorized(Some(&e)),
            }
        }
        Accepts::AccessToken => match config.fake.access_token_caller(token) {
            Some(Caller::ServiceAccount { email }) => {
                (vec![email.clone(), format!("serviceAccount:{email}")], "AccessToken")
            }
            Some(Caller::Federated { members }) => (members, "AccessToken"),
            None => {
                return unauthorized(Some("the access token is not one Google issued, or it has expired"));
            }
        },
    };
    if let Some(allowed) = &config.allowed
        && !names.iter().any(|n| allowed.contains(n))
    {
        return (StatusCode::FORBIDDEN, "RBAC: access denied").into_response();
    }
    let principal = names.first().cloned().unwrap_or_default();
    Json(json!({"principal": principal, "tokenType": token_type})).into_response()
}

/// 401 with RFC 6750's challenge; `problem` is why a presented token was refused.
fn unauthorized(problem: Option<&str>) -> Response {
    let challenge = match problem {
        None => "Bearer realm=\"origin\"".to_string(),
        Some(p) => {
            // A quoted-string of visible ASCII without quotes or backslashes.
            let p: String = p
                .chars()
                .map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' { c } else { ' ' })
                .take(200)
                .collect();
            format!("Bearer realm=\"origin\", error=\"invalid_token\", error_description=\"{p}\"")
        }
    };
    let body = if problem.is_some() { "invalid bearer token\n" } else { "bearer token required\n" };
    let mut response = (StatusCode::UNAUTHORIZED, body).into_response();
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    response
}
