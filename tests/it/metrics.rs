//! `/metrics` in the demo scenario: three payments namespaces, checkout forgotten by the GSA's
//! policy, the live chain on. Every series the design names, with the values that scenario implies.
//! The figures are the operator's for every probe it sees, and the names (`payments`, `billing`, ...)
//! are fixed: a control plane, fake and operator of this module's own.

use std::collections::BTreeMap;

use fake_google::scenario::{Binding, Cluster, GkeCluster, GkeProject, ServiceAccount};
use serde_json::json;

use crate::support::*;

static ENV: Private = Private::new("metrics", Setup::DEFAULT);

const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/payments-data";

fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn the_named_series_carry_the_demo_scenarios_values() {
    let env = ENV.get();
    let client = env.client().await;
    let cp = &env.cp;
    let gsa = "payments@acme-prod.iam.gserviceaccount.com";
    for ns in ["billing", "checkout", "ledger"] {
        let namespaces = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
        namespaces
            .create(
                &Default::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns, "labels": {"team": "payments"}}}))
                    .unwrap(),
            )
            .await
            .unwrap();
        service_account(&client, ns, "app", Some(gsa)).await;
    }
    env.fake.update(|s| {
        s.clusters.push(Cluster { issuer: cp.issuer(), ca_pem: cp.ca_pem().unwrap() });
        s.gke.push(GkeProject {
            project_id: "acme-prod".into(),
            project_number: "123456789012".into(),
            clusters: vec![GkeCluster { url: "https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-1".into(), issuer: cp.issuer() }],
        });
        s.service_accounts.push(ServiceAccount {
            email: gsa.into(),
            bindings: vec![Binding { role: WIU.into(), members: vec![member("billing", "app"), member("ledger", "app")], condition: None }],
            grants: BTreeMap::from([(BUCKET.into(), vec!["storage.objects.get".into()])]),
            ..Default::default()
        });
    });
    let example =
        std::fs::read_to_string(authprobe_harness::repo_root().join("examples/payments.yaml")).unwrap();
    let probe: serde_json::Value = serde_saphyr::from_str(&example).unwrap();
    apply_probe(&client, "payments", probe["spec"].clone()).await;
    env.wait_ready(&client, "payments", "False", "PrincipalNotMapped").await;

    // The pass's series follow its status: the failing ServiceAccount's is the last it sets.
    let checkout = r#"authprobe_failing_serviceaccount{probe="payments",namespace="checkout",serviceaccount="app",stage="IAMPolicy",reason="PrincipalNotMapped"}"#;
    let m = env.operator.wait_metrics("the pass's series", |m| value(m, checkout).is_some()).await;
    let expect = |series: &str, want: f64| assert_eq!(value(&m, series), Some(want), "{series} in:\n{m}");
    expect(r#"authprobe_serviceaccounts{probe="payments",result="passing"}"#, 2.0);
    expect(r#"authprobe_serviceaccounts{probe="payments",result="failing"}"#, 1.0);
    expect(r#"authprobe_serviceaccounts{probe="payments",result="unknown"}"#, 0.0);
    expect(
        r#"authprobe_failing_serviceaccount{probe="payments",namespace="checkout",serviceaccount="app",stage="IAMPolicy",reason="PrincipalNotMapped"}"#,
        1.0,
    );
    assert!(
        !m.contains(r#"authprobe_failing_serviceaccount{probe="payments",namespace="billing""#),
        "only failing KSAs have a series"
    );
    expect(r#"authprobe_condition{probe="payments",type="Ready",status="False"}"#, 1.0);
    expect(r#"authprobe_condition{probe="payments",type="Ready",status="True"}"#, 0.0);
    expect(r#"authprobe_condition{probe="payments",type="TokenExchangeVerified",status="Unknown"}"#, 1.0);
    expect(r#"authprobe_condition{probe="payments",type="CheckerHealthy",status="True"}"#, 1.0);
    let last = value(&m, r#"authprobe_last_probe_timestamp_seconds{probe="payments"}"#).unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!((now - last).abs() < 120.0, "last probe {last}, now {now}");
    expect(r#"authprobe_google_requests_total{api="iam.getIamPolicy",outcome="ok"}"#, 1.0);
    expect(r#"authprobe_google_requests_total{api="iam.serviceAccounts.get",outcome="ok"}"#, 1.0);
    // The chain ran for billing and ledger, whose mappings hold (and was skipped for checkout).
    expect("authprobe_tokens_minted_total", 3.0);
    expect(r#"authprobe_google_requests_total{api="securetoken.identitybindingtoken",outcome="ok"}"#, 3.0);
    expect(r#"authprobe_google_requests_total{api="iamcredentials.generateAccessToken",outcome="ok"}"#, 2.0);
    expect(r#"authprobe_google_requests_total{api="storage.testIamPermissions",outcome="ok"}"#, 2.0);
    assert!(
        value(&m, r#"authprobe_google_request_duration_seconds_count{api="iam.getIamPolicy"}"#).unwrap()
            >= 1.0
    );
    assert!(value(&m, "authprobe_reconcile_duration_seconds_count").unwrap() >= 1.0);
}
