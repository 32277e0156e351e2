//! `make bench`: authprobe under load on the local control plane, against a fake Google with a set
//! latency, next to the naive way of checking. One run per size; prints a table and writes
//! `bench/results/<name>.json`.
//!
//! Phases: populate N namespaces × M KSAs over G GSAs and P probes (with `--workloads`, one
//! Deployment per KSA, and the last `--federation-probes` probes Federation, each of their
//! namespaces with the ConfigMap its Deployments mount); start the (release) operator as its own
//! ServiceAccount, so the API server's audit log attributes its requests; time to every probe's
//! complete status; with `--chain`, the first sweep (until every KSA was verified live, at least a
//! minute); RSS; a steady window with no pass due (API requests by verb and resource, status
//! writes beyond the periodic passes due in it); Google calls over two intervals; annotation
//! change → status latency (and a workload edit → status, with `--workloads`); with `--chain`, the
//! most STS exchanges in a minute so far; a forced re-list (API server restart) for peak RSS; then
//! the naive checker.

use std::{
    collections::BTreeMap,
    io::{BufRead, Seek},
    path::PathBuf,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use authprobe::api::{AuthProbe, Summary};
use authprobe_harness::{ControlPlane, Options, free_port};
use clap::Parser;
use fake_google::scenario::{Binding, Faults, Scenario, ServiceAccount as GoogleSa};
use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::{
    api::{
        apps::v1::Deployment,
        authentication::v1::TokenRequest,
        core::v1::{ConfigMap, Namespace, ServiceAccount},
        rbac::v1::ClusterRoleBinding,
    },
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, watcher},
};
use serde_json::{Value, json};

const PROJECT: &str = "bench-project";
const POOL: &str = "bench-project.svc.id.goog";
const OPERATOR_TOKEN: &str = "bench-operator";
const OPERATOR_USER: &str = "system:serviceaccount:authprobe-system:authprobe";
const PROJECT_NUMBER: &str = "999000111222";
const FEDERATION_POOL: &str = "projects/999000111222/locations/global/workloadIdentityPools/bench";

/// One benchmark run.
#[derive(Debug, Parser)]
struct Args {
    /// Namespaces.
    #[arg(long, default_value_t = 1000)]
    namespaces: usize,
    /// KSAs per namespace.
    #[arg(long, default_value_t = 3)]
    ksas: usize,
    /// Distinct GSAs the KSAs are annotated with.
    #[arg(long, default_value_t = 100)]
    gsas: usize,
    /// AuthProbes, each selecting an equal share of the namespaces.
    #[arg(long, default_value_t = 10)]
    probes: usize,
    /// Latency the fake Google adds to every request.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Annotation changes timed (each change and its revert are two samples).
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// The probes' interval, in seconds.
    #[arg(long, default_value_t = 60)]
    interval_seconds: u64,
    /// Run the live chain (TokenRequest, exchange, impersonation).
    #[arg(long)]
    chain: bool,
    /// One Deployment per KSA, pod templates as real ones carry (stage Workload).
    #[arg(long)]
    workloads: bool,
    /// The last N probes are Federation (with `--workloads`, their Deployments mount a ConfigMap
    /// per namespace holding each KSA's credential configuration).
    #[arg(long, default_value_t = 0)]
    federation_probes: usize,
    /// With --chain: the probes' `tokenExchangeInterval`, in seconds (default: the interval).
    /// The run waits until every KSA was verified live (at most 1.5 of these intervals) before
    /// its steady window, and reports when the last one was, and the most STS exchanges in a
    /// minute.
    #[arg(long)]
    token_exchange_interval_seconds: Option<u64>,
    /// The operator's `--google-quota-share` (default: its own, 0.5).
    #[arg(long)]
    google_quota_share: Option<f64>,
    /// Skip the naive checker.
    #[arg(long)]
    skip_baseline: bool,
    /// Where to write the JSON result.
    #[arg(long)]
    out: PathBuf,
    /// The operator binary to measure (default: target/release/authprobe).
    #[arg(long)]
    operator: Option<PathBuf>,
}

fn gsa(i: usize) -> String {
    format!("gsa-{i:03}@{PROJECT}.iam.gserviceaccount.com")
}

fn unmapped_gsa() -> String {
    format!("unmapped@{PROJECT}.iam.gserviceaccount.com")
}

/// Whether namespace `i` is selected by a Federation probe.
fn federated(i: usize, args: &Args) -> bool {
    i % args.probes >= args.probes - args.federation_probes.min(args.probes)
}

fn provider() -> String {
    format!("{FEDERATION_POOL}/providers/k8s")
}

/// KSA `j` of namespace `i` impersonates this GSA; one KSA in a hundred is deliberately unmapped.
fn gsa_of(i: usize, j: usize, gsas: usize) -> (usize, bool) {
    let n = i * 7 + j * 13;
    (n % gsas, n % 100 != 42)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let operator_bin = args
        .operator
        .clone()
        .unwrap_or_else(|| authprobe_harness::repo_root().join("target/release/authprobe"));
    anyhow::ensure!(operator_bin.is_file(), "{} is missing: make bench builds it", operator_bin.display());
    let mut results = BTreeMap::<&str, Value>::new();
    results.insert("operator", json!(operator_bin.display().to_string()));
    results.insert("size", json!({"namespaces": args.namespaces, "ksasPerNamespace": args.ksas, "gsas": args.gsas, "probes": args.probes, "latencyMs": args.latency_ms, "intervalSeconds": args.interval_seconds, "chain": args.chain, "workloads": args.workloads, "federationProbes": args.federation_probes, "tokenExchangeIntervalSeconds": args.token_exchange_interval_seconds, "googleQuotaShare": args.google_quota_share}));

    eprintln!("bench: starting the control plane");
    let cp = tokio::task::spawn_blocking(|| {
        ControlPlane::start(Options { install_crds: true, audit_log: true, ..Options::default() })
    })
    .await??;
    let client = cp.client().await?;
    let fake = fake_google::start("127.0.0.1:0".parse()?, scenario(&args, &cp)?).await?;

    eprintln!(
        "bench: populating {} namespaces × {} KSAs{}",
        args.namespaces,
        args.ksas,
        if args.workloads { ", one Deployment each" } else { "" }
    );
    let started = Instant::now();
    populate(&client, &args).await?;
    results.insert("populateSeconds", json!(started.elapsed().as_secs_f64()));

    let (kubeconfig, _) = operator_identity(&cp, &client).await?;
    let http = free_port()?;
    let log = cp.dir().join("operator.log");
    let token = cp.dir().join("operator-token");
    std::fs::write(&token, OPERATOR_TOKEN)?;
    let mut operator_args = vec![
        "run".to_string(),
        format!("--http-addr=127.0.0.1:{http}"),
        format!("--google-access-token-file={}", token.display()),
    ];
    operator_args.push("--log-format=json".into());
    if let Some(share) = args.google_quota_share {
        operator_args.push(format!("--google-quota-share={share}"));
    }
    eprintln!("bench: starting the operator");
    let t0 = Instant::now();
    let mut operator = authprobe_harness::spawn(
        &operator_bin,
        &operator_args,
        &[
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("AUTHPROBE_GOOGLE_ENDPOINTS", fake.endpoints()),
            ("RUST_LOG", "info".to_string()),
        ],
        &log,
    )?;
    let pid = operator.id();
    let rss = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
    let sampler = tokio::spawn(sample_rss(pid, rss.clone(), t0));

    let (summaries, last_probes) = watch_summaries(client.clone());
    let expected = args.ksas * args.namespaces / args.probes;
    let exchanges = Arc::new(Mutex::new(Vec::<(f64, u64)>::new()));
    let exchange_sampler = tokio::spawn(sample_exchanges(fake.fake.clone(), exchanges.clone(), t0));
    let all_verified = Arc::new(Mutex::new(None::<f64>));
    let verified_watch =
        tokio::spawn(watch_all_verified(summaries.clone(), args.probes, expected, all_verified.clone(), t0));
    wait_all(&summaries, args.probes, |s| s.service_accounts as usize == expected, Duration::from_secs(600))
        .await
        .context("first complete status")?;
    let first_complete = t0.elapsed();
    eprintln!("bench: every probe complete after {:.1} s", first_complete.as_secs_f64());
    results.insert("firstCompleteSeconds", json!(first_complete.as_secs_f64()));
    let totals = summaries
        .borrow()
        .values()
        .fold([0u32; 3], |t, s| [t[0] + s.passing, t[1] + s.failing, t[2] + s.unknown]);
    results.insert("firstVerdict", json!({"passing": totals[0], "failing": totals[1], "unknown": totals[2]}));
    eprintln!("bench: first verdict {:?}", results["firstVerdict"]);

    // With the live chain, the first sweep (every KSA's first exchange, paced at the quota share)
    // writes statuses as liveVerified grows: the steady window starts after it (every KSA verified
    // live, at most 1.5 tokenExchangeIntervals), and never within the first chain minute.
    if args.chain {
        let every = args.token_exchange_interval_seconds.unwrap_or(args.interval_seconds);
        let deadline = t0 + Duration::from_secs(every * 3 / 2);
        while all_verified.lock().map(|v| v.is_none()).unwrap_or(false) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let last = all_verified.lock().ok().and_then(|v| *v);
        eprintln!("bench: every KSA verified live after {last:?} s");
        results.insert("lastKsaVerifiedLiveSeconds", json!(last));
        tokio::time::sleep_until((t0 + Duration::from_secs(60)).into()).await;
    }

    // Steady state: between passes, nothing should be listed or written (but the periodic pass,
    // which moves lastProbeTime once per interval: with the chain, the window does not start
    // right after every probe's write, so the passes due in it are counted and allowed).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let steady_window = Duration::from_secs(args.interval_seconds / 2);
    let audit_from = audit_offset(&cp)?;
    let rss_before = rss.lock().map(|r| r.len()).unwrap_or_default();
    let window_start = t0.elapsed();
    let window_end = Timestamp::now()
        .checked_add(SignedDuration::try_from(steady_window)?)
        .context("steady window end")?;
    let periodic_due = last_probes
        .borrow()
        .values()
        .filter(|last| {
            SignedDuration::try_from(Duration::from_secs(args.interval_seconds))
                .ok()
                .and_then(|i| last.checked_add(i).ok())
                .is_some_and(|due| due <= window_end)
        })
        .count();
    tokio::time::sleep(steady_window).await;
    let requests = audit_counts(&cp, audit_from)?;
    let steady_rss = rss
        .lock()
        .map(|r| r[rss_before..].iter().map(|(_, b)| *b).max().unwrap_or_default())
        .unwrap_or_default();
    eprintln!(
        "bench: steady window {:?} ({periodic_due} periodic passes due): {requests:?}, RSS {} MiB",
        steady_window,
        steady_rss / (1 << 20)
    );
    results.insert("steadyWindowSeconds", json!(steady_window.as_secs()));
    results.insert("steadyWindowStartSeconds", json!(window_start.as_secs_f64()));
    results.insert("steadyPeriodicPassesDue", json!(periodic_due));
    results.insert("steadyApiRequests", json!(requests));
    results.insert("steadyRssMiB", json!(steady_rss as f64 / f64::from(1 << 20)));

    // Google calls over two intervals, next to the lower bound. Without the chain, passes come
    // once an interval (later by their jitter): a fifth more catches the second. With it, passes
    // come every few seconds and each GSA is read again as soon as its read is an interval old:
    // exactly two intervals.
    fake.fake.reset_counts();
    let window = Duration::from_secs(args.interval_seconds * 2);
    let slack = if args.chain { Duration::ZERO } else { Duration::from_secs(args.interval_seconds / 5) };
    tokio::time::sleep(window + slack).await;
    let counts = fake.fake.counts();
    let per_interval: BTreeMap<&String, f64> = counts.iter().map(|(k, v)| (k, *v as f64 / 2.0)).collect();
    let distinct_ksas = args.namespaces * args.ksas;
    results.insert("googleCallsPerInterval", json!(per_interval));
    let provider_reads = usize::from(args.federation_probes > 0);
    results.insert(
        "googleLowerBound",
        json!({"iam.getIamPolicy": args.gsas, "iam.serviceAccounts.get": args.gsas, "iam.workloadIdentityPools.get": provider_reads, "iam.providers.get": provider_reads, "exchanges": if args.chain { (distinct_ksas as u64 * args.interval_seconds / args.token_exchange_interval_seconds.unwrap_or(args.interval_seconds)) as usize } else { 0 }}),
    );
    eprintln!("bench: Google calls per interval {per_interval:?}");

    // Annotation change → status, timed.
    let latencies = change_latencies(&client, &summaries, &args).await?;
    results.insert("changeToStatusMs", percentiles(&latencies));
    eprintln!("bench: change → status {:?}", results["changeToStatusMs"]);
    if args.workloads {
        let latencies = workload_latencies(&client, &summaries, &args).await?;
        results.insert("workloadChangeToStatusMs", percentiles(&latencies));
        eprintln!("bench: workload edit → status {:?}", results["workloadChangeToStatusMs"]);
    }

    // With the live chain: the exchanges per minute, from the operator's start through the changes.
    if args.chain {
        let samples = exchanges.lock().map(|s| s.clone()).unwrap_or_default();
        let (fixed, sliding) = max_per_minute(&samples);
        results.insert("stsExchangesMaxPerMinute", json!(fixed));
        results.insert("stsExchangesMaxPerSlidingMinute", json!(sliding));
        eprintln!("bench: STS exchanges per minute at most {fixed} (sliding {sliding})");
    }
    verified_watch.abort();
    exchange_sampler.abort();

    // A forced re-list: the API server restarts, every watch re-lists.
    let before = rss.lock().map(|r| r.len()).unwrap_or_default();
    cp.restart_apiserver().await?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let relist_peak =
        rss.lock().map(|r| r[before..].iter().map(|(_, b)| *b).max().unwrap_or_default()).unwrap_or_default();
    results.insert("relistPeakRssMiB", json!(relist_peak as f64 / f64::from(1 << 20)));
    results.insert("peakRssMiB", json!(vm_hwm(pid).unwrap_or_default() as f64 / f64::from(1 << 20)));
    authprobe_harness::stop(&mut operator, Duration::from_secs(30));
    sampler.abort();

    if !args.skip_baseline {
        results.insert("baseline", naive(&cp, &fake, &args).await?);
        if let (Some(naive_s), Some(naive_calls)) =
            (results["baseline"]["seconds"].as_f64(), results["baseline"]["googleCalls"].as_f64())
        {
            let ours = counts.get("iam.getIamPolicy").copied().unwrap_or_default() as f64 / 2.0
                + counts.get("iam.serviceAccounts.get").copied().unwrap_or_default() as f64 / 2.0;
            results.insert("ratios", json!({"wallTime": naive_s / first_complete.as_secs_f64(), "googleCalls": naive_calls / ours.max(1.0)}));
        }
    }
    let bars = bars(&results, &args);
    results.insert("bars", bars);
    let text = serde_json::to_string_pretty(&results)?;
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, text + "\n")?;
    print_table(&results);
    drop(operator);
    Ok(())
}

fn scenario(args: &Args, cp: &ControlPlane) -> Result<Scenario> {
    let mut members: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for i in 0..args.namespaces {
        for j in 0..args.ksas {
            let (g, mapped) = gsa_of(i, j, args.gsas);
            if mapped {
                let member = if federated(i, args) {
                    format!(
                        "principal://iam.googleapis.com/{FEDERATION_POOL}/subject/system:serviceaccount:bench-{i:05}:sa-{j}"
                    )
                } else {
                    format!("serviceAccount:{POOL}[bench-{i:05}/sa-{j}]")
                };
                members.entry(g).or_default().push(member);
            }
        }
    }
    let mut accounts: Vec<GoogleSa> = (0..args.gsas)
        .map(|g| GoogleSa {
            email: gsa(g),
            bindings: vec![Binding {
                role: "roles/iam.workloadIdentityUser".into(),
                members: members.remove(&g).unwrap_or_default(),
                condition: None,
            }],
            ..Default::default()
        })
        .collect();
    accounts.push(GoogleSa { email: unmapped_gsa(), ..Default::default() });
    Ok(Scenario {
        operator: fake_google::scenario::Operator {
            tokens: vec![OPERATOR_TOKEN.into()],
            ..Default::default()
        },
        service_accounts: accounts,
        clusters: vec![fake_google::scenario::Cluster { issuer: cp.issuer(), ca_pem: cp.ca_pem()? }],
        pools: vec![fake_google::scenario::Pool {
            name: FEDERATION_POOL.into(),
            providers: vec![fake_google::scenario::Provider {
                id: "k8s".into(),
                issuer_uri: cp.issuer(),
                attribute_mapping: BTreeMap::from([("google.subject".into(), "assertion.sub".into())]),
                ..Default::default()
            }],
            ..Default::default()
        }],
        gke: vec![fake_google::scenario::GkeProject {
            project_id: PROJECT.into(),
            project_number: PROJECT_NUMBER.into(),
            clusters: vec![fake_google::scenario::GkeCluster { url: cluster_url(), issuer: cp.issuer() }],
        }],
        faults: Faults { latency_ms: args.latency_ms, ..Default::default() },
        ..Default::default()
    })
}

fn cluster_url() -> String {
    format!("https://container.googleapis.com/v1/projects/{PROJECT}/locations/us-central1/clusters/bench")
}

async fn populate(client: &Client, args: &Args) -> Result<()> {
    let namespaces = Api::<Namespace>::all(client.clone());
    stream::iter(0..args.namespaces)
        .map(|i| {
            let namespaces = namespaces.clone();
            let client = client.clone();
            let probes = args.probes;
            let ksas = args.ksas;
            let gsas = args.gsas;
            let workloads = args.workloads;
            async move {
                let name = format!("bench-{i:05}");
                let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": {"bench-probe": format!("p{}", i % probes)}}}))?;
                namespaces.create(&PostParams::default(), &ns).await?;
                let sas = Api::<ServiceAccount>::namespaced(client.clone(), &name);
                for j in 0..ksas {
                    let (g, _) = gsa_of(i, j, gsas);
                    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": format!("sa-{j}"), "annotations": {"iam.gke.io/gcp-service-account": gsa(g)}}}))?;
                    sas.create(&PostParams::default(), &sa).await?;
                }
                if workloads {
                    let federation = federated(i, args);
                    if federation {
                        Api::<ConfigMap>::namespaced(client.clone(), &name)
                            .create(&PostParams::default(), &credential_config_map(i, ksas, gsas)?)
                            .await?;
                    }
                    let deployments = Api::<Deployment>::namespaced(client, &name);
                    for j in 0..ksas {
                        deployments.create(&PostParams::default(), &deployment(j, federation)?).await?;
                    }
                }
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await?;
    let probes = Api::<AuthProbe>::all(client.clone());
    for p in 0..args.probes {
        let mut spec = json!({
            "namespaceSelector": {"matchLabels": {"bench-probe": format!("p{p}")}},
            "serviceAccounts": {"names": (0..args.ksas).map(|j| format!("sa-{j}")).collect::<Vec<_>>()},
            "identity": {"platform": "GKE", "projectId": PROJECT, "projectNumber": PROJECT_NUMBER},
            "probe": {"interval": format!("{}s", args.interval_seconds), "propagationGrace": "0s", "tokenExchange": args.chain}
        });
        if federated(p, args) {
            spec["identity"] = json!({"platform": "Federation", "projectNumber": PROJECT_NUMBER, "federation": {"provider": provider()}});
        }
        if args.chain && !federated(p, args) {
            spec["identity"]["gke"] = json!({"clusterLocation": "us-central1", "clusterName": "bench"});
            if let Some(every) = args.token_exchange_interval_seconds {
                spec["probe"]["tokenExchangeInterval"] = json!(format!("{every}s"));
            }
        }
        let probe = json!({"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "metadata": {"name": format!("bench-p{p}")}, "spec": spec});
        probes
            .patch(&format!("bench-p{p}"), &PatchParams::apply("bench").force(), &Patch::Apply(&probe))
            .await?;
    }
    Ok(())
}

/// A ServiceAccount for the operator (cluster-admin: only attribution matters here) and a kubeconfig for it.
async fn operator_identity(cp: &ControlPlane, client: &Client) -> Result<(PathBuf, String)> {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "authprobe-system"}}))?;
    Api::<Namespace>::all(client.clone()).create(&PostParams::default(), &ns).await?;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), "authprobe-system");
    sas.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "authprobe"}}))?)
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "authprobe-bench"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "authprobe", "namespace": "authprobe-system"}]
    }))?;
    Api::<ClusterRoleBinding>::all(client.clone()).create(&PostParams::default(), &binding).await?;
    let request: TokenRequest = serde_json::from_value(json!({"spec": {"expirationSeconds": 86_400}}))?;
    let token = sas
        .create_token_request("authprobe", &PostParams::default(), &request)
        .await?
        .status
        .and_then(|s| s.token)
        .context("no token")?;
    use base64::Engine as _;
    let ca = base64::engine::general_purpose::STANDARD.encode(cp.ca_pem()?);
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{}\", certificate-authority-data: {ca}}}\nusers:\n- name: u\n  user: {{token: {token}}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
        cp.server_url()
    );
    let path = cp.dir().join("operator-kubeconfig");
    std::fs::write(&path, kubeconfig)?;
    Ok((path, token))
}

type Summaries = tokio::sync::watch::Receiver<BTreeMap<String, Summary>>;
type LastProbes = tokio::sync::watch::Receiver<BTreeMap<String, Timestamp>>;

/// The latest summary and lastProbeTime of every probe, from a watch.
fn watch_summaries(client: Client) -> (Summaries, LastProbes) {
    let (tx, rx) = tokio::sync::watch::channel(BTreeMap::new());
    let (last_tx, last_rx) = tokio::sync::watch::channel(BTreeMap::new());
    tokio::spawn(async move {
        let mut stream =
            watcher(Api::<AuthProbe>::all(client), watcher::Config::default()).applied_objects().boxed();
        while let Some(item) = stream.next().await {
            let Ok(p) = item else { continue };
            let name = p.metadata.name.clone().unwrap_or_default();
            if let Some(last) = p.status.as_ref().and_then(|s| s.last_probe_time.as_ref()) {
                last_tx.send_modify(|m| {
                    m.insert(name.clone(), last.0);
                });
            }
            if let Some(summary) = p.status.as_ref().and_then(|s| s.summary) {
                tx.send_modify(|m| {
                    m.insert(name, summary);
                });
            }
        }
    });
    (rx, last_rx)
}

async fn wait_all(
    summaries: &Summaries,
    probes: usize,
    done: impl Fn(&Summary) -> bool,
    within: Duration,
) -> Result<()> {
    let mut rx = summaries.clone();
    tokio::time::timeout(within, rx.wait_for(|m| m.len() == probes && m.values().all(&done))).await??;
    Ok(())
}

/// How often the exchange count is sampled: a minute's count is off by at most the exchanges
/// of one period at either end (one at 600 a minute).
const EXCHANGE_SAMPLE: Duration = Duration::from_millis(100);

/// The fake's exchange count (GKE: securetoken), every [`EXCHANGE_SAMPLE`]: (seconds since `t0`,
/// exchanges since the sample before). Survives the fake's counters being reset.
async fn sample_exchanges(fake: Arc<fake_google::Fake>, samples: Arc<Mutex<Vec<(f64, u64)>>>, t0: Instant) {
    let mut last = 0;
    let mut tick = tokio::time::interval(EXCHANGE_SAMPLE);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let count = fake.counts().get("securetoken.identitybindingtoken").copied().unwrap_or_default();
        let delta = if count < last { count } else { count - last };
        last = count;
        if let Ok(mut s) = samples.lock() {
            s.push((t0.elapsed().as_secs_f64(), delta));
        }
    }
}

/// The most exchanges in one minute since `t0` (minute k = [60k, 60k+60) s), and in any 60 s
/// starting at a sample.
fn max_per_minute(samples: &[(f64, u64)]) -> (u64, u64) {
    let mut minutes: BTreeMap<u64, u64> = BTreeMap::new();
    for (t, n) in samples {
        *minutes.entry((*t / 60.0) as u64).or_default() += n;
    }
    let fixed = minutes.values().copied().max().unwrap_or_default();
    let (mut sliding, mut sum, mut end) = (0, 0, 0);
    for (start, (t, _)) in samples.iter().enumerate() {
        if start > 0 {
            sum -= samples[start - 1].1;
        }
        while end < samples.len() && samples[end].0 < t + 60.0 {
            sum += samples[end].1;
            end += 1;
        }
        sliding = sliding.max(sum);
    }
    (fixed, sliding)
}

/// Records when every probe first had all of its passing KSAs verified live.
async fn watch_all_verified(
    summaries: Summaries,
    probes: usize,
    expected: usize,
    at: Arc<Mutex<Option<f64>>>,
    t0: Instant,
) {
    let mut rx = summaries;
    let all = |m: &BTreeMap<String, Summary>| {
        m.len() == probes
            && m.values()
                .all(|s| s.service_accounts as usize == expected && s.live_verified == Some(s.passing))
    };
    if rx.wait_for(all).await.is_ok()
        && let Ok(mut v) = at.lock()
    {
        *v = Some(t0.elapsed().as_secs_f64());
    }
}

async fn sample_rss(pid: u32, samples: Arc<Mutex<Vec<(f64, u64)>>>, t0: Instant) {
    loop {
        if let Some(rss) = proc_status(pid, "VmRSS:")
            && let Ok(mut s) = samples.lock()
        {
            s.push((t0.elapsed().as_secs_f64(), rss));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn proc_status(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

fn vm_hwm(pid: u32) -> Option<u64> {
    proc_status(pid, "VmHWM:")
}

fn audit_offset(cp: &ControlPlane) -> Result<u64> {
    Ok(std::fs::metadata(cp.audit_log()).map(|m| m.len()).unwrap_or(0))
}

/// The operator's API requests logged since `from`, by "verb resource[/subresource]".
fn audit_counts(cp: &ControlPlane, from: u64) -> Result<BTreeMap<String, u64>> {
    let mut file = std::fs::File::open(cp.audit_log())?;
    file.seek(std::io::SeekFrom::Start(from))?;
    let mut counts = BTreeMap::new();
    for line in std::io::BufReader::new(file).lines() {
        let Ok(entry) = serde_json::from_str::<Value>(&line?) else { continue };
        if entry["user"]["username"] != OPERATOR_USER {
            continue;
        }
        let verb = entry["verb"].as_str().unwrap_or_default();
        let stage = entry["stage"].as_str().unwrap_or_default();
        // Long-running watches are counted when they start; everything else when it completes.
        if (verb == "watch" && stage != "ResponseStarted") || (verb != "watch" && stage != "ResponseComplete")
        {
            continue;
        }
        let resource = entry["objectRef"]["resource"].as_str().unwrap_or("-");
        let key = match entry["objectRef"]["subresource"].as_str() {
            Some(sub) => format!("{verb} {resource}/{sub}"),
            None => format!("{verb} {resource}"),
        };
        *counts.entry(key).or_default() += 1;
    }
    Ok(counts)
}

/// Changes a KSA's annotation to a GSA that does not map it, times the status showing it, and back.
/// Waits (at most a minute) until `probe`'s status shows `failing` failing KSAs.
async fn await_failing(summaries: &Summaries, probe: &str, failing: u32) -> Result<()> {
    let mut rx = summaries.clone();
    tokio::time::timeout(
        Duration::from_secs(60),
        rx.wait_for(|m| m.get(probe).is_some_and(|x| x.failing == failing)),
    )
    .await
    .with_context(|| format!("{probe} never showed {failing} failing"))??;
    Ok(())
}

async fn change_latencies(client: &Client, summaries: &Summaries, args: &Args) -> Result<Vec<f64>> {
    let mut latencies = Vec::new();
    for s in 0..args.samples {
        let i = (s * 7919) % args.namespaces;
        let j = s % args.ksas;
        let (g, mapped) = gsa_of(i, j, args.gsas);
        if !mapped {
            continue;
        }
        let probe = format!("bench-p{}", i % args.probes);
        let base = summaries.borrow().get(&probe).map(|x| x.failing).context("probe summary")?;
        let sas = Api::<ServiceAccount>::namespaced(client.clone(), &format!("bench-{i:05}"));
        for (to, failing) in [(unmapped_gsa(), base + 1), (gsa(g), base)] {
            let patch = json!({"metadata": {"annotations": {"iam.gke.io/gcp-service-account": to}}});
            let started = Instant::now();
            sas.patch(&format!("sa-{j}"), &PatchParams::default(), &Patch::Merge(&patch)).await?;
            await_failing(summaries, &probe, failing).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    if latencies.is_empty() {
        bail!("no latency samples");
    }
    Ok(latencies)
}

/// The steady RSS bar: 128 MiB, 160 MiB with one Deployment per KSA cached.
/// Issue 15's bars at 10k × 3 without the chain: steady RSS (64 MiB, 96 with a Deployment per
/// KSA) and, without Deployments, the peak while every watch lists again (96 MiB).
fn rss_bar(args: &Args) -> f64 {
    if args.workloads { 96.0 } else { 64.0 }
}

const RELIST_PEAK_BAR_MIB: f64 = 96.0;

/// KSA `j`'s Deployment: a template shaped like a real one (resources, probes, environment, a
/// config volume). Federation: the credential configuration from the namespace's ConfigMap and a
/// projected token.
fn deployment(j: usize, federation: bool) -> Result<Deployment> {
    let mut env = vec![
        json!({"name": "LOG_LEVEL", "value": "info"}),
        json!({"name": "PORT", "value": "8080"}),
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
    ];
    let mut mounts = vec![json!({"name": "config", "mountPath": "/etc/app", "readOnly": true})];
    let mut volumes = vec![json!({"name": "config", "configMap": {"name": "app-config", "optional": true}})];
    if federation {
        env.push(json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/etc/workload-identity/credential-configuration.json"}));
        mounts.push(
            json!({"name": "workload-identity", "mountPath": "/etc/workload-identity", "readOnly": true}),
        );
        mounts.push(json!({"name": "token", "mountPath": "/var/run/service-account", "readOnly": true}));
        volumes.push(json!({"name": "workload-identity", "configMap": {"name": "workload-identity", "items": [{"key": format!("sa-{j}.json"), "path": "credential-configuration.json"}]}}));
        volumes.push(json!({"name": "token", "projected": {"sources": [{"serviceAccountToken": {"audience": format!("https://iam.googleapis.com/{}", provider()), "expirationSeconds": 3600, "path": "token"}}]}}));
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": format!("app-{j}"), "labels": {"app": format!("app-{j}"), "tier": "backend"}},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": format!("app-{j}")}},
            "template": {
                "metadata": {"labels": {"app": format!("app-{j}"), "tier": "backend"}},
                "spec": {
                    "serviceAccountName": format!("sa-{j}"),
                    "containers": [{
                        "name": "app",
                        "image": "registry.example/team/app:1.42.0",
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "env": env,
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                        "volumeMounts": mounts
                    }],
                    "volumes": volumes
                }
            }
        }
    }))?)
}

/// A Federation namespace's ConfigMap: each KSA's credential configuration, as
/// `gcloud iam workload-identity-pools create-cred-config` writes it, under `sa-J.json`.
fn credential_config_map(i: usize, ksas: usize, gsas: usize) -> Result<ConfigMap> {
    let data: BTreeMap<String, String> = (0..ksas)
        .map(|j| {
            let config = json!({
                "universe_domain": "googleapis.com",
                "type": "external_account",
                "audience": format!("//iam.googleapis.com/{}", provider()),
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "token_url": "https://sts.googleapis.com/v1/token",
                "credential_source": {"file": "/var/run/service-account/token", "format": {"type": "text"}},
                "service_account_impersonation_url": format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{}:generateAccessToken", gsa(gsa_of(i, j, gsas).0))
            });
            (format!("sa-{j}.json"), serde_json::to_string_pretty(&config).unwrap_or_default())
        })
        .collect();
    Ok(serde_json::from_value(json!({"metadata": {"name": "workload-identity"}, "data": data}))?)
}

/// Sets GOOGLE_APPLICATION_CREDENTIALS on a GKE KSA's Deployment (overriding Workload Identity),
/// times the status showing it, and back.
async fn workload_latencies(client: &Client, summaries: &Summaries, args: &Args) -> Result<Vec<f64>> {
    let mut latencies = Vec::new();
    for s in 0..args.samples {
        let i = (s * 7919 + 13) % args.namespaces;
        let j = s % args.ksas;
        if federated(i, args) || !gsa_of(i, j, args.gsas).1 {
            continue;
        }
        let probe = format!("bench-p{}", i % args.probes);
        let base = summaries.borrow().get(&probe).map(|x| x.failing).context("probe summary")?;
        let deployments = Api::<Deployment>::namespaced(client.clone(), &format!("bench-{i:05}"));
        let key = json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"});
        let gone = json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "$patch": "delete"});
        for (env, failing) in [(key, base + 1), (gone, base)] {
            let patch =
                json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "env": [env]}]}}}});
            let started = Instant::now();
            deployments
                .patch(&format!("app-{j}"), &PatchParams::default(), &Patch::Strategic(&patch))
                .await?;
            await_failing(summaries, &probe, failing).await?;
            latencies.push(started.elapsed().as_secs_f64() * 1000.0);
        }
    }
    if latencies.is_empty() {
        bail!("no workload latency samples");
    }
    Ok(latencies)
}

fn percentiles(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let idx = ((q * sorted.len() as f64).ceil() as usize).saturating_sub(1).min(sorted.len() - 1);
        sorted[idx]
    };
    json!({"samples": sorted.len(), "p50": at(0.50), "p99": at(0.99), "max": sorted.last()})
}

/// The naive checker over the same cluster and fake.
async fn naive(cp: &ControlPlane, fake: &fake_google::Running, args: &Args) -> Result<Value> {
    fake.fake.reset_counts();
    let script = authprobe_harness::repo_root().join("bench/naive-check.sh");
    let iam = format!("http://{}/iam", fake.addr);
    eprintln!("bench: running the naive checker");
    let started = Instant::now();
    let out = tokio::task::spawn_blocking({
        let kubeconfig = cp.kubeconfig_path();
        move || {
            Command::new("bash")
                .arg(script)
                .args([iam.as_str(), OPERATOR_TOKEN, POOL, "8"])
                .env("KUBECONFIG", kubeconfig)
                .env("KUBECTL", authprobe_harness::tools_bin().join("kubectl"))
                .output()
        }
    })
    .await??;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(out.status.success(), "naive checker failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let calls: u64 = fake.fake.counts().values().sum();
    let _ = args;
    Ok(json!({"seconds": seconds, "googleCalls": calls, "result": text, "parallel": 8}))
}

/// STS's default quota, exchanges per minute per project (the operator paces at its share).
const STS_PER_MINUTE: f64 = 6000.0;

/// One live chain's own time for a changed KSA, from what the run configures: the fake's latency
/// on each of the chain's sequential Google calls (the STS exchange, then generateAccessToken; the
/// TokenRequest is the local API server's), plus one STS pacing slot at the quota share, which the
/// exchange may wait for behind the one before it.
fn one_exchange_ms(args: &Args) -> f64 {
    let share = args.google_quota_share.unwrap_or(0.5);
    let slot_ms = 60_000.0 / (STS_PER_MINUTE * share).floor().max(1.0);
    2.0 * args.latency_ms as f64 + slot_ms
}

/// The change → status bar: 2 s, and with the live chain 2 s + one exchange.
fn change_bar_ms(args: &Args) -> f64 {
    if args.chain { 2000.0 + one_exchange_ms(args) } else { 2000.0 }
}

fn bars(r: &BTreeMap<&str, Value>, args: &Args) -> Value {
    let steady = &r["steadyApiRequests"];
    let lists: u64 = steady
        .as_object()
        .map(|o| o.iter().filter(|(k, _)| k.starts_with("list ")).map(|(_, v)| v.as_u64().unwrap_or(0)).sum())
        .unwrap_or(0);
    let writes = steady["patch authprobes/status"].as_u64().unwrap_or(0);
    let periodic = r["steadyPeriodicPassesDue"].as_u64().unwrap_or(0);
    let calls = &r["googleCallsPerInterval"];
    let policy = calls["iam.getIamPolicy"].as_f64().unwrap_or(0.0);
    let gets = calls["iam.serviceAccounts.get"].as_f64().unwrap_or(0.0);
    // With the live chain, a first sweep cannot beat the client-side STS pacing (the quota share
    // of Google's 6,000 a minute). The 60 s bar is for the mapping checks.
    let first = r["firstCompleteSeconds"].as_f64().unwrap_or(f64::MAX);
    let first_bar = if args.chain { json!(null) } else { json!(first <= 60.0) };
    let share = args.google_quota_share.unwrap_or(0.5);
    let every = args.token_exchange_interval_seconds.unwrap_or(args.interval_seconds) as f64;
    let sts_per_minute = (STS_PER_MINUTE * share).floor();
    let change_bar = change_bar_ms(args);
    // One read per GSA per interval (5% either way). With the chain a read waits for the pass
    // after it is an interval old, so two intervals hold fewer than two reads of some: at most.
    let tolerance = 0.5 + args.gsas as f64 * 0.05;
    let at_bound = |calls: f64| {
        calls <= args.gsas as f64 + tolerance && (args.chain || calls >= args.gsas as f64 - tolerance)
    };
    json!({
        "firstCompleteWithin60s": first_bar,
        "stsPacingFloorSeconds": if args.chain { json!((args.namespaces * args.ksas) as f64 * 60.0 / sts_per_minute) } else { json!(null) },
        "stsPerMinuteWithinShare": if args.chain { json!(r["stsExchangesMaxPerMinute"].as_f64().unwrap_or(f64::MAX) <= sts_per_minute) } else { json!(null) },
        "stsPerMinuteBar": if args.chain { json!(sts_per_minute) } else { json!(null) },
        "everyKsaVerifiedBarSeconds": if args.chain { json!(every) } else { json!(null) },
        "everyKsaVerifiedWithinInterval": if args.chain { json!(r["lastKsaVerifiedLiveSeconds"].as_f64().is_some_and(|t| t <= every)) } else { json!(null) },
        // The memory bars are for the mapping checks; the chain's runs report their RSS without one.
        "steadyRssWithinBar": (!args.chain).then(|| r["steadyRssMiB"].as_f64().unwrap_or(f64::MAX) <= rss_bar(args)),
        "relistPeakRssWithinBar": (!args.chain && !args.workloads).then(|| r["relistPeakRssMiB"].as_f64().unwrap_or(f64::MAX) <= RELIST_PEAK_BAR_MIB),
        "steadyRssBarMiB": rss_bar(args),
        "changeToStatusBarMs": change_bar,
        "oneExchangeMs": if args.chain { json!(one_exchange_ms(args)) } else { json!(null) },
        "changeToStatusP99WithinBar": r["changeToStatusMs"]["p99"].as_f64().unwrap_or(f64::MAX) <= change_bar,
        "workloadChangeToStatusP99Within2s": r.get("workloadChangeToStatusMs").map(|w| w["p99"].as_f64().unwrap_or(f64::MAX) <= 2000.0),
        "noListsInSteadyState": lists == 0,
        "noStatusWritesInSteadyState": writes <= periodic,
        "googleCallsAtLowerBound": at_bound(policy) && at_bound(gets)
            && ["iam.workloadIdentityPools.get", "iam.providers.get"].iter().all(|api| {
                calls[*api].as_f64().unwrap_or(0.0) <= r["googleLowerBound"][*api].as_f64().unwrap_or(0.0) + 0.5
            }),
    })
}

fn print_table(results: &BTreeMap<&str, Value>) {
    let r = |key: &str| results.get(key).unwrap_or(&Value::Null);
    let size = r("size");
    let num = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    let ok = |v: &Value| if v.as_bool() == Some(true) { "meets" } else { "MISSES" };
    let bars = r("bars");
    println!(
        "\n{} namespaces x {} KSAs over {} GSAs, {} probes, Google latency {} ms, chain {}{}",
        size["namespaces"],
        size["ksasPerNamespace"],
        size["gsas"],
        size["probes"],
        size["latencyMs"],
        size["chain"],
        if size["workloads"] == true {
            format!(", one Deployment per KSA, {} Federation probes", size["federationProbes"])
        } else {
            String::new()
        }
    );
    println!("{:<54} {:>8}  bar", "measure", "value");
    let row = |name: &str, value: String, bar: &str| println!("{name:<54} {value:>8}  {bar}");
    row("populate (s)", num(r("populateSeconds")), "");
    let first_bar = if bars["firstCompleteWithin60s"].is_null() {
        format!(
            "the 60 s bar applies without the chain (its first sweep's STS pacing floor: {} s)",
            bars["stsPacingFloorSeconds"]
        )
    } else {
        format!("{} (<= 60 s)", ok(&bars["firstCompleteWithin60s"]))
    };
    row("operator start -> every probe complete (s)", num(r("firstCompleteSeconds")), &first_bar);
    let verdict = r("firstVerdict");
    row(
        "first verdict: passing / failing / unknown KSAs",
        format!("{}/{}/{}", verdict["passing"], verdict["failing"], verdict["unknown"]),
        "(1% unmapped on purpose)",
    );
    let steady_bar = match bars["steadyRssWithinBar"].as_bool() {
        Some(_) => format!("{} (<= {} MiB)", ok(&bars["steadyRssWithinBar"]), bars["steadyRssBarMiB"]),
        None => String::new(),
    };
    row("steady RSS (MiB)", num(r("steadyRssMiB")), &steady_bar);
    let relist_bar = match bars["relistPeakRssWithinBar"].as_bool() {
        Some(_) => format!("{} (<= {RELIST_PEAK_BAR_MIB} MiB)", ok(&bars["relistPeakRssWithinBar"])),
        None => String::new(),
    };
    row("peak RSS during the forced re-list (MiB)", num(r("relistPeakRssMiB")), &relist_bar);
    row("peak RSS of the whole run (MiB)", num(r("peakRssMiB")), "");
    row("change -> status p50 (ms)", num(&r("changeToStatusMs")["p50"]), "");
    let change_bar = match bars["oneExchangeMs"].as_f64() {
        Some(one) => format!("2 s + one exchange ({one:.0} ms) = {} ms", bars["changeToStatusBarMs"]),
        None => "2 s".to_string(),
    };
    row(
        "change -> status p99 (ms)",
        num(&r("changeToStatusMs")["p99"]),
        &format!("{} (<= {change_bar})", ok(&bars["changeToStatusP99WithinBar"])),
    );
    if r("workloadChangeToStatusMs").is_object() {
        row("workload edit -> status p50 (ms)", num(&r("workloadChangeToStatusMs")["p50"]), "");
        row(
            "workload edit -> status p99 (ms)",
            num(&r("workloadChangeToStatusMs")["p99"]),
            &format!("{} (<= 2 s)", ok(&bars["workloadChangeToStatusP99Within2s"])),
        );
    }
    let steady = r("steadyApiRequests").as_object().cloned().unwrap_or_default();
    let steady_text = if steady.is_empty() {
        "none".to_string()
    } else {
        steady.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
    };
    let periodic = r("steadyPeriodicPassesDue").as_u64().unwrap_or(0);
    row(
        &format!(
            "API requests in {} s steady (from {} s)",
            r("steadyWindowSeconds"),
            num(r("steadyWindowStartSeconds"))
        ),
        steady_text,
        &format!(
            "{} lists, {} writes{}",
            ok(&bars["noListsInSteadyState"]),
            ok(&bars["noStatusWritesInSteadyState"]),
            if periodic > 0 { format!(" (beyond {periodic} periodic passes due)") } else { String::new() }
        ),
    );
    if let Some(calls) = r("googleCallsPerInterval").as_object() {
        for (api, v) in calls {
            row(&format!("Google {api} per interval"), num(v), "");
        }
    }
    row(
        "Google lower bound (policy reads, SA gets; provider reads)",
        num(&r("googleLowerBound")["iam.getIamPolicy"]),
        ok(&bars["googleCallsAtLowerBound"]),
    );
    if !r("stsExchangesMaxPerMinute").is_null() {
        row(
            "STS exchanges, most in a minute",
            num(r("stsExchangesMaxPerMinute")),
            &format!(
                "{} (<= {} at the quota share)",
                ok(&bars["stsPerMinuteWithinShare"]),
                bars["stsPerMinuteBar"]
            ),
        );
        row("STS exchanges, most in any 60 s", num(r("stsExchangesMaxPerSlidingMinute")), "");
        row(
            "operator start -> last KSA verified live (s)",
            num(r("lastKsaVerifiedLiveSeconds")),
            &format!(
                "{} (<= tokenExchangeInterval, {} s)",
                ok(&bars["everyKsaVerifiedWithinInterval"]),
                bars["everyKsaVerifiedBarSeconds"]
            ),
        );
    }
    if r("baseline").is_object() {
        row("naive checker wall time (s)", num(&r("baseline")["seconds"]), "");
        row("naive checker Google calls", num(&r("baseline")["googleCalls"]), "");
        row("ratio naive/authprobe wall time", num(&r("ratios")["wallTime"]), "");
        row("ratio naive/authprobe Google calls per pass", num(&r("ratios")["googleCalls"]), "");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busiest_minute_fixed_and_sliding() {
        // 10 exchanges a second for 90 s, sampled every 100 ms, then a burst of 150 at 100 s.
        let mut samples: Vec<(f64, u64)> = (1..=900).map(|i| (f64::from(i) / 10.0, 1)).collect();
        samples.push((100.0, 150));
        let (fixed, sliding) = max_per_minute(&samples);
        assert_eq!(fixed, 599, "minute 0 holds the samples at 0.1 s to 59.9 s; minute 1, 301 and 150");
        assert_eq!(sliding, 650, "from 40.1 s: 500 paced and the burst");
    }

    #[test]
    fn a_chain_run_allows_one_exchange_more_for_a_change() {
        let args = |extra: &[&str]| Args::parse_from([&["bench", "--out", "x"], extra].concat());
        assert_eq!(change_bar_ms(&args(&[])), 2000.0);
        let chain = args(&["--chain", "--google-quota-share", "0.1"]);
        // STS exchange and generateAccessToken at 50 ms each, one slot at 600 a minute.
        assert_eq!(one_exchange_ms(&chain), 200.0);
        assert_eq!(change_bar_ms(&chain), 2200.0);
        assert_eq!(one_exchange_ms(&args(&["--chain"])), 120.0, "the operator's default share, 0.5");
    }
}
