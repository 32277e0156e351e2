use super::*;
use crate::{
    api::AuthProbeSpec,
    engine::{
        Verdict,
        canary::{REPORT_VERSION, TokenType},
    },
};

fn plan(platform: &str) -> Plan {
    let identity = match platform {
        "GKE" => serde_json::json!({"platform": "GKE", "projectId": "acme-prod"}),
        _ => serde_json::json!({"platform": "Federation", "projectNumber": "123", "access": "Direct",
            "federation": {"provider": "projects/123/locations/global/workloadIdentityPools/onprem/providers/k8s"}}),
    };
    let spec: AuthProbeSpec =
        serde_json::from_value(serde_json::json!({"namespaceSelector": {}, "identity": identity})).unwrap();
    Plan::parse(&spec).unwrap()
}

fn metadata(first_token_ms: Option<u64>, fingerprint: Option<&str>) -> Report {
    Report {
        version: REPORT_VERSION,
        source: Source::MetadataServer,
        path: None,
        metadata_host: Some("169.254.169.254".into()),
        credential_type: None,
        token_type: first_token_ms.map(|_| TokenType::AccessToken),
        first_token_ms,
        attempts: 2,
        fingerprint: fingerprint.map(str::to_string),
        fingerprint_of: fingerprint.map(|_| FingerprintOf::IdToken),
        error: first_token_ms.is_none().then(|| "no answer within 3.0s".to_string()),
    }
}

fn file(source: Source, credential_type: &str) -> Report {
    Report {
        source,
        path: Some("/var/secrets/google/key.json".into()),
        metadata_host: None,
        credential_type: Some(credential_type.into()),
        ..metadata(Some(40), Some("fedcba987654"))
    }
}

fn judge(plan: &Plan, report: Report, expected: Option<&str>) -> Option<Finding> {
    let workload = "Deployment/api".parse().unwrap();
    let last = report.fingerprint.clone();
    let subject = CanarySubject {
        namespace: "checkout",
        service_account: "app",
        workload: &workload,
        expected,
        last_fingerprint: last.as_deref(),
    };
    plan.canary_stage(
        &Outcome::Reported {
            job: "authprobe-canary-1".into(),
            started: k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            report,
        },
        &subject,
    )
}

fn reason(f: &Option<Finding>) -> Option<(Reason, Verdict)> {
    f.as_ref().map(|f| (f.reason, f.verdict))
}

#[test]
fn a_fast_token_from_the_metadata_server_as_the_proven_identity_passes() {
    let gke = plan("GKE");
    assert_eq!(judge(&gke, metadata(Some(180), Some("0123456789ab")), Some("0123456789ab")), None);
    assert_eq!(judge(&gke, metadata(Some(3000), None), None), None, "3 s is still within the timeout");
}

#[test]
fn a_slow_first_token_names_the_time_and_the_fix() {
    let f = judge(&plan("GKE"), metadata(Some(5012), Some("0123456789ab")), Some("0123456789ab"));
    assert_eq!(reason(&f), Some((Reason::MetadataServerSlowStart, Verdict::Fail)));
    let m = f.unwrap().message;
    assert!(m.contains("5.0s after the container started"), "{m}");
    assert!(m.contains("Deployment/api") && m.contains("checkout/app"), "{m}");
    assert!(m.contains("last fingerprint 0123456789ab"), "{m}");
    assert!(m.contains("Fix: add an init container that waits for the metadata server"), "{m}");
    assert!(m.contains("or make the client retry"), "{m}");
}

#[test]
fn no_token_by_the_deadline_is_unreachable_before_any_drift_or_slowness() {
    let f = judge(&plan("GKE"), metadata(None, None), Some("0123456789ab"));
    assert_eq!(reason(&f), Some((Reason::MetadataServerUnreachable, Verdict::Fail)));
    let m = f.unwrap().message;
    assert!(m.contains("within 60s") && m.contains("2 attempts of 3s each"), "{m}");
    assert!(
        m.contains("last error: no answer within 3.0s") && m.contains("--workload-metadata=GKE_METADATA"),
        "{m}"
    );
    assert!(m.contains("no fingerprint yet"), "{m}");
}

#[test]
fn another_identity_is_drift_and_outranks_a_slow_start() {
    let f = judge(&plan("GKE"), metadata(Some(5000), Some("fedcba987654")), Some("0123456789ab"));
    assert_eq!(reason(&f), Some((Reason::CredentialSourceDrift, Verdict::Fail)));
    let m = f.unwrap().message;
    assert!(m.contains("fingerprints to fedcba987654, the KSA's identity to 0123456789ab"), "{m}");
    assert!(m.contains("GKE_METADATA"), "{m}");
    // Nothing to compare with: no drift is judged.
    assert_eq!(judge(&plan("GKE"), metadata(Some(100), Some("fedcba987654")), None), None);
}

#[test]
fn adc_from_a_file_on_gke_or_not_from_an_external_account_under_federation_is_unexpected() {
    for source in [Source::CredentialsFile, Source::GcloudWellKnownFile] {
        let f = judge(&plan("GKE"), file(source, "service_account"), Some("0123456789ab"));
        assert_eq!(reason(&f), Some((Reason::AdcSourceUnexpected, Verdict::Fail)), "{source:?}");
        let m = f.unwrap().message;
        assert!(m.contains("/var/secrets/google/key.json, type service_account"), "{m}");
        assert!(m.contains("not from the metadata server"), "{m}");
    }
    let fed = plan("Federation");
    let f = judge(&fed, metadata(Some(100), None), None);
    assert_eq!(reason(&f), Some((Reason::AdcSourceUnexpected, Verdict::Fail)));
    assert!(f.unwrap().message.contains("not from an external_account credential configuration"));
    assert_eq!(
        reason(&judge(&fed, file(Source::CredentialsFile, "service_account"), None)).map(|r| r.0),
        Some(Reason::AdcSourceUnexpected)
    );
    // The right file: judged by its subject token only.
    let mut external = file(Source::CredentialsFile, "external_account");
    external.fingerprint_of = Some(FingerprintOf::SubjectToken);
    assert_eq!(judge(&fed, external.clone(), Some("fedcba987654")), None);
    let drift = judge(&fed, external.clone(), Some("0123456789ab"));
    assert_eq!(reason(&drift), Some((Reason::CredentialSourceDrift, Verdict::Fail)));
    assert!(drift.unwrap().message.contains("the subject token its credential configuration sends"));
    // Its exchange failing is the live chain's to judge, not a metadata server's.
    external.first_token_ms = None;
    assert_eq!(judge(&fed, external, Some("fedcba987654")), None);
}

#[test]
fn a_job_that_never_ran_is_unknown_and_a_carried_finding_stands() {
    let workload = "Deployment/api".parse().unwrap();
    let subject = CanarySubject {
        namespace: "checkout",
        service_account: "app",
        workload: &workload,
        expected: None,
        last_fingerprint: Some("0123456789ab"),
    };
    let gke = plan("GKE");
    let f = gke.canary_stage(
        &Outcome::NotScheduled { job: "authprobe-canary-1".into(), why: "unschedulable: 0/1 nodes.".into() },
        &subject,
    );
    assert_eq!(reason(&f), Some((Reason::CanaryNotScheduled, Verdict::Unknown)));
    let m = f.unwrap().message;
    assert!(
        m.contains("Job checkout/authprobe-canary-1: unschedulable: 0/1 nodes. authprobe cannot tell"),
        "{m}"
    );
    assert!(m.contains("last fingerprint 0123456789ab") && m.contains("Fix: "), "{m}");
    let carried = Finding::fail(Stage::Canary, Reason::MetadataServerSlowStart, "from status");
    assert_eq!(gke.canary_stage(&Outcome::Carried(carried.clone()), &subject), Some(carried));
}
