//! The workload's path at the fake: Cloud Run, generateIdToken and Google's keys, and the origin
//! server. Every test starts its own servers on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, ensure};
use fake_google::{
    Caller, Signer,
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
