//! The live chain, run from the controller without a pod: TokenRequest for the KSA (one audience,
//! 600 s) → GKE identity-binding token or Federation STS exchange → `generateAccessToken` on the
//! GSA → `testIamPermissions` on each target (and, for a Cloud Run target, `generateIdToken` on
//! the GSA for its audience, with the token's claims checked) → each of `spec.endpoints`, sent the
//! declared token through the real path (see [`super::endpoint`]), concurrently with the targets.
//!
//! Tokens exist only in memory: the KSA token only until it is exchanged, the federated, GSA and ID
//! tokens in a cache (so that probes sharing a KSA and audience share one exchange per interval)
//! until the earlier of their expiry and the interval. They are sent only to the configured
//! Google endpoints and the allowed `spec.endpoints` hosts, and never logged, returned in
//! messages, or written anywhere.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures::future::join_all;

use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::ServiceAccount,
    },
    jiff::Timestamp,
};
use kube::api::PostParams;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

use super::endpoint::{Checked, EndpointProber, Tokens};
use crate::{
    api::{Access, Reason, Stage, TokenType},
    engine::{
        Finding, Ksa, Plan, TokenClaims,
        annotation::GsaEmail,
        principal::KsaIdentity,
        stage::{
            chain::{self as classify, Issued, TokenRequestFailure, Upstream},
            cloud_run::{self, RunServices},
            endpoint::{self as endpoint_stage, EndpointPlan},
        },
        target::TargetKind,
    },
    fence::Fence,
    google::{
        Google,
        client::{Answer, Api, Auth, Body, SendError},
        describe, error_parts,
    },
    metrics::Metrics,
    redact,
};

const CLOUD_PLATFORM: &str = "https://www.googleapis.com/auth/cloud-platform";
/// TokenRequest's minimum, and all a probe needs.
const KSA_TOKEN_SECONDS: i64 = 600;
/// No Kubernetes call of the chain waits longer for its answer.
pub const KUBE_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// A cached token is not used within this long of its expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(60);
/// Cached tokens never outlive Google's longest access-token lifetime.
const TOKEN_CACHE_EVICTION: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ExchangeKey {
    namespace: String,
    name: String,
    uid: String,
    audience: String,
}

/// A bearer token and when to stop using it.
#[derive(Clone)]
struct Credential {
    token: SecretString,
    usable_until: Instant,
}

/// What minting and exchanging one KSA's token gave.
#[derive(Clone)]
pub struct Exchange {
    /// The minted token's claims and key id, for the provider checks; or why none was minted.
    minted: Result<(Value, Option<String>), Finding>,
    /// The federated token, or why the exchange failed; `None` when nothing was minted.
    federated: Option<Result<Credential, Finding>>,
    /// Google's clock minus the cluster's, from the two answers' `Date` headers.
    skew: Option<i64>,
}

impl Exchange {
    /// The minted token's claims, for the provider stage.
    pub fn claims(&self) -> Option<TokenClaims<'_>> {
        self.minted.as_ref().ok().map(|(claims, kid)| TokenClaims { claims, kid: kid.as_deref() })
    }

    /// The minted token's claims and key id (never the token), for the schedule to carry.
    pub fn minted_claims(&self) -> Option<crate::engine::schedule::MintedClaims> {
        self.minted.as_ref().ok().map(|c| Arc::new(c.clone()))
    }
}

/// The chain's state shared by every probe.
pub struct Chain {
    kube: kube::Client,
    fence: Arc<Fence>,
    google: Arc<Google>,
    metrics: Arc<Metrics>,
    exchanges: crate::google::cache::FetchCache<ExchangeKey, Arc<Exchange>>,
    impersonations: crate::google::cache::FetchCache<(ExchangeKey, String), Result<Credential, Finding>>,
    /// ID tokens by KSA, GSA and audience.
    id_tokens: crate::google::cache::FetchCache<(ExchangeKey, String, String), Result<Credential, Finding>>,
    endpoints: Arc<EndpointProber>,
}

/// One KSA's part of a pass, for [`Chain::verify`].
#[derive(Clone, Copy)]
pub struct Job<'a> {
    /// The probe whose pass this is (endpoint requests are counted for it).
    pub probe: &'a str,
    /// Its plan.
    pub plan: &'a Plan,
    /// The KSA.
    pub ksa: &'a Ksa,
    /// The GSA it impersonates (`access: Impersonation`).
    pub gsa: Option<&'a GsaEmail>,
    /// The principal it maps to.
    pub identity: &'a KsaIdentity,
    /// Its minted and exchanged token.
    pub exchange: &'a Exchange,
    /// The Cloud Run services the targets name, as the operator read them.
    pub run_services: &'a RunServices,
    /// Results older than this are fetched again.
    pub max_age: Duration,
    /// When the pass started: an endpoint request any KSA sent since is reused, whatever `max_age`.
    pub pass_started: Instant,
}

/// What [`Chain::verify`] found.
#[derive(Debug)]
pub struct Verified {
    /// The chain's verdict, the endpoints' merged in.
    pub result: Result<(), Finding>,
    /// An endpoint's answer is still on its way: it has one by then.
    pub pending_until: Option<Instant>,
}

/// The identity's tokens once exchange and impersonation succeeded.
struct Granted {
    /// The federated token.
    federated: Credential,
    /// The access token the targets are tested with: the GSA's, or (Direct) the federated one.
    access: Credential,
    /// Whose it is: `serviceAccount:GSA` or the principal.
    as_who: String,
    /// Whether `access` is the federated token.
    federated_only: bool,
}

/// `ServiceAccount NS/NAME`, as every message names a KSA.
pub(crate) fn who(ksa: &Ksa) -> String {
    format!("ServiceAccount {}/{}", ksa.namespace, ksa.name)
}

fn usable(credential: &Result<Credential, Finding>) -> bool {
    credential.as_ref().is_ok_and(|c| Instant::now() < c.usable_until)
}

impl Chain {
    /// A chain minting through `kube`, exchanging through `google` and probing `endpoints`.
    pub fn new(
        kube: kube::Client,
        google: Arc<Google>,
        metrics: Arc<Metrics>,
        fence: Arc<Fence>,
        endpoints: Arc<EndpointProber>,
    ) -> Self {
        Self {
            kube,
            fence,
            google,
            metrics,
            exchanges: crate::google::cache::FetchCache::evicting_after(TOKEN_CACHE_EVICTION),
            impersonations: crate::google::cache::FetchCache::evicting_after(TOKEN_CACHE_EVICTION),
            id_tokens: crate::google::cache::FetchCache::evicting_after(TOKEN_CACHE_EVICTION),
            endpoints,
        }
    }

    fn key(plan: &Plan, ksa: &Ksa) -> ExchangeKey {
        ExchangeKey {
            namespace: ksa.namespace.clone(),
            name: ksa.name.clone(),
            uid: ksa.uid.clone(),
            audience: Self::token_audience(plan),
        }
    }

    /// The audience KSA tokens are minted for.
    pub fn token_audience(plan: &Plan) -> String {
        match &plan.federation {
            Some(f) => f.audience.clone(),
            None => format!("{}.svc.id.goog", plan.project_id.as_deref().unwrap_or_default()),
        }
    }

    /// Mints and exchanges the KSA's token, at most once per `max_age` for all probes.
    pub async fn exchange(&self, plan: &Plan, ksa: &Ksa, max_age: Duration) -> Arc<Exchange> {
        let key = Self::key(plan, ksa);
        let fresh = |e: &Arc<Exchange>| e.federated.as_ref().is_none_or(|f| f.is_err() || usable(f));
        self.exchanges
            .get_fresh(&key, max_age, fresh, async {
                Arc::new(self.mint_and_exchange(plan, ksa, &key.audience).await)
            })
            .await
            .0
    }

    async fn mint_and_exchange(&self, plan: &Plan, ksa: &Ksa, audience: &str) -> Exchange {
        let token = match self.mint(ksa, audience).await {
            Ok(token) => token,
            Err(f) => return Exchange { minted: Err(f), federated: None, skew: None },
        };
        let claims = decode_claims(&token);
        // The token's iat is the API server's clock when it minted it.
        let cluster_time = claims.as_ref().ok().and_then(|(c, _)| c["iat"].as_i64());
        let (answer, url_target) = match &plan.federation {
            Some(f) => {
                let body = Body::Form(vec![
                    ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange".into()),
                    ("audience", format!("//iam.googleapis.com/{}", f.provider)),
                    ("scope", CLOUD_PLATFORM.into()),
                    ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token".into()),
                    ("subject_token", token.expose_secret().to_string()),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt".into()),
                ]);
                (
                    self.post(Api::StsToken, "sts", "/v1/token", &body, Auth::None).await,
                    format!("provider {}", f.provider),
                )
            }
            None => {
                let trust = Self::token_audience(plan);
                let cluster = plan.cluster_url.clone().unwrap_or_default();
                let identity_namespace = format!("identitynamespace:{trust}:{cluster}");
                let body = Body::Json(json!({
                    "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                    "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                    "requested_token_type": "urn:ietf:params:oauth:token-type:access_token",
                    "subject_token": token.expose_secret(),
                    "audience": identity_namespace,
                    "scope": CLOUD_PLATFORM,
                }));
                (
                    self.post(
                        Api::IdentityBindingToken,
                        "securetoken",
                        "/v1/identitybindingtoken",
                        &body,
                        Auth::None,
                    )
                    .await,
                    format!("identity namespace {trust}"),
                )
            }
        };
        drop(token);
        let skew = match (&answer, cluster_time) {
            (Ok(a), Some(cluster)) => a.date.map(|google| google.as_second() - cluster),
            _ => None,
        };
        let federated = Some(match answer {
            Ok(a) if a.status.is_success() => credential(
                Stage::TokenExchange,
                classify::exchanged_token(&a.body, Duration::from_secs(KSA_TOKEN_SECONDS.unsigned_abs())),
            ),
            Ok(a) => {
                Err(read_upstream(&a, |upstream| classify::exchange(upstream, &who(ksa), &url_target, skew)))
            }
            Err(e) => Err(unreachable(Stage::TokenExchange, &e)),
        });
        Exchange {
            minted: claims.map_err(|e| {
                Finding::unknown(
                    Stage::TokenExchange,
                    Reason::GoogleUnavailable,
                    format!("the minted token does not decode: {e}"),
                )
            }),
            federated,
            skew,
        }
    }

    /// TokenRequest for one audience and 600 s.
    async fn mint(&self, ksa: &Ksa, audience: &str) -> Result<SecretString, Finding> {
        if !self.fence.holds_for(KUBE_CALL_TIMEOUT) {
            return Err(classify::token_request(&TokenRequestFailure::NotLeading, &who(ksa)));
        }
        let api = kube::Api::<ServiceAccount>::namespaced(self.kube.clone(), &ksa.namespace);
        let request = TokenRequest {
            spec: Some(TokenRequestSpec {
                audiences: Some(vec![audience.to_string()]),
                expiration_seconds: Some(KSA_TOKEN_SECONDS),
                ..Default::default()
            }),
            ..Default::default()
        };
        let answer = tokio::time::timeout(
            KUBE_CALL_TIMEOUT,
            api.create_token_request(&ksa.name, &PostParams::default(), &request),
        )
        .await;
        let failure = match answer {
            Ok(Ok(minted)) => match minted.status.and_then(|s| s.token).filter(|t| !t.is_empty()) {
                Some(token) => {
                    self.metrics.token_minted();
                    return Ok(SecretString::from(token));
                }
                None => TokenRequestFailure::Empty,
            },
            Ok(Err(kube::Error::Api(status))) => {
                TokenRequestFailure::Status { code: status.code, message: redact::upstream(&status.message) }
            }
            Ok(Err(other)) => TokenRequestFailure::Unreachable(redact::upstream(&other.to_string())),
            Err(_) => TokenRequestFailure::Unreachable(format!("no answer within {KUBE_CALL_TIMEOUT:?}")),
        };
        Err(classify::token_request(&failure, &who(ksa)))
    }

    async fn post(
        &self,
        api: Api,
        service: &str,
        path: &str,
        body: &Body,
        auth: Auth<'_>,
    ) -> Result<Answer, SendError> {
        let url = self.google.endpoints().url(service, path).map_err(SendError::Url)?;
        self.google.client().send(api, Method::POST, url, body, auth).await
    }

    /// The rest of the chain for a KSA whose mapping checks passed: clock skew, the exchange's
    /// outcome, impersonation, then the targets and the endpoints side by side.
    pub async fn verify(&self, job: &Job<'_>) -> Verified {
        let granted = match self.grant(job).await {
            Ok(granted) => granted,
            Err(finding) => return Verified { result: Err(finding), pending_until: None },
        };
        let (targets, endpoints) = tokio::join!(self.targets(job, &granted), self.endpoints(job, &granted));
        Verified {
            result: endpoint_stage::merge(
                targets,
                endpoints.iter().filter_map(|c| c.finding.clone()).collect(),
            ),
            pending_until: endpoints.iter().filter_map(|c| c.pending_until).min(),
        }
    }

    /// Clock skew, the exchange's outcome and impersonation.
    async fn grant(&self, job: &Job<'_>) -> Result<Granted, Finding> {
        let (ksa, exchange) = (job.ksa, job.exchange);
        exchange.minted.as_ref().map_err(Clone::clone)?;
        if let Some(finding) = exchange.skew.and_then(|s| classify::clock_skew(&who(ksa), s)) {
            return Err(finding);
        }
        let federated = match &exchange.federated {
            Some(Ok(c)) => c.clone(),
            Some(Err(f)) => return Err(f.clone()),
            None => {
                return Err(Finding::unknown(
                    Stage::TokenExchange,
                    Reason::GoogleUnavailable,
                    "no exchange ran",
                ));
            }
        };
        let principal = job.identity.principal();
        match (job.plan.access, job.gsa) {
            (Access::Impersonation, Some(gsa)) => {
                let key = (Self::key(job.plan, ksa), gsa.to_string());
                let fetch = self.impersonate(ksa, gsa, &principal, &federated);
                let access = self.impersonations.get_fresh(&key, job.max_age, usable, fetch).await.0?;
                Ok(Granted {
                    federated,
                    access,
                    as_who: format!("serviceAccount:{gsa}"),
                    federated_only: false,
                })
            }
            _ => {
                Ok(Granted { access: federated.clone(), federated, as_who: principal, federated_only: true })
            }
        }
    }

    /// The targets, in spec order; a Cloud Run target's service must accept its audience, and
    /// the GSA must get an ID token for it.
    async fn targets(&self, job: &Job<'_>, granted: &Granted) -> Result<(), Finding> {
        for target in &job.plan.targets {
            let Some(invocation) = cloud_run::check_target(&who(job.ksa), target, job.run_services) else {
                self.test_target(job.ksa, granted, &target.kind, &target.resource, &target.permissions)
                    .await?;
                continue;
            };
            let invocation = invocation?;
            if !invocation.permissions.is_empty() {
                self.test_target(job.ksa, granted, &target.kind, &target.resource, &invocation.permissions)
                    .await?;
            }
            // Only a service account gets an ID token; the plan refuses Cloud Run under Direct.
            if let Some(gsa) = job.gsa {
                self.id_token(job, gsa, &granted.federated, &invocation.audience).await?;
            }
        }
        Ok(())
    }

    /// Every endpoint, concurrently: the declared token and the other type's, minted only if the
    /// endpoint's verdict for this identity must be renewed.
    async fn endpoints(&self, job: &Job<'_>, granted: &Granted) -> Vec<Checked> {
        let max_age = job.max_age.max(job.pass_started.elapsed());
        let who = who(job.ksa);
        join_all(job.plan.endpoints.iter().map(|endpoint| {
            let tokens = self.endpoint_tokens(job, granted, endpoint);
            self.endpoints.check(job.probe, &who, endpoint, &granted.as_who, max_age, tokens)
        }))
        .await
    }

    async fn endpoint_tokens(
        &self,
        job: &Job<'_>,
        granted: &Granted,
        endpoint: &EndpointPlan,
    ) -> Result<Tokens, Finding> {
        let access = granted.access.token.clone();
        let id = match job.gsa {
            Some(gsa) => Some(self.id_token(job, gsa, &granted.federated, &endpoint.audience).await),
            None => None,
        };
        match (endpoint.token_type, id) {
            (TokenType::AccessToken, id) => {
                Ok(Tokens { declared: access, other: id.and_then(Result::ok).map(|c| c.token) })
            }
            (TokenType::IdToken, Some(id)) => Ok(Tokens { declared: id?.token, other: Some(access) }),
            // The plan refuses IDToken endpoints under Direct, where no service account mints one.
            (TokenType::IdToken, None) => Err(Finding::unknown(
                Stage::Endpoint,
                Reason::EndpointUnavailable,
                format!(
                    "{}: {} needs an ID token, which only a Google service account gets",
                    who(job.ksa),
                    endpoint.name()
                ),
            )),
        }
    }

    /// An ID token of `gsa` for `audience`, minted with the KSA's federated token at most once per
    /// interval, its claims checked.
    async fn id_token(
        &self,
        job: &Job<'_>,
        gsa: &GsaEmail,
        federated: &Credential,
        audience: &str,
    ) -> Result<Credential, Finding> {
        let key = (Self::key(job.plan, job.ksa), gsa.to_string(), audience.to_string());
        let principal = job.identity.principal();
        let fetch = self.mint_id_token(job.ksa, gsa, &principal, federated, audience);
        self.id_tokens.get_fresh(&key, job.max_age, usable, fetch).await.0
    }

    async fn mint_id_token(
        &self,
        ksa: &Ksa,
        gsa: &GsaEmail,
        principal: &str,
        federated: &Credential,
        audience: &str,
    ) -> Result<Credential, Finding> {
        let body = Body::Json(json!({"audience": audience, "includeEmail": true}));
        let path = format!("/v1/projects/-/serviceAccounts/{gsa}:generateIdToken");
        let answer = match self
            .post(Api::GenerateIdToken, "iamcredentials", &path, &body, Auth::Bearer(&federated.token))
            .await
        {
            Ok(a) if a.status.is_success() => a,
            Ok(a) => {
                return Err(read_upstream(&a, |upstream| {
                    classify::id_token_denied(upstream, &who(ksa), principal, gsa.as_str())
                }));
            }
            Err(e) => return Err(unreachable(Stage::Impersonation, &e)),
        };
        let token = classify::generated_id_token(&answer.body)
            .map_err(|e| Finding::unknown(Stage::Target, Reason::GoogleUnavailable, e))?;
        let token = SecretString::from(token);
        let claims = decode_claims(&token).map(|(claims, _)| claims);
        let claims = claims.as_ref().map_err(String::as_str);
        let lifetime =
            cloud_run::id_token(&who(ksa), gsa.as_str(), audience, claims, Timestamp::now().as_second())?;
        Ok(Credential { token, usable_until: Instant::now() + lifetime.saturating_sub(EXPIRY_MARGIN) })
    }

    async fn impersonate(
        &self,
        ksa: &Ksa,
        gsa: &GsaEmail,
        principal: &str,
        federated: &Credential,
    ) -> Result<Credential, Finding> {
        let body =
            Body::Json(json!({"scope": [CLOUD_PLATFORM], "lifetime": format!("{KSA_TOKEN_SECONDS}s")}));
        let path = format!("/v1/projects/-/serviceAccounts/{gsa}:generateAccessToken");
        match self
            .post(Api::GenerateAccessToken, "iamcredentials", &path, &body, Auth::Bearer(&federated.token))
            .await
        {
            Ok(a) if a.status.is_success() => {
                credential(Stage::Impersonation, classify::generated_token(&a.body, Timestamp::now()))
            }
            Ok(a) => Err(read_upstream(&a, |upstream| {
                classify::impersonation(upstream, &who(ksa), principal, gsa.as_str())
            })),
            Err(e) => Err(unreachable(Stage::Impersonation, &e)),
        }
    }

    async fn test_target(
        &self,
        ksa: &Ksa,
        granted: &Granted,
        kind: &TargetKind,
        resource: &str,
        permissions: &[String],
    ) -> Result<(), Finding> {
        let (as_who, token, federated) = (&granted.as_who, &granted.access.token, granted.federated_only);
        let api = Api::TestIamPermissions(kind.service());
        let path = kind.test_permissions_path();
        let answer = if matches!(kind, TargetKind::Bucket { .. }) {
            let query: String = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(permissions.iter().map(|p| ("permissions", p)))
                .finish();
            let url = self
                .google
                .endpoints()
                .url(kind.service(), &format!("{path}?{query}"))
                .map_err(|e| unreachable(Stage::Target, &SendError::Url(e)))?;
            self.google.client().send(api, Method::GET, url, &Body::Empty, Auth::Bearer(token)).await
        } else {
            let body = Body::Json(json!({"permissions": permissions}));
            self.post(api, kind.service(), &path, &body, Auth::Bearer(token)).await
        };
        let answer = answer.map_err(|e| unreachable(Stage::Target, &e))?;
        let missing: Vec<String> = if answer.status == StatusCode::OK {
            let held = classify::held_permissions(&answer.body).map_err(|e| {
                Finding::unknown(Stage::Target, Reason::GoogleUnavailable, format!("{resource}: {e}"))
            })?;
            permissions.iter().filter(|p| !held.contains(p)).cloned().collect()
        } else {
            vec![]
        };
        read_upstream(&answer, |upstream| {
            classify::target(upstream, &who(ksa), as_who, resource, &missing, federated)
        })
        .map_or(Ok(()), Err)
    }
}

/// Hands `classify` the answer as the engine reads it: code and description from the error
/// envelope, both redacted, and the whole answer as shown to users.
fn read_upstream<T>(answer: &Answer, classify: impl FnOnce(&Upstream<'_>) -> T) -> T {
    let (code, description) = error_parts(answer);
    let description = redact::upstream(&description);
    let shown = describe(answer);
    classify(&Upstream {
        status: answer.status.as_u16(),
        code: &code,
        description: &description,
        shown: &shown,
    })
}

/// A credential from a token Google issued; a malformed answer is Unknown, never a verdict.
fn credential(stage: Stage, issued: Result<Issued, String>) -> Result<Credential, Finding> {
    let issued = issued.map_err(|e| Finding::unknown(stage, Reason::GoogleUnavailable, e))?;
    Ok(Credential {
        token: SecretString::from(issued.token),
        usable_until: Instant::now() + issued.lifetime.saturating_sub(EXPIRY_MARGIN),
    })
}

fn unreachable(stage: Stage, e: &SendError) -> Finding {
    match e {
        SendError::Credentials(c) => Finding::unknown(stage, Reason::CheckerUnauthenticated, c.to_string()),
        other => Finding::unknown(stage, Reason::GoogleUnavailable, redact::upstream(&other.to_string())),
    }
}

/// The unverified payload and `kid` of a JWT just minted by the API server or Google, which
/// this process received itself over the connection it opened.
fn decode_claims(token: &SecretString) -> Result<(Value, Option<String>), String> {
    jsonwebtoken::dangerous::insecure_decode::<Value>(token.expose_secret())
        .map(|data| (data.claims, data.header.kid))
        .map_err(|e| e.to_string())
}
