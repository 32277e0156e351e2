//! The chart's alerts, proven with `promtool test rules` over the rules `helm template` renders from
//! charts/authprobe (not a copy of them): a ServiceAccount failing in one namespace, a leader
//! failover in the middle of `for:`, staleness judged against each probe's own interval, the
//! operator absent, Unknown for long, and Unknown never firing the failing alert.
//!
//! The input series are what Prometheus stores scraping the operator through the chart's
//! ServiceMonitor: each carries its replica's target labels (`job`, `service`, `endpoint`,
//! `container`, `pod`, `instance`, `namespace`), except that `honorLabels` keeps the metric's own
//! `namespace` (the failing ServiceAccount's) over the target's.
//!
//! promtool is `AUTHPROBE_PROMTOOL` if set, else `.tools/bin/promtool`; helm is `.tools/bin/helm`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use authprobe_harness::{repo_root, tools_bin};

const RELEASE: &str = "authprobe";
const RELEASE_NAMESPACE: &str = "authprobe-system";

/// Target labels of the two operator replicas, as the ServiceMonitor's scrape gives them.
const POD_A: &str = r#"job="authprobe", service="authprobe", endpoint="http", container="authprobe", pod="authprobe-6d5f7c9b8-a1b2c", instance="10.244.1.7:8080""#;
const POD_B: &str = r#"job="authprobe", service="authprobe", endpoint="http", container="authprobe", pod="authprobe-6d5f7c9b8-d3e4f", instance="10.244.2.9:8080""#;

fn promtool() -> PathBuf {
    std::env::var_os("AUTHPROBE_PROMTOOL").map(PathBuf::from).unwrap_or_else(|| tools_bin().join("promtool"))
}

fn run(program: &Path, args: &[&str], dir: &Path) -> Result<(bool, String)> {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("HELM_CACHE_HOME", dir.join("helm-cache"))
        .env("HELM_CONFIG_HOME", dir.join("helm-config"))
        .env("HELM_DATA_HOME", dir.join("helm-data"))
        .output()
        .with_context(|| format!("starting {} (run `make tools`?)", program.display()))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

/// Renders the chart's PrometheusRule (release `authprobe` in `authprobe-system`, on a cluster that
/// serves the PrometheusRule CRD) with `values` on top of the defaults, and writes its `spec` to
/// `dir/rules.json`: a Prometheus rule file (JSON is YAML). Returns the rule file's text.
fn render_rules(dir: &Path, values: &str) -> Result<String> {
    let chart = repo_root().join("charts/authprobe");
    fs::write(dir.join("values.yaml"), format!("metrics:\n  prometheusRule:\n    enabled: true\n{values}"))?;
    let (ok, out) = run(
        &tools_bin().join("helm"),
        &[
            "template",
            RELEASE,
            chart.to_str().context("utf-8 path")?,
            "--namespace",
            RELEASE_NAMESPACE,
            "--kube-version",
            "v1.36.3",
            "--api-versions",
            "monitoring.coreos.com/v1/PrometheusRule",
            "--values",
            "values.yaml",
            "--show-only",
            "templates/prometheusrule.yaml",
        ],
        dir,
    )?;
    if !ok {
        bail!("helm template failed:\n{out}");
    }
    let rule: serde_json::Value = serde_saphyr::from_str(&out).context("the rendered PrometheusRule")?;
    let spec = rule.get("spec").context("PrometheusRule without spec")?;
    let text = serde_json::to_string_pretty(spec)?;
    fs::write(dir.join("rules.json"), &text)?;
    Ok(text)
}

/// Runs `promtool test rules` with `tests` (the `tests:` list of a promtool unit-test file, with
/// `POD_A`/`POD_B` standing for the replicas' target labels) over the rules rendered with `values`
/// (extra YAML under `metrics.prometheusRule`, indented four spaces). Fails with promtool's output,
/// the rules and the test file.
fn promtool_test(values: &str, tests: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rules = render_rules(dir.path(), values)?;
    let tests = tests.replace("POD_A", POD_A).replace("POD_B", POD_B);
    let file = format!("rule_files: [rules.json]\nevaluation_interval: 1m\ntests:\n{tests}");
    fs::write(dir.path().join("alerts.test.yaml"), &file)?;
    let (ok, out) = run(&promtool(), &["test", "rules", "alerts.test.yaml"], dir.path())?;
    if !ok {
        bail!("promtool test rules failed:\n{out}\n--- rendered rules:\n{rules}\n--- test file:\n{file}");
    }
    Ok(())
}

const FAILING_ANNOTATIONS: &str = r#"
            summary: checkout/app cannot become its Google identity (PrincipalNotMapped)
            description: AuthProbe payments finds PrincipalNotMapped at stage IAMPolicy. kubectl describe serviceaccount app -n checkout shows the exact fix.
            runbook_url: README.md#authprobeserviceaccountfailing"#;

/// One ServiceAccount failing for good, another for 9 minutes only, under a leader that keeps
/// passing: the first fires after `for: 10m` carrying the ServiceAccount's own namespace, stage and
/// reason and no replica label; the second never fires (its recovery counts at once, not bridged).
#[test]
fn a_failing_serviceaccount_fires_with_its_own_namespace() -> Result<()> {
    promtool_test(
        "",
        &format!(
            r#"
- name: failing in one namespace
  input_series:
  - series: 'authprobe_last_probe_timestamp_seconds{{POD_A, namespace="authprobe-system", probe="payments"}}'
    values: '0+60x30'
  - series: 'authprobe_failing_serviceaccount{{POD_A, namespace="checkout", probe="payments", serviceaccount="app", stage="IAMPolicy", reason="PrincipalNotMapped"}}'
    values: '1x30'
  - series: 'authprobe_failing_serviceaccount{{POD_A, namespace="billing", probe="payments", serviceaccount="app", stage="Static", reason="AnnotationMissing"}}'
    values: '1x8 stale'
  alert_rule_test:
  - eval_time: 9m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts: []
  - eval_time: 10m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts:
    - exp_labels: {{severity: warning, probe: payments, namespace: checkout, serviceaccount: app, stage: IAMPolicy, reason: PrincipalNotMapped}}
      exp_annotations: {FAILING_ANNOTATIONS}
  - eval_time: 20m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts:
    - exp_labels: {{severity: warning, probe: payments, namespace: checkout, serviceaccount: app, stage: IAMPolicy, reason: PrincipalNotMapped}}
      exp_annotations: {FAILING_ANNOTATIONS}
"#
        ),
    )
}

/// The leader (pod A) dies 5 minutes into a failure; pod B takes over and exports the same failure
/// two evaluations later. The failing alert still fires at 10m, as if nothing had happened, and so
/// does a CheckerHealthy=False that moved the same way (its `for:` is 5m: it fires at 5m and stays
/// firing through the gap).
#[test]
fn a_leader_failover_does_not_restart_for_timers() -> Result<()> {
    promtool_test(
        "",
        &format!(
            r#"
- name: failover in the middle of for
  input_series:
  - series: 'authprobe_last_probe_timestamp_seconds{{POD_A, namespace="authprobe-system", probe="payments"}}'
    values: '0+60x5 stale'
  - series: 'authprobe_failing_serviceaccount{{POD_A, namespace="checkout", probe="payments", serviceaccount="app", stage="IAMPolicy", reason="PrincipalNotMapped"}}'
    values: '1x5 stale'
  - series: 'authprobe_condition{{POD_A, namespace="authprobe-system", probe="payments", type="CheckerHealthy", status="False"}}'
    values: '1x5 stale'
  - series: 'authprobe_last_probe_timestamp_seconds{{POD_B, namespace="authprobe-system", probe="payments"}}'
    values: '_x8 480+60x20'
  - series: 'authprobe_failing_serviceaccount{{POD_B, namespace="checkout", probe="payments", serviceaccount="app", stage="IAMPolicy", reason="PrincipalNotMapped"}}'
    values: '_x8 1x20'
  - series: 'authprobe_condition{{POD_B, namespace="authprobe-system", probe="payments", type="CheckerHealthy", status="False"}}'
    values: '_x8 1x20'
  alert_rule_test:
  - eval_time: 9m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts: []
  - eval_time: 10m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts:
    - exp_labels: {{severity: warning, probe: payments, namespace: checkout, serviceaccount: app, stage: IAMPolicy, reason: PrincipalNotMapped}}
      exp_annotations: {FAILING_ANNOTATIONS}
  - eval_time: 7m
    alertname: AuthProbeCheckerUnhealthy
    exp_alerts:
    - exp_labels: {{severity: warning, probe: payments, namespace: authprobe-system, type: CheckerHealthy, status: "False"}}
      exp_annotations:
        summary: authprobe's own access is failing for AuthProbe payments
        description: The operator cannot authenticate to Google, lacks a permission, or may not mint tokens; namespaces are not at fault. kubectl describe authprobe payments
        runbook_url: README.md#authprobecheckerunhealthy
"#
        ),
    )
}

/// Two probes with different intervals, both stuck: `fast` (1m) fires once its last pass is over
/// 3 minutes old, `slow` (1h) does not fire within the hour a fixed threshold would have fired in.
/// `legacy` has no interval gauge (an operator that does not export it): it is judged against the
/// default interval, 10m, so after 30 minutes.
#[test]
fn staleness_is_judged_against_each_probes_own_interval() -> Result<()> {
    let stale = |probe: &str, ago: &str| {
        format!(
            r#"
    - exp_labels: {{severity: warning, probe: {probe}, namespace: authprobe-system}}
      exp_annotations:
        summary: AuthProbe {probe} has not completed a probe pass for {ago}
        description: That is over 3 of its probe intervals. Is the authprobe operator running and leading? Check its /readyz and logs.
        runbook_url: README.md#authprobestale"#
        )
    };
    promtool_test(
        "",
        &format!(
            r#"
- name: stale per probe interval
  input_series:
  - series: 'authprobe_last_probe_timestamp_seconds{{POD_A, namespace="authprobe-system", probe="fast"}}'
    values: '0+60x10 600x50'
  - series: 'authprobe_probe_interval_seconds{{POD_A, namespace="authprobe-system", probe="fast"}}'
    values: '60x60'
  - series: 'authprobe_last_probe_timestamp_seconds{{POD_A, namespace="authprobe-system", probe="slow"}}'
    values: '0x60'
  - series: 'authprobe_probe_interval_seconds{{POD_A, namespace="authprobe-system", probe="slow"}}'
    values: '3600x60'
  - series: 'authprobe_last_probe_timestamp_seconds{{POD_A, namespace="authprobe-system", probe="legacy"}}'
    values: '0+60x20 1200x40'
  alert_rule_test:
  - eval_time: 13m
    alertname: AuthProbeStale
    exp_alerts: []
  - eval_time: 14m
    alertname: AuthProbeStale
    exp_alerts: {fast14}
  - eval_time: 45m
    alertname: AuthProbeStale
    exp_alerts: {fast45}
  - eval_time: 55m
    alertname: AuthProbeStale
    exp_alerts: {fast55}{legacy55}
"#,
            fast14 = stale("fast", "4m 0s"),
            fast45 = stale("fast", "35m 0s"),
            fast55 = stale("fast", "45m 0s"),
            legacy55 = stale("legacy", "35m 0s"),
        ),
    )
}

/// Pod B leaves at 6m (a rollout), pod A stays up until 10m, then crash-loops (`up` 0): the alert
/// fires 5 minutes after the last replica went down, not when one of two went. Another
/// application's target in the same namespace does not hide it.
#[test]
fn the_operator_absent_fires_when_no_replica_is_up() -> Result<()> {
    promtool_test(
        "",
        r#"
- name: operator absent
  input_series:
  - series: 'up{POD_A, namespace="authprobe-system"}'
    values: '1x10 0x20'
  - series: 'up{POD_B, namespace="authprobe-system"}'
    values: '1x5 stale'
  - series: 'up{job="other-app", namespace="authprobe-system", instance="10.244.3.3:9090"}'
    values: '1x30'
  alert_rule_test:
  - eval_time: 9m
    alertname: AuthProbeOperatorAbsent
    exp_alerts: []
  - eval_time: 15m
    alertname: AuthProbeOperatorAbsent
    exp_alerts: []
  - eval_time: 16m
    alertname: AuthProbeOperatorAbsent
    exp_alerts:
    - exp_labels: {severity: warning}
      exp_annotations:
        summary: No authprobe operator has been scraped successfully for 5m
        description: 'No target matching up{job="authprobe", namespace="authprobe-system"} is up. Workload Identity mappings are not being checked. kubectl get pods -n authprobe-system -l app.kubernetes.io/instance=authprobe'
        runbook_url: README.md#authprobeoperatorabsent
"#,
    )
}

/// Two ServiceAccounts Unknown (say Google unreachable) for 90 minutes: the Unknown alert fires after
/// an hour with severity info and the operator's namespace, never a ServiceAccount's; the failing
/// and checker alerts never fire, since nothing is definitely broken.
#[test]
fn unknown_for_long_is_info_for_the_platform_and_never_failing() -> Result<()> {
    promtool_test(
        "",
        r#"
- name: unknown too long
  input_series:
  - series: 'authprobe_last_probe_timestamp_seconds{POD_A, namespace="authprobe-system", probe="payments"}'
    values: '0+60x90'
  - series: 'authprobe_serviceaccounts{POD_A, namespace="authprobe-system", probe="payments", result="unknown"}'
    values: '2x90'
  - series: 'authprobe_serviceaccounts{POD_A, namespace="authprobe-system", probe="payments", result="failing"}'
    values: '0x90'
  - series: 'authprobe_serviceaccounts{POD_A, namespace="authprobe-system", probe="payments", result="passing"}'
    values: '28x90'
  - series: 'authprobe_condition{POD_A, namespace="authprobe-system", probe="payments", type="Ready", status="Unknown"}'
    values: '1x90'
  - series: 'authprobe_condition{POD_A, namespace="authprobe-system", probe="payments", type="CheckerHealthy", status="True"}'
    values: '1x90'
  - series: 'authprobe_condition{POD_A, namespace="authprobe-system", probe="payments", type="CheckerHealthy", status="False"}'
    values: '0x90'
  alert_rule_test:
  - eval_time: 59m
    alertname: AuthProbeUnknownTooLong
    exp_alerts: []
  - eval_time: 60m
    alertname: AuthProbeUnknownTooLong
    exp_alerts:
    - exp_labels: {severity: info, probe: payments, namespace: authprobe-system, result: unknown}
      exp_annotations:
        summary: AuthProbe payments could not judge 2 ServiceAccount(s) for 1h
        description: authprobe cannot tell whether these ServiceAccounts work (reasons such as GoogleUnavailable, GoogleThrottled, CheckerForbidden, TokenRequestDenied). kubectl describe authprobe payments lists them with their reasons.
        runbook_url: README.md#authprobeunknowntoolong
  - eval_time: 30m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts: []
  - eval_time: 90m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts: []
  - eval_time: 90m
    alertname: AuthProbeCheckerUnhealthy
    exp_alerts: []
"#,
    )
}

/// Values reach the alerts: labels for every alert, a per-alert severity and `for:`, the runbook
/// base URL, a per-pod label added by relabelling (`node`) aggregated away, and the selector for
/// the operator's targets when it is scraped by another job.
#[test]
fn alert_values_reach_the_rules() -> Result<()> {
    promtool_test(
        r#"    alertLabels: {team: platform}
    runbookBaseUrl: https://git.example.com/platform/authprobe/blob/v0.1.0/README.md
    aggregateAway: [instance, pod, node, container, endpoint, service, job]
    operatorSelector: 'job="kubernetes-pods", app="authprobe"'
    alerts:
      serviceAccountFailing: {for: 15m, severity: page, labels: {route: namespace-owner}}
      operatorAbsent: {for: 2m}
"#,
        r#"
- name: values
  input_series:
  - series: 'authprobe_last_probe_timestamp_seconds{POD_A, node="node-1", namespace="authprobe-system", probe="payments"}'
    values: '0+60x30'
  - series: 'authprobe_failing_serviceaccount{POD_A, node="node-1", namespace="checkout", probe="payments", serviceaccount="app", stage="IAMPolicy", reason="PrincipalNotMapped"}'
    values: '1x30'
  - series: 'up{POD_A, node="node-1", namespace="authprobe-system"}'
    values: '1x30'
  - series: 'up{job="kubernetes-pods", app="authprobe", instance="10.244.1.7:8080"}'
    values: '1x5 0x25'
  alert_rule_test:
  - eval_time: 14m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts: []
  - eval_time: 15m
    alertname: AuthProbeServiceAccountFailing
    exp_alerts:
    - exp_labels: {severity: page, team: platform, route: namespace-owner, probe: payments, namespace: checkout, serviceaccount: app, stage: IAMPolicy, reason: PrincipalNotMapped}
      exp_annotations:
        summary: checkout/app cannot become its Google identity (PrincipalNotMapped)
        description: AuthProbe payments finds PrincipalNotMapped at stage IAMPolicy. kubectl describe serviceaccount app -n checkout shows the exact fix.
        runbook_url: https://git.example.com/platform/authprobe/blob/v0.1.0/README.md#authprobeserviceaccountfailing
  - eval_time: 8m
    alertname: AuthProbeOperatorAbsent
    exp_alerts:
    - exp_labels: {severity: warning, team: platform}
      exp_annotations:
        summary: No authprobe operator has been scraped successfully for 2m
        description: 'No target matching up{job="kubernetes-pods", app="authprobe"} is up. Workload Identity mappings are not being checked. kubectl get pods -n authprobe-system -l app.kubernetes.io/instance=authprobe'
        runbook_url: https://git.example.com/platform/authprobe/blob/v0.1.0/README.md#authprobeoperatorabsent
"#,
    )
}
