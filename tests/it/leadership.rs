//! Leader election under faults, with the chart's two replicas: an API server that goes away for
//! 5 s or 20 s stops neither replica and leaves exactly one leading, with no Event twice; a leader
//! whose requests hang stops acting, by its own clock, before the standby takes over, and writes
//! nothing after; a replica whose passes cannot complete fails `/healthz`.
//!
//! The API server is killed and an audit log is kept: a control plane of this module's own.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use authprobe_harness::StallProxy;
use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::support::*;

static ENV: Private =
    Private::new("leadership", Setup { start_operator: false, audit_log: true, ..Setup::DEFAULT });

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A replica of the chart's deployment: leader election in `lease_ns`, named `name`.
fn replica(env: &Env, lease_ns: &str, name: &'static str, extra: &[&str]) -> Operator {
    let mut args = vec!["--leader-elect", "--google-retry-deadline=8s"];
    args.extend_from_slice(extra);
    Operator::new(&env.cp, &env.endpoints, &args)
        .with_env("POD_NAMESPACE", lease_ns.to_string())
        .with_env("POD_NAME", name)
}

/// What a replica's `/readyz` says: a leader is "ok", a standby says it waits for the lease.
async fn readyz(operator: &Operator) -> String {
    let url = format!("http://{}/readyz", operator.http);
    match reqwest::get(url).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(e) => format!("unreachable: {e}"),
    }
}

/// Waits until exactly one of `replicas` leads and the Lease names it; returns its name.
async fn one_leader(leases: &Api<Lease>, replicas: &[(&str, &Operator)]) -> String {
    let started = Instant::now();
    loop {
        let holder = leases
            .get(authprobe::runtime::leader::DEFAULT_LEASE_NAME)
            .await
            .ok()
            .and_then(|l| lease_holder(&l));
        let mut leading = Vec::new();
        for (name, operator) in replicas {
            assert!(operator.alive(), "{name} exited:\n{}", operator.log_text());
            if readyz(operator).await == "ok" {
                leading.push(*name);
            }
        }
        if let (Some(holder), [only]) = (&holder, leading.as_slice())
            && holder == only
        {
            return holder.clone();
        }
        assert!(started.elapsed() < WAIT, "not exactly one leader: lease {holder:?}, leading {leading:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace whose KSA `app` is bound nowhere, and a probe of it every 30 s: PrincipalNotMapped,
/// one Warning on the ServiceAccount. Returns (probe, namespace, GSA).
async fn broken_probe(env: &Env, client: &Client, prefix: &str) -> (String, String, String) {
    let id = unique(prefix);
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique(prefix));
    let ns = env.namespace(client, prefix, &[("team", id.as_str())]).await;
    service_account(client, &ns, "app", Some(&gsa)).await;
    env.fake_service_account(&gsa, &[]);
    apply_probe(
        client,
        &id,
        gke_spec("team", &id, json!({"probe": {"interval": "30s", "propagationGrace": "0s"}})),
    )
    .await;
    env.wait_ready(client, &id, "False", "PrincipalNotMapped").await;
    wait_for_events(client, &ns, "ServiceAccount", "app", &[("Warning", "PrincipalNotMapped", 1)]).await;
    (id, ns, gsa)
}

/// A pass after `since` has written the probe's status (its lastProbeTime moved past it).
async fn converges(
    env: &Env,
    client: &Client,
    probe: &str,
    since: Timestamp,
    want: (&str, &str),
) -> Duration {
    let started = Instant::now();
    probe_now(client, probe).await;
    env.wait_for(client, probe, "a pass after the outage", |p| {
        let last = p.status.as_ref().and_then(|s| s.last_probe_time.as_ref()).map(|t| t.0);
        last.is_some_and(|t| t > since) && ready(p).is_some_and(|r| (r.0.as_str(), r.1.as_str()) == want)
    })
    .await;
    started.elapsed()
}

#[tokio::test]
async fn api_server_outages_stop_no_replica_and_one_leads_after() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let lease_ns = env.namespace(&client, "lease", &[]).await;
    let (a, b) = (replica(&env, &lease_ns, "outage-a", &[]), replica(&env, &lease_ns, "outage-b", &[]));
    a.start().unwrap();
    b.start().unwrap();
    let leases = Api::<Lease>::namespaced(client.clone(), &lease_ns);
    let replicas = [("outage-a", &a), ("outage-b", &b)];
    one_leader(&leases, &replicas).await;
    let (probe, ns, _) = broken_probe(&env, &client, "outage").await;
    let pids = (a.pid(), b.pid());

    for outage in [Duration::from_secs(5), Duration::from_secs(20)] {
        let before = Timestamp::now();
        env.cp.kill_apiserver();
        // The outage's length is the experiment, not something to await.
        tokio::time::sleep(outage).await;
        env.cp.restart_apiserver().await.unwrap();
        let back = Instant::now();
        let client = env.client().await;
        let leader = one_leader(&leases, &replicas).await;
        let leads_after = back.elapsed();
        converges(&env, &client, &probe, before, ("False", "PrincipalNotMapped")).await;
        let converged = back.elapsed();
        assert_eq!((a.pid(), b.pid()), pids, "neither replica restarted");
        assert_eq!(
            event_counts(&client, &ns, "ServiceAccount", "app").await,
            BTreeMap::from([(("Warning".to_string(), "PrincipalNotMapped".to_string()), 1)]),
            "no Event twice after a {outage:?} outage"
        );
        report(
            "leader",
            &format!(
                "kube-apiserver away {} s: both replicas up, {leader} leads {:.1} s and status converges {:.1} s after it came back, 1 Warning",
                outage.as_secs(),
                leads_after.as_secs_f64(),
                converged.as_secs_f64()
            ),
        );
    }
    a.stop();
    b.stop();
}

/// The audit log's entries: (when received, user agent, verb, resource/subresource, status code).
fn audited_writes(env: &Env) -> Vec<(Timestamp, String, String, String, i64)> {
    std::fs::read_to_string(env.cp.audit_log())
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["stage"] == "ResponseComplete")
        .filter(|e| matches!(e["verb"].as_str(), Some("create" | "update" | "patch")))
        .filter_map(|e| {
            let at = e["requestReceivedTimestamp"].as_str()?.parse().ok()?;
            let resource = format!(
                "{}/{}",
                e["objectRef"]["resource"].as_str().unwrap_or_default(),
                e["objectRef"]["subresource"].as_str().unwrap_or_default()
            );
            Some((
                at,
                e["userAgent"].as_str().unwrap_or_default().to_string(),
                e["verb"].as_str().unwrap_or_default().to_string(),
                resource,
                e["responseStatus"]["code"].as_i64().unwrap_or_default(),
            ))
        })
        .collect()
}

#[tokio::test]
async fn a_stalled_leader_stops_acting_before_the_standby_takes_over() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let lease_ns = env.namespace(&client, "split", &[]).await;
    let api = env.cp.api_addr();
    let proxy = tokio::task::spawn_blocking(move || StallProxy::start(api)).await.unwrap().unwrap();
    let via_proxy = env.cp.kubeconfig_via(proxy.addr()).unwrap();
    let a =
        replica(&env, &lease_ns, "stalled-a", &[]).with_env("KUBECONFIG", via_proxy.display().to_string());
    let b = replica(&env, &lease_ns, "direct-b", &[]);
    let leases = Api::<Lease>::namespaced(client.clone(), &lease_ns);
    a.start().unwrap();
    assert_eq!(one_leader(&leases, &[("stalled-a", &a)]).await, "stalled-a");
    b.start().unwrap();
    let (probe, ns, gsa) = broken_probe(&env, &client, "split").await;

    // Every request of the leader hangs. The fix lands meanwhile: whoever leads must write it.
    proxy.stall();
    let stalled = Instant::now();
    env.fake_service_account(&gsa, &[(WIU, &[&member(&ns, "app")])]);
    let (holder, _) = wait_takeover(&leases, Some("stalled-a")).await;
    assert_eq!(holder, "direct-b");
    let took_over = stalled.elapsed();
    let lease = leases.get(authprobe::runtime::leader::DEFAULT_LEASE_NAME).await.unwrap();
    let acquired = lease.spec.and_then(|s| s.acquire_time).map(|t| t.0).expect("the new term's acquireTime");
    probe_now(&client, &probe).await;
    env.wait_ready(&client, &probe, "True", "Verified").await;
    wait_for_events(
        &client,
        &ns,
        "ServiceAccount",
        "app",
        &[("Warning", "PrincipalNotMapped", 1), ("Normal", "Verified", 1)],
    )
    .await;

    // The old leader's requests flow again: it finds the lease taken and stands by.
    proxy.resume();
    tokio::time::timeout(WAIT, async {
        while readyz(&a).await != "standby: waiting for the lease" {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the old leader never stood by:\n{}", a.log_text()));
    assert!(a.alive(), "the old leader did not exit");
    let log = a.log_text();
    assert!(
        log.contains("no renewal succeeded in time: stopped acting")
            || log.contains("another replica took the lease"),
        "{log}"
    );
    // One more pass by the new leader, then nothing the old one did may have landed after the takeover.
    probe_now(&client, &probe).await;
    env.wait_ready(&client, &probe, "True", "Verified").await;
    let writes = audited_writes(&env);
    let late: Vec<_> = writes
        .iter()
        .filter(|(at, agent, _, resource, code)| {
            *at >= acquired
                && agent.contains("(stalled-a)")
                && (200..300).contains(code)
                && matches!(resource.as_str(), "authprobes/status" | "events/" | "serviceaccounts/token")
        })
        .collect();
    assert!(late.is_empty(), "the old leader wrote after the new one took over: {late:?}");
    let new_leader_wrote = writes.iter().any(|(at, agent, _, resource, _)| {
        *at >= acquired && agent.contains("(direct-b)") && resource == "authprobes/status"
    });
    assert!(new_leader_wrote, "the audit log shows the new leader's status writes");
    assert_eq!(
        event_counts(&client, &ns, "ServiceAccount", "app").await,
        BTreeMap::from([
            (("Normal".to_string(), "Verified".to_string()), 1),
            (("Warning".to_string(), "PrincipalNotMapped".to_string()), 1)
        ])
    );
    report(
        "leader",
        &format!(
            "leader's requests stalled: the standby took over after {:.1} s; the old leader wrote nothing after that ({} bytes it sent were held and dropped)",
            took_over.as_secs_f64(),
            proxy.held_bytes()
        ),
    );
    a.stop();
    b.stop();
}

#[tokio::test]
async fn a_replica_whose_passes_cannot_complete_fails_healthz() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let api = env.cp.api_addr();
    let proxy = tokio::task::spawn_blocking(move || StallProxy::start(api)).await.unwrap().unwrap();
    let via_proxy = env.cp.kubeconfig_via(proxy.addr()).unwrap();
    let operator = Operator::new(
        &env.cp,
        &env.endpoints,
        &["--google-retry-deadline=8s", "--stuck-after=20s", "--pass-deadline=15s"],
    )
    .with_env("KUBECONFIG", via_proxy.display().to_string());
    operator.start().unwrap();
    let healthz = || async {
        let url = format!("http://{}/healthz", operator.http);
        reqwest::get(url).await.map(|r| r.status().as_u16()).unwrap_or_default()
    };
    let (probe, _, _) = broken_probe(&env, &client, "wedged").await;
    assert_eq!(healthz().await, 200);

    // Every request hangs: passes start (every 30 s) and none completes.
    proxy.stall();
    let stalled = Instant::now();
    tokio::time::timeout(Duration::from_secs(120), async {
        while healthz().await == 200 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("/healthz never failed:\n{}", operator.log_text()));
    let failed_after = stalled.elapsed();
    proxy.resume();
    tokio::time::timeout(WAIT, async {
        while healthz().await != 200 {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("/healthz never recovered:\n{}", operator.log_text()));
    env.wait_ready(&client, &probe, "False", "PrincipalNotMapped").await;
    report(
        "health",
        &format!(
            "all requests stalled: /healthz failed after {:.0} s (--stuck-after 20s), passed again once they flowed",
            failed_after.as_secs_f64()
        ),
    );
    operator.stop();
}
