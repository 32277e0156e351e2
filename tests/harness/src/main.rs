//! `make cluster`: the test control plane for a person. Prints one `export KUBECONFIG=...` line and
//! keeps etcd and kube-apiserver running until interrupted, then stops them and removes their files.
//! `--no-crds` leaves the AuthProbe CRD for the caller to install.
//!
//! `--node` (`make cluster NODE=1`) adds a node that runs pods (see the harness's `node` module):
//! this program re-executes itself inside the node's own network, mount and PID namespaces, and
//! relays a port on the host's 127.0.0.1 to the API server inside, so the printed kubeconfig works
//! from an ordinary shell. Ctrl-C ends the namespaces, and with them every process, mount and
//! network device of the run; the outer process then removes its cgroups and files.

use std::process::ExitCode;

use authprobe_harness::{
    ControlPlane, Options,
    node::{self, Node},
};

fn main() -> ExitCode {
    let mut install_crds = true;
    let mut with_node = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--no-crds" => install_crds = false,
            "--node" => with_node = true,
            other => {
                eprintln!(
                    "local-cluster: unknown argument {other:?}; usage: local-cluster [--no-crds] [--node]"
                );
                return ExitCode::FAILURE;
            }
        }
    }
    let options = Options { install_crds, ..Options::default() };
    if with_node { run_node(options) } else { run_control_plane(options) }
}

fn run_control_plane(options: Options) -> ExitCode {
    let cp = match ControlPlane::start(options) {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("local-cluster: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("export KUBECONFIG={}", cp.kubeconfig_path().display());
    eprintln!("local-cluster: kube-apiserver at {}; Ctrl-C stops it", cp.server_url());
    let waited = wait_for_signal();
    drop(cp);
    finish(waited)
}

fn run_node(options: Options) -> ExitCode {
    if !node::inside() {
        // The host's end of the relay to the API server, handed down to the re-executed process.
        let listener = match std::net::TcpListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(e) => {
                eprintln!("local-cluster: {e}");
                return ExitCode::FAILURE;
            }
        };
        // Does not return: exits with the re-executed process's status.
        if let Err(e) = node::enter(Some(&listener)) {
            eprintln!("local-cluster: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let started = Node::start(options).and_then(|node| {
        let listener = node::host_listener().ok_or_else(|| anyhow::anyhow!("no listener from the host"))?;
        let host_port = listener.local_addr()?.port();
        node::forward(listener, std::net::SocketAddr::from(([127, 0, 0, 1], node.api_port())));
        let kubeconfig = node.node_dir().join("kubeconfig-host");
        node.write_admin_kubeconfig(&kubeconfig, &format!("https://127.0.0.1:{host_port}"))?;
        Ok((node, kubeconfig, host_port))
    });
    let (node, kubeconfig, host_port) = match started {
        Ok(n) => n,
        Err(e) => {
            eprintln!("local-cluster: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("export KUBECONFIG={}", kubeconfig.display());
    eprintln!(
        "local-cluster: node {} Ready in {:.1}s; kube-apiserver at https://127.0.0.1:{host_port} (relayed into the \
         node's network namespace, where it is https://{}); no kube-proxy, no DNS; Ctrl-C stops everything",
        node::NODE_NAME,
        node.startup_time().as_secs_f64(),
        node.api_address(),
    );
    let waited = wait_for_signal();
    drop(node);
    finish(waited)
}

fn wait_for_signal() -> std::io::Result<std::io::Result<()>> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| {
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r,
                _ = term.recv() => Ok(()),
            }
        })
    })
}

fn finish(waited: std::io::Result<std::io::Result<()>>) -> ExitCode {
    match waited {
        Ok(Ok(())) => {
            eprintln!("local-cluster: stopped");
            ExitCode::SUCCESS
        }
        Ok(Err(e)) | Err(e) => {
            eprintln!("local-cluster: {e}");
            ExitCode::FAILURE
        }
    }
}
