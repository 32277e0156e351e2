//! `authprobe check -f PROBE.yaml`: one pass of the same checks against the current kubeconfig,
//! for CI pipelines and pre-deploy gates. Exit 0: all passing; 1: something failing; 2: cannot tell.

use std::{fmt::Write as _, sync::Arc};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment, StatefulSet},
        batch::v1::{CronJob, Job},
        core::v1::{Pod, ServiceAccount},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, ObjectList},
};
use serde::Serialize;

use super::{EndpointArgs, GoogleArgs};
use crate::{
    api::{AuthProbe, condition},
    controller::Clients,
    controller::{
        inventory::{MetaView, NamespaceMeta, ServiceAccountMeta},
        workloads::Workloads,
    },
    engine::{
        Plan, Selection, Verdict,
        report::{KsaOutcome, Report, Status},
        workload::{Lean, LeanKind, prune},
    },
    fence::Fence,
    google::Google,
    metrics::Metrics,
    probe::{
        self, Pass, Services,
        config_maps::ConfigMaps,
        endpoint::{CHECK_DEADLINE, EndpointProber},
        exchange::Chain,
        issuer::ClusterIssuers,
    },
};

/// Objects listed per request.
const PAGE: u32 = 500;
/// A list stops after this many pages (5 million objects).
const MAX_PAGES: usize = 10_000;

/// `authprobe check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// A file of one or more AuthProbe documents ("-" for standard input).
    #[arg(short = 'f', long = "filename")]
    pub file: std::path::PathBuf,
    /// How to print the results.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The kubeconfig to use (default: KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Google access.
    #[command(flatten)]
    pub google: GoogleArgs,
    /// Where `spec.endpoints` may send tokens.
    #[command(flatten)]
    pub endpoints: EndpointArgs,
}

/// Exit codes of `authprobe check`.
pub mod exit {
    /// Everything passed.
    pub const PASSING: u8 = 0;
    /// Something is definitely failing.
    pub const FAILING: u8 = 1;
    /// authprobe cannot tell (Google or the cluster unreachable, its own access refused, an
    /// invalid spec, a failure within its propagation grace).
    pub const CANNOT_TELL: u8 = 2;
    /// The command line or the file is wrong: nothing was checked.
    pub const USAGE: u8 = 3;
}

/// Why `authprobe check` could not produce a verdict.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The command line or the file is wrong.
    #[error("{0}")]
    Input(String),
    /// The cluster or Google could not be asked.
    #[error(transparent)]
    Unavailable(#[from] anyhow::Error),
}

impl CheckError {
    /// The exit code this error ends the command with.
    pub fn exit_code(&self) -> u8 {
        match self {
            CheckError::Input(_) => exit::USAGE,
            CheckError::Unavailable(_) => exit::CANNOT_TELL,
        }
    }
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A table for people.
    Table,
    /// One JSON document.
    Json,
    /// One YAML document (the JSON output's structure).
    Yaml,
    /// JUnit XML: a test case per ServiceAccount.
    Junit,
}

/// The outcome of checking one probe.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Checked {
    /// The probe's name.
    pub probe: String,
    /// 0, 1 or 2.
    pub exit_code: u8,
    /// The conditions the operator would write.
    pub conditions: Vec<ConditionOut>,
    /// Counts.
    pub summary: crate::api::Summary,
    /// Every checked ServiceAccount.
    pub results: Vec<ResultOut>,
}

/// A condition.
#[derive(Debug, Serialize)]
pub struct ConditionOut {
    /// Type.
    #[serde(rename = "type")]
    pub type_: String,
    /// True, False or Unknown.
    pub status: String,
    /// Reason.
    pub reason: String,
    /// Message.
    pub message: String,
}

/// One ServiceAccount's result.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultOut {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub service_account: String,
    /// passing, failing or unknown.
    pub result: &'static str,
    /// The stage that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// The reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The message with its fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Parses every AuthProbe in a YAML stream, strictly: like `kubectl apply`'s strict field
/// validation, a field the AuthProbe schema does not have is an error that names it.
pub fn parse_probes(text: &str) -> Result<Vec<AuthProbe>, String> {
    let documents: Vec<serde_json::Value> =
        serde_saphyr::from_multiple(text).map_err(|e| format!("not YAML: {e}"))?;
    let probes = documents
        .into_iter()
        .filter(|d| !d.is_null())
        .enumerate()
        .map(|(i, document)| {
            let at = |what: String| format!("document {}: {what}", i + 1);
            let (api_version, kind) = (&document["apiVersion"], &document["kind"]);
            if api_version != "authprobe.io/v1alpha1" || kind != "AuthProbe" {
                return Err(at(format!(
                    "apiVersion {api_version} kind {kind} is not an authprobe.io/v1alpha1 AuthProbe"
                )));
            }
            let mut unknown = Vec::new();
            // apiVersion and kind, checked above, are not fields of the derived type.
            let probe: AuthProbe = serde_ignored::deserialize(document, |path| {
                let path = path.to_string();
                if path != "apiVersion" && path != "kind" {
                    unknown.push(path);
                }
            })
            .map_err(|e| at(format!("not an AuthProbe: {e}")))?;
            match unknown.first() {
                Some(field) => Err(at(format!("unknown field \"{field}\""))),
                None => Ok(probe),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if probes.is_empty() {
        return Err("no AuthProbe in the file".into());
    }
    Ok(probes)
}

/// Checks one probe against the cluster and Google.
pub async fn check(
    client: &Client,
    google: Arc<Google>,
    endpoints: Arc<EndpointProber>,
    metrics: Arc<Metrics>,
    probe: &AuthProbe,
) -> Result<Checked, kube::Error> {
    let name = probe.name_any();
    let plan = match Plan::parse_allowing(&probe.spec, endpoints.allow()) {
        Ok(plan) => plan,
        Err(invalid) => return Ok(checked(name, &Report::invalid(&invalid), &[], exit::CANNOT_TELL)),
    };
    let namespaces: ObjectList<NamespaceMeta> =
        Api::all(client.clone()).list_metadata(&ListParams::default()).await?;
    let service_accounts: ObjectList<ServiceAccountMeta> =
        Api::<ServiceAccount>::all(client.clone()).list_metadata(&ListParams::default()).await?;
    let Selection { namespaces, candidates } =
        plan.select(&MetaView::new(namespaces.items, service_accounts.items));
    let workloads = Workloads::default();
    if plan.inspect_workloads {
        futures::try_join!(
            list_workloads::<Deployment>(client, &workloads),
            list_workloads::<StatefulSet>(client, &workloads),
            list_workloads::<DaemonSet>(client, &workloads),
            list_workloads::<Job>(client, &workloads),
            list_workloads::<CronJob>(client, &workloads),
            list_workloads::<Pod>(client, &workloads),
        )?;
    }
    let config_maps = ConfigMaps::new(client.clone());
    let issuers = ClusterIssuers::new(client.clone());
    let chain = Chain::new(client.clone(), google.clone(), metrics, Arc::new(Fence::always()), endpoints);
    let services = Services {
        google: &google,
        issuers: &issuers,
        chain: Some(&chain),
        workloads: &workloads,
        config_maps: &config_maps,
    };
    let max_age = std::time::Duration::ZERO;
    let pass = Pass { probe: &name, plan: &plan, candidates, max_age, now: Timestamp::now(), live: None };
    // No history here: only a KSA's creation opens the propagation grace.
    let evaluated = probe::evaluate(services, pass, |c| c.ksa.as_ref().and_then(|k| k.created)).await;
    let mut report = Report::build(
        &evaluated.outcomes,
        u32::try_from(namespaces.len()).unwrap_or(u32::MAX),
        plan.token_exchange,
    );
    report.summary.live_verified = evaluated.live_verified;
    let code = exit_code(&report);
    Ok(checked(name, &report, &evaluated.outcomes, code))
}

/// Lists every object of kind `K`, page by page, keeping each workload's pruned view.
async fn list_workloads<K>(client: &Client, into: &Workloads) -> Result<(), kube::Error>
where
    K: LeanKind,
{
    let api = Api::<Lean<K>>::all(client.clone());
    let mut params = ListParams::default().limit(PAGE);
    into.begin_listing(K::WORKLOAD);
    for _ in 0..MAX_PAGES {
        let page = api.list(&params).await?;
        for object in &page.items {
            if let Some(workload) = prune(object) {
                into.apply(workload);
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    into.end_listing(K::WORKLOAD);
    Ok(())
}

/// 1 when anything is definitely failing, 2 when anything is undecided (or the spec is invalid), else 0.
fn exit_code(report: &Report) -> u8 {
    match report.condition(condition::READY).map(|c| c.status) {
        Some(Status::True) => exit::PASSING,
        Some(Status::False) if report.summary.failing > 0 => exit::FAILING,
        _ => exit::CANNOT_TELL,
    }
}

fn checked(probe: String, report: &Report, outcomes: &[KsaOutcome], exit_code: u8) -> Checked {
    let results = outcomes
        .iter()
        .map(|o| {
            let f = o.finding();
            ResultOut {
                namespace: o.namespace.clone(),
                service_account: o.name.clone(),
                result: match f.map(|f| f.verdict) {
                    None => "passing",
                    Some(Verdict::Fail) => "failing",
                    Some(Verdict::Unknown) => "unknown",
                },
                stage: f.map(|f| f.stage.to_string()),
                reason: f.map(|f| f.reason.to_string()),
                message: f.map(|f| f.message.clone()),
            }
        })
        .collect();
    Checked {
        probe,
        exit_code,
        conditions: report
            .conditions
            .iter()
            .map(|c| ConditionOut {
                type_: c.type_.into(),
                status: c.status.as_str().into(),
                reason: c.reason.to_string(),
                message: c.message.clone(),
            })
            .collect(),
        summary: report.summary,
        results,
    }
}

/// Renders the results.
pub fn render(checked: &[Checked], output: Output) -> String {
    match output {
        Output::Json => serde_json::to_string_pretty(&serde_json::json!({
            "exitCode": overall(checked),
            "probes": checked,
        }))
        .unwrap_or_default(),
        Output::Yaml => serde_saphyr::to_string(&serde_json::json!({
            "exitCode": overall(checked),
            "probes": checked,
        }))
        .unwrap_or_default(),
        Output::Table => table(checked),
        Output::Junit => junit(checked),
    }
}

/// The exit code of a run over several probes: failing beats undecided beats passing.
pub fn overall(checked: &[Checked]) -> u8 {
    if checked.iter().any(|c| c.exit_code == exit::FAILING) {
        exit::FAILING
    } else {
        checked.iter().map(|c| c.exit_code).max().unwrap_or(exit::PASSING)
    }
}

fn table(checked: &[Checked]) -> String {
    let mut out = String::new();
    for c in checked {
        let ready = c.conditions.iter().find(|x| x.type_ == condition::READY);
        let _ = writeln!(
            out,
            "AuthProbe {}: Ready={} ({}), {} namespaces, {} ServiceAccounts: {} passing, {} failing, {} unknown",
            c.probe,
            ready.map_or("?", |r| r.status.as_str()),
            ready.map_or("?", |r| r.reason.as_str()),
            c.summary.namespaces,
            c.summary.service_accounts,
            c.summary.passing,
            c.summary.failing,
            c.summary.unknown
        );
        let width = c
            .results
            .iter()
            .map(|r| r.namespace.len() + r.service_account.len() + 1)
            .max()
            .unwrap_or(0)
            .max(14);
        let _ = writeln!(out, "{:<width$}  {:<8}  {:<13}  REASON", "SERVICEACCOUNT", "RESULT", "STAGE");
        for r in &c.results {
            let who = format!("{}/{}", r.namespace, r.service_account);
            let _ = writeln!(
                out,
                "{who:<width$}  {:<8}  {:<13}  {}",
                r.result,
                r.stage.as_deref().unwrap_or("-"),
                r.reason.as_deref().unwrap_or("-")
            );
        }
        for r in c.results.iter().filter(|r| r.message.is_some()) {
            let _ = writeln!(
                out,
                "\n{}/{}: {}",
                r.namespace,
                r.service_account,
                r.message.as_deref().unwrap_or_default()
            );
        }
        if c.results.is_empty()
            && let Some(r) = ready.filter(|r| r.status != "True")
        {
            let _ = writeln!(out, "{}", r.message);
        }
    }
    out
}

fn junit(checked: &[Checked]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
            .replace('\'', "&apos;")
    };
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n");
    for c in checked {
        let _ = writeln!(
            out,
            "  <testsuite name=\"authprobe/{}\" tests=\"{}\" failures=\"{}\" errors=\"{}\">",
            esc(&c.probe),
            c.results.len().max(1),
            c.summary.failing,
            c.summary.unknown + u32::from(c.results.is_empty() && c.exit_code != 0)
        );
        if c.results.is_empty() {
            let ready = c.conditions.iter().find(|x| x.type_ == condition::READY);
            let _ = write!(out, "    <testcase classname=\"authprobe\" name=\"{}\"", esc(&c.probe));
            match ready.filter(|r| r.status != "True") {
                Some(r) => {
                    let _ = writeln!(
                        out,
                        ">\n      <error type=\"{}\" message=\"{}\">{}</error>\n    </testcase>",
                        esc(&r.reason),
                        esc(&r.reason),
                        esc(&r.message)
                    );
                }
                None => out.push_str("/>\n"),
            }
        }
        for r in &c.results {
            let _ = write!(
                out,
                "    <testcase classname=\"{}\" name=\"{}/{}\"",
                esc(&r.namespace),
                esc(&r.namespace),
                esc(&r.service_account)
            );
            let element = match r.result {
                "failing" => Some("failure"),
                "unknown" => Some("error"),
                _ => None,
            };
            match element {
                Some(el) => {
                    let _ = writeln!(
                        out,
                        ">\n      <{el} type=\"{}\" message=\"{}\">{}</{el}>\n    </testcase>",
                        esc(r.stage.as_deref().unwrap_or_default()),
                        esc(r.reason.as_deref().unwrap_or_default()),
                        esc(r.message.as_deref().unwrap_or_default())
                    );
                }
                None => out.push_str("/>\n"),
            }
        }
        out.push_str("  </testsuite>\n");
    }
    out.push_str("</testsuites>\n");
    out
}

/// `authprobe check`: reads the probes, checks each, prints the results and returns the exit code.
pub async fn run(args: CheckArgs) -> Result<u8, CheckError> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
            .map_err(|e| CheckError::Input(format!("reading standard input: {e}")))?
    } else {
        std::fs::read_to_string(&args.file)
            .map_err(|e| CheckError::Input(format!("reading {}: {e}", args.file.display())))?
    };
    let probes =
        parse_probes(&text).map_err(|e| CheckError::Input(format!("{}: {e}", args.file.display())))?;
    let config = kube_config(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
    let client = Clients::from_config(config)?.call;
    let metrics = Arc::new(Metrics::new());
    let google = Arc::new(args.google.connect(metrics.clone())?);
    // No pass follows this one: it waits for every endpoint's verdict.
    let endpoints = Arc::new(args.endpoints.prober(metrics.clone(), CHECK_DEADLINE)?);
    let mut results = Vec::new();
    for probe in &probes {
        let checked = check(&client, google.clone(), endpoints.clone(), metrics.clone(), probe).await;
        results.push(checked.map_err(anyhow::Error::from)?);
    }
    print!("{}", render(&results, args.output));
    Ok(overall(&results))
}

/// The kubeconfig (and context) asked for, or the usual inference.
async fn kube_config(
    path: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<kube::Config, CheckError> {
    let options =
        kube::config::KubeConfigOptions { context: context.map(str::to_string), ..Default::default() };
    match (path, context) {
        (None, None) => kube::Config::infer().await.map_err(|e| CheckError::Unavailable(e.into())),
        (Some(path), _) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| CheckError::Input(format!("--kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| CheckError::Input(format!("--kubeconfig {}: {e}", path.display())))
        }
        (None, Some(_)) => kube::Config::from_kubeconfig(&options)
            .await
            .map_err(|e| CheckError::Input(format!("--context: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_parse_and_only_fields_of_the_type_are_refused() {
        let probe = "apiVersion: authprobe.io/v1alpha1\nkind: AuthProbe\nmetadata: {name: x}\n\
                     spec: {namespaceSelector: {}, identity: {platform: GKE, projectId: acme-prod}}\n";
        assert_eq!(parse_probes(probe).map(|p| p.len()), Ok(1));
        let typo = probe.replace("projectId", "projectID");
        assert!(parse_probes(&typo).unwrap_err().contains("unknown field \"spec.identity.projectID\""));
    }
}
