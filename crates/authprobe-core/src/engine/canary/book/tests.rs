use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::*;
use crate::{
    api::{Failure, Reason},
    engine::canary::Source,
};

const HOUR: Duration = Duration::from_secs(3600);

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn report(fingerprint: Option<&str>) -> Report {
    Report {
        first_token_ms: Some(120),
        attempts: 1,
        fingerprint: fingerprint.map(str::to_string),
        ..Report::new(Source::MetadataServer)
    }
}

fn seen(name: &str, created: &str, run: Run) -> Option<JobSeen> {
    Some(JobSeen {
        name: name.into(),
        created: at(created),
        service_account: "app".into(),
        compare_fingerprint: None,
        run,
    })
}

#[test]
fn a_run_is_launched_observed_and_due_again_after_every() {
    let mut book = Book::seed("Deployment/api", None);
    let t0 = at("2026-01-01T00:00:00Z");
    assert!(book.due("ns", HOUR, t0, false), "never ran");
    book.launched("ns", "job-1".into(), "app".into(), t0);
    assert!(!book.due("ns", HOUR, t0, true), "one in flight, even when forced");
    // The cache has not seen the new Job yet: still in flight.
    book.observe("ns", None, at("2026-01-01T00:00:01Z"));
    assert!(book.track("ns").unwrap().in_flight());
    book.observe("ns", seen("job-1", "2026-01-01T00:00:00Z", Run::Running), at("2026-01-01T00:00:05Z"));
    assert!(book.track("ns").unwrap().ran());
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::Finished(report(Some("aaa")))),
        at("2026-01-01T00:00:09Z"),
    );
    let track = book.track("ns").unwrap();
    assert!(!track.in_flight());
    assert_eq!(
        track.outcome,
        Some(Outcome::Reported {
            job: "job-1".into(),
            started: at("2026-01-01T00:00:00Z"),
            report: report(Some("aaa"))
        })
    );
    assert_eq!(track.fingerprint.as_deref(), Some("aaa"));
    assert!(book.changes().is_empty(), "a first fingerprint is no change");
    assert!(!book.due("ns", HOUR, at("2026-01-01T00:59:59Z"), false));
    assert!(book.due("ns", HOUR, at("2026-01-01T00:59:59Z"), true), "probe-now runs one sooner");
    assert!(book.due("ns", HOUR, at("2026-01-01T01:00:00Z"), false));
    assert_eq!(book.next_due(HOUR), Some(at("2026-01-01T01:00:00Z")));
    // Once the TTL removed the Job, its outcome stays.
    book.observe("ns", None, at("2026-01-01T00:30:00Z"));
    assert!(book.track("ns").unwrap().outcome.is_some());
}

#[test]
fn a_changed_fingerprint_is_announced_once() {
    let mut book = Book::seed("Deployment/api", None);
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::Finished(report(Some("aaa")))),
        at("2026-01-01T00:00:09Z"),
    );
    // A run without a fingerprint keeps the last one and is no change.
    book.observe(
        "ns",
        seen("job-2", "2026-01-01T01:00:00Z", Run::Finished(report(None))),
        at("2026-01-01T01:00:09Z"),
    );
    assert!(book.changes().is_empty());
    assert_eq!(book.track("ns").unwrap().fingerprint.as_deref(), Some("aaa"));
    book.observe(
        "ns",
        seen("job-3", "2026-01-01T02:00:00Z", Run::Finished(report(Some("bbb")))),
        at("2026-01-01T02:00:09Z"),
    );
    let change = Change {
        namespace: "ns".into(),
        service_account: "app".into(),
        job: "job-3".into(),
        from: "aaa".into(),
        to: "bbb".into(),
    };
    assert_eq!(book.changes(), vec![change.clone()]);
    // Seen again (the next pass, the Job still cached): taken in once.
    book.observe(
        "ns",
        seen("job-3", "2026-01-01T02:00:00Z", Run::Finished(report(Some("bbb")))),
        at("2026-01-01T02:01:00Z"),
    );
    assert_eq!(book.changes(), vec![change], "not yet announced: still there");
    book.announced("ns");
    assert!(book.changes().is_empty());
    book.observe(
        "ns",
        seen("job-3", "2026-01-01T02:00:00Z", Run::Finished(report(Some("bbb")))),
        at("2026-01-01T02:02:00Z"),
    );
    assert!(book.changes().is_empty());
}

#[test]
fn a_restarted_operator_compares_with_what_the_job_carries() {
    let mut book = Book::seed("Deployment/api", None);
    let mut job = seen("job-9", "2026-01-01T00:00:00Z", Run::Finished(report(Some("bbb")))).unwrap();
    job.compare_fingerprint = Some("aaa".into());
    book.observe("ns", Some(job), at("2026-01-01T00:00:09Z"));
    assert_eq!(book.changes().len(), 1);
}

#[test]
fn no_verdict_from_a_half_result() {
    let mut book = Book::seed("Deployment/api", None);
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::Finished(report(Some("aaa")))),
        at("2026-01-01T00:00:09Z"),
    );
    let before = book.track("ns").unwrap().outcome.clone();
    book.observe("ns", seen("job-2", "2026-01-01T01:00:00Z", Run::Running), at("2026-01-01T01:00:05Z"));
    assert_eq!(book.track("ns").unwrap().outcome, before, "a running canary says nothing yet");
    book.observe(
        "ns",
        seen("job-2", "2026-01-01T01:00:00Z", Run::Incomplete("killed".into())),
        at("2026-01-01T01:00:06Z"),
    );
    let track = book.track("ns").unwrap();
    assert_eq!(track.outcome, before, "a killed canary says nothing at all");
    assert!(!track.in_flight());
    // A Job that vanished before it reported: in flight while the cache may lag, then gone.
    book.launched("ns", "job-3".into(), "app".into(), at("2026-01-01T02:00:00Z"));
    book.observe("ns", None, at("2026-01-01T02:02:59Z"));
    assert!(book.track("ns").unwrap().in_flight());
    book.observe("ns", None, at("2026-01-01T02:03:00Z"));
    assert!(!book.track("ns").unwrap().in_flight());
    assert_eq!(book.track("ns").unwrap().outcome, before);
}

#[test]
fn a_job_that_cannot_run_is_not_scheduled_until_one_runs() {
    let mut book = Book::seed("Deployment/api", None);
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::Blocked("unschedulable".into())),
        at("2026-01-01T00:00:05Z"),
    );
    let not_scheduled = Some(Outcome::NotScheduled { job: "job-1".into(), why: "unschedulable".into() });
    assert_eq!(book.track("ns").unwrap().outcome, not_scheduled);
    assert!(book.track("ns").unwrap().in_flight(), "it may still be scheduled");
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::NeverRan("deadline".into())),
        at("2026-01-01T00:02:00Z"),
    );
    assert!(!book.track("ns").unwrap().in_flight());
    book.refused("ns", "job-2".into(), "app".into(), "forbidden".into(), at("2026-01-01T01:00:00Z"));
    assert_eq!(
        book.track("ns").unwrap().outcome,
        Some(Outcome::NotScheduled { job: "job-2".into(), why: "forbidden".into() })
    );
    assert!(book.due("ns", HOUR, at("2026-01-01T02:00:00Z"), false));
    book.observe(
        "ns",
        seen("job-3", "2026-01-01T02:00:00Z", Run::Finished(report(None))),
        at("2026-01-01T02:00:09Z"),
    );
    assert!(matches!(book.track("ns").unwrap().outcome, Some(Outcome::Reported { .. })));
}

#[test]
fn an_older_job_in_the_cache_is_not_taken_for_the_new_one() {
    let mut book = Book::seed("Deployment/api", None);
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::Finished(report(Some("aaa")))),
        at("2026-01-01T00:00:09Z"),
    );
    book.launched("ns", "job-2".into(), "app".into(), at("2026-01-01T01:00:00Z"));
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::Finished(report(Some("aaa")))),
        at("2026-01-01T01:00:01Z"),
    );
    assert_eq!(book.track("ns").unwrap().job.as_deref(), Some("job-2"));
    assert!(book.track("ns").unwrap().in_flight());
}

#[test]
fn a_seeded_book_carries_the_canary_failures_status_lists() {
    let failure = |ns: &str, stage, reason| Failure {
        namespace: ns.into(),
        service_account: "app".into(),
        stage,
        reason,
        message: "as before".into(),
        since: Time(Timestamp::UNIX_EPOCH),
        workloads: vec![],
    };
    let status = AuthProbeStatus {
        failures: vec![
            failure("a", Stage::Canary, Reason::MetadataServerSlowStart),
            failure("b", Stage::Canary, Reason::CanaryNotScheduled),
            failure("c", Stage::IamPolicy, Reason::PrincipalNotMapped),
        ],
        ..AuthProbeStatus::default()
    };
    let mut book = Book::seed("Deployment/api", Some(&status));
    assert_eq!(book.workload(), "Deployment/api");
    assert_eq!(
        book.track("a").unwrap().outcome,
        Some(Outcome::Carried(Finding::fail(Stage::Canary, Reason::MetadataServerSlowStart, "as before")))
    );
    assert_eq!(
        book.track("b").unwrap().outcome,
        Some(Outcome::Carried(Finding::unknown(Stage::Canary, Reason::CanaryNotScheduled, "as before")))
    );
    assert!(book.track("c").is_none());
    assert!(book.due("a", HOUR, Timestamp::UNIX_EPOCH, false), "a new run replaces it at once");
    book.retain(&BTreeSet::from(["b".to_string()]));
    assert!(book.track("a").is_none() && book.track("b").is_some());
    // A namespace without the workload: nothing to say, and not looked at again until `every`.
    book.skipped("b", at("2026-01-01T00:00:00Z"));
    assert_eq!(book.track("b").unwrap().outcome, None);
    assert!(!book.due("b", HOUR, at("2026-01-01T00:30:00Z"), false));
}

#[test]
fn a_ksa_change_after_a_run_makes_its_report_stale_and_a_new_run_due() {
    let mut book = Book::seed("Deployment/api", None);
    // The operator's clock is finer than the Jobs' creationTimestamp: both count in seconds.
    book.launched("ns", "job-1".into(), "app".into(), at("2026-01-01T00:00:00.700Z"));
    book.observe(
        "ns",
        seen("job-1", "2026-01-01T00:00:00Z", Run::Finished(report(Some("aaa")))),
        at("2026-01-01T00:00:09Z"),
    );
    let track = book.track("ns").unwrap();
    assert_eq!(track.job.as_deref(), Some("job-1"), "its own Job, though created 0.7 s \"earlier\"");
    assert!(!track.predates(at("2026-01-01T00:00:00.900Z")), "a change within the run's second");
    assert!(!track.reported_before(at("2026-01-01T00:00:00Z")));
    let annotated = at("2026-01-01T00:10:00Z");
    assert!(track.predates(annotated) && track.reported_before(annotated));
    book.launched("ns", "job-2".into(), "app".into(), at("2026-01-01T00:10:01Z"));
    let track = book.track("ns").unwrap();
    assert!(!track.predates(annotated), "the new run is after the change");
    assert!(track.reported_before(annotated), "until it reports, the old report is still stale");
}
