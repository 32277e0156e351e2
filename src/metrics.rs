//! Prometheus metrics, exactly the series the design names. Labels come from bounded sets (probe
//! names, condition types, reasons, stages, API names, outcome and error categories); the per-KSA
//! failing series exist only while a KSA fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Mutex, atomic::AtomicU64},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::engine::report::{Report, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    probe: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct FailingLabels {
    probe: String,
    namespace: String,
    serviceaccount: String,
    stage: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConditionLabels {
    probe: String,
    r#type: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    probe: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    probe: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CategoryLabels {
    category: &'static str,
}

/// How a Google request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 2xx.
    Ok,
    /// 4xx other than 429.
    ClientError,
    /// 5xx or a broken connection.
    ServerError,
    /// 429.
    Throttled,
    /// No answer in time.
    Timeout,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::ClientError => "client_error",
            Outcome::ServerError => "server_error",
            Outcome::Throttled => "throttled",
            Outcome::Timeout => "timeout",
        }
    }
}

/// How a request to a `spec.endpoints` URL ended (each redirect hop counts as one request).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointOutcome {
    /// 2xx.
    Ok,
    /// 3xx.
    Redirect,
    /// 4xx other than 429 (refusals included).
    ClientError,
    /// 5xx or 429.
    ServerError,
    /// No answer in time.
    Timeout,
    /// No connection, or it broke.
    Unreachable,
}

impl EndpointOutcome {
    const ALL: [EndpointOutcome; 6] = [
        EndpointOutcome::Ok,
        EndpointOutcome::Redirect,
        EndpointOutcome::ClientError,
        EndpointOutcome::ServerError,
        EndpointOutcome::Timeout,
        EndpointOutcome::Unreachable,
    ];

    fn as_str(self) -> &'static str {
        match self {
            EndpointOutcome::Ok => "ok",
            EndpointOutcome::Redirect => "redirect",
            EndpointOutcome::ClientError => "client_error",
            EndpointOutcome::ServerError => "server_error",
            EndpointOutcome::Timeout => "timeout",
            EndpointOutcome::Unreachable => "unreachable",
        }
    }

    /// The outcome of an answer with this status.
    pub fn of_status(status: u16) -> Self {
        match status {
            200..=299 => EndpointOutcome::Ok,
            300..=399 => EndpointOutcome::Redirect,
            429 | 500.. => EndpointOutcome::ServerError,
            _ => EndpointOutcome::ClientError,
        }
    }
}

const CONDITION_STATUSES: [Status; 3] = [Status::True, Status::False, Status::Unknown];

/// Every metric authprobe exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    serviceaccounts: Family<ResultLabels, Gauge>,
    failing: Family<FailingLabels, Gauge>,
    condition: Family<ConditionLabels, Gauge>,
    last_probe: Family<ProbeLabels, Gauge<f64, AtomicU64>>,
    interval: Family<ProbeLabels, Gauge<f64, AtomicU64>>,
    google_requests: Family<RequestLabels, Counter>,
    google_duration: Family<ApiLabels, Histogram>,
    endpoint_requests: Family<EndpointLabels, Counter>,
    tokens_minted: Counter,
    reconcile_duration: Histogram,
    reconcile_errors: Family<CategoryLabels, Counter>,
    /// The failing series currently exported per probe, to drop those that recover.
    exported: Mutex<BTreeMap<String, BTreeSet<FailingLabels>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every series registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("authprobe");
        let serviceaccounts = Family::default();
        registry.register("serviceaccounts", "Checked ServiceAccounts by result", serviceaccounts.clone());
        let failing = Family::default();
        registry.register(
            "failing_serviceaccount",
            "1 for each ServiceAccount that is failing, with its stage and reason",
            failing.clone(),
        );
        let condition = Family::default();
        registry.register(
            "condition",
            "1 for the current status of each condition, 0 for the others",
            condition.clone(),
        );
        let last_probe = Family::default();
        registry.register(
            "last_probe_timestamp_seconds",
            "When the last probe pass finished",
            last_probe.clone(),
        );
        let interval = Family::default();
        registry.register(
            "probe_interval_seconds",
            "The probe's periodic interval: a pass is stale after a few of them",
            interval.clone(),
        );
        let google_requests = Family::default();
        registry.register(
            "google_requests",
            "Requests to Google APIs by API and outcome",
            google_requests.clone(),
        );
        let google_duration = Family::<ApiLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 12))
        });
        registry.register(
            "google_request_duration_seconds",
            "Latency of Google API requests, retries included",
            google_duration.clone(),
        );
        let endpoint_requests = Family::default();
        registry.register(
            "endpoint_requests",
            "Requests to spec.endpoints URLs (each redirect hop, the origin) by probe and outcome",
            endpoint_requests.clone(),
        );
        let tokens_minted = Counter::default();
        registry.register(
            "tokens_minted",
            "Successful TokenRequests for probed ServiceAccounts",
            tokens_minted.clone(),
        );
        let reconcile_duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "reconcile_duration_seconds",
            "Duration of AuthProbe reconciles",
            reconcile_duration.clone(),
        );
        let reconcile_errors = Family::default();
        registry.register("reconcile_errors", "Reconcile errors by category", reconcile_errors.clone());
        Self {
            registry,
            serviceaccounts,
            failing,
            condition,
            last_probe,
            interval,
            google_requests,
            google_duration,
            endpoint_requests,
            tokens_minted,
            reconcile_duration,
            reconcile_errors,
            exported: Mutex::new(BTreeMap::new()),
        }
    }

    /// The text exposition of every series.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Records one Google request (all its attempts).
    pub fn google_request(&self, api: &'static str, outcome: Outcome, elapsed: Duration) {
        self.google_requests.get_or_create(&RequestLabels { api, outcome: outcome.as_str() }).inc();
        self.google_duration.get_or_create(&ApiLabels { api }).observe(elapsed.as_secs_f64());
    }

    /// Counts one request to an endpoint for `probe` (the probe whose pass sent it).
    pub fn endpoint_request(&self, probe: &str, outcome: EndpointOutcome) {
        self.endpoint_requests
            .get_or_create(&EndpointLabels { probe: probe.to_string(), outcome: outcome.as_str() })
            .inc();
    }

    /// Counts a successful TokenRequest.
    pub fn token_minted(&self) {
        self.tokens_minted.inc();
    }

    /// Records a reconcile's duration.
    pub fn reconciled(&self, elapsed: Duration) {
        self.reconcile_duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a reconcile error by its category.
    pub fn reconcile_error(&self, category: &'static str) {
        self.reconcile_errors.get_or_create(&CategoryLabels { category }).inc();
    }

    /// Exports a probe's verdict and interval; failing series of KSAs that recovered disappear.
    pub fn probe_report(&self, probe: &str, report: &Report, finished_unix: f64, interval: Duration) {
        let probe_label = || probe.to_string();
        for (result, value) in [
            ("passing", report.summary.passing),
            ("failing", report.summary.failing),
            ("unknown", report.summary.unknown),
        ] {
            self.serviceaccounts
                .get_or_create(&ResultLabels { probe: probe_label(), result })
                .set(i64::from(value));
        }
        for c in &report.conditions {
            for status in CONDITION_STATUSES {
                let labels =
                    ConditionLabels { probe: probe_label(), r#type: c.type_, status: status.as_str() };
                self.condition.get_or_create(&labels).set(i64::from(c.status == status));
            }
        }
        self.last_probe.get_or_create(&ProbeLabels { probe: probe_label() }).set(finished_unix);
        self.interval.get_or_create(&ProbeLabels { probe: probe_label() }).set(interval.as_secs_f64());
        let now: BTreeSet<FailingLabels> = report
            .entries
            .iter()
            .filter(|e| e.finding.verdict == crate::engine::Verdict::Fail)
            .map(|e| FailingLabels {
                probe: probe_label(),
                namespace: e.namespace.clone(),
                serviceaccount: e.name.clone(),
                stage: e.finding.stage.as_str(),
                reason: e.finding.reason.as_str(),
            })
            .collect();
        let Ok(mut exported) = self.exported.lock() else {
            return;
        };
        for gone in exported.get(probe).into_iter().flatten().filter(|l| !now.contains(l)) {
            self.failing.remove(gone);
        }
        for labels in &now {
            self.failing.get_or_create(labels).set(1);
        }
        exported.insert(probe.to_string(), now);
    }

    /// Drops every series of a deleted probe.
    pub fn forget_probe(&self, probe: &str) {
        for result in ["passing", "failing", "unknown"] {
            self.serviceaccounts.remove(&ResultLabels { probe: probe.to_string(), result });
        }
        for type_ in crate::api::condition::ALL {
            for status in CONDITION_STATUSES {
                self.condition.remove(&ConditionLabels {
                    probe: probe.to_string(),
                    r#type: type_,
                    status: status.as_str(),
                });
            }
        }
        self.last_probe.remove(&ProbeLabels { probe: probe.to_string() });
        self.interval.remove(&ProbeLabels { probe: probe.to_string() });
        for outcome in EndpointOutcome::ALL {
            self.endpoint_requests
                .remove(&EndpointLabels { probe: probe.to_string(), outcome: outcome.as_str() });
        }
        if let Ok(mut exported) = self.exported.lock() {
            for labels in exported.remove(probe).into_iter().flatten() {
                self.failing.remove(&labels);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{Reason, Stage},
        engine::{Finding, report::KsaOutcome},
    };

    fn report(failing: &[&str]) -> Report {
        let outcomes: Vec<KsaOutcome> = ["billing", "checkout", "ledger"]
            .iter()
            .map(|ns| KsaOutcome {
                namespace: (*ns).into(),
                name: "app".into(),
                mapping: failing
                    .contains(ns)
                    .then(|| Finding::fail(Stage::IamPolicy, Reason::PrincipalNotMapped, "x")),
                chain: None,
            })
            .collect();
        Report::build(&outcomes, 3, false)
    }

    #[test]
    fn probe_series_follow_the_report() {
        let m = Metrics::new();
        m.probe_report("payments", &report(&["checkout"]), 1_700_000_000.0, Duration::from_secs(600));
        let text = m.encode().unwrap();
        assert!(text.contains(r#"authprobe_serviceaccounts{probe="payments",result="failing"} 1"#), "{text}");
        assert!(text.contains(r#"authprobe_serviceaccounts{probe="payments",result="passing"} 2"#));
        assert!(text.contains(
            r#"authprobe_failing_serviceaccount{probe="payments",namespace="checkout",serviceaccount="app",stage="IAMPolicy",reason="PrincipalNotMapped"} 1"#
        ));
        assert!(text.contains(r#"authprobe_condition{probe="payments",type="Ready",status="False"} 1"#));
        assert!(text.contains(r#"authprobe_condition{probe="payments",type="Ready",status="True"} 0"#));
        assert!(text.contains(r#"authprobe_last_probe_timestamp_seconds{probe="payments"} 1700000000"#));
        assert!(text.contains(r#"authprobe_probe_interval_seconds{probe="payments"} 600"#), "{text}");

        m.probe_report("payments", &report(&[]), 1_700_000_600.0, Duration::from_secs(600));
        let text = m.encode().unwrap();
        assert!(
            !text.contains("authprobe_failing_serviceaccount{"),
            "recovered KSAs drop their series: {text}"
        );
        assert!(text.contains(r#"authprobe_condition{probe="payments",type="Ready",status="True"} 1"#));

        m.endpoint_request("payments", EndpointOutcome::Ok);
        m.forget_probe("payments");
        assert!(!m.encode().unwrap().contains(r#"probe="payments""#));
    }

    #[test]
    fn request_and_reconcile_series_have_the_design_names() {
        let m = Metrics::new();
        m.google_request("iam.getIamPolicy", Outcome::Ok, Duration::from_millis(50));
        m.google_request("sts.token", Outcome::Throttled, Duration::from_millis(5));
        m.token_minted();
        m.endpoint_request("payments", EndpointOutcome::of_status(401));
        m.endpoint_request("payments", EndpointOutcome::of_status(307));
        m.endpoint_request("payments", EndpointOutcome::Timeout);
        m.reconciled(Duration::from_millis(3));
        m.reconcile_error("Kubernetes");
        let text = m.encode().unwrap();
        for series in [
            r#"authprobe_google_requests_total{api="iam.getIamPolicy",outcome="ok"} 1"#,
            r#"authprobe_google_requests_total{api="sts.token",outcome="throttled"} 1"#,
            r#"authprobe_google_request_duration_seconds_count{api="iam.getIamPolicy"} 1"#,
            "authprobe_tokens_minted_total 1",
            "authprobe_reconcile_duration_seconds_count 1",
            r#"authprobe_reconcile_errors_total{category="Kubernetes"} 1"#,
            r#"authprobe_endpoint_requests_total{probe="payments",outcome="client_error"} 1"#,
            r#"authprobe_endpoint_requests_total{probe="payments",outcome="redirect"} 1"#,
            r#"authprobe_endpoint_requests_total{probe="payments",outcome="timeout"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from:\n{text}");
        }
    }
}
