use std::{process::ExitCode, sync::Arc};

use authprobe::{
    cli::{Cli, Command, RunArgs},
    controller, http,
    metrics::Metrics,
    telemetry,
};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or_else(|| Command::Run(RunArgs::default())) {
        Command::Crd => match authprobe::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("authprobe: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            telemetry::init(args.log.format);
            match runtime().and_then(|rt| rt.block_on(run(args))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "authprobe stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "authprobe starting");
    let client = kube::Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let google = Arc::new(args.google.connect(metrics.clone())?);
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(false);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let server =
        tokio::spawn(http::serve(args.http_addr, metrics.clone(), ready_rx, stopped(stop_rx.clone())));
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing in-flight probes");
        let _ = stop_tx.send(true);
    });
    let config = controller::Config {
        concurrency: args.concurrency,
        debounce: args.debounce,
        instance: std::env::var("POD_NAME").ok(),
        ..Default::default()
    };
    controller::run(client, google, metrics, config, ready_tx, stopped(stop_rx)).await;
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
