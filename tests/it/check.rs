//! `authprobe check`: the same checks once, for CI pipelines. Exit 0 when all pass, 1 when
//! something fails, 2 when it cannot tell (or the spec is invalid), with JSON and JUnit output.

use std::process::Command;

use serde_json::{Value, json};

use crate::support::*;

/// Runs `authprobe check` on `probe` with `output`, as the operator identity `token`.
fn check(probe: &Value, output: &str, token: &str) -> (i32, String) {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.yaml");
    std::fs::write(&file, serde_json::to_string(probe).unwrap()).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, token).unwrap();
    let out = Command::new(authprobe_bin())
        .args(["check", "-f", file.to_str().unwrap(), "--output", output])
        .env("KUBECONFIG", env.cp.kubeconfig_path())
        .env("AUTHPROBE_GOOGLE_ENDPOINTS", &env.endpoints)
        .env("AUTHPROBE_GOOGLE_ACCESS_TOKEN_FILE", &token_file)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap())
}

fn probe(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "metadata": {"name": name}, "spec": spec})
}

fn results(json_out: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(json_out).unwrap_or_else(|e| panic!("not JSON ({e}): {json_out}"));
    v["probes"][0]["results"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn exit_codes_and_outputs() {
    let env = env();
    let client = env.client().await;
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("check"));
    let (good, bad) = (unique("good"), unique("bad"));
    let good_ns = env.namespace(&client, "check-good", &[("suite", good.as_str())]).await;
    let bad_ns = env.namespace(&client, "check-bad", &[("suite", bad.as_str())]).await;
    service_account(&client, &good_ns, "app", Some(&gsa)).await;
    service_account(&client, &bad_ns, "app", Some(&gsa)).await;
    env.fake_service_account(&gsa, &[(WIU, &[&member(&good_ns, "app")])]);

    // All passing: 0.
    let passing = probe("gate", gke_spec("suite", &good, json!({})));
    let (code, out) = check(&passing, "json", OPERATOR_TOKEN);
    assert_eq!(code, 0, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["exitCode"], 0);
    assert_eq!(
        v["probes"][0]["summary"],
        json!({"namespaces": 1, "serviceAccounts": 1, "passing": 1, "failing": 0, "unknown": 0})
    );
    assert_eq!(results(&out)[0]["result"], "passing");
    let (code, junit) = check(&passing, "junit", OPERATOR_TOKEN);
    assert_eq!(code, 0);
    assert!(
        junit.contains(&format!("<testcase classname=\"{good_ns}\" name=\"{good_ns}/app\"/>")),
        "{junit}"
    );
    assert!(junit.contains("failures=\"0\" errors=\"0\""), "{junit}");

    // Something failing: 1, with the reason and the fix.
    let failing = probe("gate", gke_spec("suite", &bad, json!({})));
    let (code, out) = check(&failing, "json", OPERATOR_TOKEN);
    assert_eq!(code, 1, "{out}");
    let r = &results(&out)[0];
    assert_eq!(
        (r["result"].as_str(), r["stage"].as_str(), r["reason"].as_str()),
        (Some("failing"), Some("IAMPolicy"), Some("PrincipalNotMapped"))
    );
    assert!(r["message"].as_str().unwrap().contains("gcloud iam service-accounts add-iam-policy-binding"));
    let (code, junit) = check(&failing, "junit", OPERATOR_TOKEN);
    assert_eq!(code, 1);
    assert!(junit.contains("<failure type=\"IAMPolicy\" message=\"PrincipalNotMapped\">"), "{junit}");
    assert!(junit.contains("failures=\"1\""), "{junit}");
    let (code, table) = check(&failing, "table", OPERATOR_TOKEN);
    assert_eq!(code, 1);
    assert!(
        table.contains("Ready=False (PrincipalNotMapped)") && table.contains(&format!("{bad_ns}/app")),
        "{table}"
    );

    // Cannot tell: Google refuses the checker's own token. 2, and no failure is claimed.
    let (code, out) = check(&failing, "json", "not-the-operator");
    assert_eq!(code, 2, "{out}");
    let r = &results(&out)[0];
    assert_eq!(
        (r["result"].as_str(), r["reason"].as_str()),
        (Some("unknown"), Some("CheckerUnauthenticated"))
    );
    let (_, junit) = check(&failing, "junit", "not-the-operator");
    assert!(
        junit.contains("<error type=\"IAMPolicy\" message=\"CheckerUnauthenticated\">")
            && junit.contains("failures=\"0\" errors=\"1\""),
        "{junit}"
    );

    // A KSA created moments ago, within the grace: pending, so 2 rather than 1.
    let fresh = probe("gate", gke_spec("suite", &bad, json!({"probe": {"propagationGrace": "1h"}})));
    let (code, out) = check(&fresh, "json", OPERATOR_TOKEN);
    assert_eq!(code, 2, "{out}");
    assert_eq!(results(&out)[0]["reason"], "PropagationPending");

    // An invalid spec: 2 with InvalidSpec, and nothing checked.
    let invalid = probe(
        "gate",
        gke_spec(
            "suite",
            &bad,
            json!({"targets": [{"resource": "//bigquery.googleapis.com/projects/p/datasets/d", "permissions": ["bigquery.tables.get"]}]}),
        ),
    );
    let (code, out) = check(&invalid, "json", OPERATOR_TOKEN);
    assert_eq!(code, 2, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["probes"][0]["conditions"][0]["reason"], "InvalidSpec");
    assert!(results(&out).is_empty());
}

#[test]
fn unreadable_input_is_an_error_not_a_verdict() {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.yaml");
    std::fs::write(&file, "kind: AuthProbe\nspec: [not, a, spec]\n").unwrap();
    let out = Command::new(authprobe_bin())
        .args(["check", "-f", file.to_str().unwrap()])
        .env("KUBECONFIG", env.cp.kubeconfig_path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not AuthProbe YAML"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
