//! The operator's run lifecycle around the controller: the health and metrics server, signals,
//! leader election, and a shutdown that lets in-flight probes finish, bounded.

pub mod health;
pub mod http;
pub mod leader;
pub mod telemetry;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::sync::watch;

use self::health::Health;
use crate::{
    controller::{self, progress::Progress},
    google::Google,
    metrics::Metrics,
};

/// How the operator runs.
#[derive(Debug)]
pub struct Settings {
    /// Where /healthz, /readyz and /metrics are served.
    pub http_addr: SocketAddr,
    /// The controller's tuning.
    pub controller: controller::Tuning,
    /// Elect one active replica through this Lease; `None`: always active.
    pub lease: Option<leader::LeaseRef>,
    /// On SIGTERM, in-flight probes get this long to finish before the lease is released.
    pub shutdown_timeout: Duration,
}

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs the operator until SIGTERM or Ctrl-C, or until it loses leadership (an error).
pub async fn run(settings: Settings, google: Arc<Google>, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let Settings { http_addr, controller: tuning, lease, shutdown_timeout } = settings;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = option_env!("AUTHPROBE_GIT_COMMIT").unwrap_or("unknown"),
        target = std::env::consts::ARCH,
        leader_elect = lease.is_some(),
        "authprobe starting"
    );
    let client = kube::Client::try_default().await.context("connecting to Kubernetes")?;
    let progress = Arc::new(Progress::default());
    let health = Arc::new(Health::new(lease.is_none(), progress.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let server =
        tokio::spawn(http::serve(http_addr, metrics.clone(), health.clone(), stopped(stop_rx.clone())));
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight probes");
        let _ = stop_tx.send(true);
    });

    let mut leadership = if let Some(lease) = &lease {
        let identity =
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("authprobe-{}", std::process::id()));
        match leader::acquire(client.clone(), lease, &identity, stopped(stop_rx.clone())).await? {
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

    let controller = controller::run(client, google, metrics, tuning, progress, stopped(stop_rx.clone()));
    // In-flight probes finish after SIGTERM, but not for longer than the shutdown timeout.
    let bounded = async {
        tokio::select! {
            () = controller => {}
            () = async { stopped(stop_rx.clone()).await; tokio::time::sleep(shutdown_timeout).await } => {
                tracing::warn!(timeout = ?shutdown_timeout, "in-flight probes did not finish in time");
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
        l.release(Duration::from_secs(5)).await;
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
