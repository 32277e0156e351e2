//! The pure check engine: turns a KSA, its namespace, the probe spec and the Google facts fetched
//! for it into a result with a stage, a reason and a message that names the fix. No Kubernetes or
//! Google IO happens here; the controller and `authprobe check` feed it data.

pub mod annotation;
pub mod chain;
pub mod facts;
pub mod policy;
pub mod principal;
pub mod provider;
pub mod report;
pub mod selector;
pub mod target;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use k8s_openapi::jiff::Timestamp;

use self::{
    annotation::{GsaEmail, parse_gsa, quote},
    facts::{ClusterIssuer, FetchFailure, Fetched, GoogleServiceAccount, Policy, Pool, Provider},
    policy::Mapping,
    principal::{KsaIdentity, PoolRef},
    provider::{Mapped, ProviderProblem},
    selector::Selector,
    target::TargetKind,
};
use crate::api::{Access, AuthProbeSpec, GSA_ANNOTATION, Platform, Reason, Stage};

/// Definitely broken, or undecided.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Verdict {
    /// The namespace's setup is broken: alerts fire.
    Fail,
    /// authprobe cannot tell: never pages a namespace owner.
    Unknown,
}

/// Why a KSA did not pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The step that failed.
    pub stage: Stage,
    /// The stable reason.
    pub reason: Reason,
    /// Fail or Unknown.
    pub verdict: Verdict,
    /// The KSA, the principal, the GSA or provider, the upstream error and the fix.
    pub message: String,
}

impl Finding {
    /// A definite failure.
    pub fn fail(stage: Stage, reason: Reason, message: impl Into<String>) -> Self {
        Self { stage, reason, verdict: Verdict::Fail, message: message.into() }
    }

    /// An undecided result.
    pub fn unknown(stage: Stage, reason: Reason, message: impl Into<String>) -> Self {
        Self { stage, reason, verdict: Verdict::Unknown, message: message.into() }
    }

    /// An undecided result from a fetch failure.
    pub fn from_fetch(stage: Stage, failure: &FetchFailure, what: &str) -> Self {
        Self::unknown(stage, failure.reason(), format!("cannot read {what}: {}", failure.detail))
    }
}

/// A ServiceAccount as the engine sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ksa {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// UID.
    pub uid: String,
    /// Labels, for `serviceAccounts.selector`.
    pub labels: BTreeMap<String, String>,
    /// The `iam.gke.io/gcp-service-account` value.
    pub gsa_annotation: Option<String>,
    /// `metadata.creationTimestamp`.
    pub created: Option<Timestamp>,
}

/// A KSA to check: `ksa` is `None` for a required name that does not exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The object, when it exists.
    pub ksa: Option<Ksa>,
}

/// A KSA that passed the static checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prepared {
    /// The object.
    pub ksa: Ksa,
    /// The GSA it impersonates (`access: Impersonation`).
    pub gsa: Option<GsaEmail>,
}

/// The Federation part of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FederationPlan {
    /// `projects/N/locations/global/workloadIdentityPools/POOL/providers/PROVIDER`.
    pub provider: String,
    /// `projects/N/locations/global/workloadIdentityPools/POOL`.
    pub pool: String,
    /// POOL.
    pub pool_id: String,
    /// N.
    pub project_number: String,
    /// The audience KSA tokens carry (the spec's, or `//iam.googleapis.com/<provider>`).
    pub audience: String,
}

/// A target of the live chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetPlan {
    /// The full resource name.
    pub resource: String,
    /// What it is.
    pub kind: TargetKind,
    /// Permissions the identity needs there.
    pub permissions: Vec<String>,
}

/// A spec, checked once: everything admission could not judge is judged here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// GKE or Federation.
    pub platform: Platform,
    /// The project ID.
    pub project_id: Option<String>,
    /// The project number.
    pub project_number: Option<String>,
    /// Impersonation or Direct.
    pub access: Access,
    /// GSAs must live in these projects when non-empty.
    pub allowed_projects: Vec<String>,
    /// GKE: `https://container.googleapis.com/v1/projects/P/locations/L/clusters/C`.
    pub cluster_url: Option<String>,
    /// Federation settings.
    pub federation: Option<FederationPlan>,
    /// Live chain targets.
    pub targets: Vec<TargetPlan>,
    /// Periodic re-check.
    pub interval: Duration,
    /// Propagation grace.
    pub grace: Duration,
    /// Whether the live chain runs.
    pub token_exchange: bool,
    namespaces: Selector,
    names: Vec<String>,
    ksa_selector: Option<Selector>,
}

fn duration(field: &str, value: &str, min: Duration, max: Duration) -> Result<Duration, String> {
    let parsed: kube::core::Duration =
        value.parse().map_err(|e| format!("{field} {} is not a duration: {e}", quote(value)))?;
    let parsed = if parsed.is_negative() { Duration::ZERO } else { Duration::from(parsed) };
    if parsed < min || parsed > max {
        return Err(format!("{field} {} is outside {min:?}..={max:?}", quote(value)));
    }
    Ok(parsed)
}

impl Plan {
    /// Checks a spec; the error is the `InvalidSpec` message.
    pub fn parse(spec: &AuthProbeSpec) -> Result<Self, String> {
        let namespaces =
            Selector::parse(&spec.namespace_selector).map_err(|e| format!("namespaceSelector: {e}"))?;
        let selection = spec.service_accounts.clone().unwrap_or_default();
        let ksa_selector = selection
            .selector
            .as_ref()
            .map(Selector::parse)
            .transpose()
            .map_err(|e| format!("serviceAccounts.selector: {e}"))?;
        let identity = &spec.identity;
        let federation = match (identity.platform, &identity.federation) {
            (Platform::Federation, Some(f)) => {
                let (pool, _) =
                    f.provider.split_once("/providers/").ok_or("federation.provider is malformed")?;
                let project_number = pool
                    .strip_prefix("projects/")
                    .and_then(|r| r.split('/').next())
                    .ok_or("federation.provider is malformed")?;
                let pool_id = pool.rsplit('/').next().unwrap_or_default();
                let audience = if f.audience.is_empty() {
                    format!("//iam.googleapis.com/{}", f.provider)
                } else {
                    f.audience.clone()
                };
                Some(FederationPlan {
                    provider: f.provider.clone(),
                    pool: pool.to_string(),
                    pool_id: pool_id.to_string(),
                    project_number: project_number.to_string(),
                    audience,
                })
            }
            (Platform::Federation, None) => {
                return Err("identity.federation is required when platform is Federation".into());
            }
            (Platform::Gke, Some(_)) => {
                return Err("identity.federation is only allowed when platform is Federation".into());
            }
            (Platform::Gke, None) => None,
        };
        if identity.platform == Platform::Gke && identity.project_id.is_none() {
            return Err("identity.projectId is required when platform is GKE".into());
        }
        let cluster_url = match (&identity.gke, &identity.project_id) {
            (Some(gke), Some(project)) => Some(format!(
                "https://container.googleapis.com/v1/projects/{project}/locations/{}/clusters/{}",
                gke.cluster_location, gke.cluster_name
            )),
            _ => None,
        };
        if identity.platform == Platform::Gke && spec.probe.token_exchange && cluster_url.is_none() {
            return Err("identity.gke is required for the live GKE token exchange".into());
        }
        let targets = spec
            .targets
            .iter()
            .map(|t| {
                Ok(TargetPlan {
                    resource: t.resource.clone(),
                    kind: target::parse_target(&t.resource)?,
                    permissions: t.permissions.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Plan {
            platform: identity.platform,
            project_id: identity.project_id.clone(),
            project_number: identity.project_number.clone(),
            access: identity.access,
            allowed_projects: identity.service_account_projects.clone(),
            cluster_url,
            federation,
            targets,
            interval: duration(
                "probe.interval",
                &spec.probe.interval,
                Duration::from_secs(30),
                Duration::from_secs(86_400),
            )?,
            grace: duration(
                "probe.propagationGrace",
                &spec.probe.propagation_grace,
                Duration::ZERO,
                Duration::from_secs(3600),
            )?,
            token_exchange: spec.probe.token_exchange,
            namespaces,
            names: selection.names,
            ksa_selector,
        })
    }

    /// Whether a namespace with these labels is in scope.
    pub fn selects_namespace(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        self.namespaces.matches(labels)
    }

    /// Whether `ksa` is selected (by name, by selector, or, with neither, by carrying the annotation).
    pub fn selects_ksa(&self, ksa: &Ksa) -> bool {
        if self.names.is_empty() && self.ksa_selector.is_none() {
            return ksa.gsa_annotation.is_some();
        }
        self.names.contains(&ksa.name)
            || self.ksa_selector.as_ref().is_some_and(|s| s.matches(Some(&ksa.labels)))
    }

    /// The KSAs to check in one selected namespace: every required name (present or not) and every
    /// selected KSA, sorted by name.
    pub fn candidates(&self, namespace: &str, ksas: &[Ksa]) -> Vec<Candidate> {
        let mut out: BTreeMap<&str, Option<&Ksa>> = self.names.iter().map(|n| (n.as_str(), None)).collect();
        for ksa in ksas.iter().filter(|k| k.namespace == namespace) {
            if self.selects_ksa(ksa) {
                out.insert(&ksa.name, Some(ksa));
            }
        }
        out.into_iter()
            .map(|(name, ksa)| Candidate {
                namespace: namespace.to_string(),
                name: name.to_string(),
                ksa: ksa.cloned(),
            })
            .collect()
    }

    /// The GKE workload pool `PROJECT_ID.svc.id.goog`, or the Federation pool.
    pub fn pool(&self) -> PoolRef {
        match &self.federation {
            Some(f) => PoolRef { project_number: Some(f.project_number.clone()), pool_id: f.pool_id.clone() },
            None => PoolRef {
                project_number: self.project_number.clone(),
                pool_id: format!("{}.svc.id.goog", self.project_id.as_deref().unwrap_or("PROJECT_ID")),
            },
        }
    }

    /// The principal a KSA maps to; `mapped` is the provider's mapping (Federation).
    pub fn identity(&self, ksa: &Ksa, mapped: Option<&Mapped>) -> KsaIdentity {
        let (subject, attributes, groups) = match (self.platform, mapped) {
            (Platform::Gke, _) => (format!("ns/{}/sa/{}", ksa.namespace, ksa.name), BTreeMap::new(), vec![]),
            (Platform::Federation, Some(m)) => (m.subject.clone(), m.attributes.clone(), m.groups.clone()),
            (Platform::Federation, None) => {
                (format!("system:serviceaccount:{}:{}", ksa.namespace, ksa.name), BTreeMap::new(), vec![])
            }
        };
        KsaIdentity {
            pool: self.pool(),
            gke_project_id: (self.platform == Platform::Gke).then(|| self.project_id.clone()).flatten(),
            namespace: ksa.namespace.clone(),
            name: ksa.name.clone(),
            uid: (!ksa.uid.is_empty()).then(|| ksa.uid.clone()),
            subject,
            attributes,
            groups,
            cluster: self.cluster_url.clone(),
        }
    }

    /// Whether `serviceAccountProjects` (when set) lets KSAs impersonate `gsa`.
    pub fn allows(&self, gsa: &GsaEmail) -> bool {
        self.allowed_projects.is_empty()
            || gsa.project().is_some_and(|p| self.allowed_projects.iter().any(|a| a == p))
    }

    /// Static checks: the KSA exists, and (for impersonation) its annotation names an allowed GSA.
    pub fn static_check(
        &self,
        candidate: &Candidate,
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
        let Some(value) = &ksa.gsa_annotation else {
            return Err(Finding::fail(
                Stage::Static,
                Reason::AnnotationMissing,
                format!(
                    "{who} has no {GSA_ANNOTATION} annotation, so its pods get no Google service account to impersonate. Fix: {}",
                    annotate(&placeholder)
                ),
            ));
        };
        let gsa = parse_gsa(value).map_err(|why| {
            Finding::fail(
                Stage::Static,
                Reason::AnnotationInvalid,
                format!("{who} annotation {GSA_ANNOTATION} {why}. Fix: {}", annotate(&placeholder)),
            )
        })?;
        if !self.allowed_projects.is_empty()
            && !gsa.project().is_some_and(|p| self.allowed_projects.iter().any(|a| a == p))
        {
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

/// What was read from Google for one GSA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GsaFacts {
    /// `serviceAccounts.get`; `Ok(None)`: not found.
    pub account: Fetched<GoogleServiceAccount>,
    /// `getIamPolicy`; `Ok(None)` when not read because the account does not exist.
    pub policy: Fetched<Policy>,
}

/// What was read for a Federation provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderFacts {
    /// The pool.
    pub pool: Fetched<Pool>,
    /// The provider.
    pub provider: Fetched<Provider>,
}

/// Everything the mapping stages need for one probe pass.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// Per annotated GSA.
    pub gsas: &'a BTreeMap<GsaEmail, Arc<GsaFacts>>,
    /// Federation only.
    pub provider: Option<&'a ProviderFacts>,
    /// Federation only: the cluster's issuer and keys.
    pub cluster: Option<&'a Result<ClusterIssuer, FetchFailure>>,
    /// Unix seconds, for the claims built from the KSA.
    pub now: i64,
}

/// A minted KSA token's claims and signing key id (when the live chain ran).
#[derive(Clone, Copy, Debug)]
pub struct TokenClaims<'a> {
    /// The decoded payload.
    pub claims: &'a serde_json::Value,
    /// The header's `kid`.
    pub kid: Option<&'a str>,
}

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

    fn provider_stage(
        &self,
        ksa: &Ksa,
        federation: &FederationPlan,
        facts: &Facts<'_>,
        token: Option<TokenClaims<'_>>,
    ) -> Result<Mapped, Finding> {
        let unavailable = || FetchFailure::new(facts::FailureKind::Unavailable, "not fetched");
        let (pool, provider) = match facts.provider {
            Some(p) => (p.pool.clone(), p.provider.clone()),
            None => (Err(unavailable()), Err(unavailable())),
        };
        let cluster = facts.cluster.cloned().unwrap_or_else(|| Err(unavailable()));
        let issuer = cluster.as_ref().map(|c| c.issuer.clone()).unwrap_or_default();
        let built;
        let (claims, kid) = match token {
            Some(t) => (t.claims, t.kid),
            None => {
                built = provider::claims_for(
                    &issuer,
                    &federation.audience,
                    &ksa.namespace,
                    &ksa.name,
                    &ksa.uid,
                    facts.now,
                );
                (&built, None)
            }
        };
        let who = format!("ServiceAccount {}/{}", ksa.namespace, ksa.name);
        let p = &federation.provider;
        let pool_name = &federation.pool;
        provider::check(&pool, &provider, &cluster, &federation.audience, claims, kid).map_err(|problem| match problem {
            ProviderProblem::Unreadable(f) => Finding::from_fetch(Stage::Provider, &f, &format!("workload identity provider {p}")),
            ProviderProblem::ClusterUnreadable(f) => {
                Finding::from_fetch(Stage::Provider, &f, "the cluster's issuer and signing keys")
            }
            ProviderProblem::NotFound { what: "pool" } => Finding::fail(Stage::Provider, Reason::ProviderNotFound, format!(
                "{who}: workload identity pool {pool_name} does not exist or is deleted, so every exchange is refused (invalid_target). Fix: gcloud iam workload-identity-pools undelete {} --location=global --project={}, or point identity.federation.provider at a live pool",
                federation.pool_id, federation.project_number
            )),
            ProviderProblem::NotFound { .. } => Finding::fail(Stage::Provider, Reason::ProviderNotFound, format!(
                "{who}: provider {p} does not exist or is deleted, so every exchange is refused (invalid_target). Fix: create or undelete it (gcloud iam workload-identity-pools providers undelete ...), or correct identity.federation.provider"
            )),
            ProviderProblem::ProviderDisabled => Finding::fail(Stage::Provider, Reason::ProviderDisabled, format!(
                "{who}: provider {p} is disabled, so new exchanges are refused (invalid_target). Fix: gcloud iam workload-identity-pools providers update-oidc {} --workload-identity-pool={} --location=global --project={} --no-disabled",
                p.rsplit('/').next().unwrap_or_default(), federation.pool_id, federation.project_number
            )),
            ProviderProblem::PoolDisabled => Finding::fail(Stage::Provider, Reason::PoolDisabled, format!(
                "{who}: pool {pool_name} is disabled, so exchanges are refused and issued tokens stop working. Fix: gcloud iam workload-identity-pools update {} --location=global --project={} --no-disabled",
                federation.pool_id, federation.project_number
            )),
            ProviderProblem::NotOidc => Finding::fail(Stage::Provider, Reason::IssuerMismatch, format!(
                "{who}: provider {p} is not an OIDC provider, so it cannot trust Kubernetes tokens. Fix: create an OIDC provider with --issuer-uri={issuer}"
            )),
            ProviderProblem::IssuerMismatch { provider, cluster } => Finding::fail(Stage::Provider, Reason::IssuerMismatch, format!(
                "{who}: provider {p} trusts issuer {} but the cluster's tokens carry iss {}, so Google answers \"The issuer in ID Token {cluster} does not match the expected one in config: {provider}\". Fix: gcloud iam workload-identity-pools providers update-oidc ... --issuer-uri={cluster}",
                quote(&provider), quote(&cluster)
            )),
            ProviderProblem::KeyNotTrusted { detail } => Finding::fail(Stage::Provider, Reason::SigningKeyNotTrusted, format!(
                "{who}: {detail}; tokens signed after a key rotation are refused (\"Error connecting to the given credential's issuer\"). Fix: kubectl get --raw /openid/v1/jwks > jwks.json && gcloud iam workload-identity-pools providers update-oidc ... --jwk-json-path=jwks.json"
            )),
            ProviderProblem::AudienceNotAllowed { audience, allowed } => Finding::fail(Stage::Provider, Reason::AudienceNotAllowed, format!(
                "{who}: its tokens carry audience {} but provider {p} accepts only {allowed:?}. Fix: set identity.federation.audience and the pods' token audience to one of them, or gcloud iam workload-identity-pools providers update-oidc ... --allowed-audiences={audience}",
                quote(&audience)
            )),
            ProviderProblem::MappingInvalid { attribute, detail } => Finding::fail(Stage::Provider, Reason::AttributeMappingInvalid, format!(
                "{who}: provider {p}'s attribute mapping for {attribute} {detail} for this ServiceAccount's token claims. Fix: correct --attribute-mapping on the provider (e.g. google.subject=assertion.sub)"
            )),
            ProviderProblem::SubjectTooLong { subject } => Finding::fail(Stage::Static, Reason::SubjectTooLong, format!(
                "{who}: the mapped google.subject {} is {} bytes, over Google's 127-byte limit, so every exchange is refused. Fix: shorten the namespace or ServiceAccount name, or map google.subject to something shorter (e.g. assertion['kubernetes.io']['serviceaccount']['uid'])",
                quote(&subject), subject.len()
            )),
            ProviderProblem::ConditionRejected { clause, detail } => Finding::fail(Stage::Provider, Reason::AttributeConditionRejected, format!(
                "{who}: provider {p}'s attribute condition clause {} {detail}, so Google answers \"The given credential is rejected by the attribute condition.\" Fix: widen the condition (gcloud iam workload-identity-pools providers update-oidc ... --attribute-condition=...) or move the workload to an admitted namespace",
                quote(&clause)
            )),
        })
    }

    fn iam_stage(&self, identity: &KsaIdentity, gsa: &GsaEmail, facts: &Facts<'_>) -> Result<(), Finding> {
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

/// Turns a failure within the propagation grace of a change into Unknown/PropagationPending.
/// Static failures are Kubernetes-local and never wait for Google to catch up.
pub fn within_grace(
    finding: Finding,
    changed_at: Option<Timestamp>,
    now: Timestamp,
    grace: Duration,
) -> Finding {
    let Some(changed_at) = changed_at else {
        return finding;
    };
    let grace_ends = changed_at.checked_add(grace).unwrap_or(changed_at);
    if finding.verdict != Verdict::Fail || finding.stage == Stage::Static || now >= grace_ends {
        return finding;
    }
    Finding::unknown(
        finding.stage,
        Reason::PropagationPending,
        format!(
            "{} ({}) within the {}s propagation grace after a change at {changed_at}; it turns False if it persists after {grace_ends}",
            finding.message,
            finding.reason,
            grace.as_secs()
        ),
    )
}

#[cfg(test)]
mod tests;
