//! Faults survived, each judged by its outcome: kube-apiserver killed mid-run, etcd restarted, the
//! operator restarted (gracefully and by SIGKILL), and Google at 30% 503s with 2 s latency. Status
//! converges, healthy probes never regress, nothing recorded is lost, no event is duplicated,
//! retries stay within 1.5× the fault-free calls, no fault produces a False verdict, and no token
//! material appears anywhere. The outage and throttling cases are in `google_faults`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use authprobe::api::{AuthProbe, condition};
use fake_google::scenario::Faults;
use kube::{Api, Client};
use serde_json::json;

use crate::support::{self, *};

/// These tests kill and restart kube-apiserver and etcd, restart the operator, inject faults into
/// the fake and count its calls: a control plane, fake and operator of their own. The operator has
/// production retry settings (a 60 s deadline), unlike the other modules'.
static ENV: Private =
    Private::new("faults", Setup { operator_args: &[], start_operator: true, ..Setup::DEFAULT });

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A probe over namespaces whose KSA `app` is mapped, plus (when `broken`) one whose KSA nobody
/// mapped.
struct Scenario {
    gsa: String,
    /// The principals bound to the GSA.
    members: Vec<String>,
    broken: Option<String>,
}

async fn scenario(env: &Env, client: &Client, id: &str, healthy: usize, broken: bool) -> Scenario {
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("fault"));
    let mut members = vec![];
    for _ in 0..healthy {
        let ns = env.namespace(client, "healthy", &[("team", id)]).await;
        service_account(client, &ns, "app", Some(&gsa)).await;
        members.push(member(&ns, "app"));
    }
    let broken_ns = if broken {
        let ns = env.namespace(client, "broken", &[("team", id)]).await;
        service_account(client, &ns, "app", Some(&gsa)).await;
        Some(ns)
    } else {
        None
    };
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    env.fake_service_account(&gsa, &[(WIU, &refs)]);
    apply_probe(client, id, gke_spec("team", id, json!({}))).await;
    Scenario { gsa, members, broken: broken_ns }
}

/// A forced pass by the operator, waited for through `lastProbeTime` moving past `after`.
async fn fresh_pass(env: &Env, client: &Client, id: &str) -> AuthProbe {
    let before =
        Api::<AuthProbe>::all(client.clone()).get(id).await.unwrap().status.and_then(|s| s.last_probe_time);
    // lastProbeTime has one-second resolution: make sure a new pass stamps a later second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    probe_now(client, id).await;
    env.wait_for(client, id, "a fresh pass", move |p| {
        p.status.as_ref().and_then(|s| s.last_probe_time.clone()) > before
    })
    .await
}

fn ready_condition(p: &AuthProbe) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    p.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == condition::READY).unwrap().clone()
}

async fn assert_no_token_material(env: &Env, client: &Client, id: &str, namespaces: &[&str]) {
    let status =
        serde_json::to_string(&Api::<AuthProbe>::all(client.clone()).get(id).await.unwrap().status).unwrap();
    let mut texts =
        vec![("status", status), ("log", env.operator.log_text()), ("metrics", env.operator.metrics().await)];
    for ns in namespaces {
        texts.push((
            "events",
            serde_json::to_string(&support::events(client, ns, "ServiceAccount", "app").await).unwrap(),
        ));
    }
    for (what, text) in texts {
        assert!(!text.contains("eyJ") && !text.contains("ya29."), "{what} holds token material");
    }
}

#[tokio::test]
async fn api_server_killed_mid_run() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let op = &env.operator;
    let client = env.client().await;
    let id = unique("apiserver");
    let Scenario { gsa, mut members, broken } = scenario(&env, &client, &id, 2, true).await;
    let broken = broken.unwrap();
    env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    wait_for_events(&client, &broken, "ServiceAccount", "app", &[("Warning", "PrincipalNotMapped", 1)]).await;

    let pid = op.pid();
    env.cp.kill_apiserver();
    // The outage itself: the fix lands in Google while Kubernetes is down.
    members.push(member(&broken, "app"));
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    env.fake_service_account(&gsa, &[(WIU, &refs)]);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let started = Instant::now();
    env.cp.restart_apiserver().await.unwrap();
    let client = env.client().await;
    probe_now(&client, &id).await;
    let probe = env
        .wait_for_within(&client, &id, "convergence after the restart", Duration::from_secs(240), |p| {
            ready(p) == Some(("True".into(), "Verified".into()))
        })
        .await;
    report(
        "fault",
        &format!(
            "kube-apiserver killed for 5 s: Ready=True {:.1} s after it came back",
            started.elapsed().as_secs_f64()
        ),
    );
    assert_eq!(op.pid(), pid, "the operator was not restarted");
    assert!(op.alive(), "the operator survived");
    assert!(!op.log_text().contains("panicked"));
    assert_eq!(
        event_counts(&client, &broken, "ServiceAccount", "app").await,
        BTreeMap::from([
            (("Normal".into(), "Verified".into()), 1),
            (("Warning".into(), "PrincipalNotMapped".into()), 1)
        ]),
        "one event per transition, no burst after the restart"
    );
    assert_eq!(probe.status.unwrap().summary.unwrap().passing, 3);
    assert_no_token_material(&env, &client, &id, &[&broken]).await;
}

#[tokio::test]
async fn etcd_restarted_under_a_healthy_probe() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let op = &env.operator;
    let client = env.client().await;
    let id = unique("etcd");
    scenario(&env, &client, &id, 2, false).await;
    let before = env.wait_verified(&client, &id, 2).await;
    let recorder = record(&client, &id);
    let pid = op.pid();
    env.cp.restart_etcd().await.unwrap();
    let client = env.client().await;
    let after = fresh_pass(&env, &client, &id).await;
    let seen = recorder.stop();
    report(
        "fault",
        &format!(
            "etcd restarted: Ready seen as {:?} throughout",
            seen.iter().collect::<std::collections::BTreeSet<_>>()
        ),
    );
    assert!(seen.iter().all(|r| r.0 == "True"), "a healthy probe never left Ready: {seen:?}");
    assert_eq!(
        ready_condition(&after).last_transition_time,
        ready_condition(&before).last_transition_time,
        "nothing was reset"
    );
    assert_eq!(op.pid(), pid);
}

#[tokio::test]
async fn the_operator_restarted_gracefully_and_by_sigkill() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let op = &env.operator;
    let client = env.client().await;
    let (healthy_id, broken_id) = (unique("steady"), unique("failing"));
    scenario(&env, &client, &healthy_id, 2, false).await;
    let broken = scenario(&env, &client, &broken_id, 1, true).await.broken.unwrap();
    let healthy_before = env.wait_verified(&client, &healthy_id, 2).await;
    let broken_before = env.wait_ready(&client, &broken_id, "False", "PrincipalNotMapped").await;
    let since_before = broken_before.status.as_ref().unwrap().failures[0].since.clone();
    let recorder = record(&client, &healthy_id);

    for (how, restart) in [("SIGTERM", false), ("SIGKILL", true)] {
        if restart {
            op.kill();
        } else {
            let status = op.stop();
            assert!(status.is_some_and(|s| s.success()), "graceful stop: {status:?}");
        }
        op.start().unwrap();
        let healthy = fresh_pass(&env, &client, &healthy_id).await;
        let failing = fresh_pass(&env, &client, &broken_id).await;
        assert_eq!(
            ready_condition(&healthy).last_transition_time,
            ready_condition(&healthy_before).last_transition_time,
            "{how}"
        );
        assert_eq!(
            ready_condition(&failing).last_transition_time,
            ready_condition(&broken_before).last_transition_time,
            "{how}"
        );
        assert_eq!(failing.status.as_ref().unwrap().failures[0].since, since_before, "{how}: since is kept");
        report("fault", &format!("operator restarted by {how}: both probes unchanged after a fresh pass"));
    }
    let seen = recorder.stop();
    assert!(seen.iter().all(|r| r.0 == "True"), "the healthy probe never regressed: {seen:?}");
    assert_eq!(
        event_counts(&client, &broken, "ServiceAccount", "app").await,
        BTreeMap::from([(("Warning".into(), "PrincipalNotMapped".into()), 1)]),
        "restarts repeat no event"
    );
    assert_eq!(event_counts(&client, "default", "AuthProbe", &healthy_id).await.len(), 1);
    assert_no_token_material(&env, &client, &broken_id, &[&broken]).await;
}

#[tokio::test]
async fn flaky_slow_google_converges_with_bounded_retries() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let id = unique("flaky");
    let gsas = 20;
    let mut namespaces = vec![];
    for i in 0..gsas {
        let gsa = format!("{}-{i}@acme-prod.iam.gserviceaccount.com", unique("flaky"));
        let ns = env.namespace(&client, "flaky", &[("team", id.as_str())]).await;
        service_account(&client, &ns, "app", Some(&gsa)).await;
        env.fake_service_account(&gsa, &[(WIU, &[&member(&ns, "app")])]);
        namespaces.push(ns);
    }
    let apis = vec!["iam.serviceAccounts.get".to_string(), "iam.getIamPolicy".to_string()];
    env.fake.update(|s| {
        s.faults = Faults { error_rate: 0.3, latency_ms: 2000, evenly: true, apis, ..Default::default() }
    });
    env.fake.reset_counts();
    let recorder = record(&client, &id);
    let started = Instant::now();
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    let waited = env.wait_verified_within(&client, &id, gsas as u32, Duration::from_secs(300)).await;
    env.fake.update(|s| s.faults = Faults::default());
    let seen = recorder.stop();
    let counts = env.fake.counts();
    let calls: u64 = counts.values().sum();
    let fault_free = 2 * gsas as u64;
    report(
        "fault",
        &format!(
            "Google at 30% 503 + 2 s latency: converged in {:.1} s with {calls} calls {counts:?} for {fault_free} fault-free ({:.2}x); Ready seen {:?}",
            started.elapsed().as_secs_f64(),
            calls as f64 / fault_free as f64,
            seen.iter().collect::<std::collections::BTreeSet<_>>()
        ),
    );
    assert!(calls as f64 <= 1.5 * fault_free as f64, "{calls} calls for {fault_free}");
    assert!(seen.iter().all(|r| r.0 != "False"), "no fault produced a False verdict: {seen:?}");
    assert_eq!(waited.status.unwrap().summary.unwrap().failing, 0);
    let refs: Vec<&str> = namespaces.iter().map(String::as_str).collect();
    assert_no_token_material(&env, &client, &id, &refs).await;
}
