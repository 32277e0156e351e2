//! `make cluster`: the test control plane for a person. Prints one `export KUBECONFIG=...` line and
//! keeps etcd and kube-apiserver running until interrupted, then stops them and removes their files.
//! `--no-crds` leaves the AuthProbe CRD for the caller to install.

use std::process::ExitCode;

use authprobe_harness::{ControlPlane, Options};

fn main() -> ExitCode {
    let install_crds = match std::env::args().nth(1).as_deref() {
        None => true,
        Some("--no-crds") => false,
        Some(other) => {
            eprintln!("local-cluster: unknown argument {other:?}; usage: local-cluster [--no-crds]");
            return ExitCode::FAILURE;
        }
    };
    let cp = match ControlPlane::start(Options { install_crds, ..Options::default() }) {
        Ok(cp) => cp,
        Err(e) => {
            eprintln!("local-cluster: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    println!("export KUBECONFIG={}", cp.kubeconfig_path().display());
    eprintln!("local-cluster: kube-apiserver at {}; Ctrl-C stops it", cp.server_url());
    let waited = tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| {
        rt.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                r = tokio::signal::ctrl_c() => r,
                _ = term.recv() => Ok(()),
            }
        })
    });
    drop(cp);
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
