//! The AuthProbe controller: AuthProbes, plus Namespace and ServiceAccount changes mapped to exactly
//! the probes whose selectors cover them (or covered them in the last pass, so losing coverage
//! re-checks too). Namespaces and ServiceAccounts are watched once, metadata only, pruned, and the
//! same watches feed both the caches the probes read and the triggers.

mod history;
mod reconcile;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::jiff::Timestamp;
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

use self::history::History;
use crate::{
    api::{AuthProbe, AuthProbeStatus},
    chain::Chain,
    cluster::ClusterIssuers,
    engine::Plan,
    google::Google,
    health::Health,
    inventory::{self, AnnotationChanges, NamespaceMeta, ServiceAccountMeta, key},
    metrics::Metrics,
};

/// The field manager of every status write.
pub const FIELD_MANAGER: &str = "authprobe";

/// Tunables.
#[derive(Clone, Debug)]
pub struct Config {
    /// Probes reconciled at once.
    pub concurrency: u16,
    /// Quiet time before a burst of changes is reconciled.
    pub debounce: Duration,
    /// Watch list page size.
    pub page_size: u32,
    /// This replica's name in Events (`POD_NAME`).
    pub instance: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self { concurrency: 4, debounce: Duration::from_millis(500), page_size: 500, instance: None }
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
}

impl Error {
    /// The bounded category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            Error::StatusWrite { .. } => "StatusWrite",
            Error::CachesGone => "CachesGone",
        }
    }
}

/// What one probe remembers between passes.
#[derive(Debug, Default)]
struct ProbeState {
    history: History,
    /// Namespaces selected in the last pass (compact keys), to notice coverage being lost or gained.
    scope: Option<HashSet<u64>>,
    /// When a namespace entered the probe's scope, for the propagation grace.
    entered: HashMap<u64, Timestamp>,
    /// The last `authprobe.io/probe-now` value acted on.
    probe_now: Option<String>,
    /// The status this replica last wrote: the cached object can lag behind it by a watch event.
    written: Option<AuthProbeStatus>,
}

/// A probe's checked spec and the generation it was checked at.
type CachedPlan = (Option<i64>, Arc<Result<Plan, String>>);

/// Everything reconciles share.
pub struct Context {
    client: Client,
    google: Arc<Google>,
    issuers: ClusterIssuers,
    chain: Chain,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    probes: Store<AuthProbe>,
    namespaces: Store<NamespaceMeta>,
    service_accounts: Store<ServiceAccountMeta>,
    annotation_changes: Arc<AnnotationChanges>,
    states: Mutex<HashMap<String, ProbeState>>,
    plans: Mutex<HashMap<String, CachedPlan>>,
    failures: Mutex<HashMap<String, u32>>,
}

impl Context {
    /// The checked spec of `probe`, parsed once per generation.
    fn plan(&self, probe: &AuthProbe) -> Arc<Result<Plan, String>> {
        let name = probe.name_any();
        let generation = probe.metadata.generation;
        let mut plans = match self.plans.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        match plans.get(&name) {
            Some((g, plan)) if *g == generation => plan.clone(),
            _ => {
                let plan = Arc::new(Plan::parse(&probe.spec));
                plans.insert(name, (generation, plan.clone()));
                plan
            }
        }
    }

    fn covered_last_pass(&self, probe: &str, namespace_key: u64) -> bool {
        self.states
            .lock()
            .ok()
            .and_then(|s| s.get(probe).and_then(|p| p.scope.as_ref().map(|sc| sc.contains(&namespace_key))))
            .unwrap_or(false)
    }

    /// The probes a namespace change concerns: those selecting it now or in their last pass.
    fn probes_for_namespace(
        &self,
        namespace: &str,
        labels: Option<&std::collections::BTreeMap<String, String>>,
    ) -> Vec<ObjectRef<AuthProbe>> {
        let ns_key = key(&[namespace]);
        self.probes
            .state()
            .iter()
            .filter(|p| {
                let selects = self.plan(p).as_ref().as_ref().is_ok_and(|plan| plan.selects_namespace(labels));
                selects || self.covered_last_pass(&p.name_any(), ns_key)
            })
            .map(|p| ObjectRef::from_obj(p.as_ref()))
            .collect()
    }

    /// The probes a ServiceAccount change concerns: those covering its namespace.
    fn probes_for_service_account(&self, sa: &ServiceAccountMeta) -> Vec<ObjectRef<AuthProbe>> {
        let namespace = sa.metadata.namespace.as_deref().unwrap_or_default();
        let ns = self.namespaces.get(&ObjectRef::new(namespace));
        self.probes_for_namespace(namespace, ns.as_ref().and_then(|n| n.metadata.labels.as_ref()))
    }

    /// Drops the memory and metrics of probes that no longer exist.
    fn forget_deleted(&self) {
        let live: HashSet<String> = self.probes.state().iter().map(|p| p.name_any()).collect();
        let gone: Vec<String> = match self.states.lock() {
            Ok(mut states) => {
                let gone = states.keys().filter(|k| !live.contains(*k)).cloned().collect::<Vec<_>>();
                for g in &gone {
                    states.remove(g);
                }
                gone
            }
            Err(_) => vec![],
        };
        for probe in gone {
            self.metrics.forget_probe(&probe);
            if let Ok(mut plans) = self.plans.lock() {
                plans.remove(&probe);
            }
        }
    }

    async fn wait_for_caches(&self) -> Result<(), Error> {
        self.namespaces.wait_until_ready().await.map_err(|_| Error::CachesGone)?;
        self.service_accounts.wait_until_ready().await.map_err(|_| Error::CachesGone)
    }
}

/// Per-object exponential backoff on errors (1 s doubling to 5 min, with jitter), reset on success.
fn error_policy(probe: Arc<AuthProbe>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(error.category());
    let name = probe.name_any();
    let attempt = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(name.clone()).or_default();
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
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

/// Reports each watch item to `health` and logs errors (the watch itself retries them).
fn observe<T, E: std::fmt::Display>(
    health: &Arc<Health>,
    watch: &'static str,
) -> impl FnMut(&Result<T, E>) + use<T, E> {
    let health = health.clone();
    move |item| match item {
        Ok(_) => health.watch_ok(watch),
        Err(error) => {
            tracing::warn!(watch, %error, "watch failed; retrying");
            health.watch_failed(watch);
        }
    }
}

/// Keeps watch errors from the controller: it backs off its whole trigger stream on any error
/// (0.8 s doubling to 30 s), which stalls every watch behind one that failed, on top of that
/// watch's own retries. Errors end here, already logged and counted by [`observe`].
fn objects_only<T, E>(item: &Result<T, E>) -> futures::future::Ready<bool> {
    futures::future::ready(item.is_ok())
}

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    google: Arc<Google>,
    metrics: Arc<Metrics>,
    config: Config,
    health: Arc<Health>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let watch_config = watcher::Config::default().page_size(config.page_size);
    let (namespaces, ns_writer) = reflector::store::<NamespaceMeta>();
    let ns_events = watcher(Api::<NamespaceMeta>::all(client.clone()), watch_config.clone())
        .backoff(watch_backoff())
        .inspect(observe(&health, "Namespace"))
        .modify(inventory::prune_namespace)
        .reflect(ns_writer)
        .touched_objects()
        .filter(objects_only);

    let annotation_changes = Arc::new(AnnotationChanges::default());
    let (service_accounts, sa_writer) = reflector::store::<ServiceAccountMeta>();
    let changes = annotation_changes.clone();
    let sa_events = watcher(Api::<ServiceAccountMeta>::all(client.clone()), watch_config.clone())
        .backoff(watch_backoff())
        .inspect(observe(&health, "ServiceAccount"))
        .modify(inventory::prune_service_account)
        .inspect_ok(move |event| match event {
            watcher::Event::Apply(sa) | watcher::Event::InitApply(sa) => changes.observe(sa),
            watcher::Event::Delete(sa) => changes.forget(sa),
            watcher::Event::Init | watcher::Event::InitDone => {}
        })
        .reflect(sa_writer)
        .touched_objects()
        .filter(objects_only);

    // Status writes do not re-trigger: only spec (generation) and annotation (probe-now) changes do.
    let (probes, probe_writer) = reflector::store::<AuthProbe>();
    let probe_events = watcher(Api::<AuthProbe>::all(client.clone()), watcher::Config::default())
        .backoff(watch_backoff())
        .inspect(observe(&health, "AuthProbe"))
        .reflect(probe_writer)
        .applied_objects()
        .predicate_filter(
            predicates::generation::<AuthProbe>.combine(predicates::annotations),
            Default::default(),
        )
        .filter(objects_only);

    let ctx = Arc::new(Context {
        client: client.clone(),
        chain: Chain::new(client.clone(), google.clone(), metrics.clone()),
        google,
        issuers: ClusterIssuers::new(client.clone()),
        metrics,
        recorder: Recorder::new(
            client.clone(),
            Reporter { controller: "authprobe".into(), instance: config.instance.clone() },
        ),
        probes: probes.clone(),
        namespaces: namespaces.clone(),
        service_accounts: service_accounts.clone(),
        annotation_changes,
        states: Mutex::new(HashMap::new()),
        plans: Mutex::new(HashMap::new()),
        failures: Mutex::new(HashMap::new()),
    });

    let stores_ready = {
        let (p, n, s) = (probes.clone(), namespaces.clone(), service_accounts.clone());
        async move {
            let synced = futures::try_join!(p.wait_until_ready(), n.wait_until_ready(), s.wait_until_ready());
            if synced.is_ok() {
                tracing::info!("watches synced");
                health.synced();
            }
        }
    };
    let ns_ctx = ctx.clone();
    let sa_ctx = ctx.clone();
    let controller = Controller::for_stream(probe_events, probes)
        .with_config(controller::Config::default().concurrency(config.concurrency).debounce(config.debounce))
        .watches_stream(ns_events, move |ns: NamespaceMeta| {
            ns_ctx.probes_for_namespace(
                ns.metadata.name.as_deref().unwrap_or_default(),
                ns.metadata.labels.as_ref(),
            )
        })
        .watches_stream(sa_events, move |sa: ServiceAccountMeta| sa_ctx.probes_for_service_account(&sa))
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
