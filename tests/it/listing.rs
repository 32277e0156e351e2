//! How the operator lists: through the API server's streaming lists (WatchList), so it never
//! LISTs Namespaces, ServiceAccounts or workloads and holds no list page; and in pages from a
//! server that refuses streaming lists, with the same verdicts.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::support::*;

static STREAMING: Private = Private::new("streaming_lists", Setup { audit_log: true, ..Setup::DEFAULT });
static PAGED: Private =
    Private::new("paged_lists", Setup { feature_gates: Some("WatchList=false"), ..Setup::DEFAULT });

const FALLBACK: &str = "the API server refuses streaming lists; listing in pages";

/// A probe over one namespace is Verified, and a second namespace created after the lists
/// reaches status through the watches.
async fn verified_through_the_watches(env: &Env) {
    let client = env.client().await;
    let id = unique("lists");
    let gsa = format!("{id}@acme-prod.iam.gserviceaccount.com");
    let first = env.namespace(&client, "lists", &[("team", &id)]).await;
    service_account(&client, &first, "app", Some(&gsa)).await;
    env.fake_service_account(&gsa, &[(WIU, &[&member(&first, "app")])]);
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    env.wait_verified(&client, &id, 1).await;

    // Its own GSA: the first one's policy is read once per interval.
    let second_gsa = format!("{id}-second@acme-prod.iam.gserviceaccount.com");
    let second = env.namespace(&client, "lists", &[("team", &id)]).await;
    env.fake_service_account(&second_gsa, &[(WIU, &[&member(&second, "app")])]);
    service_account(&client, &second, "app", Some(&second_gsa)).await;
    env.wait_verified(&client, &id, 2).await;
}

#[tokio::test]
async fn the_operator_lists_by_streaming_and_never_lists_what_it_watches() {
    let env = STREAMING.get();
    verified_through_the_watches(&env).await;
    assert!(!env.operator.log_text().contains(FALLBACK), "this API server offers streaming lists");

    let audit = std::fs::read_to_string(env.cp.audit_log()).unwrap();
    let mut requests: BTreeMap<String, u32> = BTreeMap::new();
    let mut streaming = 0;
    for line in audit.lines() {
        let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
        let resource = entry["objectRef"]["resource"].as_str().unwrap_or("-");
        if entry["stage"] != "RequestReceived" {
            continue;
        }
        if !["namespaces", "serviceaccounts", "deployments", "pods", "configmaps"].contains(&resource) {
            continue;
        }
        let verb = entry["verb"].as_str().unwrap_or("-");
        *requests.entry(format!("{verb} {resource}")).or_default() += 1;
        let uri = entry["requestURI"].as_str().unwrap_or_default();
        if verb == "watch" && uri.contains("sendInitialEvents=true") {
            streaming += 1;
        }
    }
    let lists: Vec<&String> = requests.keys().filter(|k| k.starts_with("list ")).collect();
    assert!(lists.is_empty(), "nothing the operator watches is listed: {requests:?}");
    assert!(streaming >= 5, "streaming lists of the watched kinds: {streaming} in {requests:?}");
    report("listing", &format!("{streaming} streaming lists, no LIST among {requests:?}"));
}

#[tokio::test]
async fn a_server_without_streaming_lists_is_listed_in_pages() {
    let env = PAGED.get();
    verified_through_the_watches(&env).await;
    let log = env.operator.log_text();
    let fallbacks = log.lines().filter(|l| l.contains(FALLBACK)).count();
    // Namespaces, ServiceAccounts, six workload kinds, ConfigMaps: each falls back once.
    assert_eq!(fallbacks, 9, "each watch falls back once:\n{log}");
}
