//! The one HTTP client for Google: per-API client-side rate limits, retries only on 429 and
//! 500/502/503/504 (and broken connections) with truncated exponential backoff, jitter,
//! `Retry-After` and a deadline, and response bodies read only up to a bound.

use std::{
    collections::HashMap,
    num::NonZeroU32,
    sync::Arc,
    time::{Duration, Instant},
};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use k8s_openapi::jiff::Timestamp;
use reqwest::{Method, StatusCode, Url, header};
use secrecy::SecretString;

use super::credentials::{CredentialsError, OperatorCredentials, bearer};
use crate::metrics::{Metrics, Outcome};

/// Responses larger than this are refused unread: no Google answer authprobe needs comes close.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The Google methods authprobe calls; also the bounded `api` metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Api {
    /// `projects.serviceAccounts.get`.
    GetServiceAccount,
    /// `projects.serviceAccounts.getIamPolicy`.
    GetIamPolicy,
    /// `workloadIdentityPools.get`.
    GetPool,
    /// `workloadIdentityPools.providers.get`.
    GetProvider,
    /// STS `v1/token`.
    StsToken,
    /// securetoken `v1/identitybindingtoken` (GKE).
    IdentityBindingToken,
    /// IAM Credentials `generateAccessToken`.
    GenerateAccessToken,
    /// IAM Credentials `generateIdToken` (Cloud Run targets, ID-token endpoints).
    GenerateIdToken,
    /// Cloud Run Admin v2 `services.get`: a Cloud Run target's URLs and audiences.
    GetRunService,
    /// `testIamPermissions` on a target, by the service that answers it.
    TestIamPermissions(&'static str),
}

impl Api {
    /// `SERVICE.method`.
    pub fn as_str(self) -> &'static str {
        match self {
            Api::GetServiceAccount => "iam.serviceAccounts.get",
            Api::GetIamPolicy => "iam.getIamPolicy",
            Api::GetPool => "iam.workloadIdentityPools.get",
            Api::GetProvider => "iam.providers.get",
            Api::StsToken => "sts.token",
            Api::IdentityBindingToken => "securetoken.identitybindingtoken",
            Api::GenerateAccessToken => "iamcredentials.generateAccessToken",
            Api::GenerateIdToken => "iamcredentials.generateIdToken",
            Api::GetRunService => "run.services.get",
            Api::TestIamPermissions(service) => match service {
                "iam" => "iam.testIamPermissions",
                "storage" => "storage.testIamPermissions",
                "secretmanager" => "secretmanager.testIamPermissions",
                "pubsub" => "pubsub.testIamPermissions",
                "run" => "run.testIamPermissions",
                _ => "cloudresourcemanager.testIamPermissions",
            },
        }
    }

    /// The default quota this method counts against, in requests per minute per project.
    fn quota_per_minute(self) -> f64 {
        match self {
            // IAM v1 reads, shared by these two: half each.
            Api::GetServiceAccount | Api::GetIamPolicy => IAM_READS_PER_MINUTE / 2.0,
            Api::GetPool | Api::GetProvider => WIF_READS_PER_MINUTE / 2.0,
            Api::StsToken | Api::IdentityBindingToken => STS_EXCHANGES_PER_MINUTE,
            Api::GenerateAccessToken | Api::GenerateIdToken => IAM_CREDENTIALS_PER_MINUTE,
            Api::GetRunService => RUN_READS_PER_MINUTE,
            Api::TestIamPermissions(_) => TEST_IAM_PERMISSIONS_PER_MINUTE,
        }
    }

    /// Requests per minute at `share` of the default quota (at least one).
    pub fn per_minute(self, share: f64) -> u32 {
        let rate = (self.quota_per_minute() * share).floor();
        if rate < 1.0 { 1 } else { rate.min(f64::from(u32::MAX)) as u32 }
    }

    /// The limiter's quota: evenly spaced requests, no burst, so no minute (and no 60 s window
    /// starting at a request) holds more than [`Api::per_minute`].
    fn quota(self, share: f64) -> Quota {
        let spacing = Duration::from_secs(60).div_f64(f64::from(self.per_minute(share)));
        Quota::with_period(spacing.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(NonZeroU32::MIN)
    }
}

// Default quotas per project, from /work/shared/reference/google-wif.md §9.1 (which cites
// https://docs.cloud.google.com/iam/quotas). `--google-quota-share` caps each API at that share.
/// IAM v1 reads (`getIamPolicy`, `serviceAccounts.get`): 6,000 per minute.
pub const IAM_READS_PER_MINUTE: f64 = 6_000.0;
/// Workload Identity Federation reads (pools, providers): 600 per minute.
pub const WIF_READS_PER_MINUTE: f64 = 600.0;
/// STS token exchange, global, non-workforce: 6,000 per minute. The GKE `securetoken`
/// identity-binding exchange is held to the same figure (its own quota is not documented there).
pub const STS_EXCHANGES_PER_MINUTE: f64 = 6_000.0;
/// Service Account Credentials, generate credentials (`generateAccessToken`, `generateIdToken`):
/// 60,000 per minute.
pub const IAM_CREDENTIALS_PER_MINUTE: f64 = 60_000.0;
/// Cloud Run Admin reads: not in §9.1; assumed 1,000 per minute per region like its other reads.
pub const RUN_READS_PER_MINUTE: f64 = 1_000.0;
/// `testIamPermissions` (answered by each target's own API): not in §9.1; assumed 6,000 per
/// minute like IAM v1 reads (UNCONFIRMED).
pub const TEST_IAM_PERMISSIONS_PER_MINUTE: f64 = 6_000.0;

/// The default `--google-quota-share`.
pub const DEFAULT_QUOTA_SHARE: f64 = 0.5;

/// How long the live chains of one probe pass may keep the exchange quota busy: a pass takes at
/// most this many seconds' worth of exchanges at the quota share (shared by the probes reconciled
/// at once), the rest wait for the next.
pub const CHAIN_PASS_SECONDS: f64 = 10.0;

/// The live chains one probe pass may run at `share` of the STS quota.
pub fn exchange_budget(share: f64) -> usize {
    let per_pass = (f64::from(Api::StsToken.per_minute(share)) * CHAIN_PASS_SECONDS / 60.0).floor();
    (per_pass as usize).max(1)
}

/// When and how often to retry.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// The first backoff.
    pub base: Duration,
    /// No single wait is longer.
    pub cap: Duration,
    /// No request (all attempts and waits) takes longer.
    pub deadline: Duration,
    /// Per attempt.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(16),
            deadline: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(15),
        }
    }
}

/// How a request authenticates.
#[derive(Clone, Copy, Debug)]
pub enum Auth<'a> {
    /// The operator's own credentials.
    Operator,
    /// A token minted for the KSA under probe.
    Bearer(&'a SecretString),
    /// No Authorization header (STS must not get one).
    None,
}

/// A request body.
#[derive(Clone, Debug)]
pub enum Body {
    /// None.
    Empty,
    /// `application/json`.
    Json(serde_json::Value),
    /// `application/x-www-form-urlencoded`, as Google's clients send to STS.
    Form(Vec<(&'static str, String)>),
}

/// A Google answer of any status, after retries.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The final status.
    pub status: StatusCode,
    /// The body, at most [`MAX_BODY_BYTES`].
    pub body: Vec<u8>,
    /// The `Date` header, for clock-skew checks.
    pub date: Option<Timestamp>,
    /// The `Retry-After` header, honoured by the retry loop.
    pub retry_after: Option<Duration>,
}

/// A request that got no HTTP answer to classify.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Connection refused or reset, or the deadline passed with no answer.
    #[error("{api}: {detail}")]
    Transport {
        /// The API.
        api: &'static str,
        /// Whether time ran out.
        timeout: bool,
        /// What happened, redacted.
        detail: String,
    },
    /// The body was larger than [`MAX_BODY_BYTES`].
    #[error("{api}: the response is larger than {MAX_BODY_BYTES} bytes")]
    TooLarge {
        /// The API.
        api: &'static str,
    },
    /// The operator's own token could not be had.
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// A URL could not be built.
    #[error("{0}")]
    Url(String),
}

/// The shared Google HTTP client.
#[derive(Debug)]
pub struct GoogleClient {
    http: reqwest::Client,
    credentials: Arc<OperatorCredentials>,
    retry: RetryPolicy,
    limiters: HashMap<&'static str, Arc<DefaultDirectRateLimiter>>,
    metrics: Arc<Metrics>,
}

fn retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 429 | 500 | 502 | 503 | 504)
}

impl GoogleClient {
    /// A client using `credentials` for the operator's own calls.
    pub fn new(
        credentials: Arc<OperatorCredentials>,
        retry: RetryPolicy,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(retry.attempt_timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("authprobe/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { http, credentials, retry, limiters: HashMap::new(), metrics })
    }

    fn limiter(&self, api: Api) -> Option<Arc<DefaultDirectRateLimiter>> {
        self.limiters.get(api.as_str()).cloned()
    }

    /// Builds the per-API limiters at `share` of each default quota (done once; `new` stays cheap
    /// for tests that need none).
    pub fn with_rate_limits(mut self, apis: &[Api], share: f64) -> Self {
        for api in apis {
            self.limiters.insert(api.as_str(), Arc::new(RateLimiter::direct(api.quota(share))));
        }
        self
    }

    /// Sends a request, retrying what is worth retrying, and returns the final answer.
    pub async fn send(
        &self,
        api: Api,
        method: Method,
        url: Url,
        body: &Body,
        auth: Auth<'_>,
    ) -> Result<Answer, SendError> {
        let started = Instant::now();
        let deadline = started + self.retry.deadline;
        let mut attempt: u32 = 0;
        let result = loop {
            if let Some(limiter) = self.limiter(api) {
                limiter.until_ready().await;
            }
            let outcome = self.attempt(api, method.clone(), url.clone(), body, auth).await;
            let wait = match &outcome {
                Ok(answer) if retryable(answer.status) => {
                    retry_wait(answer.retry_after, self.backoff(attempt))
                }
                Err(SendError::Transport { .. }) => self.backoff(attempt),
                _ => break outcome,
            };
            if Instant::now().checked_add(wait).is_none_or(|at| at > deadline) {
                break outcome;
            }
            tracing::debug!(
                api = api.as_str(),
                attempt,
                wait_ms = wait.as_millis(),
                "retrying Google request"
            );
            tokio::time::sleep(wait).await;
            attempt += 1;
        };
        let outcome = match &result {
            Ok(a) if a.status.is_success() => Outcome::Ok,
            Ok(a) if a.status == StatusCode::TOO_MANY_REQUESTS => Outcome::Throttled,
            Ok(a) if a.status.is_server_error() => Outcome::ServerError,
            Ok(_) => Outcome::ClientError,
            Err(SendError::Transport { timeout: true, .. }) => Outcome::Timeout,
            Err(_) => Outcome::ServerError,
        };
        self.metrics.google_request(api.as_str(), outcome, started.elapsed());
        result
    }

    /// Truncated exponential backoff with jitter: `min(cap, base·2^n)`, scaled by 0.5–1.0.
    fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.retry.base.saturating_mul(2u32.saturating_pow(attempt.min(16)));
        exp.min(self.retry.cap).mul_f64(0.5 + rand::random::<f64>() / 2.0)
    }

    async fn attempt(
        &self,
        api: Api,
        method: Method,
        url: Url,
        body: &Body,
        auth: Auth<'_>,
    ) -> Result<Answer, SendError> {
        let mut request = self.http.request(method, url);
        request = match auth {
            Auth::Operator => {
                request.header(header::AUTHORIZATION, bearer(&self.credentials.token().await?)?)
            }
            Auth::Bearer(token) => request.header(header::AUTHORIZATION, bearer(token)?),
            Auth::None => request,
        };
        request = match body {
            Body::Empty => request.header(header::CONTENT_LENGTH, "0"),
            Body::Json(json) => request.json(json),
            Body::Form(fields) => request.form(fields),
        };
        let transport = |e: reqwest::Error| SendError::Transport {
            api: api.as_str(),
            timeout: e.is_timeout(),
            detail: crate::redact::upstream(&error_chain(&e)),
        };
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status();
        let date = response
            .headers()
            .get(header::DATE)
            .and_then(|d| d.to_str().ok())
            .and_then(|d| k8s_openapi::jiff::fmt::rfc2822::parse(d).ok())
            .map(|z| z.timestamp());
        let retry_after = response
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        if response.content_length().is_some_and(|len| len > MAX_BODY_BYTES as u64) {
            return Err(SendError::TooLarge { api: api.as_str() });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(SendError::TooLarge { api: api.as_str() });
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answer { status, body, date, retry_after })
    }
}

/// Google's `Retry-After`, but never sooner than our own backoff: a 0 or a past date would
/// otherwise retry at once.
fn retry_wait(retry_after: Option<Duration>, backoff: Duration) -> Duration {
    retry_after.map_or(backoff, |r| r.max(backoff))
}

/// Whether `share` is a quota share `--google-quota-share` takes: in (0, 1].
pub fn parse_quota_share(value: &str) -> Result<f64, String> {
    let share: f64 = value.trim().parse().map_err(|e| format!("{value:?} is not a number: {e}"))?;
    if share > 0.0 && share <= 1.0 {
        Ok(share)
    } else {
        Err(format!("{value:?} must be above 0 and at most 1, e.g. 0.5 for half of each default quota"))
    }
}

/// `Retry-After` as delay-seconds or an HTTP date (a past date is zero).
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = k8s_openapi::jiff::fmt::rfc2822::parse(value.trim()).ok()?.timestamp();
    let wait = at.duration_since(Timestamp::now());
    Some(Duration::try_from(wait).unwrap_or(Duration::ZERO))
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_zero_or_past_still_backs_off_and_huge_values_parse() {
        let backoff = Duration::from_millis(400);
        assert_eq!(retry_wait(None, backoff), backoff);
        assert_eq!(retry_wait(parse_retry_after("0"), backoff), backoff);
        assert_eq!(retry_wait(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), backoff), backoff);
        assert_eq!(retry_wait(parse_retry_after(" 30 "), backoff), Duration::from_secs(30));
        // The retry loop adds this to now with checked arithmetic and gives up past its deadline.
        let huge = parse_retry_after("18446744073709551615").unwrap();
        assert!(Instant::now().checked_add(retry_wait(Some(huge), backoff)).is_none());
        assert_eq!(parse_retry_after("soon"), None);
    }

    #[test]
    fn each_api_is_capped_at_its_share_of_the_default_quota() {
        assert_eq!(Api::StsToken.per_minute(0.5), 3_000);
        assert_eq!(Api::IdentityBindingToken.per_minute(0.1), 600);
        assert_eq!(Api::GenerateAccessToken.per_minute(0.5), 30_000);
        assert_eq!(Api::TestIamPermissions("storage").per_minute(1.0), 6_000);
        assert_eq!(Api::GetIamPolicy.per_minute(0.5), 1_500, "IAM reads are shared by two methods");
        assert_eq!(Api::GetProvider.per_minute(0.001), 1, "never zero");
        assert_eq!(exchange_budget(0.1), 100, "ten seconds of 600 a minute");
        assert_eq!(exchange_budget(0.5), 500);
        assert_eq!(parse_quota_share("0.1"), Ok(0.1));
        for bad in ["0", "-0.5", "1.5", "half", "NaN"] {
            assert!(parse_quota_share(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn the_limiter_spaces_requests_without_a_burst() {
        let limiter = RateLimiter::direct(Api::StsToken.quota(0.1));
        let started = Instant::now();
        for _ in 0..4 {
            limiter.until_ready().await;
        }
        // 600 a minute: one every 100 ms, the first at once.
        assert!(started.elapsed() >= Duration::from_millis(290), "{:?}", started.elapsed());
    }
}
