//! The Helm chart lints, and what it renders is accepted by the real API server (server-side dry run).

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use authprobe_harness::{ControlPlane, repo_root, tools_bin};

fn chart() -> PathBuf {
    repo_root().join("charts/authprobe")
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let cp = ControlPlane::shared();
    let mut child = Command::new(tools_bin().join(program))
        .args(args)
        .env("KUBECONFIG", cp.kubeconfig_path())
        .env("HELM_CACHE_HOME", cp.dir().join("helm-cache"))
        .env("HELM_CONFIG_HOME", cp.dir().join("helm-config"))
        .env("HELM_DATA_HOME", cp.dir().join("helm-data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{program} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn chart_lints_strictly() -> Result<()> {
    let chart = chart();
    let out = run("helm", &["lint", "--strict", chart.to_str().context("utf-8 path")?], None)?;
    assert!(out.contains("0 chart(s) failed"), "{out}");
    Ok(())
}

#[test]
fn values_outside_the_schema_are_refused() -> Result<()> {
    let chart = chart();
    let chart = chart.to_str().context("utf-8 path")?;
    let refused = run(
        "helm",
        &["template", "t", chart, "--kube-version", "v1.36.3", "--set", "logging.format=xml"],
        None,
    );
    assert!(refused.is_err_and(|e| e.to_string().contains("value must be one of 'json', 'compact'")));
    let refused =
        run("helm", &["template", "t", chart, "--kube-version", "v1.36.3", "--set", "replicas=2"], None);
    assert!(
        refused.is_err_and(|e| { e.to_string().contains("additional properties 'replicas' not allowed") })
    );
    Ok(())
}

/// Renders the chart with `sets` and applies it with `kubectl apply --dry-run=server`.
fn dry_run(namespace: &str, sets: &[&str]) -> Result<String> {
    let chart = chart();
    let mut args =
        vec!["template", "authprobe", chart.to_str().context("utf-8 path")?, "--namespace", namespace];
    args.extend(["--kube-version", "v1.36.3"]);
    for set in sets {
        args.extend(["--set", set]);
    }
    let manifests = run("helm", &args, None)?;
    run("kubectl", &["apply", "--dry-run=server", "-f", "-"], Some(&manifests))
}

#[tokio::test]
async fn rendered_chart_is_accepted_by_the_api_server() -> Result<()> {
    let cp = ControlPlane::shared();
    let client = cp.client().await?;
    let release_ns = cp.namespace(&client, "authprobe-system", &[]).await?;
    let applied = tokio::task::spawn_blocking(move || dry_run(&release_ns, &[])).await??;
    for kind in [
        "customresourcedefinition.apiextensions.k8s.io/authprobes.authprobe.io",
        "serviceaccount/authprobe",
        "clusterrole.rbac.authorization.k8s.io/authprobe ",
        "role.rbac.authorization.k8s.io/authprobe-leader-election",
        "deployment.apps/authprobe",
    ] {
        assert!(applied.contains(kind), "{kind} missing from:\n{applied}");
    }
    assert!(!applied.contains("token-request"), "token minting must be off by default:\n{applied}");
    Ok(())
}

#[tokio::test]
async fn token_minting_can_be_granted_per_namespace() -> Result<()> {
    let cp = ControlPlane::shared();
    let client = cp.client().await?;
    let release_ns = cp.namespace(&client, "authprobe-system", &[]).await?;
    let team_a = cp.namespace(&client, "team-a", &[]).await?;
    let team_b = cp.namespace(&client, "team-b", &[]).await?;
    let namespaces = format!("tokenExchange.namespaces={{{team_a},{team_b}}}");
    let applied = tokio::task::spawn_blocking(move || {
        dry_run(
            &release_ns,
            &["tokenExchange.enabled=true", &namespaces, "tokenExchange.serviceAccountNames={app}"],
        )
    })
    .await??;
    assert_eq!(
        applied.matches("role.rbac.authorization.k8s.io/authprobe-token-request").count(),
        2,
        "{applied}"
    );
    assert!(!applied.contains("clusterrole.rbac.authorization.k8s.io/authprobe-token-request"), "{applied}");
    Ok(())
}
