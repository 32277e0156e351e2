use base64::Engine as _;

use super::*;
use crate::{api::AuthProbeSpec, engine::facts::ClusterIssuer};

fn exists_only(paths: &[&str]) -> impl Fn(&Path) -> bool {
    let paths: Vec<PathBuf> = paths.iter().map(PathBuf::from).collect();
    move |p: &Path| paths.iter().any(|q| q == p)
}

#[test]
fn adc_resolves_in_google_auths_order() {
    let home = AdcEnv { home: Some("/home/app".into()), ..AdcEnv::default() };
    let well_known = "/home/app/.config/gcloud/application_default_credentials.json";
    // Nothing set: the metadata server at its default host.
    assert_eq!(
        resolve(&home, exists_only(&[])),
        Resolved::MetadataServer { host: DEFAULT_METADATA_HOST.into() }
    );
    let overridden = AdcEnv { metadata_host: Some("10.88.0.1:8080".into()), ..home.clone() };
    assert_eq!(
        resolve(&overridden, exists_only(&[])),
        Resolved::MetadataServer { host: "10.88.0.1:8080".into() }
    );
    // gcloud's file under HOME, only when it exists.
    assert_eq!(
        resolve(&overridden, exists_only(&[well_known])),
        Resolved::File { source: Source::GcloudWellKnownFile, path: well_known.into() }
    );
    // CLOUDSDK_CONFIG replaces HOME's directory.
    let config = AdcEnv { cloudsdk_config: Some("/etc/gcloud".into()), ..overridden.clone() };
    assert_eq!(
        resolve(&config, exists_only(&[well_known])),
        Resolved::MetadataServer { host: "10.88.0.1:8080".into() }
    );
    assert_eq!(
        resolve(&config, exists_only(&["/etc/gcloud/application_default_credentials.json"])),
        Resolved::File {
            source: Source::GcloudWellKnownFile,
            path: "/etc/gcloud/application_default_credentials.json".into()
        }
    );
    // GOOGLE_APPLICATION_CREDENTIALS first, existing or not.
    let credentials = AdcEnv { credentials: Some("/var/secrets/key.json".into()), ..config };
    assert_eq!(
        resolve(&credentials, exists_only(&[well_known])),
        Resolved::File { source: Source::CredentialsFile, path: "/var/secrets/key.json".into() }
    );
}

#[test]
fn empty_variables_count_as_unset() {
    let env = AdcEnv::from_lookup(|name| match name {
        "GOOGLE_APPLICATION_CREDENTIALS" => Some(String::new()),
        "GCE_METADATA_HOST" => Some("169.254.169.254".into()),
        "HOME" => Some("/root".into()),
        _ => None,
    });
    assert_eq!(
        env,
        AdcEnv {
            home: Some("/root".into()),
            metadata_host: Some("169.254.169.254".into()),
            ..AdcEnv::default()
        }
    );
}

fn jwt(claims: serde_json::Value) -> String {
    let b64 = |v: &serde_json::Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.c2lnbmF0dXJl", b64(&serde_json::json!({"alg": "RS256", "kid": "k"})), b64(&claims))
}

#[test]
fn fingerprints_are_twelve_hex_digits_of_iss_aud_sub() {
    let fp = fingerprint("https://accounts.google.com", AUDIENCE, "123");
    assert_eq!(fp.len(), 12);
    assert!(fp.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    // `printf 'a|b|c' | sha256sum` starts with these six bytes.
    assert_eq!(fingerprint("a", "b", "c"), "a52dd81bfd5e");
    assert_ne!(fingerprint("a", "b", "c"), fingerprint("a", "b", "d"));
    assert_ne!(fingerprint("a|b", "", "c"), fingerprint("a", "b", "c"), "the separators are part of it");

    let token = jwt(serde_json::json!({"iss": "a", "aud": "b", "sub": "c", "email": "x"}));
    assert_eq!(jwt_fingerprint(&token), Ok(fingerprint("a", "b", "c")));
    // A one-audience list (Kubernetes tokens) counts as that audience.
    let listed = jwt(serde_json::json!({"iss": "a", "aud": ["b"], "sub": "c"}));
    assert_eq!(jwt_fingerprint(&format!("{listed}\n")), Ok(fingerprint("a", "b", "c")));
    let two = jwt(serde_json::json!({"iss": "a", "aud": ["b", "x"], "sub": "c"}));
    assert_eq!(jwt_fingerprint(&two), Err(ClaimsError::MissingClaim));
    assert_eq!(
        jwt_fingerprint(&jwt(serde_json::json!({"iss": "a", "aud": "b"}))),
        Err(ClaimsError::MissingClaim)
    );
    for bad in ["ya29.opaque-token", "a.b", "a.%%%.c", "a.b.c.d", ""] {
        assert_eq!(jwt_fingerprint(bad), Err(ClaimsError::NotAJwt), "{bad}");
    }
}

#[test]
fn token_types_are_told_by_shape() {
    assert_eq!(TokenType::of("ya29.c.b0Aaekm1KZ"), TokenType::AccessToken);
    assert_eq!(TokenType::of(&jwt(serde_json::json!({"iss": "a"}))), TokenType::Jwt);
    assert_eq!(TokenType::of("a.b"), TokenType::AccessToken);
    assert_eq!(TokenType::of("e30.e30.e30"), TokenType::AccessToken, "JSON, but no JOSE header");
}

#[test]
fn a_service_account_key_is_fingerprinted_as_googles_id_token_for_it_would_be() {
    let key = serde_json::json!({"type": "service_account", "client_id": "1098", "client_email": "k@p.iam.gserviceaccount.com"});
    assert_eq!(service_account_key_fingerprint(&key), Some(fingerprint(GOOGLE_ISSUER, AUDIENCE, "1098")));
    assert_eq!(service_account_key_fingerprint(&serde_json::json!({"client_id": ""})), None);
    assert_eq!(service_account_key_fingerprint(&serde_json::json!({})), None);
}

fn report() -> Report {
    Report {
        version: REPORT_VERSION,
        source: Source::MetadataServer,
        path: None,
        metadata_host: Some("10.88.0.1:8080".into()),
        credential_type: None,
        token_type: Some(TokenType::AccessToken),
        first_token_ms: Some(5012),
        attempts: 2,
        fingerprint: Some("0123456789ab".into()),
        fingerprint_of: Some(FingerprintOf::IdToken),
        error: None,
    }
}

#[test]
fn reports_round_trip_through_the_termination_message() {
    let r = report();
    let message = r.to_message();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&message).unwrap(),
        serde_json::json!({
            "version": 1, "source": "MetadataServer", "metadataHost": "10.88.0.1:8080",
            "tokenType": "AccessToken", "firstTokenMs": 5012, "attempts": 2,
            "fingerprint": "0123456789ab", "fingerprintOf": "IdToken",
        })
    );
    assert_eq!(Report::parse(&message), Some(r.clone()));
    assert_eq!(r.first_token(), Some(Duration::from_millis(5012)));
    let file = Report { source: Source::CredentialsFile, ..r };
    assert!(file.to_message().contains(r#""source":"GOOGLE_APPLICATION_CREDENTIALS""#));
    // Half-written, another version, or not a report at all: nothing.
    assert_eq!(Report::parse(&message[..message.len() / 2]), None);
    assert_eq!(Report::parse(&message.replace(r#""version":1"#, r#""version":2"#)), None);
    assert_eq!(Report::parse("killed"), None);
    assert_eq!(Report::parse(""), None);
}

#[test]
fn the_termination_message_stays_under_4_kib_and_holds_no_token() {
    let token = jwt(serde_json::json!({"iss": "a", "aud": "b", "sub": "c"}));
    let worst = Report {
        path: Some("\"\\".repeat(4000)),
        metadata_host: Some("\u{1}".repeat(4000)),
        credential_type: Some("\"".repeat(4000)),
        error: Some(format!("{token} ya29.secret {}", "\"\u{2}\\".repeat(4000))),
        ..report()
    };
    let message = worst.to_message();
    assert!(message.len() < MAX_REPORT_BYTES, "{}", message.len());
    assert!(!message.contains(&token) && !message.contains("ya29.secret"));
    assert!(Report::parse(&message).is_some(), "still a report");
}

#[test]
fn workloads_are_kind_slash_name() {
    let w: WorkloadRef = "Deployment/api".parse().unwrap();
    assert_eq!(w, WorkloadRef { kind: WorkloadKind::Deployment, name: "api".into() });
    assert_eq!(w.to_string(), "Deployment/api");
    for kind in ["StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"] {
        let w: WorkloadRef = format!("{kind}/a.b-1").parse().unwrap();
        assert_eq!(w.kind.as_str(), kind);
    }
    for bad in [
        "Deployment",
        "deployment/api",
        "ReplicaSet/api",
        "Deployment/",
        "Deployment/API",
        "Pod/-a",
        "Pod/a/b",
    ] {
        assert!(bad.parse::<WorkloadRef>().is_err(), "{bad}");
    }
    assert!(format!("Pod/{}", "a".repeat(254)).parse::<WorkloadRef>().is_err());
}

fn plan(spec: serde_json::Value) -> Plan {
    let spec: AuthProbeSpec = serde_json::from_value(spec).unwrap();
    Plan::parse(&spec).unwrap()
}

#[test]
fn the_operator_expects_the_gsas_id_token_on_gke_and_the_ksa_token_under_federation() {
    let ksa = Ksa { namespace: "ns".into(), name: "app".into(), ..Ksa::default() };
    let gke = plan(
        serde_json::json!({"namespaceSelector": {}, "identity": {"platform": "GKE", "projectId": "acme-prod"}}),
    );
    let account = GoogleServiceAccount { unique_id: "1234".into(), ..GoogleServiceAccount::default() };
    assert_eq!(
        expected_fingerprint(&gke, &ksa, Some(&account), None),
        Some(fingerprint(GOOGLE_ISSUER, AUDIENCE, "1234"))
    );
    assert_eq!(expected_fingerprint(&gke, &ksa, None, None), None, "no GSA read: cannot tell");
    assert_eq!(expected_fingerprint(&gke, &ksa, Some(&GoogleServiceAccount::default()), None), None);

    let provider = "projects/123/locations/global/workloadIdentityPools/onprem/providers/k8s";
    let federation = plan(serde_json::json!({
        "namespaceSelector": {},
        "identity": {"platform": "Federation", "projectNumber": "123", "access": "Direct",
                     "federation": {"provider": provider}}
    }));
    let cluster = ClusterIssuer { issuer: "https://issuer.test".into(), keys: vec![] };
    assert_eq!(
        expected_fingerprint(&federation, &ksa, None, Some(&cluster)),
        Some(fingerprint(
            "https://issuer.test",
            &format!("//iam.googleapis.com/{provider}"),
            "system:serviceaccount:ns:app"
        ))
    );
    assert_eq!(expected_fingerprint(&federation, &ksa, None, None), None);
}

#[test]
fn the_canary_setting_is_checked_and_off_unless_enabled() {
    let base = serde_json::json!({"namespaceSelector": {}, "identity": {"platform": "GKE", "projectId": "acme-prod"}});
    assert_eq!(plan(base.clone()).canary, None);
    let with = |canary: serde_json::Value| {
        let mut spec = base.clone();
        spec["canary"] = canary;
        let spec: AuthProbeSpec = serde_json::from_value(spec).unwrap();
        Plan::parse(&spec)
    };
    assert_eq!(with(serde_json::json!({"workload": "Deployment/api"})).unwrap().canary, None);
    let on = with(serde_json::json!({"enabled": true, "workload": "Deployment/api"})).unwrap();
    assert_eq!(
        on.canary,
        Some(crate::engine::CanaryPlan {
            workload: "Deployment/api".parse().unwrap(),
            every: Duration::from_secs(3600)
        })
    );
    let e =
        with(serde_json::json!({"enabled": true, "workload": "Deployment/api", "every": "1m"})).unwrap_err();
    assert!(e.contains("canary.every"), "{e}");
    let e = with(serde_json::json!({"enabled": true, "workload": "ReplicaSet/api"})).unwrap_err();
    assert!(e.contains("canary.workload"), "{e}");
}
