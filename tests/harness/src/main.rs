//! `make cluster`: the test control plane for a person. Prints one `export KUBECONFIG=...` line and
//! keeps etcd and kube-apiserver running until interrupted, then stops them and removes their files.

use std::process::ExitCode;

use authprobe_harness::{ControlPlane, Options};

fn main() -> ExitCode {
    let cp = match ControlPlane::start(Options::default()) {
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
