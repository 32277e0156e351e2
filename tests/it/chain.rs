//! The live chain and the Federation provider checks against the real control plane and the fake
//! Google, which verifies every KSA token's signature against the API server's JWKS: healthy chains
//! (GKE and Federation), pool and provider state, audience, issuer, attribute condition, subject
//! length, impersonation, target permissions, federated-token refusal, clock skew, and no token
//! material anywhere a person or a scraper can read.
//!
//! Clock skew and APIs refusing federated tokens are the fake's for everyone, so this module has a
//! control plane, fake and operator of its own; within it, `GLOBAL` orders those tests.

use std::collections::BTreeMap;

use authprobe::api::{AuthProbe, condition};
use fake_google::scenario::{
    Cluster, Faults, GkeCluster, GkeProject, Grant, LifeState, Malformed, Pool, Provider, ServiceAccount,
};
use serde_json::{Value, json};

use crate::support::{self, *};

static ENV: Private = Private::new("chain", Setup::DEFAULT);

const CLUSTER_URL: &str =
    "https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-1";
const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/payments-data";
const PROJECT_NUMBER: &str = "123456789012";

/// Lets the fake reach this cluster's issuer, and trust it as the GKE cluster `prod-1`.
fn trust_cluster(env: &Env) {
    let cp = &env.cp;
    let (issuer, ca) = (cp.issuer(), cp.ca_pem().unwrap());
    env.fake.update(|s| {
        if !s.clusters.iter().any(|c| c.issuer == issuer) {
            s.clusters.push(Cluster { issuer: issuer.clone(), ca_pem: ca });
            s.gke.push(GkeProject {
                project_id: "acme-prod".into(),
                project_number: PROJECT_NUMBER.into(),
                clusters: vec![GkeCluster { url: CLUSTER_URL.into(), issuer }],
            });
        }
    });
}

/// Tests that change what every exchange sees (Google's clock, which APIs take federated tokens)
/// hold this exclusively; the others share it.
static GLOBAL: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn gsa(name: &str) -> String {
    format!("{name}@acme-prod.iam.gserviceaccount.com")
}

fn add_gsa(env: &Env, sa: ServiceAccount) {
    env.fake.update(|s| {
        s.service_accounts.retain(|x| x.email != sa.email);
        s.service_accounts.push(sa);
    });
}

fn chain_spec(label: &str, value: &str, extra: Value) -> Value {
    let mut spec = gke_spec(
        label,
        value,
        json!({
            "identity": {"gke": {"clusterLocation": "us-central1", "clusterName": "prod-1"}},
            "targets": [{"resource": BUCKET, "permissions": ["storage.objects.get"]}],
            "probe": {"tokenExchange": true}
        }),
    );
    merge(&mut spec, extra);
    spec
}

/// A GSA that grants `roles/iam.workloadIdentityUser` to `members` and may read [`BUCKET`].
fn bucket_reader(email: &str, members: Vec<String>) -> ServiceAccount {
    ServiceAccount {
        email: email.to_string(),
        bindings: vec![fake_google::scenario::Binding { role: WIU.into(), members, condition: None }],
        grants: BTreeMap::from([(BUCKET.to_string(), vec!["storage.objects.get".to_string()])]),
        ..Default::default()
    }
}

fn failure_reasons(p: &AuthProbe) -> BTreeMap<String, String> {
    p.status
        .as_ref()
        .map(|s| s.failures.iter().map(|f| (f.namespace.clone(), f.reason.as_str().to_string())).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_healthy_gke_chain_is_verified_end_to_end() {
    let env = ENV.get();
    let _shared = GLOBAL.read().await;
    trust_cluster(&env);
    let client = env.client().await;
    let id = unique("gke");
    let main = gsa(&unique("gke"));
    let ns = env.namespace(&client, "gke", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&main)).await;
    add_gsa(&env, bucket_reader(&main, vec![member(&ns, "app")]));
    apply_probe(&client, &id, chain_spec("team", &id, json!({}))).await;
    let probe = env.wait_verified(&client, &id, 1).await;
    assert_eq!(
        condition_of(&probe, condition::TOKEN_EXCHANGE_VERIFIED).unwrap(),
        ("True".into(), "Verified".into())
    );
    let counts = env.fake.counts();
    for api in [
        "securetoken.identitybindingtoken",
        "iamcredentials.generateAccessToken",
        "storage.testIamPermissions",
    ] {
        assert!(counts.get(api).copied().unwrap_or_default() >= 1, "{api} never called: {counts:?}");
    }
}

/// A Federation pool and provider trusting this cluster, with the cluster's keys uploaded.
async fn federation(env: &Env, pool_id: &str, provider: Provider) -> String {
    trust_cluster(env);
    let pool = format!("projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{pool_id}");
    let provider = Provider { id: "k8s".into(), issuer_uri: env.cp.issuer(), ..provider };
    env.fake.update(|s| {
        s.pools.retain(|p| p.name != pool);
        s.pools.push(Pool { name: pool.clone(), providers: vec![provider], ..Default::default() });
    });
    format!("{pool}/providers/k8s")
}

/// [`federation`] with the default mapping and the cluster's keys uploaded, no condition.
async fn default_federation(env: &Env, pool_id: &str) -> String {
    let provider = Provider {
        attribute_mapping: default_mapping(),
        jwks_json: cluster_jwks(env).await,
        ..Default::default()
    };
    federation(env, pool_id, provider).await
}

async fn cluster_jwks(env: &Env) -> String {
    let client = env.client().await;
    client.request_text(http::Request::get("/openid/v1/jwks").body(Vec::new()).unwrap()).await.unwrap()
}

fn default_mapping() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("google.subject".into(), "assertion.sub".into()),
        ("attribute.namespace".into(), "assertion['kubernetes.io']['namespace']".into()),
    ])
}

fn federation_spec(label: &str, value: &str, provider: &str, extra: Value) -> Value {
    let mut spec = json!({
        "namespaceSelector": {"matchLabels": {label: value}},
        "serviceAccounts": {"names": ["app"]},
        "identity": {"platform": "Federation", "projectNumber": PROJECT_NUMBER, "federation": {"provider": provider}},
        "targets": [{"resource": BUCKET, "permissions": ["storage.objects.get"]}],
        "probe": {"tokenExchange": true, "propagationGrace": "0s"}
    });
    merge(&mut spec, extra);
    spec
}

fn principal(pool: &str, ns: &str) -> String {
    format!(
        "principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{pool}/subject/system:serviceaccount:{ns}:app"
    )
}

#[tokio::test]
async fn federation_chain_and_the_attribute_condition_per_namespace() {
    let env = ENV.get();
    let _shared = GLOBAL.read().await;
    let client = env.client().await;
    let id = unique("fed");
    let pool_id = unique("pool");
    let main = gsa(&unique("fed"));
    let [billing, ledger, checkout] = [
        env.namespace(&client, "billing", &[("team", id.as_str())]).await,
        env.namespace(&client, "ledger", &[("team", id.as_str())]).await,
        env.namespace(&client, "checkout", &[("team", id.as_str())]).await,
    ];
    let condition = format!("assertion['kubernetes.io']['namespace'] in ['{billing}', '{ledger}']");
    let provider = federation(
        &env,
        &pool_id,
        Provider {
            attribute_mapping: default_mapping(),
            attribute_condition: condition,
            jwks_json: cluster_jwks(&env).await,
            ..Default::default()
        },
    )
    .await;
    for ns in [&billing, &ledger, &checkout] {
        service_account(&client, ns, "app", Some(&main)).await;
    }
    add_gsa(
        &env,
        bucket_reader(
            &main,
            vec![format!(
                "principalSet://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/{pool_id}/*"
            )],
        ),
    );
    apply_probe(&client, &id, federation_spec("team", &id, &provider, json!({}))).await;
    let probe = env
        .wait_for(&client, &id, "one rejected namespace", |p| {
            p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.passing == 2 && s.failing == 1)
        })
        .await;
    let failure = &probe.status.as_ref().unwrap().failures[0];
    assert_eq!(
        (failure.namespace.as_str(), failure.reason.as_str()),
        (checkout.as_str(), "AttributeConditionRejected")
    );
    assert!(
        failure.message.contains(&format!("in ['{billing}', '{ledger}']")),
        "names the clause: {}",
        failure.message
    );
    let exchange = condition_of(&probe, condition::TOKEN_EXCHANGE_VERIFIED).unwrap();
    assert_eq!(exchange.0, "Unknown", "the chain did not run for the rejected namespace: {exchange:?}");
    assert!(env.fake.counts().get("sts.token").copied().unwrap_or_default() >= 2);

    // Admit checkout too: the whole probe verifies through STS, impersonation and the bucket.
    env.fake.update(|s| {
        if let Some(p) = s.pools.iter_mut().find(|p| p.name.ends_with(&pool_id)) {
            p.providers[0].attribute_condition.clear();
        }
    });
    probe_now(&client, &id).await;
    let probe = env.wait_ready(&client, &id, "True", "Verified").await;
    assert_eq!(
        condition_of(&probe, condition::TOKEN_EXCHANGE_VERIFIED).unwrap(),
        ("True".into(), "Verified".into())
    );
}

#[tokio::test]
async fn provider_state_audience_issuer_and_subject_length() {
    let env = ENV.get();
    let _shared = GLOBAL.read().await;
    let client = env.client().await;
    let jwks = cluster_jwks(&env).await;
    let base =
        Provider { attribute_mapping: default_mapping(), jwks_json: jwks.clone(), ..Default::default() };
    type Change = Box<dyn Fn(&mut Pool)>;
    let cases: Vec<(&str, Change, &str)> = vec![
        ("provider-disabled", Box::new(|p: &mut Pool| p.providers[0].disabled = true), "ProviderDisabled"),
        (
            "provider-deleted",
            Box::new(|p: &mut Pool| p.providers[0].state = LifeState::Deleted),
            "ProviderNotFound",
        ),
        ("pool-disabled", Box::new(|p: &mut Pool| p.disabled = true), "PoolDisabled"),
        (
            "audience",
            Box::new(|p: &mut Pool| {
                p.providers[0].allowed_audiences = vec!["https://old.endpoint.example".into()]
            }),
            "AudienceNotAllowed",
        ),
        (
            "issuer",
            Box::new(|p: &mut Pool| p.providers[0].issuer_uri = "https://kubernetes.default.svc".into()),
            "IssuerMismatch",
        ),
        (
            "keys",
            Box::new(|p: &mut Pool| {
                p.providers[0].jwks_json =
                    r#"{"keys":[{"kty":"RSA","kid":"old","n":"AQAB","e":"AQAB"}]}"#.into()
            }),
            "SigningKeyNotTrusted",
        ),
        (
            "mapping",
            Box::new(|p: &mut Pool| {
                p.providers[0].attribute_mapping.remove("google.subject");
            }),
            "AttributeMappingInvalid",
        ),
    ];
    for (name, change, reason) in cases {
        let id = unique(name);
        let pool_id = unique("pool");
        let provider = federation(&env, &pool_id, base.clone()).await;
        env.fake.update(|s| {
            if let Some(p) = s.pools.iter_mut().find(|p| p.name.ends_with(&format!("/{pool_id}"))) {
                change(p);
            }
        });
        let main = gsa(&unique(name));
        let ns = env.namespace(&client, name, &[("team", id.as_str())]).await;
        service_account(&client, &ns, "app", Some(&main)).await;
        env.fake_service_account(&main, &[(WIU, &[&principal(&pool_id, &ns)])]);
        apply_probe(&client, &id, federation_spec("team", &id, &provider, json!({}))).await;
        let probe = env.wait_ready(&client, &id, "False", reason).await;
        let message = &probe.status.unwrap().failures[0].message;
        assert!(message.contains("Fix:"), "{name}: {message}");
    }

    // A mapped subject over 127 bytes: a long namespace and ServiceAccount name.
    let id = unique("long");
    let pool_id = unique("pool");
    let provider = federation(&env, &pool_id, base.clone()).await;
    let ns = env.namespace(&client, &format!("long-{}", "n".repeat(50)), &[("team", id.as_str())]).await;
    let ksa = "s".repeat(60);
    service_account(&client, &ns, &ksa, Some(&gsa(&unique("long")))).await;
    let mut spec = federation_spec("team", &id, &provider, json!({}));
    spec["serviceAccounts"]["names"] = json!([ksa]);
    apply_probe(&client, &id, spec).await;
    let probe = env.wait_ready(&client, &id, "False", "SubjectTooLong").await;
    assert_eq!(probe.status.unwrap().failures[0].stage, authprobe::api::Stage::Static);
}

#[tokio::test]
async fn impersonation_denied_and_target_permissions() {
    let env = ENV.get();
    let _shared = GLOBAL.read().await;
    trust_cluster(&env);
    let client = env.client().await;
    let id = unique("access");
    let (denied_gsa, weak_gsa) = (gsa(&unique("denied")), gsa(&unique("weak")));
    let denied = env.namespace(&client, "denied", &[("team", id.as_str())]).await;
    let weak = env.namespace(&client, "weak", &[("team", id.as_str())]).await;
    service_account(&client, &denied, "app", Some(&denied_gsa)).await;
    service_account(&client, &weak, "app", Some(&weak_gsa)).await;
    let binding = |ns: &str| {
        vec![fake_google::scenario::Binding {
            role: WIU.into(),
            members: vec![member(ns, "app")],
            condition: None,
        }]
    };
    // The allow policy maps it, but a deny policy (invisible to getIamPolicy) blocks impersonation.
    add_gsa(
        &env,
        ServiceAccount {
            email: denied_gsa.clone(),
            bindings: binding(&denied),
            denied_principals: vec![member(&denied, "app")],
            ..Default::default()
        },
    );
    // Impersonation works, but the GSA may only list, not read, the bucket.
    add_gsa(
        &env,
        ServiceAccount {
            email: weak_gsa.clone(),
            bindings: binding(&weak),
            grants: BTreeMap::from([(BUCKET.to_string(), vec!["storage.objects.list".to_string()])]),
            ..Default::default()
        },
    );
    apply_probe(&client, &id, chain_spec("team", &id, json!({}))).await;
    let probe = env
        .wait_for(&client, &id, "two failures", |p| p.status.as_ref().is_some_and(|s| s.failures.len() == 2))
        .await;
    let reasons = failure_reasons(&probe);
    assert_eq!(reasons[&denied], "ImpersonationDenied");
    assert_eq!(reasons[&weak], "PermissionMissing");
    let messages: Vec<&str> =
        probe.status.as_ref().unwrap().failures.iter().map(|f| f.message.as_str()).collect();
    assert!(
        messages.iter().any(|m| m.contains("storage.objects.get") && m.contains(&weak_gsa)),
        "{messages:?}"
    );
    assert_eq!(condition_of(&probe, condition::TOKEN_EXCHANGE_VERIFIED).unwrap().0, "False");
    assert_eq!(
        condition_of(&probe, condition::MAPPINGS_VERIFIED).unwrap().0,
        "True",
        "the mappings themselves are right"
    );
}

#[tokio::test]
async fn an_api_that_refuses_federated_tokens() {
    let env = ENV.get();
    let _exclusive = GLOBAL.write().await;
    let client = env.client().await;
    let id = unique("direct");
    let pool_id = unique("pool");
    let provider = default_federation(&env, &pool_id).await;
    let ns = env.namespace(&client, "direct", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", None).await;
    env.fake.update(|s| {
        s.direct_grants.push(Grant {
            member: principal(&pool_id, &ns),
            resource: BUCKET.into(),
            permissions: vec!["storage.objects.get".into()],
        });
        s.federated_token_unsupported = vec!["storage".into()];
    });
    apply_probe(
        &client,
        &id,
        federation_spec("team", &id, &provider, json!({"identity": {"access": "Direct"}})),
    )
    .await;
    let probe = env.wait_ready(&client, &id, "False", "FederatedTokenUnsupported").await;
    env.fake.update(|s| s.federated_token_unsupported.clear());
    assert!(probe.status.unwrap().failures[0].message.contains("access: Impersonation"));
    // Once the API accepts federated tokens, the direct grant is enough.
    probe_now(&client, &id).await;
    env.wait_ready(&client, &id, "True", "Verified").await;
}

/// A broken 200 from any API the chain calls (truncated JSON, an HTML page, wrong types, a body
/// past the read limit) is Unknown with a reason, never False, and the true verdict returns with
/// Google's proper answers. The Federation probe covers the provider and pool reads, STS,
/// generateAccessToken and testIamPermissions; the GKE probe covers securetoken.
#[tokio::test]
async fn malformed_answers_from_every_chain_api_are_unknown() {
    let env = ENV.get();
    let _exclusive = GLOBAL.write().await;
    trust_cluster(&env);
    let client = env.client().await;
    let fed_id = unique("garbled-fed");
    let pool_id = unique("pool");
    let provider = default_federation(&env, &pool_id).await;
    let fed_gsa = gsa(&unique("garbled"));
    let fed_ns = env.namespace(&client, "garbled", &[("team", fed_id.as_str())]).await;
    service_account(&client, &fed_ns, "app", Some(&fed_gsa)).await;
    add_gsa(&env, bucket_reader(&fed_gsa, vec![principal(&pool_id, &fed_ns)]));
    apply_probe(&client, &fed_id, federation_spec("team", &fed_id, &provider, json!({}))).await;
    let gke_id = unique("garbled-gke");
    let gke_gsa = gsa(&unique("garbled"));
    let gke_ns = env.namespace(&client, "garbled", &[("team", gke_id.as_str())]).await;
    service_account(&client, &gke_ns, "app", Some(&gke_gsa)).await;
    add_gsa(&env, bucket_reader(&gke_gsa, vec![member(&gke_ns, "app")]));
    apply_probe(&client, &gke_id, chain_spec("team", &gke_id, json!({}))).await;
    env.wait_verified(&client, &fed_id, 1).await;
    env.wait_verified(&client, &gke_id, 1).await;

    let apis = [
        ("iam.providers.get", &fed_id),
        ("iam.workloadIdentityPools.get", &fed_id),
        ("sts.token", &fed_id),
        ("iamcredentials.generateAccessToken", &fed_id),
        ("storage.testIamPermissions", &fed_id),
        ("securetoken.identitybindingtoken", &gke_id),
    ];
    let kinds = [Malformed::TruncatedJson, Malformed::HtmlPage, Malformed::WrongTypes, Malformed::HugeBody];
    for (api, id) in apis {
        let recorder = support::record(&client, id);
        let mut outcomes = Vec::new();
        for kind in kinds {
            let before = env.fake.counts().get(api).copied().unwrap_or_default();
            env.fake.update(|s| {
                s.faults = Faults { malformed: Some(kind), apis: vec![api.into()], ..Default::default() }
            });
            probe_now(&client, id).await;
            let probe = env
                .wait_for(&client, id, &format!("{api} {kind:?}: Ready Unknown"), |p| {
                    ready(p).is_some_and(|r| r.0 == "Unknown")
                })
                .await;
            env.fake.update(|s| s.faults = Faults::default());
            assert!(
                env.fake.counts().get(api).copied().unwrap_or_default() > before,
                "{api} {kind:?}: the pass called it"
            );
            let failure = &probe.status.as_ref().unwrap().failures[0];
            assert!(failure.reason.is_undecided(), "{api} {kind:?}: {failure:?}");
            assert!(failure.message.len() <= 2048, "{api} {kind:?}: {} bytes", failure.message.len());
            outcomes.push(format!("{kind:?} {}", failure.reason.as_str()));
            probe_now(&client, id).await;
            env.wait_verified(&client, id, 1).await;
        }
        let seen = recorder.stop();
        assert!(seen.iter().all(|r| r.0 != "False"), "{api}: never False, saw {seen:?}");
        report("hostile", &format!("{api} answering 200 malformed: {}; never False", outcomes.join(", ")));
    }
    assert!(!env.operator.log_text().contains("panicked"));
}

#[tokio::test]
async fn clock_skew_between_google_and_the_cluster() {
    let env = ENV.get();
    let _exclusive = GLOBAL.write().await;
    trust_cluster(&env);
    let client = env.client().await;
    let id = unique("skew");
    let main = gsa(&unique("skew"));
    let ns = env.namespace(&client, "skew", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&main)).await;
    add_gsa(&env, bucket_reader(&main, vec![member(&ns, "app")]));
    // Google's clock 15 minutes ahead: the token is stale to it, and the Date headers show why.
    env.fake.update(|s| s.clock_skew_seconds = 900);
    apply_probe(&client, &id, chain_spec("team", &id, json!({}))).await;
    let probe = env.wait_ready(&client, &id, "False", "ClockSkew").await;
    env.fake.update(|s| s.clock_skew_seconds = 0);
    let message = &probe.status.unwrap().failures[0].message;
    assert!(message.contains("900s") || message.contains("899s") || message.contains("901s"), "{message}");
    probe_now(&client, &id).await;
    env.wait_ready(&client, &id, "True", "Verified").await;
}

#[tokio::test]
async fn no_token_material_reaches_logs_events_status_or_metrics() {
    let env = ENV.get();
    let _shared = GLOBAL.read().await;
    trust_cluster(&env);
    let client = env.client().await;
    let id = unique("hygiene");
    let main = gsa(&unique("hygiene"));
    let ns = env.namespace(&client, "hygiene", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&main)).await;
    service_account(&client, &ns, "worker", Some(&main)).await;
    // app passes the whole chain; worker is mapped but may not read the bucket.
    add_gsa(
        &env,
        ServiceAccount {
            denied_principals: vec![member(&ns, "worker")],
            ..bucket_reader(&main, vec![member(&ns, "app"), member(&ns, "worker")])
        },
    );
    apply_probe(
        &client,
        &id,
        chain_spec("team", &id, json!({"serviceAccounts": {"names": ["app", "worker"]}})),
    )
    .await;
    let probe = env.wait_ready(&client, &id, "False", "ImpersonationDenied").await;
    // The "reconciled" debug line follows the status write it reports.
    let debug_logged = tokio::time::timeout(WAIT, async {
        while !env.operator.log_text().contains("\"level\":\"DEBUG\"") {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    assert!(debug_logged.await.is_ok(), "the operator logs at debug level here");
    assert!(env.fake.counts().get("iamcredentials.generateAccessToken").copied().unwrap_or_default() >= 2);

    let status = serde_json::to_string(&probe.status).unwrap();
    let events =
        serde_json::to_string(&support::events(&client, &ns, "ServiceAccount", "worker").await).unwrap();
    let probe_events =
        serde_json::to_string(&support::events(&client, "default", "AuthProbe", &id).await).unwrap();
    let metrics = env.operator.metrics().await;
    let log = env.operator.log_text();
    for (what, text) in [
        ("status", &status),
        ("events", &events),
        ("probe events", &probe_events),
        ("metrics", &metrics),
        ("log", &log),
    ] {
        for marker in ["eyJ", "ya29."] {
            assert!(!text.contains(marker), "{what} holds token material ({marker})");
        }
    }
    assert!(events.contains("ImpersonationDenied"), "the scan looked at real events: {events}");

    // Files: the exact tokens that crossed the fake, searched for in etcd's data (every object the
    // operator wrote), the control plane's logs and the operator's log.
    let credentials = env.fake.credentials_seen();
    assert!(credentials.iter().any(|c| c.starts_with("eyJ")), "the fake saw KSA tokens");
    assert!(credentials.iter().any(|c| c.starts_with("ya29.")), "the fake issued access tokens");
    let scanned = assert_no_credential_in_files(env.cp.dir(), &credentials);
    assert!(scanned > 1 << 20, "the scan read etcd's data ({scanned} bytes)");
}
