//! A probe's life ends with its Delete: what the operator remembers about a probe (its verdicts,
//! the Events already sent, its metric series) belongs to that object, not to its name. A probe
//! recreated under the same name starts afresh; the last probe deleted takes its series with it.

use std::time::{Duration, Instant};

use authprobe::api::AuthProbe;
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::{
    Api, Client, ResourceExt,
    api::DeleteParams,
    runtime::{
        WatchStreamExt,
        wait::{await_condition, conditions},
        watcher,
    },
};
use serde_json::json;

use crate::support::*;

/// An operator that sees exactly one probe: forgetting a deleted probe at the next pass of
/// another one would otherwise remove its series too, and pass the test by accident.
static ALONE: Private = Private::new("lifecycle (one probe)", Setup::DEFAULT);

/// A probe whose only KSA is mapped nowhere: Ready=False/PrincipalNotMapped.
async fn failing_probe(env: &Env, client: &Client, id: &str) -> serde_json::Value {
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("lifecycle"));
    let ns = env.namespace(client, "lifecycle", &[("team", id)]).await;
    service_account(client, &ns, "app", Some(&gsa)).await;
    env.fake_service_account(&gsa, &[]);
    let spec = gke_spec("team", id, json!({}));
    apply_probe(client, id, spec.clone()).await;
    spec
}

/// Deletes a probe and waits until it is gone.
async fn delete_probe(client: &Client, name: &str) {
    let api = Api::<AuthProbe>::all(client.clone());
    let uid = api.get(name).await.unwrap().uid().unwrap();
    api.delete(name, &DeleteParams::default()).await.unwrap();
    tokio::time::timeout(WAIT, await_condition(api, name, conditions::is_deleted(&uid)))
        .await
        .unwrap_or_else(|_| panic!("{name} still exists {WAIT:?} after its delete"))
        .unwrap();
}

/// Waits for an Event about the AuthProbe `name` that `matches`; returns it.
async fn wait_for_probe_event(
    client: &Client,
    name: &str,
    what: &str,
    matches: impl Fn(&Event) -> bool,
) -> Event {
    let api = Api::<Event>::namespaced(client.clone(), "default");
    let config =
        watcher::Config::default().fields(&format!("regarding.kind=AuthProbe,regarding.name={name}"));
    let mut stream = watcher(api, config).default_backoff().applied_objects().boxed();
    let found = tokio::time::timeout(WAIT, async {
        while let Some(event) = stream.next().await {
            if let Ok(event) = event
                && matches(&event)
            {
                return Some(event);
            }
        }
        None
    })
    .await;
    match found {
        Ok(Some(event)) => event,
        _ => {
            let seen: Vec<_> = events(client, "default", "AuthProbe", name)
                .await
                .into_iter()
                .map(|e| (e.type_, e.reason, e.regarding.and_then(|r| r.uid)))
                .collect();
            panic!("{name}: no Event {what} within {WAIT:?}; events (type, reason, regarding.uid): {seen:?}")
        }
    }
}

fn warning_about(uid: &str) -> impl Fn(&Event) -> bool + '_ {
    move |e: &Event| {
        e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some("PrincipalNotMapped")
            && e.regarding.as_ref().and_then(|r| r.uid.as_deref()) == Some(uid)
    }
}

#[tokio::test]
async fn a_probe_recreated_under_the_same_name_starts_afresh() {
    let env = env();
    let client = env.client().await;
    let id = unique("recreate");
    let spec = failing_probe(env, &client, &id).await;
    let old = env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    let old_uid = old.uid().unwrap();
    wait_for_probe_event(
        &client,
        &id,
        "Warning/PrincipalNotMapped about the first probe",
        warning_about(&old_uid),
    )
    .await;

    delete_probe(&client, &id).await;
    apply_probe(&client, &id, spec).await;
    let new_uid = Api::<AuthProbe>::all(client.clone()).get(&id).await.unwrap().uid().unwrap();
    assert_ne!(new_uid, old_uid, "a new object");

    // Its own first status: written by a pass over the new object, not inherited.
    let probe = env
        .wait_for(&client, &id, "the new probe's first status", |p| {
            p.uid().as_deref() == Some(new_uid.as_str())
                && p.status.as_ref().is_some_and(|s| {
                    s.observed_generation == p.metadata.generation && s.last_probe_time.is_some()
                })
                && ready(p) == Some(("False".into(), "PrincipalNotMapped".into()))
        })
        .await;
    let created = probe.metadata.creation_timestamp.clone().unwrap();
    let probed = probe.status.as_ref().and_then(|s| s.last_probe_time.clone()).unwrap();
    assert!(
        probed.0 >= created.0,
        "lastProbeTime {probed:?} is from a pass of the new probe (created {created:?})"
    );

    // Its own Ready Event: the verdict is news about this object, however old the name.
    wait_for_probe_event(
        &client,
        &id,
        "Warning/PrincipalNotMapped about the new probe",
        warning_about(&new_uid),
    )
    .await;
}

/// The lines of the operator's /metrics that name the probe.
async fn series_of(operator: &Operator, probe: &str) -> Vec<String> {
    let label = format!("probe=\"{probe}\"");
    operator.metrics().await.lines().filter(|l| l.contains(&label)).map(str::to_string).collect()
}

/// Polls /metrics (which has no watch) until `done` holds for the probe's series, within `within`.
async fn wait_for_series(
    operator: &Operator,
    probe: &str,
    what: &str,
    within: Duration,
    done: impl Fn(&[String]) -> bool,
) {
    let deadline = Instant::now() + within;
    loop {
        let series = series_of(operator, probe).await;
        if done(&series) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{probe}: {what} not within {within:?}; its series:\n{}",
            series.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn deleting_the_last_probe_removes_its_series() {
    let env = ALONE.get();
    let client = env.client().await;
    let id = unique("last");
    failing_probe(&env, &client, &id).await;
    env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    let condition = format!("authprobe_condition{{probe=\"{id}\",");
    wait_for_series(&env.operator, &id, "authprobe_condition", WAIT, |s| {
        s.iter().any(|l| l.starts_with(&condition))
    })
    .await;
    let probes = Api::<AuthProbe>::all(client.clone()).list(&Default::default()).await.unwrap();
    assert_eq!(probes.items.len(), 1, "the operator sees this probe only");

    delete_probe(&client, &id).await;
    let deleted = Instant::now();
    wait_for_series(&env.operator, &id, "every series gone", Duration::from_secs(10), <[String]>::is_empty)
        .await;
    report(
        "lifecycle",
        &format!("the last probe deleted: its series gone {:.1} s later", deleted.elapsed().as_secs_f64()),
    );
}
