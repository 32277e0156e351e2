//! One probe pass, shared by the operator and `authprobe check`: static checks, the Google reads
//! they call for (once per GSA, however many KSAs name it), then the engine's verdict per KSA.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::{StreamExt, stream};
use k8s_openapi::jiff::Timestamp;

use crate::{
    cluster::ClusterIssuers,
    engine::{Candidate, Facts, Plan, Prepared, annotation::GsaEmail, report::KsaOutcome, within_grace},
    google::Google,
};

/// How many Google reads run at once within one pass (the client's rate limits still apply).
const READ_CONCURRENCY: usize = 16;

/// What a pass talks to.
#[derive(Clone, Copy)]
pub struct Services<'a> {
    /// Google.
    pub google: &'a Google,
    /// The cluster's issuer and keys (Federation).
    pub issuers: &'a ClusterIssuers,
}

/// One pass over a probe's KSAs.
#[derive(Debug)]
pub struct Pass<'a> {
    /// The checked spec.
    pub plan: &'a Plan,
    /// The selected KSAs (required names included).
    pub candidates: Vec<Candidate>,
    /// Google facts older than this are read again.
    pub max_age: Duration,
    /// The pass's clock.
    pub now: Timestamp,
}

/// Evaluates every candidate. `changed_at` says when a KSA last changed in a way that opens the
/// propagation grace (creation, annotation, entering scope); GSA policy changes are added here.
pub async fn evaluate(
    services: Services<'_>,
    pass: Pass<'_>,
    changed_at: impl Fn(&Candidate) -> Option<Timestamp>,
) -> Vec<KsaOutcome> {
    let Pass { plan, candidates, max_age, now } = pass;
    let suggestion = most_common_gsa(plan, &candidates);
    let prepared: Vec<(Candidate, Result<Prepared, crate::engine::Finding>)> = candidates
        .into_iter()
        .map(|c| {
            let p = plan.static_check(&c, suggestion.as_ref());
            (c, p)
        })
        .collect();

    let mut wanted: Vec<GsaEmail> =
        prepared.iter().filter_map(|(_, p)| p.as_ref().ok()?.gsa.clone()).collect();
    wanted.sort();
    wanted.dedup();
    let google = services.google;
    let gsas: BTreeMap<GsaEmail, Arc<crate::engine::GsaFacts>> = stream::iter(wanted)
        .map(|gsa: GsaEmail| async move {
            let facts = google.gsa(&gsa, max_age).await;
            (gsa, facts)
        })
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    let (provider, cluster) = match &plan.federation {
        Some(f) => {
            let (provider, cluster) =
                tokio::join!(services.google.provider(f, max_age), services.issuers.get(max_age));
            (Some(provider), Some(cluster))
        }
        None => (None, None),
    };
    let facts =
        Facts { gsas: &gsas, provider: provider.as_deref(), cluster: cluster.as_ref(), now: now.as_second() };

    let policy_changes: HashMap<&GsaEmail, Timestamp> =
        gsas.keys().filter_map(|g| services.google.policy_changed_at(g).map(|t| (g, t))).collect();
    prepared
        .into_iter()
        .map(|(candidate, prepared)| {
            let mapping = prepared.and_then(|p| plan.check_mapping(&p, &facts, None).map(|_| p));
            let mapping = mapping.err().map(|finding| {
                let gsa_change = candidate
                    .ksa
                    .as_ref()
                    .and_then(|k| k.gsa_annotation.as_deref())
                    .and_then(|a| policy_changes.iter().find(|(g, _)| g.as_str() == a).map(|(_, t)| *t));
                let changed = [changed_at(&candidate), gsa_change].into_iter().flatten().max();
                within_grace(finding, changed, now, plan.grace)
            });
            KsaOutcome { namespace: candidate.namespace, name: candidate.name, mapping, chain: None }
        })
        .collect()
}

/// The allowed GSA most KSAs of this pass are annotated with: the likely value for a KSA that lacks one.
fn most_common_gsa(plan: &Plan, candidates: &[Candidate]) -> Option<GsaEmail> {
    let mut counts: BTreeMap<GsaEmail, usize> = BTreeMap::new();
    for gsa in candidates.iter().filter_map(|c| c.ksa.as_ref()?.gsa_annotation.as_deref()) {
        if let Ok(parsed) = crate::engine::annotation::parse_gsa(gsa)
            && plan.allows(&parsed)
        {
            *counts.entry(parsed).or_default() += 1;
        }
    }
    counts.into_iter().max_by_key(|(_, n)| *n).map(|(g, _)| g)
}
