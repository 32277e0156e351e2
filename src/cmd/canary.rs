//! `authprobe canary`: the pod's own first token, run by the canary Job as the workload's
//! ServiceAccount with the workload's credential environment. It resolves Application Default
//! Credentials in google-auth's order ([`canary::resolve`]: `GOOGLE_APPLICATION_CREDENTIALS`,
//! gcloud's well-known file under `CLOUDSDK_CONFIG` or `$HOME/.config/gcloud`, the metadata server
//! at `GCE_METADATA_HOST`), asks that source for a token the way google-cloud-auth does, each
//! attempt bounded by the libraries' 3 s metadata timeout, until one comes or 60 s after the
//! container started (the canary is its container's entrypoint: its process start is the
//! container's), fingerprints the credential (see [`canary`]'s documentation), writes the JSON
//! [`Report`] to its termination message and stdout, and exits 0 with a token, 1 without.
//!
//! google-cloud-auth loads and uses each credential type; written here is only what it does not
//! expose: which source ADC picks (its lookup is private, and it ignores `CLOUDSDK_CONFIG`), the
//! per-attempt timeout (its metadata client has none), the polling and timing. Tokens live in
//! memory only: none is printed, logged or written.

use std::{
    future::Future,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::Args;
use google_cloud_auth::credentials::{
    AccessTokenCredentials, external_account, external_account_authorized_user, idtoken, impersonated, mds,
    service_account, user_account,
};
use serde_json::Value;
use tokio::time::Instant;

use crate::engine::canary::{
    self, ATTEMPT_TIMEOUT, AdcEnv, DEADLINE, FingerprintOf, Report, Resolved, Source, TokenType,
};

/// `authprobe canary`.
#[derive(Debug, Args)]
pub struct CanaryArgs {
    /// Where the report goes (the container's terminationMessagePath).
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

/// At most this many token requests, however fast they fail.
const MAX_ATTEMPTS: u32 = 600;
/// After a failed (not timed-out) attempt, wait this long, doubling up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// The ID token for the fingerprint is asked for at most this often, once a token came.
const ID_TOKEN_ATTEMPTS: u32 = 3;

/// How long the canary waits: one attempt, and in all after its start.
#[derive(Clone, Copy, Debug)]
struct Limits {
    attempt: Duration,
    deadline: Duration,
}

/// The contract's: the libraries' 3 s metadata timeout, 60 s in all.
const LIMITS: Limits = Limits { attempt: ATTEMPT_TIMEOUT, deadline: DEADLINE };

/// Runs the canary; `started` is when the process started.
pub fn run(args: &CanaryArgs, started: std::time::Instant) -> ExitCode {
    let env = AdcEnv::from_lookup(|name| std::env::var(name).ok());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let report = match runtime {
        Ok(rt) => rt.block_on(canary(&env, LIMITS, Instant::from_std(started))),
        Err(e) => {
            eprintln!("authprobe canary: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let message = report.to_message();
    println!("{message}");
    if let Err(e) = std::fs::write(&args.termination_log, &message) {
        eprintln!("authprobe canary: cannot write {}: {e}", args.termination_log.display());
    }
    if report.first_token_ms.is_some() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
}

async fn canary(env: &AdcEnv, limits: Limits, started: Instant) -> Report {
    let mut report = Report::new(Source::MetadataServer);
    match canary::resolve(env, Path::is_file) {
        Resolved::MetadataServer { host } => {
            metadata_server(&mut report, &host, limits, started).await;
            report.metadata_host = Some(host);
        }
        Resolved::File { source, path } => {
            report.source = source;
            report.path = Some(path.display().to_string());
            credential_file(&mut report, &path, limits, started).await;
        }
    }
    report
}

/// The metadata server at `host` (what google-cloud-auth itself takes from `GCE_METADATA_HOST`,
/// or its default): the first access token, then the ID token for the fingerprint.
async fn metadata_server(report: &mut Report, host: &str, limits: Limits, started: Instant) {
    let endpoint = format!("http://{host}");
    let polled = poll(started, limits, MAX_ATTEMPTS, true, || async {
        let credentials = mds::Builder::default()
            .with_endpoint(&endpoint)
            .build_access_token_credentials()
            .map_err(|e| e.to_string())?;
        access_token(&credentials).await
    })
    .await;
    report.attempts = polled.attempts;
    if !took(report, polled) {
        return;
    }
    let id = poll(Instant::now(), limits, ID_TOKEN_ATTEMPTS, true, || async {
        let credentials = idtoken::mds::Builder::new(canary::AUDIENCE)
            .with_endpoint(&endpoint)
            .build()
            .map_err(|e| e.to_string())?;
        credentials.id_token().await.map_err(|e| describe(&e))
    })
    .await;
    match id.token.map(|(token, _)| canary::jwt_fingerprint(&token)) {
        Some(Ok(fp)) => {
            report.fingerprint = Some(fp);
            report.fingerprint_of = Some(FingerprintOf::IdToken);
        }
        Some(Err(e)) => report.error = Some(format!("the metadata server's ID token: {e}")),
        None => report.error = id.error.map(|e| format!("no ID token from the metadata server: {e}")),
    }
}

/// A credential file: loaded by google-cloud-auth's builder for its `type`.
async fn credential_file(report: &mut Report, path: &Path, limits: Limits, started: Instant) {
    let json = match std::fs::read_to_string(path) {
        Ok(text) => match serde_json::from_str::<Value>(&text) {
            Ok(json) => json,
            Err(e) => {
                report.error = Some(format!("{} is not JSON: {e}", path.display()));
                return;
            }
        },
        Err(e) => {
            report.error = Some(format!("cannot read {}: {e}", path.display()));
            return;
        }
    };
    let kind = json.get("type").and_then(Value::as_str).unwrap_or_default().to_string();
    report.credential_type = Some(kind.clone());
    match kind.as_str() {
        "service_account" => {
            report.fingerprint = canary::service_account_key_fingerprint(&json);
            report.fingerprint_of = report.fingerprint.as_ref().map(|_| FingerprintOf::ServiceAccountKey);
        }
        "external_account" => match subject_token_fingerprint(&json) {
            Ok(fp) => {
                report.fingerprint = Some(fp);
                report.fingerprint_of = Some(FingerprintOf::SubjectToken);
            }
            Err(e) => report.error = Some(e),
        },
        _ => {}
    }
    let polled = poll(started, limits, MAX_ATTEMPTS, false, || {
        let json = json.clone();
        let kind = kind.clone();
        async move { access_token(&load(&kind, json)?).await }
    })
    .await;
    report.attempts = polled.attempts;
    took(report, polled);
}

/// google-cloud-auth's credentials for a file of type `kind`.
fn load(kind: &str, json: Value) -> Result<AccessTokenCredentials, Attempt> {
    let built = match kind {
        "service_account" => service_account::Builder::new(json).build_access_token_credentials(),
        "authorized_user" => user_account::Builder::new(json).build_access_token_credentials(),
        "external_account" => external_account::Builder::new(json).build_access_token_credentials(),
        "impersonated_service_account" => impersonated::Builder::new(json).build_access_token_credentials(),
        "external_account_authorized_user" => {
            external_account_authorized_user::Builder::new(json).build_access_token_credentials()
        }
        other => return Err(Attempt::fatal(format!("unsupported credential type {other:?}"))),
    };
    built.map_err(|e| Attempt::fatal(e.to_string()))
}

/// The fingerprint of the subject token an `external_account` file's `credential_source.file`
/// names (`format.type` text, or json with `subject_token_field_name`).
fn subject_token_fingerprint(config: &Value) -> Result<String, String> {
    let source = &config["credential_source"];
    let file = source["file"]
        .as_str()
        .ok_or("no fingerprint: the configuration's credential_source is not a file")?;
    let text =
        std::fs::read_to_string(file).map_err(|e| format!("cannot read the subject token {file}: {e}"))?;
    let token = match source["format"]["type"].as_str() {
        Some("json") => {
            let field = source["format"]["subject_token_field_name"].as_str().unwrap_or_default();
            let json: Value =
                serde_json::from_str(&text).map_err(|_| format!("the subject token {file} is not JSON"))?;
            json[field]
                .as_str()
                .ok_or(format!("the subject token {file} has no field {field:?}"))?
                .to_string()
        }
        _ => text,
    };
    canary::jwt_fingerprint(&token).map_err(|e| format!("the subject token {file}: {e}"))
}

/// One failed attempt; `fatal` ones are not retried (a file that cannot be loaded).
struct Attempt {
    message: String,
    transient: bool,
}

impl Attempt {
    fn fatal(message: String) -> Self {
        Self { message, transient: false }
    }
}

impl From<String> for Attempt {
    fn from(message: String) -> Self {
        Self { message, transient: true }
    }
}

async fn access_token(credentials: &AccessTokenCredentials) -> Result<String, Attempt> {
    credentials
        .access_token()
        .await
        .map(|t| t.token)
        .map_err(|e| Attempt { message: describe(&e), transient: e.is_transient() })
}

/// An error with its causes: the library's own text says little ("transient errors") without them.
fn describe(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    for _ in 0..8 {
        let Some(c) = cause else { break };
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

struct Polled {
    /// The token and when it came, after `started`.
    token: Option<(String, Duration)>,
    attempts: u32,
    error: Option<String>,
}

/// Asks `fetch` until it gives a token, each attempt bounded by `limits.attempt`, at most
/// `max_attempts` times and until `limits.deadline` after `started`. `retry_all`: retry errors
/// the library calls permanent too (a metadata server that is still starting answers anything).
async fn poll<F, Fut, E>(
    started: Instant,
    limits: Limits,
    max_attempts: u32,
    retry_all: bool,
    mut fetch: F,
) -> Polled
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<String, E>>,
    E: Into<Attempt>,
{
    let deadline = started + limits.deadline;
    let mut polled = Polled { token: None, attempts: 0, error: None };
    let mut pause = FIRST_PAUSE;
    while polled.attempts < max_attempts {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        polled.attempts += 1;
        let budget = limits.attempt.min(deadline - now);
        match tokio::time::timeout(budget, fetch()).await {
            Ok(Ok(token)) => {
                polled.token = Some((token, started.elapsed()));
                polled.error = None;
                break;
            }
            Ok(Err(e)) => {
                let e: Attempt = e.into();
                polled.error = Some(e.message);
                if !(e.transient || retry_all) {
                    break;
                }
                tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
                pause = (pause * 2).min(MAX_PAUSE);
            }
            Err(_) => polled.error = Some(format!("no answer within {:.1}s", budget.as_secs_f64())),
        }
    }
    polled
}

/// Records the first token's timing and shape (the token itself goes); whether there was one.
fn took(report: &mut Report, polled: Polled) -> bool {
    let Some((token, after)) = polled.token else {
        report.error = polled.error.or(Some("no token by the deadline".to_string()));
        return false;
    };
    report.first_token_ms = Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
    report.token_type = Some(TokenType::of(&token));
    true
}

#[cfg(test)]
mod tests;
