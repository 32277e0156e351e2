//! Cloud Run targets (google-wif.md §11): the audience the workloads mint their ID tokens for,
//! judged against the service the operator read, and the claims of the ID token the live chain
//! mints on the GSA.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde_json::Value;

use crate::{
    api::{Reason, Stage},
    engine::{
        Finding, TargetPlan,
        annotation::quote,
        facts::{FailureKind, FetchFailure, Fetched, RunService},
        stage::chain::MAX_TOKEN_LIFETIME,
    },
};

/// The permission that lets an identity invoke a Cloud Run service.
pub const INVOKE: &str = "run.routes.invoke";
/// The issuer of the ID tokens Cloud Run accepts.
pub const GOOGLE_ISSUER: &str = "https://accounts.google.com";

/// What the live chain does for a Cloud Run target whose service accepts the audience.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The audience the ID token is minted for: the target's, or the service's main URL.
    pub audience: String,
    /// The permissions to test: all but `run.routes.invoke` when the service checks no invoker.
    pub permissions: Vec<String>,
}

/// The Cloud Run services a pass read, by name (`projects/P/locations/L/services/S`).
pub type RunServices = BTreeMap<String, Arc<Fetched<RunService>>>;

/// A target's Cloud Run part against the services read in this pass; `None` for other kinds.
pub fn check_target(
    who: &str,
    target: &TargetPlan,
    services: &RunServices,
) -> Option<Result<Invocation, Finding>> {
    let name = target.kind.cloud_run_service()?;
    let unread: Fetched<RunService> =
        Err(FetchFailure::new(FailureKind::Unavailable, "not read in this pass"));
    Some(service(who, target, services.get(&name).map_or(&unread, |s| s.as_ref())))
}

/// The Target stage as far as it goes without a token (`tokenExchange: false`): the first Cloud
/// Run target, in spec order, whose service is missing or refuses its audience.
pub fn without_token(who: &str, targets: &[TargetPlan], services: &RunServices) -> Option<Finding> {
    targets.iter().filter_map(|t| check_target(who, t, services)).find_map(Result::err)
}

/// The part of a Cloud Run target that needs no token: the service exists and accepts the
/// target's audience. `service` is the operator's read of it.
pub fn service(who: &str, target: &TargetPlan, service: &Fetched<RunService>) -> Result<Invocation, Finding> {
    let stage = Stage::Target;
    let resource = &target.resource;
    let found = match service {
        Err(failure) => {
            return Err(Finding::from_fetch(stage, failure, &format!("Cloud Run service {resource}")));
        }
        Ok(None) => {
            return Err(Finding::fail(
                stage,
                Reason::PermissionMissing,
                format!(
                    "{who}: Cloud Run service {resource} does not exist (run.services.get answered 404), so nothing can invoke it. Fix: correct the target's resource, or deploy the service"
                ),
            ));
        }
        Ok(Some(found)) => found,
    };
    let mut accepted: Vec<&str> =
        found.urls.iter().chain(&found.custom_audiences).map(String::as_str).collect();
    if !found.uri.is_empty() && !accepted.contains(&found.uri.as_str()) {
        accepted.insert(0, &found.uri);
    }
    let audience = match &target.audience {
        Some(audience) if !accepted.contains(&audience.as_str()) => {
            let (name, flags) = gcloud_service(&found.name);
            return Err(Finding::fail(
                stage,
                Reason::AudienceNotAccepted,
                format!(
                    "{who}: Cloud Run service {resource} refuses ID tokens for audience {}: it accepts {}. Fix: mint the workload's ID token for one of those (and set the target's audience to it), or let the service accept this one: gcloud run services update {name}{flags} --add-custom-audiences={audience}",
                    quote(audience),
                    if accepted.is_empty() { "none".to_string() } else { accepted.join(", ") },
                ),
            ));
        }
        Some(audience) => audience.clone(),
        // No audience named: the URL clients call.
        None if !found.uri.is_empty() => found.uri.clone(),
        None => match accepted.first() {
            Some(url) => (*url).to_string(),
            None => {
                return Err(Finding::unknown(
                    stage,
                    Reason::GoogleUnavailable,
                    format!(
                        "{who}: Cloud Run service {resource} shows no URL to mint an ID token for; set the target's audience"
                    ),
                ));
            }
        },
    };
    let permissions = target
        .permissions
        .iter()
        .filter(|p| !(found.invoker_iam_disabled && *p == INVOKE))
        .cloned()
        .collect();
    Ok(Invocation { audience, permissions })
}

/// `S --region=L --project=P` for a service named `projects/P/locations/L/services/S`.
fn gcloud_service(name: &str) -> (&str, String) {
    match name.split('/').collect::<Vec<_>>().as_slice() {
        ["projects", project, "locations", location, "services", service] => {
            (service, format!(" --region={location} --project={project}"))
        }
        _ => (name, String::new()),
    }
}

/// The claims of the ID token `generateIdToken` minted on `gsa` for `audience` (`Err`: it did not
/// decode), at Unix time `now`; `Ok` is how long it stays valid. Google mints exactly what it is
/// asked for, so a token that says otherwise is an answer authprobe cannot judge by, never a
/// verdict on the namespace.
pub fn id_token(
    who: &str,
    gsa: &str,
    audience: &str,
    claims: Result<&Value, &str>,
    now: i64,
) -> Result<Duration, Finding> {
    let claims = match claims {
        Ok(claims) => claims,
        Err(e) => return Err(odd_token(who, gsa, &format!("a token that is not a JWT ({e})"))),
    };
    let text = |k: &str| claims.get(k).and_then(Value::as_str).unwrap_or_default();
    let audiences: Vec<&str> = match claims.get("aud") {
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(a)) => vec![a.as_str()],
        _ => vec![],
    };
    let expires = claims.get("exp").and_then(Value::as_i64).unwrap_or_default();
    let problem = if text("iss") != GOOGLE_ISSUER {
        format!("a token issued by {}, not {GOOGLE_ISSUER}", quote(text("iss")))
    } else if !audiences.contains(&audience) {
        format!("a token for audience {}, not {}", quote(&audiences.join(",")), quote(audience))
    } else if text("email") != gsa {
        format!("a token with email {}, not {gsa}", quote(text("email")))
    } else if expires <= now {
        format!("a token that expired at {expires}, at {now} by the cluster's clock")
    } else {
        let lifetime = Duration::from_secs(expires.saturating_sub(now).unsigned_abs());
        return Ok(lifetime.min(MAX_TOKEN_LIFETIME));
    };
    Err(odd_token(who, gsa, &problem))
}

fn odd_token(who: &str, gsa: &str, problem: &str) -> Finding {
    Finding::unknown(
        Stage::Target,
        Reason::GoogleUnavailable,
        format!(
            "{who}: generateIdToken on {gsa} answered {problem}; Cloud Run would refuse it. Check the operator's --google-endpoint iamcredentials"
        ),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::engine::{
        Verdict,
        facts::{FailureKind, FetchFailure},
        target::parse_target,
    };

    const RESOURCE: &str = "//run.googleapis.com/projects/acme-prod/locations/us-central1/services/api";
    const GSA: &str = "app@acme-prod.iam.gserviceaccount.com";

    fn target(audience: Option<&str>, permissions: &[&str]) -> TargetPlan {
        TargetPlan {
            resource: RESOURCE.into(),
            kind: parse_target(RESOURCE).unwrap(),
            permissions: permissions.iter().map(|p| (*p).to_string()).collect(),
            audience: audience.map(str::to_string),
        }
    }

    fn api() -> RunService {
        RunService {
            name: "projects/acme-prod/locations/us-central1/services/api".into(),
            uri: "https://api-abc-uc.a.run.app".into(),
            urls: vec!["https://api-123.us-central1.run.app".into(), "https://api-abc-uc.a.run.app".into()],
            custom_audiences: vec!["https://api.acme.example".into()],
            invoker_iam_disabled: false,
        }
    }

    #[test]
    fn an_audience_the_service_accepts_is_minted_for() {
        for audience in ["https://api-123.us-central1.run.app", "https://api.acme.example"] {
            let ok = service("w", &target(Some(audience), &[INVOKE]), &Ok(Some(api()))).unwrap();
            assert_eq!(ok, Invocation { audience: audience.into(), permissions: vec![INVOKE.into()] });
        }
        let defaulted = service("w", &target(None, &[INVOKE]), &Ok(Some(api()))).unwrap();
        assert_eq!(defaulted.audience, "https://api-abc-uc.a.run.app", "the service's main URL");
    }

    #[test]
    fn an_old_audience_names_what_is_accepted_and_both_fixes() {
        let f = service(
            "ServiceAccount a/app",
            &target(Some("https://old.example"), &[INVOKE]),
            &Ok(Some(api())),
        )
        .unwrap_err();
        assert_eq!(
            (f.stage, f.reason, f.verdict),
            (Stage::Target, Reason::AudienceNotAccepted, Verdict::Fail)
        );
        for needle in [
            "ServiceAccount a/app",
            "\"https://old.example\"",
            "https://api-123.us-central1.run.app, https://api-abc-uc.a.run.app, https://api.acme.example",
            "mint the workload's ID token for one of those",
            "gcloud run services update api --region=us-central1 --project=acme-prod --add-custom-audiences=https://old.example",
        ] {
            assert!(f.message.contains(needle), "{needle} missing: {}", f.message);
        }
    }

    #[test]
    fn a_missing_or_unreadable_service() {
        let missing = service("w", &target(None, &[INVOKE]), &Ok(None)).unwrap_err();
        assert_eq!((missing.reason, missing.verdict), (Reason::PermissionMissing, Verdict::Fail));
        let forbidden = FetchFailure::new(FailureKind::Forbidden, "run.services.get answered 403");
        let unreadable = service("w", &target(None, &[INVOKE]), &Err(forbidden)).unwrap_err();
        assert_eq!((unreadable.reason, unreadable.verdict), (Reason::CheckerForbidden, Verdict::Unknown));
        let no_url = RunService { uri: String::new(), urls: vec![], custom_audiences: vec![], ..api() };
        assert_eq!(
            service("w", &target(None, &[INVOKE]), &Ok(Some(no_url))).unwrap_err().verdict,
            Verdict::Unknown
        );
    }

    #[test]
    fn without_a_token_each_cloud_run_target_is_judged_in_order() {
        let bucket = TargetPlan {
            resource: "//storage.googleapis.com/projects/_/buckets/b".into(),
            kind: parse_target("//storage.googleapis.com/projects/_/buckets/b").unwrap(),
            permissions: vec!["storage.objects.get".into()],
            audience: None,
        };
        let services = RunServices::from([(api().name, Arc::new(Ok(Some(api()))))]);
        assert!(check_target("w", &bucket, &services).is_none());
        assert_eq!(without_token("w", &[bucket.clone(), target(None, &[INVOKE])], &services), None);
        let old = target(Some("https://old.example"), &[INVOKE]);
        assert_eq!(
            without_token("w", &[bucket, old], &services).unwrap().reason,
            Reason::AudienceNotAccepted
        );
        let unread = without_token("w", &[target(None, &[INVOKE])], &RunServices::new()).unwrap();
        assert_eq!(unread.verdict, Verdict::Unknown);
    }

    #[test]
    fn without_invoker_iam_only_the_other_permissions_are_tested() {
        let open = RunService { invoker_iam_disabled: true, ..api() };
        let t = target(None, &[INVOKE, "run.services.get"]);
        assert_eq!(
            service("w", &t, &Ok(Some(open))).unwrap().permissions,
            vec!["run.services.get".to_string()]
        );
    }

    #[test]
    fn id_token_claims_are_google_s_for_the_gsa_and_audience() {
        let (aud, now) = ("https://api.acme.example", 1_700_000_000);
        let claims = |extra: serde_json::Value| {
            let mut c =
                json!({"iss": GOOGLE_ISSUER, "aud": aud, "email": GSA, "sub": "1", "exp": now + 3600});
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        assert_eq!(id_token("w", GSA, aud, Ok(&claims(json!({}))), now), Ok(Duration::from_secs(3600)));
        assert!(id_token("w", GSA, aud, Ok(&claims(json!({"aud": [aud]}))), now).is_ok());
        for (bad, says) in [
            (claims(json!({"iss": "https://evil.example"})), "issued by \"https://evil.example\""),
            (claims(json!({"aud": "https://old.example"})), "for audience"),
            (claims(json!({"email": null})), "with email \"\""),
            (claims(json!({"exp": now - 1})), "expired"),
        ] {
            let f = id_token("w", GSA, aud, Ok(&bad), now).unwrap_err();
            assert_eq!((f.reason, f.verdict), (Reason::GoogleUnavailable, Verdict::Unknown));
            assert!(f.message.contains(says), "{says}: {}", f.message);
        }
        assert!(id_token("w", GSA, aud, Err("InvalidToken"), now).unwrap_err().message.contains("not a JWT"));
    }
}
