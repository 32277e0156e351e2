//! The operator's run lifecycle around the controller: the health and metrics server, signals,
//! leader election, and a shutdown that lets in-flight probes finish, bounded.

pub mod health;
pub mod http;
pub mod leader;
pub mod telemetry;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::sync::watch;

use self::health::Health;
use crate::{
    controller::{self, progress::Progress},
    fence::Fence,
    google::Google,
    metrics::Metrics,
    probe::endpoint::EndpointProber,
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

/// Runs the operator until SIGTERM or Ctrl-C. With leader election the controller runs from the
/// start (its caches warm) but acts only while this replica leads; a term that ends (lost, or
/// expired while the API server was away) makes it a standby again, never stops the process.
pub async fn run(
    settings: Settings,
    google: Arc<Google>,
    endpoints: EndpointProber,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let Settings { http_addr, controller: tuning, lease, shutdown_timeout } = settings;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        commit = option_env!("AUTHPROBE_GIT_COMMIT").unwrap_or("unknown"),
        target = std::env::consts::ARCH,
        leader_elect = lease.is_some(),
        "authprobe starting"
    );
    let clients = controller::Clients::connect().await?;
    let fence = Arc::new(if lease.is_some() { Fence::standby() } else { Fence::always() });
    let progress = Arc::new(Progress::new(tuning.stuck_after));
    let health = Arc::new(Health::new(fence.clone(), progress.clone()));
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = tokio::spawn(http::serve(http_addr, metrics.clone(), health, stopped(stop_rx.clone())));
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight probes");
        let _ = stop_tx.send(true);
    });

    let controller = controller::run(
        clients.clone(),
        google,
        endpoints,
        metrics,
        tuning,
        progress,
        fence.clone(),
        stopped(stop_rx.clone()),
    );
    // In-flight probes finish after SIGTERM, but not for longer than the shutdown timeout.
    let bounded = async {
        tokio::select! {
            () = controller => {}
            () = async { stopped(stop_rx.clone()).await; tokio::time::sleep(shutdown_timeout).await } => {
                tracing::warn!(timeout = ?shutdown_timeout, "in-flight probes did not finish in time");
            }
        }
    };
    match &lease {
        Some(lease) => {
            let identity =
                std::env::var("POD_NAME").unwrap_or_else(|_| format!("authprobe-{}", std::process::id()));
            let elect = elect(clients.call, lease, &identity, fence, stop_rx.clone());
            // The election ends at shutdown, with the lease held or not; the controller finishes
            // its in-flight probes first, then the lease is released.
            let (held, ()) = tokio::join!(elect, bounded);
            if let Some(leadership) = held {
                leadership.release(Duration::from_secs(5)).await;
            }
        }
        None => bounded.await,
    }
    server.await??;
    tracing::info!("authprobe stopped");
    Ok(())
}

/// Campaigns, leads and campaigns again whenever a term ends, until shutdown; returns the
/// leadership held then, to be released once in-flight probes finished.
async fn elect(
    client: kube::Client,
    lease: &leader::LeaseRef,
    identity: &str,
    fence: Arc<Fence>,
    stop: watch::Receiver<bool>,
) -> Option<leader::Leadership> {
    loop {
        let mut leadership =
            leader::acquire(client.clone(), lease, identity, fence.clone(), stopped(stop.clone())).await?;
        tokio::select! {
            ended = leadership.ended() => tracing::warn!(reason = %ended, "leadership ended: standing by"),
            () = stopped(stop.clone()) => return Some(leadership),
        }
    }
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
