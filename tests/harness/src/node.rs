//! A real node for tests that need pods: the control plane of [`ControlPlane`] plus containerd
//! (its own root, state and socket), runc and the CNI bridge plugin from Debian, a kubelet
//! registered as a Ready Node, kube-controller-manager and kube-scheduler.
//!
//! # Namespaces: how a test opts in
//!
//! Everything of a node, and the test process itself, runs inside a network, mount and PID
//! namespace the run creates (see [`enter`]): the first call of [`Node::shared`] (or [`enter`]) in
//! a test binary re-executes that binary, with the same arguments, under
//! `unshare --net --mount --pid --fork` with `podutil init` as its PID 1, and the outer process
//! exits with the inner one's status.
//! So a test opts in by calling `Node::shared()` first thing:
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! let node = authprobe_harness::node::Node::shared(); // re-executes the test binary once
//! let client = node.client().await?;
//! let ns = node.namespace(&client, "demo", &[]).await?; // waits for its ServiceAccount
//! node.import_image(&authprobe_harness::node::authprobe_static_binary(), "authprobe:dev")?;
//! # Ok(()) }
//! ```
//!
//! Put node tests in a test binary of their own: the binary's tests then all run inside the
//! namespaces (tests that started in the outer process before the first `Node::shared()` are cut
//! short when it exits). Servers the test starts (a fake Google, a fake metadata server) listen
//! on [`Node::ip`] (or `0.0.0.0`, which inside the namespace means loopback and the pods' bridge),
//! and pods reach them there. Nothing routes out of the namespace.
//!
//! # Networking
//!
//! The node's address [`NODE_IP`] sits on the bridge `cni0`, the pods' subnet is
//! [`POD_SUBNET`] (CNI `bridge` + `host-local`, no default route, no masquerading). There is no
//! kube-proxy and no cluster DNS: Service IPs and names do not resolve. An in-cluster client
//! gets [`Node::in_cluster_env`] (`KUBERNETES_SERVICE_HOST`/`PORT` pointing at the API server on
//! the node's address, which its certificate names), or runs with `hostNetwork: true`, where
//! `127.0.0.1` works too.
//!
//! # Images
//!
//! No registry: [`Node::import_image`] writes an OCI archive around a static binary
//! ([`crate::image`]) and imports it with `ctr images import`; pods use it with
//! `imagePullPolicy: Never`. The node imports [`PODUTIL_IMAGE`] (`tools/podutil`) at start: it is
//! the sandbox ("pause") image and has small probes (`get URL`, `cat FILE...`) that report through
//! the termination message ([`termination_message`]).
//!
//! # Cleanup
//!
//! At exit (or [`Node::shutdown`]): the control-plane and node processes are stopped, containers
//! and shims killed, mounts detached, the run's cgroups and directory removed. Whatever happens to
//! the test process, the kernel ends the PID namespace with it, and the mount and network
//! namespaces go with their last process; the outer process then removes the run's cgroups and
//! directory, and if it was killed too, the next run does ([`sweep_stale`]).

use std::{
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    ops::Deref,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Mutex, OnceLock},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::core::v1::{ConfigMap, EnvVar, Node as KubeNode, Pod, ServiceAccount};
use kube::{
    Api, Client,
    runtime::wait::{Condition, await_condition},
};

pub use crate::sandbox::{enter, host_listener, inside, sweep_stale};
use crate::{ControlPlane, Options, binary, block_on, pki, process, repo_root, sandbox, tools_bin};

/// The node's name.
pub const NODE_NAME: &str = "authprobe-node";
/// The node's address, on the pods' bridge, inside the run's network namespace.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 1);
/// The pods' subnet.
pub const POD_SUBNET: &str = "10.88.0.0/16";
/// The helper image every node has: `tools/podutil`, also the pod sandbox.
pub const PODUTIL_IMAGE: &str = "podutil:dev";
const BRIDGE: &str = "cni0";
const READY_TIMEOUT: Duration = Duration::from_secs(180);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The static (musl) authprobe binary `make static` builds.
pub fn authprobe_static_binary() -> PathBuf {
    repo_root().join("target/x86_64-unknown-linux-musl/release/authprobe")
}

/// `tools/podutil`, built by `make tools`.
pub fn podutil_binary() -> PathBuf {
    tools_bin().join("podutil")
}

/// A control plane with one node. Dereferences to its [`ControlPlane`].
#[derive(Debug)]
pub struct Node {
    cp: ControlPlane,
    /// `authprobe-node-<outer pid>`: the run's cgroup and directory name.
    run: String,
    dir: PathBuf,
    procs: Mutex<NodeProcs>,
    started_in: Duration,
}

#[derive(Debug, Default)]
struct NodeProcs {
    containerd: Option<Child>,
    kubelet: Option<Child>,
    controller_manager: Option<Child>,
    scheduler: Option<Child>,
}

impl Deref for Node {
    type Target = ControlPlane;
    fn deref(&self) -> &ControlPlane {
        &self.cp
    }
}

impl Node {
    /// The node shared by every test in this binary, started on first use, stopped at exit.
    /// Outside the node's namespaces, the first call re-executes the test binary inside them and
    /// does not return (see the module's documentation).
    ///
    /// # Panics
    /// When the node cannot start; the message says why (usually: run `make tools node-deps`).
    #[allow(clippy::panic)]
    pub fn shared() -> &'static Node {
        static SHARED: OnceLock<Node> = OnceLock::new();
        if let Some(node) = SHARED.get() {
            return node;
        }
        if let Err(e) = enter(None) {
            panic!("cannot enter the node's namespaces: {e:#}");
        }
        SHARED.get_or_init(|| {
            let started = std::thread::spawn(|| Node::start(Options::default()))
                .join()
                .unwrap_or_else(|_| Err(anyhow!("node start panicked")));
            match started {
                Ok(node) => {
                    process::at_exit(|| {
                        if let Some(node) = SHARED.get() {
                            node.shutdown();
                        }
                    });
                    node
                }
                Err(e) => panic!("cannot start the local node: {e:#}"),
            }
        })
    }

    /// Starts the control plane and the node, and waits until the Node is Ready and the `default`
    /// namespace has its ServiceAccount. Outside the node's namespaces it first re-executes the
    /// program inside them, like [`Node::shared`] (see [`enter`]). One node per run at a time.
    /// Blocking: call it outside an async runtime.
    pub fn start(options: Options) -> Result<Node> {
        let t0 = Instant::now();
        enter(None)?;
        if !sandbox::inside() {
            bail!("a node runs only inside its own namespaces (call node::enter() first)");
        }
        for tool in ["kubelet", "kube-controller-manager", "kube-scheduler", "podutil"] {
            binary(tool)?;
        }
        check_node_packages()?;
        let (run, run_dir) = sandbox::run()?;
        let dir = run_dir.join("node");
        if dir.exists() {
            bail!("a node already runs in this run ({}): use Node::shared()", dir.display());
        }
        fs::create_dir_all(&dir)?;
        setup_network()?;
        sandbox::create_cgroup(&run)?;
        let cp = ControlPlane::start_in(
            dir.join("cp"),
            options,
            Some(pki::NodeIdentity { name: NODE_NAME.to_string(), ip: NODE_IP }),
        )?;
        let mut node =
            Node { cp, run, dir, procs: Mutex::new(NodeProcs::default()), started_in: Duration::ZERO };
        match node.start_node() {
            Ok(()) => {
                node.started_in = t0.elapsed();
                eprintln!("harness: node {NODE_NAME} Ready in {:.1}s", node.started_in.as_secs_f64());
                Ok(node)
            }
            Err(e) => {
                let logs = node.log_tails();
                node.shutdown();
                Err(e.context(logs))
            }
        }
    }

    fn start_node(&self) -> Result<()> {
        self.start_containerd()?;
        self.import_image_with_cmd(&podutil_binary(), PODUTIL_IMAGE, &[])?;
        self.start_kubelet()?;
        self.start_controller_manager()?;
        self.start_scheduler()?;
        block_on(async {
            let client = self.client().await?;
            self.wait_ready(&client).await?;
            wait_namespace_ready(&client, "default").await
        })
    }

    /// The control plane (the node dereferences to it too).
    pub fn control_plane(&self) -> &ControlPlane {
        &self.cp
    }

    /// The node's address: pods reach the test's servers and the API server there.
    pub fn ip(&self) -> Ipv4Addr {
        NODE_IP
    }

    /// The API server on the node's address.
    pub fn api_address(&self) -> SocketAddr {
        SocketAddr::from((NODE_IP, self.cp.api_port()))
    }

    /// What an in-cluster client in a pod needs without kube-proxy: `KUBERNETES_SERVICE_HOST` and
    /// `KUBERNETES_SERVICE_PORT` pointing at [`Node::api_address`] (explicit container env
    /// overrides the Service-based values the kubelet injects).
    pub fn in_cluster_env(&self) -> Vec<EnvVar> {
        [
            ("KUBERNETES_SERVICE_HOST", NODE_IP.to_string()),
            ("KUBERNETES_SERVICE_PORT", self.cp.api_port().to_string()),
        ]
        .into_iter()
        .map(|(name, value)| EnvVar { name: name.to_string(), value: Some(value), ..Default::default() })
        .collect()
    }

    /// Writes an admin kubeconfig for `server` (e.g. a relay's address) to `path`.
    pub fn write_admin_kubeconfig(&self, path: &Path, server: &str) -> Result<()> {
        self.cp.write_kubeconfig_as(path, server, pki::ADMIN_CERT, pki::ADMIN_KEY)
    }

    /// containerd's socket, for `ctr -a SOCKET -n k8s.io ...`.
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// The node's directory: configuration, state and logs (`*.log`) of containerd and the kubelet.
    pub fn node_dir(&self) -> &Path {
        &self.dir
    }

    /// How long [`Node::start`] took, from nothing to a Ready node.
    pub fn startup_time(&self) -> Duration {
        self.started_in
    }

    /// Builds an image from a static `binary` (its only file, also its entrypoint) and imports it
    /// as `reference` (e.g. `authprobe:dev`); pods use it with `imagePullPolicy: Never`. Returns
    /// the normalized name (`docker.io/library/authprobe:dev`).
    pub fn import_image(&self, binary: &Path, reference: &str) -> Result<String> {
        self.import_image_with_cmd(binary, reference, &[])
    }

    /// [`Node::import_image`] with default arguments (`Cmd`).
    pub fn import_image_with_cmd(&self, binary: &Path, reference: &str, cmd: &[&str]) -> Result<String> {
        let name = crate::image::normalize_reference(reference)?;
        let archive = self.dir.join(format!("image-{}.tar", name.replace(['/', ':'], "_")));
        crate::image::write_oci_archive(binary, reference, cmd, &archive)?;
        let socket = self.containerd_socket();
        let out = Command::new("ctr")
            .arg("-a")
            .arg(&socket)
            .args(["-n", "k8s.io", "images", "import"])
            .arg(&archive)
            .output()
            .context("running ctr")?;
        let _ = fs::remove_file(&archive);
        if !out.status.success() {
            bail!(
                "ctr images import {reference}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(name)
    }

    /// Creates a namespace like [`ControlPlane::namespace`] and waits until pods can use it: its
    /// `default` ServiceAccount and `kube-root-ca.crt` ConfigMap (from kube-controller-manager) exist.
    pub async fn namespace(&self, client: &Client, prefix: &str, labels: &[(&str, &str)]) -> Result<String> {
        let name = self.cp.namespace(client, prefix, labels).await?;
        wait_namespace_ready(client, &name).await?;
        Ok(name)
    }

    async fn wait_ready(&self, client: &Client) -> Result<()> {
        let nodes = Api::<KubeNode>::all(client.clone());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let ready = tokio::time::timeout(
                Duration::from_secs(2),
                await_condition(nodes.clone(), NODE_NAME, node_ready()),
            );
            if let Ok(r) = ready.await {
                r?;
                return Ok(());
            }
            self.check_children()?;
            if Instant::now() > deadline {
                bail!("node {NODE_NAME} not Ready after {READY_TIMEOUT:?}");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NodeProcs> {
        match self.procs.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn check_children(&self) -> Result<()> {
        let mut guard = self.lock();
        let p = &mut *guard;
        for (name, child) in [
            ("containerd", &mut p.containerd),
            ("kubelet", &mut p.kubelet),
            ("kube-controller-manager", &mut p.controller_manager),
            ("kube-scheduler", &mut p.scheduler),
        ] {
            if let Some(c) = child
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!("{name} exited with {status}");
            }
        }
        Ok(())
    }

    fn start_containerd(&self) -> Result<()> {
        let d = self.dir.join("containerd");
        fs::create_dir_all(d.join("cni"))?;
        let cni = serde_json::json!({
            "cniVersion": "0.4.0",
            "name": "authprobe",
            "plugins": [{
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": false,
                "ipMasq": false,
                "hairpinMode": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": POD_SUBNET, "rangeStart": "10.88.0.10", "rangeEnd": "10.88.255.250"}]],
                    "routes": [],
                    "dataDir": d.join("cni-ipam"),
                },
            }],
        });
        fs::write(d.join("cni/10-authprobe.conflist"), serde_json::to_vec_pretty(&cni)?)?;
        let sandbox_image = crate::image::normalize_reference(PODUTIL_IMAGE)?;
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  # This environment's root lacks CAP_SYS_RESOURCE: without this every sandbox fails to start.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#,
            d = d.display()
        );
        fs::write(d.join("config.toml"), config)?;
        let args =
            vec![format!("--config={}", d.join("config.toml").display()), "--log-level=warn".to_string()];
        let child =
            process::spawn(Path::new("/usr/bin/containerd"), &args, &[], &self.dir.join("containerd.log"))?;
        self.lock().containerd = Some(child);
        // Ready when its socket answers (no event to wait on: poll, bounded, watching the process).
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let version = Command::new("ctr").arg("-a").arg(self.containerd_socket()).arg("version").output();
            if version.is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            self.check_children()?;
            if Instant::now() > deadline {
                bail!("containerd not answering after 60s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn start_kubelet(&self) -> Result<()> {
        let d = self.dir.join("kubelet");
        fs::create_dir_all(&d)?;
        let pki = self.cp.pki();
        let kubeconfig = d.join("kubeconfig");
        self.cp.write_kubeconfig_as(
            &kubeconfig,
            &self.cp.server_url(),
            pki::KUBELET_CERT,
            pki::KUBELET_KEY,
        )?;
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP.to_string(),
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": pki.join(pki::CA_CERT)},
            },
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": format!("unix://{}", self.containerd_socket().display()),
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": format!("/{}", self.run),
            "failCgroupV1": false,
            "failSwapOn": false,
            "podLogsDir": d.join("pod-logs"),
            // Local images only: image garbage collection would delete them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "1%", "nodefs.inodesFree": "1%", "imagefs.available": "1%"},
            "serializeImagePulls": false,
            "registerNode": true,
            "nodeStatusUpdateFrequency": "2s",
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "10s",
            "fileCheckFrequency": "1h",
        });
        fs::write(d.join("config.yaml"), serde_json::to_vec_pretty(&config)?)?;
        let args = vec![
            format!("--config={}", d.join("config.yaml").display()),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--root-dir={}", d.join("root").display()),
            format!("--cert-dir={}", d.join("pki").display()),
            format!("--hostname-override={NODE_NAME}"),
            format!("--node-ip={NODE_IP}"),
            "--v=1".to_string(),
        ];
        let child = process::spawn(&binary("kubelet")?, &args, &[], &self.dir.join("kubelet.log"))?;
        self.lock().kubelet = Some(child);
        Ok(())
    }

    fn start_controller_manager(&self) -> Result<()> {
        let pki = self.cp.pki();
        let signer = pki.join("sa-0.key");
        let args = vec![
            format!("--kubeconfig={}", self.cp.kubeconfig_path().display()),
            "--leader-elect=false".to_string(),
            "--secure-port=0".to_string(),
            "--use-service-account-credentials=true".to_string(),
            format!("--service-account-private-key-file={}", signer.display()),
            format!("--root-ca-file={}", pki.join(pki::CA_CERT).display()),
            format!("--cluster-signing-cert-file={}", pki.join(pki::CA_CERT).display()),
            format!("--cluster-signing-key-file={}", pki.join(pki::CA_KEY).display()),
            "--profiling=false".to_string(),
        ];
        let child = process::spawn(
            &binary("kube-controller-manager")?,
            &args,
            &[],
            &self.dir.join("controller-manager.log"),
        )?;
        self.lock().controller_manager = Some(child);
        Ok(())
    }

    fn start_scheduler(&self) -> Result<()> {
        let args = vec![
            format!("--kubeconfig={}", self.cp.kubeconfig_path().display()),
            "--leader-elect=false".to_string(),
            "--secure-port=0".to_string(),
            "--profiling=false".to_string(),
        ];
        let child = process::spawn(&binary("kube-scheduler")?, &args, &[], &self.dir.join("scheduler.log"))?;
        self.lock().scheduler = Some(child);
        Ok(())
    }

    /// The last lines of each node log, for an error message (the run's directory is removed at exit).
    fn log_tails(&self) -> String {
        let mut out = format!(
            "node logs in {} (removed at exit; AUTHPROBE_NODE_KEEP=1 keeps them)",
            self.dir.display()
        );
        for log in ["containerd.log", "kubelet.log", "controller-manager.log", "scheduler.log"] {
            if let Ok(text) = fs::read_to_string(self.dir.join(log)) {
                let lines: Vec<&str> = text.lines().collect();
                out.push_str(&format!("\n--- {log} (last 15 lines)\n"));
                out.push_str(&lines[lines.len().saturating_sub(15)..].join("\n"));
            }
        }
        out
    }

    /// Stops the node and its control plane, kills containers and shims, detaches mounts, removes
    /// the run's cgroups and the node's directory. Idempotent.
    pub fn shutdown(&self) {
        let mut p = self.lock();
        for mut child in
            [p.scheduler.take(), p.controller_manager.take(), p.kubelet.take(), p.containerd.take()]
                .into_iter()
                .flatten()
        {
            process::stop(&mut child, STOP_GRACE);
        }
        drop(p);
        // The containers (in the run's cgroups) and their shims outlive containerd.
        let mut leftovers = sandbox::cgroup_pids(&self.run);
        leftovers.extend(sandbox::pids_named("containerd-shim"));
        sandbox::kill_and_wait(&leftovers, STOP_GRACE);
        self.cp.shutdown();
        sandbox::unmount_below(&self.dir);
        sandbox::remove_cgroup(&self.run);
        if std::env::var_os("AUTHPROBE_NODE_KEEP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn check_node_packages() -> Result<()> {
    let paths = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/sbin/runc",
        "/usr/lib/cni/bridge",
        "/usr/lib/cni/host-local",
        "/usr/lib/cni/loopback",
    ];
    for path in paths.map(Path::new) {
        if !path.exists() {
            bail!(
                "{} is missing: run `make node-deps` (containerd, runc, containernetworking-plugins from Debian)",
                path.display()
            );
        }
    }
    Ok(())
}

/// The pods' bridge with the node's address (the CNI bridge plugin adds the pods' veths to it).
fn setup_network() -> Result<()> {
    if sandbox::ip(&["link", "show", BRIDGE]).is_err() {
        sandbox::ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        sandbox::ip(&["addr", "add", &format!("{NODE_IP}/16"), "dev", BRIDGE])?;
        sandbox::ip(&["link", "set", BRIDGE, "up"])?;
    }
    Ok(())
}

fn node_ready() -> impl Condition<KubeNode> {
    |node: Option<&KubeNode>| {
        node.and_then(|n| n.status.as_ref())
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    }
}

/// Waits until `namespace` has its `default` ServiceAccount and `kube-root-ca.crt` ConfigMap.
async fn wait_namespace_ready(client: &Client, namespace: &str) -> Result<()> {
    let wait = async {
        await_condition(
            Api::<ServiceAccount>::namespaced(client.clone(), namespace),
            "default",
            |sa: Option<&ServiceAccount>| sa.is_some(),
        )
        .await?;
        await_condition(
            Api::<ConfigMap>::namespaced(client.clone(), namespace),
            "kube-root-ca.crt",
            |cm: Option<&ConfigMap>| cm.is_some(),
        )
        .await?;
        Ok::<_, anyhow::Error>(())
    };
    tokio::time::timeout(Duration::from_secs(60), wait).await.with_context(|| {
        format!("namespace {namespace}: no default ServiceAccount and kube-root-ca.crt after 60s")
    })?
}

/// Waits until pod `name` has finished (phase Succeeded or Failed) and returns it.
pub async fn wait_pod_finished(
    client: &Client,
    namespace: &str,
    name: &str,
    timeout: Duration,
) -> Result<Pod> {
    let pods = Api::<Pod>::namespaced(client.clone(), namespace);
    let finished = |pod: Option<&Pod>| {
        pod.and_then(|p| p.status.as_ref())
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|phase| phase == "Succeeded" || phase == "Failed")
    };
    match tokio::time::timeout(timeout, await_condition(pods.clone(), name, finished)).await {
        Ok(pod) => pod?.ok_or_else(|| anyhow!("pod {namespace}/{name} was deleted")),
        Err(_) => {
            let status = pods.get_opt(name).await?.and_then(|p| p.status);
            bail!("pod {namespace}/{name} not finished after {timeout:?}: {status:?}")
        }
    }
}

/// The termination message of the pod's first container that wrote one (`/dev/termination-log`).
pub fn termination_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .filter_map(|s| s.state.as_ref()?.terminated.as_ref()?.message.clone())
        .next()
}

/// Accepts connections on `listener` (e.g. one of the host's network namespace, see
/// `local-cluster --node`) and relays each to `target`, until the process exits.
pub fn forward(listener: TcpListener, target: SocketAddr) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(inbound) = conn else { continue };
            std::thread::spawn(move || {
                let Ok(outbound) = TcpStream::connect(target) else { return };
                let (Ok(mut in_r), Ok(mut out_w)) = (inbound.try_clone(), outbound.try_clone()) else {
                    return;
                };
                let up = std::thread::spawn(move || {
                    let _ = copy(&mut in_r, &mut out_w);
                    let _ = out_w.shutdown(std::net::Shutdown::Write);
                });
                let (mut out_r, mut in_w) = (outbound, inbound);
                let _ = copy(&mut out_r, &mut in_w);
                let _ = in_w.shutdown(std::net::Shutdown::Write);
                let _ = up.join();
            });
        }
    });
}

fn copy(from: &mut TcpStream, to: &mut TcpStream) -> std::io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        to.write_all(&buf[..n])?;
    }
}
