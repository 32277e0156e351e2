//! The canary against the fake metadata server and credential files, with short limits.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use base64::Engine as _;
use fake_google::{
    metadata::{self, Identity, MetadataConfig, Outage, OutageMode},
    scenario::{Scenario, ServiceAccount},
};

use super::*;
use crate::engine::canary::{AUDIENCE, GOOGLE_ISSUER, fingerprint};

const GSA: &str = "app@acme-prod.iam.gserviceaccount.com";
const SHORT: Limits = Limits { attempt: Duration::from_millis(400), deadline: Duration::from_secs(3) };

/// A metadata server (and the fake Google its tokens belong to, stopped when dropped).
async fn metadata_server(
    identity: Identity,
    cold_start: Duration,
) -> (fake_google::Running, metadata::Running) {
    let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
    let google = fake_google::start(loopback, Scenario::default()).await.unwrap();
    let config =
        MetadataConfig { cold_start, ..MetadataConfig::new(google.fake.clone(), "acme-prod", identity) };
    let md = metadata::start(loopback, config).await.unwrap();
    (google, md)
}

fn metadata_env(md: &metadata::Running) -> AdcEnv {
    AdcEnv { metadata_host: Some(md.addr.to_string()), ..AdcEnv::default() }
}

fn assert_holds_no_credential(report: &Report, google: &fake_google::Running) {
    let message = report.to_message();
    for credential in google.fake.credentials_seen() {
        assert!(!message.contains(&credential), "the report holds a credential: {message}");
    }
}

#[tokio::test]
async fn a_ready_metadata_server_gives_a_token_at_once_and_the_gsas_fingerprint() {
    let (google, md) = metadata_server(Identity::ServiceAccount(GSA.into()), Duration::ZERO).await;
    let report = canary(&metadata_env(&md), LIMITS, Instant::now()).await;
    assert_eq!(report.source, Source::MetadataServer);
    assert_eq!(report.metadata_host, Some(md.addr.to_string()));
    assert_eq!(report.token_type, Some(TokenType::AccessToken));
    assert!(report.first_token().is_some_and(|t| t < ATTEMPT_TIMEOUT), "{report:?}");
    assert_eq!(report.attempts, 1);
    let unique_id = ServiceAccount { email: GSA.into(), ..Default::default() }.unique_id();
    assert_eq!(report.fingerprint, Some(fingerprint(GOOGLE_ISSUER, AUDIENCE, &unique_id)));
    assert_eq!(report.fingerprint_of, Some(FingerprintOf::IdToken));
    assert_eq!(report.error, None);
    assert!(google.fake.credentials_seen().len() >= 2, "an access and an ID token were handed out");
    assert_holds_no_credential(&report, &google);
}

#[tokio::test]
async fn a_cold_start_is_polled_through_and_timed_from_the_start() {
    let cold = Duration::from_millis(1200);
    let (google, md) = metadata_server(Identity::ServiceAccount(GSA.into()), cold).await;
    let report = canary(&metadata_env(&md), SHORT, Instant::now()).await;
    let first = report.first_token().expect("a token after the cold start");
    assert!(first >= cold && first < SHORT.deadline, "{first:?}");
    assert!(report.attempts >= 3, "each attempt gave up after 400ms: {report:?}");
    assert!(report.fingerprint.is_some());
    assert_holds_no_credential(&report, &google);
}

#[tokio::test]
async fn no_token_by_the_deadline_is_reported_with_the_last_error() {
    let (_, md) = metadata_server(Identity::ServiceAccount(GSA.into()), Duration::ZERO).await;
    md.update(|c| c.outages = vec![Outage::now_for(Duration::from_secs(600), OutageMode::Hang)]);
    let started = Instant::now();
    let report = canary(&metadata_env(&md), SHORT, started).await;
    assert!(started.elapsed() >= SHORT.deadline && started.elapsed() < SHORT.deadline * 2);
    assert_eq!((report.first_token_ms, report.token_type, &report.fingerprint), (None, None, &None));
    assert!(report.attempts >= 7, "{report:?}");
    // The last attempt only had what was left of the deadline.
    assert!(report.error.as_deref().is_some_and(|e| e.starts_with("no answer within 0.")), "{report:?}");

    // Refused at once (503): retried with a growing pause, never more often than the bound.
    md.update(|c| c.outages = vec![Outage::now_for(Duration::from_secs(600), OutageMode::Unavailable)]);
    let report = canary(&metadata_env(&md), SHORT, Instant::now()).await;
    assert_eq!(report.first_token_ms, None);
    assert!((3..=MAX_ATTEMPTS).contains(&report.attempts), "{report:?}");
    assert!(report.error.as_deref().is_some_and(|e| e.contains("503")), "{report:?}");
}

#[tokio::test]
async fn a_ksa_without_a_gsa_gets_a_token_but_no_id_token_to_fingerprint() {
    let federated = Identity::Federated { namespace: "ns".into(), name: "plain".into() };
    let (_, md) = metadata_server(federated, Duration::ZERO).await;
    let report = canary(&metadata_env(&md), SHORT, Instant::now()).await;
    assert!(report.first_token_ms.is_some());
    assert_eq!((&report.fingerprint, report.fingerprint_of), (&None, None));
    assert!(report.error.as_deref().is_some_and(|e| e.contains("no ID token")), "{report:?}");
}

fn service_account_key() -> Value {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    serde_json::json!({
        "type": "service_account",
        "project_id": "acme-prod",
        "private_key_id": "0123456789abcdef",
        "private_key": key.serialize_pem(),
        "client_email": "key@acme-prod.iam.gserviceaccount.com",
        "client_id": "109876543210987654321",
        "token_uri": "http://127.0.0.1:1/token",
    })
}

#[tokio::test]
async fn google_application_credentials_wins_over_the_metadata_server() {
    let (_, md) = metadata_server(Identity::ServiceAccount(GSA.into()), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("key.json");
    std::fs::write(&path, service_account_key().to_string()).unwrap();
    let env = AdcEnv { credentials: Some(path.display().to_string()), ..metadata_env(&md) };
    let report = canary(&env, SHORT, Instant::now()).await;
    assert_eq!(report.source, Source::CredentialsFile);
    assert_eq!(report.path, Some(path.display().to_string()));
    assert_eq!(report.credential_type.as_deref(), Some("service_account"));
    // The key signs its own token: no call out.
    assert_eq!(report.token_type, Some(TokenType::Jwt));
    assert!(report.first_token().is_some_and(|t| t < ATTEMPT_TIMEOUT), "{report:?}");
    assert_eq!(report.fingerprint, Some(fingerprint(GOOGLE_ISSUER, AUDIENCE, "109876543210987654321")));
    assert_eq!(report.fingerprint_of, Some(FingerprintOf::ServiceAccountKey));
    assert!(md.requests_by_client().is_empty(), "the metadata server was never asked");
    assert!(!report.to_message().contains("PRIVATE KEY"));

    // A variable naming no file is an error, not a fall-through to the metadata server.
    let env = AdcEnv { credentials: Some("/nonexistent/key.json".into()), ..metadata_env(&md) };
    let report = canary(&env, SHORT, Instant::now()).await;
    assert_eq!((report.source, report.attempts, report.first_token_ms), (Source::CredentialsFile, 0, None));
    assert!(report.error.as_deref().is_some_and(|e| e.contains("cannot read /nonexistent/key.json")));
    assert!(md.requests_by_client().is_empty());
}

#[tokio::test]
async fn gcloud_user_credentials_under_cloudsdk_config_come_before_the_metadata_server() {
    let (_, md) = metadata_server(Identity::ServiceAccount(GSA.into()), Duration::ZERO).await;
    let dir = tempfile::tempdir().unwrap();
    let user = serde_json::json!({
        "type": "authorized_user",
        "client_id": "id.apps.googleusercontent.com",
        "client_secret": "not-a-secret",
        "refresh_token": "not-a-token",
        "token_uri": "http://127.0.0.1:1/token",
    });
    std::fs::write(dir.path().join(canary::WELL_KNOWN_FILE), user.to_string()).unwrap();
    let env = AdcEnv { cloudsdk_config: Some(dir.path().display().to_string()), ..metadata_env(&md) };
    let report = canary(&env, SHORT, Instant::now()).await;
    assert_eq!(report.source, Source::GcloudWellKnownFile);
    assert_eq!(report.credential_type.as_deref(), Some("authorized_user"));
    assert_eq!((report.first_token_ms, &report.fingerprint), (None, &None), "{report:?}");
    assert!(report.error.is_some());
    assert!(md.requests_by_client().is_empty());
}

#[tokio::test]
async fn an_external_account_file_is_fingerprinted_by_its_subject_token() {
    let dir = tempfile::tempdir().unwrap();
    let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let claims = serde_json::json!({
        "iss": "https://issuer.cluster.test",
        "aud": ["//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k"],
        "sub": "system:serviceaccount:ns:app",
    });
    let token = format!("{}.{}.c2ln", b64(serde_json::json!({"alg": "RS256"})), b64(claims));
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, &token).unwrap();
    let config = serde_json::json!({
        "type": "external_account",
        "audience": "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k",
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "http://127.0.0.1:1/v1/token",
        "credential_source": {"file": token_path.display().to_string()},
    });
    let path = dir.path().join("config.json");
    std::fs::write(&path, config.to_string()).unwrap();
    let env = AdcEnv { credentials: Some(path.display().to_string()), ..AdcEnv::default() };
    let report = canary(&env, SHORT, Instant::now()).await;
    assert_eq!(report.credential_type.as_deref(), Some("external_account"));
    assert_eq!(
        report.fingerprint,
        Some(fingerprint(
            "https://issuer.cluster.test",
            "//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k",
            "system:serviceaccount:ns:app"
        ))
    );
    assert_eq!(report.fingerprint_of, Some(FingerprintOf::SubjectToken));
    assert_eq!(report.first_token_ms, None, "the exchange's endpoint is closed");
    assert!(!report.to_message().contains(&token));
}
