//! The workload inventory: Deployments, StatefulSets, DaemonSets, Jobs, CronJobs and bare Pods,
//! each pruned to the engine's [`Workload`] view as its watch event arrives (a full object is never
//! stored), indexed by namespace; and which ConfigMaps they mount, so the metadata-only ConfigMap
//! watch keeps versions (and triggers passes) for those alone. An event that leaves the pruned
//! view unchanged (a rollout's status, replicas, labels) triggers nothing.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, HashMap},
    hash::{Hash, Hasher},
    sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use futures::{Stream, StreamExt, stream};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Resource,
    core::PartialObjectMeta,
    runtime::watcher::{self, Event},
};
use tokio::sync::watch;

use crate::{
    api::Reason,
    engine::workload::{Lean, LeanKind, Text, Unavailable, Workload, WorkloadKind, WorkloadView, prune},
    probe::config_maps::ConfigMaps,
    redact,
};

/// A cached ConfigMap's metadata.
pub type ConfigMapMeta = PartialObjectMeta<ConfigMap>;

/// One bit per watch that has listed once: each kind's (its declaration index) and the
/// ConfigMaps'. Workloads can be judged once every kind listed; the operator is ready once all did.
const CONFIG_MAP_BIT: u8 = 1 << WorkloadKind::ALL.len();
const KINDS_SYNCED: u8 = CONFIG_MAP_BIT - 1;
const ALL_SYNCED: u8 = (CONFIG_MAP_BIT << 1) - 1;

fn bit(kind: WorkloadKind) -> u8 {
    1 << (kind as u8)
}

/// A stored workload and the list (epoch of its kind) that last showed it.
#[derive(Debug)]
struct Entry {
    workload: Arc<Workload>,
    epoch: u32,
}

/// A namespace's workloads, sorted by kind and name: a few per namespace, so a sorted vector holds
/// them in a fraction of a map's memory.
type InNamespace = Vec<Entry>;

fn find(entries: &InNamespace, kind: WorkloadKind, name: &str) -> Result<usize, usize> {
    entries.binary_search_by(|e| (e.workload.kind, &*e.workload.name).cmp(&(kind, name)))
}

/// A namespace as the key of its workloads: the interned text they hold, so the name is stored
/// once; hashed as its text, so a lookup by `&str` needs no interning. (Equality is the pointer's,
/// which for interned text is the text's.)
#[derive(Debug, PartialEq, Eq)]
struct NamespaceKey(Text);

impl Hash for NamespaceKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        str::hash(&self.0, state);
    }
}

impl Borrow<str> for NamespaceKey {
    fn borrow(&self) -> &str {
        &self.0
    }
}

type ByNamespace = HashMap<NamespaceKey, InNamespace>;

/// Every workload, pruned, by namespace.
#[derive(Debug)]
pub struct Workloads {
    by_namespace: RwLock<ByNamespace>,
    /// Per kind, the current list's epoch: a re-list drops what it did not show by comparing
    /// epochs, with no set of listed names held meanwhile.
    epochs: Mutex<[u32; WorkloadKind::ALL.len()]>,
    synced: watch::Sender<u8>,
    /// Per kind never listed yet: its last watch error, and whether the API server refused it.
    failing: Mutex<BTreeMap<WorkloadKind, (String, bool)>>,
}

impl Default for Workloads {
    fn default() -> Self {
        Self {
            by_namespace: RwLock::default(),
            epochs: Mutex::default(),
            synced: watch::Sender::new(0),
            failing: Mutex::default(),
        }
    }
}

impl Workloads {
    fn read(&self) -> RwLockReadGuard<'_, ByNamespace> {
        self.by_namespace.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, ByNamespace> {
        self.by_namespace.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn epochs(&self) -> MutexGuard<'_, [u32; WorkloadKind::ALL.len()]> {
        self.epochs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stores a workload; returns whether its view changed.
    pub fn apply(&self, workload: Workload) -> bool {
        let epoch = self.epochs()[workload.kind as usize];
        let mut all = self.write();
        let entries = match all.get_mut(&*workload.namespace) {
            Some(entries) => entries,
            None => all.entry(NamespaceKey(workload.namespace.clone())).or_default(),
        };
        match find(entries, workload.kind, &workload.name) {
            Ok(i) => {
                entries[i].epoch = epoch;
                if *entries[i].workload == workload {
                    return false;
                }
                entries[i].workload = Arc::new(workload);
            }
            Err(i) => entries.insert(i, Entry { workload: Arc::new(workload), epoch }),
        }
        true
    }

    /// Drops a workload; returns whether it was stored.
    pub fn remove(&self, kind: WorkloadKind, namespace: &str, name: &str) -> bool {
        let mut all = self.write();
        let Some(entries) = all.get_mut(namespace) else { return false };
        let Ok(i) = find(entries, kind, name) else { return false };
        entries.remove(i);
        if entries.is_empty() {
            all.remove(namespace);
        }
        true
    }

    /// A (re-)list of `kind` starts.
    pub fn begin_listing(&self, kind: WorkloadKind) {
        let mut epochs = self.epochs();
        epochs[kind as usize] = epochs[kind as usize].wrapping_add(1);
    }

    /// Ends a (re-)list of `kind`: drops what it did not show; returns their namespaces.
    pub fn end_listing(&self, kind: WorkloadKind) -> Vec<String> {
        let epoch = self.epochs()[kind as usize];
        let mut all = self.write();
        let mut touched = Vec::new();
        for (namespace, entries) in all.iter_mut() {
            let before = entries.len();
            entries.retain(|e| e.workload.kind != kind || e.epoch == epoch);
            if entries.len() != before {
                touched.push(namespace.0.to_string());
            }
            // Vectors grow by doubling while a list fills them; what is spare then stays spare in
            // every one of thousands of namespaces, so it is given back once the list is done.
            entries.shrink_to_fit();
        }
        all.retain(|_, entries| !entries.is_empty());
        drop(all);
        self.synced.send_modify(|s| *s |= bit(kind));
        self.failing_kinds().remove(&kind);
        touched
    }

    fn failing_kinds(&self) -> MutexGuard<'_, BTreeMap<WorkloadKind, (String, bool)>> {
        self.failing.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A watch of `kind` failed (it retries); remembered until the kind has listed once.
    fn watch_failed(&self, kind: WorkloadKind, error: &watcher::Error) {
        if *self.synced.borrow() & bit(kind) != 0 {
            return;
        }
        let forbidden = matches!(
            error,
            watcher::Error::InitialListFailed(kube::Error::Api(s))
                | watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 403
        ) || matches!(error, watcher::Error::WatchError(s) if s.code == 403);
        self.failing_kinds().insert(kind, (redact::upstream(&error.to_string()), forbidden));
    }

    /// Whether any workload in `namespace` mounts ConfigMap `name`.
    pub fn mounts_config_map(&self, namespace: &str, name: &str) -> bool {
        self.read()
            .get(namespace)
            .is_some_and(|entries| entries.iter().any(|e| e.workload.mounts_config_map(name)))
    }

    /// The UID of a workload, for Events about it.
    pub fn uid(&self, namespace: &str, kind: WorkloadKind, name: &str) -> Option<String> {
        let all = self.read();
        let entries = all.get(namespace)?;
        find(entries, kind, name).ok().map(|i| entries[i].workload.uid.to_string())
    }

    /// How many workloads are stored.
    pub fn len(&self) -> usize {
        self.read().values().map(Vec::len).sum()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until every workload kind and the ConfigMaps have been listed once.
    pub async fn wait_until_ready(&self) {
        self.wait_for(ALL_SYNCED).await;
    }

    /// Waits until every workload kind has been listed once, so a pass sees them all.
    pub async fn wait_until_listed(&self) {
        self.wait_for(KINDS_SYNCED).await;
    }

    async fn wait_for(&self, bits: u8) {
        let mut synced = self.synced.subscribe();
        // The sender lives as long as `self`, so this cannot fail while it is borrowed.
        let _ = synced.wait_for(|s| *s & bits == bits).await;
    }
}

impl WorkloadView for Workloads {
    fn each_workload(&self, namespace: &str, f: &mut dyn FnMut(&Arc<Workload>)) {
        if let Some(entries) = self.read().get(namespace) {
            entries.iter().for_each(|e| f(&e.workload));
        }
    }

    fn unavailable(&self) -> Option<Unavailable> {
        let synced = *self.synced.borrow();
        let missing: Vec<WorkloadKind> =
            WorkloadKind::ALL.iter().copied().filter(|k| synced & bit(*k) == 0).collect();
        if missing.is_empty() {
            return None;
        }
        let failing = self.failing_kinds();
        let forbidden = missing.iter().any(|k| failing.get(k).is_some_and(|(_, f)| *f));
        let last = missing.iter().find_map(|k| failing.get(k)).map_or("no answer yet", |(e, _)| e.as_str());
        let kinds: Vec<&str> = missing.iter().map(|k| k.into()).collect();
        Some(Unavailable {
            reason: if forbidden { Reason::CheckerForbidden } else { Reason::KubernetesUnavailable },
            detail: format!(
                "authprobe could not list {} ({last}){}",
                kinds.join(", "),
                if forbidden { "; its RBAC needs list and watch on them (the chart grants it)" } else { "" }
            ),
        })
    }
}

/// The namespace of a change that may matter to the probes covering it.
pub type Touched = PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>;

fn touched(namespace: String) -> Touched {
    super::inventory::named(None, &namespace)
}

/// Watches every object of kind `K`, keeps `workloads` up to date, and yields the namespace of each
/// change to a pruned view (an object appearing, changing what the stage reads, or going).
pub fn watch_kind<K>(
    events: impl Stream<Item = Result<Event<Lean<K>>, watcher::Error>> + Send + 'static,
    workloads: Arc<Workloads>,
) -> impl Stream<Item = Result<Touched, watcher::Error>> + Send + 'static
where
    K: LeanKind,
{
    let kind = K::WORKLOAD;
    events
        .map(move |event| {
            let namespaces: Vec<String> = match event {
                Err(e) => {
                    workloads.watch_failed(kind, &e);
                    return stream::iter(vec![Err(e)]);
                }
                Ok(Event::Init) => {
                    workloads.begin_listing(kind);
                    vec![]
                }
                Ok(Event::InitDone) => workloads.end_listing(kind),
                Ok(Event::Apply(object) | Event::InitApply(object)) => {
                    let meta = object.meta();
                    let (namespace, name) =
                        (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
                    // An object that stops being a workload of its own (a Pod adopted) is dropped.
                    let changed = match prune(&object) {
                        Some(view) => workloads.apply(view),
                        None => workloads.remove(kind, &namespace, &name),
                    };
                    if changed { vec![namespace] } else { vec![] }
                }
                Ok(Event::Delete(object)) => {
                    let meta = object.meta();
                    let namespace = meta.namespace.clone().unwrap_or_default();
                    let name = meta.name.as_deref().unwrap_or_default();
                    if workloads.remove(kind, &namespace, name) { vec![namespace] } else { vec![] }
                }
            };
            stream::iter(namespaces.into_iter().map(|n| Ok(touched(n))).collect::<Vec<_>>())
        })
        .flatten()
}

/// Watches ConfigMap metadata: a ConfigMap some workload mounts has its version recorded and, when
/// that differs from what a pass read, yields its namespace; any other is forgotten.
pub fn watch_config_maps(
    events: impl Stream<Item = Result<Event<ConfigMapMeta>, watcher::Error>> + Send + 'static,
    workloads: Arc<Workloads>,
    config_maps: Arc<ConfigMaps>,
) -> impl Stream<Item = Result<Touched, watcher::Error>> + Send + 'static {
    events
        .map(move |event| {
            let (cm, version) = match event {
                Err(e) => return stream::iter(vec![Err(e)]),
                Ok(Event::InitDone) => {
                    workloads.synced.send_modify(|s| *s |= CONFIG_MAP_BIT);
                    return stream::iter(vec![]);
                }
                Ok(Event::Init) => return stream::iter(vec![]),
                Ok(Event::Apply(cm) | Event::InitApply(cm)) => {
                    let version = cm.metadata.resource_version.clone();
                    (cm, version)
                }
                Ok(Event::Delete(cm)) => (cm, None),
            };
            let namespace = cm.metadata.namespace.clone().unwrap_or_default();
            let name = cm.metadata.name.as_deref().unwrap_or_default();
            if !workloads.mounts_config_map(&namespace, name) {
                config_maps.forget(&namespace, name);
                return stream::iter(vec![]);
            }
            if config_maps.observe(&namespace, name, version) {
                stream::iter(vec![Ok(touched(namespace))])
            } else {
                stream::iter(vec![])
            }
        })
        .flatten()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::apps::v1::Deployment;
    use serde_json::json;

    use super::*;

    fn deployment(name: &str, namespace: &str, replicas: i32, config_map: &str) -> Lean<Deployment> {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
            "spec": {"replicas": replicas, "selector": {}, "template": {"spec": {
                "serviceAccountName": "app",
                "containers": [{"name": "c"}],
                "volumes": [{"name": "v", "configMap": {"name": config_map}}]
            }}}
        }))
        .unwrap()
    }

    async fn run(events: Vec<Event<Lean<Deployment>>>, workloads: &Arc<Workloads>) -> Vec<String> {
        let stream = futures::stream::iter(events.into_iter().map(Ok));
        watch_kind(stream, workloads.clone()).map(|t| t.unwrap().metadata.name.unwrap()).collect().await
    }

    #[test]
    fn every_kind_has_its_sync_bit() {
        let bits = WorkloadKind::ALL.iter().fold(0, |b, k| b | bit(*k));
        assert_eq!(bits | CONFIG_MAP_BIT, ALL_SYNCED);
        assert_eq!(bits & CONFIG_MAP_BIT, 0);
    }

    #[tokio::test]
    async fn only_changes_to_the_pruned_view_touch_a_namespace() {
        let workloads = Arc::new(Workloads::default());
        let touched = run(
            vec![
                Event::Init,
                Event::InitApply(deployment("a", "n1", 1, "cm")),
                Event::InitApply(deployment("b", "n2", 1, "cm")),
                Event::InitDone,
                // Only replicas change: nothing the stage reads.
                Event::Apply(deployment("a", "n1", 3, "cm")),
                Event::Apply(deployment("a", "n1", 3, "other")),
            ],
            &workloads,
        )
        .await;
        assert_eq!(touched, ["n1", "n2", "n1"]);
        assert!(workloads.mounts_config_map("n1", "other") && !workloads.mounts_config_map("n1", "cm"));
        assert_eq!(workloads.uid("n2", WorkloadKind::Deployment, "b").as_deref(), Some("uid-b"));
        // A re-list that no longer shows b drops it and touches its namespace.
        let touched = run(
            vec![Event::Init, Event::InitApply(deployment("a", "n1", 3, "other")), Event::InitDone],
            &workloads,
        )
        .await;
        assert_eq!(touched, ["n2"]);
        assert_eq!(workloads.len(), 1);
        assert_eq!(run(vec![Event::Delete(deployment("a", "n1", 3, "other"))], &workloads).await, ["n1"]);
        assert!(workloads.is_empty());
    }

    #[test]
    fn kinds_never_listed_make_the_view_unavailable_until_they_are() {
        let workloads = Workloads::default();
        let status: kube::core::Status =
            serde_json::from_value(json!({"code": 403, "message": "pods is forbidden", "status": "Failure"}))
                .unwrap();
        workloads.watch_failed(
            WorkloadKind::Pod,
            &watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status))),
        );
        for kind in WorkloadKind::ALL.iter().filter(|k| **k != WorkloadKind::Pod) {
            workloads.begin_listing(*kind);
            workloads.end_listing(*kind);
        }
        let why = workloads.unavailable().expect("Pods were never listed");
        assert_eq!(why.reason, Reason::CheckerForbidden);
        assert!(why.detail.contains("Pod") && why.detail.contains("forbidden"), "{}", why.detail);
        workloads.begin_listing(WorkloadKind::Pod);
        workloads.end_listing(WorkloadKind::Pod);
        assert_eq!(workloads.unavailable(), None);
    }
}
