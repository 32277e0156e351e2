//! A fake GKE metadata server (google-wif.md §10): what a pod on a Workload Identity node pool
//! reaches at `169.254.169.254` (point clients at it with `GCE_METADATA_HOST=ADDR`).
//!
//! Every request needs `Metadata-Flavor: Google`; without it the answer is 403
//! `Missing required header "Metadata-Flavor": "Google"` (the open-source gke-metadata-server's
//! words). Answers carry `Metadata-Flavor: Google` and `Server: GKE Metadata Server`. Paths:
//! - `/` and `/computeMetadata/v1/`: directory listings (the detection ping);
//! - `/computeMetadata/v1/project/project-id`, `…/project/numeric-project-id`;
//! - `/computeMetadata/v1/instance/service-accounts/{default|EMAIL}/` (`?recursive=true`: JSON),
//!   and under it `email`, `aliases`, `scopes`,
//!   `token` → `{"access_token","expires_in","token_type":"Bearer"}`,
//!   `identity?audience=A[&format=full]` → a Google-signed ID token (always with `email`, as the
//!   emulator mints with `includeEmail: true`; `format` is accepted and changes nothing).
//!
//! Which identity a pod gets is [`MetadataConfig::identity`], per client IP overridable in
//! [`MetadataConfig::clients`]: a service account (an annotated KSA: tokens are that GSA's,
//! valid at the fake's APIs) or a federated KSA principal (no annotation: a federated token,
//! `email` is `PROJECT.svc.id.goog`, and `identity` is 404 as in the emulator). Tokens are cached
//! per identity and reused while more than five minutes remain, as the real server does.
//!
//! Timing faults, changeable while it runs ([`Running::update`]):
//! - **cold start** ([`MetadataConfig::cold_start`]): GKE's metadata server "takes a few seconds
//!   to start accepting requests on a newly created Pod". Per client IP, counted from that
//!   client's first request: requests before `first_seen + cold_start` are held (no answer)
//!   until then, or until the client gives up, which is how a pod sees it (clients time out;
//!   google-auth's 3 s detection timeout fails). [`Running::forget_clients`] makes every client
//!   new again (a new pod that reuses an IP).
//! - **outages** ([`MetadataConfig::outages`], each a window of [`Instant`]s with an
//!   [`OutageMode`]): `Hang` holds requests until the window ends (a stuck server), `Reset`
//!   resets connections (TCP RST, what a restarting DaemonSet pod behind the node's redirect
//!   looks like), `Unavailable` answers 503 at once. `Reset` applies to new and kept-alive
//!   connections alike, as soon as they carry a request.
//!
//! Requests are counted per client IP, held and refused ones included (a reset connection never
//! delivers its request, so it is not counted).

use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{ConnectInfo, Query, Request, State, connect_info::Connected},
    http::{HeaderValue, StatusCode, Uri, header},
    middleware::Next,
    response::{IntoResponse, Response},
    serve::IncomingStream,
};
use serde_json::json;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Notify,
};

use crate::{
    Fake,
    tokens::{Issued, Principal},
};

/// How often a held request re-reads the configuration at most (every change wakes it).
const MAX_WAKES: usize = 1000;
/// A cached token is handed out again while this much of its life remains.
const REUSE_MARGIN: Duration = Duration::from_secs(300);
/// Lifetime of the tokens it hands out.
const TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// Who a pod is, as the metadata server sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A KSA annotated with this Google service account.
    ServiceAccount(String),
    /// A KSA without annotation: its federated principal of `PROJECT.svc.id.goog`.
    Federated {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
}

/// What an outage does to requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutageMode {
    /// Requests get no answer until the window ends.
    Hang,
    /// Connections are reset (RST) when they carry a request.
    Reset,
    /// 503 at once.
    Unavailable,
}

/// A window during which the server is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    /// From (inclusive).
    pub start: Instant,
    /// Until (exclusive).
    pub end: Instant,
    /// What requests meet.
    pub mode: OutageMode,
}

impl Outage {
    /// An outage from now on, for `duration`.
    pub fn now_for(duration: Duration, mode: OutageMode) -> Self {
        Self::after(Duration::ZERO, duration, mode)
    }

    /// An outage starting `delay` from now, for `duration`.
    pub fn after(delay: Duration, duration: Duration, mode: OutageMode) -> Self {
        let start = Instant::now() + delay;
        Self { start, end: start + duration, mode }
    }

    fn covers(&self, at: Instant) -> bool {
        self.start <= at && at < self.end
    }
}

/// The metadata server's state.
#[derive(Clone, Debug)]
pub struct MetadataConfig {
    /// The fake Google its tokens are valid at.
    pub fake: Arc<Fake>,
    /// `project/project-id` (and the workload pool `PROJECT.svc.id.goog`).
    pub project_id: String,
    /// `project/numeric-project-id` (404 when empty).
    pub numeric_project_id: String,
    /// Every client's identity unless [`MetadataConfig::clients`] names its IP.
    pub identity: Identity,
    /// Identities per client IP (pods).
    pub clients: BTreeMap<IpAddr, Identity>,
    /// How long after its first request a client is held (zero: none).
    pub cold_start: Duration,
    /// Outage windows.
    pub outages: Vec<Outage>,
}

impl MetadataConfig {
    /// A server giving every client `identity`, with no cold start and no outage.
    pub fn new(fake: Arc<Fake>, project_id: impl Into<String>, identity: Identity) -> Self {
        Self {
            fake,
            project_id: project_id.into(),
            numeric_project_id: String::new(),
            identity,
            clients: BTreeMap::new(),
            cold_start: Duration::ZERO,
            outages: vec![],
        }
    }

    fn identity_of(&self, ip: IpAddr) -> &Identity {
        self.clients.get(&ip).unwrap_or(&self.identity)
    }

    fn email_of(&self, identity: &Identity) -> String {
        match identity {
            Identity::ServiceAccount(email) => email.clone(),
            Identity::Federated { .. } => format!("{}.svc.id.goog", self.project_id),
        }
    }
}

#[derive(Debug)]
struct Shared {
    config: RwLock<MetadataConfig>,
    changed: Notify,
    first_seen: Mutex<HashMap<IpAddr, Instant>>,
    counts: Mutex<BTreeMap<IpAddr, u64>>,
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl Shared {
    fn config(&self) -> Option<MetadataConfig> {
        self.config.read().ok().map(|c| c.clone())
    }

    fn arrived(&self, ip: IpAddr) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(ip).or_default() += 1;
        }
        if let Ok(mut f) = self.first_seen.lock() {
            f.entry(ip).or_insert_with(Instant::now);
        }
    }

    /// Until when a request of `ip` arriving now is held, if it is.
    fn held_until(&self, ip: IpAddr) -> Option<Instant> {
        let now = Instant::now();
        let config = self.config.read().ok()?;
        let ready = self.first_seen.lock().ok()?.get(&ip).map(|first| *first + config.cold_start);
        let outage = config
            .outages
            .iter()
            .filter(|o| o.mode == OutageMode::Hang && o.covers(now))
            .map(|o| o.end)
            .max();
        ready.filter(|r| *r > now).into_iter().chain(outage).max()
    }

    async fn hold(&self, ip: IpAddr) {
        for _ in 0..MAX_WAKES {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let Some(until) = self.held_until(ip) else { return };
            tokio::select! {
                () = tokio::time::sleep_until(until.into()) => {}
                () = changed => {}
            }
        }
    }

    fn out(&self, mode: OutageMode) -> bool {
        let now = Instant::now();
        self.config.read().is_ok_and(|c| c.outages.iter().any(|o| o.mode == mode && o.covers(now)))
    }
}

/// A started metadata server; stops when dropped.
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

    /// A snapshot of its configuration.
    pub fn config(&self) -> Option<MetadataConfig> {
        self.shared.config()
    }

    /// Changes its configuration; held requests re-judge at once.
    pub fn update(&self, f: impl FnOnce(&mut MetadataConfig)) {
        if let Ok(mut c) = self.shared.config.write() {
            f(&mut c);
        }
        self.shared.changed.notify_waiters();
    }

    /// Requests per client IP since start (or [`Running::reset_counts`]).
    pub fn requests_by_client(&self) -> BTreeMap<IpAddr, u64> {
        self.shared.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Requests from `ip` since start (or [`Running::reset_counts`]).
    pub fn requests_from(&self, ip: IpAddr) -> u64 {
        self.requests_by_client().get(&ip).copied().unwrap_or_default()
    }

    /// Zeroes the request counts.
    pub fn reset_counts(&self) {
        if let Ok(mut c) = self.shared.counts.lock() {
            c.clear();
        }
    }

    /// Every client is new again: its next request starts its cold start.
    pub fn forget_clients(&self) {
        if let Ok(mut f) = self.shared.first_seen.lock() {
            f.clear();
        }
        self.shared.changed.notify_waiters();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Starts a metadata server on `addr` in the current runtime.
pub async fn start(addr: SocketAddr, config: MetadataConfig) -> anyhow::Result<Running> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let shared = Arc::new(Shared {
        config: RwLock::new(config),
        changed: Notify::new(),
        first_seen: Mutex::default(),
        counts: Mutex::default(),
        tokens: Mutex::default(),
    });
    let app = Router::new()
        .fallback(route)
        .layer(axum::middleware::from_fn_with_state(shared.clone(), gate))
        .with_state(shared.clone());
    let listener = Resetting { inner: listener, shared: shared.clone() };
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let served = axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
            .with_graceful_shutdown(async {
                let _ = rx.await;
            });
        if let Err(e) = served.await {
            tracing::error!(error = %e, "metadata server stopped");
        }
    });
    Ok(Running { addr, shared, shutdown: Some(tx) })
}

/// The client's address.
#[derive(Clone, Copy, Debug)]
struct Peer(SocketAddr);

impl Connected<IncomingStream<'_, Resetting>> for Peer {
    fn connect_info(stream: IncomingStream<'_, Resetting>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// A listener whose connections reset during a `Reset` outage.
struct Resetting {
    inner: TcpListener,
    shared: Arc<Shared>,
}

impl axum::serve::Listener for Resetting {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Conn, SocketAddr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        (Conn { stream, shared: self.shared.clone() }, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

struct Conn {
    stream: TcpStream,
    shared: Arc<Shared>,
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.shared.out(OutageMode::Reset) {
            // Closing with a zero linger sends RST instead of FIN.
            let _ = self.stream.set_zero_linger();
            return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Counting, cold start, outages and the flavor header, before any route.
async fn gate(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    request: Request,
    next: Next,
) -> Response {
    let ip = peer.ip();
    shared.arrived(ip);
    shared.hold(ip).await;
    if shared.out(OutageMode::Unavailable) {
        return (StatusCode::SERVICE_UNAVAILABLE, "Service Unavailable\n").into_response();
    }
    if request.headers().get("metadata-flavor").is_none_or(|v| v != "Google") {
        return (StatusCode::FORBIDDEN, "Missing required header \"Metadata-Flavor\": \"Google\"\n")
            .into_response();
    }
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert("metadata-flavor", HeaderValue::from_static("Google"));
    headers.insert(header::SERVER, HeaderValue::from_static("GKE Metadata Server"));
    response
}

fn text(body: impl Into<String>) -> Response {
    ([(header::CONTENT_TYPE, "application/text")], body.into()).into_response()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "text/plain")], "Not Found\n").into_response()
}

async fn route(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(Peer(peer)): ConnectInfo<Peer>,
    uri: Uri,
    Query(query): Query<BTreeMap<String, String>>,
) -> Response {
    let Some(config) = shared.config() else { return StatusCode::INTERNAL_SERVER_ERROR.into_response() };
    let path = uri.path();
    if path == "/" {
        return text("computeMetadata/\n");
    }
    let Some(path) = path.strip_prefix("/computeMetadata/v1") else { return not_found() };
    let identity = config.identity_of(peer.ip()).clone();
    let email = config.email_of(&identity);
    match path.split('/').collect::<Vec<_>>().as_slice() {
        [""] | ["", ""] => text("instance/\nproject/\n"),
        ["", "project", ""] => text("numeric-project-id\nproject-id\n"),
        ["", "project", "project-id"] => text(config.project_id.clone()),
        ["", "project", "numeric-project-id"] if !config.numeric_project_id.is_empty() => {
            text(config.numeric_project_id.clone())
        }
        ["", "instance", "service-accounts", ""] => text(format!("default/\n{email}/\n")),
        ["", "instance", "service-accounts", account, rest @ ..]
            if *account == "default" || *account == email =>
        {
            match rest {
                [""] if query.get("recursive").is_some_and(|r| r == "true") => Json(json!({
                    "aliases": ["default"],
                    "email": email,
                    "scopes": [SCOPE],
                }))
                .into_response(),
                [""] => text("aliases\nemail\nidentity\nscopes\ntoken\n"),
                ["aliases"] => text("default\n"),
                ["email"] => text(email),
                ["scopes"] => text(format!("{SCOPE}\n")),
                ["token"] => token(&shared, &config, &identity),
                ["identity"] => id_token(&config, &identity, &query),
                _ => not_found(),
            }
        }
        _ => not_found(),
    }
}

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

fn token(shared: &Shared, config: &MetadataConfig, identity: &Identity) -> Response {
    let key = match identity {
        Identity::ServiceAccount(email) => email.clone(),
        Identity::Federated { namespace, name } => format!("{}[{namespace}/{name}]", config.project_id),
    };
    let Ok(mut cache) = shared.tokens.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let now = Instant::now();
    let (token, expires) = match cache.get(&key) {
        Some((t, exp)) if *exp > now + REUSE_MARGIN && config.fake.access_token_caller(t).is_some() => {
            (t.clone(), *exp)
        }
        _ => {
            let token = match identity {
                Identity::ServiceAccount(email) => config.fake.mint_access_token(email, TOKEN_LIFETIME),
                Identity::Federated { namespace, name } => config.fake.tokens.issue(
                    Issued::Federated {
                        principal: Principal::Gke {
                            project_id: config.project_id.clone(),
                            project_number: config.numeric_project_id.clone(),
                            namespace: namespace.clone(),
                            name: name.clone(),
                            uid: String::new(),
                            cluster: String::new(),
                        },
                        pool: String::new(),
                    },
                    TOKEN_LIFETIME,
                ),
            };
            cache.insert(key, (token.clone(), now + TOKEN_LIFETIME));
            (token, now + TOKEN_LIFETIME)
        }
    };
    let expires_in = expires.saturating_duration_since(now).as_secs().saturating_sub(1);
    Json(json!({"access_token": token, "expires_in": expires_in, "token_type": "Bearer"})).into_response()
}

fn id_token(config: &MetadataConfig, identity: &Identity, query: &BTreeMap<String, String>) -> Response {
    let audience = query.get("audience").map(|a| a.trim()).unwrap_or_default();
    if audience.is_empty() {
        return (StatusCode::BAD_REQUEST, "non-empty audience parameter required\n").into_response();
    }
    match identity {
        Identity::Federated { namespace, name } => (
            StatusCode::NOT_FOUND,
            format!(
                "Your Kubernetes service account ({namespace}/{name}) is not annotated with a target Google service account, which is a requirement for retrieving Identity Tokens using Workload Identity.\nPlease add the iam.gke.io/gcp-service-account=[GSA_NAME]@[PROJECT_ID] annotation to your Kubernetes service account.\nRefer to https://cloud.google.com/kubernetes-engine/docs/how-to/workload-identity\n"
            ),
        )
            .into_response(),
        Identity::ServiceAccount(email) => match config.fake.mint_id_token(email, audience, true) {
            Ok(token) => text(token),
            Err(e) => {
                tracing::error!(error = %e, "minting an ID token");
                StatusCode::INTERNAL_SERVER_ERROR.into_response()
            }
        },
    }
}
