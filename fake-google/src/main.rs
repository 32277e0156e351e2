//! `fake-google --scenario FILE [--listen 127.0.0.1:PORT]`: serves the fake until interrupted and
//! prints the `AUTHPROBE_GOOGLE_ENDPOINTS` value that points authprobe at it.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use fake_google::Scenario;

#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    scenario: Option<PathBuf>,
}

fn args() -> anyhow::Result<Args> {
    let mut args = Args { listen: SocketAddr::from(([127, 0, 0, 1], 0)), scenario: None };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--listen" => args.listen = it.next().context("--listen needs ADDR")?.parse()?,
            "--scenario" => args.scenario = Some(it.next().context("--scenario needs FILE")?.into()),
            other => anyhow::bail!(
                "unknown argument {other:?}; usage: fake-google [--listen 127.0.0.1:PORT] [--scenario FILE]"
            ),
        }
    }
    Ok(args)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).init();
    match serve().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-google: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve() -> anyhow::Result<()> {
    let args = args()?;
    let scenario: Scenario = match &args.scenario {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Scenario::default(),
    };
    let running = fake_google::start(args.listen, scenario).await?;
    println!("AUTHPROBE_GOOGLE_ENDPOINTS={}", running.endpoints());
    eprintln!("fake-google: listening on http://{} (admin API under /admin)", running.addr);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {},
    }
    Ok(())
}
