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

/// Runs `authprobe` with `args` and `file` as its `-f` file; (exit code, stdout, stderr).
fn run_check(file_text: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let env = env();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.yaml");
    std::fs::write(&file, file_text).unwrap();
    let out = Command::new(authprobe_bin())
        .args(["check", "-f", file.to_str().unwrap()])
        .args(args)
        .env("KUBECONFIG", env.cp.kubeconfig_path())
        .env("AUTHPROBE_GOOGLE_ENDPOINTS", &env.endpoints)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    (out.status.code(), text(out.stdout), text(out.stderr))
}

/// Input and usage errors exit 3 (2 stays "cannot tell") and say what is wrong; nothing is checked.
#[test]
fn input_and_usage_errors_exit_3_and_name_what_is_wrong() {
    let valid = serde_json::to_string(&probe("gate", gke_spec("suite", "none", json!({})))).unwrap();
    let mut typo = probe("gate", gke_spec("suite", "none", json!({})));
    typo["spec"]["identity"]["projectid"] = json!("acme-prod");
    let typo = serde_json::to_string(&typo).unwrap();
    for (text, args, expected) in [
        ("kind: AuthProbe\nspec: [not, a, spec]\n", &[][..], "is not an authprobe.io/v1alpha1 AuthProbe"),
        (&typo[..], &[][..], "unknown field \"spec.identity.projectid\""),
        (&valid[..], &["--no-such-flag"][..], "--no-such-flag"),
        (&valid[..], &["--output", "xml"][..], "xml"),
        (
            &valid[..],
            &["--kubeconfig", "/nonexistent/kubeconfig"][..],
            "--kubeconfig /nonexistent/kubeconfig",
        ),
        (&valid[..], &["--context", "no-such-context"][..], "--context"),
    ] {
        let (code, _, stderr) = run_check(text, args);
        assert_eq!(code, Some(3), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {expected:?} not in {stderr}");
    }
}

/// `-o yaml` prints the JSON output's structure; `--kubeconfig` and `--context` pick the cluster.
#[tokio::test]
async fn yaml_output_and_an_explicit_kubeconfig_and_context() {
    let env = env();
    let client = env.client().await;
    let id = unique("yaml");
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("yaml"));
    let ns = env.namespace(&client, "check-yaml", &[("suite", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&gsa)).await;
    env.fake_service_account(&gsa, &[(WIU, &[&member(&ns, "app")])]);
    let text = serde_json::to_string(&probe("gate", gke_spec("suite", &id, json!({})))).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, OPERATOR_TOKEN).unwrap();
    let args = [
        "--output".to_string(),
        "yaml".into(),
        "--kubeconfig".into(),
        env.cp.kubeconfig_path().display().to_string(),
        "--context".into(),
        "authprobe-local".into(),
        "--google-access-token-file".into(),
        token.display().to_string(),
    ];
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_check(&text, &args)
    })
    .await
    .unwrap();
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let v: Value = serde_saphyr::from_str(&stdout).unwrap_or_else(|e| panic!("not YAML ({e}): {stdout}"));
    assert_eq!(v["exitCode"], 0);
    assert_eq!(v["probes"][0]["results"][0]["namespace"], ns.as_str());
}

/// A bare `authprobe` is `authprobe run`, its environment variables included (it used to ignore
/// them and listen on 0.0.0.0:8080).
#[test]
fn a_bare_authprobe_runs_the_operator_with_its_environment() {
    let env = env();
    let port = authprobe_harness::free_port().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, OPERATOR_TOKEN).unwrap();
    let log = dir.path().join("bare.log");
    let mut child = authprobe_harness::spawn(
        &authprobe_bin(),
        &[],
        &[
            ("KUBECONFIG", env.cp.kubeconfig_path().display().to_string()),
            ("AUTHPROBE_HTTP_ADDR", format!("127.0.0.1:{port}")),
            ("AUTHPROBE_GOOGLE_ENDPOINTS", env.endpoints.clone()),
            ("AUTHPROBE_GOOGLE_ACCESS_TOKEN_FILE", token.display().to_string()),
            ("AUTHPROBE_LOG_FORMAT", "json".into()),
        ],
        &log,
    )
    .unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let served = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("serving /healthz") {
            break text;
        }
        assert!(std::time::Instant::now() < deadline, "never served: {text}");
        assert!(child.try_wait().unwrap().is_none(), "it exited: {text}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    authprobe_harness::kill(&mut child);
    assert!(served.contains(&format!("127.0.0.1:{port}")), "AUTHPROBE_HTTP_ADDR was honoured: {served}");
    assert!(served.starts_with('{'), "AUTHPROBE_LOG_FORMAT=json was honoured: {served}");
}
