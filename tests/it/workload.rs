//! Stage `Workload` against the real API server: every reason of the design's table from stored
//! workloads (no pod runs here, and none needs to: templates are all the stage reads), each with a
//! healthy twin that stays Ready=True; init containers, CronJobs' Jobs and owned Pods not counted
//! on their own, Events on the workload object, a ConfigMap edited into shape, `authprobe check`,
//! the Federation example, and a Secret-held configuration read as Unknown by an operator that
//! cannot read Secrets, proven from the API server's audit log.
//!
//! The reasons, their twins and `authprobe check` only add objects under names of their own (and
//! the fake's pool `onprem`, which no other module of the default environment uses): the default
//! environment. The Secret test runs an operator of its own, as a ServiceAccount with the chart's
//! RBAC, and reads the API server's audit log: a control plane of this module's own.

use std::{
    collections::BTreeMap,
    fmt::Debug,
    process::Command,
    time::{Duration, Instant},
};

use authprobe::api::{AuthProbe, Reason, Stage};
use authprobe_harness::ControlPlane;
use fake_google::scenario::{Pool, Provider};
use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{ConfigMap, Pod, Secret},
    },
};
use kube::{
    Api, Client, Resource,
    api::{Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Value, json};

use crate::support::*;

const PROJECT_NUMBER: &str = "123456789012";
const CONFIG_PATH: &str = "/etc/workload-identity/credential-configuration.json";
const IMAGE: &str = "registry.example/app:1";

/// The Secret test's control plane, with an audit log and no operator: the test starts one of its
/// own as ServiceAccount `authprobe` holding the chart's RBAC.
static AUDITED: Private =
    Private::new("workload", Setup { start_operator: false, audit_log: true, ..Setup::DEFAULT });

// ---- objects ----------------------------------------------------------------------------------

async fn apply<K>(client: &Client, ns: &str, object: Value) -> K
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + Debug,
{
    let name = object["metadata"]["name"].as_str().unwrap().to_string();
    Api::<K>::namespaced(client.clone(), ns)
        .patch(&name, &PatchParams::apply("workload-test").force(), &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("applying {name}: {e}"))
}

/// A pod spec running as KSA `app`, with container `api` changed by `api` (merged into it).
fn pod_spec(api: Value, extra: Value) -> Value {
    let mut container = json!({"name": "api", "image": IMAGE});
    merge(&mut container, api);
    let mut spec = json!({"serviceAccountName": "app", "containers": [container]});
    merge(&mut spec, extra);
    spec
}

fn template(name: &str, spec: Value) -> Value {
    json!({"metadata": {"labels": {"app": name}}, "spec": spec})
}

fn deployment(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
           "spec": {"selector": {"matchLabels": {"app": name}}, "template": template(name, spec)}})
}

fn stateful_set(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
           "spec": {"serviceName": name, "selector": {"matchLabels": {"app": name}}, "template": template(name, spec)}})
}

fn daemon_set(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name},
           "spec": {"selector": {"matchLabels": {"app": name}}, "template": template(name, spec)}})
}

fn with_restart_never(mut spec: Value) -> Value {
    spec["restartPolicy"] = json!("Never");
    spec
}

fn job(name: &str, spec: Value, owner: Option<Value>) -> Value {
    let mut job = json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
                         "spec": {"template": {"spec": with_restart_never(spec)}}});
    if let Some(owner) = owner {
        job["metadata"]["ownerReferences"] = json!([owner]);
    }
    job
}

fn cron_job(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": name},
           "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": with_restart_never(spec)}}}}})
}

fn pod(name: &str, spec: Value, owner: Option<Value>) -> Value {
    let mut pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec});
    if let Some(owner) = owner {
        pod["metadata"]["ownerReferences"] = json!([owner]);
    }
    pod
}

fn owner(api_version: &str, kind: &str, name: &str, uid: &str) -> Value {
    json!({"apiVersion": api_version, "kind": kind, "name": name, "uid": uid, "controller": true})
}

fn var(name: &str, value: &str) -> Value {
    json!({"env": [{"name": name, "value": value}]})
}

// ---- reading status ---------------------------------------------------------------------------

/// Per namespace: (stage, reason, workloads, message).
fn failures(p: &AuthProbe) -> BTreeMap<String, (Stage, Reason, Vec<String>, String)> {
    p.status
        .iter()
        .flat_map(|s| &s.failures)
        .map(|f| (f.namespace.clone(), (f.stage, f.reason, f.workloads.clone(), f.message.clone())))
        .collect()
}

/// Waits until the probe lists exactly `want` (namespace → reason), and returns the failures.
async fn wait_reasons(
    client: &Client,
    probe: &str,
    want: &BTreeMap<String, Reason>,
) -> BTreeMap<String, (Stage, Reason, Vec<String>, String)> {
    let expected = want.clone();
    let p = env()
        .wait_for(client, probe, &format!("failures {want:?}"), move |p| {
            failures(p).into_iter().map(|(ns, f)| (ns, f.1)).collect::<BTreeMap<_, _>>() == expected
        })
        .await;
    failures(&p)
}

/// Waits until an Event with `reason` is about the object (others may be too).
async fn wait_for_event(client: &Client, ns: &str, kind: &str, name: &str, reason: &str) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let config = watcher::Config::default().fields(&format!("regarding.kind={kind},regarding.name={name}"));
    let api = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns);
    let mut seen = watcher(api, config).default_backoff().applied_objects().boxed();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(Ok(e)) = seen.next().await {
            if e.reason.as_deref() == Some(reason) {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "no {reason} event about {kind} {ns}/{name}");
}

/// Runs a command from a failure message (`kubectl …`) against the shared control plane.
fn run_fix(command: &str) {
    let args: Vec<&str> = command.split_whitespace().collect();
    assert_eq!(args[0], "kubectl", "{command}");
    let out = Command::new(authprobe_harness::tools_bin().join("kubectl"))
        .args(&args[1..])
        .env("KUBECONFIG", env().cp.kubeconfig_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{command}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The `kubectl …` command after "Fix: " in a message, up to the next comma.
fn fix_in(message: &str) -> String {
    let fix = message.split("Fix: ").nth(1).unwrap_or_else(|| panic!("no fix in {message}"));
    let fix = fix.trim_start_matches("remove it: ");
    fix.split(',').next().unwrap().trim().to_string()
}

// ---- GKE --------------------------------------------------------------------------------------

/// A GKE namespace whose KSA `app` is annotated with `gsa`; returns its name.
async fn gke_namespace(client: &Client, suite: &str, prefix: &str, gsa: &str) -> String {
    let ns = env().namespace(client, prefix, &[("suite", suite)]).await;
    service_account(client, &ns, "app", Some(gsa)).await;
    ns
}

#[tokio::test]
async fn gke_reasons_each_with_a_healthy_twin_and_events_on_the_workload() {
    let env = env();
    let client = env.client().await;
    let (broken, healthy) = (unique("gke-broken"), unique("gke-healthy"));
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("wl"));
    let mut want = BTreeMap::new();
    let mut members = Vec::new();

    // CredentialFileOverridesWorkloadIdentity: a key Secret mounted and named by the variable.
    let key_mount = json!({"volumeMounts": [{"name": "key", "mountPath": "/var/secrets/google"}],
                           "env": [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"}]});
    let key_volume = json!({"volumes": [{"name": "key", "secret": {"secretName": "sa-key"}}]});
    let overrides = gke_namespace(&client, &broken, "overrides", &gsa).await;
    apply::<Deployment>(
        &client,
        &overrides,
        deployment("api", pod_spec(key_mount.clone(), key_volume.clone())),
    )
    .await;
    want.insert(overrides.clone(), Reason::CredentialFileOverridesWorkloadIdentity);
    // The same through valueFrom in an init container of a StatefulSet.
    let init = gke_namespace(&client, &broken, "init", &gsa).await;
    let from_secret = json!({"initContainers": [{"name": "setup", "image": IMAGE, "env": [
        {"name": "GOOGLE_APPLICATION_CREDENTIALS", "valueFrom": {"secretKeyRef": {"name": "paths", "key": "adc"}}}
    ]}]});
    apply::<StatefulSet>(&client, &init, stateful_set("db", pod_spec(json!({}), from_secret))).await;
    want.insert(init.clone(), Reason::CredentialFileOverridesWorkloadIdentity);
    // UserCredentialsMounted: a developer's gcloud directory in a DaemonSet.
    let user = gke_namespace(&client, &broken, "user", &gsa).await;
    apply::<DaemonSet>(
        &client,
        &user,
        daemon_set(
            "agent",
            pod_spec(
                json!({"volumeMounts": [{"name": "gcloud", "mountPath": "/root/.config/gcloud"}]}),
                json!({"volumes": [{"name": "gcloud", "secret": {"secretName": "dev-gcloud"}}]}),
            ),
        ),
    )
    .await;
    want.insert(user.clone(), Reason::UserCredentialsMounted);
    // HostNetworkBypassesWorkloadIdentity: a bare Job.
    let host = gke_namespace(&client, &broken, "hostnet", &gsa).await;
    apply::<Job>(&client, &host, job("once", pod_spec(json!({}), json!({"hostNetwork": true})), None)).await;
    want.insert(host.clone(), Reason::HostNetworkBypassesWorkloadIdentity);
    // A CronJob and the Job it made: one workload, the CronJob.
    let cron = gke_namespace(&client, &broken, "cron", &gsa).await;
    let nightly: CronJob =
        apply(&client, &cron, cron_job("nightly", pod_spec(json!({}), json!({"hostNetwork": true})))).await;
    let by_cron = owner("batch/v1", "CronJob", "nightly", nightly.metadata.uid.as_deref().unwrap());
    apply::<Job>(
        &client,
        &cron,
        job("nightly-29000000", pod_spec(json!({}), json!({"hostNetwork": true})), Some(by_cron)),
    )
    .await;
    want.insert(cron.clone(), Reason::HostNetworkBypassesWorkloadIdentity);
    // A bare Pod counts; a ReplicaSet's Pod with the same variable does not.
    let pods = gke_namespace(&client, &broken, "pods", &gsa).await;
    let by_replica_set = owner("apps/v1", "ReplicaSet", "web-5d4f", "00000000-0000-4000-8000-000000000001");
    apply::<Pod>(
        &client,
        &pods,
        pod("bare", pod_spec(var("GOOGLE_APPLICATION_CREDENTIALS", "/k.json"), json!({})), None),
    )
    .await;
    apply::<Pod>(
        &client,
        &pods,
        pod(
            "web-5d4f-x",
            pod_spec(var("GOOGLE_APPLICATION_CREDENTIALS", "/k.json"), json!({})),
            Some(by_replica_set.clone()),
        ),
    )
    .await;
    want.insert(pods.clone(), Reason::CredentialFileOverridesWorkloadIdentity);

    // The healthy twins, under their own probe: the same shapes without the mistake.
    let twins = [
        gke_namespace(&client, &healthy, "overrides-twin", &gsa).await,
        gke_namespace(&client, &healthy, "init-twin", &gsa).await,
        gke_namespace(&client, &healthy, "user-twin", &gsa).await,
        gke_namespace(&client, &healthy, "hostnet-twin", &gsa).await,
        gke_namespace(&client, &healthy, "cron-twin", &gsa).await,
        gke_namespace(&client, &healthy, "pods-twin", &gsa).await,
    ];
    apply::<Deployment>(&client, &twins[0], deployment("api", pod_spec(json!({}), key_volume.clone()))).await;
    // A workload running as another KSA does not concern `app`.
    let mut other = pod_spec(key_mount, key_volume.clone());
    other["serviceAccountName"] = json!("other");
    apply::<Deployment>(&client, &twins[0], deployment("other", other)).await;
    apply::<StatefulSet>(
        &client,
        &twins[1],
        stateful_set(
            "db",
            pod_spec(json!({}), json!({"initContainers": [{"name": "setup", "image": IMAGE}]})),
        ),
    )
    .await;
    apply::<DaemonSet>(
        &client,
        &twins[2],
        daemon_set(
            "agent",
            pod_spec(
                json!({"volumeMounts": [{"name": "cfg", "mountPath": "/root/.config/agent"}]}),
                json!({"volumes": [{"name": "cfg", "configMap": {"name": "agent"}}]}),
            ),
        ),
    )
    .await;
    apply::<Job>(&client, &twins[3], job("once", pod_spec(json!({}), json!({})), None)).await;
    let quiet: CronJob = apply(&client, &twins[4], cron_job("nightly", pod_spec(json!({}), json!({})))).await;
    let by_quiet = owner("batch/v1", "CronJob", "nightly", quiet.metadata.uid.as_deref().unwrap());
    // The CronJob's Job is judged through the CronJob only, whatever it holds.
    apply::<Job>(
        &client,
        &twins[4],
        job("nightly-1", pod_spec(json!({}), json!({"hostNetwork": true})), Some(by_quiet)),
    )
    .await;
    apply::<Pod>(&client, &twins[5], pod("bare", pod_spec(json!({}), json!({})), None)).await;
    apply::<Pod>(
        &client,
        &twins[5],
        pod(
            "web-5d4f-x",
            pod_spec(var("GOOGLE_APPLICATION_CREDENTIALS", "/k.json"), json!({})),
            Some(by_replica_set),
        ),
    )
    .await;

    for ns in want.keys().chain(&twins) {
        members.push(member(ns, "app"));
    }
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    env.fake_service_account(&gsa, &[(WIU, members.as_slice())]);
    apply_probe(&client, &broken, gke_spec("suite", &broken, json!({}))).await;
    apply_probe(&client, &healthy, gke_spec("suite", &healthy, json!({}))).await;

    let found = wait_reasons(&client, &broken, &want).await;
    let expect = |ns: &str, workloads: &[&str], text: &str| {
        let (stage, _, listed, message) = &found[ns];
        assert_eq!(*stage, Stage::Workload, "{message}");
        assert_eq!(listed, workloads, "{ns}: {message}");
        assert!(message.contains(text), "{ns}: {text:?} missing from: {message}");
        assert!(message.contains("Fix: "), "{message}");
    };
    expect(
        &overrides,
        &["Deployment/api"],
        &format!(
            "container api of Deployment {overrides}/api sets GOOGLE_APPLICATION_CREDENTIALS to \"/var/secrets/google/key.json\" (it comes from Secret sa-key)"
        ),
    );
    expect(
        &overrides,
        &["Deployment/api"],
        &format!("kubectl set env deployment/api -n {overrides} -c api GOOGLE_APPLICATION_CREDENTIALS-"),
    );
    expect(&init, &["StatefulSet/db"], &format!("init container setup of StatefulSet {init}/db"));
    expect(&user, &["DaemonSet/agent"], "\"/root/.config/gcloud\"");
    expect(&host, &["Job/once"], &format!("recreate Job {host}/once"));
    expect(&cron, &["CronJob/nightly"], "/spec/jobTemplate/spec/template/spec/hostNetwork");
    expect(&pods, &["Pod/bare"], &format!("Pod {pods}/bare"));
    env.wait_verified(&client, &healthy, twins.len() as u32).await;

    // The Warning is on the Deployment, where `kubectl describe deployment` shows it; the KSA
    // gets none for this stage.
    wait_for_events(
        &client,
        &overrides,
        "Deployment",
        "api",
        &[("Warning", "CredentialFileOverridesWorkloadIdentity", 1)],
    )
    .await;
    wait_for_events(
        &client,
        &pods,
        "Pod",
        "bare",
        &[("Warning", "CredentialFileOverridesWorkloadIdentity", 1)],
    )
    .await;
    assert!(events(&client, &overrides, "ServiceAccount", "app").await.is_empty());
    assert!(
        events(&client, &pods, "Pod", "web-5d4f-x").await.is_empty(),
        "an owned Pod is not a workload of its own"
    );
    assert!(
        events(&client, &cron, "Job", "nightly-29000000").await.is_empty(),
        "a CronJob's Job is not either"
    );

    // The fix the message names, run as written: Ready for that namespace, Normal Verified there.
    run_fix(&fix_in(&found[&overrides].3));
    want.remove(&overrides);
    wait_reasons(&client, &broken, &want).await;
    wait_for_events(
        &client,
        &overrides,
        "Deployment",
        "api",
        &[("Warning", "CredentialFileOverridesWorkloadIdentity", 1), ("Normal", "Verified", 1)],
    )
    .await;
    // The twins stayed Ready all along, and none of them was warned.
    let probe = env.wait_verified(&client, &healthy, twins.len() as u32).await;
    assert!(failures(&probe).is_empty());
    let announced = event_counts(&client, "default", "AuthProbe", &healthy).await;
    assert_eq!(announced, BTreeMap::from([(("Normal".to_string(), "Verified".to_string()), 1)]));
    for ns in &twins {
        let warned = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), ns)
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .count();
        assert_eq!(warned, 0, "{ns} was warned");
    }
}

// ---- Federation -------------------------------------------------------------------------------

/// The fake's pool `onprem`, whose provider `k8s` trusts this cluster with default audiences.
fn federation_provider() -> String {
    let env = env();
    let pool = format!("projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/onprem");
    let issuer = env.cp.issuer();
    env.fake.update(|s| {
        if !s.pools.iter().any(|p| p.name == pool) {
            let provider = Provider {
                id: "k8s".into(),
                issuer_uri: issuer.clone(),
                attribute_mapping: BTreeMap::from([("google.subject".into(), "assertion.sub".into())]),
                ..Default::default()
            };
            s.pools.push(Pool { name: pool.clone(), providers: vec![provider], ..Default::default() });
        }
    });
    format!("{pool}/providers/k8s")
}

fn federation_spec(suite: &str, provider: &str) -> Value {
    json!({
        "namespaceSelector": {"matchLabels": {"suite": suite}},
        "identity": {"platform": "Federation", "projectNumber": PROJECT_NUMBER, "federation": {"provider": provider}},
        "probe": {"propagationGrace": "0s"}
    })
}

fn principal(ns: &str, ksa: &str) -> String {
    format!(
        "principal://iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/onprem/subject/system:serviceaccount:{ns}:{ksa}"
    )
}

/// What `create-cred-config PROVIDER --service-account=GSA --credential-source-file=… --credential-source-type=text` writes.
fn cred_config(provider: &str, gsa: &str) -> Value {
    json!({
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": format!("//iam.googleapis.com/{provider}"),
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": {"file": "/var/run/service-account/token", "format": {"type": "text"}},
        "service_account_impersonation_url": format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{gsa}:generateAccessToken")
    })
}

fn config_map(name: &str, text: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": {"credential-configuration.json": text}})
}

/// Google's sample pod spec: the configuration from ConfigMap `wi-config` (or `config_volume`), a
/// projected token with `audience`, the variable on container `api`.
fn federated_spec(audience: &str, config_volume: Value) -> Value {
    pod_spec(
        json!({
            "env": [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": CONFIG_PATH}],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/workload-identity", "readOnly": true},
                {"name": "token", "mountPath": "/var/run/service-account", "readOnly": true}
            ]
        }),
        json!({"volumes": [
            config_volume,
            {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"audience": audience, "expirationSeconds": 3600, "path": "token"}}]}}
        ]}),
    )
}

fn config_volume() -> Value {
    json!({"name": "config", "configMap": {"name": "wi-config"}})
}

#[tokio::test]
async fn federation_reasons_each_with_a_healthy_twin_and_a_config_map_edited_into_shape() {
    let env = env();
    let client = env.client().await;
    let provider = federation_provider();
    let https = format!("https://iam.googleapis.com/{provider}");
    let (broken, healthy) = (unique("fed-broken"), unique("fed-healthy"));
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("fed"));
    let good = cred_config(&provider, &gsa);
    let mut want = BTreeMap::new();
    let mut principals = Vec::new();
    let fed_namespace = |suite: String, prefix: &'static str| {
        let (client, gsa) = (client.clone(), gsa.clone());
        async move {
            let ns = env.namespace(&client, prefix, &[("suite", suite.as_str())]).await;
            service_account(&client, &ns, "app", Some(&gsa)).await;
            ns
        }
    };

    // CredentialConfigMissing: no variable at all; and a ConfigMap that does not exist.
    let no_env = fed_namespace(broken.clone(), "noenv").await;
    apply::<Deployment>(&client, &no_env, deployment("api", pod_spec(json!({}), json!({})))).await;
    want.insert(no_env.clone(), Reason::CredentialConfigMissing);
    let no_cm = fed_namespace(broken.clone(), "nocm").await;
    apply::<Deployment>(&client, &no_cm, deployment("api", federated_spec(&https, config_volume()))).await;
    want.insert(no_cm.clone(), Reason::CredentialConfigMissing);
    // CredentialConfigInvalid: not JSON (edited into shape below).
    let invalid = fed_namespace(broken.clone(), "invalid").await;
    apply::<ConfigMap>(&client, &invalid, config_map("wi-config", "{\"type\": \"external_account\",")).await;
    apply::<Deployment>(&client, &invalid, deployment("api", federated_spec(&https, config_volume()))).await;
    want.insert(invalid.clone(), Reason::CredentialConfigInvalid);
    // CredentialConfigMismatch: the provider before a migration.
    let mismatch = fed_namespace(broken.clone(), "mismatch").await;
    let mut old = good.clone();
    old["audience"] = json!(format!(
        "//iam.googleapis.com/projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/legacy/providers/k8s"
    ));
    apply::<ConfigMap>(&client, &mismatch, config_map("wi-config", &old.to_string())).await;
    apply::<Deployment>(&client, &mismatch, deployment("api", federated_spec(&https, config_volume()))).await;
    want.insert(mismatch.clone(), Reason::CredentialConfigMismatch);
    // CredentialSourceNotMounted: the automounted API server token.
    let automount = fed_namespace(broken.clone(), "automount").await;
    let mut api_token = good.clone();
    api_token["credential_source"]["file"] = json!("/var/run/secrets/kubernetes.io/serviceaccount/token");
    apply::<ConfigMap>(&client, &automount, config_map("wi-config", &api_token.to_string())).await;
    apply::<Deployment>(&client, &automount, deployment("api", federated_spec(&https, config_volume())))
        .await;
    want.insert(automount.clone(), Reason::CredentialSourceNotMounted);
    // AudienceNotAllowed (stage Workload): a token for STS itself, which the provider refuses.
    let audience = fed_namespace(broken.clone(), "audience").await;
    apply::<ConfigMap>(&client, &audience, config_map("wi-config", &good.to_string())).await;
    apply::<Deployment>(
        &client,
        &audience,
        deployment("api", federated_spec("sts.googleapis.com", config_volume())),
    )
    .await;
    want.insert(audience.clone(), Reason::AudienceNotAllowed);
    // CredentialConfigUnreadable: the path through valueFrom (Unknown, and no Warning).
    let value_from = fed_namespace(broken.clone(), "valuefrom").await;
    let mut spec = federated_spec(&https, config_volume());
    spec["containers"][0]["env"][0] = json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "valueFrom": {"configMapKeyRef": {"name": "paths", "key": "adc"}}});
    apply::<ConfigMap>(&client, &value_from, config_map("wi-config", &good.to_string())).await;
    apply::<Deployment>(&client, &value_from, deployment("api", spec)).await;
    want.insert(value_from.clone(), Reason::CredentialConfigUnreadable);

    // Twins: Google's sample, with the variable on an init container, through a regional STS
    // endpoint, and as a bare Pod; and the example from examples/workloads.
    let mut twins = Vec::new();
    for (prefix, spec, config) in [
        ("sample-twin", federated_spec(&https, config_volume()), good.clone()),
        (
            "init-twin",
            {
                let mut s = federated_spec(&https, config_volume());
                let main = s["containers"][0].clone();
                s["initContainers"] = json!([main]);
                s["containers"] = json!([{"name": "main", "image": IMAGE}]);
                s
            },
            good.clone(),
        ),
        ("regional-twin", federated_spec(&https, config_volume()), {
            let mut c = good.clone();
            c["token_url"] = json!("https://sts.us-east1.rep.googleapis.com/v1/token");
            c
        }),
    ] {
        let ns = fed_namespace(healthy.clone(), prefix).await;
        apply::<ConfigMap>(&client, &ns, config_map("wi-config", &config.to_string())).await;
        apply::<Deployment>(&client, &ns, deployment("api", spec)).await;
        twins.push(ns);
    }
    let pod_twin = fed_namespace(healthy.clone(), "pod-twin").await;
    apply::<ConfigMap>(&client, &pod_twin, config_map("wi-config", &good.to_string())).await;
    apply::<Pod>(&client, &pod_twin, pod("batch", federated_spec(&https, config_volume()), None)).await;
    twins.push(pod_twin);
    let example = example_namespace(&client, &healthy).await;

    for ns in want.keys().chain(&twins) {
        principals.push(principal(ns, "app"));
    }
    let members: Vec<&str> = principals.iter().map(String::as_str).collect();
    env.fake_service_account(&gsa, &[(WIU, members.as_slice())]);
    let example_member = principal(&example, "orders");
    env.fake_service_account("orders@acme-prod.iam.gserviceaccount.com", &[(WIU, &[&example_member])]);
    apply_probe(&client, &broken, federation_spec(&broken, &provider)).await;
    apply_probe(&client, &healthy, federation_spec(&healthy, &provider)).await;

    let found = wait_reasons(&client, &broken, &want).await;
    let message = |ns: &str| {
        let (stage, _, workloads, message) = &found[ns];
        assert_eq!(
            (*stage, workloads.as_slice()),
            (Stage::Workload, &["Deployment/api".to_string()][..]),
            "{message}"
        );
        message.clone()
    };
    let create = format!(
        "gcloud iam workload-identity-pools create-cred-config {provider} --service-account={gsa} --credential-source-file=/var/run/service-account/token --credential-source-type=text --output-file=credential-configuration.json"
    );
    for ns in [&no_env, &no_cm, &invalid, &mismatch] {
        assert!(message(ns).contains(&create), "{ns}: {}", message(ns));
    }
    assert!(message(&no_cm).contains("ConfigMap wi-config, which does not exist"));
    assert!(message(&mismatch).contains("audience: expected"));
    assert!(message(&automount).contains("automounted API server token"));
    assert!(message(&audience).contains("\"sts.googleapis.com\""));
    assert!(message(&value_from).contains("valueFrom"));
    let probe = env.wait_verified(&client, &healthy, twins.len() as u32 + 1).await;
    assert!(failures(&probe).is_empty());

    // Unknown raises no Warning on the workload; failing ones do. The probe's own Ready event
    // comes last in a pass, so once it is out the workloads' events are too.
    wait_for_events(&client, &mismatch, "Deployment", "api", &[("Warning", "CredentialConfigMismatch", 1)])
        .await;
    let ready =
        ready(&env.wait_for(&client, &broken, "a Ready reason", |p| ready(p).is_some()).await).unwrap();
    wait_for_event(&client, "default", "AuthProbe", &broken, &ready.1).await;
    assert!(events(&client, &value_from, "Deployment", "api").await.is_empty());

    // The ConfigMap edited into shape: that namespace passes within the change → status bar.
    let started = Instant::now();
    apply::<ConfigMap>(&client, &invalid, config_map("wi-config", &good.to_string())).await;
    want.remove(&invalid);
    wait_reasons(&client, &broken, &want).await;
    let took = started.elapsed();
    report("workload", &format!("ConfigMap edited into shape → status in {} ms", took.as_millis()));
    assert!(took < Duration::from_secs(2), "the edit took {took:?} to reach status");
    env.wait_verified(&client, &healthy, twins.len() as u32 + 1).await;
}

/// examples/workloads/federation-workload.yaml, in a fresh namespace selected by `suite`.
async fn example_namespace(client: &Client, suite: &str) -> String {
    let ns = env().namespace(client, "orders", &[("suite", suite)]).await;
    let text = std::fs::read_to_string(
        authprobe_harness::repo_root().join("examples/workloads/federation-workload.yaml"),
    )
    .unwrap()
    .replace("namespace: orders", &format!("namespace: {ns}"));
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).unwrap();
    assert_eq!(docs.len(), 4, "Namespace, ServiceAccount, ConfigMap, Deployment");
    for doc in docs {
        match doc["kind"].as_str().unwrap() {
            "Namespace" => {}
            "ServiceAccount" => {
                apply::<k8s_openapi::api::core::v1::ServiceAccount>(client, &ns, doc).await;
            }
            "ConfigMap" => {
                apply::<ConfigMap>(client, &ns, doc).await;
            }
            "Deployment" => {
                apply::<Deployment>(client, &ns, doc).await;
            }
            other => panic!("unexpected {other} in the example"),
        }
    }
    ns
}

// ---- authprobe check --------------------------------------------------------------------------

#[tokio::test]
async fn authprobe_check_runs_the_same_stage() {
    let env = env();
    let client = env.client().await;
    let suite = unique("check");
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("chk"));
    let ns = gke_namespace(&client, &suite, "check", &gsa).await;
    env.fake_service_account(&gsa, &[(WIU, &[&member(&ns, "app")])]);
    apply::<CronJob>(
        &client,
        &ns,
        cron_job("report", pod_spec(var("GOOGLE_APPLICATION_CREDENTIALS", "/k.json"), json!({}))),
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.yaml");
    let probe = json!({"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "metadata": {"name": suite}, "spec": gke_spec("suite", &suite, json!({}))});
    std::fs::write(&file, probe.to_string()).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, OPERATOR_TOKEN).unwrap();
    let out = Command::new(authprobe_bin())
        .args(["check", "-f", file.to_str().unwrap(), "--output", "json"])
        .env("KUBECONFIG", env.cp.kubeconfig_path())
        .env("AUTHPROBE_GOOGLE_ENDPOINTS", &env.endpoints)
        .env("AUTHPROBE_GOOGLE_ACCESS_TOKEN_FILE", &token)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let r = &v["probes"][0]["results"][0];
    assert_eq!(
        (r["stage"].as_str(), r["reason"].as_str()),
        (Some("Workload"), Some("CredentialFileOverridesWorkloadIdentity")),
        "{stdout}"
    );
    assert!(
        r["message"].as_str().unwrap().contains(&format!("kubectl set env cronjob/report -n {ns} -c api"))
    );
}

// ---- no Secret is read ------------------------------------------------------------------------

/// A control plane of its own, with an audit log; the operator runs as a ServiceAccount holding
/// exactly the chart's RBAC (no Secret access). A Secret-held configuration reads as Unknown, a
/// ConfigMap-held one is read and passes, and the audit log shows not one request for a Secret.
#[tokio::test]
async fn a_secret_held_configuration_is_unknown_and_no_secret_is_read() {
    let env = AUDITED.get();
    let cp = &env.cp;
    let admin = env.client().await;
    let release = env.namespace(&admin, "authprobe-system", &[]).await;
    chart_rbac(cp, &release);
    let (kubeconfig, user) = operator_identity(cp, &admin, &release).await;

    // A pool of the fake's trusting this control plane's issuer.
    let pool = format!("projects/{PROJECT_NUMBER}/locations/global/workloadIdentityPools/audit");
    let issuer = cp.issuer();
    env.fake.update(|s| {
        s.pools.retain(|p| p.name != pool);
        let provider = Provider {
            id: "k8s".into(),
            issuer_uri: issuer.clone(),
            attribute_mapping: BTreeMap::from([("google.subject".into(), "assertion.sub".into())]),
            ..Default::default()
        };
        s.pools.push(Pool { name: pool.clone(), providers: vec![provider], ..Default::default() });
    });
    let provider = format!("{pool}/providers/k8s");
    let https = format!("https://iam.googleapis.com/{provider}");
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("audit"));
    let suite = unique("audit");
    let mut made = Vec::new();
    for prefix in ["secret-held", "configmap-held"] {
        let ns = env.namespace(&admin, prefix, &[("suite", suite.as_str())]).await;
        service_account(&admin, &ns, "app", Some(&gsa)).await;
        made.push(ns);
    }
    let config = cred_config(&provider, &gsa).to_string();
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "wi-config"},
                        "stringData": {"credential-configuration.json": config}});
    apply::<Secret>(&admin, &made[0], secret).await;
    let secret_volume = json!({"name": "config", "secret": {"secretName": "wi-config"}});
    apply::<Deployment>(&admin, &made[0], deployment("api", federated_spec(&https, secret_volume))).await;
    apply::<ConfigMap>(&admin, &made[1], config_map("wi-config", &config)).await;
    apply::<Deployment>(&admin, &made[1], deployment("api", federated_spec(&https, config_volume()))).await;
    let members: Vec<String> = made
        .iter()
        .map(|ns| format!("principal://iam.googleapis.com/{pool}/subject/system:serviceaccount:{ns}:app"))
        .collect();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    env.fake_service_account(&gsa, &[(WIU, members.as_slice())]);

    let operator = Operator::new(cp, &env.endpoints, SHORT_RETRIES)
        .with_env("KUBECONFIG", kubeconfig.display().to_string());
    operator.start().unwrap();
    let name = unique("audit");
    let probe = json!({"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "metadata": {"name": name}, "spec": federation_spec(&suite, &provider)});
    Api::<AuthProbe>::all(admin.clone())
        .patch(&name, &PatchParams::apply("workload-test").force(), &Patch::Apply(&probe))
        .await
        .unwrap();
    let api = Api::<AuthProbe>::all(admin.clone());
    let seen = tokio::time::timeout(
        WAIT,
        kube::runtime::wait::await_condition(api, &name, |p: Option<&AuthProbe>| {
            p.is_some_and(|p| {
                failures(p).len() == 1
                    && p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.passing == 1)
            })
        }),
    )
    .await
    .unwrap_or_else(|_| panic!("no verdict; operator log:\n{}", operator.log_text()))
    .unwrap()
    .unwrap();
    let (stage, reason, workloads, message) = &failures(&seen)[&made[0]];
    assert_eq!(
        (*stage, *reason, workloads.as_slice()),
        (Stage::Workload, Reason::CredentialConfigUnreadable, &["Deployment/api".to_string()][..])
    );
    assert!(
        message.contains("from Secret wi-config") && message.contains("never reads Secrets"),
        "{message}"
    );
    let ready = seen.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("Unknown", "CredentialConfigUnreadable"));
    operator.stop();

    // What the operator asked the API server for, by "verb resource".
    let audit = std::fs::read_to_string(cp.audit_log()).unwrap();
    let mut requests: BTreeMap<String, u32> = BTreeMap::new();
    for line in audit.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
        if entry["user"]["username"] == user.as_str() && entry["stage"] == "ResponseComplete" {
            let key = format!(
                "{} {}",
                entry["verb"].as_str().unwrap_or("-"),
                entry["objectRef"]["resource"].as_str().unwrap_or("-")
            );
            *requests.entry(key).or_default() += 1;
        }
    }
    assert!(
        requests.contains_key("get configmaps"),
        "the ConfigMap-held configuration was read: {requests:?}"
    );
    assert!(
        requests.contains_key("watch deployments"),
        "the operator's requests are in the log: {requests:?}"
    );
    let secrets: Vec<&String> = requests.keys().filter(|k| k.ends_with(" secrets")).collect();
    assert!(secrets.is_empty(), "the operator asked for Secrets: {secrets:?}");
    assert!(
        !operator.log_text().to_lowercase().contains("forbidden"),
        "the chart's RBAC covers the stage:\n{}",
        operator.log_text()
    );
    report(
        "workload",
        &format!("no Secret request among {} operator requests", requests.values().sum::<u32>()),
    );
}

/// Installs the chart's RBAC (rendered by helm) for ServiceAccount `authprobe` in `release`.
fn chart_rbac(cp: &ControlPlane, release: &str) {
    let rendered = Command::new(authprobe_harness::tools_bin().join("helm"))
        .args(["template", "authprobe", "--kube-version", "v1.36.3"])
        .arg(authprobe_harness::repo_root().join("charts/authprobe"))
        .args([
            "--namespace",
            release,
            "--show-only",
            "templates/rbac.yaml",
            "--show-only",
            "templates/serviceaccount.yaml",
        ])
        .args(["--set", "leaderElection.enabled=false", "--set", "replicaCount=1"])
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    let manifest = String::from_utf8(rendered.stdout).unwrap();
    assert!(!manifest.contains("secrets"), "the chart's RBAC grants nothing on Secrets:\n{manifest}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rbac.yaml");
    std::fs::write(&file, &manifest).unwrap();
    let applied = Command::new(authprobe_harness::tools_bin().join("kubectl"))
        .args(["apply", "-f"])
        .arg(&file)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .output()
        .unwrap();
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
}

/// A kubeconfig for ServiceAccount `authprobe` in `release`, and its user name.
async fn operator_identity(cp: &ControlPlane, admin: &Client, release: &str) -> (std::path::PathBuf, String) {
    let request: k8s_openapi::api::authentication::v1::TokenRequest =
        serde_json::from_value(json!({"spec": {"expirationSeconds": 3600}})).unwrap();
    let token = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(admin.clone(), release)
        .create_token_request("authprobe", &Default::default(), &request)
        .await
        .unwrap()
        .status
        .and_then(|s| s.token)
        .unwrap();
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cp.ca_pem().unwrap());
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{}\", certificate-authority-data: {ca}}}\nusers:\n- name: u\n  user: {{token: {token}}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
        cp.server_url()
    );
    let path = cp.dir().join("operator-kubeconfig");
    std::fs::write(&path, kubeconfig).unwrap();
    (path, format!("system:serviceaccount:{release}:authprobe"))
}
