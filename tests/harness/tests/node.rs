//! The node is real: on a Ready node, in the run's own namespaces, a Job runs the product's static
//! binary to completion, a Pod reads its projected ServiceAccount token and reports it through its
//! termination message, and a Pod reaches an HTTP server this test process runs on the node's
//! address. (Cleanup is checked from outside, by `node_cleanup.rs`.)
//!
//! Needs root, `make tools` (which also installs containerd, runc and the CNI plugins) and
//! `make static`.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use authprobe_harness::node::{self, Node, PODUTIL_IMAGE};
use base64::Engine as _;
use k8s_openapi::api::{batch::v1::Job, core::v1::Pod};
use kube::{
    Api, Client,
    api::{ListParams, LogParams, PostParams},
    runtime::wait::{await_condition, conditions},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const POD_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_run_on_a_real_node() -> Result<()> {
    let node = Node::shared(); // re-executes this binary inside the node's namespaces
    assert!(node::inside());
    eprintln!("node Ready after {:.1}s", node.startup_time().as_secs_f64());
    let client = node.client().await?;
    let ns = node.namespace(&client, "pods", &[]).await?;

    // A server of the test process, on the node's address, that remembers who called.
    let listener = tokio::net::TcpListener::bind((node.ip(), 0)).await?;
    let port = listener.local_addr()?.port();
    let (callers_tx, mut callers) = tokio::sync::mpsc::unbounded_channel::<SocketAddr>();
    tokio::spawn(async move {
        while let Ok((mut stream, peer)) = listener.accept().await {
            let _ = callers_tx.send(peer);
            tokio::spawn(async move {
                let mut request = [0u8; 1024];
                let _ = stream.read(&mut request).await;
                let body = "hello from the test process";
                let response = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
            });
        }
    });

    let t = std::time::Instant::now();
    let authprobe = node::authprobe_static_binary();
    if !authprobe.is_file() {
        bail!("{} is missing: run `make static`", authprobe.display());
    }
    let image = node.import_image(&authprobe, "authprobe:dev")?;
    assert_eq!(image, "docker.io/library/authprobe:dev");
    eprintln!("authprobe:dev imported in {:.1}s", t.elapsed().as_secs_f64());

    // 1. A Job runs the product's binary to completion; its log comes through the kubelet.
    let t = std::time::Instant::now();
    let jobs = Api::<Job>::namespaced(client.clone(), &ns);
    let job: Job = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "version"},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "authprobe", "image": "authprobe:dev", "imagePullPolicy": "Never",
                                "args": ["--version"]}],
            }},
        },
    }))?;
    jobs.create(&PostParams::default(), &job).await?;
    tokio::time::timeout(
        POD_TIMEOUT,
        await_condition(jobs.clone(), "version", conditions::is_job_completed()),
    )
    .await
    .context("the Job did not complete")??;
    let job = jobs.get("version").await?;
    assert_eq!(job.status.and_then(|s| s.succeeded), Some(1));
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let job_pod = pods.list(&ListParams::default().labels("job-name=version")).await?;
    let job_pod = job_pod.items.first().and_then(|p| p.metadata.name.clone()).context("no pod of the Job")?;
    let log = pods.logs(&job_pod, &LogParams::default()).await?;
    assert!(log.starts_with("authprobe "), "unexpected `authprobe --version` output: {log:?}");
    eprintln!("Job completed in {:.1}s: {}", t.elapsed().as_secs_f64(), log.trim());

    // 2. A projected ServiceAccount token is mounted, and reported through the termination message.
    let t = std::time::Instant::now();
    run_pod(
        &client,
        &ns,
        serde_json::json!({
            "metadata": {"name": "token"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "read", "image": PODUTIL_IMAGE, "imagePullPolicy": "Never",
                                "args": ["cat", "/var/run/secrets/tokens/token"],
                                "volumeMounts": [{"name": "token", "mountPath": "/var/run/secrets/tokens"}]}],
                "volumes": [{"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                    "audience": "authprobe-test", "expirationSeconds": 600, "path": "token"}}]}}],
            },
        }),
    )
    .await
    .and_then(|message| {
        let claims = jwt_claims(&message)?;
        assert_eq!(claims["iss"], node.issuer(), "{claims}");
        assert_eq!(claims["aud"], serde_json::json!(["authprobe-test"]), "{claims}");
        assert_eq!(claims["sub"], format!("system:serviceaccount:{ns}:default"), "{claims}");
        assert_eq!(claims["kubernetes.io"]["node"]["name"], node::NODE_NAME, "{claims}");
        Ok(())
    })?;
    eprintln!("token pod finished in {:.1}s", t.elapsed().as_secs_f64());

    // 3. A pod on the pod network reaches the test process's server on the node's address.
    let t = std::time::Instant::now();
    let url = format!("http://{}:{port}/hello", node.ip());
    let message = run_pod(
        &client,
        &ns,
        serde_json::json!({
            "metadata": {"name": "reach"},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "containers": [{"name": "get", "image": PODUTIL_IMAGE, "imagePullPolicy": "Never", "args": ["get", url]}],
            },
        }),
    )
    .await?;
    assert_eq!(message, "200 hello from the test process");
    let caller = callers.try_recv().context("the server saw no caller")?;
    let pod_ip = pods.get("reach").await?.status.and_then(|s| s.pod_ip).context("no pod IP")?;
    assert_eq!(caller.ip().to_string(), pod_ip, "the request came from the pod's own address");
    assert!(pod_ip.starts_with("10.88."), "pod IP {pod_ip} is on the pods' bridge");
    eprintln!("reach pod finished in {:.1}s", t.elapsed().as_secs_f64());
    Ok(())
}

/// Creates a pod, waits for it to succeed and returns its termination message.
async fn run_pod(client: &Client, ns: &str, pod: serde_json::Value) -> Result<String> {
    let pod: Pod = serde_json::from_value(pod)?;
    let name = pod.metadata.name.clone().context("pod without a name")?;
    Api::<Pod>::namespaced(client.clone(), ns).create(&PostParams::default(), &pod).await?;
    let pod = node::wait_pod_finished(client, ns, &name, POD_TIMEOUT).await?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.clone());
    let message = node::termination_message(&pod).unwrap_or_default();
    if phase.as_deref() != Some("Succeeded") {
        bail!("pod {name} ended {phase:?}: {message}");
    }
    Ok(message)
}

fn jwt_claims(token: &str) -> Result<serde_json::Value> {
    let payload = token.trim().split('.').nth(1).with_context(|| format!("not a JWT: {token:?}"))?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload)?;
    Ok(serde_json::from_slice(&json)?)
}
