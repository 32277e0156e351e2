//! The operator against the real control plane and the fake Google: every static and IAM-policy
//! reason, coverage following namespace labels, fixes turning Ready True, observedGeneration,
//! bounded status, and one event per transition.

use std::collections::BTreeMap;

use authprobe::api::{AuthProbe, Reason, condition};
use futures::{StreamExt, stream};
use serde_json::json;

use crate::support::*;

fn reasons(probe: &AuthProbe) -> BTreeMap<String, (String, String)> {
    probe
        .status
        .as_ref()
        .map(|s| {
            s.failures
                .iter()
                .map(|f| (f.namespace.clone(), (f.reason.as_str().to_string(), f.message.clone())))
                .collect()
        })
        .unwrap_or_default()
}

fn gsa(name: &str) -> String {
    format!("{name}@acme-prod.iam.gserviceaccount.com")
}

#[tokio::test]
async fn static_reasons_each_name_their_fix() {
    let env = env();
    let client = env.client().await;
    let id = unique("static");
    let good = gsa(&unique("good"));
    let label = [("suite", id.as_str())];
    let missing = env.namespace(&client, "missing", &label).await;
    let unannotated = env.namespace(&client, "unannotated", &label).await;
    service_account(&client, &unannotated, "app", None).await;
    let invalid = env.namespace(&client, "invalid", &label).await;
    service_account(
        &client,
        &invalid,
        "app",
        Some("payments@acme-prod.iam.gserviceaccount.com.evil.example"),
    )
    .await;
    let other_project = env.namespace(&client, "otherproject", &label).await;
    service_account(&client, &other_project, "app", Some("payments@acme-dev.iam.gserviceaccount.com")).await;
    let fine = env.namespace(&client, "fine", &label).await;
    service_account(&client, &fine, "app", Some(&good)).await;
    env.fake_service_account(&good, &[(WIU, &[&member(&fine, "app")])]);

    apply_probe(
        &client,
        &id,
        gke_spec("suite", &id, json!({"identity": {"serviceAccountProjects": ["acme-prod"]}})),
    )
    .await;
    let probe = env
        .wait_for(&client, &id, "four static failures", |p| {
            p.status.as_ref().is_some_and(|s| s.failures.len() == 4)
        })
        .await;
    let found = reasons(&probe);
    let expect = |ns: &str, reason: Reason, fix: &str| {
        let (r, message) = &found[ns];
        assert_eq!(r, reason.as_str(), "{ns}: {message}");
        assert!(message.contains(fix), "{ns}: the fix {fix:?} is missing from: {message}");
    };
    expect(
        &missing,
        Reason::ServiceAccountMissing,
        &format!("kubectl create serviceaccount app -n {missing}"),
    );
    expect(
        &unannotated,
        Reason::AnnotationMissing,
        &format!(
            "kubectl annotate serviceaccount app -n {unannotated} iam.gke.io/gcp-service-account={good}"
        ),
    );
    expect(&invalid, Reason::AnnotationInvalid, "the domain must be PROJECT.iam.gserviceaccount.com");
    expect(&other_project, Reason::ServiceAccountProjectNotAllowed, "acme-dev");
    let summary = probe.status.as_ref().and_then(|s| s.summary).unwrap();
    assert_eq!(
        (summary.namespaces, summary.service_accounts, summary.passing, summary.failing),
        (5, 5, 1, 4)
    );
    assert_eq!(ready(&probe).unwrap().0, "False");
}

#[tokio::test]
async fn iam_policy_reasons_are_told_apart() {
    let env = env();
    let client = env.client().await;
    let id = unique("iam");
    let label = [("suite", id.as_str())];
    let ns = |p: &'static str| {
        let client = client.clone();
        async move { env.namespace(&client, p, &label).await }
    };
    let (mapped, unmapped, conditional, deleted, notfound, disabled) = (
        ns("mapped").await,
        ns("unmapped").await,
        ns("conditional").await,
        ns("deleted").await,
        ns("notfound").await,
        ns("disabled").await,
    );
    let main = gsa(&unique("main"));
    let disabled_gsa = gsa(&unique("off"));
    for n in [&mapped, &unmapped, &conditional, &deleted] {
        service_account(&client, n, "app", Some(&main)).await;
    }
    service_account(&client, &notfound, "app", Some(&gsa(&unique("nosuch")))).await;
    service_account(&client, &disabled, "app", Some(&disabled_gsa)).await;
    let deleted_member = format!("deleted:{}?uid=42", member(&deleted, "app"));
    env.fake.update(|s| {
        use fake_google::scenario::{Binding, Condition, ServiceAccount};
        s.service_accounts.push(ServiceAccount {
            email: main.clone(),
            bindings: vec![
                Binding {
                    role: WIU.into(),
                    members: vec![member(&mapped, "app"), deleted_member.clone()],
                    condition: None,
                },
                Binding {
                    role: WIU.into(),
                    members: vec![member(&conditional, "app")],
                    condition: Some(Condition {
                        title: "expires".into(),
                        expression: "request.time < timestamp('2020-01-01T00:00:00Z')".into(),
                    }),
                },
            ],
            ..Default::default()
        });
        s.service_accounts.push(ServiceAccount {
            email: disabled_gsa.clone(),
            disabled: true,
            bindings: vec![Binding {
                role: WIU.into(),
                members: vec![member(&disabled, "app")],
                condition: None,
            }],
            ..Default::default()
        });
    });

    apply_probe(&client, &id, gke_spec("suite", &id, json!({}))).await;
    let probe = env
        .wait_for(&client, &id, "five IAM failures", |p| {
            p.status.as_ref().is_some_and(|s| s.failures.len() == 5)
        })
        .await;
    let found = reasons(&probe);
    for (ns, reason) in [
        (&unmapped, Reason::PrincipalNotMapped),
        (&conditional, Reason::MappingConditional),
        (&deleted, Reason::MappingDeleted),
        (&notfound, Reason::GoogleServiceAccountNotFound),
        (&disabled, Reason::GoogleServiceAccountDisabled),
    ] {
        assert_eq!(found[ns.as_str()].0, reason.as_str(), "{ns}: {}", found[ns.as_str()].1);
        let on_sa = event_summary(&client, ns, "ServiceAccount", "app").await;
        assert_eq!(on_sa, vec![("Warning".to_string(), reason.as_str().to_string(), 1)], "{ns}");
    }
    assert!(!found.contains_key(&mapped));
    assert!(found[&unmapped].1.contains(&format!("gcloud iam service-accounts add-iam-policy-binding {main} --project=acme-prod --role=roles/iam.workloadIdentityUser")));
    assert!(
        event_summary(&client, &mapped, "ServiceAccount", "app").await.is_empty(),
        "a passing KSA gets no event"
    );
}

#[tokio::test]
async fn an_unsupported_target_is_an_invalid_spec_not_a_crash() {
    let env = env();
    let client = env.client().await;
    let id = unique("invalid");
    let spec = gke_spec(
        "suite",
        &id,
        json!({"targets": [{"resource": "//bigquery.googleapis.com/projects/acme-prod/datasets/d", "permissions": ["bigquery.tables.get"]}]}),
    );
    apply_probe(&client, &id, spec).await;
    let probe = env.wait_ready(&client, &id, "False", "InvalidSpec").await;
    let status = probe.status.unwrap();
    for t in [condition::MAPPINGS_VERIFIED, condition::TOKEN_EXCHANGE_VERIFIED] {
        let c = status.conditions.iter().find(|c| c.type_ == t).unwrap();
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("Unknown", "InvalidSpec"));
    }
    assert_eq!(status.summary.unwrap(), Default::default());
    assert!(status.last_probe_time.is_some());
    assert!(status.conditions[0].message.contains("bigquery"), "{}", status.conditions[0].message);
}

#[tokio::test]
async fn namespace_labels_add_and_remove_coverage() {
    let env = env();
    let client = env.client().await;
    let id = unique("cover");
    let good = gsa(&unique("cover"));
    let a = env.namespace(&client, "cover-a", &[("team", id.as_str())]).await;
    service_account(&client, &a, "app", Some(&good)).await;
    let b = env.namespace(&client, "cover-b", &[]).await;
    service_account(&client, &b, "app", Some(&good)).await;
    env.fake_service_account(&good, &[(WIU, &[&member(&a, "app")])]);
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    let covered = |n: u32| {
        move |p: &AuthProbe| p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.namespaces == n)
    };
    env.wait_for(&client, &id, "one namespace", covered(1)).await;
    env.wait_ready(&client, &id, "True", "Verified").await;

    let ns_api = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    let label = |value: Option<&str>| json!({"metadata": {"labels": {"team": value}}});
    ns_api
        .patch(&b, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(label(Some(&id))))
        .await
        .unwrap();
    let probe = env.wait_for(&client, &id, "two namespaces", covered(2)).await;
    assert_eq!(ready(&probe).unwrap(), ("False".into(), "PrincipalNotMapped".into()));
    assert_eq!(probe.status.unwrap().failures[0].namespace, b);

    ns_api
        .patch(&b, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(label(None)))
        .await
        .unwrap();
    env.wait_for(&client, &id, "back to one namespace", covered(1)).await;
    env.wait_ready(&client, &id, "True", "Verified").await;
}

#[tokio::test]
async fn an_annotation_fix_turns_ready_true_without_a_nudge() {
    let env = env();
    let client = env.client().await;
    let id = unique("fix");
    let good = gsa(&unique("fix"));
    let ns = env.namespace(&client, "fix", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&gsa(&unique("typo")))).await;
    env.fake_service_account(&good, &[(WIU, &[&member(&ns, "app")])]);
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    env.wait_ready(&client, &id, "False", "GoogleServiceAccountNotFound").await;
    annotate(&client, &ns, "app", Some(&good)).await;
    env.wait_ready(&client, &id, "True", "Verified").await;
    let on_sa = event_summary(&client, &ns, "ServiceAccount", "app").await;
    assert_eq!(
        on_sa,
        vec![
            ("Warning".into(), "GoogleServiceAccountNotFound".into(), 1),
            ("Normal".into(), "Verified".into(), 1)
        ]
    );
    let on_probe = event_summary(&client, "default", "AuthProbe", &id).await;
    assert_eq!(
        on_probe,
        vec![
            ("Warning".into(), "GoogleServiceAccountNotFound".into(), 1),
            ("Normal".into(), "Verified".into(), 1)
        ]
    );
}

#[tokio::test]
async fn a_spec_change_moves_observed_generation() {
    let env = env();
    let client = env.client().await;
    let id = unique("gen");
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    env.wait_for(&client, &id, "observedGeneration 1", |p| {
        p.status.as_ref().and_then(|s| s.observed_generation) == Some(1)
    })
    .await;
    apply_probe(&client, &id, gke_spec("team", &id, json!({"probe": {"interval": "15m"}}))).await;
    let probe = env
        .wait_for(&client, &id, "observedGeneration 2", |p| {
            p.status.as_ref().and_then(|s| s.observed_generation) == Some(2)
        })
        .await;
    assert!(probe.status.unwrap().conditions.iter().all(|c| c.observed_generation == Some(2)));
}

#[tokio::test]
async fn five_hundred_failing_service_accounts_keep_status_bounded() {
    let env = env();
    let client = env.client().await;
    let id = unique("many");
    let nowhere = gsa(&unique("nowhere"));
    env.fake_service_account(&nowhere, &[]);
    let ns = env.namespace(&client, "many", &[("team", id.as_str())]).await;
    stream::iter(0..500)
        .for_each_concurrent(16, |i| {
            let (client, ns, nowhere) = (client.clone(), ns.clone(), nowhere.clone());
            async move { service_account(&client, &ns, &format!("app-{i:03}"), Some(&nowhere)).await }
        })
        .await;
    // No names: every annotated KSA in the selected namespaces is checked.
    let mut spec = gke_spec("team", &id, json!({}));
    spec.as_object_mut().unwrap().remove("serviceAccounts");
    apply_probe(&client, &id, spec).await;
    let probe = env
        .wait_for(&client, &id, "500 failing", |p| {
            p.status.as_ref().and_then(|s| s.summary).is_some_and(|s| s.failing == 500)
        })
        .await;
    let status = probe.status.unwrap();
    assert_eq!(status.failures.len(), 20);
    assert_eq!(status.failures[0].service_account, "app-000");
    assert_eq!(status.failures[19].service_account, "app-019");
    let bytes = serde_json::to_vec(&status).unwrap().len();
    assert!(bytes < 64 * 1024, "status is {bytes} bytes");
}

#[tokio::test]
async fn one_event_per_transition_however_many_passes() {
    let env = env();
    let client = env.client().await;
    let id = unique("events");
    let main = gsa(&unique("events"));
    let ns = env.namespace(&client, "events", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&main)).await;
    env.fake_service_account(&main, &[]);
    apply_probe(&client, &id, gke_spec("team", &id, json!({}))).await;
    env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    for _ in 0..3 {
        let before = last_pass(&id).await;
        probe_now(&client, &id).await;
        wait_pass(&id, before).await;
    }
    let on_sa = event_summary(&client, &ns, "ServiceAccount", "app").await;
    assert_eq!(on_sa, vec![("Warning".to_string(), "PrincipalNotMapped".to_string(), 1)]);

    env.fake_service_account(&main, &[(WIU, &[&member(&ns, "app")])]);
    probe_now(&client, &id).await;
    env.wait_ready(&client, &id, "True", "Verified").await;
    let before = last_pass(&id).await;
    probe_now(&client, &id).await;
    wait_pass(&id, before).await;
    let on_sa = event_summary(&client, &ns, "ServiceAccount", "app").await;
    assert_eq!(
        on_sa,
        vec![("Warning".into(), "PrincipalNotMapped".into(), 1), ("Normal".into(), "Verified".into(), 1)]
    );
    let on_probe = event_summary(&client, "default", "AuthProbe", &id).await;
    assert_eq!(
        on_probe,
        vec![("Warning".into(), "PrincipalNotMapped".into(), 1), ("Normal".into(), "Verified".into(), 1)]
    );
}

/// `authprobe_last_probe_timestamp_seconds` of a probe (millisecond precision, unlike status).
async fn last_pass(probe: &str) -> f64 {
    let metrics = env().operator.metrics().await;
    let prefix = format!("authprobe_last_probe_timestamp_seconds{{probe=\"{probe}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse().ok()).unwrap_or_default()
}

/// Waits until a pass later than `after` has finished.
async fn wait_pass(probe: &str, after: f64) {
    let waited = tokio::time::timeout(WAIT, async {
        while last_pass(probe).await <= after {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "no pass of {probe} after {after}");
}

#[tokio::test]
async fn recent_changes_are_propagation_pending_until_the_grace_ends() {
    let env = env();
    let client = env.client().await;
    let id = unique("grace");
    let main = gsa(&unique("grace"));
    let ns = env.namespace(&client, "grace", &[("team", id.as_str())]).await;
    service_account(&client, &ns, "app", Some(&main)).await;
    env.fake_service_account(&main, &[]);
    apply_probe(&client, &id, gke_spec("team", &id, json!({"probe": {"propagationGrace": "8s"}}))).await;
    // The KSA was created a moment ago: not False yet, and it turns False by itself when the grace ends.
    let pending = env.wait_ready(&client, &id, "Unknown", "PropagationPending").await;
    assert!(pending.status.unwrap().failures[0].message.contains("PrincipalNotMapped"));
    env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;

    env.fake_service_account(&main, &[(WIU, &[&member(&ns, "app")])]);
    probe_now(&client, &id).await;
    env.wait_ready(&client, &id, "True", "Verified").await;
    // The binding disappears: the policy's etag changed just now, so the failure waits out the grace.
    env.fake_service_account(&main, &[]);
    probe_now(&client, &id).await;
    env.wait_ready(&client, &id, "Unknown", "PropagationPending").await;
    env.wait_ready(&client, &id, "False", "PrincipalNotMapped").await;
    // Two transitions to False, one to True; nothing while pending. (A repeat within minutes is
    // folded into the first Event's series.)
    let on_sa = event_counts(&client, &ns, "ServiceAccount", "app").await;
    let expected = BTreeMap::from([
        (("Normal".to_string(), "Verified".to_string()), 1),
        (("Warning".to_string(), "PrincipalNotMapped".to_string()), 2),
    ]);
    assert_eq!(on_sa, expected, "no Warning while a failure was only pending");
}
