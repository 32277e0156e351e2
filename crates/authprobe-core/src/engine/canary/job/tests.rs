use k8s_openapi::api::{batch::v1::JobStatus, core::v1::PodStatus};
use serde_json::json;

use super::*;
use crate::engine::canary::Source;

fn pod(spec: serde_json::Value) -> PodSpec {
    serde_json::from_value(spec).unwrap()
}

fn build_for(spec: &PodSpec) -> serde_json::Value {
    let workload: WorkloadRef = "Deployment/api".parse().unwrap();
    let job = build(&JobRequest {
        probe: "payments",
        probe_uid: "uid-1",
        namespace: "checkout",
        workload: &workload,
        pod: spec,
        image: "ghcr.io/authprobe/authprobe:1.0",
        compare_fingerprint: Some("0123456789ab"),
        now: "2026-01-01T00:00:00Z".parse().unwrap(),
    })
    .unwrap();
    serde_json::to_value(job).unwrap()
}

#[test]
fn the_job_is_restricted_bounded_owned_and_runs_as_the_workloads_service_account() {
    let spec = pod(json!({
        "serviceAccountName": "app",
        "automountServiceAccountToken": false,
        "hostNetwork": true,
        "nodeSelector": {"iam.gke.io/gke-metadata-server-enabled": "true"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "payments", "effect": "NoSchedule"}],
        "affinity": {
            "nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["wi"]}]}]}},
            "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "api"}}}]},
        },
        "containers": [{"name": "api", "image": "api:1", "securityContext": {"privileged": true},
                        "env": [{"name": "GCE_METADATA_HOST", "value": "10.88.0.1:8080"},
                                {"name": "DATABASE_PASSWORD", "value": "hunter2"}]}],
    }));
    let job = build_for(&spec);
    assert_eq!(
        job["metadata"]["name"],
        format!("authprobe-canary-{}-1767225600", &job_name("uid-1", Timestamp::UNIX_EPOCH)[17..25])
    );
    assert!(job["metadata"]["name"].as_str().unwrap().len() <= 63, "fits the job-name label");
    assert_eq!(job["metadata"]["namespace"], "checkout");
    assert_eq!(
        job["metadata"]["ownerReferences"],
        json!([{"apiVersion": "authprobe.io/v1alpha1", "kind": "AuthProbe", "name": "payments", "uid": "uid-1", "controller": true}])
    );
    assert_eq!(job["metadata"]["labels"][PROBE_UID_LABEL], "uid-1");
    assert_eq!(job["metadata"]["annotations"][SERVICE_ACCOUNT_ANNOTATION], "app");
    assert_eq!(job["metadata"]["annotations"][WORKLOAD_ANNOTATION], "Deployment/api");
    assert_eq!(job["metadata"]["annotations"][COMPARE_ANNOTATION], "0123456789ab");
    let s = &job["spec"];
    assert_eq!((s["backoffLimit"].clone(), s["activeDeadlineSeconds"].clone()), (json!(0), json!(120)));
    assert_eq!(s["ttlSecondsAfterFinished"], 600);
    assert_eq!(
        s["template"]["metadata"]["labels"], job["metadata"]["labels"],
        "the Pod is watched by the same labels"
    );
    for (k, v) in SELECTOR.split(',').map(|kv| kv.split_once('=').unwrap()) {
        assert_eq!(job["metadata"]["labels"][k], v);
    }
    let p = &s["template"]["spec"];
    assert_eq!(p["serviceAccountName"], "app");
    assert_eq!(p["automountServiceAccountToken"], false);
    assert_eq!(p["restartPolicy"], "Never");
    assert_eq!(p["hostNetwork"], json!(null), "restricted pods do not share the node's network");
    assert_eq!(p["nodeSelector"], json!({"iam.gke.io/gke-metadata-server-enabled": "true"}));
    assert_eq!(p["tolerations"][0]["key"], "dedicated");
    assert!(p["affinity"]["nodeAffinity"].is_object());
    assert_eq!(p["affinity"]["podAntiAffinity"], json!(null), "only where it may run, not next to whom");
    assert_eq!(
        p["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532,
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    let c = &p["containers"][0];
    assert_eq!(p["containers"].as_array().unwrap().len(), 1);
    assert_eq!(
        (c["name"].clone(), c["image"].clone()),
        (json!("canary"), json!("ghcr.io/authprobe/authprobe:1.0"))
    );
    assert_eq!(c["args"], json!(["canary"]));
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsNonRoot": true,
               "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(
        c["env"],
        json!([{"name": "GCE_METADATA_HOST", "value": "10.88.0.1:8080"}]),
        "only what ADC reads"
    );
    assert_eq!(c["volumeMounts"], json!(null));
    assert_eq!(c["terminationMessagePolicy"], "File");
}

#[test]
fn the_credential_file_its_volume_and_projected_tokens_are_copied_read_only() {
    let spec = pod(json!({
        "containers": [
            {"name": "sidecar", "image": "proxy:1",
             "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]},
            {"name": "api", "image": "api:1",
             "env": [{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"},
                     {"name": "HOME", "value": "/home/app"}],
             "volumeMounts": [
                 {"name": "key", "mountPath": "/var/secrets/google"},
                 {"name": "token", "mountPath": "/var/run/service-account", "readOnly": false},
                 {"name": "data", "mountPath": "/data"},
                 {"name": "cache", "mountPath": "/var/secrets"},
                 {"name": "host", "mountPath": "/var/secrets/google/extra"},
             ]},
        ],
        "volumes": [
            {"name": "key", "secret": {"secretName": "google-key"}},
            {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"audience": "aud", "path": "token"}}]}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
            {"name": "cache", "emptyDir": {}},
            {"name": "host", "hostPath": {"path": "/etc"}},
            {"name": "unused", "configMap": {"name": "x"}},
        ],
    }));
    let job = build_for(&spec);
    let p = &job["spec"]["template"]["spec"];
    let c = &p["containers"][0];
    assert_eq!(p["serviceAccountName"], "default", "no serviceAccountName: default");
    assert_eq!(
        job["metadata"]["annotations"]["authprobe.io/container"], "api",
        "the container that sets the variable"
    );
    assert_eq!(
        c["env"],
        json!([{"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": "/var/secrets/google/key.json"},
               {"name": "HOME", "value": "/home/app"}])
    );
    assert_eq!(
        c["volumeMounts"],
        json!([
            {"name": "key", "mountPath": "/var/secrets/google", "readOnly": true},
            {"name": "token", "mountPath": "/var/run/service-account", "readOnly": true},
            {"name": "cache", "mountPath": "/var/secrets", "readOnly": true},
        ]),
        "the file's mounts (a hostPath never), the projected token; not the data volume"
    );
    let names: Vec<&str> =
        p["volumes"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["cache", "key", "token"]);
}

#[test]
fn gcloud_credentials_under_a_home_and_indirect_variables_are_followed() {
    let spec = pod(json!({
        "containers": [{"name": "api", "image": "api:1",
            "volumeMounts": [{"name": "gcloud", "mountPath": "/home/app/.config/gcloud"},
                             {"name": "cfg", "mountPath": "/etc/cfg"}]}],
        "volumes": [{"name": "gcloud", "secret": {"secretName": "adc"}},
                    {"name": "cfg", "configMap": {"name": "cfg"}}],
    }));
    let c = build_for(&spec)["spec"]["template"]["spec"]["containers"][0].clone();
    assert_eq!(
        c["env"],
        json!([{"name": "HOME", "value": "/home/app"}]),
        "the image's HOME, where the mount is"
    );
    assert_eq!(c["volumeMounts"].as_array().unwrap().len(), 1);

    let spec = pod(json!({
        "containers": [{"name": "api", "image": "api:1",
            "env": [{"name": "GOOGLE_APPLICATION_CREDENTIALS",
                     "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "path"}}}],
            "volumeMounts": [{"name": "cfg", "mountPath": "/etc/cfg"}, {"name": "tmp", "mountPath": "/tmp"}]}],
        "volumes": [{"name": "cfg", "configMap": {"name": "cfg"}}, {"name": "tmp", "emptyDir": {}}],
    }));
    let c = build_for(&spec)["spec"]["template"]["spec"]["containers"][0].clone();
    assert_eq!(c["env"][0]["valueFrom"]["configMapKeyRef"]["name"], "cfg");
    assert_eq!(c["volumeMounts"], json!([{"name": "cfg", "mountPath": "/etc/cfg", "readOnly": true}]));
}

#[test]
fn a_template_without_containers_cannot_be_copied() {
    let workload: WorkloadRef = "Pod/empty".parse().unwrap();
    let e = build(&JobRequest {
        probe: "p",
        probe_uid: "u",
        namespace: "n",
        workload: &workload,
        pod: &PodSpec::default(),
        image: "i",
        compare_fingerprint: None,
        now: Timestamp::UNIX_EPOCH,
    })
    .unwrap_err();
    assert_eq!(e, "Pod/empty has no container to copy");
}

fn job(conditions: serde_json::Value) -> Job {
    Job {
        status: Some(serde_json::from_value::<JobStatus>(json!({"conditions": conditions})).unwrap()),
        ..Job::default()
    }
}

fn pod_status(status: serde_json::Value) -> Pod {
    Pod { status: Some(serde_json::from_value::<PodStatus>(status).unwrap()), ..Pod::default() }
}

fn terminated(exit_code: i32, message: Option<&str>) -> Pod {
    pod_status(json!({"phase": "Failed", "containerStatuses": [{
        "name": "canary", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"terminated": {"exitCode": exit_code, "message": message, "reason": "Error"}}}]}))
}

#[test]
fn a_finished_canary_reports_and_a_killed_one_does_not() {
    let report =
        Report { attempts: 20, error: Some("no answer".into()), ..Report::new(Source::MetadataServer) };
    let message = report.to_message();
    let running = job(json!([]));
    for exit_code in [0, 1] {
        assert_eq!(
            observe(&running, Some(&terminated(exit_code, Some(&message))), true),
            Run::Finished(report.clone())
        );
    }
    // Killed with a report half written, or before writing any: no verdict.
    let half = &message[..message.len() / 2];
    for (code, message) in [(137, Some(message.as_str())), (143, None), (1, Some(half)), (1, None)] {
        let run = observe(&running, Some(&terminated(code, message)), true);
        assert!(
            matches!(&run, Run::Incomplete(why) if why.contains(&format!("exit code {code}"))),
            "{run:?}"
        );
    }
    let alive = pod_status(json!({"phase": "Running", "containerStatuses": [{
        "name": "canary", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
        "state": {"running": {}}}]}));
    assert_eq!(observe(&running, Some(&alive), false), Run::Running);
    // The Pod deleted mid-run: the Job fails, the Pod is gone.
    let failed = job(json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]));
    assert!(matches!(observe(&failed, None, true), Run::Incomplete(_)));
    assert!(
        matches!(observe(&failed, None, false), Run::Incomplete(_)),
        "it may have run: no verdict either"
    );
}

#[test]
fn a_canary_that_cannot_start_is_blocked_and_one_that_never_started_is_told_apart() {
    let active = job(json!([]));
    let pending = pod_status(json!({"phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
        "message": "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."}]}));
    assert_eq!(
        observe(&active, Some(&pending), false),
        Run::Blocked(
            "unschedulable: 0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
                .into()
        )
    );
    let pull = pod_status(json!({"phase": "Pending", "containerStatuses": [{
        "name": "canary", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"i\""}}}]}));
    assert_eq!(
        observe(&active, Some(&pull), false),
        Run::Blocked("ImagePullBackOff: Back-off pulling image \"i\"".into())
    );
    let creating = pod_status(json!({"phase": "Pending", "containerStatuses": [{
        "name": "canary", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
        "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
    assert_eq!(observe(&active, Some(&creating), false), Run::Starting);
    assert_eq!(observe(&active, None, false), Run::Starting, "no Pod yet (or quota: the Job retries)");

    let deadline = job(json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]));
    assert_eq!(
        observe(&deadline, Some(&pending), false),
        Run::NeverRan(
            "it did not start within the Job's 120s (unschedulable: 0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector.)".into()
        )
    );
    assert_eq!(
        observe(&deadline, None, false),
        Run::NeverRan("it did not start within the Job's 120s".into())
    );
    assert!(matches!(observe(&deadline, None, true), Run::Incomplete(_)), "it was seen running");
}
