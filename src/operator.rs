//! `authprobe run`: the operator's lifecycle around the controller: the health and metrics
//! server, signals, leader election, and a shutdown that lets in-flight probes finish, bounded.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::sync::watch;

use crate::{
    cli::RunArgs,
    controller,
    health::{Health, Role},
    http, leader,
    metrics::Metrics,
};

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs the operator until SIGTERM or Ctrl-C, or until it loses leadership (an error).
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = option_env!("AUTHPROBE_GIT_COMMIT").unwrap_or("unknown"),
        target = std::env::consts::ARCH,
        leader_elect = args.leader_elect,
        "authprobe starting"
    );
    let client = kube::Client::try_default().await.context("connecting to Kubernetes")?;
    let metrics = Arc::new(Metrics::new());
    let google = Arc::new(args.google.connect(metrics.clone())?);
    let health = Arc::new(Health::new(if args.leader_elect { Role::Standby } else { Role::Active }));
    let (stop_tx, stop_rx) = watch::channel(false);
    let server =
        tokio::spawn(http::serve(args.http_addr, metrics.clone(), health.clone(), stopped(stop_rx.clone())));
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight probes");
        let _ = stop_tx.send(true);
    });

    let mut leadership = if args.leader_elect {
        let namespace = args
            .lease_namespace
            .as_deref()
            .context("--leader-elect needs --lease-namespace (or POD_NAMESPACE)")?;
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("authprobe-{}", std::process::id()));
        match leader::acquire(client.clone(), namespace, &identity, stopped(stop_rx.clone())).await? {
            Some(l) => Some(l),
            None => {
                server.await??;
                return Ok(());
            }
        }
    } else {
        None
    };
    health.activate();

    let config = controller::Config {
        concurrency: args.concurrency,
        debounce: args.debounce,
        instance: std::env::var("POD_NAME").ok(),
        ..Default::default()
    };
    let controller = controller::run(client, google, metrics, config, health, stopped(stop_rx.clone()));
    // In-flight probes finish after SIGTERM, but not for longer than the shutdown timeout.
    let bounded = async {
        tokio::select! {
            () = controller => {}
            () = async { stopped(stop_rx.clone()).await; tokio::time::sleep(args.shutdown_timeout).await } => {
                tracing::warn!(timeout = ?args.shutdown_timeout, "in-flight probes did not finish in time");
            }
        }
    };
    match &mut leadership {
        Some(l) => {
            tokio::select! {
                () = bounded => {}
                lost = l.lost() => return Err(lost).context("leadership ended; stopping so only the leader acts"),
            }
        }
        None => bounded.await,
    }
    if let Some(l) = leadership {
        l.release(std::time::Duration::from_secs(5)).await;
    }
    server.await??;
    tracing::info!("authprobe stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
}
