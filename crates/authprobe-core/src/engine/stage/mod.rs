//! The stages of a KSA's path to Google, in chain order, each owning its evaluation and the text
//! of its findings.

pub mod canary;
pub mod chain;
pub mod cloud_run;
pub mod endpoint;
mod iam;
pub mod provider;
mod static_checks;
mod workload;

use super::{Facts, Finding, Plan, Prepared, TokenClaims, principal::KsaIdentity};

impl Plan {
    /// The provider and IAM-policy stages for a KSA that passed the static checks. Returns the
    /// principal it maps to. For Federation the provider stage runs first, as the exchange comes
    /// before impersonation and the mapping decides the principal.
    pub fn check_mapping(
        &self,
        prepared: &Prepared,
        facts: &Facts<'_>,
        token: Option<TokenClaims<'_>>,
    ) -> Result<KsaIdentity, Finding> {
        let ksa = &prepared.ksa;
        let mapped = match &self.federation {
            Some(federation) => Some(self.provider_stage(ksa, federation, facts, token)?),
            None => None,
        };
        let identity = self.identity(ksa, mapped.as_ref());
        if let Some(gsa) = &prepared.gsa {
            self.iam_stage(&identity, gsa, facts)?;
        }
        Ok(identity)
    }
}
