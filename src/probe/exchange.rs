//! The live chain, run from the controller without a pod: TokenRequest for the KSA (one audience,
//! 600 s) → GKE identity-binding token or Federation STS exchange → `generateAccessToken` on the
//! GSA → `testIamPermissions` on each target.
//!
//! Tokens exist only in memory: the KSA token only until it is exchanged, the federated and GSA
//! tokens in a cache (so that probes sharing a KSA and audience share one exchange per interval)
//! until the earlier of their expiry and the interval. They are sent only to the configured
//! Google endpoints and never logged, returned in messages, or written anywhere.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

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

use crate::{
    api::{Access, Reason, Stage},
    engine::{
        Finding, Ksa, Plan, TokenClaims,
        annotation::GsaEmail,
        principal::KsaIdentity,
        stage::chain::{self as classify, Issued, TokenRequestFailure, Upstream},
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
}

/// The chain's state shared by every probe.
pub struct Chain {
    kube: kube::Client,
    fence: Arc<Fence>,
    google: Arc<Google>,
    metrics: Arc<Metrics>,
    exchanges: crate::google::cache::FetchCache<ExchangeKey, Arc<Exchange>>,
    impersonations: crate::google::cache::FetchCache<(ExchangeKey, String), Result<Credential, Finding>>,
}

fn who(ksa: &Ksa) -> String {
    format!("ServiceAccount {}/{}", ksa.namespace, ksa.name)
}

fn usable(credential: &Result<Credential, Finding>) -> bool {
    credential.as_ref().is_ok_and(|c| Instant::now() < c.usable_until)
}

impl Chain {
    /// A chain minting through `kube` and exchanging through `google`.
    pub fn new(kube: kube::Client, google: Arc<Google>, metrics: Arc<Metrics>, fence: Arc<Fence>) -> Self {
        Self {
            kube,
            fence,
            google,
            metrics,
            exchanges: crate::google::cache::FetchCache::evicting_after(TOKEN_CACHE_EVICTION),
            impersonations: crate::google::cache::FetchCache::evicting_after(TOKEN_CACHE_EVICTION),
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
        let key = ExchangeKey {
            namespace: ksa.namespace.clone(),
            name: ksa.name.clone(),
            uid: ksa.uid.clone(),
            audience: Self::token_audience(plan),
        };
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
            minted: claims.map_err(|e| Finding::unknown(Stage::TokenExchange, Reason::GoogleUnavailable, e)),
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
    /// outcome, impersonation and the targets.
    pub async fn verify(
        &self,
        plan: &Plan,
        ksa: &Ksa,
        gsa: Option<&GsaEmail>,
        identity: &KsaIdentity,
        exchange: &Exchange,
        max_age: Duration,
    ) -> Result<(), Finding> {
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
        let principal = identity.principal();
        let (token, as_who, federated_only) = match (plan.access, gsa) {
            (Access::Impersonation, Some(gsa)) => {
                let key = (
                    ExchangeKey {
                        namespace: ksa.namespace.clone(),
                        name: ksa.name.clone(),
                        uid: ksa.uid.clone(),
                        audience: Self::token_audience(plan),
                    },
                    gsa.to_string(),
                );
                let fetch = self.impersonate(ksa, gsa, &principal, &federated);
                let credential = self.impersonations.get_fresh(&key, max_age, usable, fetch).await.0?;
                (credential, format!("serviceAccount:{gsa}"), false)
            }
            _ => (federated, principal, true),
        };
        for target in &plan.targets {
            self.test_target(
                ksa,
                &as_who,
                &target.kind,
                &target.resource,
                &target.permissions,
                &token.token,
                federated_only,
            )
            .await?;
        }
        Ok(())
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

    #[allow(clippy::too_many_arguments)]
    async fn test_target(
        &self,
        ksa: &Ksa,
        as_who: &str,
        kind: &TargetKind,
        resource: &str,
        permissions: &[String],
        token: &SecretString,
        federated: bool,
    ) -> Result<(), Finding> {
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

/// The unverified payload and `kid` of a JWT (the token is the API server's own, just minted).
fn decode_claims(token: &SecretString) -> Result<(Value, Option<String>), String> {
    jsonwebtoken::dangerous::insecure_decode::<Value>(token.expose_secret())
        .map(|data| (data.claims, data.header.kid))
        .map_err(|e| format!("the minted token does not decode: {e}"))
}
