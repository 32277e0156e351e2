//! Unknown versus False: when Google fails or refuses the operator itself, probes say Unknown with
//! the checker's reason and never False, even for mappings that are really broken; they turn to the
//! true verdict by themselves once Google answers again.
//!
//! Faults, the operator's token and its permissions are the fake's for everyone: these tests have a
//! control plane, fake and operator of their own, and run one at a time.

use authprobe::api::{AuthProbe, condition};
use fake_google::scenario::{Faults, OPERATOR_PERMISSIONS};
use futures::StreamExt;
use kube::{
    Api,
    runtime::{WatchStreamExt, watcher},
};
use serde_json::json;

use crate::support::*;

static ENV: Private = Private::new("google_faults", Setup::DEFAULT);

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A broken mapping (KSA bound nowhere) under a fresh GSA, so nothing cached answers for it;
/// probed every 30 s, the shortest interval.
async fn broken_probe(env: &Env, client: &kube::Client, id: &str) {
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("faulty"));
    let ns = env.namespace(client, "faults", &[("team", id)]).await;
    service_account(client, &ns, "app", Some(&gsa)).await;
    env.fake_service_account(&gsa, &[]);
    apply_probe(client, id, gke_spec("team", id, json!({"probe": {"interval": "30s"}}))).await;
}

/// Records every Ready status the probe ever shows, in order.
fn record_ready(
    client: &kube::Client,
    id: &str,
) -> (tokio::sync::watch::Receiver<Vec<String>>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    let api = Api::<AuthProbe>::all(client.clone());
    let config = watcher::Config::default().fields(&format!("metadata.name={id}"));
    let task = tokio::spawn(async move {
        let mut stream = watcher(api, config).applied_objects().boxed();
        while let Some(Ok(p)) = stream.next().await {
            if let Some((status, reason)) = ready(&p) {
                tx.send_modify(|seen| seen.push(format!("{status}/{reason}")));
            }
        }
    });
    (rx, task)
}

/// Everything the recorder saw up to and including the first False.
async fn seen_until_false(
    mut seen: tokio::sync::watch::Receiver<Vec<String>>,
    task: tokio::task::JoinHandle<()>,
) -> Vec<String> {
    let all = tokio::time::timeout(WAIT, seen.wait_for(|s| s.iter().any(|x| x.starts_with("False"))))
        .await
        .expect("the recorder sees False")
        .expect("recorder alive")
        .clone();
    task.abort();
    let first_false = all.iter().position(|s| s.starts_with("False")).unwrap_or(all.len());
    all[..first_false].to_vec()
}

fn set_faults(env: &Env, faults: Faults) {
    env.fake.update(|s| s.faults = faults);
}

#[tokio::test]
async fn a_google_outage_is_unknown_and_recovers_by_itself() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let id = unique("outage");
    set_faults(
        &env,
        Faults {
            error_rate: 1.0,
            apis: vec!["iam.serviceAccounts.get".into(), "iam.getIamPolicy".into()],
            ..Default::default()
        },
    );
    let (seen, recorder) = record_ready(&client, &id);
    broken_probe(&env, &client, &id).await;
    let probe = env.wait_ready(&client, &id, "Unknown", "GoogleUnavailable").await;
    assert_eq!(
        condition_of(&probe, condition::CHECKER_HEALTHY).unwrap().0,
        "True",
        "an outage is not the checker's fault"
    );
    assert_eq!(
        condition_of(&probe, condition::MAPPINGS_VERIFIED).unwrap(),
        ("Unknown".into(), "GoogleUnavailable".into())
    );

    // No nudge: the next periodic pass (30 s plus jitter) finds Google back.
    set_faults(&env, Faults::default());
    let back = std::time::Instant::now();
    env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    let before = seen_until_false(seen, recorder).await;
    assert!(!before.is_empty() && before.iter().all(|s| s == "Unknown/GoogleUnavailable"), "{before:?}");
    report(
        "fault",
        &format!(
            "Google IAM down (100% 503): Unknown/GoogleUnavailable, never False; true verdict {:.1} s after it came back, unprompted",
            back.elapsed().as_secs_f64()
        ),
    );
}

#[tokio::test]
async fn throttling_is_unknown_never_false() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let id = unique("throttled");
    set_faults(
        &env,
        Faults {
            throttle_rate: 1.0,
            retry_after_seconds: 1,
            apis: vec!["iam.serviceAccounts.get".into()],
            ..Default::default()
        },
    );
    let (seen, recorder) = record_ready(&client, &id);
    broken_probe(&env, &client, &id).await;
    env.wait_ready(&client, &id, "Unknown", "GoogleThrottled").await;
    set_faults(&env, Faults::default());
    probe_now(&client, &id).await;
    env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    let before = seen_until_false(seen, recorder).await;
    assert!(!before.is_empty() && before.iter().all(|s| s == "Unknown/GoogleThrottled"), "{before:?}");
    report(
        "fault",
        "Google throttling (every call 429, Retry-After: 1): Unknown/GoogleThrottled, never False; true verdict once it stopped",
    );
}

#[tokio::test]
async fn a_rejected_operator_token_is_the_checkers_problem() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let id = unique("unauth");
    env.fake.update(|s| s.operator.tokens = vec!["some-other-token".into()]);
    broken_probe(&env, &client, &id).await;
    let probe = env.wait_ready(&client, &id, "Unknown", "CheckerUnauthenticated").await;
    env.fake.update(|s| s.operator.tokens = vec![OPERATOR_TOKEN.into()]);
    assert_eq!(
        condition_of(&probe, condition::CHECKER_HEALTHY).unwrap(),
        ("False".into(), "CheckerUnauthenticated".into())
    );
    let on_probe = event_summary(&client, "default", "AuthProbe", &id).await;
    assert!(
        on_probe.iter().filter(|(t, r, _)| t == "Warning" && r == "CheckerUnauthenticated").count() >= 1,
        "{on_probe:?}"
    );
    let failure = &probe.status.unwrap().failures[0];
    assert!(failure.message.contains("401 UNAUTHENTICATED"), "{}", failure.message);
    // Nothing pages the namespace owner: no Warning on the ServiceAccount.
    let on_sa = event_summary(&client, &failure.namespace, "ServiceAccount", "app").await;
    assert!(on_sa.is_empty(), "{on_sa:?}");

    probe_now(&client, &id).await;
    let probe = env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    assert_eq!(condition_of(&probe, condition::CHECKER_HEALTHY).unwrap().0, "True");
}

#[tokio::test]
async fn a_missing_operator_permission_is_checker_forbidden() {
    let env = ENV.get();
    let _serial = SERIAL.lock().await;
    let client = env.client().await;
    let id = unique("forbidden");
    env.fake.update(|s| s.operator.permissions.retain(|p| p != "iam.serviceAccounts.getIamPolicy"));
    broken_probe(&env, &client, &id).await;
    let probe = env.wait_ready(&client, &id, "Unknown", "CheckerForbidden").await;
    env.fake
        .update(|s| s.operator.permissions = OPERATOR_PERMISSIONS.iter().map(|p| (*p).to_string()).collect());
    assert_eq!(
        condition_of(&probe, condition::CHECKER_HEALTHY).unwrap(),
        ("False".into(), "CheckerForbidden".into())
    );
    let failure = &probe.status.unwrap().failures[0];
    assert!(
        failure.message.contains("Permission 'iam.serviceAccounts.getIamPolicy' denied"),
        "{}",
        failure.message
    );
}
