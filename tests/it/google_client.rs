//! The Google client against a real HTTP server (the fake, with injected faults): what is retried,
//! how long it waits, when it gives up, and how much of an answer it reads.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use authprobe::{
    google::{
        client::{Api, Auth, Body, GoogleClient, MAX_BODY_BYTES, RetryPolicy, SendError},
        credentials::OperatorCredentials,
        endpoints::Endpoints,
    },
    metrics::Metrics,
};
use fake_google::scenario::{Faults, Scenario, ServiceAccount};
use reqwest::Method;

const GSA: &str = "payments@acme-prod.iam.gserviceaccount.com";

/// A token file that disappears with the returned directory.
fn token_file() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "operator").unwrap();
    (dir, path)
}

async fn setup(
    faults: Faults,
    retry: RetryPolicy,
) -> (fake_google::Running, GoogleClient, Endpoints, Arc<Metrics>, tempfile::TempDir) {
    let scenario = Scenario {
        service_accounts: vec![ServiceAccount { email: GSA.into(), ..Default::default() }],
        faults,
        ..Default::default()
    };
    let fake = fake_google::start(SocketAddr::from(([127, 0, 0, 1], 0)), scenario).await.unwrap();
    let (dir, token) = token_file();
    let metrics = Arc::new(Metrics::new());
    let client =
        GoogleClient::new(Arc::new(OperatorCredentials::file(token)), retry, metrics.clone()).unwrap();
    let endpoints = Endpoints::new(&Endpoints::parse_list(&fake.endpoints()).unwrap());
    (fake, client, endpoints, metrics, dir)
}

fn fast(deadline: Duration) -> RetryPolicy {
    RetryPolicy {
        base: Duration::from_millis(20),
        cap: Duration::from_millis(100),
        deadline,
        attempt_timeout: Duration::from_secs(5),
    }
}

async fn get_sa(
    client: &GoogleClient,
    endpoints: &Endpoints,
) -> Result<authprobe::google::client::Answer, SendError> {
    let url = endpoints.url("iam", &format!("/v1/projects/acme-prod/serviceAccounts/{GSA}")).unwrap();
    client.send(Api::GetServiceAccount, Method::GET, url, &Body::Empty, Auth::Operator).await
}

#[tokio::test]
async fn server_errors_are_retried_until_an_answer() {
    let (fake, client, endpoints, metrics, _dir) =
        setup(Faults { error_rate: 0.5, ..Default::default() }, fast(Duration::from_secs(30))).await;
    for _ in 0..10 {
        let answer = get_sa(&client, &endpoints).await.unwrap();
        assert_eq!(answer.status, 200);
    }
    let attempts = fake.fake.counts()["iam.serviceAccounts.get"];
    assert!(attempts > 10, "with half the answers 503, some calls needed retries ({attempts} attempts)");
    assert!(
        metrics
            .encode()
            .unwrap()
            .contains(r#"authprobe_google_requests_total{api="iam.serviceAccounts.get",outcome="ok"} 10"#)
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (fake, client, endpoints, _, _dir) = setup(
        Faults { throttle_rate: 1.0, retry_after_seconds: 1, ..Default::default() },
        fast(Duration::from_millis(2500)),
    )
    .await;
    let started = Instant::now();
    let answer = get_sa(&client, &endpoints).await.unwrap();
    assert_eq!(answer.status, 429, "still throttled when the deadline leaves no room for another wait");
    let attempts = fake.fake.counts()["iam.serviceAccounts.get"];
    // Waits of 1 s (not the 20-100 ms backoff) between attempts: 3 attempts fit in 2.5 s.
    assert!((2..=3).contains(&attempts), "{attempts} attempts");
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let (fake, client, endpoints, metrics, _dir) =
        setup(Faults::default(), fast(Duration::from_secs(10))).await;
    let url = endpoints
        .url("iam", "/v1/projects/acme-prod/serviceAccounts/nobody@acme-prod.iam.gserviceaccount.com")
        .unwrap();
    let answer =
        client.send(Api::GetServiceAccount, Method::GET, url, &Body::Empty, Auth::Operator).await.unwrap();
    assert_eq!(answer.status, 404);
    fake.fake.update(|s| s.operator.tokens = vec!["someone-else".into()]);
    assert_eq!(get_sa(&client, &endpoints).await.unwrap().status, 401);
    assert_eq!(fake.fake.counts()["iam.serviceAccounts.get"], 2, "one attempt each");
    assert!(metrics.encode().unwrap().contains(r#"outcome="client_error"} 2"#));
}

#[tokio::test]
async fn a_sustained_outage_gives_up_at_the_deadline() {
    let (_fake, client, endpoints, metrics, _dir) =
        setup(Faults { error_rate: 1.0, ..Default::default() }, fast(Duration::from_secs(1))).await;
    let started = Instant::now();
    let answer = get_sa(&client, &endpoints).await.unwrap();
    assert_eq!(answer.status, 503);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    assert!(metrics.encode().unwrap().contains(r#"outcome="server_error"} 1"#));
}

#[tokio::test]
async fn a_dead_endpoint_is_a_transport_error_after_the_deadline() {
    let port = authprobe_harness::free_port().unwrap();
    let endpoints = Endpoints::new(&[format!("iam=http://127.0.0.1:{port}/iam").parse().unwrap()]);
    let (_dir, token) = token_file();
    let client = GoogleClient::new(
        Arc::new(OperatorCredentials::file(token)),
        fast(Duration::from_millis(500)),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let result = get_sa(&client, &endpoints).await;
    assert!(matches!(result, Err(SendError::Transport { .. })), "{result:?}");
}

#[tokio::test]
async fn oversized_answers_are_refused_unread() {
    // A server that streams far more than the bound without announcing a length.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = [0u8; 4096];
        let _ = socket.read(&mut buf).await;
        let _ = socket
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await;
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, "x".repeat(64 * 1024));
        for _ in 0..(4 * MAX_BODY_BYTES / (64 * 1024)) {
            if socket.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
    });
    let (_dir, token) = token_file();
    let client = GoogleClient::new(
        Arc::new(OperatorCredentials::file(token)),
        fast(Duration::from_secs(5)),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let endpoints = Endpoints::new(&[format!("iam=http://{addr}/iam").parse().unwrap()]);
    let result = get_sa(&client, &endpoints).await;
    assert!(matches!(result, Err(SendError::TooLarge { .. })), "{result:?}");
}
