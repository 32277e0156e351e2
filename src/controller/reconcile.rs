//! One reconcile, an IO shell around the engine: select from the caches, probe, let
//! [`decide`] say what to write, announce and when to look again, do it, and keep the memory.

use std::{
    collections::HashSet,
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
        reflector::ObjectRef,
    },
};

use super::{
    Context, Error, FIELD_MANAGER,
    inventory::{self, MetaView},
};
use crate::{
    api::{AuthProbe, AuthProbeStatus, PROBE_NOW_ANNOTATION, condition},
    engine::{
        Candidate, Plan, Selection,
        decide::{Announcement, INVALID_SPEC_INTERVAL, PassResult, Regarding, Severity, decide},
        report::Report,
        schedule::LiveLedger,
    },
    probe::{self, Live, Pass, Services},
};

pub(super) async fn reconcile(probe: Arc<AuthProbe>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.fence.holds() {
        // A standby: every probe is reconciled again when this replica starts leading.
        return Ok(Action::await_change());
    }
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

    let (report, outcomes, interval, probe_now, recheck_at, chain_due) = match plan.as_ref() {
        Err(invalid) => (Report::invalid(invalid), vec![], INVALID_SPEC_INTERVAL, None, None, None),
        Ok(plan) => {
            if plan.inspect_workloads {
                // A pass before every workload was listed would miss them and read as passing;
                // one whose watches keep failing reports that instead (Unknown), after a while.
                let _ = tokio::time::timeout(WORKLOAD_LIST_WAIT, ctx.workloads.wait_until_listed()).await;
            }
            let forced = memory.forced_by(probe_now);
            let Selection { namespaces, candidates } = select(ctx, probe, plan, now);
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
            let count = u32::try_from(namespaces.len()).unwrap_or(u32::MAX);
            let mut report = Report::build(&evaluated.outcomes, count, plan.token_exchange);
            report.summary.live_verified = evaluated.live_verified;
            (report, evaluated.outcomes, plan.interval, probe_now, evaluated.recheck_at, evaluated.chain_due)
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

/// The engine's one selection over the caches; records the namespaces in scope and when each
/// entered it.
fn select(ctx: &Context, probe: &AuthProbe, plan: &Plan, now: Timestamp) -> Selection {
    let selection = plan.select(&MetaView::new(ctx.namespaces.state(), ctx.service_accounts.state()));
    let keys: HashSet<u64> = selection.namespaces.iter().map(|n| inventory::key(&[n])).collect();
    ctx.states.record_scope(probe, keys, now);
    selection
}

/// The latest change that opens the propagation grace: creation, annotation, entering scope.
fn changed_at(ctx: &Context, probe: &AuthProbe, c: &Candidate) -> Option<Timestamp> {
    let created = c.ksa.as_ref().and_then(|k| k.created);
    let annotated = ctx.annotation_changes.changed_at(&c.namespace, &c.name);
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
                let Some(uid) = ctx
                    .service_accounts
                    .get(&ObjectRef::new(name).within(namespace))
                    .and_then(|sa| sa.metadata.uid.clone())
                else {
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
