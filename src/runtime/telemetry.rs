//! Logs: JSON inside a cluster, compact on a terminal, filtered by `RUST_LOG` (default `info`).

use std::io::IsTerminal as _;

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// json inside a cluster or when stderr is not a terminal, compact otherwise.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Compact,
}

/// Installs the global subscriber. Client request tracing stays off below `debug` for kube, and
/// never logs headers, so tokens cannot leak through it.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Compact => false,
        LogFormat::Auto => {
            std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() || !std::io::stderr().is_terminal()
        }
    };
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(
                fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry.with(fmt::layer().compact().with_writer(std::io::stderr)).try_init()
    };
    if let Err(e) = installed {
        eprintln!("authprobe: logging already initialised: {e}");
    }
}
