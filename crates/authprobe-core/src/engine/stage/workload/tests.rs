//! Every reason of the Workload stage with its healthy twin, the entry rules, and the
//! `external_account` parser against what `create-cred-config` writes.

use std::collections::BTreeMap;

use internment::ArcIntern;
use k8s_openapi::api::{apps::v1::Deployment, batch::v1::CronJob, core::v1::Pod};
use serde_json::{Value, json};

use super::*;
use crate::{
    api::AuthProbeSpec,
    engine::{
        Ksa, ProviderFacts,
        annotation::parse_gsa,
        facts::{ClusterIssuer, Oidc, Pool, Provider, State},
        workload::{ConfigMapData, Lean, PodView, prune},
    },
};

const PROVIDER: &str = "projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s";
const GSA: &str = "payments@acme-prod.iam.gserviceaccount.com";
const ISSUER: &str = "https://127.0.0.1:6443";
const CONFIG_PATH: &str = "/etc/workload-identity/credential-configuration.json";

fn plan(platform: &str, access: &str) -> Plan {
    let mut identity = json!({"platform": platform, "projectId": "acme-prod", "projectNumber": "123456789012", "access": access});
    if platform == "Federation" {
        identity["federation"] = json!({"provider": PROVIDER});
    }
    let spec: AuthProbeSpec =
        serde_json::from_value(json!({"namespaceSelector": {}, "identity": identity})).unwrap();
    Plan::parse(&spec).unwrap()
}

fn prepared(access_gsa: bool) -> Prepared {
    Prepared {
        ksa: Ksa { namespace: "checkout".into(), name: "app".into(), ..Default::default() },
        gsa: access_gsa.then(|| parse_gsa(GSA).unwrap()),
    }
}

/// A Deployment `name` in checkout running as `app` with this pod spec.
fn deployment(name: &str, mut spec: Value) -> Arc<Workload> {
    spec["serviceAccountName"] = json!("app");
    let d: Lean<Deployment> = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "checkout", "uid": format!("uid-{name}")},
        "spec": {"selector": {}, "template": {"spec": spec}}
    }))
    .unwrap();
    Arc::new(prune(&d).unwrap())
}

/// Google's sample: the configuration from ConfigMap `wi-config`, a projected token at
/// /var/run/service-account/token with `audience`, GOOGLE_APPLICATION_CREDENTIALS on container api.
fn federated(audience: Option<&str>) -> Value {
    let mut token = json!({"path": "token", "expirationSeconds": 3600});
    if let Some(a) = audience {
        token["audience"] = json!(a);
    }
    json!({
        "containers": [{
            "name": "api",
            "env": [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": CONFIG_PATH}],
            "volumeMounts": [
                {"name": "config", "mountPath": "/etc/workload-identity", "readOnly": true},
                {"name": "token", "mountPath": "/var/run/service-account", "readOnly": true}
            ]
        }, {"name": "sidecar"}],
        "volumes": [
            {"name": "config", "configMap": {"name": "wi-config"}},
            {"name": "token", "projected": {"sources": [{"serviceAccountToken": token}]}}
        ]
    })
}

/// Exactly what `create-cred-config PROVIDER --service-account=GSA --credential-source-file=…
/// --credential-source-type=text --service-account-token-lifetime-seconds=3600` writes.
fn cred_config() -> Value {
    json!({
        "universe_domain": "googleapis.com",
        "type": "external_account",
        "audience": format!("//iam.googleapis.com/{PROVIDER}"),
        "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
        "token_url": "https://sts.googleapis.com/v1/token",
        "credential_source": {"file": "/var/run/service-account/token", "format": {"type": "text"}},
        "service_account_impersonation_url": format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{GSA}:generateAccessToken"),
        "service_account_impersonation": {"token_lifetime_seconds": 3600}
    })
}

fn config_maps(text: &str) -> ConfigMaps {
    let data = ConfigMapData {
        keys: BTreeMap::from([("credential-configuration.json".to_string(), ConfigValue::Text(text.into()))]),
    };
    BTreeMap::from([(
        ("checkout".to_string(), "wi-config".to_string()),
        ConfigMapRead::Found(Arc::new(data)),
    )])
}

fn provider(allowed: &[&str]) -> ProviderFacts {
    ProviderFacts::new(
        Ok(Some(Pool { name: "pool".into(), state: State::Active, disabled: false })),
        Ok(Some(Provider {
            name: PROVIDER.into(),
            state: State::Active,
            oidc: Some(Oidc {
                issuer_uri: ISSUER.into(),
                allowed_audiences: allowed.iter().map(|a| (*a).to_string()).collect(),
                jwks_json: String::new(),
            }),
            ..Default::default()
        })),
    )
}

struct Run {
    plan: Plan,
    prepared: Prepared,
    config_maps: ConfigMaps,
    provider: ProviderFacts,
}

impl Run {
    fn gke() -> Self {
        Self {
            plan: plan("GKE", "Impersonation"),
            prepared: prepared(true),
            config_maps: BTreeMap::new(),
            provider: provider(&[]),
        }
    }

    fn federation(config: &Value) -> Self {
        Self {
            plan: plan("Federation", "Impersonation"),
            prepared: prepared(true),
            config_maps: config_maps(&config.to_string()),
            provider: provider(&[]),
        }
    }

    fn check(&self, workloads: &[Arc<Workload>]) -> Option<Finding> {
        let gsas = BTreeMap::new();
        let cluster = Ok(ClusterIssuer { issuer: ISSUER.into(), keys: vec![] });
        let facts = Facts { gsas: &gsas, provider: Some(&self.provider), cluster: Some(&cluster), now: 0 };
        self.plan.workload_stage(&self.prepared, Ok(workloads), &self.config_maps, &facts)
    }

    /// The finding for one Deployment `api`, which must have `reason` and name it.
    fn expect(&self, spec: Value, reason: Reason) -> Finding {
        let f = self.check(&[deployment("api", spec)]).expect("a finding");
        assert_eq!((f.stage, f.reason), (Stage::Workload, reason), "{}", f.message);
        assert_eq!(f.workloads, vec!["Deployment/api".to_string()]);
        assert!(f.message.contains("Deployment checkout/api"), "names the workload: {}", f.message);
        let undecided = reason == Reason::CredentialConfigUnreadable;
        assert_eq!(f.verdict, if undecided { Verdict::Unknown } else { Verdict::Fail });
        assert!(undecided || f.message.contains("Fix: "), "no fix in: {}", f.message);
        f
    }
}

fn gke_spec(env: Value) -> Value {
    json!({
        "containers": [{"name": "api", "env": env, "volumeMounts": [{"name": "key", "mountPath": "/secrets"}]}],
        "volumes": [{"name": "key", "secret": {"secretName": "sa-key"}}]
    })
}

#[test]
fn gke_a_workload_without_the_variable_passes() {
    assert_eq!(
        Run::gke().check(&[deployment("api", gke_spec(json!([{"name": "OTHER", "value": "x"}])))]),
        None
    );
    assert_eq!(Run::gke().check(&[]), None, "a KSA with no workload passes");
}

#[test]
fn gke_a_set_credentials_file_overrides_workload_identity() {
    let f = Run::gke().expect(
        gke_spec(json!([{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/secrets/key.json"}])),
        Reason::CredentialFileOverridesWorkloadIdentity,
    );
    assert!(f.message.contains("container api of Deployment checkout/api"), "{}", f.message);
    assert!(f.message.contains("\"/secrets/key.json\" (it comes from Secret sa-key)"), "{}", f.message);
    assert!(
        f.message
            .contains("kubectl set env deployment/api -n checkout -c api GOOGLE_APPLICATION_CREDENTIALS-"),
        "{}",
        f.message
    );
    // Through valueFrom, in an init container, of a bare Pod: the same, with a fix that recreates.
    let pod: Lean<Pod> = serde_json::from_value(json!({
        "metadata": {"name": "batch", "namespace": "checkout"},
        "spec": {"serviceAccountName": "app", "containers": [{"name": "main"}], "initContainers": [{"name": "setup", "env": [
            {"name": "GOOGLE_APPLICATION_CREDENTIALS", "valueFrom": {"configMapKeyRef": {"name": "c", "key": "k"}}}
        ]}]}
    }))
    .unwrap();
    let f = Run::gke().check(&[Arc::new(prune(&pod).unwrap())]).unwrap();
    assert_eq!(
        (f.reason, f.workloads.clone()),
        (Reason::CredentialFileOverridesWorkloadIdentity, vec!["Pod/batch".to_string()])
    );
    assert!(
        f.message.contains("init container setup of Pod checkout/batch")
            && f.message.contains("recreate Pod"),
        "{}",
        f.message
    );
}

#[test]
fn user_credentials_mounted_by_path_file_or_variable() {
    for (mount, volume) in [
        (
            json!({"name": "v", "mountPath": "/home/app/.config/gcloud/"}),
            json!({"name": "v", "secret": {"secretName": "gcloud"}}),
        ),
        (
            json!({"name": "v", "mountPath": "/adc.json", "subPath": "application_default_credentials.json"}),
            json!({"name": "v", "configMap": {"name": "dev"}}),
        ),
        (
            json!({"name": "v", "mountPath": "/creds"}),
            json!({"name": "v", "secret": {"secretName": "dev", "items": [{"key": "k", "path": "application_default_credentials.json"}]}}),
        ),
    ] {
        let spec = json!({"containers": [{"name": "api"}, {"name": "tool", "volumeMounts": [{"name": "x", "mountPath": "/x"}, mount]}], "volumes": [volume]});
        let f = Run::gke().expect(spec, Reason::UserCredentialsMounted);
        assert!(
            f.message.contains(r#"kubectl patch deployment api -n checkout --type=json -p '[{"op":"remove","path":"/spec/template/spec/containers/1/volumeMounts/1"}]'"#),
            "{}",
            f.message
        );
    }
    let spec =
        json!({"containers": [{"name": "api", "env": [{"name": "CLOUDSDK_CONFIG", "value": "/gcloud"}]}]});
    let f = Run::gke().expect(spec.clone(), Reason::UserCredentialsMounted);
    assert!(
        f.message.contains("kubectl set env deployment/api -n checkout -c api CLOUDSDK_CONFIG-"),
        "{}",
        f.message
    );
    // Under Federation too.
    Run::federation(&cred_config()).expect(spec, Reason::UserCredentialsMounted);
    // A mount elsewhere is not a user credential.
    let healthy = json!({"containers": [{"name": "api", "volumeMounts": [{"name": "v", "mountPath": "/home/app/.config/app"}]}], "volumes": [{"name": "v", "emptyDir": {}}]});
    assert_eq!(Run::gke().check(&[deployment("api", healthy)]), None);
}

#[test]
fn gke_host_network_bypasses_workload_identity() {
    let spec = json!({"hostNetwork": true, "containers": [{"name": "api"}]});
    let f = Run::gke().expect(spec.clone(), Reason::HostNetworkBypassesWorkloadIdentity);
    assert!(
        f.message.contains(r#"[{"op":"remove","path":"/spec/template/spec/hostNetwork"}]"#),
        "{}",
        f.message
    );
    // Federation pods do not use the metadata server: hostNetwork does not matter there.
    let mut federated = federated(Some(&format!("https://iam.googleapis.com/{PROVIDER}")));
    federated["hostNetwork"] = json!(true);
    assert_eq!(Run::federation(&cred_config()).check(&[deployment("api", federated)]), None);
    let cron: Lean<CronJob> = serde_json::from_value(json!({
        "metadata": {"name": "nightly", "namespace": "checkout"},
        "spec": {"schedule": "@daily", "jobTemplate": {"spec": {"template": {"spec": {"serviceAccountName": "app", "hostNetwork": true, "containers": [{"name": "c"}]}}}}}
    }))
    .unwrap();
    let f = Run::gke().check(&[Arc::new(prune(&cron).unwrap())]).unwrap();
    assert!(f.message.contains("/spec/jobTemplate/spec/template/spec/hostNetwork"), "{}", f.message);
}

#[test]
fn federation_a_configuration_as_create_cred_config_writes_it_passes() {
    let https = format!("https://iam.googleapis.com/{PROVIDER}");
    let healthy = deployment("api", federated(Some(&https)));
    assert_eq!(Run::federation(&cred_config()).check(std::slice::from_ref(&healthy)), None);
    // A regional STS endpoint, the token_info_url gcloud writes without --service-account, and
    // fields it does not know yet are accepted.
    let mut config = cred_config();
    config["token_url"] = json!("https://sts.europe-west3.rep.googleapis.com/v1/token");
    config["token_info_url"] = json!("https://sts.googleapis.com/v1/introspect");
    config["some_future_field"] = json!({"x": 1});
    assert_eq!(Run::federation(&config).check(std::slice::from_ref(&healthy)), None);
    // Direct access: no impersonation URL.
    let mut direct = Run::federation(&config);
    direct.plan = plan("Federation", "Direct");
    direct.prepared = prepared(false);
    config.as_object_mut().unwrap().remove("service_account_impersonation_url");
    direct.config_maps = config_maps(&config.to_string());
    assert_eq!(direct.check(&[healthy]), None);
    assert_eq!(
        Run::federation(&cred_config())
            .plan
            .config_maps_to_read("app", &[deployment("api", federated(None))]),
        vec![("checkout".to_string(), "wi-config".to_string())]
    );
}

#[test]
fn federation_credential_config_missing() {
    let run = Run::federation(&cred_config());
    let f = run.expect(json!({"containers": [{"name": "api"}]}), Reason::CredentialConfigMissing);
    assert!(
        f.message.contains(&format!("gcloud iam workload-identity-pools create-cred-config {PROVIDER} --service-account={GSA} --credential-source-file=/var/run/service-account/token --credential-source-type=text --output-file=credential-configuration.json")),
        "{}",
        f.message
    );
    assert!(
        f.message
            .contains("GOOGLE_APPLICATION_CREDENTIALS=/etc/workload-identity/credential-configuration.json"),
        "{}",
        f.message
    );
    // A path no volume mounts.
    let mut spec = federated(None);
    spec["containers"][0]["env"][0]["value"] = json!("/elsewhere/config.json");
    assert!(run.expect(spec, Reason::CredentialConfigMissing).message.contains("no volume is mounted there"));
    // The ConfigMap does not exist.
    let mut missing = Run::federation(&cred_config());
    missing.config_maps.insert(("checkout".into(), "wi-config".into()), ConfigMapRead::Missing);
    let f = missing.expect(federated(None), Reason::CredentialConfigMissing);
    assert!(f.message.contains("ConfigMap wi-config, which does not exist"), "{}", f.message);
    assert!(
        f.message.contains(
            "kubectl create configmap wi-config -n checkout --from-file=credential-configuration.json"
        ),
        "{}",
        f.message
    );
    // The key does not exist: a ConfigMap volume with other items projects no such file.
    let mut spec = federated(None);
    spec["volumes"][0]["configMap"]["items"] = json!([{"key": "other", "path": "other.json"}]);
    assert!(
        run.expect(spec, Reason::CredentialConfigMissing)
            .message
            .contains("volume config projects no file there")
    );
    let mut no_key = Run::federation(&cred_config());
    no_key.config_maps =
        BTreeMap::from([(("checkout".into(), "wi-config".into()), ConfigMapRead::Found(Arc::default()))]);
    assert!(
        no_key.expect(federated(None), Reason::CredentialConfigMissing).message.contains("has no such key")
    );
}

#[test]
fn federation_credential_config_invalid() {
    for (text, why) in [
        ("not json", "is not JSON"),
        (r#"{"type": "service_account", "private_key": "x"}"#, "service account key"),
        (r#"{"type": "authorized_user"}"#, "user credential"),
        (r#"["external_account"]"#, "not an object"),
        (r#"{"type": "external_account", "audience": 7}"#, "not a valid external_account"),
    ] {
        let mut run = Run::federation(&cred_config());
        run.config_maps = config_maps(text);
        let f = run.expect(federated(None), Reason::CredentialConfigInvalid);
        assert!(f.message.contains(why), "{text}: {}", f.message);
        assert!(f.message.contains("--output-file=credential-configuration.json"), "{}", f.message);
    }
}

#[test]
fn federation_credential_config_mismatch_names_each_field() {
    let mut config = cred_config();
    config["audience"] = json!(
        "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/old/providers/k8s"
    );
    config["token_url"] = json!("https://sts.evil.example/v1/token");
    config["subject_token_type"] = json!("urn:ietf:params:oauth:token-type:id_token");
    config["service_account_impersonation_url"] = json!(
        "https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/other@acme-prod.iam.gserviceaccount.com:generateAccessToken"
    );
    config["universe_domain"] = json!("example.com");
    config["credential_source"]["format"] = json!({"type": "json", "subject_token_field_name": "token"});
    let f = Run::federation(&config).expect(federated(None), Reason::CredentialConfigMismatch);
    for field in [
        "audience: expected \"//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s\", found \"//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools/old/providers/k8s\"",
        "token_url: expected",
        "subject_token_type: expected",
        "service_account_impersonation_url: expected \"https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/payments@acme-prod.iam.gserviceaccount.com:generateAccessToken\"",
        "universe_domain: expected",
        "credential_source.format.type: expected",
    ] {
        assert!(f.message.contains(field), "{field} missing from: {}", f.message);
    }
    // Under Direct, an impersonation URL is a mismatch; its absence under Impersonation too.
    let mut direct = Run::federation(&cred_config());
    direct.plan = plan("Federation", "Direct");
    direct.prepared = prepared(false);
    assert!(
        direct.expect(federated(None), Reason::CredentialConfigMismatch).message.contains("expected none")
    );
    let mut absent = cred_config();
    absent.as_object_mut().unwrap().remove("service_account_impersonation_url");
    assert!(
        Run::federation(&absent)
            .expect(federated(None), Reason::CredentialConfigMismatch)
            .message
            .contains("found (absent)")
    );
}

#[test]
fn federation_credential_source_not_mounted() {
    let mut automount = cred_config();
    automount["credential_source"]["file"] = json!("/var/run/secrets/kubernetes.io/serviceaccount/token");
    let f = Run::federation(&automount).expect(federated(None), Reason::CredentialSourceNotMounted);
    assert!(f.message.contains("automounted API server token"), "{}", f.message);
    let mut elsewhere = cred_config();
    elsewhere["credential_source"]["file"] = json!("/var/run/other/token");
    let f = Run::federation(&elsewhere).expect(federated(None), Reason::CredentialSourceNotMounted);
    assert!(f.message.contains("no volume is mounted there"), "{}", f.message);
    assert!(
        f.message.contains(r#""mountPath":"/var/run/other""#),
        "a patch mounting a token there: {}",
        f.message
    );
    let mut url = cred_config();
    url["credential_source"] = json!({"url": "http://169.254.169.254/token"});
    assert!(
        Run::federation(&url)
            .expect(federated(None), Reason::CredentialSourceNotMounted)
            .message
            .contains("has no file")
    );
}

#[test]
fn federation_projected_token_audience_not_allowed() {
    let f = Run::federation(&cred_config())
        .expect(federated(Some("sts.googleapis.com")), Reason::AudienceNotAllowed);
    assert!(f.message.contains("\"sts.googleapis.com\""), "{}", f.message);
    assert!(
        f.message.contains("/spec/template/spec/volumes/1/projected/sources/0/serviceAccountToken/audience"),
        "{}",
        f.message
    );
    // No audience: the API server's, which a provider with default audiences refuses.
    Run::federation(&cred_config()).expect(federated(None), Reason::AudienceNotAllowed);
    // An audience the provider lists passes.
    let mut listed = Run::federation(&cred_config());
    listed.provider = provider(&["sts.googleapis.com"]);
    assert_eq!(listed.check(&[deployment("api", federated(Some("sts.googleapis.com")))]), None);
    // The provider unread: the provider stage speaks, not this one.
    let mut unread = Run::federation(&cred_config());
    unread.provider = ProviderFacts::new(Ok(None), Ok(None));
    assert_eq!(unread.check(&[deployment("api", federated(Some("sts.googleapis.com")))]), None);
}

#[test]
fn federation_unreadable_configurations_are_unknown() {
    let run = Run::federation(&cred_config());
    let mut secret = federated(None);
    secret["volumes"][0] = json!({"name": "config", "secret": {"secretName": "wi-config"}});
    let f = run.expect(secret, Reason::CredentialConfigUnreadable);
    assert!(
        f.message.contains("from Secret wi-config") && f.message.contains("holds no secret"),
        "{}",
        f.message
    );
    let mut value_from = federated(None);
    value_from["containers"][0]["env"][0] = json!({"name": "GOOGLE_APPLICATION_CREDENTIALS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}});
    assert!(run.expect(value_from, Reason::CredentialConfigUnreadable).message.contains("valueFrom"));
    let env_from = json!({"containers": [{"name": "api", "envFrom": [{"configMapRef": {"name": "env"}}]}]});
    assert!(run.expect(env_from, Reason::CredentialConfigUnreadable).message.contains("envFrom"));
    let mut empty_dir = federated(None);
    empty_dir["volumes"][0] = json!({"name": "config", "emptyDir": {}});
    assert!(run.expect(empty_dir, Reason::CredentialConfigUnreadable).message.contains("emptyDir"));
    let mut forbidden = Run::federation(&cred_config());
    forbidden.config_maps.insert(
        ("checkout".into(), "wi-config".into()),
        ConfigMapRead::Unreadable { reason: Reason::CheckerForbidden, detail: "403".into() },
    );
    let f = forbidden.check(&[deployment("api", federated(None))]).unwrap();
    assert_eq!((f.reason, f.verdict), (Reason::CheckerForbidden, Verdict::Unknown));
}

#[test]
fn one_reason_per_service_account_failing_first_then_table_order() {
    let run = Run::federation(&cred_config());
    let mut secret = federated(None);
    secret["volumes"][0] = json!({"name": "config", "secret": {"secretName": "wi-config"}});
    let mut mismatched = cred_config();
    mismatched["token_url"] = json!("https://example.com/token");
    let mut run_mismatch = Run::federation(&mismatched);
    let unknown = deployment("a-secret", secret);
    let failing =
        deployment("b-mismatch", federated(Some(&format!("https://iam.googleapis.com/{PROVIDER}"))));
    let f = run_mismatch.check(&[unknown.clone(), failing.clone()]).unwrap();
    assert_eq!(
        (f.reason, f.workloads.clone()),
        (Reason::CredentialConfigMismatch, vec!["Deployment/b-mismatch".to_string()])
    );
    // An earlier reason of the table wins over a later one.
    let missing = deployment("c-missing", json!({"containers": [{"name": "api"}]}));
    run_mismatch.config_maps = run.config_maps.clone();
    let f = run_mismatch.check(&[failing, missing]).unwrap();
    assert_eq!(f.reason, Reason::CredentialConfigMissing);
    // Only the Secret-held one: Unknown.
    assert_eq!(run.check(&[unknown]).unwrap().verdict, Verdict::Unknown);
}

#[test]
fn workloads_are_listed_sorted_at_most_five_and_others_ignored() {
    let spec = json!({"hostNetwork": true, "containers": [{"name": "api"}]});
    let mut workloads: Vec<Arc<Workload>> =
        (0..7).rev().map(|i| deployment(&format!("w{i}"), spec.clone())).collect();
    let mut other = (*deployment("other", spec.clone())).clone();
    other.pod = ArcIntern::new(PodView { service_account: "default".into(), ..(*other.pod).clone() });
    workloads.push(Arc::new(other));
    let f = Run::gke().check(&workloads).unwrap();
    assert_eq!(
        f.workloads,
        ["Deployment/w0", "Deployment/w1", "Deployment/w2", "Deployment/w3", "Deployment/w4"]
    );
    assert!(f.message.starts_with("Deployment checkout/w0 runs with hostNetwork"), "{}", f.message);
    assert!(
        f.message.contains("(7 workloads of ServiceAccount checkout/app have this problem"),
        "{}",
        f.message
    );
    let mut off = Run::gke();
    off.plan.inspect_workloads = false;
    assert_eq!(off.check(&workloads), None, "inspectWorkloads: false turns the stage off");
}

#[test]
fn workloads_that_could_not_be_listed_are_unknown_never_failing() {
    let run = Run::gke();
    let gsas = BTreeMap::new();
    let facts = Facts { gsas: &gsas, provider: None, cluster: None, now: 0 };
    let why = Unavailable { reason: Reason::CheckerForbidden, detail: "the Pod watch: 403 forbidden".into() };
    let f = run.plan.workload_stage(&run.prepared, Err(&why), &BTreeMap::new(), &facts).unwrap();
    assert_eq!((f.stage, f.reason, f.verdict), (Stage::Workload, Reason::CheckerForbidden, Verdict::Unknown));
    assert!(f.message.contains("ServiceAccount checkout/app") && f.message.contains("403"), "{}", f.message);
}

#[test]
fn paths_resolve_through_sub_paths_and_projections() {
    let spec = json!({
        "containers": [{"name": "c", "volumeMounts": [
            {"name": "p", "mountPath": "/p"},
            {"name": "cm", "mountPath": "/file.json", "subPath": "key.json"},
            {"name": "cm", "mountPath": "/expr", "subPathExpr": "$(POD)"},
            {"name": "root", "mountPath": "/"}
        ]}],
        "volumes": [
            {"name": "p", "projected": {"sources": [
                {"configMap": {"name": "a", "items": [{"key": "k", "path": "dir/a.json"}]}},
                {"serviceAccountToken": {"audience": "x", "path": "token"}},
                {"secret": {"name": "s"}}
            ]}},
            {"name": "cm", "configMap": {"name": "b"}},
            {"name": "root", "hostPath": {"path": "/"}}
        ]
    });
    let w = deployment("api", spec);
    let c = &w.pod.containers[0];
    assert_eq!(resolve(&w, c, "/p/dir/a.json"), Served::ConfigMap { name: "a", key: "k".into() });
    assert_eq!(resolve(&w, c, "/p/token"), Served::Token { audience: Some("x"), volume: 0, source: 1 });
    assert_eq!(resolve(&w, c, "/p/other"), Served::Secret { name: "s" }, "the item-less Secret may hold it");
    assert_eq!(resolve(&w, c, "/p"), Served::Directory);
    assert_eq!(resolve(&w, c, "/file.json"), Served::ConfigMap { name: "b", key: "key.json".into() });
    assert_eq!(resolve(&w, c, "/expr/x"), Served::Expanded);
    assert_eq!(resolve(&w, c, "/etc/x"), Served::Other { kind: "hostPath" });
}
