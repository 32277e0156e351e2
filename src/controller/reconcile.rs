//! One reconcile: select, probe, report. Status is written by server-side apply at most once per
//! pass, only when the verdict changed or the periodic pass is due; events fire on transitions.

use std::{
    collections::{BTreeMap, HashSet},
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
    Context, Error, FIELD_MANAGER, ProbeState,
    history::{History, Transition},
};
use crate::{
    api::{AuthProbe, AuthProbeStatus, PROBE_NOW_ANNOTATION, Reason, condition},
    engine::{
        Candidate, Ksa, Plan,
        report::{Report, Status, same_verdict, to_status},
    },
    inventory,
    probe::{self, Pass, Services},
    redact,
};

/// Periodic passes come `interval` plus up to this fraction later, so probes created together
/// spread out, and never earlier, so every pass finds the last pass's Google reads expired.
const JITTER: f64 = 0.1;

pub(super) async fn reconcile(probe: Arc<AuthProbe>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.wait_for_caches().await?;
    ctx.forget_deleted();
    let name = probe.name_any();
    let now = Timestamp::now();
    let written = with_state(&ctx, &name, |s| s.written.clone());
    let previous = newest(probe.status.as_ref(), written.as_ref());
    let plan = ctx.plan(&probe);

    let (report, outcomes_for_history, interval, forced, recheck_at) = match plan.as_ref() {
        Err(invalid) => (Report::invalid(invalid), vec![], Duration::from_secs(600), false, None),
        Ok(plan) => {
            let probe_now = probe.annotations().get(PROBE_NOW_ANNOTATION).cloned();
            let forced = probe_now.is_some() && with_state(&ctx, &name, |s| s.probe_now != probe_now);
            let candidates = select(&ctx, &name, plan, now);
            let pass =
                Pass { plan, candidates, max_age: if forced { Duration::ZERO } else { plan.interval }, now };
            let services = Services { google: &ctx.google, issuers: &ctx.issuers, chain: Some(&ctx.chain) };
            let probe::Evaluated { outcomes, recheck_at } =
                probe::evaluate(services, pass, |c| changed_at(&ctx, &name, c)).await;
            if forced {
                with_state(&ctx, &name, |s| s.probe_now = probe_now.clone());
            }
            let namespaces = with_state(&ctx, &name, |s| s.scope.as_ref().map_or(0, HashSet::len));
            let report =
                Report::build(&outcomes, u32::try_from(namespaces).unwrap_or(u32::MAX), plan.token_exchange);
            (report, outcomes, plan.interval, forced, recheck_at)
        }
    };

    if !with_state(&ctx, &name, |s| s.history.is_seeded()) {
        with_state(&ctx, &name, |s| s.history.seed(previous));
    }
    let (since, transitions, mut next_history) =
        with_state(&ctx, &name, |s| s.history.update(&outcomes_for_history, now));
    let status = to_status(&report, previous, probe.metadata.generation, now, &since);

    let last_probe = previous.and_then(|p| p.last_probe_time.as_ref()).map(|t| t.0);
    let due = last_probe.is_none_or(|t| t.checked_add(interval).is_ok_and(|d| d <= now));
    let changed = previous.is_none_or(|p| !same_verdict(p, &status));
    // A forced pass (probe-now) writes too, so its lastProbeTime shows the re-check happened.
    let wrote = changed || due || forced;
    if wrote {
        write_status(&ctx, &name, &status).await?;
        with_state(&ctx, &name, |s| s.written = Some(status.clone()));
    }
    let unpublished = publish(&ctx, &probe, &report, &transitions, &mut next_history).await;
    with_state(&ctx, &name, |s| {
        next_history.unpublished(&s.history, &unpublished);
        s.history = next_history;
    });
    ctx.metrics.probe_report(
        &name,
        &report,
        status.last_probe_time.as_ref().map_or(0.0, |t| t.0.as_millisecond() as f64 / 1000.0),
    );
    if let Ok(mut f) = ctx.failures.lock() {
        f.remove(&name);
    }
    ctx.metrics.reconciled(started.elapsed());
    tracing::info!(
        probe = %name,
        ready = report.condition(condition::READY).map_or("", |c| c.status.as_str()),
        passing = report.summary.passing, failing = report.summary.failing, unknown = report.summary.unknown,
        wrote, elapsed_ms = started.elapsed().as_millis(),
        "probe pass"
    );
    let last = if wrote { now } else { last_probe.unwrap_or(now) };
    let periodic = last.checked_add(interval.mul_f64(1.0 + rand::random::<f64>() * JITTER)).unwrap_or(now);
    // A failure waiting out its propagation grace is judged again as soon as the grace ends.
    let next_due = recheck_at.map_or(periodic, |r| r.min(periodic));
    Ok(Action::requeue(
        Duration::try_from(next_due.duration_since(now))
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1)),
    ))
}

/// The more recent of the cached status and the one this replica last wrote.
fn newest<'a>(
    cached: Option<&'a AuthProbeStatus>,
    written: Option<&'a AuthProbeStatus>,
) -> Option<&'a AuthProbeStatus> {
    let time = |s: &AuthProbeStatus| s.last_probe_time.as_ref().map(|t| t.0);
    match (cached, written) {
        (Some(c), Some(w)) if time(w) > time(c) => Some(w),
        (None, w) => w,
        (c, _) => c,
    }
}

fn with_state<T>(ctx: &Context, probe: &str, f: impl FnOnce(&mut ProbeState) -> T) -> T {
    let mut states = match ctx.states.lock() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    };
    f(states.entry(probe.to_string()).or_default())
}

/// The KSAs to check, from the caches; records the namespaces in scope and when each entered it.
fn select(ctx: &Context, probe: &str, plan: &Plan, now: Timestamp) -> Vec<Candidate> {
    let namespaces: Vec<String> = ctx
        .namespaces
        .state()
        .iter()
        .filter(|ns| plan.selects_namespace(ns.metadata.labels.as_ref()))
        .filter_map(|ns| ns.metadata.name.clone())
        .collect();
    let selected: HashSet<&str> = namespaces.iter().map(String::as_str).collect();
    let mut by_namespace: BTreeMap<&str, Vec<Ksa>> =
        namespaces.iter().map(|n| (n.as_str(), vec![])).collect();
    let service_accounts = ctx.service_accounts.state();
    for sa in &service_accounts {
        if let Some(ns) = sa.metadata.namespace.as_deref()
            && selected.contains(ns)
        {
            let ksa = inventory::ksa(sa);
            if plan.selects_ksa(&ksa)
                && let Some(list) = by_namespace.get_mut(ns)
            {
                list.push(ksa);
            }
        }
    }
    let keys: HashSet<u64> = namespaces.iter().map(|n| inventory::key(&[n])).collect();
    with_state(ctx, probe, |s| {
        if let Some(previous) = &s.scope {
            for k in keys.iter().filter(|k| !previous.contains(*k)) {
                s.entered.insert(*k, now);
            }
        }
        s.entered.retain(|k, at| {
            keys.contains(k) && at.checked_add(Duration::from_secs(3600)).is_ok_and(|end| end > now)
        });
        s.scope = Some(keys);
    });
    by_namespace.iter().flat_map(|(ns, ksas)| plan.candidates(ns, ksas)).collect()
}

/// The latest change that opens the propagation grace: creation, annotation, entering scope.
fn changed_at(ctx: &Context, probe: &str, c: &Candidate) -> Option<Timestamp> {
    let created = c.ksa.as_ref().and_then(|k| k.created);
    let annotated = ctx.annotation_changes.changed_at(&c.namespace, &c.name);
    let entered = with_state(ctx, probe, |s| s.entered.get(&inventory::key(&[&c.namespace])).copied());
    [created, annotated, entered].into_iter().flatten().max()
}

async fn write_status(ctx: &Context, probe: &str, status: &AuthProbeStatus) -> Result<(), Error> {
    let api = Api::<AuthProbe>::all(ctx.client.clone());
    let patch = serde_json::json!({
        "apiVersion": "authprobe.io/v1alpha1",
        "kind": "AuthProbe",
        "status": status,
    });
    api.patch_status(probe, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
        .await
        .map(|_| ())
        .map_err(|source| Error::StatusWrite { probe: probe.to_string(), source })
}

/// Events: one per KSA transition on the ServiceAccount, one per Ready transition and one when
/// CheckerHealthy turns False on the AuthProbe. An event the API server refuses is not marked as
/// announced, so the next pass publishes it again; returns the KSA transitions that were lost.
async fn publish(
    ctx: &Context,
    probe: &AuthProbe,
    report: &Report,
    transitions: &[Transition],
    history: &mut History,
) -> Vec<Transition> {
    let mut unpublished = vec![];
    let uids: BTreeMap<(String, String), String> = transitions
        .iter()
        .filter_map(|t| {
            let (ns, name) = match t {
                Transition::Failing { namespace, name, .. } | Transition::Recovered { namespace, name } => {
                    (namespace, name)
                }
            };
            let sa = ctx.service_accounts.get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))?;
            Some(((ns.clone(), name.clone()), sa.metadata.uid.clone()?))
        })
        .collect();
    for t in transitions {
        let (ns, name, event) = match t {
            Transition::Failing { namespace, name, reason, message } => {
                (namespace, name, event(EventType::Warning, *reason, message))
            }
            Transition::Recovered { namespace, name } => (
                namespace,
                name,
                event(
                    EventType::Normal,
                    Reason::Verified,
                    &format!(
                        "ServiceAccount {namespace}/{name} maps to its Google identity again (AuthProbe {})",
                        probe.name_any()
                    ),
                ),
            ),
        };
        // A missing ServiceAccount has nothing to attach an event to; the AuthProbe's event covers it.
        let Some(uid) = uids.get(&(ns.clone(), name.clone())) else {
            continue;
        };
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("ServiceAccount".into()),
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: Some(uid.clone()),
            ..Default::default()
        };
        if let Err(e) = ctx.recorder.publish(&event, &reference).await {
            tracing::warn!(namespace = %ns, serviceaccount = %name, error = %e, "cannot publish an event; retrying next pass");
            unpublished.push(t.clone());
        }
    }

    let probe_ref = probe.object_ref(&());
    if let Some(ready) = report.condition(condition::READY) {
        let verdict = (ready.status.as_str().to_string(), ready.reason.as_str().to_string());
        if history.ready_announced.as_ref() != Some(&verdict) {
            let e = match ready.status {
                Status::True => event(EventType::Normal, Reason::Verified, &ready.message),
                _ => event(EventType::Warning, ready.reason, &ready.message),
            };
            match ctx.recorder.publish(&e, &probe_ref).await {
                Ok(()) => history.ready_announced = Some(verdict),
                Err(err) => {
                    tracing::warn!(probe = %probe.name_any(), error = %err, "cannot publish an event; retrying next pass");
                }
            }
        }
    }
    if let Some(checker) = report.condition(condition::CHECKER_HEALTHY) {
        if checker.status != Status::False {
            history.checker_failure_announced = false;
        } else if !history.checker_failure_announced {
            let e = event(EventType::Warning, checker.reason, &checker.message);
            match ctx.recorder.publish(&e, &probe_ref).await {
                Ok(()) => history.checker_failure_announced = true,
                Err(err) => {
                    tracing::warn!(probe = %probe.name_any(), error = %err, "cannot publish an event; retrying next pass");
                }
            }
        }
    }
    unpublished
}

fn event(type_: EventType, reason: Reason, note: &str) -> Event {
    Event {
        type_,
        reason: reason.as_str().to_string(),
        // Event notes are limited to 1 KiB.
        note: Some(redact::cut(note, 1024)),
        action: "Probe".into(),
        secondary: None,
    }
}
