//! One probe pass, shared by the operator and `authprobe check`: static checks, the Google reads
//! they call for (once per GSA and Cloud Run service, however many KSAs name it) and the
//! ConfigMaps the KSAs' workloads mount, then the engine's verdict per KSA.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use k8s_openapi::jiff::Timestamp;

pub mod config_maps;
pub mod endpoint;
pub mod exchange;
pub mod issuer;

use self::{
    config_maps::ConfigMaps,
    exchange::{Chain, Exchange, Job, Verified},
    issuer::ClusterIssuers,
};
use crate::{
    engine::{
        Candidate, Facts, Finding, GsaFacts, Ksa, Plan, Prepared, TokenClaims, Verdict,
        annotation::GsaEmail,
        canary,
        grace::Grace,
        principal::KsaIdentity,
        report::KsaOutcome,
        schedule::{Cadence, LiveLedger, Run, Wanted, Why, inputs_fingerprint},
        stage::cloud_run::{self, RunServices},
        workload::{Workload, WorkloadView},
    },
    google::Google,
};

/// How many Google reads run at once within one pass (the client's rate limits still apply).
const READ_CONCURRENCY: usize = 16;

/// What a pass talks to.
#[derive(Clone, Copy)]
pub struct Services<'a> {
    /// Google.
    pub google: &'a Google,
    /// The cluster's issuer and keys (Federation).
    pub issuers: &'a ClusterIssuers,
    /// The live chain, for probes with `tokenExchange: true`.
    pub chain: Option<&'a Chain>,
    /// The workloads, for stage `Workload`.
    pub workloads: &'a (dyn WorkloadView + Sync),
    /// The ConfigMaps they mount.
    pub config_maps: &'a ConfigMaps,
}

/// One pass over a probe's KSAs.
#[derive(Debug)]
pub struct Pass<'a> {
    /// The probe's name.
    pub probe: &'a str,
    /// The checked spec.
    pub plan: &'a Plan,
    /// The selected KSAs (required names included).
    pub candidates: Vec<Candidate>,
    /// Google facts older than this are read again.
    pub max_age: Duration,
    /// The pass's clock.
    pub now: Timestamp,
    /// The probe's live verifications: the chain runs only for the KSAs it schedules. `None`
    /// (`authprobe check`): it runs for every KSA.
    pub live: Option<Live<'a>>,
}

/// The live chain's schedule for one probe.
#[derive(Debug)]
pub struct Live<'a> {
    /// Its live verifications, updated with this pass's.
    pub ledger: &'a mut LiveLedger,
    /// At most this many chains in this pass.
    pub budget: usize,
}

/// Why a KSA's chain runs in this pass, and the age of a cached exchange it may reuse.
type DueNow = (Duration, Why);

/// A KSA past the mapping stages, with the principal it maps to, or why not.
type Mapped = Result<(Prepared, KsaIdentity), Finding>;

/// The verdict of a pass, and when it should be looked at again because a propagation grace ends.
#[derive(Debug)]
pub struct Evaluated {
    /// One per candidate.
    pub outcomes: Vec<KsaOutcome>,
    /// The earliest end of a grace that turned a failure into PropagationPending, or of an
    /// endpoint request whose answer this pass did not wait for.
    pub recheck_at: Option<Timestamp>,
    /// With a canary: per KSA (namespace, name), the fingerprint its canary should report.
    pub fingerprints: HashMap<(String, String), String>,
    /// With the live chain: how many KSAs were verified live within `tokenExchangeInterval`.
    pub live_verified: Option<u32>,
    /// With a schedule: when the next chains are due.
    pub chain_due: Option<Timestamp>,
}

/// Evaluates every candidate. `changed_at` says when a KSA last changed in a way that opens the
/// propagation grace (creation, annotation, entering scope); GSA policy changes are added here.
pub async fn evaluate(
    services: Services<'_>,
    pass: Pass<'_>,
    changed_at: impl Fn(&Candidate) -> Option<Timestamp>,
) -> Evaluated {
    let Pass { probe, plan, candidates, max_age, now, live } = pass;
    let pass_started = Instant::now();
    let prepared = plan.static_stage(candidates);

    let mut wanted: Vec<GsaEmail> =
        prepared.iter().filter_map(|(_, p)| p.as_ref().ok()?.gsa.clone()).collect();
    wanted.sort();
    wanted.dedup();
    let unavailable = services.workloads.unavailable().filter(|_| plan.inspect_workloads);
    let workloads = workloads_of(plan, services.workloads, &prepared);
    let mut mounted: Vec<(String, String)> =
        workloads.iter().flat_map(|((_, name), w)| plan.config_maps_to_read(name, w)).collect();
    mounted.sort();
    mounted.dedup();
    let google = services.google;
    let gsa_reads = stream::iter(wanted)
        .map(|gsa: GsaEmail| async move {
            let facts = google.gsa(&gsa, max_age).await;
            (gsa, facts)
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect::<BTreeMap<GsaEmail, Arc<GsaFacts>>>();
    let federation_reads = async {
        match &plan.federation {
            Some(f) => {
                let (provider, cluster) =
                    tokio::join!(services.google.provider(f, max_age), services.issuers.get(max_age));
                (Some(provider), Some(cluster))
            }
            None => (None, None),
        }
    };
    let (gsas, (provider, cluster), config_maps) =
        tokio::join!(gsa_reads, federation_reads, services.config_maps.read(mounted));
    let facts =
        Facts { gsas: &gsas, provider: provider.as_deref(), cluster: cluster.as_ref(), now: now.as_second() };
    // With a canary: the fingerprint each KSA's canary should report.
    let expected_fingerprints = match plan.canary {
        Some(_) => prepared
            .iter()
            .filter_map(|(_, p)| {
                let p = p.as_ref().ok()?;
                let account = p.gsa.as_ref().and_then(|g| gsas.get(g)?.account.as_ref().ok()?.as_ref());
                let cluster = facts.cluster.and_then(|c| c.as_ref().ok());
                let fp = canary::expected_fingerprint(plan, &p.ksa, account, cluster)?;
                Some(((p.ksa.namespace.clone(), p.ksa.name.clone()), fp))
            })
            .collect(),
        None => HashMap::new(),
    };
    let mut run_names: Vec<String> = plan.targets.iter().filter_map(|t| t.kind.cloud_run_service()).collect();
    run_names.sort();
    run_names.dedup();
    if !prepared.iter().any(|(_, p)| p.is_ok()) {
        run_names.clear();
    }
    let run_services: RunServices = stream::iter(run_names)
        .map(|name: String| async move {
            let service = google.run_service(&name, max_age).await;
            (name, service)
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;

    // Stage Workload: a failing finding stops the KSA there; an undecided one lets the later
    // stages run and is kept for the verdict.
    let prepared: Vec<(Candidate, Result<Prepared, Finding>, Option<Finding>)> = prepared
        .into_iter()
        .map(|(candidate, prepared)| {
            let Ok(p) = prepared else { return (candidate, prepared, None) };
            let key = (candidate.namespace.clone(), candidate.name.clone());
            let listed = match &unavailable {
                Some(why) => Err(why),
                None => Ok(workloads.get(&key).map_or(&[][..], Vec::as_slice)),
            };
            let found = plan.workload_stage(&p, listed, &config_maps, &facts);
            match found {
                Some(f) if f.verdict == Verdict::Fail => (candidate, Err(f), None),
                undecided => (candidate, Ok(p), undecided),
            }
        })
        .collect();

    // The live chain: which KSAs it runs for now (all of them without a schedule), each with
    // the age of a cached exchange it may reuse.
    let chain = services.chain.filter(|_| plan.token_exchange);
    let ready: Vec<&Prepared> = prepared.iter().filter_map(|(_, p, _)| p.as_ref().ok()).collect();
    let shared = SharedInputs::of(&gsas, provider.as_deref(), cluster.as_ref());
    let fingerprints: Vec<Option<u64>> = ready
        .iter()
        .map(|p| {
            let ran_by = workloads.get(&(p.ksa.namespace.clone(), p.ksa.name.clone()));
            inputs(p, ran_by, &shared)
        })
        .collect();
    let ready_keys: Vec<(String, String)> =
        ready.iter().map(|p| (p.ksa.namespace.clone(), p.ksa.name.clone())).collect();
    let live_wanted: Vec<Wanted<'_>> = ready_keys
        .iter()
        .zip(&fingerprints)
        .map(|((namespace, name), inputs)| Wanted { namespace, name, inputs: *inputs })
        .collect();
    let cadence = Cadence {
        every: plan.exchange_interval,
        retry: plan.interval,
        budget: live.as_ref().map_or(usize::MAX, |l| l.budget),
    };
    let (due, deferred): (HashMap<(String, String), DueNow>, usize) = match (chain, &live) {
        (None, _) => (HashMap::new(), 0),
        (Some(_), None) => (
            ready
                .iter()
                .map(|p| ((p.ksa.namespace.clone(), p.ksa.name.clone()), (max_age, Why::New)))
                .collect(),
            0,
        ),
        (Some(_), Some(l)) => {
            let schedule = l.ledger.schedule(&live_wanted, cadence, now);
            // Never older than the pass allows: a forced pass (probe-now) reuses nothing.
            (
                schedule.due.into_iter().map(|d| (d.key, (d.max_age.min(max_age), d.why))).collect(),
                schedule.deferred,
            )
        }
    };

    // Mint and exchange first (shared per KSA and audience), so the provider checks read the
    // claims the cluster really issues; a KSA not due keeps the claims of its last exchange.
    let exchanges: HashMap<(String, String), Arc<Exchange>> = match chain {
        Some(chain) => {
            let work: Vec<(Ksa, Duration)> = ready
                .iter()
                .filter_map(|p| {
                    let (age, _) = due.get(&(p.ksa.namespace.clone(), p.ksa.name.clone()))?;
                    Some((p.ksa.clone(), *age))
                })
                .collect();
            stream::iter(work)
                .map(|(ksa, age): (Ksa, Duration)| async move {
                    let exchange = chain.exchange(plan, &ksa, age).await;
                    ((ksa.namespace, ksa.name), exchange)
                })
                .buffer_unordered(READ_CONCURRENCY)
                .collect()
                .await
        }
        None => HashMap::new(),
    };
    let ledger: Option<&LiveLedger> = live.as_ref().map(|l| &*l.ledger);
    let mapped: Vec<(Candidate, Mapped, Option<Finding>)> = prepared
        .into_iter()
        .map(|(candidate, prepared, undecided)| {
            let exchange = exchanges.get(&(candidate.namespace.clone(), candidate.name.clone()));
            let carried = ledger
                .and_then(|l| l.record(&candidate.namespace, &candidate.name))
                .and_then(|r| r.claims.clone());
            let checked = prepared.and_then(|p| {
                let claims = match (exchange, &carried) {
                    (Some(e), _) => e.claims(),
                    (None, Some(c)) => Some(TokenClaims { claims: &c.0, kid: c.1.as_deref() }),
                    (None, None) => None,
                };
                let identity = plan.check_mapping(&p, &facts, claims)?;
                Ok((p, identity))
            });
            (candidate, checked, undecided)
        })
        .collect();
    let verified: HashMap<(String, String), Verified> = match chain {
        Some(chain) => {
            let work: Vec<(Prepared, KsaIdentity, Arc<Exchange>, Duration)> = mapped
                .iter()
                .filter_map(|(c, m, _)| {
                    let (p, identity) = m.as_ref().ok()?;
                    let key = (c.namespace.clone(), c.name.clone());
                    let exchange = exchanges.get(&key)?;
                    Some((p.clone(), identity.clone(), exchange.clone(), due.get(&key)?.0))
                })
                .collect();
            let run_services = &run_services;
            stream::iter(work)
                .map(|(p, identity, exchange, max_age): (Prepared, KsaIdentity, Arc<Exchange>, Duration)| async move {
                    let job = Job {
                        probe,
                        plan,
                        ksa: &p.ksa,
                        gsa: p.gsa.as_ref(),
                        identity: &identity,
                        exchange: &exchange,
                        run_services,
                        max_age,
                        pass_started,
                    };
                    let verified = chain.verify(&job).await;
                    ((p.ksa.namespace, p.ksa.name), verified)
                })
                .buffer_unordered(READ_CONCURRENCY)
                .collect()
                .await
        }
        // Without the live chain, a Cloud Run target is still judged as far as no token is needed.
        None => mapped
            .iter()
            .filter_map(|(c, m, _)| {
                let (p, _) = m.as_ref().ok()?;
                let finding = cloud_run::without_token(&exchange::who(&p.ksa), &plan.targets, &run_services)?;
                Some((
                    (c.namespace.clone(), c.name.clone()),
                    Verified { result: Err(finding), pending_until: None },
                ))
            })
            .collect(),
    };
    let pending_until = verified.values().filter_map(|v| v.pending_until).min();
    let at = |instant: Instant| {
        let now = Timestamp::now();
        now.checked_add(instant.saturating_duration_since(Instant::now())).unwrap_or(now)
    };

    // Record this pass's chains; the KSAs not due keep their last verdict.
    let mut live = live;
    let (live_verified, chain_due) = match (chain.is_some(), live.as_mut()) {
        (false, _) => (None, None),
        (true, None) => {
            let passed = verified.values().filter(|v| v.result.is_ok()).count();
            (Some(u32::try_from(passed).unwrap_or(u32::MAX)), None)
        }
        (true, Some(live)) => {
            let finished = Timestamp::now();
            let count = live_wanted.len();
            for (index, w) in live_wanted.iter().enumerate() {
                let key = (w.namespace.to_string(), w.name.to_string());
                let Some((_, why)) = due.get(&key) else { continue };
                let done = verified.get(&key);
                let run = Run {
                    verdict: done.map(|v| v.result.clone()),
                    // Only the Federation provider checks read them: GKE keeps none.
                    claims: plan.federation.as_ref().and(exchanges.get(&key)).and_then(|e| e.minted_claims()),
                    answer_by: done.and_then(|v| v.pending_until).map(at),
                    at: finished,
                    crowded: deferred > 0 && *why != Why::Scheduled,
                };
                live.ledger.verified(w, index, count, cadence, run);
            }
            live.ledger.retain(&live_wanted);
            let live_verified = live.ledger.live_verified(&live_wanted, plan.exchange_interval, finished);
            // Passes come at least a tick apart, counted from their starts.
            (Some(live_verified), live.ledger.next_pass(&live_wanted, deferred, now))
        }
    };

    let ledger_after: Option<&LiveLedger> = live.as_ref().map(|l| &*l.ledger);
    let policy_changes: HashMap<&str, Timestamp> =
        gsas.keys().filter_map(|g| services.google.policy_changed_at(g).map(|t| (g.as_str(), t))).collect();
    let mut grace = Grace::new(plan.grace, now);
    let outcomes = mapped
        .into_iter()
        .map(|(candidate, mapped, undecided)| {
            let gsa_change = candidate
                .ksa
                .as_ref()
                .and_then(|k| k.gsa_annotation.as_deref())
                .and_then(|a| policy_changes.get(a).copied());
            let changed = [changed_at(&candidate), gsa_change].into_iter().flatten().max();
            let key = (candidate.namespace.clone(), candidate.name.clone());
            let chain = match verified.get(&key) {
                Some(v) => Some(v.result.clone()),
                // Not due: the last live verdict, carried, for a KSA whose mapping passes.
                None if mapped.is_ok() && !due.contains_key(&key) => ledger_after
                    .and_then(|l| l.record(&candidate.namespace, &candidate.name))
                    .and_then(|r| r.verdict.clone()),
                None => None,
            }
            .map(|c| c.map_err(|f| grace.judge(f, changed)));
            let mapping = Finding::decisive(undecided.as_ref(), mapped.as_ref().err())
                .cloned()
                .map(|f| grace.judge(f, changed));
            KsaOutcome { namespace: candidate.namespace, name: candidate.name, mapping, chain, canary: None }
        })
        .collect();
    let endpoints_answered = pending_until.map(at);
    Evaluated {
        outcomes,
        recheck_at: [grace.recheck_at(), endpoints_answered].into_iter().flatten().min(),
        fingerprints: expected_fingerprints,
        live_verified,
        chain_due,
    }
}

/// Fingerprints of the inputs many KSAs share, each taken once per pass: a GSA's account and
/// policy (whose bindings can name hundreds of members), and the provider and cluster keys.
/// Taken per KSA instead, their formatting and its allocations were the largest share of the
/// musl operator's CPU with the chain at 10k namespaces (BENCHMARKS.md, "Where the CPU went").
struct SharedInputs<'a> {
    /// Per GSA whose account and policy could be read.
    gsas: HashMap<&'a GsaEmail, u64>,
    /// The provider and the cluster's keys (Federation); `None` while either could not be read.
    federation: Option<u64>,
}

impl<'a> SharedInputs<'a> {
    fn of(
        gsas: &'a BTreeMap<GsaEmail, Arc<GsaFacts>>,
        provider: Option<&crate::engine::ProviderFacts>,
        cluster: Option<&Result<crate::engine::facts::ClusterIssuer, crate::engine::facts::FetchFailure>>,
    ) -> Self {
        let gsas = gsas
            .iter()
            .filter_map(|(gsa, facts)| {
                let (account, policy) = (facts.account.as_ref().ok()?, facts.policy.as_ref().ok()?);
                Some((gsa, inputs_fingerprint(&[&account, &policy])))
            })
            .collect();
        let federation = (|| {
            let provider = match provider {
                Some(f) => Some((f.pool.as_ref().ok()?, f.provider.as_ref().ok()?)),
                None => None,
            };
            let cluster = match cluster {
                Some(c) => Some(c.as_ref().ok()?),
                None => None,
            };
            Some(inputs_fingerprint(&[&provider, &cluster]))
        })();
        Self { gsas, federation }
    }
}

/// What a KSA's live verdict depends on (the workloads running as it among them: a fixed
/// workload is verified live at once), or `None` while some of it could not be read.
fn inputs(p: &Prepared, workloads: Option<&Vec<Arc<Workload>>>, shared: &SharedInputs<'_>) -> Option<u64> {
    let gsa = match &p.gsa {
        Some(g) => Some(*shared.gsas.get(g)?),
        None => None,
    };
    let federation = shared.federation?;
    Some(inputs_fingerprint(&[&p.ksa.uid, &p.ksa.gsa_annotation, &workloads, &gsa, &federation]))
}

/// Each static-passed KSA's workloads (those of its namespace running as it), when the probe
/// inspects workloads.
fn workloads_of(
    plan: &Plan,
    view: &dyn WorkloadView,
    prepared: &[(Candidate, Result<Prepared, Finding>)],
) -> HashMap<(String, String), Vec<Arc<Workload>>> {
    if !plan.inspect_workloads {
        return HashMap::new();
    }
    prepared
        .iter()
        .filter(|(_, p)| p.is_ok())
        .map(|(c, _)| {
            let mut found = Vec::new();
            view.each_workload(&c.namespace, &mut |w| {
                if w.runs_as(&c.name) {
                    found.push(w.clone());
                }
            });
            ((c.namespace.clone(), c.name.clone()), found)
        })
        .collect()
}
