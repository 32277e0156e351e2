//! Heap held per cached object, measured exactly with a counting allocator over the production
//! code path: objects shaped like a real cluster's (managedFields, last-applied annotations),
//! pruned by `inventory` and stored by kube's reflector, as the operator's watches do, and
//! Deployments decoded lean and pruned into the workload inventory. Fails when any figure grows
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
        inventory::{self, AnnotationChanges, NamespaceMeta, ServiceAccountMeta},
        workloads::Workloads,
    },
    engine::workload::{Lean, WorkloadKind, prune},
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::runtime::{reflector, watcher};
use serde_json::{Value, json};

/// Bytes currently allocated by this process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// Counting needs to wrap the system allocator; every method forwards unchanged.
#[allow(unsafe_code)]
// SAFETY: forwards to System with the caller's layout and pointers; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size().cast_signed(), Ordering::Relaxed);
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
            LIVE.fetch_add(new_size.cast_signed() - layout.size().cast_signed(), Ordering::Relaxed);
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

/// Heap retained per object after feeding `count` objects through `prune` into a reflector store.
fn retained_per_object<K>(
    count: usize,
    make: impl Fn(usize) -> K,
    prune: impl Fn(&mut K),
    also: impl Fn(&K),
) -> (f64, reflector::Store<K>)
where
    K: kube::Resource<DynamicType = ()> + Clone + 'static,
{
    let before = LIVE.load(Ordering::SeqCst);
    let (store, mut writer) = reflector::store::<K>();
    writer.apply_watcher_event(&watcher::Event::Init);
    for i in 0..count {
        let mut object = make(i);
        prune(&mut object);
        also(&object);
        writer.apply_watcher_event(&watcher::Event::InitApply(object));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    drop(writer);
    let after = LIVE.load(Ordering::SeqCst);
    #[allow(clippy::cast_precision_loss)]
    let per_object = (after - before) as f64 / count as f64;
    (per_object, store)
}

#[test]
fn cached_objects_stay_within_ten_percent_of_the_baseline() {
    let (per_namespace, namespaces) =
        retained_per_object(NAMESPACES, namespace, inventory::prune_namespace, |_| {});
    let changes = AnnotationChanges::default();
    let (per_service_account, service_accounts) =
        retained_per_object(SERVICE_ACCOUNTS, service_account, inventory::prune_service_account, |sa| {
            changes.observe(&watcher::Event::Apply(sa.clone()))
        });
    assert_eq!((namespaces.state().len(), service_accounts.state().len()), (NAMESPACES, SERVICE_ACCOUNTS));
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
    // Unpruned, the same objects hold several times as much: the check measures what pruning saves.
    let (unpruned, _) = retained_per_object(SERVICE_ACCOUNTS, service_account, |_| {}, |_| {});
    assert!(
        unpruned > 2.0 * per_service_account,
        "unpruned {unpruned:.0} vs pruned {per_service_account:.0}"
    );
}
