//! Heap held per cached object, measured exactly with a counting allocator over the production
//! code path: objects shaped like a real cluster's (managedFields, last-applied annotations) fed
//! as watch events into the compact index, as the operator's watches do, and Deployments decoded
//! lean and pruned into the workload inventory; and the heap a re-list adds at its peak. Fails when any figure grows
//! more than 10% over `bench/memory-baseline.json`; set
//! `AUTHPROBE_UPDATE_MEMORY_BASELINE=1` to record a deliberate change.
//!
//! A binary of its own, not a module of `tests/it`: the counting allocator is the process's global
//! allocator, so every other test running alongside (control planes' clients, operators' logs
//! read back, the fake) would allocate into the figures it measures.

#![allow(clippy::expect_used, clippy::unwrap_used, clippy::panic)] // test code: a failed expectation is a failed test

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

use authprobe::{
    controller::{
        inventory::{Index, NamespaceMeta, ServiceAccountMeta},
        workloads::Workloads,
    },
    engine::workload::{Lean, WorkloadKind, prune},
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};

/// Bytes currently allocated by this process, and the most since [`reset_peak`].
static LIVE: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

fn grew(by: isize) {
    let live = LIVE.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

fn reset_peak() -> isize {
    let live = LIVE.load(Ordering::SeqCst);
    PEAK.store(live, Ordering::SeqCst);
    live
}

struct Counting;

// Counting needs to wrap the system allocator; every method forwards unchanged.
#[allow(unsafe_code)]
// SAFETY: forwards to System with the caller's layout and pointers; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size().cast_signed());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size().cast_signed(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            grew(new_size.cast_signed() - layout.size().cast_signed());
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const NAMESPACES: usize = 2_000;
const SERVICE_ACCOUNTS: usize = 6_000;
const DEPLOYMENTS: usize = 6_000;

fn managed_field(manager: &str) -> Value {
    json!({"manager": manager, "operation": "Update", "apiVersion": "v1", "time": "2026-11-01T10:00:00Z",
           "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:team": {}, "f:env": {}}, "f:annotations": {".": {}}}}})
}

fn namespace(i: usize) -> NamespaceMeta {
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {
            "name": format!("team-{i:05}"), "uid": format!("6f1b2c3d-0000-4000-8000-{i:012}"), "resourceVersion": format!("{}", 100_000 + i),
            "creationTimestamp": "2026-11-01T10:00:00Z",
            "labels": {"team": format!("team-{}", i % 10), "env": "prod", "kubernetes.io/metadata.name": format!("team-{i:05}")},
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": format!("{{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{{\"name\":\"team-{i:05}\"}}}}")},
            "managedFields": [managed_field("kubectl-client-side-apply"), managed_field("kube-apiserver")]
        }
    }))
    .unwrap()
}

fn service_account(i: usize) -> ServiceAccountMeta {
    serde_json::from_value(json!({
        "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
        "metadata": {
            "name": format!("app-{}", i % 3), "namespace": format!("team-{:05}", i / 3),
            "uid": format!("9a8b7c6d-0000-4000-8000-{i:012}"), "resourceVersion": format!("{}", 200_000 + i),
            "creationTimestamp": "2026-11-01T10:00:00Z",
            "labels": {"app": "payments", "tier": "backend"},
            "annotations": {
                "iam.gke.io/gcp-service-account": format!("gsa-{}@acme-prod.iam.gserviceaccount.com", i % 100),
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"v1\",\"kind\":\"ServiceAccount\"}"
            },
            "managedFields": [managed_field("kubectl-client-side-apply")]
        }
    }))
    .unwrap()
}

/// A Deployment as a real cluster stores it: labels, last-applied, managedFields, a container with
/// resources, probes, ports, environment and a config volume, and status.
fn deployment(i: usize) -> Lean<Deployment> {
    let name = format!("app-{}", i % 3);
    serde_json::from_value(json!({
        "metadata": {
            "name": name, "namespace": format!("team-{:05}", i / 3),
            "uid": format!("3c2b1a09-0000-4000-8000-{i:012}"), "resourceVersion": format!("{}", 300_000 + i),
            "generation": 4, "creationTimestamp": "2026-11-01T10:00:00Z",
            "labels": {"app": name, "tier": "backend"},
            "annotations": {
                "deployment.kubernetes.io/revision": "4",
                "kubectl.kubernetes.io/last-applied-configuration": "{\"apiVersion\":\"apps/v1\",\"kind\":\"Deployment\",\"metadata\":{\"name\":\"app\"},\"spec\":{\"replicas\":2}}"
            },
            "managedFields": [managed_field("kubectl-client-side-apply"), managed_field("kube-controller-manager")]
        },
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name, "tier": "backend"}},
                "spec": {
                    "serviceAccountName": format!("sa-{}", i % 3),
                    "containers": [{
                        "name": "app", "image": "registry.example/team/app:1.42.0",
                        "ports": [{"containerPort": 8080, "name": "http"}],
                        "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "PORT", "value": "8080"},
                                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                        "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/app", "readOnly": true}]
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "app-config", "optional": true}}]
                }
            }
        },
        "status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2, "observedGeneration": 4,
                   "conditions": [{"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable", "message": "Deployment has minimum availability."}]}
    }))
    .unwrap()
}

/// Heap retained per Deployment after feeding `count` of them, pruned as the watch does, into the
/// workload inventory.
fn retained_per_workload(count: usize) -> (f64, Workloads) {
    let before = LIVE.load(Ordering::SeqCst);
    let workloads = Workloads::default();
    workloads.begin_listing(WorkloadKind::Deployment);
    for i in 0..count {
        workloads.apply(prune(&deployment(i)).expect("a Deployment is a workload"));
    }
    workloads.end_listing(WorkloadKind::Deployment);
    let after = LIVE.load(Ordering::SeqCst);
    #[allow(clippy::cast_precision_loss)]
    let per_object = (after - before) as f64 / count as f64;
    (per_object, workloads)
}

/// Feeds one complete list of `count` objects into the index through `apply`, as a watch does.
fn list_into<K>(
    index: &Index,
    count: usize,
    make: impl Fn(usize) -> K,
    apply: fn(&Index, watcher::Event<K>) -> Vec<K>,
) {
    apply(index, watcher::Event::Init);
    for i in 0..count {
        apply(index, watcher::Event::InitApply(make(i)));
    }
    apply(index, watcher::Event::InitDone);
}

#[allow(clippy::cast_precision_loss)]
fn per(bytes: isize, count: usize) -> f64 {
    bytes as f64 / count as f64
}

/// Heap retained per object when kube's reflector stores the same objects unpruned: what the
/// operator held before the compact index.
fn retained_by_a_reflector<K>(count: usize, make: impl Fn(usize) -> K) -> (f64, reflector::Store<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let before = LIVE.load(Ordering::SeqCst);
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for i in 0..count {
        writer.apply_watcher_event(&watcher::Event::InitApply(make(i)));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    drop(writer);
    (per(LIVE.load(Ordering::SeqCst) - before, count), store)
}

#[test]
fn cached_objects_stay_within_ten_percent_of_the_baseline() {
    let index = Index::default();
    let before = LIVE.load(Ordering::SeqCst);
    list_into(&index, NAMESPACES, namespace, Index::namespace_event);
    let after_namespaces = LIVE.load(Ordering::SeqCst);
    list_into(&index, SERVICE_ACCOUNTS, service_account, Index::service_account_event);
    let after_service_accounts = LIVE.load(Ordering::SeqCst);
    assert_eq!(index.len(), (NAMESPACES, SERVICE_ACCOUNTS));
    let per_namespace = per(after_namespaces - before, NAMESPACES);
    let per_service_account = per(after_service_accounts - after_namespaces, SERVICE_ACCOUNTS);

    // A re-list updates in place: at its peak it holds no second copy, and after it no more.
    let relist_from = reset_peak();
    list_into(&index, NAMESPACES, namespace, Index::namespace_event);
    list_into(&index, SERVICE_ACCOUNTS, service_account, Index::service_account_event);
    let relist_peak = PEAK.load(Ordering::SeqCst) - relist_from;
    let relist_kept = LIVE.load(Ordering::SeqCst) - relist_from;
    let index_bytes = after_service_accounts - before;
    eprintln!("re-list: {relist_peak} bytes at its peak, {relist_kept} kept, over an index of {index_bytes}");
    assert!(
        relist_peak < index_bytes / 10,
        "a re-list held {relist_peak} bytes over an index of {index_bytes}"
    );
    assert!(relist_kept <= 0, "a re-list kept {relist_kept} bytes more");

    let (per_workload, workloads) = retained_per_workload(DEPLOYMENTS);
    assert_eq!(workloads.len(), DEPLOYMENTS);

    let path = authprobe_harness::repo_root().join("bench/memory-baseline.json");
    let measured = json!({"namespaceBytes": per_namespace.round(), "serviceAccountBytes": per_service_account.round(), "workloadBytes": per_workload.round()});
    eprintln!("retained heap per cached object: {measured}");
    if std::env::var_os("AUTHPROBE_UPDATE_MEMORY_BASELINE").is_some() {
        std::fs::write(&path, serde_json::to_string_pretty(&measured).unwrap() + "\n").unwrap();
        return;
    }
    let baseline: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (key, value) in [
        ("namespaceBytes", per_namespace),
        ("serviceAccountBytes", per_service_account),
        ("workloadBytes", per_workload),
    ] {
        let allowed = baseline[key].as_f64().unwrap() * 1.10;
        assert!(
            value <= allowed,
            "{key}: {value:.0} bytes per cached object, more than 110% of the baseline {} ({allowed:.0})",
            baseline[key]
        );
    }
    // kube's reflector holds the same objects at many times the cost: the check measures what the
    // index saves.
    let (in_a_reflector, _) = retained_by_a_reflector(SERVICE_ACCOUNTS, service_account);
    assert!(
        in_a_reflector > 5.0 * per_service_account,
        "a reflector {in_a_reflector:.0} vs the index {per_service_account:.0} bytes per ServiceAccount"
    );
}
