//! A real local Kubernetes control plane for tests, the demo and benchmarks: etcd and kube-apiserver
//! (built from the Go module proxy by `make tools`) started as child processes on free loopback ports
//! in a temporary directory, with TLS, an admin client certificate and ServiceAccount issuer and
//! signing keys, so that TokenRequest and the OIDC discovery endpoints are served.
//!
//! One control plane per test binary ([`ControlPlane::shared`]), one namespace per test
//! ([`ControlPlane::namespace`]). Everything is torn down when the value is dropped or, for the
//! shared instance, when the process exits; children are killed even if the process is.
//!
//! Tests that need pods to run use [`node::Node`] instead: the same control plane plus
//! containerd, a kubelet, kube-controller-manager and kube-scheduler, all inside a network, mount
//! and PID namespace the test binary re-executes itself into (see the module's documentation).

pub mod image;
mod nginx;
pub mod node;
mod pki;
mod process;
mod sandbox;
mod stall;

use std::{
    collections::BTreeMap,
    fs,
    path::{Path, PathBuf},
    process::Child,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::{
    api::core::v1::Namespace, apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::wait::{await_condition, conditions},
};

pub use nginx::Nginx;
pub use process::{at_exit, free_port, kill, spawn, stop};
pub use stall::StallProxy;

/// How long the API server may take to turn ready; generous because two cores are shared with the build.
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_GRACE: Duration = Duration::from_secs(10);
const FIELD_MANAGER: &str = "authprobe-harness";

/// The repository root, where `.tools/bin` and `crds/` live.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Where `make tools` puts kube-apiserver, etcd, kubectl and helm (`AUTHPROBE_TOOLS_BIN` overrides it).
pub fn tools_bin() -> PathBuf {
    std::env::var_os("AUTHPROBE_TOOLS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join(".tools/bin"))
}

/// Options for starting a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// Install the CRDs from `crds/` once the API server is ready.
    pub install_crds: bool,
    /// Write an audit log (metadata level) of every request to `audit.log`.
    pub audit_log: bool,
    /// kube-apiserver's `--feature-gates`, e.g. `WatchList=false` for a server without streaming lists.
    pub feature_gates: Option<&'static str>,
}

impl Default for Options {
    fn default() -> Self {
        Self { install_crds: true, audit_log: false, feature_gates: None }
    }
}

/// A running etcd + kube-apiserver.
#[derive(Debug)]
pub struct ControlPlane {
    dir: PathBuf,
    api_port: u16,
    etcd_port: u16,
    etcd_peer_port: u16,
    options: Options,
    /// Set for the control plane of a [`node::Node`].
    node: Option<pki::NodeIdentity>,
    procs: Mutex<Procs>,
    signing_generation: AtomicU32,
}

#[derive(Debug, Default)]
struct Procs {
    etcd: Option<Child>,
    apiserver: Option<Child>,
    /// Signing keys the API server accepts, newest (the signer) last.
    verify_keys: Vec<PathBuf>,
}

impl ControlPlane {
    /// The control plane shared by every test in this binary, started on first use and stopped at exit.
    ///
    /// # Panics
    /// When the control plane cannot start: every test that needs it would fail anyway, and the
    /// message says why (usually: run `make tools`).
    #[allow(clippy::panic)]
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| {
            let started = std::thread::spawn(|| ControlPlane::start(Options::default()))
                .join()
                .unwrap_or_else(|_| Err(anyhow!("control plane start panicked")));
            match started {
                Ok(cp) => {
                    process::at_exit(|| {
                        if let Some(cp) = SHARED.get() {
                            cp.shutdown();
                        }
                    });
                    cp
                }
                Err(e) => panic!("cannot start the local control plane: {e:#}"),
            }
        })
    }

    /// Starts etcd and kube-apiserver and waits until the API server is ready. Blocking: call it
    /// outside an async runtime (it runs its own for the readiness checks).
    pub fn start(options: Options) -> Result<ControlPlane> {
        remove_stale_dirs();
        let dir = std::env::temp_dir().join(format!("authprobe-cp-{}-{}", std::process::id(), free_port()?));
        Self::start_in(dir, options, None)
    }

    /// Starts the control plane in `dir`; with `node`, set up for that node's kubelet (see
    /// [`ControlPlane::start_apiserver`]).
    fn start_in(dir: PathBuf, options: Options, node: Option<pki::NodeIdentity>) -> Result<ControlPlane> {
        fs::create_dir_all(dir.join("pki"))?;
        pki::write_certificates(&dir.join("pki"), node.as_ref())?;
        let cp = ControlPlane {
            api_port: free_port()?,
            etcd_port: free_port()?,
            etcd_peer_port: free_port()?,
            dir,
            options,
            node,
            procs: Mutex::new(Procs::default()),
            signing_generation: AtomicU32::new(0),
        };
        cp.write_kubeconfig()?;
        let first_key = pki::write_signing_key(&cp.pki(), 0)?;
        cp.lock().verify_keys.push(first_key);
        let result = cp.start_etcd().and_then(|()| cp.start_apiserver()).and_then(|()| {
            block_on(async {
                cp.wait_ready().await?;
                let client = cp.client().await?;
                allow_anonymous_discovery(&client).await?;
                if cp.options.install_crds {
                    install_crds(&client).await?;
                }
                Ok(())
            })
        });
        match result {
            Ok(()) => Ok(cp),
            Err(e) => Err(e.context(format!("logs are in {}", cp.dir.display()))),
        }
    }

    /// The temporary directory holding keys, data, logs and the kubeconfig.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// The API server's port (on 127.0.0.1; with a node also on the node's address).
    pub fn api_port(&self) -> u16 {
        self.api_port
    }

    /// The admin kubeconfig.
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    /// The ServiceAccount token issuer (`iss` of every KSA token).
    pub fn issuer(&self) -> String {
        self.server_url()
    }

    /// The CA that signed the API server's serving certificate, PEM.
    pub fn ca_pem(&self) -> Result<String> {
        Ok(fs::read_to_string(self.pki().join(pki::CA_CERT))?)
    }

    /// A path to the CA file, for tools that take one.
    pub fn ca_path(&self) -> PathBuf {
        self.pki().join(pki::CA_CERT)
    }

    /// The API server's log.
    pub fn apiserver_log(&self) -> PathBuf {
        self.dir.join("apiserver.log")
    }

    /// The audit log, when [`Options::audit_log`] is on.
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// A new admin client (each async runtime needs its own).
    pub async fn client(&self) -> Result<Client> {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig_path())?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        Ok(Client::try_from(config)?)
    }

    /// Creates a namespace named `<prefix>-<n>` (unique in this control plane) with `labels`.
    pub async fn namespace(&self, client: &Client, prefix: &str, labels: &[(&str, &str)]) -> Result<String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("{prefix}-{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        let labels: BTreeMap<String, String> =
            labels.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
        let ns = Namespace {
            metadata: ObjectMeta { name: Some(name.clone()), labels: Some(labels), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
        Ok(name)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Procs> {
        match self.procs.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn start_etcd(&self) -> Result<()> {
        let args = vec![
            format!("--data-dir={}", self.dir.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{}", self.etcd_port),
            format!("--advertise-client-urls=http://127.0.0.1:{}", self.etcd_port),
            format!("--listen-peer-urls=http://127.0.0.1:{}", self.etcd_peer_port),
            format!("--initial-advertise-peer-urls=http://127.0.0.1:{}", self.etcd_peer_port),
            format!("--initial-cluster=default=http://127.0.0.1:{}", self.etcd_peer_port),
            "--listen-metrics-urls=".to_string(),
            "--unsafe-no-fsync".to_string(),
            "--log-level=warn".to_string(),
        ];
        let child = process::spawn(&binary("etcd")?, &args, &[], &self.dir.join("etcd.log"))?;
        self.lock().etcd = Some(child);
        Ok(())
    }

    fn start_apiserver(&self) -> Result<()> {
        let pki = self.pki();
        let mut procs = self.lock();
        let signer = procs.verify_keys.last().ok_or_else(|| anyhow!("no signing key"))?.clone();
        let mut args = vec![
            format!("--etcd-servers=http://127.0.0.1:{}", self.etcd_port),
            format!("--secure-port={}", self.api_port),
            format!("--cert-dir={}", pki.display()),
            format!("--client-ca-file={}", pki.join(pki::CA_CERT).display()),
            format!("--service-account-issuer={}", self.issuer()),
            format!("--service-account-signing-key-file={}", signer.display()),
            "--service-cluster-ip-range=10.0.0.0/24".to_string(),
            "--endpoint-reconciler-type=none".to_string(),
            "--allow-privileged=true".to_string(),
            "--profiling=false".to_string(),
        ];
        match &self.node {
            None => args.extend(
                [
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    "--authorization-mode=RBAC",
                    // No controller-manager runs here to create the "default" ServiceAccounts.
                    "--disable-admission-plugins=ServiceAccount",
                ]
                .map(String::from),
            ),
            Some(node) => args.extend([
                // Inside the node's own network namespace, whose only interfaces are loopback and
                // the pods' bridge: pods reach the API server on the node's address.
                "--bind-address=0.0.0.0".to_string(),
                format!("--advertise-address={}", node.ip),
                "--authorization-mode=Node,RBAC".to_string(),
                "--enable-admission-plugins=NodeRestriction".to_string(),
                format!("--kubelet-client-certificate={}", pki.join(pki::KUBELET_CLIENT_CERT).display()),
                format!("--kubelet-client-key={}", pki.join(pki::KUBELET_CLIENT_KEY).display()),
                "--kubelet-preferred-address-types=InternalIP".to_string(),
            ]),
        }
        args.extend(procs.verify_keys.iter().map(|k| format!("--service-account-key-file={}", k.display())));
        if let Some(gates) = self.options.feature_gates {
            args.push(format!("--feature-gates={gates}"));
        }
        if self.options.audit_log {
            let policy = self.dir.join("audit-policy.yaml");
            fs::write(&policy, "apiVersion: audit.k8s.io/v1\nkind: Policy\nrules:\n- level: Metadata\n")?;
            args.push(format!("--audit-policy-file={}", policy.display()));
            args.push(format!("--audit-log-path={}", self.audit_log().display()));
        }
        let child = process::spawn(&binary("kube-apiserver")?, &args, &[], &self.apiserver_log())?;
        procs.apiserver = Some(child);
        Ok(())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = self.client().await?;
        loop {
            let request = http::Request::get("/readyz").body(Vec::new())?;
            match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                outcome => {
                    if Instant::now() > deadline {
                        bail!("kube-apiserver not ready after {READY_TIMEOUT:?}: {outcome:?}");
                    }
                    self.check_children()?;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    fn check_children(&self) -> Result<()> {
        let mut guard = self.lock();
        let procs = &mut *guard;
        for (name, child) in [("etcd", &mut procs.etcd), ("kube-apiserver", &mut procs.apiserver)] {
            if let Some(c) = child
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!("{name} exited with {status}");
            }
        }
        Ok(())
    }

    /// Kills kube-apiserver at once, as a crash would.
    pub fn kill_apiserver(&self) {
        if let Some(mut c) = self.lock().apiserver.take() {
            process::kill(&mut c);
        }
    }

    /// Starts kube-apiserver again (same port, same etcd) and waits for it to be ready.
    pub async fn restart_apiserver(&self) -> Result<()> {
        self.kill_apiserver();
        self.start_apiserver()?;
        self.wait_ready().await
    }

    /// Stops etcd (SIGTERM), starts it again on the same data and waits for the API server to be ready.
    pub async fn restart_etcd(&self) -> Result<()> {
        if let Some(mut c) = self.lock().etcd.take() {
            process::stop(&mut c, STOP_GRACE);
        }
        self.start_etcd()?;
        self.wait_ready().await
    }

    /// Restarts kube-apiserver signing with a new key. With `keep_old`, tokens signed by the old key
    /// still verify and its key stays in the served JWKS; without, only the new key is served.
    pub async fn rotate_signing_key(&self, keep_old: bool) -> Result<()> {
        let generation = self.signing_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let key = pki::write_signing_key(&self.pki(), generation)?;
        {
            let mut procs = self.lock();
            if !keep_old {
                procs.verify_keys.clear();
            }
            procs.verify_keys.push(key);
        }
        self.restart_apiserver().await
    }

    /// Stops both processes and removes the directory. Idempotent.
    pub fn shutdown(&self) {
        let mut procs = self.lock();
        if let Some(mut c) = procs.apiserver.take() {
            process::stop(&mut c, STOP_GRACE);
        }
        if let Some(mut c) = procs.etcd.take() {
            process::stop(&mut c, STOP_GRACE);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    fn write_kubeconfig(&self) -> Result<()> {
        self.write_kubeconfig_as(&self.kubeconfig_path(), &self.server_url(), pki::ADMIN_CERT, pki::ADMIN_KEY)
    }

    /// An admin kubeconfig whose server is `addr` (a proxy in front of the API server, whose
    /// certificate names 127.0.0.1); returns its path.
    pub fn kubeconfig_via(&self, addr: std::net::SocketAddr) -> Result<PathBuf> {
        let path = self.dir.join(format!("kubeconfig-via-{}", addr.port()));
        let server = format!("https://127.0.0.1:{}", addr.port());
        self.write_kubeconfig_as(&path, &server, pki::ADMIN_CERT, pki::ADMIN_KEY)?;
        Ok(path)
    }

    /// The API server's address.
    pub fn api_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.api_port))
    }

    /// Writes a kubeconfig for `server` with the client certificate and key files `cert` and `key` of the PKI directory.
    fn write_kubeconfig_as(&self, path: &Path, server: &str, cert: &str, key: &str) -> Result<()> {
        use base64::Engine as _;
        let b64 = |file: &str| -> Result<String> {
            Ok(base64::engine::general_purpose::STANDARD.encode(fs::read(self.pki().join(file))?))
        };
        let kubeconfig = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: authprobe-local\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {cert}\n    client-key-data: {key}\ncontexts:\n- name: authprobe-local\n  context:\n    cluster: authprobe-local\n    user: admin\ncurrent-context: authprobe-local\n",
            ca = b64(pki::CA_CERT)?,
            cert = b64(cert)?,
            key = b64(key)?,
        );
        fs::write(path, kubeconfig)?;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn binary(name: &str) -> Result<PathBuf> {
    let path = tools_bin().join(name);
    if !path.is_file() {
        bail!("{} is missing: run `make tools` to build the local control plane and node", path.display());
    }
    Ok(path)
}

/// Runs a future to completion on a fresh runtime (the caller may not be inside one).
pub fn block_on<F: std::future::Future<Output = Result<()>>>(f: F) -> Result<()> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f)
}

/// Removes directories left by control planes whose process is gone (a killed test binary).
fn remove_stale_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("authprobe-cp-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<u32>().ok());
        if pid.is_some_and(|pid| !process::alive(pid)) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Lets anyone read `/.well-known/openid-configuration` and `/openid/v1/jwks`, as a cluster that
/// publishes its issuer for Google does.
async fn allow_anonymous_discovery(client: &Client) -> Result<()> {
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let binding: ClusterRoleBinding = serde_json::from_value(serde_json::json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "service-account-issuer-discovery-public"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                    "name": "system:service-account-issuer-discovery"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:unauthenticated"}]
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone())
        .patch(
            "service-account-issuer-discovery-public",
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await?;
    Ok(())
}

/// Applies every CRD in `crds/` and waits until each is Established.
pub async fn install_crds(client: &Client) -> Result<()> {
    let api = Api::<CustomResourceDefinition>::all(client.clone());
    let dir = repo_root().join("crds");
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let crd: CustomResourceDefinition = serde_saphyr::from_str(&fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        let name = crd.metadata.name.clone().ok_or_else(|| anyhow!("{} has no name", path.display()))?;
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&crd))
            .await
            .with_context(|| format!("applying {}", path.display()))?;
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .with_context(|| format!("{name} not established"))??;
    }
    Ok(())
}
