//! From per-KSA outcomes to what users see: the four conditions, the summary and the bounded,
//! ordered failure list.

use std::collections::BTreeMap;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use super::{Finding, Verdict};
use crate::{
    api::{AuthProbeStatus, Failure, MAX_FAILURES, Reason, Summary, condition},
    redact,
};

/// A condition's message is at most this long, however long the upstream answers were.
pub const MAX_CONDITION_MESSAGE_BYTES: usize = 4096;
/// A failure's message is at most this long: with at most 20 failures and four conditions, a
/// status stays under 64 KiB.
pub const MAX_FAILURE_MESSAGE_BYTES: usize = 2048;

/// What happened to one KSA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KsaOutcome {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Static, Workload, IAM-policy and provider stages: `None` when they passed. An undecided
    /// Workload finding lets the later stages run, so the chain may have run with it.
    pub mapping: Option<Finding>,
    /// The live chain: `None` when it is off or did not run; `Some(Ok)` when it passed.
    pub chain: Option<Result<(), Finding>>,
    /// The canary (stage `Canary`, counted in Ready only): `None` when it passed, is off, or has
    /// not reported yet.
    pub canary: Option<Finding>,
}

impl KsaOutcome {
    /// The finding that decides this KSA: the mapping's, else the chain's, else the canary's;
    /// failing before unknown (a failing chain finding before an undecided mapping one, a failing
    /// canary before an earlier stage that could not tell: it saw the pod fail itself).
    pub fn finding(&self) -> Option<&Finding> {
        let earlier =
            Finding::decisive(self.mapping.as_ref(), self.chain.as_ref().and_then(|c| c.as_ref().err()));
        Finding::decisive(earlier, self.canary.as_ref())
    }
}

/// `True`, `False` or `Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// Holds.
    True,
    /// Does not hold.
    False,
    /// Cannot tell.
    Unknown,
}

impl Status {
    /// As written in a condition.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

/// One condition before timestamps are attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConditionValue {
    /// `Ready`, ...
    pub type_: &'static str,
    /// The status.
    pub status: Status,
    /// The reason.
    pub reason: Reason,
    /// A sentence for people.
    pub message: String,
}

/// One failing or unknown KSA, in report order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The deciding finding.
    pub finding: Finding,
}

/// The verdict of one probe pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// Counts.
    pub summary: Summary,
    /// Ready, MappingsVerified, TokenExchangeVerified, CheckerHealthy.
    pub conditions: Vec<ConditionValue>,
    /// Every failing entry (by stage, namespace, name), then every unknown one; not yet bounded.
    pub entries: Vec<Entry>,
}

impl Report {
    /// Builds the report of a pass that checked `namespaces` namespaces.
    pub fn build(outcomes: &[KsaOutcome], namespaces: u32, token_exchange: bool) -> Self {
        let mut entries: Vec<Entry> = outcomes
            .iter()
            .filter_map(|o| {
                o.finding().map(|f| Entry {
                    namespace: o.namespace.clone(),
                    name: o.name.clone(),
                    finding: f.clone(),
                })
            })
            .collect();
        entries.sort_by(|a, b| {
            (a.finding.verdict, a.finding.stage, &a.namespace, &a.name).cmp(&(
                b.finding.verdict,
                b.finding.stage,
                &b.namespace,
                &b.name,
            ))
        });
        let count = |v: Verdict| {
            u32::try_from(entries.iter().filter(|e| e.finding.verdict == v).count()).unwrap_or(u32::MAX)
        };
        let total = u32::try_from(outcomes.len()).unwrap_or(u32::MAX);
        let (failing, unknown) = (count(Verdict::Fail), count(Verdict::Unknown));
        let summary = Summary {
            namespaces,
            service_accounts: total,
            passing: total - failing - unknown,
            failing,
            unknown,
            live_verified: None,
        };

        let ready = verdict_condition(
            condition::READY,
            entries.iter().map(|e| (e, &e.finding)),
            total,
            "ServiceAccounts",
        );
        let mapping_entries: Vec<Entry> = outcomes
            .iter()
            .filter_map(|o| {
                o.mapping.clone().map(|f| Entry {
                    namespace: o.namespace.clone(),
                    name: o.name.clone(),
                    finding: f,
                })
            })
            .collect();
        let mut mapping_sorted = mapping_entries;
        mapping_sorted.sort_by(|a, b| {
            (a.finding.verdict, a.finding.stage, &a.namespace).cmp(&(
                b.finding.verdict,
                b.finding.stage,
                &b.namespace,
            ))
        });
        let mappings = verdict_condition(
            condition::MAPPINGS_VERIFIED,
            mapping_sorted.iter().map(|e| (e, &e.finding)),
            total,
            "mappings",
        );
        let exchange = exchange_condition(outcomes, token_exchange);
        let checker = match entries.iter().find(|e| e.finding.reason.blames_the_checker()) {
            Some(e) => ConditionValue {
                type_: condition::CHECKER_HEALTHY,
                status: Status::False,
                reason: e.finding.reason,
                message: format!("authprobe's own access is failing: {}", e.finding.message),
            },
            None => ConditionValue {
                type_: condition::CHECKER_HEALTHY,
                status: Status::True,
                reason: Reason::Verified,
                message: "authprobe can read what it needs from Kubernetes and Google".into(),
            },
        };
        Report { summary, conditions: vec![ready, mappings, exchange, checker], entries }
    }

    /// The report of a spec the controller cannot check: Ready False, the rest Unknown, zero counts.
    pub fn invalid(message: &str) -> Self {
        let message = format!("the spec cannot be checked: {message}");
        let c = |type_, status| ConditionValue {
            type_,
            status,
            reason: Reason::InvalidSpec,
            message: message.clone(),
        };
        Report {
            summary: Summary::default(),
            conditions: vec![
                c(condition::READY, Status::False),
                c(condition::MAPPINGS_VERIFIED, Status::Unknown),
                c(condition::TOKEN_EXCHANGE_VERIFIED, Status::Unknown),
                c(condition::CHECKER_HEALTHY, Status::True),
            ],
            entries: vec![],
        }
    }

    /// The condition of `type_`.
    pub fn condition(&self, type_: &str) -> Option<&ConditionValue> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

fn verdict_condition<'a>(
    type_: &'static str,
    mut findings: impl Iterator<Item = (&'a Entry, &'a Finding)> + Clone,
    total: u32,
    noun: &str,
) -> ConditionValue {
    let failing = findings.clone().filter(|(_, f)| f.verdict == Verdict::Fail).count();
    let unknown = findings.clone().filter(|(_, f)| f.verdict == Verdict::Unknown).count();
    match findings.next() {
        None => ConditionValue {
            type_,
            status: Status::True,
            reason: Reason::Verified,
            message: format!("all {total} ServiceAccounts verified"),
        },
        Some((entry, first)) => {
            let status = if first.verdict == Verdict::Fail { Status::False } else { Status::Unknown };
            let headline = if failing > 0 {
                format!("{failing} of {total} {noun} failing")
            } else {
                format!("{unknown} of {total} {noun} could not be checked")
            };
            ConditionValue {
                type_,
                status,
                reason: first.reason,
                message: format!(
                    "{headline}; first: {}/{} {}: {}",
                    entry.namespace, entry.name, first.reason, first.message
                ),
            }
        }
    }
}

fn exchange_condition(outcomes: &[KsaOutcome], token_exchange: bool) -> ConditionValue {
    let type_ = condition::TOKEN_EXCHANGE_VERIFIED;
    if !token_exchange {
        return ConditionValue {
            type_,
            status: Status::Unknown,
            reason: Reason::Disabled,
            message: "the live chain is off (probe.tokenExchange: false); no token is minted".into(),
        };
    }
    let mut chain: Vec<(&KsaOutcome, &Finding)> = outcomes
        .iter()
        .filter_map(|o| o.chain.as_ref().and_then(|c| c.as_ref().err()).map(|f| (o, f)))
        .collect();
    chain.sort_by(|a, b| {
        (a.1.verdict, a.1.stage, &a.0.namespace, &a.0.name).cmp(&(
            b.1.verdict,
            b.1.stage,
            &b.0.namespace,
            &b.0.name,
        ))
    });
    let total = outcomes.len();
    let not_run: Vec<&KsaOutcome> = outcomes.iter().filter(|o| o.chain.is_none()).collect();
    match (chain.first(), not_run.first()) {
        (Some((o, f)), _) => {
            let failing = chain.iter().filter(|(_, f)| f.verdict == Verdict::Fail).count();
            let status = if f.verdict == Verdict::Fail { Status::False } else { Status::Unknown };
            let headline = if failing > 0 {
                format!("{failing} of {total} exchanges failing")
            } else {
                format!("{} of {total} exchanges undecided", chain.len())
            };
            ConditionValue {
                type_,
                status,
                reason: f.reason,
                message: format!("{headline}; first: {}/{} {}: {}", o.namespace, o.name, f.reason, f.message),
            }
        }
        (None, Some(o)) => match not_run.iter().filter(|o| o.mapping.is_none()).count() {
            0 => ConditionValue {
                type_,
                status: Status::Unknown,
                reason: o.mapping.as_ref().map_or(Reason::Disabled, |f| f.reason),
                message: format!(
                    "the live chain did not run for {} of {total} ServiceAccounts, whose mapping failed first",
                    not_run.len()
                ),
            },
            // Waiting for a first exchange the quota share has not allowed yet.
            waiting => ConditionValue {
                type_,
                status: Status::Unknown,
                reason: Reason::GoogleThrottled,
                message: format!(
                    "the live chain has not run yet for {waiting} of {total} ServiceAccounts: each waits for its first exchange within authprobe's share of Google's quota (--google-quota-share)"
                ),
            },
        },
        (None, None) => ConditionValue {
            type_,
            status: Status::True,
            reason: Reason::Verified,
            message: format!("the live chain succeeded for all {total} ServiceAccounts"),
        },
    }
}

/// When each KSA's current reason was first seen, keyed by (namespace, name).
pub type Since = BTreeMap<(String, String), (Reason, Timestamp)>;

/// Assembles the status: conditions keep `lastTransitionTime` unless their status changes, and
/// failures are bounded to 20 with the time each reason was first seen.
pub fn to_status(
    report: &Report,
    previous: Option<&AuthProbeStatus>,
    generation: Option<i64>,
    now: Timestamp,
    since: &Since,
) -> AuthProbeStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let conditions = report
        .conditions
        .iter()
        .map(|c| {
            let unchanged = previous_conditions
                .iter()
                .find(|p| p.type_ == c.type_)
                .filter(|p| p.status == c.status.as_str());
            Condition {
                type_: c.type_.to_string(),
                status: c.status.as_str().to_string(),
                reason: c.reason.as_str().to_string(),
                message: redact::message(&c.message, MAX_CONDITION_MESSAGE_BYTES),
                observed_generation: generation,
                last_transition_time: unchanged.map_or(Time(now), |p| p.last_transition_time.clone()),
            }
        })
        .collect();
    let failures = report
        .entries
        .iter()
        .take(MAX_FAILURES)
        .map(|e| Failure {
            namespace: e.namespace.clone(),
            service_account: e.name.clone(),
            stage: e.finding.stage,
            reason: e.finding.reason,
            message: redact::message(&e.finding.message, MAX_FAILURE_MESSAGE_BYTES),
            since: Time(
                since
                    .get(&(e.namespace.clone(), e.name.clone()))
                    .filter(|(reason, _)| *reason == e.finding.reason)
                    .map_or(now, |(_, t)| *t),
            ),
            workloads: e.finding.workloads.clone(),
        })
        .collect();
    AuthProbeStatus {
        observed_generation: generation,
        last_probe_time: Some(Time(now)),
        summary: Some(report.summary),
        conditions,
        failures,
    }
}

/// Whether two statuses say the same thing, ignoring when it was said (`lastProbeTime`).
pub fn same_verdict(a: &AuthProbeStatus, b: &AuthProbeStatus) -> bool {
    a.observed_generation == b.observed_generation
        && a.summary == b.summary
        && a.failures == b.failures
        && a.conditions.len() == b.conditions.len()
        && a.conditions.iter().zip(&b.conditions).all(|(x, y)| {
            (&x.type_, &x.status, &x.reason, &x.message, x.observed_generation)
                == (&y.type_, &y.status, &y.reason, &y.message, y.observed_generation)
        })
}
