//! Proves the local control plane is the real thing: the pinned kube-apiserver release, admission
//! through the CRD's schema and CEL rules, TokenRequest with tokens that verify against the served
//! JWKS, and server-side apply on the status subresource.
//!
//! On the harness's shared control plane, where no operator runs: an operator would reconcile the
//! probes created here and write over the status these tests write.

use anyhow::{Context, Result};
use authprobe::api::{AuthProbe, AuthProbeStatus, Summary};
use authprobe_harness::ControlPlane;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header, jwk::JwkSet};
use k8s_openapi::api::{authentication::v1::TokenRequest, core::v1::ServiceAccount};
use kube::{
    Api,
    api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

#[tokio::test]
async fn server_is_the_pinned_release() -> Result<()> {
    let cp = ControlPlane::shared();
    let version = cp.client().await?.apiserver_version().await?;
    // Printed unconditionally (not captured) so the test log shows which server ran.
    use std::io::Write as _;
    writeln!(
        std::io::stderr(),
        "control plane: kube-apiserver {} at {}",
        version.git_version,
        cp.server_url()
    )?;
    assert!(version.git_version.starts_with("v1.36."), "unexpected server version {}", version.git_version);
    assert_eq!((version.major.as_str(), version.minor.as_str()), ("1", "36"));
    Ok(())
}

fn probe(name: &str, spec: Value) -> Result<AuthProbe> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe",
        "metadata": {"name": name}, "spec": spec
    }))?)
}

fn valid_spec() -> Value {
    json!({
        "namespaceSelector": {"matchLabels": {"team": "payments"}},
        "serviceAccounts": {"names": ["app"]},
        "identity": {"platform": "GKE", "projectId": "acme-prod", "projectNumber": "123456789012"},
        "targets": [{"resource": "//storage.googleapis.com/projects/_/buckets/payments-data",
                     "permissions": ["storage.objects.get"]}]
    })
}

/// Sets `value` at a `/`-separated path in `spec`, or removes the key when `value` is null.
fn with(mut spec: Value, path: &str, value: Value) -> Value {
    let (parent, key) = path.rsplit_once('/').unwrap_or(("", path));
    let target = if parent.is_empty() {
        &mut spec
    } else {
        spec.pointer_mut(&format!("/{parent}")).expect("path exists")
    };
    let object = target.as_object_mut().expect("an object");
    if value.is_null() {
        object.remove(key);
    } else {
        object.insert(key.to_string(), value);
    }
    spec
}

#[tokio::test]
async fn a_valid_probe_is_accepted_with_schema_defaults() -> Result<()> {
    let client = ControlPlane::shared().client().await?;
    let api = Api::<AuthProbe>::all(client);
    let created = api.create(&PostParams::default(), &probe("valid", valid_spec())?).await?;
    assert_eq!(created.spec.probe.interval, "10m");
    assert_eq!(created.spec.probe.propagation_grace, "7m");
    assert!(!created.spec.probe.token_exchange);

    let federation = with(
        with(valid_spec(), "identity/platform", json!("Federation")),
        "identity/federation",
        json!({"provider": "projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s"}),
    );
    let created = api.create(&PostParams::default(), &probe("valid-federation", federation)?).await?;
    assert_eq!(created.spec.identity.federation.map(|f| f.audience), Some(String::new()));
    Ok(())
}

#[tokio::test]
async fn invalid_probes_are_refused_with_the_cel_messages() -> Result<()> {
    let client = ControlPlane::shared().client().await?;
    // Untyped, so that values the Rust types cannot even hold reach the API server.
    let api = Api::<DynamicObject>::all_with(client, &ApiResource::erase::<AuthProbe>(&()));
    let provider = json!({"provider": "projects/123456789012/locations/global/workloadIdentityPools/onprem/providers/k8s"});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "unknown-platform",
            with(valid_spec(), "identity/platform", json!("EKS")),
            "Unsupported value: \"EKS\"",
        ),
        (
            "unknown-access",
            with(valid_spec(), "identity/access", json!("Sideways")),
            "Unsupported value: \"Sideways\"",
        ),
        (
            "project-number-letters",
            with(valid_spec(), "identity/projectNumber", json!("12x4")),
            "projectNumber must be digits only",
        ),
        (
            "federation-missing",
            with(valid_spec(), "identity/platform", json!("Federation")),
            "identity.federation is required when platform is Federation",
        ),
        (
            "federation-under-gke",
            with(valid_spec(), "identity/federation", provider.clone()),
            "identity.federation is only allowed when platform is Federation",
        ),
        (
            "provider-malformed",
            with(
                with(valid_spec(), "identity/platform", json!("Federation")),
                "identity/federation",
                json!({"provider": "projects/acme/pools/x"}),
            ),
            "federation.provider must look like projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER",
        ),
        (
            "provider-other-project",
            with(
                with(valid_spec(), "identity/platform", json!("Federation")),
                "identity/federation",
                json!({"provider": "projects/999/locations/global/workloadIdentityPools/onprem/providers/k8s"}),
            ),
            "identity.federation.provider must belong to identity.projectNumber",
        ),
        (
            "interval-too-short",
            with(valid_spec(), "probe", json!({"interval": "10s"})),
            "probe.interval must be a duration from 30s to 24h",
        ),
        (
            "interval-too-long",
            with(valid_spec(), "probe", json!({"interval": "25h"})),
            "probe.interval must be a duration from 30s to 24h",
        ),
        (
            "interval-not-a-duration",
            with(valid_spec(), "probe", json!({"interval": "ten minutes"})),
            "probe.interval must be a duration from 30s to 24h",
        ),
        (
            "grace-too-long",
            with(valid_spec(), "probe", json!({"propagationGrace": "2h"})),
            "probe.propagationGrace must be a duration from 0s to 1h",
        ),
        (
            "selector-missing",
            with(valid_spec(), "namespaceSelector", Value::Null),
            "spec.namespaceSelector: Required value",
        ),
        (
            "selector-bad-operator",
            with(
                valid_spec(),
                "namespaceSelector",
                json!({"matchExpressions": [{"key": "team", "operator": "Like", "values": ["x"]}]}),
            ),
            "selector operators must be In, NotIn, Exists or DoesNotExist",
        ),
        (
            "selector-in-without-values",
            with(
                valid_spec(),
                "namespaceSelector",
                json!({"matchExpressions": [{"key": "team", "operator": "In"}]}),
            ),
            "selector values must be non-empty for In and NotIn",
        ),
        (
            "ksa-name-invalid",
            with(valid_spec(), "serviceAccounts", json!({"names": ["App_1"]})),
            "names must be ServiceAccount names",
        ),
        (
            "gke-exchange-without-cluster",
            with(valid_spec(), "probe", json!({"tokenExchange": true})),
            "identity.gke (clusterLocation, clusterName) is required",
        ),
        (
            "gke-without-project",
            with(valid_spec(), "identity/projectId", Value::Null),
            "identity.projectId is required when platform is GKE",
        ),
        (
            "target-not-a-resource-name",
            with(
                valid_spec(),
                "targets",
                json!([{"resource": "payments-data", "permissions": ["storage.objects.get"]}]),
            ),
            "target resource must be a full resource name",
        ),
        (
            "permission-malformed",
            with(
                valid_spec(),
                "targets",
                json!([{"resource": "//storage.googleapis.com/projects/_/buckets/b", "permissions": ["get"]}]),
            ),
            "permissions must look like service.resource.verb",
        ),
    ];
    let mut unexpected = Vec::new();
    for (name, spec, expected) in &cases {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "metadata": {"name": name}, "spec": spec
        }))?;
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => unexpected.push(format!("{name}: accepted")),
            Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains(expected) => {}
            Err(e) => unexpected.push(format!("{name}: {e}")),
        }
    }
    assert!(unexpected.is_empty(), "cases not refused as expected:\n{}", unexpected.join("\n"));
    // Printed unconditionally: RELIABILITY.md quotes it.
    use std::io::Write as _;
    writeln!(
        std::io::stderr(),
        "admission: {} invalid AuthProbes refused, each with its message",
        cases.len()
    )?;
    Ok(())
}

#[tokio::test]
async fn service_account_tokens_verify_against_the_served_jwks() -> Result<()> {
    let cp = ControlPlane::shared();
    let client = cp.client().await?;
    let ns = cp.namespace(&client, "tokens", &[]).await?;
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), &ns);
    sas.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": "app"}}))?)
        .await?;
    let request: TokenRequest = serde_json::from_value(json!({
        "spec": {"audiences": ["acme-prod.svc.id.goog"], "expirationSeconds": 600}
    }))?;
    let minted = sas.create_token_request("app", &PostParams::default(), &request).await?;
    let token = minted.status.and_then(|s| s.token).context("TokenRequest returned no token")?;

    let get = |path: &str| http::Request::get(path).body(Vec::new());
    let discovery: Value =
        serde_json::from_str(&client.request_text(get("/.well-known/openid-configuration")?).await?)?;
    assert_eq!(discovery["issuer"], cp.issuer(), "discovery must name the configured issuer");
    let jwks: JwkSet = serde_json::from_str(&client.request_text(get("/openid/v1/jwks")?).await?)?;

    let header = decode_header(&token)?;
    assert_eq!(header.alg, Algorithm::RS256, "Google STS accepts RS256 or ES256 only");
    let kid = header.kid.context("KSA tokens carry a kid")?;
    let jwk = jwks.find(&kid).context("the token's kid is in the served JWKS")?;
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&["acme-prod.svc.id.goog"]);
    validation.set_issuer(&[cp.issuer()]);
    let claims = decode::<Value>(&token, &DecodingKey::from_jwk(jwk)?, &validation)?.claims;
    assert_eq!(claims["sub"], format!("system:serviceaccount:{ns}:app"));
    assert_eq!(claims["aud"], json!(["acme-prod.svc.id.goog"]));
    assert_eq!(claims["kubernetes.io"]["namespace"], ns);
    assert_eq!(claims["kubernetes.io"]["serviceaccount"]["name"], "app");
    let lifetime = claims["exp"].as_i64().unwrap_or_default() - claims["iat"].as_i64().unwrap_or_default();
    assert_eq!(lifetime, 600);

    // A token signed by anything else must not verify: flip one signature byte.
    let (unsigned, signature) = token.rsplit_once('.').context("a JWS")?;
    let mut forged_sig = signature.to_string().into_bytes();
    forged_sig[10] = if forged_sig[10] == b'A' { b'B' } else { b'A' };
    let forged = format!("{unsigned}.{}", String::from_utf8(forged_sig)?);
    assert!(decode::<Value>(&forged, &DecodingKey::from_jwk(jwk)?, &validation).is_err());
    Ok(())
}

#[tokio::test]
async fn status_written_by_server_side_apply_reads_back() -> Result<()> {
    let client = ControlPlane::shared().client().await?;
    let api = Api::<AuthProbe>::all(client);
    let created = api.create(&PostParams::default(), &probe("ssa-status", valid_spec())?).await?;
    let status = AuthProbeStatus {
        observed_generation: created.metadata.generation,
        summary: Some(Summary {
            namespaces: 3,
            service_accounts: 3,
            passing: 2,
            failing: 1,
            unknown: 0,
            live_verified: None,
        }),
        ..Default::default()
    };
    let patch = json!({"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "status": status});
    api.patch_status("ssa-status", &PatchParams::apply("authprobe-test").force(), &Patch::Apply(&patch))
        .await?;
    let read = api.get_status("ssa-status").await?;
    assert_eq!(read.status, Some(status));
    assert_eq!(read.spec, created.spec, "a status write leaves the spec alone");
    Ok(())
}

#[tokio::test]
async fn every_example_is_accepted_by_the_api_server() {
    let client = ControlPlane::shared().client().await.unwrap();
    let api = Api::<AuthProbe>::all(client);
    let dir = authprobe_harness::repo_root().join("examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let probe: AuthProbe = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let dry_run = PostParams { dry_run: true, ..Default::default() };
        api.create(&dry_run, &probe).await.unwrap_or_else(|e| panic!("{} is refused: {e}", path.display()));
        authprobe::engine::Plan::parse(&probe.spec)
            .unwrap_or_else(|e| panic!("{} is an InvalidSpec: {e}", path.display()));
        checked += 1;
    }
    assert!(checked >= 2, "only {checked} examples found");
}
