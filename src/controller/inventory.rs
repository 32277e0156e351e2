//! The cached view of Namespaces and ServiceAccounts: metadata only, pruned to what the checks
//! read before it is stored (managedFields alone are most of a cached object's heap), plus the
//! change times that open the propagation grace.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Mutex,
};

use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    jiff::Timestamp,
};
use kube::{core::PartialObjectMeta, runtime::watcher};

use crate::{
    api::GSA_ANNOTATION,
    engine::{
        ClusterView, KsaRef,
        grace::Changes,
        selector::{Labels, NO_LABELS},
    },
};

/// A cached Namespace.
pub type NamespaceMeta = PartialObjectMeta<Namespace>;
/// A cached ServiceAccount.
pub type ServiceAccountMeta = PartialObjectMeta<ServiceAccount>;

/// Keeps a Namespace's name and labels (and the resourceVersion the watch resumes from).
pub fn prune_namespace(ns: &mut NamespaceMeta) {
    let m = &mut ns.metadata;
    *m = kube::api::ObjectMeta {
        name: m.name.take(),
        labels: m.labels.take().filter(|l| !l.is_empty()),
        resource_version: m.resource_version.take(),
        ..Default::default()
    };
}

/// Keeps what the checks read of a ServiceAccount: identity, labels, creation time and the GSA annotation.
pub fn prune_service_account(sa: &mut ServiceAccountMeta) {
    let m = &mut sa.metadata;
    let annotations = m.annotations.take().and_then(|mut a| {
        a.remove(GSA_ANNOTATION).map(|v| BTreeMap::from([(GSA_ANNOTATION.to_string(), v)]))
    });
    *m = kube::api::ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        uid: m.uid.take(),
        labels: m.labels.take().filter(|l| !l.is_empty()),
        annotations,
        creation_timestamp: m.creation_timestamp.take(),
        resource_version: m.resource_version.take(),
        ..Default::default()
    };
}

/// Keeps what the ConfigMap watch needs: which ConfigMap it is and its version (its data is read
/// only for mounted ones, by [`crate::probe::config_maps::ConfigMaps`]).
pub fn prune_config_map(cm: &mut super::workloads::ConfigMapMeta) {
    let m = &mut cm.metadata;
    *m = kube::api::ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        resource_version: m.resource_version.take(),
        ..Default::default()
    };
}

/// The engine's view of a cached or listed ServiceAccount.
pub fn ksa_ref(sa: &ServiceAccountMeta) -> KsaRef<'_> {
    let m = &sa.metadata;
    KsaRef {
        namespace: m.namespace.as_deref().unwrap_or_default(),
        name: m.name.as_deref().unwrap_or_default(),
        uid: m.uid.as_deref().unwrap_or_default(),
        labels: m.labels.as_ref().unwrap_or(&NO_LABELS),
        gsa_annotation: m.annotations.as_ref().and_then(|a| a.get(GSA_ANNOTATION)).map(String::as_str),
        created: m.creation_timestamp.as_ref().map(|t| t.0),
    }
}

/// Namespaces and ServiceAccounts, cached (the operator's stores) or listed (`authprobe check`),
/// lent to the engine's one selection.
#[derive(Debug)]
pub struct MetaView<N, S> {
    namespaces: Vec<N>,
    service_accounts: Vec<S>,
}

impl<N: Borrow<NamespaceMeta>, S: Borrow<ServiceAccountMeta>> MetaView<N, S> {
    /// A view over these objects.
    pub fn new(namespaces: Vec<N>, service_accounts: Vec<S>) -> Self {
        Self { namespaces, service_accounts }
    }
}

impl<N: Borrow<NamespaceMeta>, S: Borrow<ServiceAccountMeta>> ClusterView for MetaView<N, S> {
    fn each_namespace(&self, f: &mut dyn FnMut(&str, &Labels)) {
        for ns in &self.namespaces {
            let m = &ns.borrow().metadata;
            if let Some(name) = &m.name {
                f(name, m.labels.as_ref().unwrap_or(&NO_LABELS));
            }
        }
    }

    fn each_service_account(&self, _namespaces: &BTreeSet<String>, f: &mut dyn FnMut(KsaRef<'_>)) {
        for sa in &self.service_accounts {
            f(ksa_ref(sa.borrow()));
        }
    }
}

/// A compact key for a namespace or a `(namespace, name)` pair.
pub fn key(parts: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    parts.hash(&mut h);
    h.finish()
}

/// When each ServiceAccount's annotation was last seen to change. A ServiceAccount seen for the
/// first time has no entry: its creation time speaks for it, and operator start opens nothing.
/// Both maps stay bounded: deleted ServiceAccounts are forgotten (after a re-list too, which
/// reports no Delete for those deleted while the watch was down), and changes older than the
/// longest grace are dropped.
#[derive(Debug, Default)]
pub struct AnnotationChanges {
    state: Mutex<Annotations>,
}

#[derive(Debug, Default)]
struct Annotations {
    /// Per ServiceAccount, a hash of its annotation value.
    seen: HashMap<u64, u64>,
    changed: Changes<u64>,
    /// ServiceAccounts listed since a re-list began.
    relisted: Option<HashSet<u64>>,
}

fn id(sa: &ServiceAccountMeta) -> u64 {
    let m = &sa.metadata;
    key(&[m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default()])
}

impl AnnotationChanges {
    fn with<T>(&self, f: impl FnOnce(&mut Annotations) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Follows the ServiceAccount watch.
    pub fn observe(&self, event: &watcher::Event<ServiceAccountMeta>) {
        self.with(|s| match event {
            watcher::Event::Apply(sa) => s.apply(sa),
            watcher::Event::InitApply(sa) => {
                s.apply(sa);
                s.relisted.get_or_insert_default().insert(id(sa));
            }
            watcher::Event::Delete(sa) => s.forget(id(sa)),
            watcher::Event::Init => s.relisted = Some(HashSet::new()),
            watcher::Event::InitDone => {
                let listed = s.relisted.take().unwrap_or_default();
                let gone: Vec<u64> = s.seen.keys().filter(|k| !listed.contains(*k)).copied().collect();
                for k in gone {
                    s.forget(k);
                }
            }
        });
    }

    /// When the annotation of `namespace/name` last changed, if it did while watched and recently
    /// enough to open a grace.
    pub fn changed_at(&self, namespace: &str, name: &str) -> Option<Timestamp> {
        self.with(|s| s.changed.get(&key(&[namespace, name]), Timestamp::now()))
    }
}

impl Annotations {
    fn apply(&mut self, sa: &ServiceAccountMeta) {
        let value = key(&[sa
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(GSA_ANNOTATION))
            .map_or("\u{0}", String::as_str)]);
        let id = id(sa);
        if self.seen.insert(id, value).is_some_and(|previous| previous != value) {
            self.changed.record(id, Timestamp::now());
        }
    }

    fn forget(&mut self, id: u64) {
        self.seen.remove(&id);
        self.changed.forget(&id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(annotation: Option<&str>) -> ServiceAccountMeta {
        let mut annotations = BTreeMap::from([(
            "kubectl.kubernetes.io/last-applied-configuration".to_string(),
            "{...big...}".to_string(),
        )]);
        if let Some(a) = annotation {
            annotations.insert(GSA_ANNOTATION.into(), a.into());
        }
        PartialObjectMeta {
            types: None,
            metadata: kube::api::ObjectMeta {
                name: Some("app".into()),
                namespace: Some("checkout".into()),
                uid: Some("u1".into()),
                annotations: Some(annotations),
                managed_fields: Some(vec![Default::default()]),
                generation: Some(1),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    #[test]
    fn pruning_keeps_only_what_the_checks_read() {
        let mut s = sa(Some("payments@acme-prod.iam.gserviceaccount.com"));
        prune_service_account(&mut s);
        assert!(s.metadata.managed_fields.is_none() && s.metadata.generation.is_none());
        assert_eq!(s.metadata.annotations.as_ref().map(BTreeMap::len), Some(1));
        let k = ksa_ref(&s);
        assert_eq!((k.namespace, k.name, k.uid), ("checkout", "app", "u1"));
        assert_eq!(k.gsa_annotation, Some("payments@acme-prod.iam.gserviceaccount.com"));
        let mut bare = sa(None);
        prune_service_account(&mut bare);
        assert!(bare.metadata.annotations.is_none());
    }

    #[test]
    fn annotation_changes_are_timed_but_first_sight_is_not() {
        let changes = AnnotationChanges::default();
        let apply = |sa| changes.observe(&watcher::Event::Apply(sa));
        apply(sa(Some("a@acme-prod.iam.gserviceaccount.com")));
        assert_eq!(changes.changed_at("checkout", "app"), None);
        apply(sa(Some("a@acme-prod.iam.gserviceaccount.com")));
        assert_eq!(changes.changed_at("checkout", "app"), None);
        apply(sa(Some("b@acme-prod.iam.gserviceaccount.com")));
        assert!(changes.changed_at("checkout", "app").is_some());
        changes.observe(&watcher::Event::Delete(sa(None)));
        assert_eq!(changes.changed_at("checkout", "app"), None);
    }

    #[test]
    fn a_relist_forgets_service_accounts_it_no_longer_shows() {
        let changes = AnnotationChanges::default();
        changes.observe(&watcher::Event::Apply(sa(Some("a@acme-prod.iam.gserviceaccount.com"))));
        changes.observe(&watcher::Event::Apply(sa(Some("b@acme-prod.iam.gserviceaccount.com"))));
        assert!(changes.changed_at("checkout", "app").is_some());
        // The watch was down (410) while checkout/app was deleted: the re-list does not show it.
        changes.observe(&watcher::Event::Init);
        changes.observe(&watcher::Event::InitDone);
        assert_eq!(changes.changed_at("checkout", "app"), None);
        assert!(changes.with(|s| s.seen.is_empty()), "nothing of a deleted ServiceAccount is kept");
    }
}
