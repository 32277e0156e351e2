//! Google principal identifiers for Kubernetes ServiceAccounts, and which IAM members cover a KSA.
//!
//! Forms (google-wif.md §2.2, §2.5, §3.6): the GKE legacy `serviceAccount:P.svc.id.goog[NS/KSA]`,
//! `principal://…/subject/S`, `principal://…/kubernetes.serviceaccount.uid/UID`, and the
//! `principalSet://…` forms for a namespace, a GKE cluster, a mapped attribute, a group and a pool.

use std::collections::BTreeMap;

const IAM_PREFIX: &str = "//iam.googleapis.com/projects/";

/// The workload identity pool a principal belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolRef {
    /// The project number in the identifier; `None` when the spec did not give one (the GKE pool
    /// name `PROJECT_ID.svc.id.goog` already names exactly one project).
    pub project_number: Option<String>,
    /// `PROJECT_ID.svc.id.goog` for GKE, the pool ID for Federation.
    pub pool_id: String,
}

impl PoolRef {
    fn matches(&self, project_number: &str, pool_id: &str) -> bool {
        self.pool_id == pool_id && self.project_number.as_deref().is_none_or(|n| n == project_number)
    }

    /// `//iam.googleapis.com/projects/N/locations/global/workloadIdentityPools/POOL`, with the
    /// number spelled `PROJECT_NUMBER` when unknown.
    pub fn resource(&self) -> String {
        format!(
            "{IAM_PREFIX}{}/locations/global/workloadIdentityPools/{}",
            self.project_number.as_deref().unwrap_or("PROJECT_NUMBER"),
            self.pool_id
        )
    }
}

/// Everything a principal identifier can say about one KSA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KsaIdentity {
    /// The pool its tokens are federated into.
    pub pool: PoolRef,
    /// GKE only: the project ID of the `PROJECT_ID.svc.id.goog` pool (legacy member form).
    pub gke_project_id: Option<String>,
    /// The KSA's namespace.
    pub namespace: String,
    /// The KSA's name.
    pub name: String,
    /// The KSA's UID, when it exists.
    pub uid: Option<String>,
    /// The mapped `google.subject`: `ns/NS/sa/KSA` on GKE, `system:serviceaccount:NS:KSA` by default elsewhere.
    pub subject: String,
    /// Mapped `attribute.*` values (Federation), keyed without the prefix.
    pub attributes: BTreeMap<String, String>,
    /// Mapped `google.groups`.
    pub groups: Vec<String>,
    /// GKE only: `https://container.googleapis.com/v1/projects/P/locations/L/clusters/C`.
    pub cluster: Option<String>,
}

impl KsaIdentity {
    /// The identifier to grant: `principal://…/subject/…`, or the GKE legacy form when the project
    /// number is unknown.
    pub fn principal(&self) -> String {
        match (&self.gke_project_id, &self.pool.project_number) {
            (Some(project), None) => {
                format!("serviceAccount:{project}.svc.id.goog[{}/{}]", self.namespace, self.name)
            }
            _ => format!("principal:{}/subject/{}", self.pool.resource(), self.subject),
        }
    }

    /// Whether `member` (without a `deleted:` prefix) covers this KSA.
    pub fn covered_by(&self, member: &Member) -> bool {
        match member {
            Member::GkeLegacy { project_id, namespace, name } => {
                self.gke_project_id.as_deref() == Some(project_id)
                    && *namespace == self.namespace
                    && *name == self.name
            }
            Member::Subject { project_number, pool_id, subject } => {
                self.pool.matches(project_number, pool_id) && *subject == self.subject
            }
            Member::ServiceAccountUid { project_number, pool_id, uid } => {
                self.pool.matches(project_number, pool_id) && self.uid.as_deref() == Some(uid)
            }
            Member::NamespaceSet { project_number, pool_id, namespace } => {
                self.gke_project_id.is_some()
                    && self.pool.matches(project_number, pool_id)
                    && *namespace == self.namespace
            }
            Member::ClusterSet { project_number, pool_id, cluster } => {
                self.pool.matches(project_number, pool_id) && self.cluster.as_deref() == Some(cluster)
            }
            Member::AttributeSet { project_number, pool_id, attribute, value } => {
                self.pool.matches(project_number, pool_id) && self.attributes.get(attribute) == Some(value)
            }
            Member::GroupSet { project_number, pool_id, group } => {
                self.pool.matches(project_number, pool_id) && self.groups.contains(group)
            }
            Member::PoolSet { project_number, pool_id } => self.pool.matches(project_number, pool_id),
            Member::Other => false,
        }
    }

    /// A member that names a KSA close to this one (same pool, another namespace or name; or
    /// this KSA in another pool), used to explain a missing mapping.
    pub fn near_miss(&self, member: &Member) -> Option<&'static str> {
        match member {
            Member::GkeLegacy { project_id, namespace, name } => {
                let same_pool = self.gke_project_id.as_deref() == Some(project_id);
                near(same_pool, *namespace == self.namespace, *name == self.name)
            }
            Member::Subject { project_number, pool_id, subject } => {
                let same_pool = self.pool.matches(project_number, pool_id);
                let (ns, name) = subject_parts(subject)?;
                near(same_pool, ns == self.namespace, name == self.name)
            }
            Member::NamespaceSet { project_number, pool_id, .. }
                if self.pool.matches(project_number, pool_id) =>
            {
                Some("a namespace set for another namespace")
            }
            _ => None,
        }
    }
}

fn near(same_pool: bool, same_namespace: bool, same_name: bool) -> Option<&'static str> {
    match (same_pool, same_namespace, same_name) {
        (true, false, true) => Some("the same ServiceAccount name in another namespace"),
        (true, true, false) => Some("another ServiceAccount in the same namespace"),
        (false, true, true) => Some("this ServiceAccount in another project's pool"),
        _ => None,
    }
}

/// `ns/NS/sa/KSA` or `system:serviceaccount:NS:KSA`.
fn subject_parts(subject: &str) -> Option<(&str, &str)> {
    if let Some(rest) = subject.strip_prefix("ns/") {
        let (ns, rest) = rest.split_once('/')?;
        return Some((ns, rest.strip_prefix("sa/")?));
    }
    subject.strip_prefix("system:serviceaccount:")?.split_once(':')
}

/// An IAM member, as far as Kubernetes workloads are concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Member {
    /// `serviceAccount:PROJECT_ID.svc.id.goog[NS/KSA]`.
    GkeLegacy { project_id: String, namespace: String, name: String },
    /// `principal://…/subject/S`.
    Subject { project_number: String, pool_id: String, subject: String },
    /// `principal://…/kubernetes.serviceaccount.uid/UID`.
    ServiceAccountUid { project_number: String, pool_id: String, uid: String },
    /// `principalSet://…/namespace/NS` (GKE).
    NamespaceSet { project_number: String, pool_id: String, namespace: String },
    /// `principalSet://…/kubernetes.cluster/URL` (GKE).
    ClusterSet { project_number: String, pool_id: String, cluster: String },
    /// `principalSet://…/attribute.NAME/VALUE`.
    AttributeSet { project_number: String, pool_id: String, attribute: String, value: String },
    /// `principalSet://…/group/G`.
    GroupSet { project_number: String, pool_id: String, group: String },
    /// `principalSet://…/*`.
    PoolSet { project_number: String, pool_id: String },
    /// Users, groups, service accounts, domains: never a KSA.
    Other,
}

/// A member string split into its `deleted:` flag and what it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedMember {
    /// `deleted:` members were removed and no longer grant anything.
    pub deleted: bool,
    /// What the member names.
    pub member: Member,
}

/// Parses an IAM member string. Unknown shapes are [`Member::Other`], never an error.
pub fn parse_member(raw: &str) -> ParsedMember {
    let (deleted, rest) = match raw.strip_prefix("deleted:") {
        // `deleted:KIND:ID?uid=N`: the uid suffix is not part of the identity.
        Some(rest) => (true, rest.split_once("?uid=").map_or(rest, |(id, _)| id)),
        None => (false, raw),
    };
    ParsedMember { deleted, member: parse_live(rest).unwrap_or(Member::Other) }
}

fn parse_live(raw: &str) -> Option<Member> {
    if let Some(rest) = raw.strip_prefix("serviceAccount:") {
        let (pool, ksa) = rest.strip_suffix(']')?.split_once('[')?;
        let project_id = pool.strip_suffix(".svc.id.goog")?;
        let (namespace, name) = ksa.split_once('/')?;
        return Some(Member::GkeLegacy {
            project_id: project_id.into(),
            namespace: namespace.into(),
            name: name.into(),
        });
    }
    let (is_set, rest) = if let Some(rest) = raw.strip_prefix("principal:") {
        (false, rest)
    } else {
        (true, raw.strip_prefix("principalSet:")?)
    };
    let rest = rest.strip_prefix(IAM_PREFIX)?;
    let (project_number, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("locations/global/workloadIdentityPools/")?;
    let (pool_id, selector) = rest.split_once('/')?;
    let (project_number, pool_id) = (project_number.to_string(), pool_id.to_string());
    let (kind, value) = selector.split_once('/').unwrap_or((selector, ""));
    Some(match (is_set, kind) {
        (false, "subject") => Member::Subject { project_number, pool_id, subject: value.into() },
        (false, "kubernetes.serviceaccount.uid") => {
            Member::ServiceAccountUid { project_number, pool_id, uid: value.into() }
        }
        (true, "namespace") => Member::NamespaceSet { project_number, pool_id, namespace: value.into() },
        (true, "kubernetes.cluster") => Member::ClusterSet { project_number, pool_id, cluster: value.into() },
        (true, "group") => Member::GroupSet { project_number, pool_id, group: value.into() },
        (true, "*") if value.is_empty() => Member::PoolSet { project_number, pool_id },
        (true, attribute) => Member::AttributeSet {
            project_number,
            pool_id,
            attribute: attribute.strip_prefix("attribute.")?.into(),
            value: value.into(),
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POOL: &str = "//iam.googleapis.com/projects/123456789012/locations/global/workloadIdentityPools";

    fn gke(project_number: Option<&str>) -> KsaIdentity {
        KsaIdentity {
            pool: PoolRef { project_number: project_number.map(Into::into), pool_id: "acme-prod.svc.id.goog".into() },
            gke_project_id: Some("acme-prod".into()),
            namespace: "checkout".into(),
            name: "app".into(),
            uid: Some("6507bf33".into()),
            subject: "ns/checkout/sa/app".into(),
            attributes: BTreeMap::new(),
            groups: vec![],
            cluster: Some("https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-1".into()),
        }
    }

    fn federation() -> KsaIdentity {
        KsaIdentity {
            pool: PoolRef { project_number: Some("123456789012".into()), pool_id: "onprem".into() },
            gke_project_id: None,
            namespace: "checkout".into(),
            name: "app".into(),
            uid: Some("6507bf33".into()),
            subject: "system:serviceaccount:checkout:app".into(),
            attributes: BTreeMap::from([("namespace".into(), "checkout".into())]),
            groups: vec!["payments".into()],
            cluster: None,
        }
    }

    fn covers(identity: &KsaIdentity, member: &str) -> bool {
        let parsed = parse_member(member);
        !parsed.deleted && identity.covered_by(&parsed.member)
    }

    #[test]
    fn every_gke_form_covers_the_ksa() {
        let id = gke(Some("123456789012"));
        for member in [
            "serviceAccount:acme-prod.svc.id.goog[checkout/app]".to_string(),
            format!("principal:{POOL}/acme-prod.svc.id.goog/subject/ns/checkout/sa/app"),
            format!("principal:{POOL}/acme-prod.svc.id.goog/kubernetes.serviceaccount.uid/6507bf33"),
            format!("principalSet:{POOL}/acme-prod.svc.id.goog/namespace/checkout"),
            format!(
                "principalSet:{POOL}/acme-prod.svc.id.goog/kubernetes.cluster/https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-1"
            ),
            format!("principalSet:{POOL}/acme-prod.svc.id.goog/*"),
        ] {
            assert!(covers(&id, &member), "{member}");
        }
    }

    #[test]
    fn other_namespaces_names_pools_and_projects_do_not_cover_it() {
        let id = gke(Some("123456789012"));
        for member in [
            "serviceAccount:acme-prod.svc.id.goog[billing/app]".to_string(),
            "serviceAccount:acme-prod.svc.id.goog[checkout/worker]".to_string(),
            "serviceAccount:acme-dev.svc.id.goog[checkout/app]".to_string(),
            "serviceAccount:app@acme-prod.iam.gserviceaccount.com".to_string(),
            "user:alice@example.com".to_string(),
            format!("principal:{POOL}/acme-prod.svc.id.goog/subject/ns/billing/sa/app"),
            "principal://iam.googleapis.com/projects/999/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/subject/ns/checkout/sa/app".to_string(),
            format!("principal:{POOL}/acme-prod.svc.id.goog/kubernetes.serviceaccount.uid/other-uid"),
            format!("principalSet:{POOL}/acme-prod.svc.id.goog/namespace/billing"),
            format!(
                "principalSet:{POOL}/acme-prod.svc.id.goog/kubernetes.cluster/https://container.googleapis.com/v1/projects/acme-prod/locations/us-central1/clusters/prod-2"
            ),
            format!("principalSet:{POOL}/other-pool/*"),
            // Malformed shapes are simply not KSAs.
            "serviceAccount:acme-prod.svc.id.goog[checkout-app]".to_string(),
            "principal://iam.googleapis.com/projects/123456789012/workloadIdentityPools/x/subject/y".to_string(),
            String::new(),
        ] {
            assert!(!covers(&id, &member), "{member}");
        }
    }

    #[test]
    fn unknown_project_number_matches_the_gke_pool_by_name() {
        let id = gke(None);
        assert!(covers(
            &id,
            "principal://iam.googleapis.com/projects/42/locations/global/workloadIdentityPools/acme-prod.svc.id.goog/subject/ns/checkout/sa/app"
        ));
        assert_eq!(id.principal(), "serviceAccount:acme-prod.svc.id.goog[checkout/app]");
        assert_eq!(
            gke(Some("123456789012")).principal(),
            format!("principal:{POOL}/acme-prod.svc.id.goog/subject/ns/checkout/sa/app")
        );
    }

    #[test]
    fn federation_forms_cover_the_mapped_identity() {
        let id = federation();
        for member in [
            format!("principal:{POOL}/onprem/subject/system:serviceaccount:checkout:app"),
            format!("principalSet:{POOL}/onprem/attribute.namespace/checkout"),
            format!("principalSet:{POOL}/onprem/group/payments"),
            format!("principalSet:{POOL}/onprem/*"),
        ] {
            assert!(covers(&id, &member), "{member}");
        }
        for member in [
            format!("principalSet:{POOL}/onprem/attribute.namespace/billing"),
            format!("principalSet:{POOL}/onprem/namespace/checkout"),
            format!("principalSet:{POOL}/onprem/group/ops"),
            format!("principal:{POOL}/other/subject/system:serviceaccount:checkout:app"),
            "serviceAccount:acme-prod.svc.id.goog[checkout/app]".to_string(),
        ] {
            assert!(!covers(&id, &member), "{member}");
        }
        assert_eq!(
            id.principal(),
            format!("principal:{POOL}/onprem/subject/system:serviceaccount:checkout:app")
        );
    }

    #[test]
    fn deleted_members_are_recognised_with_their_uid_suffix() {
        let parsed = parse_member("deleted:serviceAccount:acme-prod.svc.id.goog[checkout/app]?uid=123");
        assert!(parsed.deleted);
        assert!(gke(None).covered_by(&parsed.member));
        let parsed = parse_member(&format!(
            "deleted:principal:{POOL}/onprem/subject/system:serviceaccount:checkout:app"
        ));
        assert!(parsed.deleted && federation().covered_by(&parsed.member));
    }

    #[test]
    fn near_misses_explain_what_was_granted_instead() {
        let id = gke(Some("123456789012"));
        let miss = |m: &str| id.near_miss(&parse_member(m).member);
        assert_eq!(
            miss("serviceAccount:acme-prod.svc.id.goog[billing/app]"),
            Some("the same ServiceAccount name in another namespace")
        );
        assert_eq!(
            miss("serviceAccount:acme-prod.svc.id.goog[checkout/api]"),
            Some("another ServiceAccount in the same namespace")
        );
        assert_eq!(
            miss("serviceAccount:acme-dev.svc.id.goog[checkout/app]"),
            Some("this ServiceAccount in another project's pool")
        );
        assert_eq!(miss("serviceAccount:acme-prod.svc.id.goog[billing/api]"), None);
        assert_eq!(miss("user:bob@example.com"), None);
        let fed = federation();
        assert_eq!(
            fed.near_miss(
                &parse_member(&format!("principal:{POOL}/onprem/subject/system:serviceaccount:billing:app"))
                    .member
            ),
            Some("the same ServiceAccount name in another namespace")
        );
    }
}
