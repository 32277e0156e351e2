//! The compact index of Namespaces and ServiceAccounts the operator selects from: per object only
//! what selection and the checks read (name, labels, UID, the GSA annotation, creation time), with
//! every repeated string interned once, updated in place from watch events (a re-list marks and
//! prunes, so it never holds a second copy), plus the times annotations changed, which open the
//! propagation grace.

use std::{
    borrow::Borrow,
    collections::{BTreeSet, HashMap},
    hash::{Hash, Hasher},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use futures::{Stream, StreamExt, stream};
use internment::ArcIntern;
use k8s_openapi::{
    api::core::v1::{Namespace, ServiceAccount},
    jiff::Timestamp,
};
use kube::{
    core::PartialObjectMeta,
    runtime::watcher::{self, Event},
};
use tokio::sync::watch;

use crate::{
    api::GSA_ANNOTATION,
    engine::{
        ClusterView, KsaRef,
        grace::Changes,
        selector::{LabelLookup, Labels, NO_LABELS},
    },
};

/// A watched or listed Namespace, metadata only.
pub type NamespaceMeta = PartialObjectMeta<Namespace>;
/// A watched or listed ServiceAccount, metadata only.
pub type ServiceAccountMeta = PartialObjectMeta<ServiceAccount>;

/// A string held once in the process however many objects carry it (namespace names, GSA emails,
/// label keys and values); freed with its last holder.
type Interned = ArcIntern<str>;

/// An interned name as a map key: hashed by content, so maps are searched with a `&str` without
/// interning it first (interned values are equal exactly when their contents are).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Name(Interned);

impl Name {
    fn new(name: &str) -> Self {
        Self(Interned::from(name))
    }

    fn as_str(&self) -> &str {
        &self.0
    }
}

impl Hash for Name {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_str().hash(state);
    }
}

impl Borrow<str> for Name {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

/// Labels, interned, sorted by key.
#[derive(Debug, Default)]
struct CompactLabels(Box<[(Interned, Interned)]>);

impl CompactLabels {
    fn new(labels: Option<&Labels>) -> Self {
        Self(
            labels
                .into_iter()
                .flatten()
                .map(|(k, v)| (Interned::from(k.as_str()), Interned::from(v.as_str())))
                .collect(),
        )
    }
}

impl LabelLookup for CompactLabels {
    fn label(&self, key: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        Some(&self.0[i].1)
    }
}

/// A UID as 16 bytes when it is the lowercase hyphenated UUID Kubernetes assigns, else as given.
#[derive(Debug, PartialEq, Eq)]
enum Uid {
    Uuid(uuid::Uuid),
    Other(Interned),
}

impl Uid {
    fn new(uid: &str) -> Self {
        match uuid::Uuid::try_parse(uid) {
            Ok(u) if u.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer()) == uid => Self::Uuid(u),
            _ => Self::Other(Interned::from(uid)),
        }
    }

    /// Lends the UID as text (formatted on a stack buffer, never stored).
    fn with_str<T>(&self, f: impl FnOnce(&str) -> T) -> T {
        match self {
            Self::Uuid(u) => f(u.hyphenated().encode_lower(&mut uuid::Uuid::encode_buffer())),
            Self::Other(s) => f(s),
        }
    }
}

#[derive(Debug)]
struct NamespaceEntry {
    labels: CompactLabels,
    /// The list that last showed it.
    epoch: u32,
}

#[derive(Debug)]
struct ServiceAccountEntry {
    name: Interned,
    uid: Uid,
    labels: CompactLabels,
    gsa_annotation: Option<Interned>,
    created: Option<Timestamp>,
    /// The list that last showed it.
    epoch: u32,
}

impl ServiceAccountEntry {
    fn new(sa: &ServiceAccountMeta, epoch: u32) -> Self {
        let m = &sa.metadata;
        Self {
            name: Interned::from(m.name.as_deref().unwrap_or_default()),
            uid: Uid::new(m.uid.as_deref().unwrap_or_default()),
            labels: CompactLabels::new(m.labels.as_ref()),
            gsa_annotation: gsa_annotation(sa).map(Interned::from),
            created: m.creation_timestamp.as_ref().map(|t| t.0),
            epoch,
        }
    }
}

fn gsa_annotation(sa: &ServiceAccountMeta) -> Option<&str> {
    sa.metadata.annotations.as_ref().and_then(|a| a.get(GSA_ANNOTATION)).map(String::as_str)
}

/// Bits of [`Index::synced`]: which watches have listed once.
const NAMESPACES_LISTED: u8 = 1;
const SERVICE_ACCOUNTS_LISTED: u8 = 2;

#[derive(Debug, Default)]
struct Tables {
    namespaces: HashMap<Name, NamespaceEntry>,
    /// Per namespace, its ServiceAccounts sorted by name: a few each, so a sorted vector holds them
    /// in a fraction of a map's memory, and selection visits only the namespaces in scope.
    service_accounts: HashMap<Name, Vec<ServiceAccountEntry>>,
    /// Each watch's current list: a re-list drops what it did not show by comparing epochs, with
    /// no set of listed names held meanwhile.
    namespace_epoch: u32,
    service_account_epoch: u32,
    /// When each ServiceAccount's annotation was last seen to change (while watched, recently
    /// enough to open a grace). A ServiceAccount seen for the first time has no entry: its
    /// creation time speaks for it, and operator start opens nothing.
    annotation_changes: Changes<u64>,
}

/// The Namespaces and ServiceAccounts, compact, shared by the watches that fill it and the passes
/// that select from it.
#[derive(Debug)]
pub struct Index {
    tables: RwLock<Tables>,
    synced: watch::Sender<u8>,
}

impl Default for Index {
    fn default() -> Self {
        Self { tables: RwLock::default(), synced: watch::Sender::new(0) }
    }
}

impl Index {
    fn read(&self) -> RwLockReadGuard<'_, Tables> {
        self.tables.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, Tables> {
        self.tables.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies a Namespace watch event; returns the Namespaces it touched, a re-list's vanished
    /// ones included (by name), for the controller to map to probes.
    pub fn namespace_event(&self, event: Event<NamespaceMeta>) -> Vec<NamespaceMeta> {
        let mut t = self.write();
        match event {
            Event::Init => {
                t.namespace_epoch = t.namespace_epoch.wrapping_add(1);
                vec![]
            }
            Event::Apply(ns) | Event::InitApply(ns) => {
                let name = ns.metadata.name.as_deref().unwrap_or_default();
                let entry = NamespaceEntry {
                    labels: CompactLabels::new(ns.metadata.labels.as_ref()),
                    epoch: t.namespace_epoch,
                };
                t.namespaces.insert(Name::new(name), entry);
                vec![ns]
            }
            Event::Delete(ns) => {
                t.namespaces.remove(ns.metadata.name.as_deref().unwrap_or_default());
                vec![ns]
            }
            Event::InitDone => {
                let epoch = t.namespace_epoch;
                let mut gone = vec![];
                t.namespaces.retain(|name, entry| {
                    let listed = entry.epoch == epoch;
                    if !listed {
                        gone.push(named(None, name.as_str()));
                    }
                    listed
                });
                t.namespaces.shrink_to_fit();
                drop(t);
                self.synced.send_modify(|s| *s |= NAMESPACES_LISTED);
                gone
            }
        }
    }

    /// Applies a ServiceAccount watch event; returns the ServiceAccounts it touched, a re-list's
    /// vanished ones included (by namespace and name).
    pub fn service_account_event(&self, event: Event<ServiceAccountMeta>) -> Vec<ServiceAccountMeta> {
        let mut t = self.write();
        match event {
            Event::Init => {
                t.service_account_epoch = t.service_account_epoch.wrapping_add(1);
                vec![]
            }
            Event::Apply(sa) | Event::InitApply(sa) => {
                t.store(&sa);
                vec![sa]
            }
            Event::Delete(sa) => {
                let m = &sa.metadata;
                t.remove(m.namespace.as_deref().unwrap_or_default(), m.name.as_deref().unwrap_or_default());
                vec![sa]
            }
            Event::InitDone => {
                let gone = t.prune_unlisted();
                drop(t);
                self.synced.send_modify(|s| *s |= SERVICE_ACCOUNTS_LISTED);
                gone
            }
        }
    }

    /// Waits until both watches have listed once.
    pub async fn wait_until_ready(&self) -> Result<(), watch::error::RecvError> {
        let both = NAMESPACES_LISTED | SERVICE_ACCOUNTS_LISTED;
        self.synced.subscribe().wait_for(|s| *s & both == both).await.map(|_| ())
    }

    /// Calls `f` with a namespace's labels (none when it is unknown).
    pub fn with_namespace_labels<T>(&self, namespace: &str, f: impl FnOnce(&dyn LabelLookup) -> T) -> T {
        let t = self.read();
        match t.namespaces.get(namespace) {
            Some(ns) => f(&ns.labels),
            None => f(&NO_LABELS),
        }
    }

    /// A ServiceAccount's UID, for Events about it.
    pub fn service_account_uid(&self, namespace: &str, name: &str) -> Option<String> {
        let t = self.read();
        let sas = t.service_accounts.get(namespace)?;
        let i = find(sas, name).ok()?;
        Some(sas[i].uid.with_str(str::to_string))
    }

    /// When the annotation of `namespace/name` last changed, if it did while watched and recently
    /// enough to open a grace.
    pub fn annotation_changed_at(&self, namespace: &str, name: &str) -> Option<Timestamp> {
        self.read().annotation_changes.get(&key(&[namespace, name]), Timestamp::now())
    }

    /// Lends the index to the engine's selection (watch events wait meanwhile).
    pub fn view(&self) -> impl ClusterView + '_ {
        IndexView(self.read())
    }

    /// How many Namespaces and ServiceAccounts it holds.
    pub fn len(&self) -> (usize, usize) {
        let t = self.read();
        (t.namespaces.len(), t.service_accounts.values().map(Vec::len).sum())
    }
}

fn find(sas: &[ServiceAccountEntry], name: &str) -> Result<usize, usize> {
    sas.binary_search_by(|sa| (*sa.name).cmp(name))
}

/// An object known only by its namespace and name: what a re-list no longer shows, or the
/// namespace a change touched.
pub(super) fn named<K: kube::Resource>(namespace: Option<&str>, name: &str) -> PartialObjectMeta<K> {
    PartialObjectMeta {
        types: None,
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            namespace: namespace.map(str::to_string),
            ..Default::default()
        },
        _phantom: Default::default(),
    }
}

impl Tables {
    fn store(&mut self, sa: &ServiceAccountMeta) {
        let namespace = sa.metadata.namespace.as_deref().unwrap_or_default();
        let entry = ServiceAccountEntry::new(sa, self.service_account_epoch);
        let sas = match self.service_accounts.get_mut(namespace) {
            Some(sas) => sas,
            None => self.service_accounts.entry(Name::new(namespace)).or_default(),
        };
        match find(sas, &entry.name) {
            Ok(i) => {
                if sas[i].gsa_annotation != entry.gsa_annotation {
                    let id = key(&[namespace, &entry.name]);
                    self.annotation_changes.record(id, Timestamp::now());
                }
                sas[i] = entry;
            }
            Err(i) => sas.insert(i, entry),
        }
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(sas) = self.service_accounts.get_mut(namespace) else { return };
        if let Ok(i) = find(sas, name) {
            sas.remove(i);
        }
        if sas.is_empty() {
            self.service_accounts.remove(namespace);
        }
        self.annotation_changes.forget(&key(&[namespace, name]));
    }

    /// Drops every ServiceAccount the last list did not show (deleted while the watch was down:
    /// no Delete reports them), and their annotation changes; returns them.
    fn prune_unlisted(&mut self) -> Vec<ServiceAccountMeta> {
        let epoch = self.service_account_epoch;
        let mut gone = vec![];
        for (namespace, sas) in &mut self.service_accounts {
            sas.retain(|sa| {
                let listed = sa.epoch == epoch;
                if !listed {
                    gone.push(named(Some(namespace.as_str()), &sa.name));
                }
                listed
            });
            sas.shrink_to_fit();
        }
        self.service_accounts.retain(|_, sas| !sas.is_empty());
        self.service_accounts.shrink_to_fit();
        for sa in &gone {
            let m = &sa.metadata;
            self.annotation_changes.forget(&key(&[
                m.namespace.as_deref().unwrap_or_default(),
                m.name.as_deref().unwrap_or_default(),
            ]));
        }
        gone
    }
}

/// The index, read-locked for one selection.
struct IndexView<'a>(RwLockReadGuard<'a, Tables>);

impl ClusterView for IndexView<'_> {
    fn each_namespace(&self, f: &mut dyn FnMut(&str, &dyn LabelLookup)) {
        for (name, ns) in &self.0.namespaces {
            f(name.as_str(), &ns.labels);
        }
    }

    fn each_service_account(&self, namespaces: &BTreeSet<String>, f: &mut dyn FnMut(KsaRef<'_>)) {
        for namespace in namespaces {
            for sa in self.0.service_accounts.get(namespace.as_str()).into_iter().flatten() {
                sa.uid.with_str(|uid| {
                    f(KsaRef {
                        namespace,
                        name: &sa.name,
                        uid,
                        labels: &sa.labels,
                        gsa_annotation: sa.gsa_annotation.as_deref(),
                        created: sa.created,
                    });
                });
            }
        }
    }
}

/// Follows a watch into the index: applies each event with `apply` and yields what it touched.
pub fn follow<K: Send + 'static>(
    events: impl Stream<Item = Result<Event<K>, watcher::Error>> + Send + 'static,
    index: Arc<Index>,
    apply: fn(&Index, Event<K>) -> Vec<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static {
    events
        .map(move |event| {
            let touched: Vec<_> = match event {
                Ok(event) => apply(&index, event).into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            stream::iter(touched)
        })
        .flatten()
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
    fn each_namespace(&self, f: &mut dyn FnMut(&str, &dyn LabelLookup)) {
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{api::AuthProbeSpec, engine::Plan};

    const UID: &str = "0b5e2f3c-8a1d-4c6e-9f70-2d4b6a8c0e12";

    fn sa(namespace: &str, name: &str, annotation: Option<&str>) -> ServiceAccountMeta {
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
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                uid: Some(if name == "odd" { "u1".into() } else { UID.into() }),
                labels: (name == "labelled").then(|| BTreeMap::from([("wif".into(), "yes".into())])),
                annotations: Some(annotations),
                managed_fields: Some(vec![Default::default()]),
                generation: Some(1),
                ..Default::default()
            },
            _phantom: Default::default(),
        }
    }

    fn ns(name: &str, team: &str) -> NamespaceMeta {
        let mut ns = named::<Namespace>(None, name);
        ns.metadata.labels = Some(BTreeMap::from([
            ("kubernetes.io/metadata.name".into(), name.into()),
            ("team".into(), team.into()),
        ]));
        ns
    }

    fn listed(index: &Index, namespaces: Vec<NamespaceMeta>, sas: Vec<ServiceAccountMeta>) {
        index.namespace_event(Event::Init);
        for n in namespaces {
            index.namespace_event(Event::InitApply(n));
        }
        index.namespace_event(Event::InitDone);
        index.service_account_event(Event::Init);
        for s in sas {
            index.service_account_event(Event::InitApply(s));
        }
        index.service_account_event(Event::InitDone);
    }

    fn cluster() -> (Vec<NamespaceMeta>, Vec<ServiceAccountMeta>) {
        let gsa = Some("payments@acme-prod.iam.gserviceaccount.com");
        (
            vec![ns("a", "payments"), ns("b", "payments"), ns("x", "search")],
            vec![
                sa("a", "app", gsa),
                sa("a", "labelled", None),
                sa("a", "odd", gsa),
                sa("b", "other", gsa),
                sa("x", "app", gsa),
            ],
        )
    }

    fn plan(service_accounts: serde_json::Value) -> Plan {
        let spec: AuthProbeSpec = serde_json::from_value(serde_json::json!({
            "namespaceSelector": {"matchLabels": {"team": "payments"}},
            "serviceAccounts": service_accounts,
            "identity": {"platform": "GKE", "projectId": "acme-prod", "projectNumber": "123456789012"},
        }))
        .unwrap();
        Plan::parse(&spec).unwrap()
    }

    #[test]
    fn the_index_selects_exactly_what_the_listed_objects_do() {
        let (namespaces, sas) = cluster();
        let index = Index::default();
        listed(&index, namespaces.clone(), sas.clone());
        let listed_view = MetaView::new(namespaces, sas);
        for p in [
            plan(serde_json::json!({"names": ["app", "missing"]})),
            plan(serde_json::json!({"names": [], "selector": {"matchLabels": {"wif": "yes"}}})),
            plan(serde_json::Value::Null),
        ] {
            let from_index = p.select(&index.view());
            assert_eq!(from_index, p.select(&listed_view));
            assert!(!from_index.candidates.is_empty());
        }
        let all = plan(serde_json::Value::Null).select(&index.view());
        let uids: Vec<_> =
            all.candidates.iter().filter_map(|c| c.ksa.as_ref()).map(|k| k.uid.as_str()).collect();
        assert_eq!(uids, [UID, "u1", UID], "a UUID comes back as listed, and so does any other UID");
        assert_eq!(index.service_account_uid("a", "odd").as_deref(), Some("u1"));
        assert_eq!(
            index.with_namespace_labels("x", |l| l.label("team").map(str::to_string)).as_deref(),
            Some("search")
        );
        assert!(index.with_namespace_labels("gone", |l| l.label("team").is_none()));
    }

    #[test]
    fn annotation_changes_are_timed_but_first_sight_is_not() {
        let index = Index::default();
        let apply = |sa| index.service_account_event(Event::Apply(sa));
        apply(sa("checkout", "app", Some("a@acme-prod.iam.gserviceaccount.com")));
        assert_eq!(index.annotation_changed_at("checkout", "app"), None);
        apply(sa("checkout", "app", Some("a@acme-prod.iam.gserviceaccount.com")));
        assert_eq!(index.annotation_changed_at("checkout", "app"), None);
        apply(sa("checkout", "app", Some("b@acme-prod.iam.gserviceaccount.com")));
        assert!(index.annotation_changed_at("checkout", "app").is_some());
        index.service_account_event(Event::Delete(sa("checkout", "app", None)));
        assert_eq!(index.annotation_changed_at("checkout", "app"), None);
        assert_eq!(index.len(), (0, 0));
    }

    #[test]
    fn a_relist_forgets_what_it_no_longer_shows_and_reports_it() {
        let index = Index::default();
        let (namespaces, sas) = cluster();
        listed(&index, namespaces, sas);
        index.service_account_event(Event::Apply(sa(
            "b",
            "other",
            Some("c@acme-prod.iam.gserviceaccount.com"),
        )));
        assert!(index.annotation_changed_at("b", "other").is_some());
        assert_eq!(index.len(), (3, 5));

        // The watches were down (410) while namespace b and its ServiceAccount were deleted: the
        // re-lists do not show them, and report them so their probes look again.
        index.namespace_event(Event::Init);
        for n in [ns("a", "payments"), ns("x", "search")] {
            assert_eq!(index.namespace_event(Event::InitApply(n)).len(), 1);
        }
        let gone = index.namespace_event(Event::InitDone);
        assert_eq!(gone.iter().map(|n| n.metadata.name.as_deref()).collect::<Vec<_>>(), [Some("b")]);
        index.service_account_event(Event::Init);
        for s in cluster().1.into_iter().filter(|s| s.metadata.namespace.as_deref() != Some("b")) {
            index.service_account_event(Event::InitApply(s));
        }
        let gone = index.service_account_event(Event::InitDone);
        let gone: Vec<_> =
            gone.iter().map(|s| (s.metadata.namespace.as_deref(), s.metadata.name.as_deref())).collect();
        assert_eq!(gone, [(Some("b"), Some("other"))]);
        assert_eq!(index.len(), (2, 4));
        assert_eq!(
            index.annotation_changed_at("b", "other"),
            None,
            "nothing of a deleted ServiceAccount is kept"
        );
    }

    #[tokio::test]
    async fn ready_once_both_watches_listed() {
        let index = Arc::new(Index::default());
        let waiting = tokio::spawn({
            let index = index.clone();
            async move { index.wait_until_ready().await }
        });
        index.namespace_event(Event::Init);
        index.namespace_event(Event::InitDone);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the ServiceAccounts are not listed yet");
        index.service_account_event(Event::Init);
        index.service_account_event(Event::InitDone);
        assert!(waiting.await.unwrap().is_ok());
    }
}
