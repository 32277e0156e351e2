//! The quota-budgeted live chain: `tokenExchangeInterval` and `--google-quota-share` against the
//! real control plane and the fake Google. The operator of this module runs at a quota share of
//! 0.01 (60 exchanges a minute, one a second, at most 10 per pass), so the budget shows at the
//! scale of a test.
//!
//! The fake's call counts are global and the tests read their timing, so each test has a control
//! plane, fake and operator of its own.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use authprobe::api::AuthProbe;
use fake_google::scenario::{Binding, Cluster, GkeCluster, GkeProject, ServiceAccount};
use serde_json::json;

use crate::support::{self, *};

static ENV: Private = Private::new(
    "quota",
    Setup { operator_args: &["--google-retry-deadline=8s", "--google-quota-share=0.01"], ..Setup::DEFAULT },
);

const CLUSTER_URL: &str =
    "https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-1";
const BUCKET: &str = "//storage.googleapis.com/projects/_/buckets/payments-data";
const EXCHANGE: &str = "securetoken.identitybindingtoken";

/// Lets the fake reach this cluster's issuer, and trust it as the GKE cluster `prod-1`.
fn trust_cluster(env: &Env) {
    let (issuer, ca) = (env.cp.issuer(), env.cp.ca_pem().unwrap());
    env.fake.update(|s| {
        s.clusters.push(Cluster { issuer: issuer.clone(), ca_pem: ca });
        s.gke.push(GkeProject {
            project_id: "acme-prod".into(),
            project_number: "123456789012".into(),
            clusters: vec![GkeCluster { url: CLUSTER_URL.into(), issuer }],
        });
    });
}

/// A GSA granting `roles/iam.workloadIdentityUser` to `members`, reading the bucket if `reads`.
fn gsa(email: &str, members: Vec<String>, reads: bool) -> ServiceAccount {
    let grants = if reads {
        BTreeMap::from([(BUCKET.to_string(), vec!["storage.objects.get".to_string()])])
    } else {
        BTreeMap::new()
    };
    ServiceAccount {
        email: email.into(),
        bindings: vec![Binding { role: WIU.into(), members, condition: None }],
        grants,
        ..Default::default()
    }
}

/// A GKE probe over the `team=<team>` namespaces with the live chain every
/// `token_exchange_interval` (the mapping checks every 10 minutes) and the bucket as its target.
fn chain_spec(team: &str, token_exchange_interval: &str) -> serde_json::Value {
    gke_spec(
        "team",
        team,
        json!({
            "identity": {"gke": {"clusterLocation": "us-central1", "clusterName": "prod-1"}},
            "targets": [{"resource": BUCKET, "permissions": ["storage.objects.get"]}],
            "probe": {"tokenExchange": true, "interval": "10m", "tokenExchangeInterval": token_exchange_interval}
        }),
    )
}

fn live_verified(p: &AuthProbe) -> Option<u32> {
    p.status.as_ref()?.summary.as_ref()?.live_verified
}

/// Exchanges counted by the fake, sampled every 100 ms: (time since the sampling began, count).
type Samples = Arc<Mutex<Vec<(Duration, u64)>>>;

fn sample(env: &Arc<Env>) -> (Samples, tokio::task::JoinHandle<()>) {
    let samples: Samples = Arc::default();
    let (env, into) = (env.clone(), samples.clone());
    let started = Instant::now();
    let task = tokio::spawn(async move {
        loop {
            let count = env.fake.counts().get(EXCHANGE).copied().unwrap_or_default();
            into.lock().unwrap().push((started.elapsed(), count));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    (samples, task)
}

/// When the fake had counted `n` exchanges.
fn reached(samples: &[(Duration, u64)], n: u64) -> Option<Duration> {
    samples.iter().find(|(_, c)| *c >= n).map(|(t, _)| *t)
}

/// Exchanges counted in `(from, to]`.
fn between(samples: &[(Duration, u64)], from: Duration, to: Duration) -> u64 {
    let at = |t: Duration| samples.iter().rev().find(|(s, _)| *s <= t).map_or(0, |(_, c)| *c);
    at(to) - at(from)
}

#[tokio::test]
async fn exchanges_are_spread_over_the_interval_within_the_quota_share_and_a_change_jumps_the_queue() {
    let env = ENV.get();
    trust_cluster(&env);
    let client = env.client().await;
    let id = unique("quota");
    let main = format!("{}@acme-prod.iam.gserviceaccount.com", unique("main"));
    let mut namespaces = vec![];
    for _ in 0..12 {
        let ns = env.namespace(&client, "quota", &[("team", id.as_str())]).await;
        service_account(&client, &ns, "app", Some(&main)).await;
        namespaces.push(ns);
    }
    let members = namespaces.iter().map(|ns| member(ns, "app")).collect();
    env.fake.update(|s| s.service_accounts.push(gsa(&main, members, true)));

    let (samples, sampler) = sample(&env);
    apply_probe(&client, &id, chain_spec(&id, "1m")).await;

    // Every KSA is verified live within the window, never verified ones first.
    let probe = env.wait_for(&client, &id, "liveVerified 12", |p| live_verified(p) == Some(12)).await;
    let summary = probe.status.as_ref().unwrap().summary.unwrap();
    assert_eq!((summary.service_accounts, summary.passing), (12, 12), "{summary:?}");

    // The first exchanges came within the budget: one a second, at most 10 per pass (the next
    // pass at least 5 s after), not all twelve at once.
    let first = reached(&samples.lock().unwrap(), 1).expect("an exchange");
    let twelfth = reached(&samples.lock().unwrap(), 12).expect("twelve exchanges");
    assert!(
        twelfth - first >= Duration::from_secs(12),
        "twelve exchanges within {:?}: the quota share spaces them 1 s apart, 10 per pass",
        twelfth - first
    );

    // After the first window (its slots counted from the end of the first pass, within about
    // 12 s of the first exchange): each KSA once a minute, at its own slot (one every 5 s), not
    // in a burst at a window's boundary.
    let window = first + Duration::from_secs(75)..first + Duration::from_secs(135);
    loop {
        if samples.lock().unwrap().last().is_some_and(|(t, _)| *t > window.end) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let seen = samples.lock().unwrap().clone();
    let in_window = between(&seen, window.start, window.end);
    assert!((10..=14).contains(&in_window), "{in_window} exchanges in a minute, not 12: {seen:?}");
    let mut from = window.start;
    while from + Duration::from_secs(20) <= window.end {
        let burst = between(&seen, from, from + Duration::from_secs(20));
        assert!(burst <= 6, "{burst} exchanges within 20 s from {from:?}: a burst, not one every 5 s");
        from += Duration::from_secs(1);
    }
    // Never more than the quota share: 60 in any minute.
    for (t, _) in seen.iter().filter(|(t, _)| *t + Duration::from_secs(60) <= seen.last().unwrap().0) {
        let minute = between(&seen, *t, *t + Duration::from_secs(60));
        assert!(minute <= 60, "{minute} exchanges in the minute from {t:?}");
    }
    let probe = env.wait_for(&client, &id, "liveVerified 12", |p| live_verified(p) == Some(12)).await;
    assert_eq!(support::ready(&probe).unwrap().0, "True");

    // A changed annotation jumps the queue: its own exchange and live verdict come at once, not
    // at its slot up to a minute later.
    let other = format!("{}@acme-prod.iam.gserviceaccount.com", unique("other"));
    let changed = namespaces[5].clone();
    env.fake.update(|s| s.service_accounts.push(gsa(&other, vec![member(&changed, "app")], false)));
    let before = env.fake.counts().get("iamcredentials.generateAccessToken").copied().unwrap_or_default();
    let started = Instant::now();
    annotate(&client, &changed, "app", Some(&other)).await;
    let probe = env
        .wait_for(&client, &id, "PermissionMissing for the changed KSA", |p| {
            p.status.as_ref().is_some_and(|s| {
                s.failures.iter().any(|f| f.namespace == changed && f.reason.as_str() == "PermissionMissing")
            })
        })
        .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(15), "the changed KSA's live verdict took {took:?}");
    let failure = &probe.status.as_ref().unwrap().failures[0];
    assert!(failure.message.contains(&other), "{}", failure.message);
    assert!(
        env.fake.counts().get("iamcredentials.generateAccessToken").copied().unwrap_or_default() > before,
        "impersonated the new GSA"
    );
    assert_eq!(live_verified(&probe), Some(11), "the changed KSA no longer verifies");
    sampler.abort();
    support::report(
        "quota",
        &format!(
            "12 KSAs first exchanged over {:.1} s; {in_window} exchanges in the minute from {:?}; a changed KSA's live verdict in {:.1} s",
            (twelfth - first).as_secs_f64(),
            window.start,
            took.as_secs_f64()
        ),
    );
}

/// One probe at a time, each pass deferring exchanges (forty KSAs, ten a pass at one a second):
/// every probe still gets its turn, first come, first served.
static TURNS: Private = Private::new(
    "quota_turns",
    Setup {
        operator_args: &["--google-retry-deadline=8s", "--google-quota-share=0.01", "--concurrency=1"],
        ..Setup::DEFAULT
    },
);

#[tokio::test]
async fn probes_whose_passes_keep_requeueing_do_not_starve_the_others() {
    let env = TURNS.get();
    trust_cluster(&env);
    let client = env.client().await;
    let id = unique("turns");
    let email = format!("{}@acme-prod.iam.gserviceaccount.com", unique("turns"));
    let mut members = vec![];
    let probes: Vec<String> = (0..3).map(|i| format!("{id}-{i}")).collect();
    for probe in &probes {
        for _ in 0..40 {
            let ns = env.namespace(&client, "turns", &[("team", probe.as_str())]).await;
            service_account(&client, &ns, "app", Some(&email)).await;
            members.push(member(&ns, "app"));
        }
    }
    env.fake.update(|s| s.service_accounts.push(gsa(&email, members, true)));
    let started = Instant::now();
    for probe in &probes {
        apply_probe(&client, probe, chain_spec(probe, "1h")).await;
    }
    // Each pass runs ten exchanges (about ten seconds) and asks for the next at once, for the
    // four passes of its sweep. In turn, the three have a complete first status within 80 s; a
    // probe that kept winning would take its whole sweep first.
    let mut firsts = vec![];
    for probe in &probes {
        env.wait_for_within(&client, probe, "a complete first status", Duration::from_secs(80), |p| {
            p.status.as_ref().and_then(|s| s.summary.as_ref()).is_some_and(|s| s.service_accounts == 40)
        })
        .await;
        firsts.push(started.elapsed());
    }
    support::report("quota", &format!("three probes at --concurrency 1, each first status after {firsts:?}"));
}
