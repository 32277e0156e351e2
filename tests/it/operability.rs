//! Installing and running authprobe as a platform team would: the Helm chart installed for real,
//! the operator running with nothing but the chart's ServiceAccount and RBAC, and two replicas
//! electing one leader that hands over, by crash and by graceful stop, without double events.
//!
//! The operators are these tests' own (under the chart's RBAC, or two replicas): each would
//! reconcile every probe of its control plane, so this module has a control plane and fake of its
//! own with no operator of the environment's, and its tests run one at a time.

use std::{
    collections::BTreeMap,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use authprobe::{
    fence::Fence,
    runtime::leader::{DEFAULT_LEASE_NAME, LEASE_SECONDS, LeaseRef},
};
use authprobe_harness::tools_bin;
use fake_google::scenario::{Binding, Cluster, GkeCluster, GkeProject, ServiceAccount as GoogleSa};
use k8s_openapi::api::{
    authentication::v1::TokenRequest,
    coordination::v1::Lease,
    core::v1::{Secret, ServiceAccount},
};
use kube::{
    Api, Client, Config,
    api::{ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
};
use serde_json::json;

use crate::support::{self, *};

static ENV: Private = Private::new(
    "operability",
    Setup { operator_args: SHORT_RETRIES, start_operator: false, ..Setup::DEFAULT },
);

const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/payments-data";
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn helm(env: &Env, args: &[&str]) -> String {
    let cp = &env.cp;
    let out = Command::new(tools_bin().join("helm"))
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("HELM_CACHE_HOME", cp.dir().join("helm-cache"))
        .env("HELM_CONFIG_HOME", cp.dir().join("helm-config"))
        .env("HELM_DATA_HOME", cp.dir().join("helm-data"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A kubeconfig that authenticates as `namespace/name` with a fresh token, and a client for it.
async fn as_service_account(
    env: &Env,
    admin: &Client,
    namespace: &str,
    name: &str,
) -> (std::path::PathBuf, Client) {
    let request: TokenRequest = serde_json::from_value(json!({"spec": {"expirationSeconds": 3600}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .unwrap();
    let cp = &env.cp;
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cp.ca_pem().unwrap());
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{}\", certificate-authority-data: {ca}}}\nusers:\n- name: u\n  user: {{token: {token}}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
        cp.server_url()
    );
    let path = cp.dir().join(format!("kubeconfig-{namespace}-{name}"));
    std::fs::write(&path, &kubeconfig).unwrap();
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&kubeconfig).unwrap(),
        &KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    (path, Client::try_from(config).unwrap())
}

/// A GKE probe over fresh namespaces whose KSA `app` is mapped and may read the bucket.
async fn healthy_gke_probe(env: &Env, admin: &Client, id: &str, namespaces: usize) -> Vec<String> {
    let cp = &env.cp;
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("ops"));
    let mut made = vec![];
    for _ in 0..namespaces {
        let ns = env.namespace(admin, "ops", &[("team", id)]).await;
        service_account(admin, &ns, "app", Some(&gsa)).await;
        made.push(ns);
    }
    let members = made.iter().map(|ns| member(ns, "app")).collect();
    env.fake.update(|s| {
        if !s.clusters.iter().any(|c| c.issuer == cp.issuer()) {
            s.clusters.push(Cluster { issuer: cp.issuer(), ca_pem: cp.ca_pem().unwrap() });
            s.gke.push(GkeProject {
                project_id: "acme-prod".into(),
                project_number: "123456789012".into(),
                clusters: vec![GkeCluster {
                    url: "https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-1".into(),
                    issuer: cp.issuer(),
                }],
            });
        }
        s.service_accounts.push(GoogleSa {
            email: gsa.clone(),
            bindings: vec![Binding { role: WIU.into(), members, condition: None }],
            grants: BTreeMap::from([(BUCKET.to_string(), vec!["storage.objects.get".to_string()])]),
            ..Default::default()
        });
    });
    let spec = gke_spec(
        "team",
        id,
        json!({
            "identity": {"gke": {"clusterLocation": "us-central1", "clusterName": "prod-1"}},
            "targets": [{"resource": BUCKET, "permissions": ["storage.objects.get"]}],
            "probe": {"tokenExchange": true}
        }),
    );
    apply_probe(admin, id, spec).await;
    made
}

#[tokio::test]
async fn the_chart_installs_and_its_rbac_is_enough_and_no_more() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let admin = env.client().await;
    let release_ns = env.namespace(&admin, "authprobe-system", &[]).await;
    let chart = authprobe_harness::repo_root().join("charts/authprobe");
    // The CRD is already there (the harness installed it); the chart adopts it.
    helm(
        &env,
        &[
            "install",
            "authprobe",
            chart.to_str().unwrap(),
            "--namespace",
            &release_ns,
            "--take-ownership",
            "--set",
            "tokenExchange.enabled=true",
            "--set",
            "metrics.serviceMonitor.enabled=false",
        ],
    );
    let listed = helm(&env, &["list", "--namespace", &release_ns, "--output", "json"]);
    assert!(listed.contains("\"status\":\"deployed\""), "{listed}");

    // The operator, as the chart's ServiceAccount and nothing more.
    let (kubeconfig, as_operator) = as_service_account(&env, &admin, &release_ns, "authprobe").await;
    let forbidden =
        Api::<Secret>::namespaced(as_operator.clone(), &release_ns).list(&ListParams::default()).await;
    assert!(
        matches!(&forbidden, Err(kube::Error::Api(s)) if s.code == 403),
        "reading Secrets must be refused: {forbidden:?}"
    );
    let operator = Operator::new(&env.cp, &env.endpoints, &["--leader-elect"])
        .with_env("KUBECONFIG", kubeconfig.display().to_string())
        .with_env("POD_NAMESPACE", release_ns.clone())
        .with_env("POD_NAME", "authprobe-chart-0");
    operator.start().unwrap();
    let id = unique("rbac");
    let namespaces = healthy_gke_probe(&env, &admin, &id, 2).await;
    let probe = env.wait_verified(&admin, &id, 2).await;
    assert_eq!(
        condition_of(&probe, "TokenExchangeVerified").unwrap().0,
        "True",
        "minted tokens under the chart's RBAC"
    );
    let lease = Api::<Lease>::namespaced(admin.clone(), &release_ns).get(DEFAULT_LEASE_NAME).await.unwrap();
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some("authprobe-chart-0"));
    assert_eq!(event_counts(&admin, "default", "AuthProbe", &id).await.len(), 1, "events are allowed too");
    let log = operator.log_text();
    // Every refusal says "forbidden" (message and reason); a bare "403" would match ports and ids.
    assert!(
        !log.to_lowercase().contains("forbidden"),
        "the chart's RBAC covers everything the operator does:\n{log}"
    );
    operator.stop();
    drop(namespaces);
}

/// A standby takes a released lease at once whatever the moment of the release during its start:
/// before its first read of the Lease, between that read and its watch's first list, or after.
/// The release moment is the variable here, so it is stepped, not awaited.
#[tokio::test]
async fn a_release_at_any_moment_of_a_standbys_start_is_taken_at_once() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let admin = env.client().await;
    let lease_ns = env.namespace(&admin, "release", &[]).await;
    let mut slowest = Duration::ZERO;
    let moments = (0..=200).step_by(10).count();
    for release_after_ms in (0..=200).step_by(10) {
        let lease = LeaseRef { namespace: lease_ns.clone(), name: DEFAULT_LEASE_NAME.into() };
        let leader = authprobe::runtime::leader::acquire(
            admin.clone(),
            &lease,
            "leader",
            Arc::new(Fence::standby()),
            std::future::pending(),
        )
        .await
        .expect("a free lease is won");
        let standby = tokio::spawn({
            let (client, lease) = (admin.clone(), lease.clone());
            async move {
                let fence = Arc::new(Fence::standby());
                authprobe::runtime::leader::acquire(client, &lease, "standby", fence, std::future::pending())
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(release_after_ms)).await;
        let released_at = Instant::now();
        leader.release(Duration::from_secs(5)).await;
        let won = tokio::time::timeout(Duration::from_secs(5), standby)
            .await
            .unwrap_or_else(|_| {
                panic!("released {release_after_ms} ms into the standby's start: not taken in 5 s")
            })
            .unwrap()
            .expect("the standby leads");
        let took = released_at.elapsed();
        assert!(took < Duration::from_secs(3), "released {release_after_ms} ms in: taken after {took:?}");
        slowest = slowest.max(took);
        won.release(Duration::from_secs(5)).await;
    }
    report(
        "leader",
        &format!(
            "a release at {moments} moments of a standby's start: slowest takeover {:.2} s",
            slowest.as_secs_f64()
        ),
    );
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_hand_over_without_double_events() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let admin = env.client().await;
    let lease_ns = env.namespace(&admin, "lease", &[]).await;
    let replica = |name: &'static str| {
        Operator::new(&env.cp, &env.endpoints, &["--leader-elect", "--google-retry-deadline=8s"])
            .with_env("POD_NAMESPACE", lease_ns.clone())
            .with_env("POD_NAME", name)
    };
    let (a, b) = (replica("replica-a"), replica("replica-b"));
    a.start().unwrap();
    b.start().unwrap();
    let leases = Api::<Lease>::namespaced(admin.clone(), &lease_ns);
    let (first, _) = wait_takeover(&leases, None).await;

    // A broken KSA: exactly one Warning, written by the leader only.
    let id = unique("ha");
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("ha"));
    let ns = env.namespace(&admin, "ha", &[("team", id.as_str())]).await;
    service_account(&admin, &ns, "app", Some(&gsa)).await;
    env.fake_service_account(&gsa, &[]);
    apply_probe(&admin, &id, gke_spec("team", &id, json!({}))).await;
    env.wait_ready(&admin, &id, "False", "PrincipalNotMapped").await;
    let (leader, standby) = if first == "replica-a" { (&a, &b) } else { (&b, &a) };
    // Events name the replica that wrote them: only the leader acts.
    let wait_events = tokio::time::timeout(WAIT, async {
        loop {
            let on_sa = support::events(&admin, &ns, "ServiceAccount", "app").await;
            if !on_sa.is_empty() {
                return on_sa;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let on_sa = wait_events.await.expect("the leader's Warning");
    let writers: Vec<Option<String>> = on_sa.iter().map(|e| e.reporting_instance.clone()).collect();
    assert_eq!(writers, vec![Some(first.clone())], "only the leader writes");

    // The leader crashes: the standby takes over once the lock expires, and keeps probing.
    leader.kill();
    let (second, crash_takeover) = wait_takeover(&leases, Some(&first)).await;
    assert_ne!(second, first);
    report("leader", &format!("takeover after killing the leader: {:.1} s", crash_takeover.as_secs_f64()));
    assert!(crash_takeover <= Duration::from_secs(LEASE_SECONDS + 5), "{crash_takeover:?}");
    probe_now(&admin, &id).await;
    let before = standby.log_text().matches("probe pass").count();
    env.wait_for(&admin, &id, "a pass by the new leader", |p| ready(p).is_some_and(|r| r.0 == "False")).await;
    tokio::time::timeout(WAIT, async {
        while standby.log_text().matches("probe pass").count() <= before {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the new leader probes");
    assert_eq!(
        event_counts(&admin, &ns, "ServiceAccount", "app").await,
        BTreeMap::from([(("Warning".to_string(), "PrincipalNotMapped".to_string()), 1)]),
        "no second Warning after the handover"
    );

    // The old leader comes back as a standby; the new one stops gracefully and releases at once.
    leader.start().unwrap();
    let stopped_at = Instant::now();
    let status = standby.stop();
    assert!(status.is_some_and(|s| s.success()), "a graceful stop exits 0: {status:?}");
    assert!(standby.log_text().contains("released the lease"));
    let (third, _) = wait_takeover(&leases, Some(&second)).await;
    let graceful_takeover = stopped_at.elapsed();
    report("leader", &format!("takeover after a graceful stop: {:.2} s", graceful_takeover.as_secs_f64()));
    assert_eq!(third, first);
    assert!(
        graceful_takeover < Duration::from_secs(5),
        "a released lease is taken at once: {graceful_takeover:?}"
    );
    leader.stop();
}
