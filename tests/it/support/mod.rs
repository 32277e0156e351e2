//! What the integration tests share. An [`Env`] is a local control plane, a fake Google on a
//! background runtime, and the real `authprobe` binary running against both as a child process
//! whose log is kept for inspection. Tests isolate themselves by names (namespaces, probes, GSAs),
//! never by sleeping.
//!
//! Every test in the `it` binary runs in one process, two at a time, so what a test changes for
//! everyone is isolated by design:
//!
//! - an operator watches every AuthProbe, Namespace and ServiceAccount of its control plane and
//!   writes status and Events for all of them: two operators on one control plane would fight
//!   over every probe. So an operator of its own always means a control plane of its own;
//! - [`env`] is the default environment (control plane, fake, operator with a short Google retry
//!   deadline), shared by the modules that only add objects under names of their own and never
//!   change what everyone sees (`operator`, `check`, `workload`, one `lifecycle` test);
//! - [`Private`] is an environment of a module's own, for modules that restart or re-key the
//!   control plane (`faults`, `key_rotation`), change the fake for everyone (faults, clock skew,
//!   operator permissions, malformed answers: `chain`, `google_faults`, `hostile`), assert
//!   operator-wide figures (`metrics`, `faults`' call counts, `lifecycle`'s last probe), or run
//!   operators of their own or read the audit log (`operability`, `leadership`, `workload`'s
//!   Secret test). It lives while one of the module's tests holds it;
//! - [`ControlPlane::shared`] has no operator at all, for the tests that prove the harness and the
//!   chart (`control_plane`, `chart`, `chart_hardening`): an operator would write over the status
//!   `control_plane` writes itself.

// Each module uses a different subset of these helpers.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::PathBuf,
    process::Child,
    sync::{
        Arc, Mutex, OnceLock, PoisonError, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use authprobe::api::{AuthProbe, condition};
use authprobe_harness::{ControlPlane, Options, free_port};
use fake_google::{
    Fake,
    scenario::{Binding, Scenario, ServiceAccount},
};
use futures::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease, core::v1::ServiceAccount as KubeServiceAccount, events::v1::Event,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, wait::await_condition, watcher},
};
use serde_json::{Value, json};

/// The operator's token at the fake.
pub const OPERATOR_TOKEN: &str = "test-operator-token";
/// How long any awaited condition may take before the test fails with a dump.
pub const WAIT: Duration = Duration::from_secs(90);
/// The arguments of most tests' operators: a Google retry deadline short enough for a test.
pub const SHORT_RETRIES: &[&str] = &["--google-retry-deadline=8s"];

/// What an environment's operator is.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Its extra arguments.
    pub operator_args: &'static [&'static str],
    /// Whether it runs; otherwise the tests start operators of their own (with [`Operator::new`]).
    pub start_operator: bool,
    /// Whether the control plane writes an audit log of every request ([`ControlPlane::audit_log`]).
    pub audit_log: bool,
    /// The API server's feature gates ([`Options::feature_gates`]).
    pub feature_gates: Option<&'static str>,
}

impl Setup {
    /// An operator with [`SHORT_RETRIES`], running.
    pub const DEFAULT: Setup =
        Setup { operator_args: SHORT_RETRIES, start_operator: true, audit_log: false, feature_gates: None };
}

/// A control plane, a fake Google and an operator.
pub struct Env {
    /// The operator (not started when the [`Setup`] says so).
    pub operator: Operator,
    /// The fake's state.
    pub fake: Arc<Fake>,
    /// The fake's address.
    pub fake_addr: SocketAddr,
    /// `AUTHPROBE_GOOGLE_ENDPOINTS` for the fake.
    pub endpoints: String,
    /// The control plane (dropped after the operator, so the operator never logs it going away).
    pub cp: ControlPlane,
    /// Dropping it stops the fake's runtime.
    _fake_stop: tokio::sync::oneshot::Sender<()>,
}

/// The default environment, shared by every module that only adds objects of its own: started on
/// first use, stopped at exit.
pub fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let started = std::time::Instant::now();
        let env = Env::start("the default", Setup::DEFAULT);
        report("env", &format!("the default started in {:.1} s", started.elapsed().as_secs_f64()));
        authprobe_harness::at_exit(|| {
            if let Some(env) = ENV.get() {
                env.operator.kill();
                env.cp.shutdown();
            }
        });
        env
    })
}

/// A module's own environment, started when one of its tests asks for it and stopped when the
/// last test holding it ends. Tests run in name order, so a module's tests run together; it is
/// started again only when the other test thread is still busy elsewhere as one of them ends and
/// the next begins (`hostile`, after `google_faults`' long outage test). A test takes it before any
/// lock the module's tests queue on, so that a test waiting its turn keeps it running.
pub struct Private {
    name: &'static str,
    setup: Setup,
    current: Mutex<Weak<Env>>,
}

impl Private {
    /// An environment named `name` (in its report line) whose operator is `setup`.
    pub const fn new(name: &'static str, setup: Setup) -> Self {
        Self { name, setup, current: Mutex::new(Weak::new()) }
    }

    /// The running environment, or a new one. Blocks while one starts.
    pub fn get(&self) -> Arc<Env> {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(env) = current.upgrade() {
            return env;
        }
        let started = std::time::Instant::now();
        let env = Arc::new(Env::start(self.name, self.setup));
        report("env", &format!("{}'s own started in {:.1} s", self.name, started.elapsed().as_secs_f64()));
        *current = Arc::downgrade(&env);
        env
    }
}

/// A new control plane, started again (up to three times) when a start fails, each failure
/// reported. The harness picks free ports before etcd and kube-apiserver bind them, so a
/// connection opened meanwhile can take one; that is the likely cause of the one failed start
/// seen here in about 200 (kube-apiserver exited with status 1; its log went with the failed
/// start's directory).
fn control_plane(name: &str, setup: Setup) -> ControlPlane {
    let Setup { audit_log, feature_gates, .. } = setup;
    let mut attempt = 0;
    loop {
        attempt += 1;
        // ControlPlane::start runs a runtime of its own: not from within a test's.
        let started = std::thread::spawn(move || {
            ControlPlane::start(Options { audit_log, feature_gates, ..Options::default() })
        })
        .join()
        .expect("the control plane start does not panic");
        match started {
            Ok(cp) => return cp,
            Err(e) if attempt < 3 => {
                report(
                    "env",
                    &format!("{name}: the control plane did not start ({e:#}); again on new ports"),
                );
            }
            Err(e) => panic!("{name}: the control plane does not start: {e:#}"),
        }
    }
}

impl Env {
    /// Starts a control plane, a fake and (per `setup`) the operator. Blocking.
    fn start(name: &str, setup: Setup) -> Env {
        let cp = control_plane(name, setup);
        let (tx, rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("fake-google".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let scenario = Scenario {
                        operator: fake_google::scenario::Operator {
                            tokens: vec![OPERATOR_TOKEN.into()],
                            ..Default::default()
                        },
                        ..Default::default()
                    };
                    let running = fake_google::start(SocketAddr::from(([127, 0, 0, 1], 0)), scenario)
                        .await
                        .expect("fake starts");
                    tx.send((running.addr, running.fake.clone(), running.endpoints())).expect("send");
                    // Until the Env is dropped (the sender with it).
                    let _ = stopped.await;
                    drop(running);
                });
            })
            .expect("thread");
        let (fake_addr, fake, endpoints) = rx.recv().expect("the fake starts");
        let operator = Operator::new(&cp, &endpoints, setup.operator_args);
        if setup.start_operator {
            operator.start().expect("the operator starts");
        }
        Env { operator, fake, fake_addr, endpoints, cp, _fake_stop: stop }
    }

    /// An admin client for this test's runtime.
    pub async fn client(&self) -> Client {
        self.cp.client().await.expect("client")
    }

    /// Creates a namespace with labels; returns its name.
    pub async fn namespace(&self, client: &Client, prefix: &str, labels: &[(&str, &str)]) -> String {
        self.cp.namespace(client, prefix, labels).await.expect("namespace")
    }

    /// Adds (or replaces) a Google service account with `bindings` (role, members) at the fake.
    pub fn fake_service_account(&self, email: &str, bindings: &[(&str, &[&str])]) {
        let sa = ServiceAccount {
            email: email.into(),
            bindings: bindings
                .iter()
                .map(|(role, members)| Binding {
                    role: (*role).into(),
                    members: members.iter().map(|m| (*m).to_string()).collect(),
                    condition: None,
                })
                .collect(),
            grants: BTreeMap::new(),
            ..Default::default()
        };
        self.fake.update(|s| {
            s.service_accounts.retain(|x| x.email != email);
            s.service_accounts.push(sa);
        });
    }

    /// Waits until `probe` satisfies `cond`; on timeout fails with its status and the operator's log tail.
    pub async fn wait_for(
        &self,
        client: &Client,
        name: &str,
        what: &str,
        cond: impl Fn(&AuthProbe) -> bool,
    ) -> AuthProbe {
        self.wait_for_within(client, name, what, WAIT, cond).await
    }

    /// [`Env::wait_for`] with its own bound, for waits that include an API server restart.
    pub async fn wait_for_within(
        &self,
        client: &Client,
        name: &str,
        what: &str,
        within: Duration,
        cond: impl Fn(&AuthProbe) -> bool,
    ) -> AuthProbe {
        let api = Api::<AuthProbe>::all(client.clone());
        let waited = tokio::time::timeout(
            within,
            await_condition(api.clone(), name, move |p: Option<&AuthProbe>| p.is_some_and(&cond)),
        )
        .await;
        match waited {
            Ok(Ok(Some(p))) => p,
            outcome => {
                let current = api
                    .get(name)
                    .await
                    .ok()
                    .and_then(|p| p.status)
                    .map(|s| serde_json::to_string_pretty(&s).unwrap_or_default());
                let log = self.operator.log_text();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                panic!(
                    "{name}: timed out waiting for {what} ({outcome:?}); status: {}\noperator log (newest first):\n{}",
                    current.unwrap_or_default(),
                    tail.join("\n")
                )
            }
        }
    }

    /// Waits for Ready to have `status` and `reason`.
    pub async fn wait_ready(&self, client: &Client, name: &str, status: &str, reason: &str) -> AuthProbe {
        let want = Some((status.to_string(), reason.to_string()));
        self.wait_for(client, name, &format!("Ready={status}/{reason}"), move |p| ready(p) == want).await
    }

    /// Waits for Ready True/Verified over exactly `ksas` passing ServiceAccounts: a pass that ran
    /// before the operator's cache held a new namespace is Verified over fewer (a probe selecting
    /// nothing is Verified too).
    pub async fn wait_verified(&self, client: &Client, name: &str, ksas: u32) -> AuthProbe {
        self.wait_verified_within(client, name, ksas, WAIT).await
    }

    /// [`Env::wait_verified`] with its own bound.
    pub async fn wait_verified_within(
        &self,
        client: &Client,
        name: &str,
        ksas: u32,
        within: Duration,
    ) -> AuthProbe {
        let what = format!("Ready=True/Verified over {ksas} ServiceAccounts");
        self.wait_for_within(client, name, &what, within, move |p| {
            ready(p).is_some_and(|r| r.0 == "True" && r.1 == "Verified")
                && p.status.as_ref().and_then(|s| s.summary.as_ref()).is_some_and(|s| s.passing == ksas)
        })
        .await
    }
}

/// The `authprobe` binary the tests run: `AUTHPROBE_BIN` (e.g. an older build, to show a test
/// fails on it), or this build's.
pub fn authprobe_bin() -> PathBuf {
    std::env::var_os("AUTHPROBE_BIN")
        .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_authprobe")), PathBuf::from)
}

/// The operator process.
pub struct Operator {
    child: Mutex<Option<Child>>,
    /// Its combined stdout/stderr (JSON logs).
    pub log: PathBuf,
    /// Where it serves /metrics.
    pub http: SocketAddr,
    args: Vec<String>,
    envs: Vec<(&'static str, String)>,
}

/// A test's own operator dies with it, also when the test panics: left running, it would keep
/// reconciling and writing Events into the tests that follow.
impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `endpoints` without the services an older build (`AUTHPROBE_BIN`) refuses: with
/// `AUTHPROBE_BIN_SERVICES=sts,iam,...` only those are passed, so its tests can show what it did.
fn known_endpoints(endpoints: &str) -> String {
    let Ok(known) = std::env::var("AUTHPROBE_BIN_SERVICES") else { return endpoints.to_string() };
    let known: Vec<&str> = known.split(',').collect();
    endpoints
        .split(',')
        .filter(|e| e.split_once('=').is_some_and(|(service, _)| known.contains(&service)))
        .collect::<Vec<_>>()
        .join(",")
}

impl Operator {
    /// An operator (not started) talking to the fake at `endpoints`, with `extra` arguments.
    pub fn new(cp: &ControlPlane, endpoints: &str, extra: &[&str]) -> Self {
        let n = free_port().expect("a free port");
        let token = cp.dir().join(format!("operator-token-{n}"));
        std::fs::write(&token, OPERATOR_TOKEN).expect("token file");
        let http = SocketAddr::from(([127, 0, 0, 1], n));
        let mut args: Vec<String> = vec![
            "run".into(),
            format!("--http-addr={http}"),
            format!("--google-access-token-file={}", token.display()),
            "--log-format=json".into(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_string()));
        Self {
            child: Mutex::new(None),
            log: cp.dir().join(format!("operator-{n}.log")),
            http,
            args,
            envs: vec![
                ("KUBECONFIG", cp.kubeconfig_path().display().to_string()),
                ("AUTHPROBE_GOOGLE_ENDPOINTS", known_endpoints(endpoints)),
                ("RUST_LOG", "info,authprobe=debug".into()),
            ],
        }
    }

    /// Sets (or replaces) an environment variable of the process.
    pub fn with_env(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.envs.retain(|(k, _)| *k != key);
        self.envs.push((key, value.into()));
        self
    }

    /// Starts the process and waits until /readyz answers 200.
    pub fn start(&self) -> Result<()> {
        let child = authprobe_harness::spawn(&authprobe_bin(), &self.args, &self.envs, &self.log)?;
        *self.child.lock().unwrap() = Some(child);
        let url = format!("http://{}/readyz", self.http);
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            if let Ok(r) = reqwest_blocking_get(&url)
                && r == 200
            {
                return Ok(());
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the operator never turned ready; log:\n{}",
                self.log_text()
            );
            if let Some(c) = self.child.lock().unwrap().as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                anyhow::bail!("the operator exited with {status}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.lock().unwrap().as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn alive(&self) -> bool {
        self.child.lock().unwrap().as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills it at once (a crash). Also works after a panic poisoned the lock, so it can run on drop.
    pub fn kill(&self) {
        if let Some(mut c) = self.child.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            authprobe_harness::kill(&mut c);
        }
    }

    /// SIGTERM, waiting up to 30 s for a graceful exit; returns the exit status.
    pub fn stop(&self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.lock().unwrap().take()?;
        authprobe_harness::stop(&mut c, Duration::from_secs(30));
        c.try_wait().ok().flatten()
    }

    /// Everything it logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its /metrics text once `cond` holds, within [`WAIT`]. Polled: /metrics has no watch, and a
    /// pass updates it after writing status and Events, so a status seen is no series seen.
    pub async fn wait_metrics(&self, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let text = self.metrics().await;
            if cond(&text) {
                return text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "/metrics never showed {what} within {WAIT:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Its /metrics text.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("http://{}/metrics", self.http))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

/// A blocking GET on a loopback URL; returns the status code. (No runtime is available here.)
fn reqwest_blocking_get(url: &str) -> Result<u16> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("http url")?;
    let (host, path) = rest.split_once('/').context("path")?;
    let mut stream = std::net::TcpStream::connect(host)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response.split_whitespace().nth(1).context("status")?.parse()?)
}

/// A unique suffix for names within this process.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}-{}", std::process::id() % 10_000, N.fetch_add(1, Ordering::Relaxed))
}

/// Creates a ServiceAccount, annotated with `gsa` when given.
pub async fn service_account(client: &Client, ns: &str, name: &str, gsa: Option<&str>) {
    let mut sa = json!({"metadata": {"name": name}});
    if let Some(gsa) = gsa {
        sa["metadata"]["annotations"] = json!({"iam.gke.io/gcp-service-account": gsa});
    }
    Api::<KubeServiceAccount>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &serde_json::from_value(sa).unwrap())
        .await
        .expect("service account");
}

/// Sets (or, with `None`, removes) the GSA annotation of a ServiceAccount.
pub async fn annotate(client: &Client, ns: &str, name: &str, gsa: Option<&str>) {
    let patch = json!({"metadata": {"annotations": {"iam.gke.io/gcp-service-account": gsa}}});
    Api::<KubeServiceAccount>::namespaced(client.clone(), ns)
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("annotate");
}

/// A GKE probe selecting `label=value` namespaces and KSA `app`, with the demo project; `extra`
/// is merged into the spec.
pub fn gke_spec(label: &str, value: &str, extra: Value) -> Value {
    let mut spec = json!({
        "namespaceSelector": {"matchLabels": {label: value}},
        "serviceAccounts": {"names": ["app"]},
        "identity": {"platform": "GKE", "projectId": "acme-prod", "projectNumber": "123456789012"},
        "probe": {"propagationGrace": "0s"}
    });
    merge(&mut spec, extra);
    spec
}

/// Merges `extra` into `base` (objects key by key, everything else replaced).
pub fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

/// Creates or replaces an AuthProbe's spec.
pub async fn apply_probe(client: &Client, name: &str, spec: Value) {
    let probe = json!({"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "metadata": {"name": name}, "spec": spec});
    Api::<AuthProbe>::all(client.clone())
        .patch(name, &PatchParams::apply("authprobe-test").force(), &Patch::Apply(&probe))
        .await
        .expect("apply probe");
}

/// Asks for an immediate re-check with fresh Google reads.
pub async fn probe_now(client: &Client, name: &str) {
    let patch = json!({"metadata": {"annotations": {"authprobe.io/probe-now": unique("now")}}});
    Api::<AuthProbe>::all(client.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("probe-now");
}

/// The Ready condition's (status, reason).
pub fn ready(probe: &AuthProbe) -> Option<(String, String)> {
    condition_of(probe, condition::READY)
}

/// A condition's (status, reason).
pub fn condition_of(probe: &AuthProbe, type_: &str) -> Option<(String, String)> {
    probe
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// events.k8s.io Events about an object.
pub async fn events(client: &Client, ns: &str, kind: &str, name: &str) -> Vec<Event> {
    let selector = format!("regarding.kind={kind},regarding.name={name}");
    let list = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default().fields(&selector))
        .await
        .expect("events");
    list.items
}

/// `(type, reason, count)` of each event about an object, oldest first.
pub async fn event_summary(client: &Client, ns: &str, kind: &str, name: &str) -> Vec<(String, String, i32)> {
    let mut items = events(client, ns, kind, name).await;
    items.sort_by_key(|e| e.event_time.clone().map(|t| t.0));
    items
        .into_iter()
        .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.series.map_or(1, |s| s.count)))
        .collect()
}

/// How many times each (type, reason) was reported about an object, series repeats included.
pub async fn event_counts(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
) -> BTreeMap<(String, String), i32> {
    let mut counts = BTreeMap::new();
    for (type_, reason, n) in event_summary(client, ns, kind, name).await {
        *counts.entry((type_, reason)).or_default() += n;
    }
    counts
}

/// Waits until the events about an object count exactly `want` (see [`event_counts`]).
pub async fn wait_for_events(client: &Client, ns: &str, kind: &str, name: &str, want: &[(&str, &str, i32)]) {
    let want: BTreeMap<(String, String), i32> =
        want.iter().map(|(t, r, n)| (((*t).to_string(), (*r).to_string()), *n)).collect();
    let config = watcher::Config::default().fields(&format!("regarding.kind={kind},regarding.name={name}"));
    let mut changes = watcher(Api::<Event>::namespaced(client.clone(), ns), config).default_backoff().boxed();
    let waited = tokio::time::timeout(WAIT, async {
        // Every watch event (the initial list included) is a moment to count again.
        while changes.next().await.is_some() {
            if event_counts(client, ns, kind, name).await == want {
                return true;
            }
        }
        false
    })
    .await;
    if waited != Ok(true) {
        let seen = event_counts(client, ns, kind, name).await;
        panic!("events about {kind} {ns}/{name}: waited for {want:?}, have {seen:?}");
    }
}

/// The GKE legacy member for a KSA in the demo project.
pub fn member(ns: &str, ksa: &str) -> String {
    format!("serviceAccount:acme-prod.svc.id.goog[{ns}/{ksa}]")
}

/// `roles/iam.workloadIdentityUser`.
pub const WIU: &str = "roles/iam.workloadIdentityUser";

/// Fails if any of `credentials` appears in any file under `dir` (the control plane's etcd data,
/// its logs and the operator's log); returns the bytes scanned. Every credential is a JWT
/// (`eyJ…`) or an access token (`ya29.…`), so each file is searched for those markers only and
/// each hit compared against the set.
pub fn assert_no_credential_in_files(dir: &std::path::Path, credentials: &[String]) -> u64 {
    let wanted: std::collections::HashSet<&[u8]> = credentials.iter().map(|c| c.as_bytes()).collect();
    let token_char = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_');
    let mut scanned = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).expect("readable").flatten().map(|e| e.path()));
            continue;
        }
        let Ok(bytes) = std::fs::read(&path) else { continue }; // a socket, or removed meanwhile
        scanned += bytes.len() as u64;
        for start in 0..bytes.len().saturating_sub(3) {
            let rest = &bytes[start..];
            if rest.starts_with(b"eyJ") || rest.starts_with(b"ya29.") {
                let len = rest.iter().take_while(|b| token_char(b)).count();
                assert!(!wanted.contains(&rest[..len]), "{} holds a credential", path.display());
            }
        }
    }
    scanned
}

/// A result line printed whether or not the test passes: RELIABILITY.md quotes these.
pub fn report(kind: &str, line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{kind}: {line}");
}

/// Who holds the Lease, if anyone.
pub fn lease_holder(lease: &Lease) -> Option<String> {
    lease.spec.as_ref()?.holder_identity.clone().filter(|h| !h.is_empty())
}

/// Waits until the Lease is held by someone other than `not`, and returns the holder and how long it took.
pub async fn wait_takeover(leases: &Api<Lease>, not: Option<&str>) -> (String, Duration) {
    let started = Instant::now();
    loop {
        if let Ok(lease) = leases.get(authprobe::runtime::leader::DEFAULT_LEASE_NAME).await
            && let Some(holder) = lease_holder(&lease)
            && Some(holder.as_str()) != not
        {
            return (holder, started.elapsed());
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no takeover within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every Ready status a probe shows from now on, until the returned guard is stopped.
pub struct Recorder {
    seen: tokio::sync::watch::Receiver<Vec<(String, String)>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts recording.
pub fn record(client: &Client, id: &str) -> Recorder {
    let (tx, rx) = tokio::sync::watch::channel(vec![]);
    let api = Api::<AuthProbe>::all(client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={id}"));
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, config).default_backoff().applied_objects().boxed();
        while let Some(item) = stream.next().await {
            if let Ok(p) = item
                && let Some(r) = ready(&p)
            {
                tx.send_modify(|v| v.push(r));
            }
        }
    });
    Recorder { seen: rx, task }
}

impl Recorder {
    pub fn stop(self) -> Vec<(String, String)> {
        self.task.abort();
        self.seen.borrow().clone()
    }
}
