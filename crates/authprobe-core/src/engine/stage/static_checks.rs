//! Stage `Static`: the KSA exists and, for impersonation, its annotation names an allowed GSA.
//! Kubernetes-local facts only, so these failures are never softened by the propagation grace.

use std::collections::BTreeMap;

use super::super::{
    Candidate, Finding, Plan, Prepared,
    annotation::{GsaEmail, parse_gsa},
};
use crate::api::{Access, GSA_ANNOTATION, Reason, Stage};

/// A candidate with its annotation parsed (once).
type Parsed = (Candidate, Option<Result<GsaEmail, String>>);

impl Plan {
    /// The static stage over a pass's candidates. Each annotation is parsed once; the allowed GSA
    /// most of them name is suggested to a KSA that lacks one.
    pub fn static_stage(&self, candidates: Vec<Candidate>) -> Vec<(Candidate, Result<Prepared, Finding>)> {
        let parsed: Vec<Parsed> = candidates
            .into_iter()
            .map(|c| {
                let gsa = c.ksa.as_ref().and_then(|k| k.gsa_annotation.as_deref()).map(parse_gsa);
                (c, gsa)
            })
            .collect();
        let suggestion = self.most_common_gsa(&parsed);
        parsed
            .into_iter()
            .map(|(candidate, gsa)| {
                let checked = self.static_check(&candidate, gsa, suggestion.as_ref());
                (candidate, checked)
            })
            .collect()
    }

    /// The allowed GSA most KSAs of a pass are annotated with: the likely value for one that lacks it.
    fn most_common_gsa(&self, parsed: &[Parsed]) -> Option<GsaEmail> {
        let mut counts: BTreeMap<&GsaEmail, usize> = BTreeMap::new();
        for gsa in parsed.iter().filter_map(|(_, g)| g.as_ref()?.as_ref().ok()).filter(|g| self.allows(g)) {
            *counts.entry(gsa).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(g, _)| g.clone())
    }

    /// Static checks for one KSA whose annotation (if any) was parsed into `gsa`.
    fn static_check(
        &self,
        candidate: &Candidate,
        gsa: Option<Result<GsaEmail, String>>,
        suggested_gsa: Option<&GsaEmail>,
    ) -> Result<Prepared, Finding> {
        let who = format!("ServiceAccount {}/{}", candidate.namespace, candidate.name);
        let annotate = |gsa: &str| {
            format!(
                "kubectl annotate serviceaccount {} -n {} {GSA_ANNOTATION}={gsa} --overwrite",
                candidate.name, candidate.namespace
            )
        };
        let placeholder = suggested_gsa
            .map_or("GSA_NAME@PROJECT_ID.iam.gserviceaccount.com".to_string(), |g| g.to_string());
        let Some(ksa) = &candidate.ksa else {
            let annotate_too = if self.access == Access::Impersonation {
                format!(" && {}", annotate(&placeholder))
            } else {
                String::new()
            };
            return Err(Finding::fail(
                Stage::Static,
                Reason::ServiceAccountMissing,
                format!(
                    "{who} does not exist but the probe requires it. Fix: kubectl create serviceaccount {} -n {}{annotate_too}",
                    candidate.name, candidate.namespace
                ),
            ));
        };
        if self.access == Access::Direct {
            return Ok(Prepared { ksa: ksa.clone(), gsa: None });
        }
        let Some(gsa) = gsa else {
            return Err(Finding::fail(
                Stage::Static,
                Reason::AnnotationMissing,
                format!(
                    "{who} has no {GSA_ANNOTATION} annotation, so its pods get no Google service account to impersonate. Fix: {}",
                    annotate(&placeholder)
                ),
            ));
        };
        let gsa = gsa.map_err(|why| {
            Finding::fail(
                Stage::Static,
                Reason::AnnotationInvalid,
                format!("{who} annotation {GSA_ANNOTATION} {why}. Fix: {}", annotate(&placeholder)),
            )
        })?;
        if !self.allows(&gsa) {
            return Err(Finding::fail(
                Stage::Static,
                Reason::ServiceAccountProjectNotAllowed,
                format!(
                    "{who} is annotated with {gsa}, which is not in the allowed projects {:?}. Fix: point the annotation at a GSA in one of them: {}",
                    self.allowed_projects,
                    annotate(&placeholder)
                ),
            ));
        }
        Ok(Prepared { ksa: ksa.clone(), gsa: Some(gsa) })
    }
}
