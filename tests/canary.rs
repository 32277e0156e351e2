//! The canary on a real node: the operator (this build, a child process inside the node's
//! namespaces) runs canary Jobs from the imported static image (`make static`) against fake GKE
//! metadata servers this process runs on the node's address, one per namespace, which the
//! workloads name in `GCE_METADATA_HOST` and the canary copies like the rest of their credential
//! environment. Each test probes two namespaces, the one it breaks and a healthy twin under the
//! same operator, and asserts each canary reason, the twin passing, and that no token reaches a
//! termination message or the operator's log.
//!
//! A test binary of its own: `Node::shared()` re-executes it inside the node's namespaces. Needs
//! root, `make tools` and `make static`.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: a failed expectation is a failed test

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Child,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use authprobe::{
    api::{AuthProbe, Stage, condition},
    engine::canary::{AUDIENCE, GOOGLE_ISSUER, Report, Source, fingerprint},
};
use authprobe_harness::node::{self, Node};
use fake_google::{
    Fake,
    metadata::{self, Identity, MetadataConfig, Outage, OutageMode},
    scenario::{Binding, Scenario, ServiceAccount},
};
use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::Deployment,
    batch::v1::Job,
    core::v1::{Pod, Secret, ServiceAccount as KubeServiceAccount},
    events::v1::Event,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, wait::await_condition, watcher},
};
use serde_json::{Value, json};

const OPERATOR_TOKEN: &str = "canary-test-operator";
const PROJECT: &str = "acme-prod";
/// Long enough for a canary that polls its whole 60 s deadline, plus a Pod's start.
const WAIT: Duration = Duration::from_secs(150);

/// The node, a fake Google and the operator, shared by every test here.
struct Env {
    node: &'static Node,
    fake: std::sync::Arc<Fake>,
    runtime: tokio::runtime::Handle,
    operator: Mutex<Option<Child>>,
    log: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let node = Node::shared(); // re-executes this binary inside the node's namespaces
        let image = node::authprobe_static_binary();
        assert!(image.is_file(), "{} is missing: run `make static`", image.display());
        node.import_image(&image, "authprobe:dev").expect("the image imports");

        // The fake Google and the metadata servers live on a runtime of their own: each test's ends with it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            let scenario = Scenario {
                operator: fake_google::scenario::Operator {
                    tokens: vec![OPERATOR_TOKEN.into()],
                    ..Default::default()
                },
                ..Default::default()
            };
            let google =
                rt.block_on(fake_google::start(SocketAddr::from(([127, 0, 0, 1], 0)), scenario)).unwrap();
            tx.send((rt.handle().clone(), google.fake.clone(), google.endpoints())).unwrap();
            rt.block_on(std::future::pending::<()>());
            drop(google);
        });
        let (runtime, fake, endpoints) = rx.recv().expect("the fake Google starts");

        let dir = node.dir();
        let token = dir.join("canary-operator-token");
        std::fs::write(&token, OPERATOR_TOKEN).unwrap();
        let log = dir.join("canary-operator.log");
        let http = SocketAddr::from(([127, 0, 0, 1], authprobe_harness::free_port().unwrap()));
        let args: Vec<String> = vec![
            "run".into(),
            format!("--http-addr={http}"),
            format!("--google-access-token-file={}", token.display()),
            "--google-retry-deadline=8s".into(),
            "--canary-image=authprobe:dev".into(),
            "--log-format=json".into(),
        ];
        let envs = [
            ("KUBECONFIG", node.kubeconfig_path().display().to_string()),
            ("AUTHPROBE_GOOGLE_ENDPOINTS", endpoints),
            ("RUST_LOG", "info,authprobe=debug".to_string()),
        ];
        let child = authprobe_harness::spawn(
            PathBuf::from(env!("CARGO_BIN_EXE_authprobe")).as_path(),
            &args,
            &envs,
            &log,
        )
        .expect("the operator starts");
        Env { node, fake, runtime, operator: Mutex::new(Some(child)), log }
    })
}

impl Env {
    async fn client(&self) -> Client {
        self.node.client().await.expect("client")
    }

    fn operator_log(&self) -> String {
        let alive = self.operator.lock().unwrap().as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)));
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        format!("operator {}; its log ends:\n{}", if alive { "running" } else { "EXITED" }, tail.join("\n"))
    }

    /// A metadata server on the node's address handing out `gsa`'s tokens.
    async fn metadata(&self, gsa: &str, change: impl FnOnce(&mut MetadataConfig)) -> metadata::Running {
        let mut config =
            MetadataConfig::new(self.fake.clone(), PROJECT, Identity::ServiceAccount(gsa.into()));
        change(&mut config);
        let addr = SocketAddr::from((self.node.ip(), 0));
        self.runtime.spawn(metadata::start(addr, config)).await.unwrap().expect("the metadata server starts")
    }
}

fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

/// A namespace of a test: its KSA `app`, mapped to its own GSA, and its metadata server.
struct Namespace {
    name: String,
    gsa: String,
    md: metadata::Running,
}

impl Namespace {
    /// What the operator expects the canary here to fingerprint to.
    fn expected(&self) -> String {
        gsa_fingerprint(&self.gsa)
    }
}

fn gsa_fingerprint(email: &str) -> String {
    let unique_id = ServiceAccount { email: email.into(), ..Default::default() }.unique_id();
    fingerprint(GOOGLE_ISSUER, AUDIENCE, &unique_id)
}

/// A namespace labelled for `test`, with KSA `app` mapped to a GSA of its own, a metadata server
/// (as `metadata` sets it up) and Deployment `api` (replicas 0) running as `app` with the server
/// in `GCE_METADATA_HOST`, its pod spec changed by `pod`.
async fn namespace(
    test: &str,
    metadata: impl FnOnce(&mut MetadataConfig),
    pod: impl FnOnce(&mut Value),
) -> Result<Namespace> {
    let env = env();
    let client = env.client().await;
    let name = env.node.namespace(&client, test, &[("canary-test", test)]).await?;
    let gsa = format!("{}@{PROJECT}.iam.gserviceaccount.com", unique("canary-"));
    let member = format!("serviceAccount:{PROJECT}.svc.id.goog[{name}/app]");
    env.fake.update(|s| {
        s.service_accounts.push(ServiceAccount {
            email: gsa.clone(),
            bindings: vec![Binding {
                role: "roles/iam.workloadIdentityUser".into(),
                members: vec![member],
                condition: None,
            }],
            ..Default::default()
        })
    });
    let sa: KubeServiceAccount = serde_json::from_value(json!({"metadata": {
        "name": "app", "annotations": {"iam.gke.io/gcp-service-account": gsa}}}))?;
    Api::<KubeServiceAccount>::namespaced(client.clone(), &name).create(&PostParams::default(), &sa).await?;
    let md = env.metadata(&gsa, metadata).await;
    let mut spec = json!({
        "serviceAccountName": "app",
        "containers": [{"name": "api", "image": node::PODUTIL_IMAGE, "imagePullPolicy": "Never",
                        "env": [{"name": "GCE_METADATA_HOST", "value": md.addr.to_string()}]}],
    });
    pod(&mut spec);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {"replicas": 0, "selector": {"matchLabels": {"app": "api"}},
                 "template": {"metadata": {"labels": {"app": "api"}}, "spec": spec}},
    }))?;
    Api::<Deployment>::namespaced(client, &name).create(&PostParams::default(), &deployment).await?;
    Ok(Namespace { name, gsa, md })
}

/// A GKE probe of KSA `app` in the namespaces labelled for `test`, with the canary on Deployment/api.
async fn probe(test: &str) -> Result<()> {
    probe_inspecting(test, true).await
}

/// [`probe`], with stage Workload on or off.
async fn probe_inspecting(test: &str, inspect_workloads: bool) -> Result<()> {
    let probe: AuthProbe = serde_json::from_value(json!({
        "apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe",
        "metadata": {"name": test},
        "spec": {
            "namespaceSelector": {"matchLabels": {"canary-test": test}},
            "serviceAccounts": {"names": ["app"]},
            "identity": {"platform": "GKE", "projectId": PROJECT},
            "probe": {"propagationGrace": "0s", "inspectWorkloads": inspect_workloads},
            "canary": {"enabled": true, "workload": "Deployment/api", "every": "1h"},
        },
    }))?;
    Api::<AuthProbe>::all(env().client().await).create(&PostParams::default(), &probe).await?;
    Ok(())
}

async fn probe_now(name: &str) -> Result<()> {
    let patch = json!({"metadata": {"annotations": {"authprobe.io/probe-now": unique("now-")}}});
    Api::<AuthProbe>::all(env().client().await)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// Waits until the probe's status satisfies `done`; the status and the operator's log on failure.
async fn wait_probe(name: &str, what: &str, done: impl Fn(&AuthProbe) -> bool) -> Result<AuthProbe> {
    let api = Api::<AuthProbe>::all(env().client().await);
    let waited = tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, move |p: Option<&AuthProbe>| p.is_some_and(&done)),
    );
    match waited.await {
        Ok(Ok(Some(p))) => Ok(p),
        _ => {
            let status = api.get(name).await.ok().and_then(|p| p.status);
            bail!(
                "probe {name}: {what} not seen within {WAIT:?}; status: {status:#?}\n{}",
                env().operator_log()
            )
        }
    }
}

fn ready(p: &AuthProbe) -> (String, String) {
    let c = p.status.as_ref().and_then(|s| s.conditions.iter().find(|c| c.type_ == condition::READY));
    c.map(|c| (c.status.clone(), c.reason.clone())).unwrap_or_default()
}

/// The Canary failures of the status, as (namespace, reason, message).
fn canary_failures(p: &AuthProbe) -> Vec<(String, String, String)> {
    let failures = p.status.as_ref().map(|s| s.failures.as_slice()).unwrap_or_default();
    failures
        .iter()
        .filter(|f| f.stage == Stage::Canary)
        .map(|f| (f.namespace.clone(), f.reason.as_str().to_string(), f.message.clone()))
        .collect()
}

/// Waits until the probe lists exactly one Canary failure, `reason` in `ns`, with the twins passing.
async fn wait_canary_failure(probe: &str, ns: &str, reason: &str, passing: u32) -> Result<String> {
    let waited = std::time::Instant::now();
    let p = wait_probe(probe, &format!("{reason} in {ns}"), |p| {
        let failures = canary_failures(p);
        failures.len() == 1
            && failures[0].0 == ns
            && failures[0].1 == reason
            && p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.passing == passing)
    })
    .await?;
    let message = canary_failures(&p).remove(0).2;
    eprintln!("{probe}: {reason} in {ns} after {:.1}s: {message}", waited.elapsed().as_secs_f64());
    Ok(message)
}

/// A canary Job in `ns` other than those named in `not`, once it exists (and, with `finished`,
/// once it ended).
async fn canary_job(ns: &str, finished: bool, not: &[&str]) -> Result<Job> {
    let jobs = Api::<Job>::namespaced(env().client().await, ns);
    let config = watcher::Config::default().labels("app.kubernetes.io/component=canary");
    let mut stream = watcher(jobs.clone(), config).default_backoff().applied_objects().boxed();
    let ended = |j: &Job| {
        j.status.as_ref().and_then(|s| s.conditions.as_ref()).is_some_and(|cs| {
            cs.iter().any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
    };
    let found = tokio::time::timeout(WAIT, async {
        while let Some(Ok(job)) = stream.next().await {
            if !not.contains(&job.name_any().as_str()) && (!finished || ended(&job)) {
                return Some(job);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(job)) => Ok(job),
        _ => bail!("no canary Job in {ns} (finished: {finished}) within {WAIT:?}\n{}", env().operator_log()),
    }
}

/// The Pod of a canary Job.
async fn pod_of(ns: &str, job: &str) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(env().client().await, ns);
    let list = pods.list(&ListParams::default().labels(&format!("job-name={job}"))).await?;
    list.items.into_iter().next().with_context(|| format!("no Pod of Job {ns}/{job}"))
}

/// The Pod of canary Job `job` once its container runs.
async fn running_pod(ns: &str, job: &str) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(env().client().await, ns);
    let config = watcher::Config::default().labels(&format!("job-name={job}"));
    let mut stream = watcher(pods, config).default_backoff().applied_objects().boxed();
    let running = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref()?.first()?.state.as_ref()?.running.as_ref())
            .is_some()
    };
    let found = tokio::time::timeout(WAIT, async {
        while let Some(Ok(pod)) = stream.next().await {
            if running(&pod) {
                return Some(pod);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(pod)) => Ok(pod),
        _ => bail!("the Pod of {ns}/{job} never ran within {WAIT:?}"),
    }
}

/// Waits for an Event about ServiceAccount `app` in `ns` that `wanted` accepts; all of them then.
async fn wait_event(
    ns: &str,
    wanted: impl Fn(&(String, String, String)) -> bool,
) -> Result<Vec<(String, String, String)>> {
    let events = Api::<Event>::namespaced(env().client().await, ns);
    let mut stream = watcher(events, watcher::Config::default()).default_backoff().boxed();
    let seen = tokio::time::timeout(WAIT, async {
        // Every watch event (the initial list included) is a moment to look again.
        while stream.next().await.is_some() {
            let all = events_about_app(ns).await.ok()?;
            if all.iter().any(&wanted) {
                return Some(all);
            }
        }
        None
    })
    .await;
    match seen {
        Ok(Some(all)) => Ok(all),
        _ => bail!("no such Event about {ns}/app within {WAIT:?}: {:?}", events_about_app(ns).await?),
    }
}

/// The report of a finished canary Job, read as the operator does, from its Pod's status.
async fn report_of(ns: &str) -> Result<(Job, Report)> {
    let job = canary_job(ns, true, &[]).await?;
    let pod = pod_of(ns, &job.name_any()).await?;
    let message = node::termination_message(&pod)
        .with_context(|| format!("no termination message: {:?}", pod.status))?;
    let report = Report::parse(&message).with_context(|| format!("not a report: {message}"))?;
    eprintln!("{ns}/{}: {message}", job.name_any());
    Ok((job, report))
}

/// No token the fake handed out is in a canary's termination message or the operator's log.
async fn assert_no_token(namespaces: &[&Namespace]) -> Result<()> {
    let env = env();
    let credentials = env.fake.credentials_seen();
    assert!(!credentials.is_empty());
    let log = std::fs::read_to_string(&env.log)?;
    for ns in namespaces {
        let pods = Api::<Pod>::namespaced(env.client().await, &ns.name);
        for pod in pods.list(&ListParams::default().labels("app.kubernetes.io/component=canary")).await? {
            let message = node::termination_message(&pod).unwrap_or_default();
            assert!(!credentials.iter().any(|c| message.contains(c.as_str())), "a token in {message}");
        }
    }
    assert!(!credentials.iter().any(|c| log.contains(c.as_str())), "a token in the operator's log");
    Ok(())
}

/// `(type, reason, note)` of the Events about ServiceAccount `app` in `ns`.
async fn events_about_app(ns: &str) -> Result<Vec<(String, String, String)>> {
    let events = Api::<Event>::namespaced(env().client().await, ns).list(&ListParams::default()).await?;
    Ok(events
        .items
        .into_iter()
        .filter(|e| {
            e.regarding.as_ref().is_some_and(|r| {
                r.kind.as_deref() == Some("ServiceAccount") && r.name.as_deref() == Some("app")
            })
        })
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect())
}

/// A healthy canary reports a token within 3 s and the fingerprint of the KSA's GSA: Verified.
/// Its twin's metadata server holds each new pod for 5 s, as GKE's does on a fresh node:
/// `MetadataServerSlowStart`, with the measured time, the fix and a Warning on the ServiceAccount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_five_second_cold_start_is_a_slow_start_and_its_twin_verifies() -> Result<()> {
    let test = unique("slow");
    let ok = namespace(&test, |_| {}, |_| {}).await?;
    let slow = namespace(&test, |c| c.cold_start = Duration::from_secs(5), |_| {}).await?;
    probe(&test).await?;

    let (job, healthy) = report_of(&ok.name).await?;
    assert_eq!(healthy.source, Source::MetadataServer, "{healthy:?}");
    assert_eq!(healthy.metadata_host, Some(ok.md.addr.to_string()));
    assert!(healthy.first_token().is_some_and(|t| t < Duration::from_secs(3)), "{healthy:?}");
    assert_eq!(healthy.fingerprint, Some(ok.expected()), "the canary is the KSA's GSA");
    assert_eq!(
        job.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|s| s.service_account_name.clone())
            .as_deref(),
        Some("app")
    );

    let (_, cold) = report_of(&slow.name).await?;
    let first = cold.first_token().context("a token after the cold start")?;
    assert!(first >= Duration::from_secs(5) && first < Duration::from_secs(8), "{cold:?}");
    assert!(cold.attempts >= 2, "the first attempt gave up after 3 s: {cold:?}");

    let message = wait_canary_failure(&test, &slow.name, "MetadataServerSlowStart", 1).await?;
    let seconds = format!("{:.1}s after the container started", first.as_secs_f64());
    assert!(message.contains(&seconds), "{message}");
    assert!(message.contains("Fix: add an init container that waits for the metadata server"), "{message}");
    assert!(message.contains(&format!("last fingerprint {}", slow.expected())), "{message}");
    let p = wait_probe(&test, "Ready False", |p| ready(p).0 == "False").await?;
    assert_eq!(ready(&p), ("False".into(), "MetadataServerSlowStart".into()));
    let warned = events_about_app(&slow.name).await?;
    assert!(warned.iter().any(|(t, r, _)| t == "Warning" && r == "MetadataServerSlowStart"), "{warned:?}");
    assert!(events_about_app(&ok.name).await?.iter().all(|(t, _, _)| t != "Warning"));
    assert_no_token(&[&ok, &slow]).await
}

/// A metadata server that hangs past the 60 s deadline: `MetadataServerUnreachable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_past_the_deadline_is_unreachable() -> Result<()> {
    let test = unique("down");
    let ok = namespace(&test, |_| {}, |_| {}).await?;
    let down = namespace(
        &test,
        |c| c.outages = vec![Outage::now_for(Duration::from_secs(600), OutageMode::Hang)],
        |_| {},
    )
    .await?;
    probe(&test).await?;
    let message = wait_canary_failure(&test, &down.name, "MetadataServerUnreachable", 1).await?;
    assert!(
        message.contains(&format!("no token from the metadata server at {} within 60s", down.md.addr)),
        "{message}"
    );
    assert!(message.contains("no answer within"), "{message}");
    let (_, report) = report_of(&down.name).await?;
    assert!(report.attempts >= 20 && report.first_token_ms.is_none(), "{report:?}");
    let (_, healthy) = report_of(&ok.name).await?;
    assert_eq!(healthy.fingerprint, Some(ok.expected()));
    assert_no_token(&[&ok, &down]).await
}

/// A workload whose GOOGLE_APPLICATION_CREDENTIALS names a service account key: ADC loads the
/// file and never asks the metadata server, which is `AdcSourceUnexpected` on GKE. Stage Workload
/// reads the same variable from the template (`CredentialFileOverridesWorkloadIdentity`, an
/// earlier stage that takes the KSA's entry), so the probe starts with it off, then turns it on:
/// the entry becomes the Workload one, naming the Deployment and not the canary's own Job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentials_file_that_wins_over_the_metadata_server_is_unexpected() -> Result<()> {
    let test = unique("file");
    let ok = namespace(&test, |_| {}, |_| {}).await?;
    let file = namespace(
        &test,
        |_| {},
        |pod| {
            pod["containers"][0]["env"].as_array_mut().unwrap().push(
                json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"}),
            );
            pod["containers"][0]["volumeMounts"] =
                json!([{"name": "google", "mountPath": "/var/secrets/google"}]);
            pod["volumes"] = json!([{"name": "google", "secret": {"secretName": "google-key"}}]);
        },
    )
    .await?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256)?;
    let key_json = json!({
        "type": "service_account", "project_id": PROJECT, "private_key_id": "k1",
        "private_key": key.serialize_pem(), "client_email": format!("key@{PROJECT}.iam.gserviceaccount.com"),
        "client_id": "101", "token_uri": "https://oauth2.googleapis.com/token",
    });
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "google-key"}, "stringData": {"key.json": key_json.to_string()}}))?;
    Api::<Secret>::namespaced(env().client().await, &file.name)
        .create(&PostParams::default(), &secret)
        .await?;
    probe_inspecting(&test, false).await?;

    let message = wait_canary_failure(&test, &file.name, "AdcSourceUnexpected", 1).await?;
    assert!(message.contains("/var/secrets/google/key.json, type service_account"), "{message}");
    assert!(message.contains("not from the metadata server"), "{message}");
    let (_, report) = report_of(&file.name).await?;
    assert_eq!(report.source, Source::CredentialsFile);
    assert_eq!(report.fingerprint, Some(fingerprint(GOOGLE_ISSUER, AUDIENCE, "101")));
    assert!(file.md.requests_by_client().is_empty(), "the file won: the metadata server was never asked");
    assert!(!ok.md.requests_by_client().is_empty());
    let (_, healthy) = report_of(&ok.name).await?;
    assert_eq!(healthy.source, Source::MetadataServer);

    let on = json!({"spec": {"probe": {"inspectWorkloads": true}}});
    Api::<AuthProbe>::all(env().client().await)
        .patch(&test, &PatchParams::default(), &Patch::Merge(&on))
        .await?;
    let p = wait_probe(&test, "the Workload finding in place of the canary's", |p| {
        let failures = p.status.as_ref().map(|s| s.failures.as_slice()).unwrap_or_default();
        failures.len() == 1
            && failures[0].stage == Stage::Workload
            && p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.passing == 1)
    })
    .await?;
    let failure = &p.status.as_ref().unwrap().failures[0];
    assert_eq!(
        (failure.namespace.as_str(), failure.reason.as_str(), failure.workloads.as_slice()),
        (file.name.as_str(), "CredentialFileOverridesWorkloadIdentity", &["Deployment/api".to_string()][..]),
        "the canary's Job, which copies the variable, is no workload: {failure:?}"
    );
    eprintln!("{test}: with stage Workload on, {} in {}: {}", failure.reason, file.name, failure.message);
    assert_no_token(&[&ok, &file]).await
}

/// The metadata server hands out another GSA's tokens between two runs: `CredentialSourceDrift`
/// and one `CredentialSourceChanged` Event; the twin's fingerprint stays, with no Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fingerprint_that_changes_between_runs_is_drift_and_an_event() -> Result<()> {
    let test = unique("drift");
    let ok = namespace(&test, |_| {}, |_| {}).await?;
    let moved = namespace(&test, |_| {}, |_| {}).await?;
    probe(&test).await?;
    let (first_ok, _) = report_of(&ok.name).await?;
    let (first_moved, before) = report_of(&moved.name).await?;
    assert_eq!(before.fingerprint, Some(moved.expected()));
    wait_probe(&test, "Verified", |p| ready(p) == ("True".into(), "Verified".into())).await?;

    let other = format!("{}@{PROJECT}.iam.gserviceaccount.com", unique("other-"));
    moved.md.update(|c| c.identity = Identity::ServiceAccount(other.clone()));
    probe_now(&test).await?;
    canary_job(&ok.name, true, &[&first_ok.name_any()]).await?;
    canary_job(&moved.name, true, &[&first_moved.name_any()]).await?;

    let message = wait_canary_failure(&test, &moved.name, "CredentialSourceDrift", 1).await?;
    let (old, new) = (moved.expected(), gsa_fingerprint(&other));
    assert!(message.contains(&format!("fingerprints to {new}, the KSA's identity to {old}")), "{message}");
    let is_change = |(t, r, _): &(String, String, String)| t == "Normal" && r == "CredentialSourceChanged";
    let events: Vec<_> = wait_event(&moved.name, is_change).await?.into_iter().filter(is_change).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(events[0].2.contains(&format!("went from {old} to {new}")), "{events:?}");
    assert!(!events_about_app(&ok.name).await?.iter().any(is_change), "the twin's credential did not change");
    assert_no_token(&[&ok, &moved]).await
}

/// A canary that no node can take (the workload's node selector matches none) never runs:
/// `CanaryNotScheduled`, Unknown, and Ready never turns False for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_cannot_be_scheduled_is_unknown_never_false() -> Result<()> {
    let test = unique("pending");
    let ok = namespace(&test, |_| {}, |_| {}).await?;
    let pending =
        namespace(&test, |_| {}, |pod| pod["nodeSelector"] = json!({"authprobe.io/no-such-node": "true"}))
            .await?;
    let api = Api::<AuthProbe>::all(env().client().await);
    let readies = tokio::spawn({
        let api = api.clone();
        let test = test.clone();
        async move {
            let config = watcher::Config::default().fields(&format!("metadata.name={test}"));
            let mut seen = vec![];
            let mut stream = watcher(api, config).default_backoff().applied_objects().boxed();
            while let Some(Ok(p)) = stream.next().await {
                seen.push(ready(&p));
                if canary_failures(&p).iter().any(|f| f.1 == "CanaryNotScheduled") && ready(&p).0 == "Unknown"
                {
                    break;
                }
            }
            seen
        }
    });
    probe(&test).await?;
    let message = wait_canary_failure(&test, &pending.name, "CanaryNotScheduled", 1).await?;
    assert!(message.contains("unschedulable") && message.contains("node affinity/selector"), "{message}");
    let p = wait_probe(&test, "Ready Unknown", |p| ready(p).0 == "Unknown").await?;
    assert_eq!(ready(&p), ("Unknown".into(), "CanaryNotScheduled".into()));
    assert_eq!(p.status.and_then(|s| s.summary).map(|s| (s.passing, s.failing, s.unknown)), Some((1, 0, 1)));
    let seen = tokio::time::timeout(WAIT, readies).await??;
    assert!(!seen.iter().any(|(status, _)| status == "False"), "Ready was False: {seen:?}");
    assert!(
        events_about_app(&pending.name).await?.iter().all(|(t, _, _)| t != "Warning"),
        "Unknown raises no Warning"
    );
    report_of(&ok.name).await?;
    assert_no_token(&[&ok, &pending]).await
}

/// A canary killed while it polls a hanging metadata server reports nothing: the last complete
/// run's verdict stands, and the next run starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_killed_mid_run_gives_no_verdict() -> Result<()> {
    let test = unique("killed");
    let ns = namespace(&test, |_| {}, |_| {}).await?;
    probe(&test).await?;
    let (first, _) = report_of(&ns.name).await?;
    wait_probe(&test, "Verified", |p| {
        ready(p) == ("True".into(), "Verified".into())
            && p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.passing == 1)
    })
    .await?;

    ns.md.update(|c| c.outages = vec![Outage::now_for(Duration::from_secs(600), OutageMode::Hang)]);
    probe_now(&test).await?;
    let second = canary_job(&ns.name, false, &[&first.name_any()]).await?.name_any();
    let pod = running_pod(&ns.name, &second).await?;
    // Polling, with no token yet: killed at once.
    let pods = Api::<Pod>::namespaced(env().client().await, &ns.name);
    pods.delete(&pod.name_any(), &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() })
        .await?;
    canary_job(&ns.name, true, &[&first.name_any()]).await?;

    // Asked again, the operator starts a third run (it took the killed one as over) and writes the
    // status of that pass (a forced one always does), while the third polls the hanging server.
    probe_now(&test).await?;
    let third = canary_job(&ns.name, false, &[&first.name_any(), &second]).await?;
    // lastProbeTime is the pass's start, which may fall in the second before the Job it created
    // (both have one-second resolution); a later pass would come after the third run's own 60 s.
    let started = third.creation_timestamp().context("creationTimestamp")?.0;
    let pass_start = started
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_secs(1))
        .context("creationTimestamp minus a second")?;
    let p = wait_probe(&test, "the pass that started the third run", |p| {
        p.status.as_ref().and_then(|s| s.last_probe_time.as_ref()).is_some_and(|t| t.0 >= pass_start)
    })
    .await?;
    assert_eq!(ready(&p), ("True".into(), "Verified".into()), "no verdict from a half result");
    assert!(canary_failures(&p).is_empty(), "{:?}", canary_failures(&p));
    assert_no_token(&[&ns]).await
}
