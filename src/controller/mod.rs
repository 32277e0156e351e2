//! The AuthProbe controller: AuthProbes, plus Namespace and ServiceAccount changes mapped to exactly
//! the probes whose selectors cover them (or covered them in the last pass, so losing coverage
//! re-checks too). Namespaces and ServiceAccounts are watched once, metadata only, pruned, and the
//! same watches feed both the caches the probes read and the triggers. Workloads and the
//! ConfigMaps they mount are watched the same way for stage `Workload` (see [`workloads`]).

mod canary;
pub mod inventory;
pub mod progress;
mod reconcile;
mod state;
mod watch;
pub mod workloads;

use std::{collections::HashSet, sync::Arc, time::Duration};

use anyhow::Context as _;

use futures::{StreamExt, TryStreamExt};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, Predicate as _, WatchStreamExt,
        controller::{self, Action},
        events::{Recorder, Reporter},
        predicates,
        reflector::{self, ObjectRef, Store},
        utils::ResetTimerBackoff,
        watcher::{self, ExponentialBackoff, watcher},
    },
};

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment, StatefulSet},
    batch::v1::{CronJob, Job},
    core::v1::Pod,
};

use self::{
    inventory::{Index, NamespaceMeta, ServiceAccountMeta, key},
    progress::Progress,
    state::States,
    workloads::{ConfigMapMeta, Touched, Workloads},
};
use crate::{
    api::AuthProbe,
    engine::{
        Plan,
        selector::{LabelLookup, NO_LABELS},
        workload::Lean,
    },
    fence::Fence,
    google::Google,
    metrics::Metrics,
    probe::{config_maps::ConfigMaps, endpoint::EndpointProber, exchange::Chain, issuer::ClusterIssuers},
};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "authprobe";

/// The controller's tuning.
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Probes reconciled at once.
    pub concurrency: u16,
    /// Quiet time before a burst of changes is reconciled.
    pub debounce: Duration,
    /// Watch list page size.
    pub page_size: u32,
    /// This replica's name in Events (`POD_NAME`).
    pub instance: Option<String>,
    /// A probe pass is abandoned after this long (it is retried with backoff).
    pub pass_deadline: Duration,
    /// `/healthz` fails when passes are attempted this long without one completing.
    pub stuck_after: Duration,
    /// At most this many live chains per probe pass (the quota share's exchanges in a pass).
    pub exchange_budget: usize,
    /// The image of canary Jobs; `None`: no canaries (and no watch on canary Jobs and Pods).
    pub canary_image: Option<String>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            concurrency: 4,
            debounce: Duration::from_millis(500),
            page_size: 500,
            instance: None,
            pass_deadline: Duration::from_secs(600),
            stuck_after: Duration::from_secs(1800),
            exchange_budget: crate::google::client::exchange_budget(
                crate::google::client::DEFAULT_QUOTA_SHARE,
            ),
            canary_image: None,
        }
    }
}

/// The operator's Kubernetes clients: long-polling watches need a read timeout longer than the
/// server's watch timeout; every other call (status, Events, TokenRequest, the Lease) gets a
/// short one, so nothing waits on a hung API server for long.
#[derive(Clone)]
pub struct Clients {
    /// For watches.
    pub watch: kube::Client,
    /// For every other call.
    pub call: kube::Client,
}

/// The read timeout of calls other than watches.
pub const CALL_READ_TIMEOUT: Duration = Duration::from_secs(10);

impl Clients {
    /// Clients for the current kubeconfig or in-cluster configuration.
    pub async fn connect() -> anyhow::Result<Self> {
        Self::from_config(kube::Config::infer().await.context("connecting to Kubernetes")?)
    }

    /// Clients for `config`. Requests carry `authprobe/VERSION (POD_NAME)` as their user agent,
    /// so the API server's audit log tells the replicas apart.
    pub fn from_config(mut config: kube::Config) -> anyhow::Result<Self> {
        let agent = format!(
            "authprobe/{} ({})",
            env!("CARGO_PKG_VERSION"),
            std::env::var("POD_NAME").unwrap_or_else(|_| format!("pid {}", std::process::id()))
        );
        if let Ok(value) = http::HeaderValue::from_str(&agent) {
            config.headers.push((http::header::USER_AGENT, value));
        }
        let watch = kube::Client::try_from(config.clone()).context("connecting to Kubernetes")?;
        let mut call = config;
        call.read_timeout = Some(CALL_READ_TIMEOUT);
        call.write_timeout = Some(CALL_READ_TIMEOUT);
        call.connect_timeout = Some(Duration::from_secs(5));
        let call = kube::Client::try_from(call).context("connecting to Kubernetes")?;
        Ok(Self { watch, call })
    }
}

/// Why a reconcile failed; the category is a bounded metric label.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The status subresource could not be written.
    #[error("writing the status of {probe}: {source}")]
    StatusWrite {
        /// The probe.
        probe: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The caches never filled (their watches ended).
    #[error("the Namespace and ServiceAccount caches are gone")]
    CachesGone,
    /// The pass did not finish within its deadline.
    #[error("the pass of {probe} did not finish within {deadline:?}")]
    PassDeadline {
        /// The probe.
        probe: String,
        /// The deadline.
        deadline: Duration,
    },
    /// This replica stopped leading during the pass: it writes nothing more.
    #[error("stopped leading during the pass of {probe}; nothing more is written")]
    Fenced {
        /// The probe.
        probe: String,
    },
}

impl Error {
    /// The bounded category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::StatusWrite { .. } => "StatusWrite",
            Error::CachesGone => "CachesGone",
            Error::PassDeadline { .. } => "PassDeadline",
            Error::Fenced { .. } => "Fenced",
        }
    }
}

/// Everything reconciles share.
pub struct Context {
    /// For status writes (watches use their own client).
    client: Client,
    fence: Arc<Fence>,
    progress: Arc<Progress>,
    pass_deadline: Duration,
    exchange_budget: usize,
    google: Arc<Google>,
    issuers: ClusterIssuers,
    chain: Chain,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    probes: Store<AuthProbe>,
    /// Namespaces and ServiceAccounts.
    index: Arc<Index>,
    /// Turns for passes: `Tuning::concurrency` at once (0: unbounded), in the order they asked.
    passes: tokio::sync::Semaphore,
    states: Arc<States>,
    workloads: Arc<Workloads>,
    config_maps: Arc<ConfigMaps>,
    /// With `--canary-image`.
    canaries: Option<canary::Canaries>,
}

impl Context {
    /// The probes a namespace change concerns: those selecting it now or in their last pass.
    fn probes_for_namespace(&self, namespace: &str, labels: &dyn LabelLookup) -> Vec<ObjectRef<AuthProbe>> {
        let ns_key = key(&[namespace]);
        self.probes
            .state()
            .iter()
            .filter(|p| {
                let selects =
                    self.states.plan(p).as_ref().as_ref().is_ok_and(|plan| plan.selects_namespace(labels));
                selects || self.states.covered_last_pass(&p.uid().unwrap_or_default(), ns_key)
            })
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect()
    }

    /// The probes a ServiceAccount change concerns: those covering its namespace.
    fn probes_for_service_account(&self, sa: &ServiceAccountMeta) -> Vec<ObjectRef<AuthProbe>> {
        let namespace = sa.metadata.namespace.as_deref().unwrap_or_default();
        self.index.with_namespace_labels(namespace, |labels| self.probes_for_namespace(namespace, labels))
    }

    /// The probes a workload or mounted-ConfigMap change in `namespace` concerns: those selecting
    /// it now whose plan passes `reads` (inspects workloads, or reads ConfigMaps).
    fn probes_inspecting(&self, namespace: &str, reads: fn(&Plan) -> bool) -> Vec<ObjectRef<AuthProbe>> {
        self.index.with_namespace_labels(namespace, |labels| {
            self.probes
                .state()
                .iter()
                .filter(|p| {
                    self.states
                        .plan(p)
                        .as_ref()
                        .as_ref()
                        .is_ok_and(|plan| reads(plan) && plan.selects_namespace(labels))
                })
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect()
        })
    }

    async fn wait_for_caches(&self) -> Result<(), Error> {
        self.index.wait_until_ready().await.map_err(|_| Error::CachesGone)
    }
}

/// Forgets a probe's state and metric series as soon as its Delete event arrives, and after a
/// re-list every probe the list no longer shows (a watch that was down reports no Delete).
fn forget_deleted(
    states: Arc<States>,
    metrics: Arc<Metrics>,
) -> impl FnMut(&watcher::Event<AuthProbe>) + use<> {
    let mut listed: HashSet<String> = HashSet::new();
    move |event| {
        let gone = match event {
            watcher::Event::Delete(p) => states.forget(&p.uid().unwrap_or_default()).into_iter().collect(),
            watcher::Event::Init => {
                listed.clear();
                vec![]
            }
            watcher::Event::InitApply(p) => {
                listed.insert(p.uid().unwrap_or_default());
                vec![]
            }
            watcher::Event::InitDone => states.retain(&listed),
            watcher::Event::Apply(_) => vec![],
        };
        for name in gone {
            tracing::debug!(probe = %name, "probe deleted: its state and series are gone");
            metrics.forget_probe(&name);
        }
    }
}

/// Per-object exponential backoff on errors (1 s doubling to 5 min, with jitter), reset on success.
fn error_policy(probe: Arc<AuthProbe>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(error.category());
    let name = probe.name_any();
    let attempt = ctx.states.failed(&probe);
    let delay = Duration::from_secs(1u64 << attempt.min(9).saturating_sub(1)).min(Duration::from_secs(300));
    let delay = delay.mul_f64(1.0 + rand::random::<f64>() * 0.2);
    tracing::warn!(probe = %name, category = error.category(), %error, attempt, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Watch retries: 0.5 s doubling to 5 s, plus up to as much again in jitter, reset after a minute
/// without errors. kube's
/// default (0.8 s to 30 s) is tuned for fleets of clients; one operator recovering from an API
/// server restart (which answers 410 Expired to every resumed watch) needs it quicker.
fn watch_backoff() -> ResetTimerBackoff<ExponentialBackoff> {
    let builder = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(5))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times();
    ResetTimerBackoff::new(ExponentialBackoff::from(builder), Duration::from_secs(60))
}

/// Reports each watch item to `progress` and logs errors (the watch itself retries them).
fn observe<T, E: std::fmt::Display>(
    progress: &Arc<Progress>,
    watch: &'static str,
) -> impl FnMut(&Result<T, E>) + use<T, E> {
    let progress = progress.clone();
    move |item| match item {
        Ok(_) => progress.watch_ok(watch),
        Err(error) => {
            tracing::warn!(watch, %error, "watch failed; retrying");
            progress.watch_failed(watch);
        }
    }
}

/// Keeps watch errors from the controller: it backs off its whole trigger stream on any error
/// (0.8 s doubling to 30 s), which stalls every watch behind one that failed, on top of that
/// watch's own retries. Errors end here, already logged and counted by [`observe`].
fn objects_only<T, E>(item: &Result<T, E>) -> futures::future::Ready<bool> {
    futures::future::ready(item.is_ok())
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first. It acts
/// only while `fence` holds; each new term re-reads every probe and what others wrote.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    clients: Clients,
    google: Arc<Google>,
    endpoints: EndpointProber,
    metrics: Arc<Metrics>,
    tuning: Tuning,
    progress: Arc<Progress>,
    fence: Arc<Fence>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let Clients { watch: client, call } = clients;
    let watch_config = watcher::Config::default().page_size(tuning.page_size);
    // Namespaces and ServiceAccounts go into the compact index as they arrive.
    let index = Arc::new(Index::default());
    let ns_events = inventory::follow(
        watch::listing(Api::<NamespaceMeta>::all(client.clone()), watch_config.clone())
            .backoff(watch_backoff())
            .inspect(observe(&progress, "Namespace")),
        index.clone(),
        Index::namespace_event,
    )
    .filter(objects_only);
    let sa_events = inventory::follow(
        watch::listing(Api::<ServiceAccountMeta>::all(client.clone()), watch_config.clone())
            .backoff(watch_backoff())
            .inspect(observe(&progress, "ServiceAccount")),
        index.clone(),
        Index::service_account_event,
    )
    .filter(objects_only);

    // Workloads, pruned to the stage's view as they arrive; ConfigMaps by metadata only.
    let workloads = Arc::new(Workloads::default());
    let config_maps = Arc::new(ConfigMaps::new(call.clone()));
    macro_rules! workload_events {
        ($kind:ty, $name:literal) => {
            workloads::watch_kind(
                watch::listing(Api::<Lean<$kind>>::all(client.clone()), watch_config.clone())
                    .backoff(watch_backoff())
                    .inspect(observe(&progress, $name)),
                workloads.clone(),
            )
            .filter(objects_only)
        };
    }
    let workload_events = futures::stream::select_all([
        workload_events!(Deployment, "Deployment").boxed(),
        workload_events!(StatefulSet, "StatefulSet").boxed(),
        workload_events!(DaemonSet, "DaemonSet").boxed(),
        workload_events!(Job, "Job").boxed(),
        workload_events!(CronJob, "CronJob").boxed(),
        workload_events!(Pod, "Pod").boxed(),
    ]);
    let config_map_events = workloads::watch_config_maps(
        watch::listing(Api::<ConfigMapMeta>::all(client.clone()), watch_config.clone())
            .backoff(watch_backoff())
            .inspect(observe(&progress, "ConfigMap"))
            .modify(inventory::prune_config_map),
        workloads.clone(),
        config_maps.clone(),
    )
    .filter(objects_only);

    // Status writes do not re-trigger: only spec (generation) and annotation (probe-now) changes do.
    // Specs naming a host the prober may not call are invalid before anything is sent.
    let states = Arc::new(States::new(endpoints.allow().clone()));
    let (probes, probe_writer) = reflector::store::<AuthProbe>();
    let probe_events = watcher(Api::<AuthProbe>::all(client.clone()), watcher::Config::default())
        .backoff(watch_backoff())
        .inspect(observe(&progress, "AuthProbe"))
        .inspect_ok(forget_deleted(states.clone(), metrics.clone()))
        .reflect(probe_writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation::<AuthProbe>.combine(predicates::annotations),
            Default::default(),
        )
        .filter(objects_only);

    // Canary Jobs and their Pods, only those, only when canaries are on: a Pod's change wakes
    // its probe, which reads the result from the Pod's status. Watches of their own (the workload
    // watches above keep no labels or status), named apart from them for readiness.
    let canary_watches = tuning.canary_image.clone().map(|image| {
        let canary_config = watcher::Config::default().labels(crate::engine::canary::job::SELECTOR);
        let (jobs, job_writer) = reflector::store::<Job>();
        let job_events = watcher(Api::<Job>::all(client.clone()), canary_config.clone())
            .backoff(watch_backoff())
            .inspect(observe(&progress, "canary Job"))
            .modify(canary::prune_job)
            .reflect(job_writer)
            .touched_objects()
            .filter(objects_only);
        let (pods, pod_writer) = reflector::store::<Pod>();
        let pod_events = watcher(Api::<Pod>::all(client.clone()), canary_config)
            .backoff(watch_backoff())
            .inspect(observe(&progress, "canary Pod"))
            .modify(canary::prune_pod)
            .reflect(pod_writer)
            .touched_objects()
            .filter(objects_only);
        (canary::Canaries::new(call.clone(), image, fence.clone(), jobs, pods), job_events, pod_events)
    });
    let (canaries, canary_events) = match canary_watches {
        Some((canaries, jobs, pods)) => (Some(canaries), Some((jobs, pods))),
        None => (None, None),
    };
    let ctx = Arc::new(Context {
        client: call.clone(),
        fence: fence.clone(),
        progress: progress.clone(),
        pass_deadline: tuning.pass_deadline,
        exchange_budget: tuning.exchange_budget,
        chain: Chain::new(call.clone(), google.clone(), metrics.clone(), fence.clone(), Arc::new(endpoints)),
        google,
        issuers: ClusterIssuers::new(call.clone()),
        metrics,
        recorder: Recorder::new(
            call.clone(),
            Reporter { controller: "authprobe".into(), instance: tuning.instance.clone() },
        ),
        probes: probes.clone(),
        index: index.clone(),
        passes: tokio::sync::Semaphore::new(match tuning.concurrency {
            0 => tokio::sync::Semaphore::MAX_PERMITS,
            n => usize::from(n),
        }),
        states,
        workloads: workloads.clone(),
        config_maps,
        canaries,
    });

    let stores_ready = {
        let probes = probes.clone();
        async move {
            let synced = probes.wait_until_ready().await.is_ok() && index.wait_until_ready().await.is_ok();
            workloads.wait_until_ready().await;
            if synced {
                let (namespaces, service_accounts) = index.len();
                tracing::info!(namespaces, service_accounts, workloads = workloads.len(), "watches synced");
                progress.synced();
            }
        }
    };
    // A new term: forget what this replica remembered of Events and writes (another leader may
    // have moved on since) and re-check every probe.
    let new_terms =
        futures::stream::unfold((fence.terms(), ctx.states.clone()), |(mut terms, states)| async move {
            terms.changed().await.ok()?;
            states.reset_memories();
            Some(((), (terms, states)))
        });
    let ns_ctx = ctx.clone();
    let sa_ctx = ctx.clone();
    let workload_ctx = ctx.clone();
    let config_map_ctx = ctx.clone();
    let mut controller = Controller::for_stream(probe_events, probes.clone())
        .reconcile_all_on(new_terms)
        // Unbounded here: `passes` limits them, fairly.
        .with_config(controller::Config::default().concurrency(0).debounce(tuning.debounce))
        .watches_stream(ns_events, move |ns: NamespaceMeta| {
            ns_ctx.probes_for_namespace(
                ns.metadata.name.as_deref().unwrap_or_default(),
                ns.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            )
        })
        .watches_stream(sa_events, move |sa: ServiceAccountMeta| sa_ctx.probes_for_service_account(&sa))
        .watches_stream(workload_events, move |ns: Touched| {
            workload_ctx
                .probes_inspecting(ns.metadata.name.as_deref().unwrap_or_default(), |p| p.inspect_workloads)
        })
        .watches_stream(config_map_events, move |ns: Touched| {
            config_map_ctx.probes_inspecting(ns.metadata.name.as_deref().unwrap_or_default(), |p| {
                p.inspect_workloads && p.federation.is_some()
            })
        });
    if let Some((job_events, pod_events)) = canary_events {
        let (job_probes, pod_probes) = (probes.clone(), probes);
        controller = controller
            .watches_stream(job_events, move |j: Job| canary::probe_of(&job_probes, j.labels()))
            .watches_stream(pod_events, move |p: Pod| canary::probe_of(&pod_probes, p.labels()));
    }
    let controller = controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((probe, _)) => tracing::debug!(probe = %probe.name, "reconciled"),
                Err(controller::Error::ReconcilerFailed(..)) => {} // logged by the error policy
                Err(controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(probe = %obj.name, "probe deleted before its reconcile")
                }
                Err(e) => tracing::warn!(error = %e, "controller"),
            }
        });
    tokio::join!(controller, stores_ready);
}
