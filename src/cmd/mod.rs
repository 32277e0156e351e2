//! The command line, the only room that may import every other: `run` (the operator, also the
//! default), `check` (one pass for CI), `crd` and `canary` (inside the canary Job's pod).

pub mod canary;
pub mod check;

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use crate::{
    controller,
    engine::stage::endpoint::{AllowedHost, EndpointAllow},
    google::{
        Google,
        client::{Api, GoogleClient, RetryPolicy, exchange_budget, parse_quota_share},
        credentials::OperatorCredentials,
        endpoints::{Endpoints, Override},
    },
    metrics::Metrics,
    probe::endpoint::{EndpointProber, PASS_WAIT},
    runtime::{
        self,
        leader::{DEFAULT_LEASE_NAME, LeaseRef},
        telemetry::{self, LogFormat},
    },
};

/// Proves, per namespace, that Kubernetes ServiceAccounts can still become their Google identities.
#[derive(Debug, Parser)]
#[command(name = "authprobe", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// `run`'s flags, for a bare `authprobe`: it behaves exactly like `authprobe run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The modes.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the operator (the default).
    Run(RunArgs),
    /// Check AuthProbes once against the current kubeconfig. Exit 0: all passing; 1: something
    /// failing; 2: cannot tell (or the spec is invalid).
    Check(check::CheckArgs),
    /// Print the AuthProbe CRD as YAML (what crds/authprobe.yaml holds).
    Crd,
    /// Inside a canary Job's pod: time the first Google token through Application Default
    /// Credentials and report it as JSON in the termination message. Exit 0: a token came.
    Canary(canary::CanaryArgs),
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
    /// The Lease's name (the chart derives it from the release name).
    #[arg(long, env = "AUTHPROBE_LEASE_NAME", default_value = DEFAULT_LEASE_NAME)]
    pub lease_name: String,
    /// A probe pass is abandoned (and retried with backoff) after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub pass_deadline: Duration,
    /// /healthz fails when probe passes are attempted this long without one completing.
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    pub stuck_after: Duration,
    /// The image of canary Jobs (spec.canary), normally the operator's own; unset: no canaries,
    /// and a probe that enables one is InvalidSpec.
    #[arg(long, env = "AUTHPROBE_CANARY_IMAGE")]
    pub canary_image: Option<String>,
    /// On SIGTERM, in-flight probes get this long to finish before the lease is released.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// Google access.
    #[command(flatten)]
    pub google: GoogleArgs,
    /// Where `spec.endpoints` may send tokens.
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    /// Logging.
    #[command(flatten)]
    pub log: LogArgs,
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
    /// Cap each Google API's call rate at this share of its default per-project quota, in (0, 1]
    /// (STS exchanges: 6,000/min; generateAccessToken: 60,000/min); the rest is the workloads'.
    #[arg(
        long = "google-quota-share",
        env = "AUTHPROBE_GOOGLE_QUOTA_SHARE",
        default_value = "0.5",
        value_parser = parse_quota_share
    )]
    pub quota_share: f64,
}

impl GoogleArgs {
    /// Google as these arguments describe it.
    pub fn connect(&self, metrics: Arc<Metrics>) -> anyhow::Result<Google> {
        let credentials = match &self.access_token_file {
            Some(path) => OperatorCredentials::file(path.clone()),
            None => OperatorCredentials::adc()?,
        };
        let retry = RetryPolicy { deadline: self.retry_deadline, ..RetryPolicy::default() };
        let client = GoogleClient::new(Arc::new(credentials), retry, metrics)?.with_rate_limits(
            &[
                Api::GetServiceAccount,
                Api::GetIamPolicy,
                Api::GetPool,
                Api::GetProvider,
                Api::StsToken,
                Api::IdentityBindingToken,
                Api::GenerateAccessToken,
                Api::GenerateIdToken,
                Api::GetRunService,
                Api::TestIamPermissions("iam"),
                Api::TestIamPermissions("storage"),
                Api::TestIamPermissions("secretmanager"),
                Api::TestIamPermissions("pubsub"),
                Api::TestIamPermissions("cloudresourcemanager"),
                Api::TestIamPermissions("run"),
            ],
            self.quota_share,
        );
        Ok(Google::new(client, Endpoints::new(&self.endpoints)))
    }
}

/// Where `spec.endpoints` may send tokens; the same for `run` and `check`.
#[derive(Debug, Args)]
pub struct EndpointArgs {
    /// HOST, HOST:PORT, or http://HOST[:PORT] to allow plain http, that spec.endpoints may send a
    /// workload's token to (repeatable; none by default: a spec naming another host is InvalidSpec).
    /// Plain http is allowed to loopback hosts without the http:// form.
    #[arg(long = "endpoint-allow", env = "AUTHPROBE_ENDPOINT_ALLOW", value_delimiter = ',')]
    pub allow: Vec<AllowedHost>,
}

impl EndpointArgs {
    /// A prober sending tokens only to the allowed hosts; passes wait `wait` for each endpoint.
    pub fn prober(&self, metrics: Arc<Metrics>, wait: Duration) -> anyhow::Result<EndpointProber> {
        Ok(EndpointProber::new(EndpointAllow::new(self.allow.clone()), metrics, wait)?)
    }
}

/// Log output.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// json, compact, or auto (json inside a cluster or when stderr is not a terminal).
    #[arg(long = "log-format", env = "AUTHPROBE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Auto)]
    pub format: LogFormat,
}

/// Go/Kubernetes-style durations (`500ms`, `90s`, `1h30m`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: kube::core::Duration = s.parse().map_err(|e| format!("{s:?}: {e}"))?;
    if d.is_negative() {
        return Err(format!("{s:?} is negative"));
    }
    Ok(d.into())
}

impl RunArgs {
    /// The runtime's settings; the Lease needs a namespace when electing a leader.
    fn settings(&self) -> anyhow::Result<runtime::Settings> {
        let lease = if self.leader_elect {
            let namespace = self
                .lease_namespace
                .clone()
                .context("--leader-elect needs --lease-namespace (or POD_NAMESPACE)")?;
            Some(LeaseRef { namespace, name: self.lease_name.clone() })
        } else {
            None
        };
        Ok(runtime::Settings {
            http_addr: self.http_addr,
            controller: controller::Tuning {
                concurrency: self.concurrency,
                debounce: self.debounce,
                instance: std::env::var("POD_NAME").ok(),
                pass_deadline: self.pass_deadline,
                stuck_after: self.stuck_after,
                // Probes reconciled at once share the quota: each pass stays near ten seconds.
                exchange_budget: (exchange_budget(self.google.quota_share)
                    / usize::from(self.concurrency.max(1)))
                .max(1),
                canary_image: self.canary_image.clone(),
                ..Default::default()
            },
            lease,
            shutdown_timeout: self.shutdown_timeout,
        })
    }
}

/// Parses the command line and runs what it asks for. A command line that does not parse exits
/// with [`check::exit::USAGE`] (3): 2 means "cannot tell" for `authprobe check`.
pub fn main() -> ExitCode {
    let started = std::time::Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(check::exit::USAGE),
            };
        }
    };
    match cli.command {
        Some(Command::Crd) => match crate::api::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("authprobe: cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Command::Check(args)) => {
            telemetry::init(LogFormat::Compact);
            let checked = match tokio_runtime() {
                Ok(rt) => rt.block_on(check::run(args)),
                Err(e) => Err(check::CheckError::Unavailable(e)),
            };
            match checked {
                Ok(code) => ExitCode::from(code),
                Err(e) => {
                    eprintln!("authprobe check: {e:#}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Some(Command::Canary(args)) => canary::run(&args, started),
        Some(Command::Run(args)) => run(&args),
        None => run(&cli.run),
    }
}

fn run(args: &RunArgs) -> ExitCode {
    telemetry::init(args.log.format);
    let started = args.settings().and_then(|settings| {
        tokio_runtime()?.block_on(async {
            let metrics = Arc::new(Metrics::new());
            let google = Arc::new(args.google.connect(metrics.clone())?);
            let endpoints = args.endpoints.prober(metrics.clone(), PASS_WAIT)?;
            runtime::run(settings, google, endpoints, metrics).await
        })
    });
    match started {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "authprobe stopped");
            ExitCode::FAILURE
        }
    }
}

fn tokio_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}
