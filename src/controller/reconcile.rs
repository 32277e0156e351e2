//! One reconcile, an IO shell around the engine: select from the caches, probe, let
//! [`decide`] say what to write, announce and when to look again, do it, and keep the memory.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::ObjectReference, jiff::Timestamp};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams},
    runtime::{
        controller::Action,
        events::{Event, EventType},
    },
};

use super::{
    Context, Error, FIELD_MANAGER,
    canary::{self, Canaries, Checked},
    inventory,
};
use crate::{
    api::{AuthProbe, AuthProbeStatus, PROBE_NOW_ANNOTATION, condition},
    engine::{
        CanaryPlan, Candidate, Plan, Selection,
        canary::{WorkloadRef, book::Book},
        decide::{Announcement, INVALID_SPEC_INTERVAL, PassResult, Regarding, Severity, decide},
        report::{KsaOutcome, Report},
        schedule::LiveLedger,
        stage::canary::CanarySubject,
    },
    probe::{self, Live, Pass, Services},
};

pub(super) async fn reconcile(probe: Arc<AuthProbe>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.fence.holds() {
        // A standby: every probe is reconciled again when this replica starts leading.
        return Ok(Action::await_change());
    }
    // Passes wait their turn first come, first served (the semaphore is fair); kube's own limit
    // picks among held probes in hash order, which starved some while others kept requeueing.
    let Ok(_turn) = ctx.passes.acquire().await else { return Ok(Action::await_change()) };
    ctx.progress.pass_started();
    let name = probe.name_any();
    let deadline = ctx.pass_deadline;
    let action = tokio::time::timeout(deadline, pass(&probe, &ctx))
        .await
        .unwrap_or(Err(Error::PassDeadline { probe: name, deadline }))?;
    ctx.progress.pass_completed();
    Ok(action)
}

/// One pass over a probe.
async fn pass(probe: &Arc<AuthProbe>, ctx: &Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.wait_for_caches().await?;
    let name = probe.name_any();
    let now = Timestamp::now();
    let plan = ctx.states.plan(probe);
    let memory = ctx.states.take_memory(probe);
    let probe_now = probe.annotations().get(PROBE_NOW_ANNOTATION).map(String::as_str);

    let (report, outcomes, interval, probe_now, recheck_at, chain_due, canary) = match plan.as_ref() {
        Err(invalid) => (Report::invalid(invalid), vec![], INVALID_SPEC_INTERVAL, None, None, None, None),
        Ok(plan) if plan.canary.is_some() && ctx.canaries.is_none() => {
            let invalid =
                "spec.canary needs an operator started with --canary-image (the chart's canary.enabled)";
            (Report::invalid(invalid), vec![], INVALID_SPEC_INTERVAL, None, None, None, None)
        }
        Ok(plan) => {
            if plan.inspect_workloads {
                // A pass before every workload was listed would miss them and read as passing;
                // one whose watches keep failing reports that instead (Unknown), after a while.
                let _ = tokio::time::timeout(WORKLOAD_LIST_WAIT, ctx.workloads.wait_until_listed()).await;
            }
            let forced = memory.forced_by(probe_now);
            let Selection { namespaces, candidates } = select(ctx, probe, plan, now);
            let checked: Checked = match plan.canary {
                Some(_) => candidates
                    .iter()
                    .map(|c| ((c.namespace.clone(), c.name.clone()), changed_at(ctx, probe, c)))
                    .collect(),
                None => Checked::new(),
            };
            let max_age = if forced { Duration::ZERO } else { plan.interval };
            // probe-now re-verifies every KSA live, as fast as the quota share allows.
            let mut ledger = if forced { LiveLedger::default() } else { ctx.states.take_ledger(probe) };
            let live = Live { ledger: &mut ledger, budget: ctx.exchange_budget };
            let pass = Pass { probe: &name, plan, candidates, max_age, now, live: Some(live) };
            let services = Services {
                google: &ctx.google,
                issuers: &ctx.issuers,
                chain: Some(&ctx.chain),
                workloads: ctx.workloads.as_ref(),
                config_maps: &ctx.config_maps,
            };
            let evaluated = probe::evaluate(services, pass, |c| changed_at(ctx, probe, c)).await;
            ctx.states.put_ledger(probe, ledger);
            let mut outcomes = evaluated.outcomes;
            let mut recheck_at = evaluated.recheck_at;
            let canary = match &ctx.canaries {
                Some(canaries) => {
                    canaries.delete_stale(probe, plan.canary.as_ref().map(|c| &c.workload)).await;
                    match &plan.canary {
                        Some(settings) => {
                            let work = CanaryWork {
                                plan,
                                settings,
                                namespaces: &namespaces,
                                checked: &checked,
                                forced,
                            };
                            let book = canary_step(
                                ctx,
                                canaries,
                                probe,
                                work,
                                &mut outcomes,
                                &evaluated.fingerprints,
                            )
                            .await;
                            recheck_at =
                                [recheck_at, book.next_due(settings.every)].into_iter().flatten().min();
                            Some((book, settings.workload.clone()))
                        }
                        None => None,
                    }
                }
                None => None,
            };
            let count = u32::try_from(namespaces.len()).unwrap_or(u32::MAX);
            let mut report = Report::build(&outcomes, count, plan.token_exchange);
            report.summary.live_verified = evaluated.live_verified;
            (report, outcomes, plan.interval, probe_now, recheck_at, evaluated.chain_due, canary)
        }
    };

    let decision = decide(
        memory,
        PassResult {
            probe: &name,
            report: &report,
            outcomes: &outcomes,
            cached: probe.status.as_ref(),
            generation: probe.metadata.generation,
            probe_now,
            interval,
            recheck_at,
            chain_due,
            now,
            jitter: rand::random::<f64>(),
        },
    );
    if decision.write
        && let Err(e) = write_status(ctx, &name, &decision.status).await
    {
        ctx.states.put_memory(probe, decision.abandon());
        return Err(e);
    }
    let failed = publish(ctx, probe, &decision.announcements).await;
    if let Some((mut book, workload)) = canary {
        announce_changes(ctx, probe, &mut book, &workload).await;
        ctx.states.put_book(probe, book);
    }
    // The decision counts from the pass's start; what is left of it counts from now.
    let requeue_after = decision.requeue_after.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
    let wrote = decision.write;
    let finished =
        decision.status.last_probe_time.as_ref().map_or(0.0, |t| t.0.as_millisecond() as f64 / 1000.0);
    if ctx.states.put_memory(probe, decision.settle(&failed)) {
        ctx.metrics.probe_report(&name, &report, finished, interval);
        ctx.states.succeeded(probe);
    }
    ctx.metrics.reconciled(started.elapsed());
    tracing::info!(
        probe = %name,
        ready = report.condition(condition::READY).map_or("", |c| c.status.as_str()),
        passing = report.summary.passing, failing = report.summary.failing, unknown = report.summary.unknown,
        wrote, elapsed_ms = started.elapsed().as_millis(),
        "probe pass"
    );
    Ok(Action::requeue(requeue_after))
}

/// What a pass asks of its canaries.
struct CanaryWork<'a> {
    plan: &'a Plan,
    settings: &'a CanaryPlan,
    namespaces: &'a [String],
    checked: &'a Checked,
    forced: bool,
}

/// Runs the canaries' step and gives each KSA its stage `Canary` finding; returns the book, to
/// be put back once its changes are announced.
async fn canary_step(
    ctx: &Context,
    canaries: &Canaries,
    probe: &AuthProbe,
    work: CanaryWork<'_>,
    outcomes: &mut [KsaOutcome],
    expected: &HashMap<(String, String), String>,
) -> Book {
    let CanaryWork { plan, settings, namespaces, checked, forced } = work;
    let workload = settings.workload.to_string();
    let mut book = ctx.states.take_book(probe, &workload, probe.status.as_ref());
    canaries.step(probe, settings, namespaces, checked, &mut book, forced).await;
    for o in outcomes.iter_mut() {
        let Some(track) = book.track(&o.namespace).filter(|t| t.service_account.as_deref() == Some(&o.name))
        else {
            continue;
        };
        let key = (o.namespace.clone(), o.name.clone());
        // A report from before the KSA changed says nothing of the identity it maps to now.
        let stale = checked.get(&key).copied().flatten().is_some_and(|c| track.reported_before(c));
        let subject = CanarySubject {
            namespace: &o.namespace,
            service_account: &o.name,
            workload: &settings.workload,
            expected: expected.get(&key).filter(|_| !stale).map(String::as_str),
            last_fingerprint: track.fingerprint.as_deref(),
        };
        o.canary = track.outcome.as_ref().and_then(|outcome| plan.canary_stage(outcome, &subject));
    }
    book
}

/// Publishes a `CredentialSourceChanged` Event for each fingerprint change; one that fails is
/// published again next pass.
async fn announce_changes(ctx: &Context, probe: &AuthProbe, book: &mut Book, workload: &WorkloadRef) {
    let changes = book.changes();
    let announcements: Vec<Announcement> =
        changes.iter().map(|c| canary::announcement(c, workload, &probe.name_any())).collect();
    let failed = publish(ctx, probe, &announcements).await;
    for (i, change) in changes.iter().enumerate() {
        if !failed.contains(&i) {
            book.announced(&change.namespace);
        }
    }
}

/// The engine's one selection over the caches; records the namespaces in scope and when each
/// entered it.
fn select(ctx: &Context, probe: &AuthProbe, plan: &Plan, now: Timestamp) -> Selection {
    let selection = plan.select(&ctx.index.view());
    let keys: HashSet<u64> = selection.namespaces.iter().map(|n| inventory::key(&[n])).collect();
    ctx.states.record_scope(probe, keys, now);
    selection
}

/// The latest change that opens the propagation grace: creation, annotation, entering scope.
fn changed_at(ctx: &Context, probe: &AuthProbe, c: &Candidate) -> Option<Timestamp> {
    let created = c.ksa.as_ref().and_then(|k| k.created);
    let annotated = ctx.index.annotation_changed_at(&c.namespace, &c.name);
    let entered = ctx.states.entered(probe, inventory::key(&[&c.namespace]));
    [created, annotated, entered].into_iter().flatten().max()
}

/// How long a pass waits for the workload watches' first lists before judging without them.
const WORKLOAD_LIST_WAIT: Duration = Duration::from_secs(30);

/// A write is started only while the fence holds for longer than the write may take.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

async fn write_status(ctx: &Context, probe: &str, status: &AuthProbeStatus) -> Result<(), Error> {
    if !ctx.fence.holds_for(WRITE_TIMEOUT) {
        return Err(Error::Fenced { probe: probe.to_string() });
    }
    let api = Api::<AuthProbe>::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": "authprobe.io/v1alpha1",
        "kind": "AuthProbe",
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&patch);
    match tokio::time::timeout(WRITE_TIMEOUT, api.patch_status(probe, &params, &patch)).await {
        Ok(written) => written.map(|_| ()),
        Err(_) => Err(kube::Error::Service(format!("no answer within {WRITE_TIMEOUT:?}").into())),
    }
    .map_err(|source| Error::StatusWrite { probe: probe.to_string(), source })
}

/// Publishes the announcements; returns the indexes of those the API server refused, which the
/// next pass announces again. A ServiceAccount or workload that no longer exists has nothing to
/// attach an Event to (the AuthProbe's own Event covers it).
async fn publish(ctx: &Context, probe: &AuthProbe, announcements: &[Announcement]) -> Vec<usize> {
    let mut failed = vec![];
    for (i, a) in announcements.iter().enumerate() {
        let reference = match &a.regarding {
            Regarding::Probe => probe.object_ref(&()),
            Regarding::ServiceAccount { namespace, name } => {
                let Some(uid) = ctx.index.service_account_uid(namespace, name) else {
                    continue;
                };
                ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("ServiceAccount".into()),
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    uid: Some(uid),
                    ..Default::default()
                }
            }
            Regarding::Workload { namespace, kind, name } => {
                let Some(uid) = ctx.workloads.uid(namespace, *kind, name) else { continue };
                ObjectReference {
                    api_version: Some(kind.api_version().into()),
                    kind: Some(kind.to_string()),
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    uid: Some(uid),
                    ..Default::default()
                }
            }
        };
        if !ctx.fence.holds_for(WRITE_TIMEOUT) {
            failed.push(i);
            continue;
        }
        let published = tokio::time::timeout(WRITE_TIMEOUT, ctx.recorder.publish(&event(a), &reference))
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(format!("no answer within {WRITE_TIMEOUT:?}").into()))
            });
        if let Err(e) = published {
            tracing::warn!(probe = %probe.name_any(), regarding = ?a.regarding, error = %e, "cannot publish an event; retrying next pass");
            failed.push(i);
        }
    }
    failed
}

fn event(a: &Announcement) -> Event {
    Event {
        type_: match a.severity {
            Severity::Normal => EventType::Normal,
            Severity::Warning => EventType::Warning,
        },
        reason: a.reason.as_str().to_string(),
        note: Some(a.note.clone()),
        action: "Probe".into(),
        secondary: None,
    }
}
