//! Token type and audience against the real control plane, the fake Google and a real nginx in
//! front of the fake's origin server: Cloud Run audiences and ID tokens, and `spec.endpoints`
//! through an edge path that passes `Authorization`, strips it on an internal rewrite, redirects
//! to another host, or leads to an origin that takes the other token type. Every reason has a
//! healthy twin; nothing is ever sent to a host outside `--endpoint-allow`; none of the tokens
//! sent to the origin shows up in a log, an Event, a status or etcd.

use std::{net::SocketAddr, sync::Arc};

use crate::support::*;
use authprobe::api::AuthProbe;
use authprobe_harness::{Nginx, free_port};
use fake_google::{
    origin::{self, OriginConfig},
    scenario::{Binding, CloudRunService, Cluster, GkeCluster, GkeProject, ServiceAccount},
};
use kube::Client;
use serde_json::{Value, json};

const CLUSTER_URL: &str =
    "https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-1";
/// The audience the origin's ID tokens must carry.
const AUDIENCE: &str = "https://api.acme.example";

/// Google's Cloud Run services and the trusted cluster are the fake's for everyone, and the
/// operator may send tokens to 127.0.0.1 (plain http, being loopback) and to nothing else,
/// 127.0.0.2 included: a control plane, fake and operator of this module's own.
static ENV: Private = Private::new(
    "token_type",
    Setup { operator_args: &["--google-retry-deadline=8s", "--endpoint-allow=127.0.0.1"], ..Setup::DEFAULT },
);

/// This module's environment with the fake trusting its cluster, and an admin client.
async fn admin() -> (Arc<Env>, Client) {
    let env = ENV.get();
    let (issuer, ca) = (env.cp.issuer(), env.cp.ca_pem().unwrap());
    env.fake.update(|s| {
        if !s.clusters.iter().any(|c| c.issuer == issuer) {
            s.clusters.push(Cluster { issuer: issuer.clone(), ca_pem: ca });
            s.gke.push(GkeProject {
                project_id: "acme-prod".into(),
                project_number: "123456789012".into(),
                clusters: vec![GkeCluster { url: CLUSTER_URL.into(), issuer }],
            });
        }
    });
    let client = env.client().await;
    (env, client)
}

fn loopback(ip: [u8; 4]) -> SocketAddr {
    SocketAddr::from((ip, 0))
}

/// A namespace labelled `suite=id` with KSA `app` impersonating a new GSA that maps it, and may
/// invoke `invoke` (a Cloud Run resource) when given; returns the namespace and the GSA.
async fn subject(env: &Env, client: &Client, id: &str, invoke: Option<&str>) -> (String, String) {
    let gsa = format!("{}@acme-prod.iam.gserviceaccount.com", unique("tt"));
    let ns = env.namespace(client, "tt", &[("suite", id)]).await;
    service_account(client, &ns, "app", Some(&gsa)).await;
    let grants = invoke.map(|r| (r.to_string(), vec!["run.routes.invoke".to_string()]));
    let sa = ServiceAccount {
        email: gsa.clone(),
        bindings: vec![Binding { role: WIU.into(), members: vec![member(&ns, "app")], condition: None }],
        grants: grants.into_iter().collect(),
        ..Default::default()
    };
    env.fake.update(|s| s.service_accounts.push(sa));
    (ns, gsa)
}

/// Another namespace labelled `suite=id` whose KSA `app` impersonates the same `gsa`.
async fn sharing(env: &Env, client: &Client, id: &str, gsa: &str) {
    let ns = env.namespace(client, "tt", &[("suite", id)]).await;
    service_account(client, &ns, "app", Some(gsa)).await;
    env.fake.update(|s| {
        let sa = s.service_accounts.iter_mut().find(|sa| sa.email == gsa).unwrap();
        sa.bindings[0].members.push(member(&ns, "app"));
    });
}

/// The live GKE chain for KSA `app` in the `suite=id` namespaces, with `extra` merged in.
fn spec(id: &str, extra: Value) -> Value {
    let mut spec = gke_spec(
        "suite",
        id,
        json!({
            "identity": {"gke": {"clusterLocation": "us-central1", "clusterName": "prod-1"}},
            "probe": {"tokenExchange": true}
        }),
    );
    merge(&mut spec, extra);
    spec
}

/// An ID-token endpoint for [`AUDIENCE`].
fn id_endpoint(url: String) -> Value {
    json!({"url": url, "tokenType": "IDToken", "audience": AUDIENCE})
}

fn failure(p: &AuthProbe) -> (String, String, String) {
    let f = &p.status.as_ref().unwrap().failures[0];
    (f.stage.to_string(), f.reason.to_string(), f.message.clone())
}

/// No token the fake issued or saw (the ones the origin was sent included) is in the control
/// plane's files: etcd's data (status, Events), the API server's and the operator's logs, and
/// nginx's configuration and logs, which live there too.
fn assert_no_token_leaked(env: &Env) {
    let credentials = env.fake.credentials_seen();
    assert!(credentials.iter().any(|c| c.starts_with("ya29.")), "access tokens were issued");
    assert!(
        credentials.iter().any(|c| fake_google::verify_id_token(env.fake.as_ref(), c, AUDIENCE).is_ok()),
        "ID tokens for the origin's audience were issued"
    );
    let scanned = assert_no_credential_in_files(env.cp.dir(), &credentials);
    assert!(scanned > 1 << 20, "the scan read etcd's data ({scanned} bytes)");
}

#[tokio::test]
async fn a_proxy_that_passes_the_header_is_verified_and_one_that_strips_it_is_named() {
    let (env, client) = admin().await;
    let site = origin::start(loopback([127, 0, 0, 1]), OriginConfig::id_token(env.fake.clone(), AUDIENCE))
        .await
        .unwrap();
    let upstream = site.addr;
    // (a) passes the header; (b) drops it on an internal rewrite, as an auth sidecar might.
    let nginx = Nginx::start(env.cp.dir(), |listen| {
        format!(
            "server {{ listen {listen};
               location /pass/ {{ proxy_pass http://{upstream}/; }}
               location /api/ {{ rewrite ^/api/(.*)$ /internal/$1 last; }}
               location /internal/ {{ internal; proxy_set_header Authorization \"\"; proxy_pass http://{upstream}/; }}
             }}"
        )
    })
    .unwrap();

    let (healthy, stripped) = (unique("pass"), unique("strip"));
    let (_, shared_gsa) = subject(&env, &client, &healthy, None).await;
    sharing(&env, &client, &healthy, &shared_gsa).await;
    let (stripped_ns, _) = subject(&env, &client, &stripped, None).await;
    let passing = id_endpoint(format!("{}/pass/healthz", nginx.url()));
    let mut rewritten = id_endpoint(format!("{}/api/healthz", nginx.url()));
    rewritten["origin"] = json!(format!("{}/healthz", site.url()));
    apply_probe(&client, &healthy, spec(&healthy, json!({"endpoints": [passing]}))).await;
    apply_probe(&client, &stripped, spec(&stripped, json!({"endpoints": [rewritten]}))).await;

    env.wait_verified(&client, &healthy, 2).await;
    let probe = env.wait_ready(&client, &stripped, "False", "AuthorizationStripped").await;
    let (stage, _, message) = failure(&probe);
    assert_eq!(stage, "Endpoint");
    for needle in [
        format!("endpoint {}/api/healthz (IDToken)", nginx.url()),
        format!("its origin {}/healthz", site.url()),
        "proxy_set_header".to_string(),
    ] {
        assert!(message.contains(&needle), "{needle} missing: {message}");
    }
    wait_for_events(
        &client,
        &stripped_ns,
        "ServiceAccount",
        "app",
        &[("Warning", "AuthorizationStripped", 1)],
    )
    .await;
    // What the origin saw: one request through (a) for both KSAs of the GSA, one through (b)
    // without the header, and one from authprobe directly; nothing retried, no other token type.
    let seen: Vec<(bool, u16)> = site.requests().iter().map(|s| (s.authorization, s.status)).collect();
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(sorted, vec![(false, 401), (true, 200), (true, 200)], "{seen:?}");
    assert_no_token_leaked(&env);
}

#[tokio::test]
async fn a_redirect_to_another_host_is_named_and_nothing_is_sent_there() {
    let (env, client) = admin().await;
    let site = origin::start(loopback([127, 0, 0, 1]), OriginConfig::id_token(env.fake.clone(), AUDIENCE))
        .await
        .unwrap();
    // The other host: loopback, but not in --endpoint-allow; it must never be called.
    let elsewhere =
        origin::start(loopback([127, 0, 0, 2]), OriginConfig::id_token(env.fake.clone(), AUDIENCE))
            .await
            .unwrap();
    let (upstream, other) = (site.addr, elsewhere.addr);
    let nginx = Nginx::start(env.cp.dir(), |listen| {
        format!(
            "server {{ listen {listen};
               location /pass/ {{ proxy_pass http://{upstream}/; }}
               location = /same {{ return 307 /pass/healthz; }}
               location = /moved {{ return 307 http://{other}/healthz; }}
             }}"
        )
    })
    .unwrap();

    let (same, moved) = (unique("same"), unique("moved"));
    subject(&env, &client, &same, None).await;
    subject(&env, &client, &moved, None).await;
    let endpoint = |path: &str| id_endpoint(format!("{}{path}", nginx.url()));
    apply_probe(&client, &same, spec(&same, json!({"endpoints": [endpoint("/same")]}))).await;
    apply_probe(&client, &moved, spec(&moved, json!({"endpoints": [endpoint("/moved")]}))).await;

    env.wait_verified(&client, &same, 1).await;
    let probe = env.wait_ready(&client, &moved, "False", "CrossHostRedirect").await;
    let (_, _, message) = failure(&probe);
    assert!(message.contains(&format!("http://{other}/healthz")), "names where it leads: {message}");
    assert!(message.contains("drop Authorization"), "{message}");
    assert_eq!(elsewhere.count(), 0, "nothing was sent to the other host");

    let metrics = env.operator.metrics().await;
    assert!(
        metrics.contains(&format!(
            r#"authprobe_endpoint_requests_total{{probe="{moved}",outcome="redirect"}} "#
        )),
        "{metrics}"
    );
    assert!(
        metrics
            .lines()
            .filter(|l| l.starts_with("authprobe_endpoint_requests_total"))
            .all(|l| !l.contains("http")),
        "no URL in a label: {metrics}"
    );
    assert_no_token_leaked(&env);
}

#[tokio::test]
async fn an_origin_taking_only_access_tokens_shows_the_token_type_mismatch() {
    let (env, client) = admin().await;
    let site =
        origin::start(loopback([127, 0, 0, 1]), OriginConfig::access_token(env.fake.clone())).await.unwrap();
    let upstream = site.addr;
    let nginx = Nginx::start(env.cp.dir(), |listen| {
        format!("server {{ listen {listen}; location / {{ proxy_pass http://{upstream}; }} }}")
    })
    .unwrap();

    let (access, id) = (unique("access"), unique("idtok"));
    subject(&env, &client, &access, None).await;
    subject(&env, &client, &id, None).await;
    let url = format!("{}/v1/orders", nginx.url());
    let as_access = json!({"url": url, "tokenType": "AccessToken"});
    let as_id = id_endpoint(url.clone());
    apply_probe(&client, &access, spec(&access, json!({"endpoints": [as_access]}))).await;
    apply_probe(&client, &id, spec(&id, json!({"endpoints": [as_id.clone()]}))).await;

    env.wait_verified(&client, &access, 1).await;
    let probe = env.wait_ready(&client, &id, "False", "TokenTypeMismatch").await;
    let (_, _, message) = failure(&probe);
    assert!(message.contains(&format!("endpoint {url} (IDToken)")), "{message}");
    assert!(message.contains("expects an access token"), "{message}");

    // `authprobe check` runs the same checks, with the same allow list.
    // Off this runtime's thread, which serves the origin meanwhile.
    let gate = spec(&id, json!({"endpoints": [as_id]}));
    let checked = env.clone();
    let (code, out) = tokio::task::spawn_blocking(move || check_once(&checked, &gate)).await.unwrap();
    assert_eq!(code, 1, "{out}");
    let result = &serde_json::from_str::<Value>(&out).unwrap()["probes"][0]["results"][0];
    assert_eq!(
        (result["stage"].as_str(), result["reason"].as_str()),
        (Some("Endpoint"), Some("TokenTypeMismatch"))
    );
    assert!(result["message"].as_str().unwrap().contains(&url), "{result}");
    for credential in env.fake.credentials_seen() {
        assert!(!out.contains(&credential), "check printed a token");
    }
    assert_no_token_leaked(&env);
}

/// `authprobe check -o json` on one probe with this binary's allow list; (exit code, stdout).
fn check_once(env: &Env, spec: &Value) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("probe.yaml");
    let probe = json!({"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "metadata": {"name": "gate"}, "spec": spec});
    std::fs::write(&file, serde_json::to_string(&probe).unwrap()).unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, OPERATOR_TOKEN).unwrap();
    let out = std::process::Command::new(authprobe_bin())
        .args(["check", "-f", file.to_str().unwrap(), "--output", "json"])
        .env("KUBECONFIG", env.cp.kubeconfig_path())
        .env("AUTHPROBE_GOOGLE_ENDPOINTS", &env.endpoints)
        .env("AUTHPROBE_GOOGLE_ACCESS_TOKEN_FILE", &token_file)
        .env("AUTHPROBE_ENDPOINT_ALLOW", "127.0.0.1")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8(out.stdout).unwrap(), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.code().is_some_and(|c| c < 3), "check could not run: {stderr}");
    (out.status.code().unwrap_or(-1), stdout)
}

#[tokio::test]
async fn refusals_are_false_and_outages_unknown() {
    let (env, client) = admin().await;
    let (welcome, refused, down) = (unique("welcome"), unique("refused"), unique("down"));
    let (_, allowed_gsa) = subject(&env, &client, &welcome, None).await;
    subject(&env, &client, &refused, None).await;
    subject(&env, &client, &down, None).await;
    // The origin admits one service account: the other is refused with both token types.
    let config = OriginConfig {
        allowed: Some(vec![allowed_gsa]),
        ..OriginConfig::id_token(env.fake.clone(), AUDIENCE)
    };
    let site = origin::start(loopback([127, 0, 0, 1]), config).await.unwrap();
    let (upstream, closed) = (site.addr, free_port().unwrap());
    let nginx = Nginx::start(env.cp.dir(), |listen| {
        format!(
            "server {{ listen {listen};
               location /pass/ {{ proxy_pass http://{upstream}/; }}
               location /down/ {{ proxy_pass http://127.0.0.1:{closed}/; }}
             }}"
        )
    })
    .unwrap();
    let endpoint = |path: &str| id_endpoint(format!("{}{path}", nginx.url()));
    apply_probe(&client, &welcome, spec(&welcome, json!({"endpoints": [endpoint("/pass/healthz")]}))).await;
    apply_probe(&client, &refused, spec(&refused, json!({"endpoints": [endpoint("/pass/healthz")]}))).await;
    apply_probe(&client, &down, spec(&down, json!({"endpoints": [endpoint("/down/healthz")]}))).await;

    env.wait_verified(&client, &welcome, 1).await;
    let probe = env.wait_ready(&client, &refused, "False", "EndpointRejected").await;
    let (_, _, message) = failure(&probe);
    assert!(message.contains("ID token (audience \"https://api.acme.example\"): 403"), "{message}");
    assert!(message.contains("access token: 401 (WWW-Authenticate: Bearer realm=\"origin\""), "{message}");
    let probe = env.wait_ready(&client, &down, "Unknown", "EndpointUnavailable").await;
    let (_, _, message) = failure(&probe);
    assert!(message.contains("502"), "{message}");
    assert_no_token_leaked(&env);
}

#[tokio::test]
async fn a_hanging_endpoint_does_not_hold_the_pass() {
    let (env, client) = admin().await;
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind(loopback([127, 0, 0, 1])).await.unwrap();
    let hang = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let id = unique("hang");
    subject(&env, &client, &id, None).await;
    apply_probe(
        &client,
        &id,
        spec(&id, json!({"endpoints": [id_endpoint(format!("http://{hang}/healthz"))]})),
    )
    .await;

    // The pass went on without the answer: its verdict says so, and the status was written.
    let probe = env.wait_ready(&client, &id, "Unknown", "EndpointUnavailable").await;
    let (_, _, message) = failure(&probe);
    assert!(message.contains("has not answered") && message.contains("within 3s"), "{message}");
    // The request ends at its own deadline, and the pass brought forward for it reports that.
    let probe = env
        .wait_for(&client, &id, "the request's own timeout", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.failures.first())
                .is_some_and(|f| f.message.contains("timed out"))
        })
        .await;
    assert_eq!(ready(&probe), Some(("Unknown".to_string(), "EndpointUnavailable".to_string())));
}

#[tokio::test]
async fn hosts_outside_the_allow_list_are_an_invalid_spec_and_never_called() {
    let (env, client) = admin().await;
    let outside = origin::start(loopback([127, 0, 0, 2]), OriginConfig::id_token(env.fake.clone(), AUDIENCE))
        .await
        .unwrap();
    let inside = origin::start(loopback([127, 0, 0, 1]), OriginConfig::id_token(env.fake.clone(), AUDIENCE))
        .await
        .unwrap();
    let (allowed, denied, via_origin) = (unique("allowed"), unique("denied"), unique("origin"));
    for id in [&allowed, &denied, &via_origin] {
        subject(&env, &client, id, None).await;
    }
    let mut sneaky = id_endpoint(format!("{}/healthz", inside.url()));
    sneaky["origin"] = json!(format!("{}/healthz", outside.url()));
    apply_probe(
        &client,
        &allowed,
        spec(&allowed, json!({"endpoints": [id_endpoint(format!("{}/healthz", inside.url()))]})),
    )
    .await;
    apply_probe(
        &client,
        &denied,
        spec(&denied, json!({"endpoints": [id_endpoint(format!("{}/healthz", outside.url()))]})),
    )
    .await;
    apply_probe(&client, &via_origin, spec(&via_origin, json!({"endpoints": [sneaky]}))).await;

    env.wait_verified(&client, &allowed, 1).await;
    for id in [&denied, &via_origin] {
        let probe = env.wait_ready(&client, id, "False", "InvalidSpec").await;
        let ready = probe.status.as_ref().unwrap().conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert!(
            ready.message.contains("--endpoint-allow") && ready.message.contains("127.0.0.2"),
            "{}",
            ready.message
        );
    }
    assert_eq!(outside.count(), 0, "no connection ever reached a host outside --endpoint-allow");
    assert!(inside.count() >= 1);
}

#[tokio::test]
async fn cloud_run_targets_check_the_audience_and_mint_an_id_token() {
    let (env, client) = admin().await;
    let service = unique("api");
    let run = CloudRunService {
        custom_audiences: vec![AUDIENCE.into()],
        ..CloudRunService::new("acme-prod", "123456789012", "us-central1", &service)
    };
    let resource = run.resource();
    let url = run.uri.clone();
    env.fake.update(|s| s.cloud_run_services.push(run));
    let (current, stale, offline) = (unique("run"), unique("stale"), unique("offline"));
    for id in [&current, &stale, &offline] {
        subject(&env, &client, id, Some(&resource)).await;
    }
    let target = |audience: &str| json!({"targets": [{"resource": resource, "audience": audience}]});
    apply_probe(&client, &current, spec(&current, target(AUDIENCE))).await;
    apply_probe(&client, &stale, spec(&stale, target("https://old-api.acme.example"))).await;
    // Without the live chain the audience is still checked: it needs no token.
    let mut without_chain = spec(&offline, target("https://old-api.acme.example"));
    without_chain["probe"]["tokenExchange"] = json!(false);
    apply_probe(&client, &offline, without_chain).await;

    let probe = env.wait_verified(&client, &current, 1).await;
    assert_eq!(
        condition_of(&probe, "TokenExchangeVerified"),
        Some(("True".to_string(), "Verified".to_string()))
    );
    let counts = env.fake.counts();
    for api in ["run.services.get", "run.testIamPermissions", "iamcredentials.generateIdToken"] {
        assert!(counts.get(api).copied().unwrap_or_default() >= 1, "{api} never called: {counts:?}");
    }
    for id in [&stale, &offline] {
        let probe = env.wait_ready(&client, id, "False", "AudienceNotAccepted").await;
        let (stage, _, message) = failure(&probe);
        assert_eq!(stage, "Target");
        for needle in [
            url.as_str(),
            AUDIENCE,
            "mint the workload's ID token for one of those",
            &format!(
                "gcloud run services update {service} --region=us-central1 --project=acme-prod --add-custom-audiences=https://old-api.acme.example"
            ),
        ] {
            assert!(message.contains(needle), "{needle} missing: {message}");
        }
    }
    let metrics = env.operator.metrics().await;
    for series in [
        r#"authprobe_google_requests_total{api="run.services.get",outcome="ok"}"#,
        r#"authprobe_google_requests_total{api="iamcredentials.generateIdToken",outcome="ok"}"#,
        r#"authprobe_google_requests_total{api="run.testIamPermissions",outcome="ok"}"#,
    ] {
        assert!(metrics.contains(series), "{series} missing:\n{metrics}");
    }
    assert_no_token_leaked(&env);
}
