use std::{process::ExitCode, sync::Arc};

use anyhow::Context as _;
use authprobe::{
    cli::{CheckArgs, Cli, Command, RunArgs},
    controller,
    health::{Health, Role},
    http, leader,
    metrics::Metrics,
    telemetry,
};
use clap::Parser;
use tokio::sync::watch;

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
        Command::Check(args) => {
            telemetry::init(authprobe::cli::LogFormat::Compact);
            match runtime().and_then(|rt| rt.block_on(check(args))) {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("authprobe check: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
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

/// Resolves once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// `authprobe check`: prints the results and returns the exit code.
async fn check(args: CheckArgs) -> anyhow::Result<u8> {
    use authprobe::check;
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(&args.file).with_context(|| format!("reading {}", args.file.display()))?
    };
    let probes = check::parse_probes(&text).map_err(|e| anyhow::anyhow!("{}: {e}", args.file.display()))?;
    let client = kube::Client::try_default().await.context("connecting to Kubernetes")?;
    let metrics = Arc::new(Metrics::new());
    let google = Arc::new(args.google.connect(metrics.clone())?);
    let mut results = Vec::new();
    for probe in &probes {
        results.push(check::check(&client, google.clone(), metrics.clone(), probe).await?);
    }
    print!("{}", check::render(&results, args.output));
    Ok(check::overall(&results))
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
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
