//! When each KSA's live chain runs: at most once per `tokenExchangeInterval` (T), spread evenly
//! over it, within the Google quota share, and at once when its inputs change.
//!
//! KSA `i` of `n` (in selection order) has its slot at `epoch + i·T/n + m·T`. After a live
//! verification at `v`, a KSA is next due at its first slot after `v`, so from the second window on
//! exchanges come evenly, `n` per window, never in a burst at a window boundary, and no KSA's
//! verification is ever older than T. A KSA never verified, or whose inputs (annotation, UID,
//! policy, provider, cluster keys) changed since its last verification, jumps the queue: it is due
//! at once and goes before every scheduled one. A chain that could not decide (Google throttled
//! or down, the API server failing) is retried after the mapping interval. Every pass takes at
//! most `budget` KSAs, the rest wait for the next pass. When the budget is what holds the first
//! sweep back (thousands of KSAs at a small quota share), a KSA run out of turn skips a slot less
//! than half a window away, so the sweep's own spacing carries into the next window instead of
//! every KSA being exchanged twice in the first. Between verifications a KSA keeps its last
//! live verdict, carried here, not re-judged.
//!
//! All of it is data in, data out: the controller keeps the [`LiveLedger`] per probe, and the
//! probe pass runs the chain for exactly the KSAs [`LiveLedger::schedule`] names.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::{Finding, Verdict};

/// A KSA, by namespace and name.
pub type KsaKey = (String, String);

/// A minted token's claims and signing key id (never the token), kept for the Federation
/// provider checks of the passes that do not mint.
pub type MintedClaims = Arc<(serde_json::Value, Option<String>)>;

/// The last live verification of one KSA.
#[derive(Clone, Debug)]
pub struct LiveRecord {
    /// When the chain's verdict was reached.
    pub verified_at: Timestamp,
    /// When the chain must run again.
    pub next_due: Timestamp,
    /// The inputs it was judged on (see [`inputs_fingerprint`]); `None`: not known.
    pub inputs: Option<u64>,
    /// The chain's verdict before the propagation grace (`None`: the mapping failed first; it is
    /// tried again after the mapping interval, like an undecided one).
    pub verdict: Option<Result<(), Finding>>,
    /// The minted token's claims, when one was minted.
    pub claims: Option<MintedClaims>,
}

impl LiveRecord {
    fn succeeded(&self) -> bool {
        matches!(self.verdict, Some(Ok(())))
    }

    fn undecided(&self) -> bool {
        matches!(&self.verdict, Some(Err(f)) if f.verdict == Verdict::Unknown)
    }
}

/// Why a KSA's chain runs in this pass, in priority order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Why {
    /// Its inputs changed since its last verification.
    Changed,
    /// Never verified (new, newly in scope, or the operator just started).
    New,
    /// Its slot came (or its undecided chain is retried).
    Scheduled,
}

/// One KSA whose chain runs now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// The KSA.
    pub key: KsaKey,
    /// Why.
    pub why: Why,
    /// Cached exchanges younger than this may serve it: only one made after this probe's last
    /// verification (by another probe sharing the KSA), none for a changed KSA.
    pub max_age: Duration,
}

/// A KSA the pass could run the chain for, with the fingerprint of its inputs.
#[derive(Clone, Copy, Debug)]
pub struct Wanted<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// [`inputs_fingerprint`]; `None` while some input could not be read (not a change).
    pub inputs: Option<u64>,
}

/// What a pass should do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// The KSAs whose chain runs now, in priority order, at most the budget.
    pub due: Vec<Due>,
    /// Due but over the budget: they wait for the next pass.
    pub deferred: usize,
}

/// One chain run, for [`LiveLedger::verified`].
#[derive(Clone, Debug)]
pub struct Run {
    /// The chain's verdict before the grace (`None`: the mapping failed first).
    pub verdict: Option<Result<(), Finding>>,
    /// The minted token's claims.
    pub claims: Option<MintedClaims>,
    /// When an endpoint's answer still on its way will be in.
    pub answer_by: Option<Timestamp>,
    /// When the run finished.
    pub at: Timestamp,
    /// Run out of turn (new or changed) in a pass that had to defer others for the budget.
    pub crowded: bool,
}

impl Run {
    /// A run that finished at `at` with `verdict`.
    pub fn at(at: Timestamp, verdict: Option<Result<(), Finding>>) -> Self {
        Self { verdict, claims: None, answer_by: None, at, crowded: false }
    }
}

/// How a probe's chains are scheduled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cadence {
    /// `tokenExchangeInterval`: every KSA's chain runs at least this often.
    pub every: Duration,
    /// `interval`: an undecided chain is retried this long after.
    pub retry: Duration,
    /// At most this many chains per pass (the quota share's exchanges in a pass).
    pub budget: usize,
}

/// Passes that only run scheduled chains come at least this far apart: slots closer than that are
/// served together.
pub const CHAIN_TICK: Duration = Duration::from_secs(5);

/// One probe's live verifications.
#[derive(Clone, Debug, Default)]
pub struct LiveLedger {
    records: BTreeMap<KsaKey, LiveRecord>,
    /// The start of the first window: slots are counted from here.
    epoch: Option<Timestamp>,
}

fn key(w: &Wanted<'_>) -> KsaKey {
    (w.namespace.to_string(), w.name.to_string())
}

fn elapsed(from: Timestamp, to: Timestamp) -> Duration {
    Duration::try_from(to.duration_since(from)).unwrap_or(Duration::ZERO)
}

fn later(t: Timestamp, by: Duration) -> Timestamp {
    SignedDuration::try_from(by).ok().and_then(|d| t.checked_add(d).ok()).unwrap_or(Timestamp::MAX)
}

impl LiveLedger {
    /// The last verification of a KSA.
    pub fn record(&self, namespace: &str, name: &str) -> Option<&LiveRecord> {
        self.records.get(&(namespace.to_string(), name.to_string()))
    }

    /// Which of `wanted` (in selection order) run their chain now.
    pub fn schedule(&self, wanted: &[Wanted<'_>], cadence: Cadence, now: Timestamp) -> Schedule {
        let mut due: Vec<(Why, Timestamp, Due)> = wanted
            .iter()
            .filter_map(|w| {
                let key = key(w);
                let Some(record) = self.records.get(&key) else {
                    return Some((Why::New, now, Due { key, why: Why::New, max_age: cadence.every }));
                };
                if w.inputs.is_some() && w.inputs != record.inputs {
                    return Some((
                        Why::Changed,
                        now,
                        Due { key, why: Why::Changed, max_age: Duration::ZERO },
                    ));
                }
                (record.next_due <= now).then(|| {
                    let max_age = elapsed(record.verified_at, now);
                    (Why::Scheduled, record.next_due, Due { key, why: Why::Scheduled, max_age })
                })
            })
            .collect();
        // Changed, then new, then the longest overdue; stable, so selection order breaks ties.
        due.sort_by_key(|(why, at, _)| (*why, *at));
        let deferred = due.len().saturating_sub(cadence.budget);
        due.truncate(cadence.budget);
        Schedule { due: due.into_iter().map(|(_, _, d)| d).collect(), deferred }
    }

    /// The slot of KSA `index` of `count` that first comes after `after`.
    fn next_slot(&mut self, index: usize, count: usize, every: Duration, after: Timestamp) -> Timestamp {
        let epoch = *self.epoch.get_or_insert(after);
        let every_ns = every.as_nanos().max(1) as i128;
        let offset = every_ns * index as i128 / count.max(1) as i128;
        let since = after.as_nanosecond() - epoch.as_nanosecond() - offset;
        let windows = if since < 0 { 0 } else { since / every_ns + 1 };
        let slot = epoch.as_nanosecond() + offset + windows * every_ns;
        Timestamp::from_nanosecond(slot).unwrap_or(Timestamp::MAX)
    }

    /// Records the chain run for `wanted[index]` (`count` KSAs wanted in all).
    pub fn verified(&mut self, wanted: &Wanted<'_>, index: usize, count: usize, cadence: Cadence, run: Run) {
        let Run { verdict, claims, answer_by, at, crowded } = run;
        let mut next_due = self.next_slot(index, count, cadence.every, at);
        if crowded && elapsed(at, next_due) < cadence.every / 2 {
            // The quota is the bottleneck: a KSA run out of turn skips a slot this close rather
            // than be exchanged twice in one window (its verification is then up to 1.5 windows old).
            next_due = later(next_due, cadence.every);
        }
        let mut record = LiveRecord { verified_at: at, next_due, inputs: wanted.inputs, verdict, claims };
        if record.undecided() || record.verdict.is_none() {
            record.next_due = record.next_due.min(later(at, cadence.retry.min(cadence.every)));
        }
        if let Some(by) = answer_by {
            record.next_due = record.next_due.min(by.max(later(at, CHAIN_TICK)));
        }
        if record.inputs.is_none() {
            // An input that could not be read keeps the fingerprint it was last judged on.
            record.inputs = self.records.get(&key(wanted)).and_then(|r| r.inputs);
        }
        self.records.insert(key(wanted), record);
    }

    /// Forgets every KSA not in `wanted`: one back in scope later is new again.
    pub fn retain(&mut self, wanted: &[Wanted<'_>]) {
        let keep: std::collections::BTreeSet<KsaKey> = wanted.iter().map(key).collect();
        self.records.retain(|k, _| keep.contains(k));
        if self.records.is_empty() {
            self.epoch = None;
        }
    }

    /// How many of `wanted` were verified live, successfully, within `every` before `now`.
    pub fn live_verified(&self, wanted: &[Wanted<'_>], every: Duration, now: Timestamp) -> u32 {
        let count = wanted
            .iter()
            .filter_map(|w| self.records.get(&key(w)))
            .filter(|r| r.succeeded() && elapsed(r.verified_at, now) < every)
            .count();
        u32::try_from(count).unwrap_or(u32::MAX)
    }

    /// When the next pass should come for the chains: the earliest slot of `wanted`, at least
    /// [`CHAIN_TICK`] from `now`; at [`CHAIN_TICK`] when some were deferred; `None` without records.
    pub fn next_pass(&self, wanted: &[Wanted<'_>], deferred: usize, now: Timestamp) -> Option<Timestamp> {
        let earliest = later(now, CHAIN_TICK);
        if deferred > 0 {
            return Some(earliest);
        }
        wanted.iter().filter_map(|w| self.records.get(&key(w))).map(|r| r.next_due.max(earliest)).min()
    }
}

/// A fingerprint of what a KSA's live verdict depends on, from their `Debug` forms: its UID and
/// annotation, its GSA's account and policy, the provider and the cluster's keys (Federation).
/// The forms are streamed into the hasher, never built as strings: a policy's can be kilobytes.
pub fn inputs_fingerprint(parts: &[&dyn std::fmt::Debug]) -> u64 {
    use std::{fmt::Write, hash::Hasher};
    struct Streamed<'h>(&'h mut std::collections::hash_map::DefaultHasher);
    impl Write for Streamed<'_> {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0.write(s.as_bytes());
            Ok(())
        }
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for part in parts {
        // Writing to the hasher cannot fail.
        let _ = write!(Streamed(&mut hasher), "{part:?}");
        // Where one part ends, so ("ab", "c") and ("a", "bc") differ.
        hasher.write_u8(0xff);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Reason, Stage};

    const MINUTE: Duration = Duration::from_secs(60);

    fn t(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("ns-{i:02}")).collect()
    }

    fn wanted<'a>(names: &'a [String], inputs: &[u64]) -> Vec<Wanted<'a>> {
        names
            .iter()
            .zip(inputs)
            .map(|(n, i)| Wanted { namespace: n, name: "app", inputs: Some(*i) })
            .collect()
    }

    fn cadence(budget: usize) -> Cadence {
        Cadence { every: MINUTE, retry: 10 * MINUTE, budget }
    }

    /// Runs passes every `tick` seconds from `from` to `to`, recording every due chain as passed;
    /// returns the second of each run, per KSA.
    fn simulate(
        ledger: &mut LiveLedger,
        w: &[Wanted<'_>],
        c: Cadence,
        (from, to, tick): (i64, i64, i64),
    ) -> BTreeMap<String, Vec<i64>> {
        let mut runs: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut now = from;
        while now <= to {
            let s = ledger.schedule(w, c, t(now));
            for d in &s.due {
                let i = w.iter().position(|x| x.namespace == d.key.0).unwrap();
                ledger.verified(&w[i], i, w.len(), c, Run::at(t(now), Some(Ok(()))));
                runs.entry(d.key.0.clone()).or_default().push(now);
            }
            now += tick;
        }
        runs
    }

    #[test]
    fn never_verified_ksas_go_first_then_each_at_its_own_slot() {
        let n = names(12);
        let w = wanted(&n, &[1; 12]);
        let mut ledger = LiveLedger::default();
        let first = ledger.schedule(&w, cadence(100), t(0));
        assert_eq!(first.due.len(), 12, "every KSA is new");
        assert!(first.due.iter().all(|d| d.why == Why::New && d.max_age == MINUTE));
        let runs = simulate(&mut ledger, &w, cadence(100), (0, 600, 1));
        // KSA i of 12 over a minute: its slot is at 5·i seconds into every window.
        for (i, name) in n.iter().enumerate() {
            let times = &runs[name];
            assert_eq!(times[0], 0, "{name} first runs at once");
            let slot = 5 * i as i64;
            let expected: Vec<i64> = std::iter::once(0)
                .chain((0..=10).map(|m| slot + 60 * m).filter(|s| *s > 0 && *s <= 600))
                .collect();
            assert_eq!(times, &expected, "{name}");
            for pair in times.windows(2) {
                assert!(pair[1] - pair[0] <= 60, "{name}: never older than the interval: {times:?}");
            }
        }
    }

    #[test]
    fn from_the_second_window_on_exchanges_are_spread_evenly() {
        let n = names(12);
        let w = wanted(&n, &[1; 12]);
        let mut ledger = LiveLedger::default();
        let runs = simulate(&mut ledger, &w, cadence(100), (0, 600, 1));
        let mut per_second: BTreeMap<i64, usize> = BTreeMap::new();
        for at in runs.values().flatten().filter(|at| **at >= 60) {
            *per_second.entry(*at).or_default() += 1;
        }
        // One exchange every 5 s, never two at once: no burst at a window boundary.
        assert!(per_second.values().all(|c| *c == 1), "{per_second:?}");
        for window in 1..10 {
            let within =
                runs.values().flatten().filter(|at| (60 * window..60 * (window + 1)).contains(*at)).count();
            assert_eq!(within, 12, "window {window}: each KSA once");
        }
    }

    #[test]
    fn a_changed_ksa_jumps_the_queue_and_is_exchanged_fresh() {
        let n = names(12);
        let mut ledger = LiveLedger::default();
        simulate(&mut ledger, &wanted(&n, &[1; 12]), cadence(100), (0, 100, 1));
        let mut inputs = [1; 12];
        inputs[7] = 2;
        let w = wanted(&n, &inputs);
        // ns-07's slot is at 35 s into a window; at 101 s only ns-08 (slot 40 → 100 s) has passed.
        let s = ledger.schedule(&w, cadence(1), t(101));
        assert_eq!(s.due.len(), 1);
        assert_eq!(s.due[0].key.0, "ns-07");
        assert_eq!((s.due[0].why, s.due[0].max_age), (Why::Changed, Duration::ZERO));
        // A budget of one: the scheduled one waits for the next pass.
        let mut more = ledger.clone();
        more.records.get_mut(&("ns-08".into(), "app".into())).unwrap().next_due = t(100);
        let s = more.schedule(&w, cadence(1), t(101));
        assert_eq!((s.due[0].key.0.as_str(), s.deferred), ("ns-07", 1));
        assert_eq!(more.next_pass(&w, s.deferred, t(101)), Some(t(106)));
    }

    #[test]
    fn the_budget_caps_every_pass_and_the_backlog_goes_oldest_first() {
        let n = names(30);
        let w = wanted(&n, &[1; 30]);
        let mut ledger = LiveLedger::default();
        let c = cadence(4);
        let mut first_runs = vec![];
        let mut now = 0;
        while first_runs.len() < 30 {
            let s = ledger.schedule(&w, c, t(now));
            assert!(s.due.len() <= 4, "{} at {now}", s.due.len());
            for d in &s.due {
                let i = w.iter().position(|x| x.namespace == d.key.0).unwrap();
                ledger.verified(&w[i], i, w.len(), c, Run::at(t(now), Some(Ok(()))));
                if d.why == Why::New {
                    first_runs.push(d.key.0.clone());
                }
            }
            now += 1;
        }
        assert_eq!(first_runs, n, "new KSAs in selection order, four per pass");
        // Late slots are served longest overdue first.
        for r in ledger.records.values_mut() {
            r.next_due = t(1000);
        }
        ledger.records.get_mut(&("ns-20".into(), "app".into())).unwrap().next_due = t(900);
        let s = ledger.schedule(&w, c, t(2000));
        assert_eq!(s.due[0].key.0, "ns-20");
        assert_eq!((s.due.len(), s.deferred), (4, 26));
        let ours = ledger.record("ns-20", "app").unwrap().verified_at;
        assert_eq!(s.due[0].max_age, elapsed(ours, t(2000)), "only an exchange newer than ours is reused");
    }

    #[test]
    fn an_undecided_chain_is_retried_after_the_interval_and_counts_as_unverified() {
        let n = names(2);
        let w = wanted(&n, &[1, 1]);
        let c = Cadence { every: 60 * MINUTE, retry: 10 * MINUTE, budget: 10 };
        let mut ledger = LiveLedger::default();
        let throttled = Finding::unknown(Stage::TokenExchange, Reason::GoogleThrottled, "429");
        ledger.verified(&w[0], 0, 2, c, Run::at(t(0), Some(Err(throttled))));
        ledger.verified(&w[1], 1, 2, c, Run::at(t(0), Some(Ok(()))));
        assert_eq!(ledger.record("ns-00", "app").unwrap().next_due, t(600));
        assert_eq!(ledger.record("ns-01", "app").unwrap().next_due, t(1800), "its slot, half a window in");
        assert_eq!(ledger.live_verified(&w, c.every, t(1)), 1);
        assert_eq!(ledger.live_verified(&w, c.every, t(3600)), 0, "outside the window");
        let s = ledger.schedule(&w, c, t(600));
        assert_eq!(s.due.iter().map(|d| d.key.0.as_str()).collect::<Vec<_>>(), vec!["ns-00"]);
    }

    #[test]
    fn unreadable_inputs_are_no_change_and_ksas_out_of_scope_are_forgotten() {
        let n = names(3);
        let mut ledger = LiveLedger::default();
        let c = cadence(10);
        let w = wanted(&n, &[1, 1, 1]);
        simulate(&mut ledger, &w, c, (0, 0, 1));
        let mut blind = w.clone();
        blind[1].inputs = None;
        assert!(ledger.schedule(&blind, c, t(1)).due.is_empty());
        ledger.verified(&blind[1], 1, 3, c, Run::at(t(1), Some(Ok(()))));
        assert_eq!(ledger.record("ns-01", "app").unwrap().inputs, Some(1), "keeps what it was judged on");
        ledger.retain(&w[..2]);
        let s = ledger.schedule(&w, c, t(2));
        assert_eq!(s.due, vec![Due { key: ("ns-02".into(), "app".into()), why: Why::New, max_age: MINUTE }]);
        assert_eq!(ledger.next_pass(&w[..2], 0, t(2)), Some(t(20)), "ns-01's slot");
        assert_eq!(ledger.next_pass(&w[..2], 0, t(19)), Some(t(24)), "never sooner than a tick");
    }

    #[test]
    fn a_pending_endpoint_answer_brings_the_next_run_forward() {
        let n = names(1);
        let w = wanted(&n, &[1]);
        let c = Cadence { every: 60 * MINUTE, retry: 10 * MINUTE, budget: 10 };
        let mut ledger = LiveLedger::default();
        ledger.verified(&w[0], 0, 1, c, Run { answer_by: Some(t(2)), ..Run::at(t(0), Some(Ok(()))) });
        assert_eq!(ledger.record("ns-00", "app").unwrap().next_due, t(5), "at least a tick later");
    }

    #[test]
    fn a_sweep_held_back_by_the_budget_is_not_exchanged_twice_in_its_first_window() {
        // 3,000 KSAs over an hour at 50 a pass, a pass a minute: the sweep takes the window.
        let n = names(3000);
        let w = wanted(&n, &vec![1; 3000]);
        let c = Cadence { every: 60 * MINUTE, retry: 10 * MINUTE, budget: 50 };
        let mut ledger = LiveLedger::default();
        let (mut now, mut runs) = (0, 0);
        while now < 7200 {
            let s = ledger.schedule(&w, c, t(now));
            let crowded = s.deferred > 0;
            for d in &s.due {
                let i = w.iter().position(|x| x.namespace == d.key.0).unwrap();
                let run =
                    Run { crowded: crowded && d.why != Why::Scheduled, ..Run::at(t(now), Some(Ok(()))) };
                ledger.verified(&w[i], i, w.len(), c, run);
                runs += 1;
            }
            if now == 3540 {
                assert_eq!(runs, 3000, "every KSA once in the first hour, none twice");
            }
            now += 60;
        }
        assert!(runs <= 6000, "{runs} runs in two hours");
        assert!(ledger.records.values().all(|r| elapsed(r.verified_at, t(7200)) <= 60 * MINUTE));
        // Without the budget holding it back, the same sweep realigns at once: ages never pass T.
        let mut free = LiveLedger::default();
        let c = Cadence { budget: 10_000, ..c };
        for now in (0..7200).step_by(60) {
            for d in free.schedule(&w, c, t(now)).due {
                let i = w.iter().position(|x| x.namespace == d.key.0).unwrap();
                free.verified(&w[i], i, w.len(), c, Run::at(t(now), Some(Ok(()))));
            }
            assert_eq!(free.live_verified(&w, c.every, t(now)), 3000, "at {now}");
        }
    }

    #[test]
    fn a_fingerprint_sees_any_change_in_any_part_and_where_parts_end() {
        let members: Vec<String> =
            (0..300).map(|i| format!("serviceAccount:p.svc.id.goog[ns-{i}/app]")).collect();
        let mut one_more = members.clone();
        one_more[299].push('x');
        let uid = "0f6c1f4e-6a2b-4a4e-9d0b-2b1f5f7d3c11";
        assert_eq!(inputs_fingerprint(&[&uid, &members]), inputs_fingerprint(&[&uid, &members.clone()]));
        assert_ne!(inputs_fingerprint(&[&uid, &members]), inputs_fingerprint(&[&uid, &one_more]));
        assert_ne!(inputs_fingerprint(&[&12, &3]), inputs_fingerprint(&[&1, &23]));
        assert_ne!(inputs_fingerprint(&[&None::<u64>]), inputs_fingerprint(&[&Some(0u64)]));
    }
}
