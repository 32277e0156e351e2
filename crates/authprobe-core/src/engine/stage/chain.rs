//! Classifying the live chain's answers (STS or securetoken, IAM Credentials, testIamPermissions)
//! into the design's reasons, each message carrying the upstream text (redacted, ≤ 1 KiB) and the fix.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;

use crate::{
    api::{Reason, Stage},
    engine::Finding,
    redact,
};

/// No Google token lives longer (12 h with the lifetime-extension org policy); longer claims are
/// clamped, so a hostile or broken number cannot overflow a clock.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// A token Google issued and how long it is valid. The token text goes straight into a secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Issued {
    /// The bearer token.
    pub token: String,
    /// How long it is valid from now, at most [`MAX_TOKEN_LIFETIME`].
    pub lifetime: Duration,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("lifetime", &self.lifetime).finish_non_exhaustive()
    }
}

/// Why a 200 from Google could not be used: the redacted, bounded parse error.
fn malformed(what: &str, e: &serde_json::Error) -> String {
    redact::upstream(&format!("{what} answered 200 with a malformed body ({e})"))
}

/// STS and securetoken: `access_token`, valid for `expires_in` seconds (a number, or a string as
/// google-auth also accepts; absent: `default_lifetime`, as long as the subject token).
pub fn exchanged_token(body: &[u8], default_lifetime: Duration) -> Result<Issued, String> {
    #[derive(Deserialize)]
    struct Answer {
        access_token: String,
        #[serde(default)]
        expires_in: Option<serde_json::Value>,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| malformed("the token exchange", &e))?;
    let seconds = match &answer.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_u64(),
        Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    };
    let lifetime = seconds.map_or(default_lifetime, Duration::from_secs);
    issued(answer.access_token, lifetime, "access_token")
}

/// generateAccessToken: `accessToken`, valid until `expireTime`.
pub fn generated_token(body: &[u8], now: Timestamp) -> Result<Issued, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Answer {
        access_token: String,
        expire_time: String,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| malformed("generateAccessToken", &e))?;
    let expires: Timestamp = answer
        .expire_time
        .parse()
        .map_err(|_| "generateAccessToken answered 200 with an expireTime that is not a time".to_string())?;
    let lifetime = Duration::try_from(expires.duration_since(now)).unwrap_or(Duration::ZERO);
    issued(answer.access_token, lifetime, "accessToken")
}

fn issued(token: String, lifetime: Duration, field: &str) -> Result<Issued, String> {
    if token.is_empty() {
        return Err(format!("Google's answer holds an empty {field}"));
    }
    Ok(Issued { token, lifetime: lifetime.min(MAX_TOKEN_LIFETIME) })
}

/// generateIdToken: `token`, a JWT whose claims (its lifetime among them) the caller judges with
/// [`super::cloud_run::id_token`].
pub fn generated_id_token(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Answer {
        token: String,
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| malformed("generateIdToken", &e))?;
    if answer.token.is_empty() {
        return Err("Google's answer holds an empty token".into());
    }
    Ok(answer.token)
}

/// testIamPermissions: the requested permissions the caller holds (`{}`: none of them).
pub fn held_permissions(body: &[u8]) -> Result<Vec<String>, String> {
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        permissions: Vec<String>,
    }
    serde_json::from_slice::<Answer>(body)
        .map(|a| a.permissions)
        .map_err(|e| malformed("testIamPermissions", &e))
}

/// Relative clock difference between Google and the cluster beyond which tokens are refused.
pub const CLOCK_SKEW_LIMIT_SECONDS: i64 = 60;

/// An answer from Google, as far as classification needs it.
#[derive(Clone, Copy, Debug)]
pub struct Upstream<'a> {
    /// HTTP status.
    pub status: u16,
    /// OAuth `error` (STS) or the envelope's `status` (other APIs).
    pub code: &'a str,
    /// OAuth `error_description` or the envelope's `message`.
    pub description: &'a str,
    /// The whole answer as shown to users, redacted and cut to 1 KiB.
    pub shown: &'a str,
}

fn undecided(stage: Stage, upstream: &Upstream<'_>, what: &str) -> Option<Finding> {
    match upstream.status {
        429 => Some(Finding::unknown(
            stage,
            Reason::GoogleThrottled,
            format!("{what} was throttled after retries: {}", upstream.shown),
        )),
        500.. => Some(Finding::unknown(
            stage,
            Reason::GoogleUnavailable,
            format!("{what} kept failing: {}", upstream.shown),
        )),
        _ => None,
    }
}

/// How a TokenRequest for a KSA went wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenRequestFailure {
    /// The API server answered with this status and (redacted) message.
    Status {
        /// HTTP status.
        code: u16,
        /// The Status message, redacted.
        message: String,
    },
    /// No answer: a broken connection or the call's timeout.
    Unreachable(String),
    /// An answer without a token.
    Empty,
    /// This replica stopped leading: it mints nothing more.
    NotLeading,
}

/// A TokenRequest that did not give a token. Only the operator's own credentials (401) and RBAC
/// (403) turn CheckerHealthy False; a KSA deleted since the cache last saw it (404) is checked
/// again when its Delete event arrives; throttling, 5xx and timeouts blame nobody.
pub fn token_request(failure: &TokenRequestFailure, who: &str) -> Finding {
    let stage = Stage::TokenExchange;
    match failure {
        TokenRequestFailure::Status { code: 401, message } => Finding::unknown(
            stage,
            Reason::CheckerUnauthenticated,
            format!(
                "the API server rejected authprobe's own credentials minting a token for {who} (401 {message})"
            ),
        ),
        TokenRequestFailure::Status { code: 403, message } => Finding::unknown(
            stage,
            Reason::TokenRequestDenied,
            format!(
                "authprobe could not mint a token for {who} (403 {message}); its own RBAC needs create on serviceaccounts/token there (chart value tokenExchange)"
            ),
        ),
        TokenRequestFailure::Status { code: 404, .. } => Finding::unknown(
            stage,
            Reason::KubernetesUnavailable,
            format!(
                "{who} was deleted while authprobe checked it; it is checked again as the deletion arrives"
            ),
        ),
        TokenRequestFailure::Status { code, message } => Finding::unknown(
            stage,
            Reason::KubernetesUnavailable,
            format!(
                "the API server could not mint a token for {who} ({code} {message}); nothing in the namespace is at fault"
            ),
        ),
        TokenRequestFailure::Unreachable(detail) => Finding::unknown(
            stage,
            Reason::KubernetesUnavailable,
            format!(
                "the API server did not answer a TokenRequest for {who} ({detail}); nothing in the namespace is at fault"
            ),
        ),
        TokenRequestFailure::Empty => Finding::unknown(
            stage,
            Reason::KubernetesUnavailable,
            format!("the API server's TokenRequest answer for {who} holds no token"),
        ),
        TokenRequestFailure::NotLeading => Finding::unknown(
            stage,
            Reason::KubernetesUnavailable,
            format!("this replica no longer leads, so it mints no token for {who}; the leader checks it"),
        ),
    }
}

/// The exchange (STS for Federation, securetoken for GKE) refused a freshly minted KSA token.
/// `target` names the provider or identity namespace; `skew` is Google's clock minus the cluster's.
pub fn exchange(upstream: &Upstream<'_>, who: &str, target: &str, skew: Option<i64>) -> Finding {
    let stage = Stage::TokenExchange;
    if let Some(f) = undecided(stage, upstream, "the token exchange") {
        return f;
    }
    let said = format!("the exchange for {target} answered {}", upstream.shown);
    let d = upstream.description;
    let (reason, fix) = match upstream.code {
        "invalid_target" => (Reason::ProviderNotFound, "check that the pool and provider exist, are enabled, and that identity.federation.provider uses the project number".to_string()),
        "invalid_grant" if d.contains("does not match the expected audience") => {
            (Reason::AudienceNotAllowed, "make the token audience one the provider allows (identity.federation.audience, --allowed-audiences)".into())
        }
        "invalid_grant" if d.contains("The issuer in ID Token") => {
            (Reason::IssuerMismatch, "set the provider's --issuer-uri to the cluster's issuer (kubectl get --raw /.well-known/openid-configuration)".into())
        }
        "invalid_grant" if d.contains("stale to sign-in") => (
            Reason::ClockSkew,
            match skew {
                Some(s) => format!("Google's clock and the cluster's differ by {s}s; a token minted just now is stale to Google. Fix: synchronise the API server's clock (NTP)"),
                None => "Google judged a token minted just now as stale: the cluster's clock is likely off. Fix: synchronise the API server's clock (NTP)".into(),
            },
        ),
        "invalid_grant" if d.contains("Error connecting to the given credential's issuer") || d.contains("Unable to verify the ID Token signature") => (
            Reason::SigningKeyNotTrusted,
            "Google cannot verify the token with the keys it trusts, usually after the cluster's signing key rotated. Fix: kubectl get --raw /openid/v1/jwks > jwks.json && gcloud iam workload-identity-pools providers update-oidc ... --jwk-json-path=jwks.json".into(),
        ),
        "unauthorized_client" if d.contains("attribute condition") => {
            (Reason::AttributeConditionRejected, "widen the provider's --attribute-condition to admit this ServiceAccount".into())
        }
        "invalid_request" if d.contains("127 bytes") => {
            (Reason::SubjectTooLong, "shorten the namespace or ServiceAccount name, or map google.subject to something shorter".into())
        }
        _ => (Reason::ExchangeRejected, "see the upstream error".into()),
    };
    Finding::fail(stage, reason, format!("{who}: {said}. Fix: {fix}"))
}

/// `generateAccessToken` on the GSA with the federated token did not succeed.
pub fn impersonation(upstream: &Upstream<'_>, who: &str, principal: &str, gsa: &str) -> Finding {
    impersonation_by("generateAccessToken", upstream, who, principal, gsa)
}

/// `generateIdToken` on the GSA with the federated token did not succeed: the same binding
/// (`roles/iam.workloadIdentityUser` holds `iam.serviceAccounts.getOpenIdToken` too) fixes it.
pub fn id_token_denied(upstream: &Upstream<'_>, who: &str, principal: &str, gsa: &str) -> Finding {
    impersonation_by("generateIdToken", upstream, who, principal, gsa)
}

fn impersonation_by(method: &str, upstream: &Upstream<'_>, who: &str, principal: &str, gsa: &str) -> Finding {
    let stage = Stage::Impersonation;
    if let Some(f) = undecided(stage, upstream, method) {
        return f;
    }
    let project = gsa
        .split_once('@')
        .and_then(|(_, d)| d.strip_suffix(".iam.gserviceaccount.com"))
        .map(|p| format!(" --project={p}"))
        .unwrap_or_default();
    let bind = format!(
        "gcloud iam service-accounts add-iam-policy-binding {gsa}{project} --role=roles/iam.workloadIdentityUser --member=\"{principal}\""
    );
    let (reason, fix) = match (upstream.status, upstream.code) {
        (404, _) => (Reason::GoogleServiceAccountNotFound, format!("correct the annotation or create {gsa}")),
        (400, "FAILED_PRECONDITION") => (Reason::GoogleServiceAccountDisabled, format!("gcloud iam service-accounts enable {gsa}{project}")),
        (401, _) => (Reason::ImpersonationDenied, "Google refused the federated token itself (a disabled pool revokes issued tokens); re-enable the pool or provider".to_string()),
        _ => (Reason::ImpersonationDenied, bind),
    };
    Finding::fail(
        stage,
        reason,
        format!(
            "{who} ({principal}) may not impersonate {gsa}: {method} answered {}. Fix: {fix}",
            upstream.shown
        ),
    )
}

/// `testIamPermissions` on a target. `missing` are requested permissions not held (when it answered 200).
pub fn target(
    upstream: &Upstream<'_>,
    who: &str,
    identity: &str,
    resource: &str,
    missing: &[String],
    federated: bool,
) -> Option<Finding> {
    let stage = Stage::Target;
    if upstream.status == 200 {
        if missing.is_empty() {
            return None;
        }
        return Some(Finding::fail(
            stage,
            Reason::PermissionMissing,
            format!(
                "{who} as {identity} lacks {} on {resource}. Granting roles to other identities cannot help. Fix: grant {identity} a role on {resource} that includes {}",
                missing.join(", "),
                missing.join(", ")
            ),
        ));
    }
    if let Some(f) = undecided(stage, upstream, &format!("testIamPermissions on {resource}")) {
        return Some(f);
    }
    Some(match upstream.status {
        401 if federated => Finding::fail(
            stage,
            Reason::FederatedTokenUnsupported,
            format!(
                "{who}: the API of {resource} refuses federated tokens ({}). Fix: use access: Impersonation with a Google service account for this API",
                upstream.shown
            ),
        ),
        401 => Finding::unknown(
            stage,
            Reason::GoogleUnavailable,
            format!("{who}: the token for {identity} was refused on {resource}: {}", upstream.shown),
        ),
        _ => Finding::fail(
            stage,
            Reason::PermissionMissing,
            format!(
                "{who} as {identity} cannot use {resource} ({}). Fix: check that it exists and grant {identity} access to it",
                upstream.shown
            ),
        ),
    })
}

/// Google's clock minus the cluster's, beyond the limit, as a finding.
pub fn clock_skew(who: &str, skew: i64) -> Option<Finding> {
    (skew.abs() > CLOCK_SKEW_LIMIT_SECONDS).then(|| {
        Finding::fail(
            Stage::TokenExchange,
            Reason::ClockSkew,
            format!(
                "{who}: Google's clock is {skew}s off the cluster's (more than the {CLOCK_SKEW_LIMIT_SECONDS}s tolerated), so tokens are refused as stale or not yet valid. Fix: synchronise the API server's clock (NTP)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Verdict;

    fn up<'a>(status: u16, code: &'a str, description: &'a str) -> Upstream<'a> {
        Upstream { status, code, description, shown: description }
    }

    #[test]
    fn every_sts_error_class_has_its_reason() {
        let cases = [
            (
                up(
                    400,
                    "invalid_target",
                    "The target service indicated by the \"audience\" parameters is invalid.",
                ),
                Reason::ProviderNotFound,
            ),
            (
                up(
                    400,
                    "invalid_grant",
                    "The audience in ID Token [x] does not match the expected audience.",
                ),
                Reason::AudienceNotAllowed,
            ),
            (
                up(
                    400,
                    "invalid_grant",
                    "The issuer in ID Token https://a does not match the expected one in config: https://b",
                ),
                Reason::IssuerMismatch,
            ),
            (
                up(400, "invalid_grant", "ID Token issued at 1700000000 is stale to sign-in."),
                Reason::ClockSkew,
            ),
            (
                up(400, "invalid_grant", "Error connecting to the given credential's issuer."),
                Reason::SigningKeyNotTrusted,
            ),
            (
                up(400, "invalid_grant", "Unable to verify the ID Token signature."),
                Reason::SigningKeyNotTrusted,
            ),
            (
                up(
                    400,
                    "unauthorized_client",
                    "The given credential is rejected by the attribute condition.",
                ),
                Reason::AttributeConditionRejected,
            ),
            (
                up(
                    400,
                    "invalid_request",
                    "The size of mapped attribute google.subject exceeds the 127 bytes limit.",
                ),
                Reason::SubjectTooLong,
            ),
            (up(400, "invalid_request", "Invalid value for \"audience\"."), Reason::ExchangeRejected),
            (up(400, "invalid_grant", "something new"), Reason::ExchangeRejected),
        ];
        for (u, reason) in cases {
            let f = exchange(&u, "ServiceAccount a/b", "provider p", Some(3));
            assert_eq!((f.reason, f.verdict), (reason, Verdict::Fail), "{}", u.description);
            assert!(f.message.contains("Fix:") && f.message.contains(u.description), "{}", f.message);
        }
        assert_eq!(
            exchange(&up(429, "quota_exceeded", "throttled"), "w", "t", None).reason,
            Reason::GoogleThrottled
        );
        assert_eq!(exchange(&up(503, "", "x"), "w", "t", None).verdict, Verdict::Unknown);
        assert!(
            exchange(
                &up(400, "invalid_grant", "ID Token issued at 1 is stale to sign-in."),
                "w",
                "t",
                Some(300)
            )
            .message
            .contains("300s")
        );
    }

    #[test]
    fn id_token_answers_parse_strictly() {
        assert_eq!(generated_id_token(br#"{"token": "eyJ.x.y"}"#), Ok("eyJ.x.y".to_string()));
        for bad in [&br#"{"token": ""}"#[..], br#"{"token": 3}"#, b"<html>", b""] {
            assert!(generated_id_token(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn impersonation_and_targets() {
        let gsa = "payments@acme-prod.iam.gserviceaccount.com";
        let denied = impersonation(
            &up(403, "PERMISSION_DENIED", "Permission 'iam.serviceAccounts.getAccessToken' denied"),
            "w",
            "principal://p",
            gsa,
        );
        assert_eq!(denied.reason, Reason::ImpersonationDenied);
        assert!(denied.message.contains(
            "add-iam-policy-binding payments@acme-prod.iam.gserviceaccount.com --project=acme-prod"
        ));
        assert_eq!(
            impersonation(&up(400, "FAILED_PRECONDITION", "disabled"), "w", "p", gsa).reason,
            Reason::GoogleServiceAccountDisabled
        );
        assert_eq!(impersonation(&up(503, "UNAVAILABLE", "x"), "w", "p", gsa).verdict, Verdict::Unknown);
        let id = id_token_denied(
            &up(403, "PERMISSION_DENIED", "Permission 'iam.serviceAccounts.getOpenIdToken' denied"),
            "w",
            "principal://p",
            gsa,
        );
        assert_eq!((id.stage, id.reason), (Stage::Impersonation, Reason::ImpersonationDenied));
        assert!(
            id.message.contains("generateIdToken answered") && id.message.contains("add-iam-policy-binding")
        );

        let ok = up(200, "", "");
        assert!(target(&ok, "w", "i", "//r", &[], false).is_none());
        let missing =
            target(&ok, "w", "serviceAccount:gsa", "//r", &["storage.objects.get".into()], false).unwrap();
        assert_eq!(missing.reason, Reason::PermissionMissing);
        assert!(missing.message.contains("storage.objects.get"));
        let refused = up(401, "UNAUTHENTICATED", "Request had invalid authentication credentials.");
        assert_eq!(
            target(&refused, "w", "i", "//r", &[], true).unwrap().reason,
            Reason::FederatedTokenUnsupported
        );
        assert_eq!(target(&refused, "w", "i", "//r", &[], false).unwrap().verdict, Verdict::Unknown);
        assert_eq!(
            target(&up(403, "PERMISSION_DENIED", "x"), "w", "i", "//r", &[], false).unwrap().reason,
            Reason::PermissionMissing
        );
    }

    #[test]
    fn token_request_failures_blame_only_what_is_at_fault() {
        let status = |code: u16| TokenRequestFailure::Status { code, message: "x".into() };
        let cases = [
            (status(401), Reason::CheckerUnauthenticated),
            (status(403), Reason::TokenRequestDenied),
            (status(404), Reason::KubernetesUnavailable),
            (status(429), Reason::KubernetesUnavailable),
            (status(503), Reason::KubernetesUnavailable),
            (TokenRequestFailure::Unreachable("timed out".into()), Reason::KubernetesUnavailable),
            (TokenRequestFailure::Empty, Reason::KubernetesUnavailable),
            (TokenRequestFailure::NotLeading, Reason::KubernetesUnavailable),
        ];
        for (failure, reason) in cases {
            let f = token_request(&failure, "ServiceAccount a/b");
            assert_eq!((f.reason, f.verdict), (reason, Verdict::Unknown), "{failure:?}");
            assert_eq!(
                f.reason.blames_the_checker(),
                matches!(&failure, TokenRequestFailure::Status { code: 401 | 403, .. }),
                "only 401 and 403 blame the checker: {failure:?}"
            );
            assert!(!f.message.contains("RBAC") || reason == Reason::TokenRequestDenied, "{}", f.message);
        }
    }

    #[test]
    fn google_answers_parse_strictly_and_clamp_their_numbers() {
        let day = Duration::from_secs(86_400);
        let ok = exchanged_token(br#"{"access_token":"t","expires_in":3599}"#, day).unwrap();
        assert_eq!(ok.lifetime, Duration::from_secs(3599));
        let as_string = exchanged_token(br#"{"access_token":"t","expires_in":"120"}"#, day).unwrap();
        assert_eq!(as_string.lifetime, Duration::from_secs(120));
        let huge =
            exchanged_token(br#"{"access_token":"t","expires_in":18446744073709551615}"#, day).unwrap();
        assert_eq!(huge.lifetime, MAX_TOKEN_LIFETIME, "clamped, never an overflow");
        assert_eq!(
            exchanged_token(br#"{"access_token":"t"}"#, day).unwrap().lifetime,
            MAX_TOKEN_LIFETIME.min(day)
        );
        for broken in [
            &b"{\"access_token\": "[..],
            b"<html>502</html>",
            br#"{"access_token":7}"#,
            br#"{"access_token":""}"#,
        ] {
            assert!(exchanged_token(broken, day).is_err(), "{}", String::from_utf8_lossy(broken));
        }
        let now: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let g = generated_token(br#"{"accessToken":"t","expireTime":"2026-01-01T01:00:00Z"}"#, now).unwrap();
        assert_eq!(g.lifetime, Duration::from_secs(3600));
        let far =
            generated_token(br#"{"accessToken":"t","expireTime":"9999-01-01T00:00:00Z"}"#, now).unwrap();
        assert_eq!(far.lifetime, MAX_TOKEN_LIFETIME);
        let past =
            generated_token(br#"{"accessToken":"t","expireTime":"2000-01-01T00:00:00Z"}"#, now).unwrap();
        assert_eq!(past.lifetime, Duration::ZERO);
        assert!(generated_token(br#"{"accessToken":"t","expireTime":"soon"}"#, now).is_err());
        assert!(!format!("{g:?}").contains('t') || !format!("{g:?}").contains("\"t\""), "no token in Debug");
    }

    #[test]
    fn malformed_permission_answers_are_errors_and_their_text_is_redacted_and_bounded() {
        assert_eq!(held_permissions(br#"{"permissions":["a.b.c"]}"#).unwrap(), vec!["a.b.c".to_string()]);
        assert_eq!(held_permissions(b"{}").unwrap(), Vec::<String>::new());
        let token = format!("ya29.{}", "x".repeat(40));
        let huge = format!("{{\"permissions\": \"{token}{}\"}}", "y".repeat(1 << 20));
        for broken in [
            b"{\"permissions\": [".to_vec(),
            b"<html></html>".to_vec(),
            br#"{"permissions":[1]}"#.to_vec(),
            huge.into_bytes(),
        ] {
            let e = held_permissions(&broken).unwrap_err();
            assert!(e.len() <= redact::MAX_UPSTREAM_BYTES && !e.contains("ya29."), "{e}");
        }
    }

    #[test]
    fn skew_beyond_the_limit_is_reported() {
        assert!(clock_skew("w", 59).is_none());
        assert!(clock_skew("w", -60).is_none());
        assert_eq!(clock_skew("w", 61).unwrap().reason, Reason::ClockSkew);
        assert_eq!(clock_skew("w", -3600).unwrap().reason, Reason::ClockSkew);
    }
}
