//! The engine on its own: every static and IAM-policy reason, the mistakes a new user makes, the
//! propagation grace, and how outcomes become conditions, counts and the failure list.

use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::jiff::Timestamp;
use serde_json::json;

use super::{
    facts::{Binding, Expr, FailureKind},
    principal::KsaIdentity,
    report::{KsaOutcome, Report, Status, to_status},
    selector::{LabelLookup, Labels},
    *,
};
use crate::api::{AuthProbeSpec, condition};

const GSA: &str = "payments@acme-prod.iam.gserviceaccount.com";
const WIU: &str = "roles/iam.workloadIdentityUser";

fn spec(extra: serde_json::Value) -> AuthProbeSpec {
    let mut base = json!({
        "namespaceSelector": {"matchLabels": {"team": "payments"}},
        "serviceAccounts": {"names": ["app"]},
        "identity": {"platform": "GKE", "projectId": "acme-prod", "projectNumber": "123456789012"},
        "probe": {"propagationGrace": "7m"}
    });
    merge(&mut base, extra);
    serde_json::from_value(base).unwrap()
}

fn merge(base: &mut serde_json::Value, extra: serde_json::Value) {
    match (base, extra) {
        (serde_json::Value::Object(b), serde_json::Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (b, e) => *b = e,
    }
}

fn plan() -> Plan {
    Plan::parse(&spec(json!({}))).unwrap()
}

fn ksa(ns: &str, name: &str, gsa: Option<&str>) -> Ksa {
    Ksa {
        namespace: ns.into(),
        name: name.into(),
        uid: format!("uid-{ns}-{name}"),
        gsa_annotation: gsa.map(Into::into),
        created: None,
    }
}

fn candidate(k: Ksa) -> Candidate {
    Candidate { namespace: k.namespace.clone(), name: k.name.clone(), ksa: Some(k) }
}

fn gsa(email: &str) -> GsaEmail {
    annotation::parse_gsa(email).unwrap()
}

fn policy(members: &[&str]) -> GsaFacts {
    GsaFacts {
        account: Ok(Some(facts::GoogleServiceAccount { email: GSA.into(), ..Default::default() })),
        policy: Ok(Some(Policy {
            version: 1,
            etag: "BwX1".into(),
            bindings: vec![Binding {
                role: WIU.into(),
                members: members.iter().map(|m| (*m).into()).collect(),
                condition: None,
            }],
        })),
    }
}

fn static_stage(plan: &Plan, c: Candidate) -> Result<Prepared, Finding> {
    plan.static_stage(vec![c]).pop().expect("one candidate").1
}

fn check(plan: &Plan, k: Ksa, gsas: &BTreeMap<GsaEmail, Arc<GsaFacts>>) -> Result<KsaIdentity, Finding> {
    let prepared = static_stage(plan, candidate(k))?;
    plan.check_mapping(&prepared, &Facts { gsas, provider: None, cluster: None, now: 0 }, None)
}

fn one(email: &str, facts: GsaFacts) -> BTreeMap<GsaEmail, Arc<GsaFacts>> {
    BTreeMap::from([(gsa(email), Arc::new(facts))])
}

fn expect(result: Result<KsaIdentity, Finding>, stage: Stage, reason: Reason, verdict: Verdict) -> Finding {
    let finding = result.expect_err("a finding");
    assert_eq!(
        (finding.stage, finding.reason, finding.verdict),
        (stage, reason, verdict),
        "{}",
        finding.message
    );
    assert!(
        finding.message.contains("Fix:") || verdict == Verdict::Unknown,
        "no fix in: {}",
        finding.message
    );
    finding
}

#[test]
fn a_mapped_ksa_passes_in_every_principal_form() {
    let p = plan();
    for member in [
        "serviceAccount:acme-prod.svc.id.goog[checkout/app]",
        "principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/subject/ns/checkout/sa/app",
        "principalSet://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/namespace/checkout",
        "principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/kubernetes.serviceaccount.uid/uid-checkout-app",
    ] {
        assert!(
            check(&p, ksa("checkout", "app", Some(GSA)), &one(GSA, policy(&[member]))).is_ok(),
            "{member}"
        );
    }
}

#[test]
fn static_reasons() {
    let p = plan();
    let none = BTreeMap::new();
    let missing = Candidate { namespace: "checkout".into(), name: "app".into(), ksa: None };
    let mut passed = p.static_stage(vec![missing, candidate(ksa("ledger", "app", Some(GSA)))]).into_iter();
    let f = passed.next().unwrap().1.unwrap_err();
    assert!(passed.next().unwrap().1.is_ok());
    assert_eq!(f.reason, Reason::ServiceAccountMissing);
    assert!(f.message.contains("kubectl create serviceaccount app -n checkout"), "{}", f.message);
    assert!(f.message.contains(GSA), "suggests the GSA the other KSAs use: {}", f.message);

    let f = expect(
        check(&p, ksa("checkout", "app", None), &none),
        Stage::Static,
        Reason::AnnotationMissing,
        Verdict::Fail,
    );
    assert!(
        f.message.contains("kubectl annotate serviceaccount app -n checkout iam.gke.io/gcp-service-account="),
        "{}",
        f.message
    );
    expect(
        check(&p, ksa("checkout", "app", Some("payments")), &none),
        Stage::Static,
        Reason::AnnotationInvalid,
        Verdict::Fail,
    );
    expect(
        check(
            &p,
            ksa("checkout", "app", Some("payments@acme-prod.iam.gserviceaccount.com.evil.example")),
            &none,
        ),
        Stage::Static,
        Reason::AnnotationInvalid,
        Verdict::Fail,
    );

    let guarded = Plan::parse(&spec(json!({"identity": {"serviceAccountProjects": ["acme-prod"]}}))).unwrap();
    let f = expect(
        check(&guarded, ksa("checkout", "app", Some("payments@acme-dev.iam.gserviceaccount.com")), &none),
        Stage::Static,
        Reason::ServiceAccountProjectNotAllowed,
        Verdict::Fail,
    );
    assert!(f.message.contains("acme-dev"), "{}", f.message);
    assert!(
        check(
            &guarded,
            ksa("checkout", "app", Some(GSA)),
            &one(GSA, policy(&["serviceAccount:acme-prod.svc.id.goog[checkout/app]"]))
        )
        .is_ok()
    );
}

#[test]
fn direct_access_needs_no_annotation() {
    let direct = Plan::parse(&spec(json!({"identity": {"access": "Direct"}}))).unwrap();
    assert!(check(&direct, ksa("checkout", "app", None), &BTreeMap::new()).is_ok());
}

#[test]
fn iam_policy_reasons() {
    let p = plan();
    let me = "serviceAccount:acme-prod.svc.id.goog[checkout/app]";
    let k = || ksa("checkout", "app", Some(GSA));

    let f = expect(
        check(&p, k(), &one(GSA, policy(&[]))),
        Stage::IamPolicy,
        Reason::PrincipalNotMapped,
        Verdict::Fail,
    );
    assert!(f.message.contains(&format!(
        "gcloud iam service-accounts add-iam-policy-binding {GSA} --project=acme-prod --role=roles/iam.workloadIdentityUser --member=\"principal://iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/subject/ns/checkout/sa/app\""
    )), "{}", f.message);
    assert!(f.message.contains("checkout/app") && f.message.contains(GSA));

    let mut conditional = policy(&[me]);
    if let Ok(Some(pol)) = conditional.policy.as_mut() {
        pol.bindings[0].condition = Some(Expr {
            expression: "request.time < timestamp('2020-01-01T00:00:00Z')".into(),
            ..Default::default()
        });
    }
    let f = expect(
        check(&p, k(), &one(GSA, conditional)),
        Stage::IamPolicy,
        Reason::MappingConditional,
        Verdict::Fail,
    );
    assert!(f.message.contains("--condition=None"), "{}", f.message);

    let deleted = format!("deleted:{me}?uid=1234");
    let f = expect(
        check(&p, k(), &one(GSA, policy(&[&deleted]))),
        Stage::IamPolicy,
        Reason::MappingDeleted,
        Verdict::Fail,
    );
    assert!(f.message.contains("remove-iam-policy-binding") && f.message.contains(&deleted), "{}", f.message);

    let not_found = GsaFacts { account: Ok(None), policy: Ok(None) };
    expect(
        check(&p, k(), &one(GSA, not_found)),
        Stage::IamPolicy,
        Reason::GoogleServiceAccountNotFound,
        Verdict::Fail,
    );

    let mut disabled = policy(&[me]);
    disabled.account =
        Ok(Some(facts::GoogleServiceAccount { email: GSA.into(), disabled: true, ..Default::default() }));
    let f = expect(
        check(&p, k(), &one(GSA, disabled)),
        Stage::IamPolicy,
        Reason::GoogleServiceAccountDisabled,
        Verdict::Fail,
    );
    assert!(
        f.message.contains(&format!("gcloud iam service-accounts enable {GSA} --project=acme-prod")),
        "{}",
        f.message
    );
}

#[test]
fn fetch_failures_are_unknown_with_the_checkers_reason() {
    let p = plan();
    for (kind, reason) in [
        (FailureKind::Unavailable, Reason::GoogleUnavailable),
        (FailureKind::Throttled, Reason::GoogleThrottled),
        (FailureKind::Unauthenticated, Reason::CheckerUnauthenticated),
        (FailureKind::Forbidden, Reason::CheckerForbidden),
    ] {
        let failed = GsaFacts { account: Err(FetchFailure::new(kind, "upstream said no")), policy: Ok(None) };
        expect(
            check(&p, ksa("checkout", "app", Some(GSA)), &one(GSA, failed)),
            Stage::IamPolicy,
            reason,
            Verdict::Unknown,
        );
        let mut policy_failed = policy(&[]);
        policy_failed.policy = Err(FetchFailure::new(kind, "upstream said no"));
        expect(
            check(&p, ksa("checkout", "app", Some(GSA)), &one(GSA, policy_failed)),
            Stage::IamPolicy,
            reason,
            Verdict::Unknown,
        );
    }
    // A GSA nobody fetched is undecided, not broken.
    expect(
        check(&p, ksa("checkout", "app", Some(GSA)), &BTreeMap::new()),
        Stage::IamPolicy,
        Reason::GoogleUnavailable,
        Verdict::Unknown,
    );
}

/// The mistakes a new user makes each get their own reason and fix.
#[test]
fn new_user_mistakes_are_told_apart() {
    let p = plan();
    let typo = "paymnets@acme-prod.iam.gserviceaccount.com";
    let other = "orders@acme-prod.iam.gserviceaccount.com";
    let mut gsas = one(GSA, policy(&["serviceAccount:acme-prod.svc.id.goog[billing/app]"]));
    gsas.insert(gsa(typo), Arc::new(GsaFacts { account: Ok(None), policy: Ok(None) }));
    gsas.insert(gsa(other), Arc::new(policy(&["serviceAccount:acme-prod.svc.id.goog[ledger/app]"])));

    // A typo in the GSA email: not found, with the likely intended account.
    let f = expect(
        check(&p, ksa("ledger", "app", Some(typo)), &gsas),
        Stage::IamPolicy,
        Reason::GoogleServiceAccountNotFound,
        Verdict::Fail,
    );
    assert!(f.message.contains(&format!("Did you mean {GSA}?")), "{}", f.message);

    // A binding for another namespace: not mapped, naming what was granted instead.
    let f = expect(
        check(&p, ksa("checkout", "app", Some(GSA)), &gsas),
        Stage::IamPolicy,
        Reason::PrincipalNotMapped,
        Verdict::Fail,
    );
    assert!(f.message.contains("serviceAccount:acme-prod.svc.id.goog[billing/app] (the same ServiceAccount name in another namespace)"), "{}", f.message);

    // The binding on the wrong GSA: not mapped, naming the GSA that does map it.
    let f = expect(
        check(&p, ksa("ledger", "app", Some(GSA)), &gsas),
        Stage::IamPolicy,
        Reason::PrincipalNotMapped,
        Verdict::Fail,
    );
    assert!(f.message.contains(&format!("{other} does map this principal")), "{}", f.message);

    // No annotation at all.
    expect(
        check(&p, ksa("checkout", "app", None), &gsas),
        Stage::Static,
        Reason::AnnotationMissing,
        Verdict::Fail,
    );
}

/// A cluster for the selection tests: namespaces `a`, `b`, `c` of team payments, `x` of another.
/// KSAs, each with its labels.
struct Cluster(Vec<(Ksa, Labels)>);

impl Cluster {
    fn unlabelled(ksas: Vec<Ksa>) -> Self {
        Self(ksas.into_iter().map(|k| (k, Labels::new())).collect())
    }
}

impl ClusterView for Cluster {
    fn each_namespace(&self, f: &mut dyn FnMut(&str, &dyn LabelLookup)) {
        let team = |t: &str| BTreeMap::from([("team".to_string(), t.to_string())]);
        for (ns, t) in [("a", "payments"), ("b", "payments"), ("c", "payments"), ("x", "search")] {
            f(ns, &team(t));
        }
    }

    fn each_service_account(&self, _: &std::collections::BTreeSet<String>, f: &mut dyn FnMut(KsaRef<'_>)) {
        for (k, labels) in &self.0 {
            f(KsaRef {
                namespace: &k.namespace,
                name: &k.name,
                uid: &k.uid,
                labels,
                gsa_annotation: k.gsa_annotation.as_deref(),
                created: k.created,
            });
        }
    }
}

fn selected(plan: &Plan, cluster: &Cluster) -> Vec<(String, String, bool)> {
    plan.select(cluster).candidates.into_iter().map(|c| (c.namespace, c.name, c.ksa.is_some())).collect()
}

fn named(pairs: &[(&str, &str, bool)]) -> Vec<(String, String, bool)> {
    pairs.iter().map(|(ns, n, e)| ((*ns).into(), (*n).into(), *e)).collect()
}

#[test]
fn selection_by_names_selector_and_annotation() {
    let by_names = plan();
    let ksas = vec![
        ksa("a", "app", Some(GSA)),
        ksa("a", "other", Some(GSA)),
        ksa("b", "app", None),
        ksa("x", "app", Some(GSA)),
    ];
    let cluster = Cluster::unlabelled(ksas);
    let selection = by_names.select(&cluster);
    assert_eq!(selection.namespaces, vec!["a", "b", "c"]);
    // Required names everywhere in scope, a missing one included; namespace x is out of scope.
    assert_eq!(
        selected(&by_names, &cluster),
        named(&[("a", "app", true), ("b", "app", true), ("c", "app", false)])
    );

    let mut annotated_only = spec(json!({}));
    annotated_only.service_accounts = None;
    let p = Plan::parse(&annotated_only).unwrap();
    assert_eq!(selected(&p, &cluster), named(&[("a", "app", true), ("a", "other", true)]));

    let by_selector = Plan::parse(&spec(
        json!({"serviceAccounts": {"names": [], "selector": {"matchLabels": {"wif": "yes"}}}}),
    ))
    .unwrap();
    let labelled = Cluster(vec![
        (ksa("a", "labelled", None), Labels::from([("wif".into(), "yes".into())])),
        (ksa("a", "plain", Some(GSA)), Labels::new()),
    ]);
    assert_eq!(selected(&by_selector, &labelled), named(&[("a", "labelled", true)]));

    assert!(by_names.selects_namespace(&BTreeMap::from([("team".into(), "payments".into())])));
    assert!(!by_names.selects_namespace(&BTreeMap::from([("team".into(), "search".into())])));
}

#[test]
fn what_admission_cannot_judge_is_an_invalid_spec() {
    for (extra, expected) in [
        (
            json!({"targets": [{"resource": "//bigquery.googleapis.com/projects/p/datasets/d", "permissions": ["bigquery.tables.get"]}]}),
            "not a resource the live chain can test",
        ),
        (json!({"namespaceSelector": {"matchLabels": {"bad key!": "x"}}}), "namespaceSelector"),
        (json!({"probe": {"interval": "forever"}}), "probe.interval"),
        (json!({"probe": {"interval": "5s"}}), "probe.interval"),
        (json!({"probe": {"tokenExchangeInterval": "10s"}}), "probe.tokenExchangeInterval"),
        (json!({"probe": {"tokenExchangeInterval": "25h"}}), "probe.tokenExchangeInterval"),
        (json!({"probe": {"tokenExchangeInterval": "hourly"}}), "probe.tokenExchangeInterval"),
        (json!({"probe": {"tokenExchange": true}}), "identity.gke is required"),
        // What admission refuses, refused again: `authprobe check -f` bypasses admission.
        (json!({"identity": {"projectId": "Acme Prod"}}), "identity.projectId"),
        (json!({"identity": {"projectNumber": "12ab"}}), "identity.projectNumber"),
        (json!({"identity": {"serviceAccountProjects": ["../x"]}}), "serviceAccountProjects"),
        (
            json!({"identity": {"gke": {"clusterLocation": "us-central1", "clusterName": "a/../../b"}}}),
            "identity.gke",
        ),
        (json!({"serviceAccounts": {"names": ["App Name"]}}), "serviceAccounts.names"),
        (
            json!({"targets": [{"resource": "//storage.googleapis.com/projects/_/buckets/b", "permissions": ["storage.objects.get?x=1"]}]}),
            "permission",
        ),
        (
            json!({"identity": {"platform": "Federation", "federation": {"provider": "projects/123456789012/locations/global/workloadIdentityPools/p/providers/k8s/../../../../evil?x=1"}}}),
            "identity.federation.provider",
        ),
        (
            json!({"identity": {"platform": "Federation", "federation": {"provider": "projects/999/locations/global/workloadIdentityPools/p/providers/k8s"}}}),
            "must belong to identity.projectNumber",
        ),
    ] {
        let err = Plan::parse(&spec(extra.clone())).unwrap_err();
        assert!(err.contains(expected), "{extra}: {err}");
    }
    let default = Plan::parse(&spec(json!({"probe": {"interval": "2m"}}))).unwrap();
    assert_eq!(default.exchange_interval, std::time::Duration::from_secs(120), "absent: the interval");
    let hourly = Plan::parse(&spec(json!({"probe": {"tokenExchangeInterval": "1h"}}))).unwrap();
    assert_eq!(hourly.exchange_interval, std::time::Duration::from_secs(3600));
    let fed = spec(
        json!({"identity": {"platform": "Federation", "federation": {"provider": "projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s"}}}),
    );
    let p = Plan::parse(&fed).unwrap();
    let f = p.federation.unwrap();
    assert_eq!(
        f.audience,
        "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s"
    );
    assert_eq!((f.pool_id.as_str(), f.project_number.as_str()), ("onprem", "123456789012"));
}

const RUN: &str = "//run.googleapis.com/projects/acme-prod/locations/us-central1/services/api";

fn live(extra: serde_json::Value) -> AuthProbeSpec {
    let mut base = json!({
        "identity": {"gke": {"clusterLocation": "us-central1", "clusterName": "prod-1"}},
        "probe": {"tokenExchange": true}
    });
    merge(&mut base, extra);
    spec(base)
}

#[test]
fn cloud_run_targets_default_their_permission_and_need_a_service_account() {
    let p =
        Plan::parse(&live(json!({"targets": [{"resource": RUN, "audience": "https://api.acme.example"}]})))
            .unwrap();
    assert_eq!(p.targets[0].permissions, vec!["run.routes.invoke".to_string()]);
    assert_eq!(p.targets[0].audience.as_deref(), Some("https://api.acme.example"));
    let named =
        Plan::parse(&live(json!({"targets": [{"resource": RUN, "permissions": ["run.services.get"]}]})))
            .unwrap();
    assert_eq!(named.targets[0].permissions, vec!["run.services.get".to_string()]);
    for (extra, expected) in [
        (json!({"identity": {"access": "Direct"}, "targets": [{"resource": RUN}]}), "access: Direct"),
        (
            json!({"targets": [{"resource": "//storage.googleapis.com/projects/_/buckets/b"}]}),
            "needs permissions",
        ),
        (
            json!({"targets": [{"resource": "//storage.googleapis.com/projects/_/buckets/b", "permissions": ["storage.objects.get"], "audience": "x"}]}),
            "Cloud Run services only",
        ),
    ] {
        let err = Plan::parse(&live(extra.clone())).unwrap_err();
        assert!(err.contains(expected), "{extra}: {err}");
    }
}

#[test]
fn endpoints_go_only_to_allowed_hosts_and_need_the_live_chain() {
    use super::stage::endpoint::EndpointAllow;
    let endpoints = json!({"endpoints": [
        {"url": "https://api.acme.example/healthz", "tokenType": "IDToken", "origin": "http://127.0.0.1:8080/healthz"},
        {"url": "https://api.acme.example/v1", "tokenType": "AccessToken"}
    ]});
    let allow = |hosts: &[&str]| EndpointAllow::new(hosts.iter().map(|h| h.parse().unwrap()).collect());
    let p =
        Plan::parse_allowing(&live(endpoints.clone()), &allow(&["api.acme.example", "127.0.0.1"])).unwrap();
    assert_eq!(p.endpoints.len(), 2);
    assert_eq!(p.endpoints[0].audience, "https://api.acme.example");

    let refused = Plan::parse_allowing(&live(endpoints.clone()), &EndpointAllow::default()).unwrap_err();
    assert!(refused.contains("--endpoint-allow") && refused.contains("api.acme.example"), "{refused}");
    let origin_refused =
        Plan::parse_allowing(&live(endpoints.clone()), &allow(&["api.acme.example"])).unwrap_err();
    assert!(origin_refused.contains("127.0.0.1"), "the origin's host is checked too: {origin_refused}");

    let mut off = endpoints.clone();
    merge(&mut off, json!({"probe": {"tokenExchange": false}}));
    assert!(Plan::parse(&live(off)).unwrap_err().contains("probe.tokenExchange"));
    let eleven: Vec<_> =
        (0..11).map(|i| json!({"url": format!("https://h/{i}"), "tokenType": "AccessToken"})).collect();
    assert!(Plan::parse(&live(json!({"endpoints": eleven}))).unwrap_err().contains("at most 10"));
}

#[test]
fn failures_within_the_grace_are_propagation_pending() {
    let now: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
    let grace = std::time::Duration::from_secs(420);
    let broken = Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, "not mapped. Fix: x");
    let recent: Timestamp = "2026-11-27T09:58:00Z".parse().unwrap();
    let old: Timestamp = "2026-11-27T09:50:00Z".parse().unwrap();
    let pending = within_grace(broken.clone(), Some(recent), now, grace);
    assert_eq!((pending.verdict, pending.reason), (Verdict::Unknown, Reason::PropagationPending));
    assert!(pending.message.contains("PrincipalNotMapped"), "{}", pending.message);
    assert_eq!(within_grace(broken.clone(), Some(old), now, grace), broken);
    assert_eq!(within_grace(broken.clone(), None, now, grace), broken);
    let static_failure = Finding::fail(Stage::Static, Reason::AnnotationMissing, "x");
    assert_eq!(within_grace(static_failure.clone(), Some(recent), now, grace), static_failure);
    let unknown = Finding::unknown(Stage::IamPolicy, Reason::GoogleUnavailable, "x");
    assert_eq!(within_grace(unknown.clone(), Some(recent), now, grace), unknown);
}

fn outcome(ns: &str, name: &str, mapping: Option<Finding>) -> KsaOutcome {
    KsaOutcome { namespace: ns.into(), name: name.into(), mapping, chain: None, canary: None }
}

#[test]
fn conditions_follow_the_worst_entry() {
    let fail = |stage, reason| Some(Finding::fail(stage, reason, "broken"));
    let unknown = |reason| Some(Finding::unknown(Stage::IamPolicy, reason, "cannot tell"));
    let r = Report::build(
        &[
            outcome("zeta", "app", fail(Stage::Static, Reason::AnnotationMissing)),
            outcome("alpha", "app", unknown(Reason::GoogleUnavailable)),
            outcome("beta", "app", fail(Stage::IamPolicy, Reason::PrincipalNotMapped)),
            outcome("alpha", "web", fail(Stage::IamPolicy, Reason::MappingConditional)),
            outcome("gamma", "app", None),
        ],
        4,
        false,
    );
    assert_eq!(
        r.summary,
        crate::api::Summary {
            namespaces: 4,
            service_accounts: 5,
            passing: 1,
            failing: 3,
            unknown: 1,
            live_verified: None
        }
    );
    let order: Vec<(&str, &str, Reason)> =
        r.entries.iter().map(|e| (e.namespace.as_str(), e.name.as_str(), e.finding.reason)).collect();
    assert_eq!(
        order,
        vec![
            ("zeta", "app", Reason::AnnotationMissing),
            ("alpha", "web", Reason::MappingConditional),
            ("beta", "app", Reason::PrincipalNotMapped),
            ("alpha", "app", Reason::GoogleUnavailable),
        ]
    );
    let ready = r.condition(condition::READY).unwrap();
    assert_eq!((ready.status, ready.reason), (Status::False, Reason::AnnotationMissing));
    let exchange = r.condition(condition::TOKEN_EXCHANGE_VERIFIED).unwrap();
    assert_eq!((exchange.status, exchange.reason), (Status::Unknown, Reason::Disabled));
    assert_eq!(r.condition(condition::CHECKER_HEALTHY).unwrap().status, Status::True);
}

#[test]
fn undecided_never_reads_as_broken() {
    let r = Report::build(
        &[
            outcome(
                "a",
                "app",
                Some(Finding::unknown(Stage::IamPolicy, Reason::CheckerUnauthenticated, "401")),
            ),
            outcome("b", "app", None),
        ],
        2,
        false,
    );
    let ready = r.condition(condition::READY).unwrap();
    assert_eq!((ready.status, ready.reason), (Status::Unknown, Reason::CheckerUnauthenticated));
    let checker = r.condition(condition::CHECKER_HEALTHY).unwrap();
    assert_eq!((checker.status, checker.reason), (Status::False, Reason::CheckerUnauthenticated));
    assert_eq!(r.condition(condition::MAPPINGS_VERIFIED).unwrap().status, Status::Unknown);

    let all_good = Report::build(&[outcome("b", "app", None)], 1, false);
    let ready = all_good.condition(condition::READY).unwrap();
    assert_eq!((ready.status, ready.reason), (Status::True, Reason::Verified));
}

#[test]
fn invalid_spec_report() {
    let r = Report::invalid("target x is not testable");
    let ready = r.condition(condition::READY).unwrap();
    assert_eq!((ready.status, ready.reason), (Status::False, Reason::InvalidSpec));
    for t in [condition::MAPPINGS_VERIFIED, condition::TOKEN_EXCHANGE_VERIFIED] {
        let c = r.condition(t).unwrap();
        assert_eq!((c.status, c.reason), (Status::Unknown, Reason::InvalidSpec));
    }
    assert_eq!(r.summary, crate::api::Summary::default());
}

#[test]
fn status_is_bounded_and_keeps_transition_times() {
    let outcomes: Vec<KsaOutcome> = (0..500)
        .map(|i| {
            outcome(
                &format!("ns-{i:03}"),
                "app",
                Some(Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, "x")),
            )
        })
        .collect();
    let r = Report::build(&outcomes, 500, false);
    let t0: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
    let t1: Timestamp = "2026-11-27T10:10:00Z".parse().unwrap();
    let mut since = report::Since::new();
    since.insert(("ns-000".into(), "app".into()), (Reason::PrincipalNotMapped, t0));
    let first = to_status(&r, None, Some(3), t0, &since);
    assert_eq!(first.failures.len(), 20);
    assert_eq!(first.summary.unwrap().failing, 500);
    assert_eq!(first.failures[0].namespace, "ns-000");
    let second = to_status(&r, Some(&first), Some(3), t1, &since);
    assert_eq!(second.failures[0].since.0, t0, "since is when the reason was first seen");
    assert_eq!(second.failures[1].since.0, t1);
    for (a, b) in first.conditions.iter().zip(&second.conditions) {
        assert_eq!(a.last_transition_time, b.last_transition_time, "{} did not change status", a.type_);
        assert_eq!(b.observed_generation, Some(3));
    }
    assert!(!report::same_verdict(&first, &second), "since moved for entries without history");
    let healed = Report::build(&[outcome("ns-000", "app", None)], 1, false);
    let third = to_status(&healed, Some(&second), Some(3), t1, &since);
    let ready = third.conditions.iter().find(|c| c.type_ == condition::READY).unwrap();
    assert_eq!((ready.status.as_str(), ready.last_transition_time.0), ("True", t1));
}

#[test]
fn workload_findings_sit_between_static_and_iam_and_count_as_mappings() {
    let mut workload = Finding::fail(Stage::Workload, Reason::CredentialFileOverridesWorkloadIdentity, "x");
    workload.workloads = vec!["Deployment/api".into(), "Job/x".into()];
    let r = Report::build(
        &[
            outcome("a", "app", Some(Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, "x"))),
            outcome("b", "app", Some(workload)),
            outcome("c", "app", Some(Finding::fail(Stage::Static, Reason::AnnotationMissing, "x"))),
        ],
        3,
        false,
    );
    let order: Vec<Stage> = r.entries.iter().map(|e| e.finding.stage).collect();
    assert_eq!(order, [Stage::Static, Stage::Workload, Stage::IamPolicy]);
    let only_workload = Report::build(
        &r.entries[1..2]
            .iter()
            .map(|e| outcome(&e.namespace, &e.name, Some(e.finding.clone())))
            .collect::<Vec<_>>(),
        1,
        false,
    );
    let mappings = only_workload.condition(condition::MAPPINGS_VERIFIED).unwrap();
    assert_eq!(
        (mappings.status, mappings.reason),
        (Status::False, Reason::CredentialFileOverridesWorkloadIdentity)
    );
    let status = to_status(&r, None, Some(1), "2026-11-27T10:00:00Z".parse().unwrap(), &report::Since::new());
    assert_eq!(status.failures[1].workloads, ["Deployment/api", "Job/x"]);
    assert!(status.failures[0].workloads.is_empty());
    // Kubernetes-local: never softened by the propagation grace.
    let now: Timestamp = "2026-11-27T10:00:00Z".parse().unwrap();
    let failing = r.entries[1].finding.clone();
    assert_eq!(within_grace(failing.clone(), Some(now), now, std::time::Duration::from_secs(420)), failing);
}

#[test]
fn an_undecided_workload_finding_yields_to_a_later_failing_one() {
    let unreadable = Finding::unknown(Stage::Workload, Reason::CredentialConfigUnreadable, "a Secret");
    let denied = Finding::fail(Stage::Impersonation, Reason::ImpersonationDenied, "x");
    let chained = |chain: Result<(), Finding>| KsaOutcome {
        namespace: "a".into(),
        name: "app".into(),
        mapping: Some(unreadable.clone()),
        chain: Some(chain),
        canary: None,
    };
    assert_eq!(chained(Err(denied.clone())).finding(), Some(&denied));
    assert_eq!(chained(Ok(())).finding(), Some(&unreadable));
    let unavailable = Finding::unknown(Stage::TokenExchange, Reason::GoogleUnavailable, "503");
    assert_eq!(
        chained(Err(unavailable)).finding(),
        Some(&unreadable),
        "the earlier undecided stage keeps it"
    );
    let mapping = Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, "x");
    assert_eq!(Finding::decisive(Some(&unreadable), Some(&mapping)), Some(&mapping));
    let failing = Finding::fail(Stage::Workload, Reason::HostNetworkBypassesWorkloadIdentity, "x");
    assert_eq!(Finding::decisive(Some(&failing), Some(&mapping)), Some(&failing));
    let r = Report::build(&[chained(Ok(()))], 1, true);
    let ready = r.condition(condition::READY).unwrap();
    assert_eq!((ready.status, ready.reason), (Status::Unknown, Reason::CredentialConfigUnreadable));
    assert_eq!(r.condition(condition::TOKEN_EXCHANGE_VERIFIED).unwrap().status, Status::True);
}

#[test]
fn a_status_stays_small_however_large_the_upstream_answers() {
    let huge = format!("upstream said: {} and a token ya29.{}", "x".repeat(1 << 20), "y".repeat(64));
    let outcomes: Vec<KsaOutcome> = (0..25)
        .map(|i| KsaOutcome {
            namespace: format!("ns-{i:02}"),
            name: "app".into(),
            mapping: Some(Finding::unknown(Stage::IamPolicy, Reason::GoogleUnavailable, huge.clone())),
            chain: None,
            canary: None,
        })
        .collect();
    let report = Report::build(&outcomes, 25, false);
    let status = to_status(&report, None, Some(1), Timestamp::UNIX_EPOCH, &Default::default());
    let bytes = serde_json::to_vec(&status).unwrap().len();
    assert_eq!(status.failures.len(), 20);
    assert!(bytes < 64 * 1024, "status is {bytes} bytes");
    assert!(!serde_json::to_string(&status).unwrap().contains("ya29."));
}

#[test]
fn canary_findings_count_in_ready_only_and_come_last() {
    let canary = |reason| Finding::fail(Stage::Canary, reason, "the pod's own token");
    let with_canary = |ns: &str, mapping: Option<Finding>, chain: Option<Result<(), Finding>>, c| {
        KsaOutcome { namespace: ns.into(), name: "app".into(), mapping, chain, canary: Some(c) }
    };
    let r = Report::build(
        &[
            with_canary("a", None, Some(Ok(())), canary(Reason::MetadataServerSlowStart)),
            with_canary(
                "b",
                Some(Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, "x")),
                None,
                canary(Reason::CredentialSourceDrift),
            ),
            // The pod saw itself fail: that outweighs an earlier stage that could not tell.
            with_canary(
                "c",
                Some(Finding::unknown(Stage::IamPolicy, Reason::GoogleUnavailable, "x")),
                None,
                canary(Reason::MetadataServerUnreachable),
            ),
            with_canary(
                "d",
                None,
                Some(Ok(())),
                Finding::unknown(Stage::Canary, Reason::CanaryNotScheduled, "did not run"),
            ),
        ],
        4,
        true,
    );
    let order: Vec<(&str, Stage, Reason)> =
        r.entries.iter().map(|e| (e.namespace.as_str(), e.finding.stage, e.finding.reason)).collect();
    assert_eq!(
        order,
        vec![
            ("b", Stage::IamPolicy, Reason::PrincipalNotMapped),
            ("a", Stage::Canary, Reason::MetadataServerSlowStart),
            ("c", Stage::Canary, Reason::MetadataServerUnreachable),
            ("d", Stage::Canary, Reason::CanaryNotScheduled),
        ]
    );
    assert_eq!(r.summary.unknown, 1, "CanaryNotScheduled never reads as broken");
    let exchange = r.condition(condition::TOKEN_EXCHANGE_VERIFIED).unwrap();
    assert_eq!(
        exchange.status,
        Status::Unknown,
        "the chain did not run for b and c; the canary is not the chain"
    );
    assert_eq!(exchange.reason, Reason::PrincipalNotMapped);
    let mappings = r.condition(condition::MAPPINGS_VERIFIED).unwrap();
    assert_eq!((mappings.status, mappings.reason), (Status::False, Reason::PrincipalNotMapped));
    let ready = r.condition(condition::READY).unwrap();
    assert_eq!((ready.status, ready.reason), (Status::False, Reason::PrincipalNotMapped));
    let only_canary =
        Report::build(&[with_canary("a", None, Some(Ok(())), canary(Reason::AdcSourceUnexpected))], 1, true);
    let exchange = only_canary.condition(condition::TOKEN_EXCHANGE_VERIFIED).unwrap();
    assert_eq!((exchange.status, exchange.reason), (Status::True, Reason::Verified));
    let ready = only_canary.condition(condition::READY).unwrap();
    assert_eq!((ready.status, ready.reason), (Status::False, Reason::AdcSourceUnexpected));
}

#[test]
fn ksas_waiting_for_their_first_exchange_leave_the_live_chain_unknown_not_disabled() {
    let verified = KsaOutcome { chain: Some(Ok(())), ..outcome("a", "app", None) };
    let waiting = outcome("b", "app", None);
    let unmapped =
        outcome("c", "app", Some(Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, "x")));
    let r = Report::build(&[verified.clone(), waiting, unmapped.clone()], 3, true);
    let exchange = r.condition(condition::TOKEN_EXCHANGE_VERIFIED).unwrap();
    assert_eq!((exchange.status, exchange.reason), (Status::Unknown, Reason::GoogleThrottled));
    assert!(exchange.message.contains("1 of 3") && exchange.message.contains("--google-quota-share"));
    assert_eq!(r.summary.failing, 1, "waiting is not failing");
    let r = Report::build(&[verified, unmapped], 2, true);
    let exchange = r.condition(condition::TOKEN_EXCHANGE_VERIFIED).unwrap();
    assert_eq!((exchange.status, exchange.reason), (Status::Unknown, Reason::PrincipalNotMapped));
}
