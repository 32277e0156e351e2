//! The command line: one engine, several modes.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    google::{
        Google,
        client::{Api, GoogleClient, RetryPolicy},
        credentials::OperatorCredentials,
        endpoints::{Endpoints, Override},
    },
    metrics::Metrics,
};

/// Proves, per namespace, that Kubernetes ServiceAccounts can still become their Google identities.
#[derive(Debug, Parser)]
#[command(name = "authprobe", version, about)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator (the default).
    Run(RunArgs),
    /// Check AuthProbes once against the current kubeconfig. Exit 0: all passing; 1: something
    /// failing; 2: cannot tell (or the spec is invalid).
    Check(CheckArgs),
    /// Print the AuthProbe CRD as YAML (what crds/authprobe.yaml holds).
    Crd,
}

/// `authprobe run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where /healthz, /readyz and /metrics are served.
    #[arg(long, env = "AUTHPROBE_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// Probes reconciled at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: u16,
    /// Quiet time before a burst of Namespace or ServiceAccount changes is reconciled, e.g. 500ms.
    #[arg(long, default_value = "500ms", value_parser = parse_duration)]
    pub debounce: Duration,
    /// Elect one active replica through a Lease; the others wait.
    #[arg(long)]
    pub leader_elect: bool,
    /// Where the Lease lives (default: the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// On SIGTERM, in-flight probes get this long to finish before the lease is released.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Google access.
    #[command(flatten)]
    pub google: GoogleArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
}

impl Default for RunArgs {
    fn default() -> Self {
        Self {
            http_addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            concurrency: 4,
            debounce: Duration::from_millis(500),
            leader_elect: false,
            lease_namespace: std::env::var("POD_NAMESPACE").ok(),
            shutdown_timeout: Duration::from_secs(20),
            google: GoogleArgs::default(),
            log: LogArgs::default(),
        }
    }
}

/// `authprobe check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A file of one or more AuthProbe documents ("-" for standard input).
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// How to print the results.
    #[arg(short, long, value_enum, default_value_t = crate::check::Output::Table)]
    pub output: crate::check::Output,
    /// Google access.
    #[command(flatten)]
    pub google: GoogleArgs,
}

/// How authprobe reaches Google; the same for `run` and `check`.
#[derive(Debug, Args)]
pub struct GoogleArgs {
    /// SERVICE=URL replaces https://SERVICE.googleapis.com (repeatable; plain http only for loopback).
    #[arg(long = "google-endpoint", env = "AUTHPROBE_GOOGLE_ENDPOINTS", value_delimiter = ',')]
    pub endpoints: Vec<Override>,
    /// Use the bearer token in this file (re-read when it changes) instead of Application Default Credentials.
    #[arg(long = "google-access-token-file", env = "AUTHPROBE_GOOGLE_ACCESS_TOKEN_FILE")]
    pub access_token_file: Option<PathBuf>,
    /// Give up retrying a Google request (429, 5xx, broken connections) after this long, e.g. 60s.
    #[arg(long = "google-retry-deadline", default_value = "60s", value_parser = parse_duration)]
    pub retry_deadline: Duration,
}

impl Default for GoogleArgs {
    fn default() -> Self {
        Self { endpoints: vec![], access_token_file: None, retry_deadline: RetryPolicy::default().deadline }
    }
}

impl GoogleArgs {
    /// Google as these arguments describe it.
    pub fn connect(&self, metrics: Arc<Metrics>) -> anyhow::Result<Google> {
        let credentials = match &self.access_token_file {
            Some(path) => OperatorCredentials::file(path.clone()),
            None => OperatorCredentials::adc()?,
        };
        let retry = RetryPolicy { deadline: self.retry_deadline, ..RetryPolicy::default() };
        let client = GoogleClient::new(Arc::new(credentials), retry, metrics)?.with_rate_limits(&[
            Api::GetServiceAccount,
            Api::GetIamPolicy,
            Api::GetPool,
            Api::GetProvider,
            Api::StsToken,
            Api::IdentityBindingToken,
            Api::GenerateAccessToken,
            Api::TestIamPermissions("iam"),
            Api::TestIamPermissions("storage"),
            Api::TestIamPermissions("secretmanager"),
            Api::TestIamPermissions("pubsub"),
            Api::TestIamPermissions("cloudresourcemanager"),
        ]);
        Ok(Google::new(client, Endpoints::new(&self.endpoints)))
    }
}

/// Log output.
#[derive(Debug, Args, Default)]
pub struct LogArgs {
    /// json, compact, or auto (json inside a cluster or when stderr is not a terminal).
    #[arg(long = "log-format", env = "AUTHPROBE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub format: LogFormat,
}

/// Log formats.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// json inside a cluster or when stderr is not a terminal, compact otherwise.
    #[default]
    Auto,
    /// One JSON object per line.
    Json,
    /// Human-readable.
    Compact,
}

/// Go/Kubernetes-style durations (`500ms`, `90s`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: kube::core::Duration = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_negative() {
        return Err(format!("{s:?} is negative"));
    }
    Ok(d.into())
}
