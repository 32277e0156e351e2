//! Signing-key rotation on the API server: a provider holding an uploaded copy of the old JWKS no
//! longer trusts the tokens the cluster mints, and authprobe says so precisely; uploading the new
//! keys fixes it. The API server restarts with a new key here: a control plane (with a fake and an
//! operator) of this module's own.

use std::collections::BTreeMap;

use authprobe::api::condition;
use fake_google::scenario::{Cluster, Pool, Provider, ServiceAccount};
use serde_json::json;

use crate::support::*;

static ENV: Private = Private::new("key_rotation", Setup::DEFAULT);

const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/payments-data";

async fn cluster_jwks(env: &Env) -> String {
    let client = env.client().await;
    client.request_text(http::Request::get("/openid/v1/jwks").body(Vec::new()).unwrap()).await.unwrap()
}

#[tokio::test]
async fn a_rotated_signing_key_is_not_trusted_until_uploaded() {
    let env = ENV.get();
    let cp = &env.cp;
    let client = env.client().await;
    let id = unique("rotation");
    let pool = "projects/123456789012/locations/global/workloadIdentityPools/onprem";
    let provider = format!("{pool}/providers/k8s");
    let gsa = "rotation@acme-prod.iam.gserviceaccount.com";
    let ns = env.namespace(&client, "rotation", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(gsa)).await;
    let subject = format!("principal://iam.googleapis.com/{pool}/subject/system:serviceaccount:{ns}:app");
    let old_keys = cluster_jwks(&env).await;
    env.fake.update(|s| {
        s.clusters.push(Cluster { issuer: cp.issuer(), ca_pem: cp.ca_pem().unwrap() });
        s.pools.push(Pool {
            name: pool.into(),
            providers: vec![Provider {
                id: "k8s".into(),
                issuer_uri: cp.issuer(),
                jwks_json: old_keys.clone(),
                attribute_mapping: BTreeMap::from([("google.subject".into(), "assertion.sub".into())]),
                ..Default::default()
            }],
            ..Default::default()
        });
        s.service_accounts.push(ServiceAccount {
            email: gsa.into(),
            bindings: vec![fake_google::scenario::Binding {
                role: WIU.into(),
                members: vec![subject.clone()],
                condition: None,
            }],
            grants: BTreeMap::from([(BUCKET.into(), vec!["storage.objects.get".into()])]),
            ..Default::default()
        });
    });
    let spec = json!({
        "namespaceSelector": {"matchLabels": {"team": id}},
        "serviceAccounts": {"names": ["app"]},
        "identity": {"platform": "Federation", "projectNumber": "123456789012", "federation": {"provider": provider}},
        "targets": [{"resource": BUCKET, "permissions": ["storage.objects.get"]}],
        "probe": {"tokenExchange": true, "propagationGrace": "0s"}
    });
    apply_probe(&client, &id, spec).await;
    let probe = env.wait_verified(&client, &id, 1).await;
    assert_eq!(condition_of(&probe, condition::TOKEN_EXCHANGE_VERIFIED).unwrap().0, "True");

    // The cluster now signs with a new key, still publishing the old one for verification.
    cp.rotate_signing_key(true).await.unwrap();
    let rotated = cluster_jwks(&env).await;
    assert_ne!(rotated, old_keys);
    probe_now(&client, &id).await;
    // A restarted API server takes a while to serve resumed watches again (410, re-list).
    let want = Some(("False".to_string(), "SigningKeyNotTrusted".to_string()));
    let probe = env
        .wait_for_within(&client, &id, "SigningKeyNotTrusted", std::time::Duration::from_secs(240), |p| {
            ready(p) == want
        })
        .await;
    let failure = &probe.status.unwrap().failures[0];
    assert!(failure.message.contains("jwk-json-path"), "{}", failure.message);

    env.fake.update(|s| s.pools[0].providers[0].jwks_json = rotated.clone());
    probe_now(&client, &id).await;
    env.wait_ready(&client, &id, "True", "Verified").await;
}
