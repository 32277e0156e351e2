//! What the chart renders for availability and least privilege: a PodDisruptionBudget only with
//! more than one replica, spreading over nodes, no two unelected replicas, the Lease named after
//! the release and RBAC narrowed to it (checked against the real API server, which authorizes a
//! list or watch by `metadata.name` field selector against resourceNames), the ServiceMonitor and
//! PrometheusRule only where their CRDs are served.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use authprobe_harness::{ControlPlane, repo_root, tools_bin};
use serde_json::{Value, json};

const KUBE_VERSION: &str = "v1.36.3";
const MONITORING_CRDS: [&str; 4] = [
    "--api-versions",
    "monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions",
    "monitoring.coreos.com/v1/PrometheusRule",
];

fn chart() -> PathBuf {
    repo_root().join("charts/authprobe")
}

/// Runs a tool from `.tools/bin` with its Helm homes under `home`; the combined output, or an
/// error carrying it.
fn tool(
    program: &str,
    home: &Path,
    kubeconfig: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String> {
    let mut command = Command::new(tools_bin().join(program));
    command
        .args(args)
        .env("HELM_CACHE_HOME", home.join("helm-cache"))
        .env("HELM_CONFIG_HOME", home.join("helm-config"))
        .env("HELM_DATA_HOME", home.join("helm-data"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(kubeconfig) = kubeconfig {
        command.env("KUBECONFIG", kubeconfig);
    }
    let mut child = command.spawn().with_context(|| format!("starting {program} (run `make tools`?)"))?;
    if let Some(input) = stdin {
        child.stdin.take().context("stdin")?.write_all(input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{program} {args:?} failed: {text}");
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// `helm template <release>` into `namespace` with `args` (`--set`, `--api-versions`...).
fn template_in(release: &str, namespace: &str, args: &[&str]) -> Result<String> {
    let home = tempfile::tempdir()?;
    let chart = chart();
    let mut all = vec!["template", release, chart.to_str().context("utf-8 path")?];
    all.extend(["--namespace", namespace, "--kube-version", KUBE_VERSION]);
    all.extend(args);
    tool("helm", home.path(), None, &all, None)
}

/// The rendered objects.
fn template(release: &str, args: &[&str]) -> Result<Vec<Value>> {
    let text = template_in(release, "authprobe-system", args)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).context("helm's output")?;
    Ok(docs.into_iter().filter(|d| d.is_object()).collect())
}

fn sets(values: &[&str]) -> Vec<String> {
    values.iter().flat_map(|v| ["--set".to_string(), (*v).to_string()]).collect()
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = of_kind(docs, kind);
    assert_eq!(found.len(), 1, "exactly one {kind} expected, found {}", found.len());
    found[0]
}

fn container(docs: &[Value]) -> &Value {
    &one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
}

fn args_of(docs: &[Value]) -> Vec<String> {
    container(docs)["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

fn refs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn a_disruption_budget_only_with_more_than_one_replica() -> Result<()> {
    let docs = template("authprobe", &[])?;
    let pdb = one(&docs, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["minAvailable"], 1, "{pdb}");
    assert!(pdb["spec"].get("maxUnavailable").is_none(), "{pdb}");
    assert_eq!(pdb["spec"]["unhealthyPodEvictionPolicy"], "AlwaysAllow", "{pdb}");
    assert_eq!(
        pdb["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "authprobe", "app.kubernetes.io/instance": "authprobe"})
    );

    let single = template("authprobe", &refs(&sets(&["replicaCount=1"])))?;
    assert!(of_kind(&single, "PodDisruptionBudget").is_empty(), "one replica could never be evicted");

    let max = template(
        "authprobe",
        &refs(&sets(&[
            "replicaCount=3",
            "podDisruptionBudget.maxUnavailable=1",
            "podDisruptionBudget.minAvailable=null",
        ])),
    )?;
    let pdb = one(&max, "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{pdb}");
    assert!(pdb["spec"].get("minAvailable").is_none(), "{pdb}");

    let off = template("authprobe", &refs(&sets(&["podDisruptionBudget.enabled=false"])))?;
    assert!(of_kind(&off, "PodDisruptionBudget").is_empty());
    Ok(())
}

/// `google.quotaShare` is `--google-quota-share`, half of each quota by default, and the schema
/// refuses a share outside (0, 1].
#[test]
fn the_quota_share_is_the_operators_flag() -> Result<()> {
    let args = args_of(&template("authprobe", &[])?);
    assert!(args.iter().any(|a| a == "--google-quota-share=0.5"), "the default share: {args:?}");
    // `--set` gives helm a string, a values file or `--set-json` a number: both are taken.
    let tenth = args_of(&template("authprobe", &refs(&sets(&["google.quotaShare=0.1"])))?);
    assert!(tenth.iter().any(|a| a == "--google-quota-share=0.1"), "{tenth:?}");
    let quarter = args_of(&template("authprobe", &["--set-json", "google.quotaShare=0.25"])?);
    assert!(quarter.iter().any(|a| a == "--google-quota-share=0.25"), "{quarter:?}");
    for bad in
        ["google.quotaShare=0", "google.quotaShare=0.0", "google.quotaShare=1.5", "google.quotaShare=half"]
    {
        assert!(template("authprobe", &refs(&sets(&[bad]))).is_err(), "{bad} is outside (0, 1]");
    }
    for bad in ["google.quotaShare=0", "google.quotaShare=2"] {
        assert!(template("authprobe", &["--set-json", bad]).is_err(), "{bad} is outside (0, 1]");
    }
    Ok(())
}

#[test]
fn two_replicas_without_leader_election_are_refused() -> Result<()> {
    let refused = template("authprobe", &refs(&sets(&["leaderElection.enabled=false"])));
    let message = refused.expect_err("two replicas without a Lease must be refused").to_string();
    assert!(
        message.contains("replicaCount=2 needs leaderElection.enabled=true: without a Lease every replica would reconcile, write status and mint tokens"),
        "{message}"
    );
    let single = template("authprobe", &refs(&sets(&["leaderElection.enabled=false", "replicaCount=1"])))?;
    let args = args_of(&single);
    assert!(!args.iter().any(|a| a.starts_with("--lease-name") || a == "--leader-elect"), "{args:?}");
    assert!(
        !of_kind(&single, "Role")
            .iter()
            .any(|r| r["metadata"]["name"].as_str().unwrap().ends_with("-leader-election")),
        "no Lease, no Lease RBAC"
    );
    assert_eq!(one(&single, "Deployment")["spec"]["strategy"]["type"], "Recreate");
    Ok(())
}

/// The Lease is `<fullname>-leader`: `authprobe-leader` (the binary's default) for a release named
/// authprobe, another per release otherwise, so two releases in one namespace never share it.
#[test]
fn the_lease_is_named_after_the_release() -> Result<()> {
    for (release, lease) in [("authprobe", "authprobe-leader"), ("ops", "ops-authprobe-leader")] {
        let docs = template(release, &[])?;
        let args = args_of(&docs);
        assert!(args.contains(&"--leader-elect".to_string()), "{args:?}");
        assert!(args.contains(&format!("--lease-name={lease}")), "{release}: {args:?}");
        let role = of_kind(&docs, "Role")
            .into_iter()
            .find(|r| r["metadata"]["name"].as_str().unwrap().ends_with("-leader-election"))
            .context("the Lease Role")?;
        assert_eq!(
            role["rules"],
            json!([
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
                {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [lease],
                 "verbs": ["get", "list", "watch", "update", "patch"]}
            ]),
            "{release}"
        );
    }
    Ok(())
}

#[test]
fn replicas_spread_over_nodes_unless_told_otherwise() -> Result<()> {
    let selector =
        json!({"matchLabels": {"app.kubernetes.io/name": "authprobe", "app.kubernetes.io/instance": "ops"}});
    let docs = template("ops", &[])?;
    let spread = &one(&docs, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"];
    assert_eq!(
        spread,
        &json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway", "labelSelector": selector}])
    );

    let zones = template(
        "ops",
        &refs(&sets(&[
            "topologySpreadConstraints[0].maxSkew=1",
            "topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
            "topologySpreadConstraints[0].whenUnsatisfiable=DoNotSchedule",
        ])),
    )?;
    let spread = &one(&zones, "Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"];
    assert_eq!(
        spread,
        &json!([{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "DoNotSchedule", "labelSelector": selector}])
    );

    let none = template("ops", &["--set-json", "topologySpreadConstraints=[]"])?;
    assert!(one(&none, "Deployment")["spec"]["template"]["spec"].get("topologySpreadConstraints").is_none());
    Ok(())
}

#[test]
fn extra_args_and_env_reach_the_operator() -> Result<()> {
    let docs = template(
        "authprobe",
        &[
            "--set-json",
            r#"extraArgs=["--google-retry-deadline=30s"]"#,
            "--set-json",
            r#"extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy.internal:3128"}]"#,
        ],
    )?;
    let args = args_of(&docs);
    assert_eq!(args.last().map(String::as_str), Some("--google-retry-deadline=30s"), "{args:?}");
    let env = container(&docs)["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "HTTPS_PROXY", "value": "http://proxy.internal:3128"})), "{env:?}");
    assert!(env.iter().any(|e| e["name"] == "POD_NAMESPACE"), "the chart's own variables stay: {env:?}");
    Ok(())
}

#[test]
fn endpoint_hosts_are_allowed_only_when_listed() -> Result<()> {
    let env = |docs: &[Value]| container(docs)["env"].as_array().unwrap().clone();
    let none = template("authprobe", &[])?;
    assert!(env(&none).iter().all(|e| e["name"] != "AUTHPROBE_ENDPOINT_ALLOW"), "empty by default");
    let listed = template(
        "authprobe",
        &["--set-json", r#"endpoints.allow=["api.acme.example","mesh.svc:8080","http://legacy.svc"]"#],
    )?;
    assert!(
        env(&listed).contains(&json!({
            "name": "AUTHPROBE_ENDPOINT_ALLOW",
            "value": "api.acme.example,mesh.svc:8080,http://legacy.svc"
        })),
        "{:?}",
        env(&listed)
    );
    for bad in [
        r#"endpoints.allow=["https://a.example/path"]"#,
        r#"endpoints.allow=["a,b"]"#,
        r#"endpoints.allow=["*.example"]"#,
    ] {
        let error = template("authprobe", &["--set-json", bad]).expect_err(bad).to_string();
        assert!(error.contains("does not match pattern"), "{bad}: {error}");
    }
    Ok(())
}

#[test]
fn monitoring_objects_need_their_crds() -> Result<()> {
    let enabled = sets(&["metrics.serviceMonitor.enabled=true", "metrics.prometheusRule.enabled=true"]);
    let without = template("authprobe", &refs(&enabled))?;
    assert!(of_kind(&without, "ServiceMonitor").is_empty(), "no ServiceMonitor CRD, no ServiceMonitor");
    assert!(of_kind(&without, "PrometheusRule").is_empty(), "no PrometheusRule CRD, no PrometheusRule");
    let mut args = refs(&enabled);
    args.extend(MONITORING_CRDS);
    let with_crds = template("authprobe", &args)?;
    assert_eq!(one(&with_crds, "ServiceMonitor")["metadata"]["namespace"], "authprobe-system");
    assert_eq!(one(&with_crds, "PrometheusRule")["metadata"]["namespace"], "authprobe-system");

    let disabled = template("authprobe", &MONITORING_CRDS)?;
    assert!(
        of_kind(&disabled, "ServiceMonitor").is_empty() && of_kind(&disabled, "PrometheusRule").is_empty()
    );
    Ok(())
}

/// honorLabels: the `namespace` label authprobe exports on a failing ServiceAccount stays that
/// ServiceAccount's namespace instead of becoming `exported_namespace`.
#[test]
fn the_service_monitor_honours_the_metrics_labels() -> Result<()> {
    let mut args = vec![
        "--set".to_string(),
        "metrics.serviceMonitor.enabled=true".to_string(),
        "--set".to_string(),
        "metrics.serviceMonitor.namespace=monitoring".to_string(),
        "--set".to_string(),
        "metrics.serviceMonitor.scrapeTimeout=10s".to_string(),
        "--set".to_string(),
        "metrics.serviceMonitor.labels.release=kube-prometheus-stack".to_string(),
        "--set-json".to_string(),
        r#"metrics.serviceMonitor.relabelings=[{"sourceLabels":["__meta_kubernetes_pod_node_name"],"targetLabel":"node"}]"#.to_string(),
        "--set-json".to_string(),
        r#"metrics.serviceMonitor.metricRelabelings=[{"action":"drop","sourceLabels":["__name__"],"regex":"authprobe_reconcile_duration_seconds_bucket"}]"#.to_string(),
    ];
    args.extend(MONITORING_CRDS.iter().map(|s| (*s).to_string()));
    let docs = template("authprobe", &refs(&args))?;
    let monitor = one(&docs, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["namespace"], "monitoring");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack");
    assert_eq!(monitor["spec"]["namespaceSelector"], json!({"matchNames": ["authprobe-system"]}));
    assert_eq!(
        monitor["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "authprobe", "app.kubernetes.io/instance": "authprobe"})
    );
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["honorLabels"], true, "{endpoint}");
    assert_eq!(endpoint["port"], "http");
    assert_eq!(endpoint["interval"], "30s");
    assert_eq!(endpoint["scrapeTimeout"], "10s");
    assert_eq!(endpoint["relabelings"][0]["targetLabel"], "node");
    assert_eq!(endpoint["metricRelabelings"][0]["action"], "drop");

    let mut plain = sets(&["metrics.serviceMonitor.enabled=true"]);
    plain.extend(MONITORING_CRDS.iter().map(|s| (*s).to_string()));
    let docs = template("authprobe", &refs(&plain))?;
    let monitor = one(&docs, "ServiceMonitor");
    assert!(monitor["spec"].get("namespaceSelector").is_none(), "same namespace: {monitor}");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
    assert!(monitor["spec"]["endpoints"][0].get("scrapeTimeout").is_none());
    Ok(())
}

#[test]
fn each_alert_can_be_turned_off() -> Result<()> {
    let mut args = sets(&[
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.alerts.stale.enabled=false",
        "metrics.prometheusRule.alerts.unknownTooLong.enabled=false",
    ]);
    args.extend(MONITORING_CRDS.iter().map(|s| (*s).to_string()));
    let docs = template("authprobe", &refs(&args))?;
    let rule = one(&docs, "PrometheusRule");
    let alerts: Vec<&str> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap())
        .collect();
    assert_eq!(
        alerts,
        ["AuthProbeServiceAccountFailing", "AuthProbeCheckerUnhealthy", "AuthProbeOperatorAbsent"]
    );
    Ok(())
}

#[test]
fn the_schema_covers_the_new_values_and_refuses_others() -> Result<()> {
    for (set, message) in [
        ("podDisruptionBudget.minAvailable=one", "/podDisruptionBudget/minAvailable"),
        (
            "podDisruptionBudget.unhealthyPodEvictionPolicy=Never",
            "value must be one of 'IfHealthyBudget', 'AlwaysAllow'",
        ),
        ("podDisruptionBudget.budget=1", "additional properties 'budget' not allowed"),
        ("metrics.serviceMonitor.honorLabels=false", "additional properties 'honorLabels' not allowed"),
        ("metrics.serviceMonitor.scrapeTimeout=ten", "'ten' does not match pattern"),
        ("metrics.prometheusRule.staleAfter=30m", "additional properties 'staleAfter' not allowed"),
        ("metrics.prometheusRule.failoverTolerance=3 minutes", "'3 minutes' does not match pattern"),
        ("metrics.prometheusRule.alerts.stale.for=1h", "additional properties 'for' not allowed"),
        ("metrics.prometheusRule.alerts.paging.enabled=true", "additional properties 'paging' not allowed"),
        ("metrics.prometheusRule.alertLabels.team-name=x", "'team-name' does not match pattern"),
        ("metrics.prometheusRule.operatorSelector=up{job=\"x\"}", "/metrics/prometheusRule/operatorSelector"),
    ] {
        let refused = template("authprobe", &["--set", set]);
        let error = refused.expect_err(set).to_string();
        assert!(error.contains(message), "{set}: {error}");
    }
    let mut args = sets(&[
        "metrics.prometheusRule.enabled=true",
        "metrics.prometheusRule.alerts.unknownTooLong.for=2h",
        "metrics.prometheusRule.alerts.unknownTooLong.severity=ticket",
        "metrics.prometheusRule.alerts.stale.intervals=5",
        "podDisruptionBudget.minAvailable=50%",
    ]);
    args.extend(MONITORING_CRDS.iter().map(|s| (*s).to_string()));
    template("authprobe", &refs(&args))?;
    Ok(())
}

/// The canary runs Jobs as any ServiceAccount, as strong as minting its token: off by default; on,
/// it may make, get and delete Jobs and get the workloads it copies (listing and watching Jobs and
/// Pods is the Workload stage's grant: a Pod's status holds the result, no logs, no exec), and the
/// operator gets its image (its own by default).
#[test]
fn the_canary_is_off_by_default_and_enabled_grants_jobs_pod_reads_and_its_image() -> Result<()> {
    let canary_role = |docs: &[Value]| {
        of_kind(docs, "ClusterRole")
            .into_iter()
            .find(|r| r["metadata"]["name"] == "authprobe-canary")
            .cloned()
    };
    let off = template("authprobe", &[])?;
    assert_eq!(canary_role(&off), None);
    assert!(!args_of(&off).iter().any(|a| a.starts_with("--canary-image")));

    let on = template("authprobe", &refs(&sets(&["canary.enabled=true", "image.tag=1.2.3"])))?;
    assert_eq!(
        canary_role(&on).context("the canary ClusterRole")?["rules"],
        json!([
            {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "delete"]},
            {"apiGroups": ["batch"], "resources": ["cronjobs"], "verbs": ["get"]},
            {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "daemonsets"], "verbs": ["get"]},
            {"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]},
        ])
    );
    // Listing and watching Jobs and Pods is the Workload stage's grant, always there: not granted twice.
    let base = of_kind(&on, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "authprobe")
        .context("the operator's ClusterRole")?;
    for (group, resource) in [("batch", "jobs"), ("", "pods")] {
        let rule = base["rules"]
            .as_array()
            .context("rules")?
            .iter()
            .find(|r| {
                r["apiGroups"] == json!([group])
                    && r["resources"].as_array().is_some_and(|rs| rs.contains(&json!(resource)))
            })
            .with_context(|| format!("the operator's ClusterRole lists and watches {resource}"))?;
        assert_eq!(rule["verbs"], json!(["list", "watch"]));
    }
    let binding = of_kind(&on, "ClusterRoleBinding")
        .into_iter()
        .find(|b| b["metadata"]["name"] == "authprobe-canary")
        .context("the canary ClusterRoleBinding")?;
    assert_eq!(binding["subjects"][0]["name"], "authprobe");
    assert!(args_of(&on).contains(&"--canary-image=ghcr.io/authprobe/authprobe:1.2.3".to_string()));

    let elsewhere = template(
        "authprobe",
        &refs(&sets(&["canary.enabled=true", "canary.image.repository=registry.internal/authprobe"])),
    )?;
    let app_version =
        one(&elsewhere, "Deployment")["metadata"]["labels"]["app.kubernetes.io/version"].clone();
    assert!(
        args_of(&elsewhere).contains(&format!(
            "--canary-image=registry.internal/authprobe:{}",
            app_version.as_str().unwrap()
        )),
        "{:?}",
        args_of(&elsewhere)
    );
    let refused = template("authprobe", &["--set", "canary.image.digest=sha256:0"]);
    assert!(
        refused
            .expect_err("unknown value")
            .to_string()
            .contains("additional properties 'digest' not allowed")
    );
    Ok(())
}

/// The Lease Role applied to the real API server, exercised as the operator's ServiceAccount: get,
/// patch and update of this release's Lease, a list and a watch with the `metadata.name` field
/// selector the operator uses (the API server takes the name from it and matches resourceNames),
/// and create (which cannot be narrowed); nothing on another Lease, no unfiltered list or watch.
#[tokio::test]
async fn the_lease_role_is_enough_for_this_lease_and_nothing_else() -> Result<()> {
    let cp = ControlPlane::shared();
    let client = cp.client().await?;
    let ns = cp.namespace(&client, "authprobe-system", &[]).await?;
    tokio::task::spawn_blocking(move || lease_rbac(cp, &ns)).await?
}

fn lease_rbac(cp: &ControlPlane, ns: &str) -> Result<()> {
    let kubeconfig = cp.kubeconfig_path();
    let home = cp.dir().join("chart-hardening");
    let kubectl = |args: &[&str], stdin: Option<&str>| tool("kubectl", &home, Some(&kubeconfig), args, stdin);
    let chart = chart();
    let rendered = tool(
        "helm",
        &home,
        None,
        &[
            "template",
            "ops",
            chart.to_str().context("utf-8 path")?,
            "--namespace",
            ns,
            "--kube-version",
            KUBE_VERSION,
            "--show-only",
            "templates/serviceaccount.yaml",
            "--show-only",
            "templates/rbac.yaml",
        ],
        None,
    )?;
    kubectl(&["apply", "-f", "-"], Some(&rendered))?;
    let user = format!("--as=system:serviceaccount:{ns}:ops-authprobe");
    let lease = "ops-authprobe-leader";
    let other = "someone-elses-lease";
    let lease_yaml = |name: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata:\n  name: {name}\n  namespace: {ns}\n"
        )
    };
    kubectl(&["create", "-f", "-"], Some(&lease_yaml(other)))?;
    let base = format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases");
    let by_name = |name: &str| format!("{base}?fieldSelector=metadata.name%3D{name}");
    let watch_by_name =
        |name: &str| format!("{base}?fieldSelector=metadata.name%3D{name}&watch=true&timeoutSeconds=1");
    let allowed = |args: &[&str], stdin: Option<&str>| {
        let mut all = args.to_vec();
        all.push(user.as_str());
        kubectl(&all, stdin).with_context(|| format!("allowed as the operator: {args:?}"))
    };
    let refused = |args: &[&str]| {
        let mut all = args.to_vec();
        all.push(user.as_str());
        match kubectl(&all, None) {
            Ok(out) => panic!("{args:?} must be refused to the operator, got: {out}"),
            Err(e) => assert!(e.to_string().contains("Forbidden"), "{args:?}: {e}"),
        }
    };

    // The operator's own Lease.
    allowed(&["create", "-f", "-"], Some(&lease_yaml(lease)))?;
    allowed(&["get", "lease", lease, "-n", ns], None)?;
    let listed = allowed(&["get", "--raw", &by_name(lease)], None)?;
    assert!(listed.contains(lease), "{listed}");
    allowed(&["get", "--raw", &watch_by_name(lease)], None)?;
    allowed(
        &["patch", "lease", lease, "-n", ns, "--type=merge", "-p", r#"{"spec":{"holderIdentity":"ops-0"}}"#],
        None,
    )?;
    let current = allowed(&["get", "lease", lease, "-n", ns, "-o", "yaml"], None)?;
    allowed(&["replace", "-f", "-"], Some(&current))?;

    // Anything else.
    refused(&["get", "lease", other, "-n", ns]);
    refused(&["get", "--raw", &base]);
    refused(&["get", "--raw", &by_name(other)]);
    refused(&["get", "--raw", &format!("{base}?watch=true&timeoutSeconds=1")]);
    refused(&["get", "--raw", &watch_by_name(other)]);
    refused(&[
        "patch",
        "lease",
        other,
        "-n",
        ns,
        "--type=merge",
        "-p",
        r#"{"spec":{"holderIdentity":"ops-0"}}"#,
    ]);
    refused(&["delete", "lease", lease, "-n", ns]);
    Ok(())
}

/// The chart with everything this file adds switched on is accepted by the API server (server-side
/// dry run): the PodDisruptionBudget with a percentage, spread constraints, extra args and env.
#[tokio::test]
async fn the_hardened_chart_is_accepted_by_the_api_server() -> Result<()> {
    let cp = ControlPlane::shared();
    let client = cp.client().await?;
    let ns = cp.namespace(&client, "authprobe-system", &[]).await?;
    tokio::task::spawn_blocking(move || {
        let manifests = template_in(
            "dry",
            &ns,
            &[
                "--set",
                "replicaCount=3",
                "--set",
                "podDisruptionBudget.minAvailable=null",
                "--set",
                "podDisruptionBudget.maxUnavailable=34%",
                "--set-json",
                r#"extraArgs=["--google-retry-deadline=30s"]"#,
                "--set-json",
                r#"extraEnv=[{"name":"HTTPS_PROXY","value":"http://proxy.internal:3128"}]"#,
                "--set",
                "crds.install=false",
                "--set",
                "canary.enabled=true",
            ],
        )?;
        let applied = tool(
            "kubectl",
            &cp.dir().join("chart-hardening"),
            Some(&cp.kubeconfig_path()),
            &["apply", "--dry-run=server", "-f", "-"],
            Some(&manifests),
        )?;
        for object in [
            "poddisruptionbudget.policy/dry-authprobe",
            "deployment.apps/dry-authprobe",
            "role.rbac.authorization.k8s.io/dry-authprobe-leader-election",
            "clusterrole.rbac.authorization.k8s.io/dry-authprobe-canary",
            "clusterrolebinding.rbac.authorization.k8s.io/dry-authprobe-canary",
        ] {
            assert!(applied.contains(object), "{object} missing from:\n{applied}");
        }
        Ok(())
    })
    .await?
}
