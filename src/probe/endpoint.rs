//! The Endpoint stage's IO: the declared token sent to each `spec.endpoints` URL the way a client
//! sends it (GET, `Authorization: Bearer`, no automatic redirect; same-host redirects followed hop
//! by hop and recorded) and, when it is refused, the same token sent to the origin and the other
//! token type sent to the URL. The engine (`engine::stage::endpoint`) says what the answers mean.
//!
//! Where tokens go: only to hosts `--endpoint-allow` names, checked again before every request
//! (each hop, the origin); never through an HTTP proxy (the connection goes to the allowed host
//! itself); only in the `Authorization` header, marked sensitive; never logged.
//!
//! Timing: each (endpoint, identity) is requested at most once per interval, by a task of its own
//! with its own deadline ([`CHECK_DEADLINE`]), at most [`CONCURRENCY`] at once. A pass waits for
//! that task only until its start plus the prober's `wait`: a slower endpoint leaves the pass with
//! the previous answer (Unknown when there is none yet) and brings the next pass forward to when
//! the task must have ended, which then finds its answer. So an endpoint never holds the other
//! stages' verdicts for longer than the wait.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use reqwest::{Url, header};
use secrecy::SecretString;
use tokio::sync::{Semaphore, watch};

use crate::{
    api::{Reason, Stage},
    engine::{
        Finding,
        stage::endpoint::{self as stage, Attempt, End, EndpointAllow, EndpointPlan, Hop, MAX_HOPS, Next},
    },
    google::{client::error_chain, credentials::bearer},
    metrics::{EndpointOutcome, Metrics},
    redact,
};

/// No request to an endpoint takes longer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Nor do all the requests of one check (queueing for a slot, hops, the origin, the other type).
pub const CHECK_DEADLINE: Duration = Duration::from_secs(30);
/// A task's verdict is in at most this long after its deadline.
const VERDICT_MARGIN: Duration = Duration::from_secs(1);
/// How long an operator's pass waits for an endpoint check before going on without it.
pub const PASS_WAIT: Duration = Duration::from_secs(3);
/// Endpoint checks in flight at once, over all probes.
const CONCURRENCY: usize = 8;
/// Verdicts not renewed for this long are dropped (longer than the longest interval).
const EVICT_AFTER: Duration = Duration::from_secs(25 * 3600);

/// The tokens an endpoint check sends: the declared type, and the other type, sent only to learn
/// whether the endpoint expects that one (`None`: none could be had).
pub struct Tokens {
    /// The declared type.
    pub declared: SecretString,
    /// The other type.
    pub other: Option<SecretString>,
}

/// An endpoint's verdict for an identity, shared by all its KSAs: `None` when it passed.
type Verdict = Option<Finding>;
/// An endpoint and the identity (`serviceAccount:GSA` or a principal) whose token it is sent.
type Key = (EndpointPlan, String);

struct Slot {
    started: Instant,
    /// The verdict of the request started then, once it has one.
    done: watch::Receiver<Option<Verdict>>,
    /// The verdict of the last request that finished.
    last: Option<Verdict>,
}

/// What a pass learned of one endpoint for one KSA.
#[derive(Debug)]
pub struct Checked {
    /// Why the KSA does not pass, if it does not.
    pub finding: Option<Finding>,
    /// The request is still running: it ends by then, and a pass then finds its verdict.
    pub pending_until: Option<Instant>,
}

/// Sends endpoint requests for every probe, and keeps their verdicts for an interval.
pub struct EndpointProber {
    http: reqwest::Client,
    allow: EndpointAllow,
    metrics: Arc<Metrics>,
    wait: Duration,
    permits: Arc<Semaphore>,
    slots: Arc<Mutex<HashMap<Key, Slot>>>,
}

fn lock(slots: &Mutex<HashMap<Key, Slot>>) -> MutexGuard<'_, HashMap<Key, Slot>> {
    slots.lock().unwrap_or_else(PoisonError::into_inner)
}

impl EndpointProber {
    /// A prober sending tokens only where `allow` lets it; passes wait `wait` for each check
    /// (the operator [`PASS_WAIT`]; `authprobe check`, which has no next pass, [`CHECK_DEADLINE`]).
    pub fn new(allow: EndpointAllow, metrics: Arc<Metrics>, wait: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .user_agent(concat!("authprobe/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            http,
            allow,
            metrics,
            wait,
            permits: Arc::new(Semaphore::new(CONCURRENCY)),
            slots: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    /// The hosts tokens may go to.
    pub fn allow(&self) -> &EndpointAllow {
        &self.allow
    }

    /// The verdict on `endpoint` for `identity`, as KSA `who` reports it: from a request made
    /// less than `max_age` ago or in flight, else from a new one sent with `tokens` (awaited only
    /// then; its failure is the KSA's finding). `probe` is counted in the metrics for new requests.
    pub async fn check(
        &self,
        probe: &str,
        who: &str,
        endpoint: &EndpointPlan,
        identity: &str,
        max_age: Duration,
        tokens: impl Future<Output = Result<Tokens, Finding>>,
    ) -> Checked {
        let key = (endpoint.clone(), identity.to_string());
        let (started, mut done, last) = match self.current(&key, max_age) {
            Some(current) => current,
            None => match tokens.await {
                Ok(tokens) => self.start(key, max_age, probe, tokens),
                Err(finding) => return Checked { finding: Some(finding), pending_until: None },
            },
        };
        let deadline = tokio::time::Instant::from_std(started + self.wait);
        let answered = match tokio::time::timeout_at(deadline, done.wait_for(Option::is_some)).await {
            Ok(Ok(verdict)) => verdict.clone(),
            _ => None,
        };
        let (verdict, pending_until) = match answered {
            Some(verdict) => (verdict, None),
            None => {
                let pending = Finding::unknown(
                    Stage::Endpoint,
                    Reason::EndpointUnavailable,
                    format!(
                        "{} has not answered {identity}'s request within {:?}; the next pass reports its answer",
                        endpoint.name(),
                        self.wait
                    ),
                );
                (last.unwrap_or(Some(pending)), Some(started + CHECK_DEADLINE + VERDICT_MARGIN))
            }
        };
        Checked { finding: verdict.map(|f| stage::for_ksa(who, &f)), pending_until }
    }

    /// The request for `key` in flight, or finished less than `max_age` ago.
    fn current(
        &self,
        key: &Key,
        max_age: Duration,
    ) -> Option<(Instant, watch::Receiver<Option<Verdict>>, Option<Verdict>)> {
        let slots = lock(&self.slots);
        let slot = slots.get(key)?;
        let in_flight = slot.done.borrow().is_none();
        (in_flight || slot.started.elapsed() < max_age)
            .then(|| (slot.started, slot.done.clone(), slot.last.clone()))
    }

    /// Starts the request for `key` in a task of its own, unless another KSA of the identity
    /// started one while this one's tokens were minted.
    fn start(
        &self,
        key: Key,
        max_age: Duration,
        probe: &str,
        tokens: Tokens,
    ) -> (Instant, watch::Receiver<Option<Verdict>>, Option<Verdict>) {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get(&key)
            && (slot.done.borrow().is_none() || slot.started.elapsed() < max_age)
        {
            return (slot.started, slot.done.clone(), slot.last.clone());
        }
        let last = slots.get(&key).and_then(|s| s.last.clone());
        slots.retain(|_, s| s.started.elapsed() < EVICT_AFTER);
        let started = Instant::now();
        let (tx, done) = watch::channel(None);
        slots.insert(key.clone(), Slot { started, done: done.clone(), last: last.clone() });
        drop(slots);

        let request = Request {
            http: self.http.clone(),
            allow: self.allow.clone(),
            metrics: self.metrics.clone(),
            probe: probe.to_string(),
        };
        let (permits, slots) = (self.permits.clone(), self.slots.clone());
        tokio::spawn(async move {
            let (endpoint, identity) = &key;
            let checked = tokio::time::timeout(CHECK_DEADLINE, async {
                // The semaphore is never closed; were it, the check would run unqueued.
                let _permit = permits.acquire().await;
                request.run(endpoint, identity, &tokens).await
            })
            .await;
            let verdict = checked.unwrap_or_else(|_| {
                Some(Finding::unknown(
                    Stage::Endpoint,
                    Reason::EndpointUnavailable,
                    format!(
                        "{} could not be checked for {identity}: no verdict within {CHECK_DEADLINE:?}; nothing in the namespace is known to be at fault",
                        endpoint.name()
                    ),
                ))
            });
            drop(tokens);
            if let Some(slot) = lock(&slots).get_mut(&key).filter(|s| s.started == started) {
                slot.last = Some(verdict.clone());
            }
            let _ = tx.send(Some(verdict));
        });
        (started, done, last)
    }
}

/// One check's requests.
struct Request {
    http: reqwest::Client,
    allow: EndpointAllow,
    metrics: Arc<Metrics>,
    probe: String,
}

/// The parts of an answer the stage reads.
struct Answer {
    status: u16,
    location: Option<String>,
    challenge: Option<String>,
}

impl Request {
    async fn run(&self, endpoint: &EndpointPlan, identity: &str, tokens: &Tokens) -> Verdict {
        let declared = self.attempt(&endpoint.url, &tokens.declared).await;
        let (mut origin, mut other) = (None, None);
        if declared.refused() {
            if let Some(url) = &endpoint.origin {
                origin = Some(self.attempt(url, &tokens.declared).await);
            }
            if !origin.as_ref().is_some_and(Attempt::accepted)
                && let Some(token) = &tokens.other
            {
                other = Some(self.attempt(&endpoint.url, token).await);
            }
        }
        stage::classify(endpoint, identity, &declared, origin.as_ref(), other.as_ref())
    }

    /// `token` sent to `start`, following redirects on the same host.
    async fn attempt(&self, start: &Url, token: &SecretString) -> Attempt {
        let mut hops = Vec::new();
        let mut url = start.clone();
        while hops.len() < MAX_HOPS {
            // Every request, each hop included, goes only where the operator allows.
            if self.allow.admits(&url).is_err() {
                return Attempt { hops, end: End::Redirected { to: url.to_string() } };
            }
            let answer = self.send(&url, token).await;
            tracing::debug!(
                probe = %self.probe,
                host = url.host_str().unwrap_or_default(),
                path = url.path(),
                status = answer.as_ref().map_or(0, |a| a.status),
                "endpoint request"
            );
            let answer = match answer {
                Ok(answer) => answer,
                Err(detail) => {
                    hops.push(Hop { url: url.to_string(), status: None });
                    return Attempt { hops, end: End::Unreachable { detail } };
                }
            };
            hops.push(Hop { url: url.to_string(), status: Some(answer.status) });
            match stage::next_hop(&url, answer.status, answer.location.as_deref()) {
                Next::Done => {
                    return Attempt {
                        hops,
                        end: End::Answered { status: answer.status, challenge: answer.challenge },
                    };
                }
                Next::Follow(next) => url = next,
                Next::Leave(to) => return Attempt { hops, end: End::Redirected { to: to.to_string() } },
                Next::Broken(detail) => return Attempt { hops, end: End::Unreachable { detail } },
            }
        }
        Attempt { hops, end: End::Unreachable { detail: format!("more than {MAX_HOPS} redirects") } }
    }

    /// One GET with the token; the error says, redacted, why there is no answer.
    async fn send(&self, url: &Url, token: &SecretString) -> Result<Answer, String> {
        let authorization = bearer(token).map_err(|e| e.to_string())?;
        let sent = self.http.get(url.clone()).header(header::AUTHORIZATION, authorization).send().await;
        let response = match sent {
            Ok(response) => response,
            Err(e) => {
                let outcome =
                    if e.is_timeout() { EndpointOutcome::Timeout } else { EndpointOutcome::Unreachable };
                self.metrics.endpoint_request(&self.probe, outcome);
                return Err(redact::upstream(&error_chain(&e)));
            }
        };
        let status = response.status().as_u16();
        self.metrics.endpoint_request(&self.probe, EndpointOutcome::of_status(status));
        let text = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(|v| redact::cut(&redact::upstream(v), 512))
        };
        // The body is never read: the verdict rests on the status and headers alone.
        Ok(Answer { status, location: text(header::LOCATION), challenge: text(header::WWW_AUTHENTICATE) })
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::{Router, http::StatusCode, routing::get};

    use super::*;
    use crate::api::{Endpoint, TokenType};

    async fn serve(app: Router) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    fn endpoint(url: String) -> EndpointPlan {
        let spec = Endpoint { url, token_type: TokenType::AccessToken, audience: None, origin: None };
        EndpointPlan::parse(&spec, crate::api::Access::Impersonation).unwrap()
    }

    fn prober(wait: Duration) -> EndpointProber {
        let allow = EndpointAllow::new(vec!["127.0.0.1".parse().unwrap()]);
        EndpointProber::new(allow, Arc::new(Metrics::new()), wait).unwrap()
    }

    fn tokens() -> Result<Tokens, Finding> {
        Ok(Tokens { declared: SecretString::from("t0ken"), other: None })
    }

    #[tokio::test]
    async fn one_request_per_interval_is_shared_and_a_slow_answer_is_not_waited_for() {
        let hits = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = hits.clone();
        let (release, released) = watch::channel(false);
        let app = Router::new().route(
            "/slow",
            get(move || {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut released = released.clone();
                async move {
                    let _ = released.wait_for(|r| *r).await;
                    StatusCode::OK
                }
            }),
        );
        let addr = serve(app).await;
        let prober = prober(Duration::from_millis(200));
        let e = endpoint(format!("http://{addr}/slow"));
        let hour = Duration::from_secs(3600);
        let first = prober.check("p", "w", &e, "id", hour, async { tokens() }).await;
        let pending = first.finding.expect("no verdict yet");
        assert_eq!(
            (pending.reason, pending.verdict),
            (Reason::EndpointUnavailable, crate::engine::Verdict::Unknown)
        );
        assert!(first.pending_until.is_some());
        // A second KSA of the identity joins the request in flight: no second request, no token needed.
        let joined = prober.check("p", "w2", &e, "id", hour, async { unreachable_tokens() }).await;
        assert!(joined.pending_until.is_some());
        release.send(true).unwrap();
        let mut done = prober.current(&(e.clone(), "id".into()), hour).unwrap().1;
        done.wait_for(Option::is_some).await.unwrap();
        let answered = prober.check("p", "w", &e, "id", hour, async { unreachable_tokens() }).await;
        assert!(answered.finding.is_none() && answered.pending_until.is_none(), "{answered:?}");
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    fn unreachable_tokens() -> Result<Tokens, Finding> {
        Err(Finding::fail(Stage::Endpoint, Reason::EndpointRejected, "tokens were asked for again"))
    }

    #[tokio::test]
    async fn the_token_goes_only_in_the_authorization_header_and_redirects_stop_at_the_host() {
        let app = Router::new()
            .route(
                "/ok",
                get(|headers: axum::http::HeaderMap| async move {
                    if headers.get("authorization").and_then(|v| v.to_str().ok()) == Some("Bearer t0ken") {
                        StatusCode::OK
                    } else {
                        StatusCode::UNAUTHORIZED
                    }
                }),
            )
            .route("/same", get(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "/ok")]) }))
            .route(
                "/away",
                get(|| async { (StatusCode::TEMPORARY_REDIRECT, [("location", "http://127.0.0.2:9/x")]) }),
            );
        let addr = serve(app).await;
        let prober = prober(CHECK_DEADLINE);
        let hour = Duration::from_secs(3600);
        let same = endpoint(format!("http://{addr}/same"));
        assert!(prober.check("p", "w", &same, "id", hour, async { tokens() }).await.finding.is_none());
        let away = prober
            .check("p", "w", &endpoint(format!("http://{addr}/away")), "id", hour, async { tokens() })
            .await;
        let f = away.finding.unwrap();
        assert_eq!(f.reason, Reason::CrossHostRedirect);
        assert!(f.message.starts_with("w: ") && f.message.contains("127.0.0.2:9"), "{}", f.message);
        let text = prober.metrics.encode().unwrap();
        assert!(
            text.contains(r#"authprobe_endpoint_requests_total{probe="p",outcome="redirect"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"authprobe_endpoint_requests_total{probe="p",outcome="ok"} 1"#), "{text}");
    }
}
