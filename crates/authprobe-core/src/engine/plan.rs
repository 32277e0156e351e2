//! A spec, checked once (everything admission could not judge is judged here), and the one
//! selection of namespaces and KSAs that both the operator and `authprobe check` use.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;

use super::{
    Candidate, Ksa,
    annotation::{GsaEmail, is_project_id, quote},
    canary::WorkloadRef,
    principal::{KsaIdentity, PoolRef},
    selector::{LabelLookup, Selector},
    stage::{
        endpoint::{AUDIENCE_SHAPE, EndpointAllow, EndpointPlan, is_audience},
        provider::Mapped,
    },
    target::{self, TargetKind},
};
use crate::api::{Access, AuthProbeSpec, MAX_ENDPOINTS, Platform};

/// `projects/N/locations/global/workloadIdentityPools/POOL/providers/PROVIDER` split into N, POOL
/// and PROVIDER, or `None` if it is not exactly that shape (it becomes part of a URL).
fn provider_parts(provider: &str) -> Option<(&str, &str, &str)> {
    let id = |s: &str| {
        (1..=32).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match provider.split('/').collect::<Vec<_>>().as_slice() {
        ["projects", n, "locations", "global", "workloadIdentityPools", pool, "providers", p]
            if is_project_number(n) && id(pool) && id(p) =>
        {
            Some((n, pool, p))
        }
        _ => None,
    }
}

fn is_project_number(s: &str) -> bool {
    (1..=20).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())
}

/// Admission's schema and CEL rules, judged again: `authprobe check -f` reads specs no API server
/// has admitted, and these values end up in URLs and commands.
fn validate(spec: &AuthProbeSpec) -> Result<(), String> {
    let identity = &spec.identity;
    if let Some(p) = identity.project_id.as_deref().filter(|p| !is_project_id(p)) {
        return Err(format!("identity.projectId {} is not a Google Cloud project ID", quote(p)));
    }
    if let Some(n) = identity.project_number.as_deref().filter(|n| !is_project_number(n)) {
        return Err(format!("identity.projectNumber {} must be digits only", quote(n)));
    }
    if let Some(p) = identity.service_account_projects.iter().find(|p| !is_project_id(p)) {
        return Err(format!("identity.serviceAccountProjects: {} is not a project ID", quote(p)));
    }
    let name_part = |s: &str| {
        (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    if let Some(gke) = &identity.gke
        && !(name_part(&gke.cluster_location) && name_part(&gke.cluster_name))
    {
        return Err(
            "identity.gke clusterLocation and clusterName must be lowercase letters, digits and '-'".into()
        );
    }
    if let Some(f) = &identity.federation
        && (f.audience.len() > 256 || f.audience.chars().any(char::is_control))
    {
        return Err("identity.federation.audience must be at most 256 printable characters".into());
    }
    let ksa_name = |n: &String| {
        (1..=253).contains(&n.len())
            && n.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && n.starts_with(|c: char| c.is_ascii_alphanumeric())
            && n.ends_with(|c: char| c.is_ascii_alphanumeric())
    };
    if let Some(n) = spec.service_accounts.iter().flat_map(|s| &s.names).find(|n| !ksa_name(n)) {
        return Err(format!("serviceAccounts.names: {} is not a ServiceAccount name", quote(n)));
    }
    let permission = |p: &String| {
        let parts: Vec<&str> = p.split('.').collect();
        p.len() <= 128
            && parts.len() == 3
            && parts.iter().all(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()))
            && p.starts_with(|c: char| c.is_ascii_lowercase())
    };
    if let Some(p) = spec.targets.iter().flat_map(|t| &t.permissions).find(|p| !permission(p)) {
        return Err(format!("targets: permission {} must look like service.resource.verb", quote(p)));
    }
    Ok(())
}

/// A ServiceAccount as selection reads it, borrowed from whatever holds it.
#[derive(Clone, Copy, Debug)]
pub struct KsaRef<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// UID.
    pub uid: &'a str,
    /// Labels, for `serviceAccounts.selector`.
    pub labels: &'a dyn LabelLookup,
    /// The `iam.gke.io/gcp-service-account` value.
    pub gsa_annotation: Option<&'a str>,
    /// `metadata.creationTimestamp`.
    pub created: Option<Timestamp>,
}

impl KsaRef<'_> {
    /// The engine's owned view.
    pub fn to_owned(&self) -> Ksa {
        Ksa {
            namespace: self.namespace.to_string(),
            name: self.name.to_string(),
            uid: self.uid.to_string(),
            gsa_annotation: self.gsa_annotation.map(str::to_string),
            created: self.created,
        }
    }
}

/// What selection reads of the cluster: whatever holds Namespaces and ServiceAccounts (the
/// operator's caches, the lists `authprobe check` makes) lends them through this.
pub trait ClusterView {
    /// Calls `f` with every Namespace's name and labels.
    fn each_namespace(&self, f: &mut dyn FnMut(&str, &dyn LabelLookup));
    /// Calls `f` with at least every ServiceAccount in `namespaces` (others are skipped).
    fn each_service_account(&self, namespaces: &BTreeSet<String>, f: &mut dyn FnMut(KsaRef<'_>));
}

/// The namespaces in scope and the KSAs to check there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    /// Selected namespaces, sorted.
    pub namespaces: Vec<String>,
    /// KSAs to check, sorted by namespace and name.
    pub candidates: Vec<Candidate>,
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
    /// Permissions the identity needs there (the kind's default when the spec names none).
    pub permissions: Vec<String>,
    /// Cloud Run: the audience the workloads mint their ID tokens for.
    pub audience: Option<String>,
}

/// `spec.canary`, when enabled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanaryPlan {
    /// The workload whose ServiceAccount and credential environment the canary takes.
    pub workload: WorkloadRef,
    /// At most one canary Job per namespace this often.
    pub every: Duration,
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
    /// URLs the workloads call, probed through the real path.
    pub endpoints: Vec<EndpointPlan>,
    /// Periodic re-check.
    pub interval: Duration,
    /// How often each KSA's live chain runs (`probe.tokenExchangeInterval`, default `interval`).
    pub exchange_interval: Duration,
    /// Propagation grace.
    pub grace: Duration,
    /// Whether the live chain runs.
    pub token_exchange: bool,
    /// Whether stage `Workload` runs.
    pub inspect_workloads: bool,
    /// The canary, when enabled.
    pub canary: Option<CanaryPlan>,
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
        validate(spec)?;
        let federation = match (identity.platform, &identity.federation) {
            (Platform::Federation, Some(f)) => {
                let (project_number, pool_id, _) = provider_parts(&f.provider).ok_or_else(|| {
                    format!(
                        "identity.federation.provider {} must look like projects/NUMBER/locations/global/workloadIdentityPools/POOL/providers/PROVIDER",
                        quote(&f.provider)
                    )
                })?;
                if identity.project_number.as_deref().is_some_and(|n| n != project_number) {
                    return Err("identity.federation.provider must belong to identity.projectNumber".into());
                }
                let pool =
                    format!("projects/{project_number}/locations/global/workloadIdentityPools/{pool_id}");
                let audience = if f.audience.is_empty() {
                    format!("//iam.googleapis.com/{}", f.provider)
                } else {
                    f.audience.clone()
                };
                Some(FederationPlan {
                    provider: f.provider.clone(),
                    pool,
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
                let kind = target::parse_target(&t.resource)?;
                let cloud_run = matches!(kind, TargetKind::CloudRun { .. });
                let permissions = match kind.default_permissions() {
                    _ if !t.permissions.is_empty() => t.permissions.clone(),
                    Some(defaults) => defaults,
                    None => return Err(format!("target {} needs permissions", quote(&t.resource))),
                };
                if let Some(a) = t.audience.as_deref().filter(|a| !is_audience(a)) {
                    return Err(format!("target {} audience {}: {AUDIENCE_SHAPE}", quote(&t.resource), quote(a)));
                }
                if t.audience.is_some() && !cloud_run {
                    return Err(format!(
                        "target {}: audience applies to Cloud Run services only",
                        quote(&t.resource)
                    ));
                }
                if cloud_run && identity.access == Access::Direct {
                    return Err(format!(
                        "target {} is a Cloud Run service, invoked with an ID token, which a federated principal cannot get (access: Direct); use access: Impersonation",
                        quote(&t.resource)
                    ));
                }
                Ok(TargetPlan { resource: t.resource.clone(), kind, permissions, audience: t.audience.clone() })
            })
            .collect::<Result<Vec<_>, String>>()?;
        if spec.endpoints.len() > MAX_ENDPOINTS {
            return Err(format!("at most {MAX_ENDPOINTS} endpoints, not {}", spec.endpoints.len()));
        }
        if !spec.endpoints.is_empty() && !spec.probe.token_exchange {
            return Err("endpoints need probe.tokenExchange: true: the tokens they are sent are minted by the live chain".into());
        }
        let endpoints = spec
            .endpoints
            .iter()
            .map(|e| EndpointPlan::parse(e, identity.access))
            .collect::<Result<Vec<_>, String>>()?;
        let canary = spec
            .canary
            .as_ref()
            .filter(|c| c.enabled)
            .map(|c| {
                Ok::<_, String>(CanaryPlan {
                    workload: c.workload.parse()?,
                    every: duration(
                        "canary.every",
                        &c.every,
                        Duration::from_secs(300),
                        Duration::from_secs(86_400),
                    )?,
                })
            })
            .transpose()?;
        let (min_interval, max_interval) = (Duration::from_secs(30), Duration::from_secs(86_400));
        let interval = duration("probe.interval", &spec.probe.interval, min_interval, max_interval)?;
        let exchange_interval = match &spec.probe.token_exchange_interval {
            Some(every) => duration("probe.tokenExchangeInterval", every, min_interval, max_interval)?,
            None => interval,
        };
        Ok(Plan {
            platform: identity.platform,
            project_id: identity.project_id.clone(),
            project_number: identity.project_number.clone(),
            access: identity.access,
            allowed_projects: identity.service_account_projects.clone(),
            cluster_url,
            federation,
            targets,
            endpoints,
            interval,
            exchange_interval,
            grace: duration(
                "probe.propagationGrace",
                &spec.probe.propagation_grace,
                Duration::ZERO,
                Duration::from_secs(3600),
            )?,
            token_exchange: spec.probe.token_exchange,
            inspect_workloads: spec.probe.inspect_workloads,
            canary,
            namespaces,
            names: selection.names,
            ksa_selector,
        })
    }

    /// [`Plan::parse`], and every endpoint's URL and origin on a host the operator allows: a spec
    /// naming another host is refused before anything is sent.
    pub fn parse_allowing(spec: &AuthProbeSpec, allow: &EndpointAllow) -> Result<Self, String> {
        let plan = Self::parse(spec)?;
        for endpoint in &plan.endpoints {
            allow.admits(&endpoint.url)?;
            if let Some(origin) = &endpoint.origin {
                allow.admits(origin)?;
            }
        }
        Ok(plan)
    }

    /// Whether a namespace with these labels is in scope.
    pub fn selects_namespace(&self, labels: &dyn LabelLookup) -> bool {
        self.namespaces.matches(labels)
    }

    /// The one selection, for the operator and `authprobe check` alike: the namespaces in scope
    /// and, in each, every required name (present or not) and every selected KSA (by selector, or
    /// with neither names nor selector by carrying the annotation), sorted by namespace and name.
    pub fn select(&self, cluster: &dyn ClusterView) -> Selection {
        let mut namespaces = BTreeSet::new();
        cluster.each_namespace(&mut |name, labels| {
            if self.selects_namespace(labels) {
                namespaces.insert(name.to_string());
            }
        });
        let mut chosen: BTreeMap<(String, String), Option<Ksa>> = namespaces
            .iter()
            .flat_map(|ns| self.names.iter().map(move |n| ((ns.clone(), n.clone()), None)))
            .collect();
        cluster.each_service_account(&namespaces, &mut |ksa| {
            if namespaces.contains(ksa.namespace) && self.selects_ksa(&ksa) {
                chosen.insert((ksa.namespace.to_string(), ksa.name.to_string()), Some(ksa.to_owned()));
            }
        });
        let candidates =
            chosen.into_iter().map(|((namespace, name), ksa)| Candidate { namespace, name, ksa }).collect();
        Selection { namespaces: namespaces.into_iter().collect(), candidates }
    }

    fn selects_ksa(&self, ksa: &KsaRef<'_>) -> bool {
        if self.names.is_empty() && self.ksa_selector.is_none() {
            return ksa.gsa_annotation.is_some();
        }
        self.names.iter().any(|n| n == ksa.name)
            || self.ksa_selector.as_ref().is_some_and(|s| s.matches(ksa.labels))
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
}
