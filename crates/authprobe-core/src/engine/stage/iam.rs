//! Stage `IAMPolicy`: the annotated GSA exists, is enabled, and its allow policy grants the KSA's
//! principal `roles/iam.workloadIdentityUser`; a missing grant names what the policy holds instead.

use super::super::{
    Facts, Finding, Plan,
    annotation::{GsaEmail, quote},
    facts::{self, FetchFailure},
    policy::{self, Mapping},
    principal::KsaIdentity,
};
use crate::api::{GSA_ANNOTATION, Reason, Stage};

impl Plan {
    pub(super) fn iam_stage(
        &self,
        identity: &KsaIdentity,
        gsa: &GsaEmail,
        facts: &Facts<'_>,
    ) -> Result<(), Finding> {
        let who = format!("ServiceAccount {}/{}", identity.namespace, identity.name);
        let principal = identity.principal();
        let Some(gsa_facts) = facts.gsas.get(gsa) else {
            let failure = FetchFailure::new(facts::FailureKind::Unavailable, "not fetched");
            return Err(Finding::from_fetch(
                Stage::IamPolicy,
                &failure,
                &format!("Google service account {gsa}"),
            ));
        };
        let project_flag = gsa.project().map(|p| format!(" --project={p}")).unwrap_or_default();
        match &gsa_facts.account {
            Err(f) => {
                return Err(Finding::from_fetch(
                    Stage::IamPolicy,
                    f,
                    &format!("Google service account {gsa}"),
                ));
            }
            Ok(None) => {
                let did_you_mean = closest(gsa, facts.gsas.keys())
                    .map(|g| format!(" Did you mean {g}?"))
                    .unwrap_or_default();
                return Err(Finding::fail(
                    Stage::IamPolicy,
                    Reason::GoogleServiceAccountNotFound,
                    format!(
                        "{who} is annotated with {gsa}, which does not exist (Unknown service account).{did_you_mean} Fix: correct the annotation (kubectl annotate serviceaccount {} -n {} {GSA_ANNOTATION}=GSA_EMAIL --overwrite) or create the account (gcloud iam service-accounts create {}{project_flag})",
                        identity.name,
                        identity.namespace,
                        gsa.as_str().split('@').next().unwrap_or_default()
                    ),
                ));
            }
            Ok(Some(account)) if account.disabled => {
                return Err(Finding::fail(
                    Stage::IamPolicy,
                    Reason::GoogleServiceAccountDisabled,
                    format!(
                        "{who} impersonates {gsa}, which is disabled, so Google issues it no tokens. Fix: gcloud iam service-accounts enable {gsa}{project_flag}"
                    ),
                ));
            }
            Ok(Some(_)) => {}
        }
        let policy = match &gsa_facts.policy {
            Err(f) => {
                return Err(Finding::from_fetch(Stage::IamPolicy, f, &format!("the IAM policy of {gsa}")));
            }
            Ok(None) => return Ok(()),
            Ok(Some(p)) => p,
        };
        let bind = format!(
            "gcloud iam service-accounts add-iam-policy-binding {gsa}{project_flag} --role=roles/iam.workloadIdentityUser --member=\"{principal}\""
        );
        match policy::evaluate(policy, identity) {
            Mapping::Mapped { .. } => Ok(()),
            Mapping::Conditional { member, condition } => Err(Finding::fail(
                Stage::IamPolicy,
                Reason::MappingConditional,
                format!(
                    "{who} ({principal}) is granted roles/iam.workloadIdentityUser on {gsa} only under the IAM condition {}, which the token exchange does not satisfy. Fix: grant it without a condition: {bind} --condition=None (the conditional member is {member})",
                    quote(&condition)
                ),
            )),
            Mapping::Deleted { member } => Err(Finding::fail(
                Stage::IamPolicy,
                Reason::MappingDeleted,
                format!(
                    "{who} ({principal}) is bound on {gsa} only through the deleted member {member}, which grants nothing. Fix: gcloud iam service-accounts remove-iam-policy-binding {gsa}{project_flag} --role=roles/iam.workloadIdentityUser --member=\"{member}\" && {bind}"
                ),
            )),
            Mapping::NotMapped { near_misses } => {
                let instead = if near_misses.is_empty() {
                    String::new()
                } else {
                    let listed: Vec<String> =
                        near_misses.iter().map(|(m, why)| format!("{m} ({why})")).collect();
                    format!("; the policy grants it to {} instead", listed.join(", "))
                };
                let elsewhere = facts
                    .gsas
                    .iter()
                    .filter(|(other, _)| *other != gsa)
                    .find(|(_, f)| {
                        f.policy
                            .as_ref()
                            .ok()
                            .and_then(Option::as_ref)
                            .is_some_and(|p| matches!(policy::evaluate(p, identity), Mapping::Mapped { .. }))
                    })
                    .map(|(other, _)| {
                        format!("; {other} does map this principal, so the annotation may name the wrong GSA")
                    })
                    .unwrap_or_default();
                Err(Finding::fail(
                    Stage::IamPolicy,
                    Reason::PrincipalNotMapped,
                    format!(
                        "{who} ({principal}) is not granted roles/iam.workloadIdentityUser on {gsa}{instead}{elsewhere}. Granting broader roles elsewhere cannot help: the workload's identity is never proven. Fix: {bind}"
                    ),
                ))
            }
        }
    }
}

/// A known GSA within two edits of `gsa` (a likely typo), if any.
fn closest<'a>(gsa: &GsaEmail, known: impl Iterator<Item = &'a GsaEmail>) -> Option<&'a GsaEmail> {
    known
        .filter(|k| *k != gsa)
        .map(|k| (edit_distance(k.as_str(), gsa.as_str()), k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut previous = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let current = row[j + 1];
            row[j + 1] = (previous + usize::from(ca != *cb)).min(row[j] + 1).min(current + 1);
            previous = current;
        }
    }
    row[b.len()]
}
