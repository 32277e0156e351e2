//! The workload's path at the fake: Cloud Run, generateIdToken and Google's keys, the origin
//! server, and the GKE metadata server. Every test starts its own servers on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use fake_google::{
    Caller, Fake, Signer,
    metadata::{self, Identity, MetadataConfig, Outage, OutageMode},
    origin::{self, OriginConfig, Redirect},
    scenario::{Binding, CloudRunService, Grant, Operator, Pool, Provider, Scenario, ServiceAccount},
    verify_id_token,
};
use jsonwebtoken::jwk::JwkSet;
use reqwest::{Client, StatusCode, header};
use serde_json::{Value, json};

const OPERATOR: &str = "operator-token";
const GSA: &str = "app@acme-prod.iam.gserviceaccount.com";
const OTHER: &str = "other@acme-prod.iam.gserviceaccount.com";
const DISABLED: &str = "off@acme-prod.iam.gserviceaccount.com";
const POOL: &str = "projects/123456789012/locations/global/workloadIdentityPools/onprem";
const ISSUER: &str = "https://issuer.cluster.test";
const SERVICE: &str = "projects/acme-prod/locations/us-central1/services/api";
const OPEN_SERVICE: &str = "projects/acme-prod/locations/europe-west1/services/open";
const AUDIENCE: &str = "https://api.acme.example";

fn loopback() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn client() -> Client {
    Client::builder().no_proxy().build().expect("client")
}

/// A client whose connections come from `ip` (any 127/8 address is loopback on Linux).
fn client_from(ip: [u8; 4]) -> Client {
    Client::builder().no_proxy().local_address(IpAddr::from(ip)).build().expect("client")
}

fn member(ksa: &str) -> String {
    format!("principal://iam.googleapis.com/{POOL}/subject/system:serviceaccount:ns:{ksa}")
}

fn run_resource(name: &str) -> String {
    format!("//run.googleapis.com/{name}")
}

/// A fake whose pool trusts `issuer`; `app` may impersonate GSA, `direct` may invoke `api` itself.
async fn fake(issuer: &Signer) -> Result<fake_google::Running> {
    let bound = |email: &str| ServiceAccount {
        email: email.into(),
        bindings: vec![Binding {
            role: "roles/iam.workloadIdentityUser".into(),
            members: vec![member("app")],
            condition: None,
        }],
        grants: BTreeMap::from([(run_resource(SERVICE), vec!["run.routes.invoke".to_string()])]),
        ..Default::default()
    };
    let api = CloudRunService {
        custom_audiences: vec![AUDIENCE.into()],
        ..CloudRunService::new("acme-prod", "123456789012", "us-central1", "api")
    };
    let open = CloudRunService {
        invoker_iam_disabled: true,
        ingress: "INGRESS_TRAFFIC_INTERNAL_ONLY".into(),
        ..CloudRunService::new("acme-prod", "123456789012", "europe-west1", "open")
    };
    let scenario = Scenario {
        operator: Operator { tokens: vec![OPERATOR.into()], ..Default::default() },
        service_accounts: vec![
            bound(GSA),
            ServiceAccount { disabled: true, ..bound(DISABLED) },
            ServiceAccount { email: OTHER.into(), ..Default::default() },
        ],
        pools: vec![Pool {
            name: POOL.into(),
            providers: vec![Provider {
                id: "k8s".into(),
                issuer_uri: ISSUER.into(),
                jwks_json: issuer.jwks_json(),
                attribute_mapping: BTreeMap::from([("google.subject".into(), "assertion.sub".into())]),
                ..Default::default()
            }],
            ..Default::default()
        }],
        direct_grants: vec![Grant {
            member: member("direct"),
            resource: run_resource(SERVICE),
            permissions: vec!["run.routes.invoke".into()],
        }],
        cloud_run_services: vec![api, open],
        ..Default::default()
    };
    fake_google::start(loopback(), scenario).await
}

/// A federated token for KSA `ns/ksa`, through a real STS exchange of a token `issuer` signed.
async fn federated_token(google: &fake_google::Running, issuer: &Signer, ksa: &str) -> Result<String> {
    let now = jiff::Timestamp::now().as_second();
    let audience = format!("//iam.googleapis.com/{POOL}/providers/k8s");
    let subject = issuer.sign(&json!({
        "iss": ISSUER, "sub": format!("system:serviceaccount:ns:{ksa}"), "aud": [audience],
        "iat": now, "exp": now + 600,
    }))?;
    let response = client()
        .post(format!("{}/v1/token", google.endpoint("sts")))
        .form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("audience", audience.as_str()),
            ("scope", "https://www.googleapis.com/auth/cloud-platform"),
            ("requested_token_type", "urn:ietf:params:oauth:token-type:access_token"),
            ("subject_token", subject.as_str()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ])
        .send()
        .await?;
    ensure!(response.status() == StatusCode::OK, "STS answered {}", response.text().await?);
    let body: Value = response.json().await?;
    body["access_token"].as_str().map(str::to_string).context("no access_token")
}

async fn json_of(response: reqwest::Response) -> Result<(StatusCode, Value)> {
    let status = response.status();
    Ok((status, response.json().await?))
}

#[tokio::test]
async fn cloud_run_services_read_like_google() -> Result<()> {
    let google = fake(&Signer::generate()?).await?;
    let run = google.endpoint("run");
    let http = client();
    let get = |name: &str, token: Option<&str>| {
        let request = http.get(format!("{run}/v2/{name}"));
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
        .send()
    };

    let (status, api) = json_of(get(SERVICE, Some(OPERATOR)).await?).await?;
    assert_eq!(status, StatusCode::OK, "{api}");
    assert_eq!(api["name"], SERVICE);
    let uri = api["uri"].as_str().context("uri")?;
    assert!(uri.starts_with("https://api-") && uri.ends_with("-uc.a.run.app"), "{uri}");
    assert_eq!(api["urls"], json!(["https://api-123456789012.us-central1.run.app", uri]));
    assert_eq!(api["customAudiences"], json!([AUDIENCE]));
    assert_eq!(api["ingress"], "INGRESS_TRAFFIC_ALL");
    assert!(api.get("invokerIamDisabled").is_none(), "proto3 JSON leaves false out: {api}");

    let (status, open) = json_of(get(OPEN_SERVICE, Some(OPERATOR)).await?).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(open["invokerIamDisabled"], true);
    assert_eq!(open["ingress"], "INGRESS_TRAFFIC_INTERNAL_ONLY");
    assert!(open["uri"].as_str().is_some_and(|u| u.ends_with("-ew.a.run.app")), "{open}");
    assert!(open.get("customAudiences").is_none());

    let (status, missing) =
        json_of(get("projects/acme-prod/locations/us-central1/services/gone", Some(OPERATOR)).await?).await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        missing,
        json!({"error": {"code": 404, "status": "NOT_FOUND",
            "message": "Resource 'gone' of kind 'SERVICE' in region 'us-central1' in project 'acme-prod' does not exist."}})
    );

    let (status, body) = json_of(get(SERVICE, None).await?).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["details"][0]["reason"], "CREDENTIALS_MISSING");
    assert_eq!(body["error"]["details"][0]["metadata"]["service"], "run.googleapis.com");
    let (status, body) = json_of(get(SERVICE, Some("someone-else")).await?).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["status"], "UNAUTHENTICATED");

    google.fake.update(|s| s.operator.permissions.retain(|p| p != "run.services.get"));
    let (status, body) = json_of(get(SERVICE, Some(OPERATOR)).await?).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body["error"]["message"],
        format!("Permission 'run.services.get' denied on resource '{SERVICE}' (or resource may not exist).")
    );
    assert_eq!(body["error"]["details"][0]["metadata"]["permission"], "run.services.get");
    assert_eq!(google.fake.counts().get("run.services.get"), Some(&6));
    Ok(())
}

#[tokio::test]
async fn cloud_run_test_iam_permissions_answers_the_held_subset() -> Result<()> {
    let issuer = Signer::generate()?;
    let google = fake(&issuer).await?;
    let run = google.endpoint("run");
    let http = client();
    let test = |name: &str, token: Option<String>| {
        let request = http
            .post(format!("{run}/v2/{name}:testIamPermissions"))
            .json(&json!({"permissions": ["run.routes.invoke", "run.services.delete"]}));
        match token {
            Some(t) => request.bearer_auth(t),
            None => request,
        }
        .send()
    };
    let gsa = google.fake.mint_access_token(GSA, Duration::from_secs(600));
    assert_eq!(
        json_of(test(SERVICE, Some(gsa)).await?).await?,
        (StatusCode::OK, json!({"permissions": ["run.routes.invoke"]}))
    );
    let other = google.fake.mint_access_token(OTHER, Duration::from_secs(600));
    assert_eq!(json_of(test(SERVICE, Some(other)).await?).await?, (StatusCode::OK, json!({})));

    let direct = federated_token(&google, &issuer, "direct").await?;
    assert_eq!(
        json_of(test(SERVICE, Some(direct.clone())).await?).await?,
        (StatusCode::OK, json!({"permissions": ["run.routes.invoke"]}))
    );
    let app = federated_token(&google, &issuer, "app").await?;
    assert_eq!(json_of(test(SERVICE, Some(app)).await?).await?, (StatusCode::OK, json!({})));

    let (status, body) =
        json_of(test("projects/acme-prod/locations/us-central1/services/gone", Some(direct)).await?).await?;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = json_of(test(SERVICE, None).await?).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["details"][0]["reason"], "CREDENTIALS_MISSING");
    let expired = google.fake.mint_access_token(GSA, Duration::ZERO);
    let (status, body) = json_of(test(SERVICE, Some(expired)).await?).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["details"][0]["reason"], "ACCESS_TOKEN_EXPIRED");
    assert_eq!(google.fake.counts().get("run.testIamPermissions"), Some(&7));
    Ok(())
}

async fn generate_id_token(
    google: &fake_google::Running,
    email: &str,
    token: Option<&str>,
    body: Value,
) -> Result<(StatusCode, Value)> {
    let request = client()
        .post(format!(
            "{}/v1/projects/-/serviceAccounts/{email}:generateIdToken",
            google.endpoint("iamcredentials")
        ))
        .json(&body);
    let request = match token {
        Some(t) => request.bearer_auth(t),
        None => request,
    };
    json_of(request.send().await?).await
}

#[tokio::test]
async fn generate_id_token_mints_a_token_that_googles_published_keys_verify() -> Result<()> {
    let issuer = Signer::generate()?;
    let google = fake(&issuer).await?;
    let federated = federated_token(&google, &issuer, "app").await?;
    let before = jiff::Timestamp::now().as_second();
    let (status, body) = generate_id_token(
        &google,
        GSA,
        Some(&federated),
        json!({"audience": AUDIENCE, "includeEmail": true}),
    )
    .await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    let token = body["token"].as_str().context("token")?.to_string();
    assert_eq!(body.as_object().map(|o| o.len()), Some(1), "{body}");

    // The keys as a relying party gets them: over HTTP from www.googleapis.com/oauth2/v3/certs.
    let response = client().get(format!("{}/oauth2/v3/certs", google.endpoint("www"))).send().await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response
            .headers()
            .get(header::CACHE_CONTROL)
            .is_some_and(|v| v.to_str().is_ok_and(|v| v.contains("max-age")))
    );
    let jwks: JwkSet = response.json().await?;
    assert_eq!(jwks.keys.len(), 1);
    let kid = jsonwebtoken::decode_header(&token)?.kid.context("kid")?;
    assert_eq!(jwks.keys[0].common.key_id.as_deref(), Some(kid.as_str()));

    let claims = verify_id_token(&jwks, &token, AUDIENCE).map_err(anyhow::Error::msg)?;
    let unique_id = ServiceAccount { email: GSA.into(), ..Default::default() }.unique_id();
    assert_eq!(claims.iss, "https://accounts.google.com");
    assert_eq!(claims.aud, AUDIENCE);
    assert_eq!((claims.sub.as_str(), claims.azp.as_str()), (unique_id.as_str(), unique_id.as_str()));
    assert_eq!((claims.email.as_deref(), claims.email_verified), (Some(GSA), Some(true)));
    assert_eq!(claims.exp - claims.iat, 3600);
    assert!((before..=before + 60).contains(&claims.iat), "iat {} vs {before}", claims.iat);
    // The in-process fake vouches for the same key.
    assert_eq!(verify_id_token(&google.fake, &token, AUDIENCE), Ok(claims.clone()));

    // The signature really is checked: the same header and signature over other claims fail.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    let mut forged_claims = serde_json::to_value(&claims)?;
    forged_claims["email"] = json!(OTHER);
    parts[1] = base64_url(&forged_claims.to_string());
    let forged = parts.join(".");
    let refused = verify_id_token(&jwks, &forged, AUDIENCE).expect_err("a forged token");
    assert!(refused.contains("signature"), "{refused}");
    let refused = verify_id_token(&jwks, &token, "https://elsewhere.example").expect_err("another audience");
    assert!(refused.contains("audience"), "{refused}");
    assert!(verify_id_token(&Signer::generate()?.jwks(), &token, AUDIENCE).is_err());

    let (status, body) =
        generate_id_token(&google, GSA, Some(&federated), json!({"audience": AUDIENCE})).await?;
    assert_eq!(status, StatusCode::OK);
    let bare = verify_id_token(&jwks, body["token"].as_str().context("token")?, AUDIENCE)
        .map_err(anyhow::Error::msg)?;
    assert_eq!((bare.email, bare.email_verified), (None, None));

    assert!(google.fake.credentials_seen().contains(&token), "minted ID tokens are recorded");

    // The same for a test in another process, through the admin API.
    let admin = format!("http://{}/admin/serviceAccounts/{GSA}", google.addr);
    let (status, body) =
        json_of(client().post(format!("{admin}/idToken")).json(&json!({"audience": AUDIENCE})).send().await?)
            .await?;
    assert_eq!(status, StatusCode::OK);
    verify_id_token(&jwks, body["token"].as_str().context("token")?, AUDIENCE).map_err(anyhow::Error::msg)?;
    let (status, body) = json_of(
        client().post(format!("{admin}/accessToken")).json(&json!({"lifetimeSeconds": 60})).send().await?,
    )
    .await?;
    assert_eq!(status, StatusCode::OK);
    let access = body["accessToken"].as_str().context("accessToken")?;
    assert_eq!(google.fake.access_token_caller(access), Some(Caller::ServiceAccount { email: GSA.into() }));
    assert_eq!(google.fake.counts().get("iamcredentials.generateIdToken"), Some(&2));
    Ok(())
}

fn base64_url(text: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
}

#[tokio::test]
async fn generate_id_token_is_authorized_like_generate_access_token() -> Result<()> {
    let issuer = Signer::generate()?;
    let google = fake(&issuer).await?;
    let stranger = federated_token(&google, &issuer, "stranger").await?;
    let request = json!({"audience": AUDIENCE, "includeEmail": true});
    let denied = json!({"error": {
        "code": 403,
        "message": "Permission 'iam.serviceAccounts.getOpenIdToken' denied on resource (or it may not exist).",
        "status": "PERMISSION_DENIED",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "IAM_PERMISSION_DENIED",
            "domain": "iam.googleapis.com", "metadata": {"permission": "iam.serviceAccounts.getOpenIdToken"}}],
    }});
    assert_eq!(
        generate_id_token(&google, GSA, Some(&stranger), request.clone()).await?,
        (StatusCode::FORBIDDEN, denied.clone())
    );
    let app = federated_token(&google, &issuer, "app").await?;
    assert_eq!(
        generate_id_token(&google, "gone@acme-prod.iam.gserviceaccount.com", Some(&app), request.clone())
            .await?,
        (StatusCode::FORBIDDEN, denied.clone())
    );
    let (status, body) = generate_id_token(&google, DISABLED, Some(&app), request.clone()).await?;
    assert_eq!((status, &body["error"]["status"]), (StatusCode::BAD_REQUEST, &json!("FAILED_PRECONDITION")));
    let (status, body) = generate_id_token(&google, GSA, None, request.clone()).await?;
    assert_eq!(
        (status, &body["error"]["details"][0]["reason"]),
        (StatusCode::UNAUTHORIZED, &json!("CREDENTIALS_MISSING"))
    );
    let (status, body) = generate_id_token(&google, GSA, Some(&app), json!({"includeEmail": true})).await?;
    assert_eq!((status, &body["error"]["status"]), (StatusCode::BAD_REQUEST, &json!("INVALID_ARGUMENT")));

    // A service account's token needs a binding on the target as `serviceAccount:CALLER`.
    let other = google.fake.mint_access_token(OTHER, Duration::from_secs(600));
    assert_eq!(
        generate_id_token(&google, GSA, Some(&other), request.clone()).await?,
        (StatusCode::FORBIDDEN, denied)
    );
    google.fake.update(|s| {
        if let Some(sa) = s.service_accounts.iter_mut().find(|sa| sa.email == GSA) {
            sa.bindings.push(Binding {
                role: "roles/iam.serviceAccountOpenIdTokenCreator".into(),
                members: vec![format!("serviceAccount:{OTHER}")],
                condition: None,
            });
        }
    });
    let (status, body) = generate_id_token(&google, GSA, Some(&other), request).await?;
    assert_eq!(status, StatusCode::OK, "{body}");
    // That role holds getOpenIdToken, not getAccessToken.
    let response = client()
        .post(format!(
            "{}/v1/projects/-/serviceAccounts/{GSA}:generateAccessToken",
            google.endpoint("iamcredentials")
        ))
        .bearer_auth(&other)
        .json(&json!({"scope": ["https://www.googleapis.com/auth/cloud-platform"]}))
        .send()
        .await?;
    let (status, body) = json_of(response).await?;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["error"]["details"][0]["metadata"]["permission"], "iam.serviceAccounts.getAccessToken");
    Ok(())
}

fn www_authenticate(response: &reqwest::Response) -> String {
    response
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn origin_takes_id_tokens_for_its_audience_and_records_the_header() -> Result<()> {
    let issuer = Signer::generate()?;
    let google = fake(&issuer).await?;
    let site = origin::start(loopback(), OriginConfig::id_token(google.fake.clone(), "")).await?;
    let http = Client::builder().no_proxy().redirect(reqwest::redirect::Policy::none()).build()?;
    let url = format!("{}/hello", site.url());

    let response = http.get(&url).send().await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(www_authenticate(&response), "Bearer realm=\"origin\"");

    let elsewhere = google.fake.mint_id_token(GSA, "https://elsewhere.example", true)?;
    let response = http.get(&url).bearer_auth(&elsewhere).send().await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let challenge = www_authenticate(&response);
    assert!(challenge.starts_with("Bearer realm=\"origin\", error=\"invalid_token\""), "{challenge}");
    assert!(challenge.contains("audience"), "{challenge}");

    let access = google.fake.mint_access_token(GSA, Duration::from_secs(600));
    let response = http.get(&url).bearer_auth(&access).send().await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "an access token is not an ID token");

    // The audience defaults to the origin's own URL, as authprobe's endpoint audience does.
    let good = google.fake.mint_id_token(GSA, &site.url(), true)?;
    let (status, body) = json_of(http.get(&url).bearer_auth(&good).send().await?).await?;
    assert_eq!((status, body), (StatusCode::OK, json!({"principal": GSA, "tokenType": "IdToken"})));
    let response = http.get(&url).basic_auth("user", Some("pass")).send().await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    site.update(|c| c.allowed = Some(vec![OTHER.into()]));
    let response = http.get(&url).bearer_auth(&good).send().await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(response.text().await?, "RBAC: access denied");

    site.update(|c| {
        c.redirects.push(Redirect {
            path: "/moved".into(),
            status: 307,
            location: "http://other-host.test:8080/moved".into(),
        })
    });
    let response = http.get(format!("{}/moved", site.url())).bearer_auth(&good).send().await?;
    assert_eq!(response.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(
        response.headers().get(header::LOCATION).and_then(|v| v.to_str().ok()),
        Some("http://other-host.test:8080/moved")
    );

    let requests = site.requests();
    let seen: Vec<(bool, u16, &str)> =
        requests.iter().map(|s| (s.authorization, s.status, s.path.as_str())).collect();
    assert_eq!(
        seen,
        vec![
            (false, 401, "/hello"),
            (true, 401, "/hello"),
            (true, 401, "/hello"),
            (true, 200, "/hello"),
            (true, 401, "/hello"),
            (true, 403, "/hello"),
            (true, 307, "/moved"),
        ]
    );
    assert!(requests.iter().all(|s| s.method == "GET"));
    assert_eq!(site.count(), 7);
    Ok(())
}

#[tokio::test]
async fn origin_takes_access_tokens_the_fake_issued_and_still_honours() -> Result<()> {
    let issuer = Signer::generate()?;
    let google = fake(&issuer).await?;
    let site = origin::start(loopback(), OriginConfig::access_token(google.fake.clone())).await?;
    let http = client();
    let call = |token: String| http.get(site.url()).bearer_auth(token).send();

    let gsa = google.fake.mint_access_token(GSA, Duration::from_secs(600));
    let (status, body) = json_of(call(gsa).await?).await?;
    assert_eq!((status, body), (StatusCode::OK, json!({"principal": GSA, "tokenType": "AccessToken"})));

    let federated = federated_token(&google, &issuer, "direct").await?;
    let (status, body) = json_of(call(federated.clone()).await?).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["principal"], member("direct"));

    for refused in [
        google.fake.mint_id_token(GSA, &site.url(), true)?,
        "ya29.not-one-google-issued".to_string(),
        google.fake.mint_access_token(GSA, Duration::ZERO),
    ] {
        let response = call(refused).await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(www_authenticate(&response).contains("error=\"invalid_token\""));
    }

    // Disabling the pool revokes its federated tokens (google-wif.md §1.6).
    google.fake.update(|s| s.pools.iter_mut().for_each(|p| p.disabled = true));
    assert_eq!(call(federated.clone()).await?.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(google.fake.access_token_caller(&federated), None);
    assert!(site.requests().iter().all(|s| s.authorization));
    assert_eq!(site.count(), 6);
    Ok(())
}

async fn metadata_get(http: &Client, url: String) -> reqwest::Result<reqwest::Response> {
    http.get(url).header("Metadata-Flavor", "Google").send().await
}

#[tokio::test]
async fn metadata_server_demands_its_flavor_and_hands_out_the_pods_identity() -> Result<()> {
    let issuer = Signer::generate()?;
    let google = fake(&issuer).await?;
    let pod_b = IpAddr::from([127, 0, 0, 2]);
    let config = MetadataConfig {
        numeric_project_id: "123456789012".into(),
        clients: BTreeMap::from([(
            pod_b,
            Identity::Federated { namespace: "ns".into(), name: "plain".into() },
        )]),
        ..MetadataConfig::new(google.fake.clone(), "acme-prod", Identity::ServiceAccount(GSA.into()))
    };
    let md = metadata::start(loopback(), config).await?;
    let http = client();
    let v1 = format!("{}/computeMetadata/v1", md.url());
    let sa = format!("{v1}/instance/service-accounts/default");

    let response = http.get(format!("{}/", md.url())).send().await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert!(response.headers().get("metadata-flavor").is_none());
    assert_eq!(response.text().await?, "Missing required header \"Metadata-Flavor\": \"Google\"\n");
    let response = http.get(format!("{sa}/token")).header("Metadata-Flavor", "google-ish").send().await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    let response = metadata_get(&http, format!("{}/", md.url())).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers().get("metadata-flavor").and_then(|v| v.to_str().ok()), Some("Google"));
    assert_eq!(response.text().await?, "computeMetadata/\n");
    assert_eq!(metadata_get(&http, format!("{v1}/")).await?.status(), StatusCode::OK);
    assert_eq!(metadata_get(&http, format!("{v1}/project/project-id")).await?.text().await?, "acme-prod");
    assert_eq!(
        metadata_get(&http, format!("{v1}/project/numeric-project-id")).await?.text().await?,
        "123456789012"
    );
    assert_eq!(metadata_get(&http, format!("{sa}/email")).await?.text().await?, GSA);
    let (_, info) = json_of(metadata_get(&http, format!("{sa}/?recursive=true")).await?).await?;
    assert_eq!(info["email"], GSA);

    let (status, token) = json_of(metadata_get(&http, format!("{sa}/token")).await?).await?;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(token["token_type"], "Bearer");
    assert!(token["expires_in"].as_u64().is_some_and(|e| (3000..3600).contains(&e)), "{token}");
    let access = token["access_token"].as_str().context("access_token")?.to_string();
    assert_eq!(google.fake.access_token_caller(&access), Some(Caller::ServiceAccount { email: GSA.into() }));
    // Valid at the fake's APIs as the GSA.
    let response = http
        .post(format!("{}/v2/{SERVICE}:testIamPermissions", google.endpoint("run")))
        .bearer_auth(&access)
        .json(&json!({"permissions": ["run.routes.invoke"]}))
        .send()
        .await?;
    assert_eq!(json_of(response).await?, (StatusCode::OK, json!({"permissions": ["run.routes.invoke"]})));
    let (_, again) = json_of(metadata_get(&http, format!("{sa}/token")).await?).await?;
    assert_eq!(again["access_token"], access.as_str(), "a live token is handed out again");

    let response = metadata_get(&http, format!("{sa}/identity?audience={AUDIENCE}&format=full")).await?;
    assert_eq!(response.status(), StatusCode::OK);
    let id = response.text().await?;
    let claims = verify_id_token(&google.fake, &id, AUDIENCE).map_err(anyhow::Error::msg)?;
    assert_eq!(claims.email.as_deref(), Some(GSA));
    assert!(google.fake.credentials_seen().contains(&id));
    let response = metadata_get(&http, format!("{sa}/identity")).await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(response.text().await?, "non-empty audience parameter required\n");
    assert_eq!(
        metadata_get(&http, format!("{v1}/instance/service-accounts/{OTHER}/email")).await?.status(),
        StatusCode::NOT_FOUND
    );
    let local = IpAddr::from([127, 0, 0, 1]);
    assert_eq!(md.requests_from(local), 13);

    // Another pod, whose KSA has no annotation: a federated token and no ID token.
    let pod = client_from([127, 0, 0, 2]);
    assert_eq!(metadata_get(&pod, format!("{sa}/email")).await?.text().await?, "acme-prod.svc.id.goog");
    let response = metadata_get(&pod, format!("{sa}/identity?audience={AUDIENCE}")).await?;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(response.text().await?.contains("(ns/plain) is not annotated"));
    let (_, token) = json_of(metadata_get(&pod, format!("{sa}/token")).await?).await?;
    let federated = token["access_token"].as_str().context("access_token")?;
    match google.fake.access_token_caller(federated) {
        Some(Caller::Federated { members }) => {
            assert!(
                members.contains(&"serviceAccount:acme-prod.svc.id.goog[ns/plain]".to_string()),
                "{members:?}"
            )
        }
        other => panic!("a federated token, not {other:?}"),
    }
    assert_eq!(md.requests_by_client(), BTreeMap::from([(local, 13), (pod_b, 3)]));
    Ok(())
}

#[tokio::test]
async fn metadata_server_holds_each_new_pod_through_its_cold_start() -> Result<()> {
    let google = fake(&Signer::generate()?).await?;
    let delay = Duration::from_millis(1500);
    let config = MetadataConfig {
        cold_start: delay,
        ..MetadataConfig::new(google.fake.clone(), "acme-prod", Identity::ServiceAccount(GSA.into()))
    };
    let md = metadata::start(loopback(), config).await?;
    let email = format!("{}/computeMetadata/v1/instance/service-accounts/default/email", md.url());
    let timed = |http: Client| {
        let email = email.clone();
        async move {
            let started = Instant::now();
            let response = metadata_get(&http, email).await?;
            anyhow::Ok((response.status(), started.elapsed()))
        }
    };

    // Two new pods at once: each waits out its own cold start; then each is fast.
    let (a, b) = (client_from([127, 0, 0, 2]), client_from([127, 0, 0, 3]));
    let (first_a, first_b) = tokio::join!(timed(a.clone()), timed(b.clone()));
    for (status, elapsed) in [first_a?, first_b?] {
        assert_eq!(status, StatusCode::OK);
        assert!(elapsed >= delay, "a new client waited only {elapsed:?}");
    }
    let (status, elapsed) = timed(a).await?;
    assert_eq!(status, StatusCode::OK);
    assert!(elapsed < Duration::from_secs(1), "the second request took {elapsed:?}");

    // A client that gives up first (google-auth's detection timeout) sees no answer.
    let impatient = Client::builder()
        .no_proxy()
        .local_address(IpAddr::from([127, 0, 0, 4]))
        .timeout(Duration::from_millis(300))
        .build()?;
    let error = metadata_get(&impatient, email.clone()).await.expect_err("held past the client's timeout");
    assert!(error.is_timeout(), "{error:?}");
    assert_eq!(md.requests_from(IpAddr::from([127, 0, 0, 4])), 1);

    // A held request is let through as soon as the cold start is shortened.
    md.update(|c| c.cold_start = Duration::from_secs(120));
    let held = tokio::spawn(timed(client_from([127, 0, 0, 5])));
    let pod = IpAddr::from([127, 0, 0, 5]);
    for _ in 0..1000 {
        if md.requests_from(pod) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(md.requests_from(pod), 1, "the request arrived");
    md.update(|c| c.cold_start = Duration::ZERO);
    let (status, elapsed) = tokio::time::timeout(Duration::from_secs(30), held).await???;
    assert_eq!(status, StatusCode::OK);
    assert!(elapsed < Duration::from_secs(30), "{elapsed:?}");
    Ok(())
}

#[tokio::test]
async fn metadata_server_outages_hang_reset_or_refuse() -> Result<()> {
    let google = fake(&Signer::generate()?).await?;
    let config = MetadataConfig::new(google.fake.clone(), "acme-prod", Identity::ServiceAccount(GSA.into()));
    let md = metadata::start(loopback(), config).await?;
    let http = client();
    let token = format!("{}/computeMetadata/v1/instance/service-accounts/default/token", md.url());
    assert_eq!(metadata_get(&http, token.clone()).await?.status(), StatusCode::OK);

    md.update(|c| c.outages = vec![Outage::now_for(Duration::from_secs(600), OutageMode::Unavailable)]);
    let started = Instant::now();
    assert_eq!(metadata_get(&http, token.clone()).await?.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(started.elapsed() < Duration::from_secs(5));

    // The kept-alive connection and new ones alike are reset.
    md.update(|c| c.outages = vec![Outage::now_for(Duration::from_secs(600), OutageMode::Reset)]);
    let error = metadata_get(&http, token.clone()).await.expect_err("reset");
    assert!(!error.is_timeout(), "{error:?}");
    assert!(metadata_get(&client(), token.clone()).await.is_err());

    md.update(|c| c.outages.clear());
    assert_eq!(metadata_get(&http, token.clone()).await?.status(), StatusCode::OK);

    let outage = Outage::now_for(Duration::from_millis(800), OutageMode::Hang);
    md.update(|c| c.outages = vec![outage]);
    let response = metadata_get(&http, token.clone()).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(Instant::now() >= outage.end, "answered before the outage ended");
    // Reset connections never deliver a request, so only four were counted.
    assert_eq!(md.requests_from(IpAddr::from([127, 0, 0, 1])), 4);
    Ok(())
}

/// The public pieces compose: a GSA token from the metadata server reaches an access-token
/// origin, and its ID token an ID-token origin.
#[tokio::test]
async fn a_pod_reaches_origins_with_metadata_server_tokens() -> Result<()> {
    let google = fake(&Signer::generate()?).await?;
    let fake: Arc<Fake> = google.fake.clone();
    let md = metadata::start(
        loopback(),
        MetadataConfig::new(fake.clone(), "acme-prod", Identity::ServiceAccount(GSA.into())),
    )
    .await?;
    let by_id = origin::start(loopback(), OriginConfig::id_token(fake.clone(), AUDIENCE)).await?;
    let by_access = origin::start(loopback(), OriginConfig::access_token(fake)).await?;
    let http = client();
    let sa = format!("{}/computeMetadata/v1/instance/service-accounts/default", md.url());
    let id = metadata_get(&http, format!("{sa}/identity?audience={AUDIENCE}")).await?.text().await?;
    let (_, token) = json_of(metadata_get(&http, format!("{sa}/token")).await?).await?;
    let access = token["access_token"].as_str().context("access_token")?;
    assert_eq!(http.get(by_id.url()).bearer_auth(&id).send().await?.status(), StatusCode::OK);
    assert_eq!(http.get(by_access.url()).bearer_auth(access).send().await?.status(), StatusCode::OK);
    assert_eq!(http.get(by_id.url()).bearer_auth(access).send().await?.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(http.get(by_access.url()).bearer_auth(&id).send().await?.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}
