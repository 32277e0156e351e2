//! Stage `Workload`: which credential the workloads running as a KSA really load. Application
//! Default Credentials read `GOOGLE_APPLICATION_CREDENTIALS` first, then gcloud's well-known user
//! credential, then the metadata server; so on GKE a set variable or a mounted user credential wins
//! over Workload Identity, and on other clusters the mounted `external_account` configuration
//! decides the provider, the token and the GSA. Everything here is read from pod templates and the
//! ConfigMaps they mount; a Secret's data never is.

use std::{collections::BTreeMap, sync::Arc};

use serde::Deserialize;
use serde_json::json;

use super::super::{
    Facts, FederationPlan, Finding, Plan, Prepared, Verdict,
    annotation::{GsaEmail, quote, truncate},
    stage::provider::default_audiences,
    workload::{
        CLOUDSDK_CONFIG_VAR, CREDENTIALS_VAR, ConfigMapRead, ConfigMaps, ConfigValue, Container, EnvValue,
        KeyToPath, Projection, Unavailable, VolumeSource, Workload,
    },
};
use crate::api::{Access, Platform, Reason, Stage};

/// The API server token the kubelet mounts into every pod; its audience is the API server.
const AUTOMOUNTED_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
const STS_TOKEN_URL: &str = "https://sts.googleapis.com/v1/token";
const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";
const UNIVERSE_DOMAIN: &str = "googleapis.com";
/// Where Google's sample mounts the projected token and the configuration, for fixes that must
/// suggest a place.
const SAMPLE_TOKEN_DIR: &str = "/var/run/service-account";
const SAMPLE_CONFIG_DIR: &str = "/etc/workload-identity";
const SAMPLE_CONFIG_FILE: &str = "credential-configuration.json";
/// At most this many workloads are listed with a KSA's entry.
const MAX_WORKLOADS: usize = 5;

/// The stage's reasons in the design's table order: a KSA's entry takes the first that applies,
/// a False one before an Unknown one.
const ORDER: [Reason; 9] = [
    Reason::CredentialFileOverridesWorkloadIdentity,
    Reason::UserCredentialsMounted,
    Reason::HostNetworkBypassesWorkloadIdentity,
    Reason::CredentialConfigMissing,
    Reason::CredentialConfigInvalid,
    Reason::CredentialConfigMismatch,
    Reason::CredentialSourceNotMounted,
    Reason::AudienceNotAllowed,
    Reason::CredentialConfigUnreadable,
];

/// One problem of one workload.
#[derive(Debug)]
struct Problem {
    reason: Reason,
    verdict: Verdict,
    message: String,
}

impl Problem {
    fn fail(reason: Reason, message: String) -> Self {
        Self { reason, verdict: Verdict::Fail, message }
    }
    fn unknown(reason: Reason, message: String) -> Self {
        Self { reason, verdict: Verdict::Unknown, message }
    }
    fn rank(&self) -> (Verdict, usize) {
        (self.verdict, ORDER.iter().position(|r| *r == self.reason).unwrap_or(ORDER.len()))
    }
}

/// Where a file a container reads comes from.
#[derive(Debug, PartialEq, Eq)]
enum Served<'a> {
    /// No volume is mounted there.
    NotMounted,
    /// The path is a mount point, not a file in it.
    Directory,
    /// A volume is mounted there, but projects no such file.
    NoSuchFile { volume: &'a str },
    /// A ConfigMap's key.
    ConfigMap { name: &'a str, key: String },
    /// A Secret's key: never read.
    Secret { name: &'a str },
    /// A projected ServiceAccount token: the volume's and the source's index, for patches.
    Token { audience: Option<&'a str>, volume: usize, source: usize },
    /// Another kind of volume (emptyDir, hostPath, CSI, …), whose files only exist in the pod.
    Other { kind: &'static str },
    /// `subPathExpr`: which file is only known in the pod.
    Expanded,
}

impl Served<'_> {
    fn describe(&self) -> String {
        match self {
            Served::NotMounted => "no volume is mounted there".into(),
            Served::Directory => "that is the directory a volume is mounted at, not a file".into(),
            Served::NoSuchFile { volume } => format!("volume {volume} projects no file there"),
            Served::ConfigMap { name, key } => format!("it is key {} of ConfigMap {name}", quote(key)),
            Served::Secret { name } => format!("it comes from Secret {name}"),
            Served::Token { audience, .. } => format!(
                "it is a projected ServiceAccount token (audience {})",
                audience.map_or("of the API server".to_string(), quote)
            ),
            Served::Other { kind } => format!("it comes from a volume of kind {kind}"),
            Served::Expanded => "it is mounted through a subPathExpr".into(),
        }
    }
}

fn trimmed(path: &str) -> &str {
    let t = path.trim_end_matches('/');
    if t.is_empty() { path } else { t }
}

/// Which volume serves `path` in container `c`: the mount with the longest path that contains it.
fn resolve<'a>(w: &'a Workload, c: &Container, path: &str) -> Served<'a> {
    let path = trimmed(path);
    let mount = c
        .mounts
        .iter()
        .filter(|m| {
            let at = trimmed(&m.path);
            path == at || path.strip_prefix(at).is_some_and(|r| r.starts_with('/')) || at == "/"
        })
        .max_by_key(|m| trimmed(&m.path).len());
    let Some(mount) = mount else { return Served::NotMounted };
    let rest = path.strip_prefix(trimmed(&mount.path)).unwrap_or_default().trim_start_matches('/');
    let relative = match &mount.sub_path {
        Some(sub) if sub.contains("$(") => return Served::Expanded,
        Some(sub) if rest.is_empty() => trimmed(sub).to_string(),
        Some(sub) => format!("{}/{rest}", trimmed(sub)),
        None => rest.to_string(),
    };
    if relative.is_empty() {
        return Served::Directory;
    }
    let Some((index, volume)) = w.pod.volumes.iter().enumerate().find(|(_, v)| v.name == mount.volume) else {
        return Served::NotMounted;
    };
    let by_item =
        |items: &[KeyToPath]| items.iter().find(|i| trimmed(&i.path) == relative).map(|i| i.key.to_string());
    // Without items every key is a file of its own name, so no key is in a subdirectory.
    let whole = |items: &[KeyToPath]| {
        if items.is_empty() && !relative.contains('/') { Some(relative.clone()) } else { by_item(items) }
    };
    let no_such_file = Served::NoSuchFile { volume: &volume.name };
    match &volume.source {
        VolumeSource::ConfigMap { name, items } => {
            whole(items).map_or(no_such_file, |key| Served::ConfigMap { name, key })
        }
        VolumeSource::Secret { name, items } => {
            whole(items).map_or(no_such_file, |_| Served::Secret { name })
        }
        VolumeSource::Other(kind) => Served::Other { kind },
        VolumeSource::Projected(sources) => {
            let explicit = sources.iter().enumerate().find_map(|(i, p)| match p {
                Projection::ServiceAccountToken { audience, path } if trimmed(path) == relative => {
                    Some(Served::Token { audience: audience.as_deref(), volume: index, source: i })
                }
                Projection::ConfigMap { name, items } if !items.is_empty() => {
                    by_item(items).map(|key| Served::ConfigMap { name, key })
                }
                Projection::Secret { name, items } if !items.is_empty() => {
                    by_item(items).map(|_| Served::Secret { name })
                }
                _ => None,
            });
            // Otherwise the first source projecting every key may hold it.
            let whole_source = || {
                sources.iter().find_map(|p| match p {
                    Projection::ConfigMap { name, items } if items.is_empty() => {
                        whole(items).map(|key| Served::ConfigMap { name, key })
                    }
                    Projection::Secret { name, items } if items.is_empty() => {
                        whole(items).map(|_| Served::Secret { name })
                    }
                    _ => None,
                })
            };
            explicit.or_else(whole_source).unwrap_or(no_such_file)
        }
    }
}

/// The `external_account` fields the stage judges. Everything else `gcloud iam
/// workload-identity-pools create-cred-config` writes (`type`, checked before, and
/// `service_account_impersonation.token_lifetime_seconds`, `token_info_url`), and any unknown
/// field, is accepted as written.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ExternalAccount {
    audience: Option<String>,
    subject_token_type: Option<String>,
    token_url: Option<String>,
    credential_source: Option<CredentialSource>,
    service_account_impersonation_url: Option<String>,
    universe_domain: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CredentialSource {
    file: Option<String>,
    format: Option<Format>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Format {
    #[serde(rename = "type")]
    type_: Option<String>,
}

/// Parses a credential configuration: `Err` says why it is not a usable `external_account` file.
fn parse_external_account(text: &str) -> Result<ExternalAccount, String> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("is not JSON ({})", truncate(&e.to_string(), 200)))?;
    let Some(object) = value.as_object() else {
        return Err("is JSON but not an object".into());
    };
    match object.get("type").and_then(|t| t.as_str()) {
        Some("external_account") => {}
        Some("service_account") => {
            return Err("is a service account key (type \"service_account\"), not an external_account configuration: a long-lived secret in a ConfigMap, which ADC uses instead of the pool".into());
        }
        Some("authorized_user") => {
            return Err("is a gcloud user credential (type \"authorized_user\"), not an external_account configuration: the pod acts as a person".into());
        }
        Some(other) => return Err(format!("has type {}, not \"external_account\"", quote(other))),
        None => {
            return Err(
                "has no \"type\"; an external_account configuration has type \"external_account\"".into()
            );
        }
    }
    serde_json::from_value(value).map_err(|e| {
        format!("is not a valid external_account configuration ({})", truncate(&e.to_string(), 200))
    })
}

/// A regional STS endpoint as `--sts-location` writes it: `https://sts.LOCATION.rep.googleapis.com/v1/token`.
fn is_sts_token_url(url: &str) -> bool {
    url == STS_TOKEN_URL
        || url
            .strip_prefix("https://sts.")
            .and_then(|r| r.strip_suffix(".rep.googleapis.com/v1/token"))
            .is_some_and(|l| {
                !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
}

/// The GSA a `service_account_impersonation_url` names.
fn impersonated(url: &str) -> Option<&str> {
    let (_, rest) = url
        .strip_prefix("https://iamcredentials.googleapis.com/v1/projects/")?
        .split_once("/serviceAccounts/")?;
    rest.strip_suffix(":generateAccessToken")
}

fn impersonation_url(gsa: &GsaEmail) -> String {
    format!("https://iamcredentials.googleapis.com/v1/projects/-/serviceAccounts/{gsa}:generateAccessToken")
}

fn parent(path: &str) -> &str {
    match trimmed(path).rsplit_once('/') {
        Some(("", _)) => "/",
        Some((dir, _)) => dir,
        None => ".",
    }
}

fn file_name(path: &str) -> &str {
    trimmed(path).rsplit('/').next().unwrap_or(path)
}

/// What one pass checks one KSA's workloads against.
struct Check<'a> {
    plan: &'a Plan,
    federation: Option<&'a FederationPlan>,
    ksa: String,
    gsa: Option<&'a GsaEmail>,
    config_maps: &'a ConfigMaps,
    /// The audiences the provider accepts, when it was read.
    allowed: Option<Vec<String>>,
    /// The cluster's issuer: the audience of a token requested without one.
    issuer: Option<&'a str>,
}

/// A workload and one of its containers, for messages and fixes.
struct At<'a> {
    w: &'a Workload,
    c: &'a Container,
}

impl At<'_> {
    fn who(&self) -> String {
        let kind = if self.c.init { "init container" } else { "container" };
        format!("{kind} {} of {} {}/{}", self.c.name, self.w.kind, self.w.namespace, self.w.name)
    }

    fn list(&self) -> &'static str {
        if self.c.init { "initContainers" } else { "containers" }
    }

    /// `kubectl set env` with `assignment`, or how to recreate an object whose template cannot change.
    fn set_env(&self, assignment: &str) -> String {
        let w = self.w;
        if w.kind.mutable() {
            format!(
                "kubectl set env {}/{} -n {} -c {} {assignment}",
                w.kind.resource(),
                w.name,
                w.namespace,
                self.c.name
            )
        } else {
            format!(
                "recreate {} {}/{} with {assignment} in container {} (its pod spec cannot change in place)",
                w.kind, w.namespace, w.name, self.c.name
            )
        }
    }
}

/// `kubectl patch --type=json` with `ops` at paths under the pod spec, or how to recreate.
fn json_patch(w: &Workload, ops: &[serde_json::Value], what: &str) -> String {
    if !w.kind.mutable() {
        return format!(
            "recreate {} {}/{} with {what} (its pod spec cannot change in place)",
            w.kind, w.namespace, w.name
        );
    }
    let base = w.kind.pod_spec_pointer();
    let ops: Vec<serde_json::Value> = ops
        .iter()
        .map(|op| {
            let mut op = op.clone();
            if let Some(p) = op["path"].as_str() {
                op["path"] = json!(format!("{base}{p}"));
            }
            op
        })
        .collect();
    format!(
        "kubectl patch {} {} -n {} --type=json -p '{}'",
        w.kind.resource(),
        w.name,
        w.namespace,
        serde_json::Value::Array(ops)
    )
}

/// A strategic merge patch of the pod spec (volumes and containers merge by name), or how to recreate.
fn merge_patch(w: &Workload, pod_spec: serde_json::Value, what: &str) -> String {
    if !w.kind.mutable() {
        return format!(
            "recreate {} {}/{} with {what} (its pod spec cannot change in place)",
            w.kind, w.namespace, w.name
        );
    }
    let mut patch = pod_spec;
    for key in w.kind.pod_spec_pointer().rsplit('/').filter(|k| !k.is_empty()) {
        patch = json!({ key: patch });
    }
    format!("kubectl patch {} {} -n {} -p '{patch}'", w.kind.resource(), w.name, w.namespace)
}

impl Check<'_> {
    fn problems(&self, w: &Workload) -> Vec<Problem> {
        let mut found = Vec::new();
        for c in &w.pod.containers {
            let at = At { w, c };
            self.user_credentials(&at, &mut found);
            if self.plan.platform == Platform::Gke
                && let Some(value) = &c.credentials
            {
                found.push(self.overrides(&at, value));
            }
        }
        if self.plan.platform == Platform::Gke && w.pod.host_network {
            found.push(Problem::fail(
                Reason::HostNetworkBypassesWorkloadIdentity,
                format!(
                    "{} {}/{} runs with hostNetwork: true, so its pods reach the node's metadata server and act as the node's service account, not as {} through Workload Identity. Fix: {}",
                    w.kind,
                    w.namespace,
                    w.name,
                    self.ksa,
                    json_patch(w, &[json!({"op": "remove", "path": "/hostNetwork"})], "hostNetwork removed")
                ),
            ));
        }
        if let Some(federation) = self.federation {
            self.federation_config(w, federation, &mut found);
        }
        found
    }

    /// GKE: the variable makes ADC load that file instead of asking the metadata server.
    fn overrides(&self, at: &At<'_>, value: &EnvValue) -> Problem {
        let loads = match value {
            EnvValue::Value(path) => format!("{} ({})", quote(path), resolve(at.w, at.c, path).describe()),
            EnvValue::ValueFrom => "a file named through valueFrom".into(),
        };
        Problem::fail(
            Reason::CredentialFileOverridesWorkloadIdentity,
            format!(
                "{} sets {CREDENTIALS_VAR} to {loads}. On GKE it overrides Workload Identity: ADC loads that file and never asks the metadata server, so the pod does not act as {}. Fix: remove it: {}, and the key's volume with it",
                at.who(),
                self.ksa,
                at.set_env(&format!("{CREDENTIALS_VAR}-"))
            ),
        )
    }

    /// A gcloud user credential in the container: through `CLOUDSDK_CONFIG` or a mount.
    fn user_credentials(&self, at: &At<'_>, found: &mut Vec<Problem>) {
        if let Some(value) = &at.c.cloudsdk_config {
            let shown = match value {
                EnvValue::Value(v) => quote(v),
                EnvValue::ValueFrom => "a value from valueFrom".into(),
            };
            found.push(Problem::fail(
                Reason::UserCredentialsMounted,
                format!(
                    "{} sets {CLOUDSDK_CONFIG_VAR} to {shown}: gcloud and ADC read a person's credential (application_default_credentials.json) from that directory, so the pod may act as that person, not as {}. Fix: {}",
                    at.who(),
                    self.ksa,
                    at.set_env(&format!("{CLOUDSDK_CONFIG_VAR}-"))
                ),
            ));
        }
        for (index, mount) in at.c.mounts.iter().enumerate() {
            let path = trimmed(&mount.path);
            let item_named = at.w.pod.volumes.iter().find(|v| v.name == mount.volume).is_some_and(|v| {
                let named = |items: &[KeyToPath]| {
                    items.iter().any(|i| file_name(&i.path) == "application_default_credentials.json")
                };
                match &v.source {
                    VolumeSource::ConfigMap { items, .. } | VolumeSource::Secret { items, .. } => {
                        named(items)
                    }
                    VolumeSource::Projected(sources) => sources.iter().any(|p| match p {
                        Projection::ConfigMap { items, .. } | Projection::Secret { items, .. } => {
                            named(items)
                        }
                        _ => false,
                    }),
                    VolumeSource::Other(_) => false,
                }
            });
            if path.ends_with(".config/gcloud")
                || file_name(path) == "application_default_credentials.json"
                || mount
                    .sub_path
                    .as_deref()
                    .is_some_and(|s| file_name(s) == "application_default_credentials.json")
                || item_named
            {
                let op = json!({"op": "remove", "path": format!("/{}/{}/volumeMounts/{index}", at.list(), at.c.index)});
                found.push(Problem::fail(
                    Reason::UserCredentialsMounted,
                    format!(
                        "{} mounts volume {} at {}, which puts a gcloud user credential (application_default_credentials.json) in the container: ADC and gcloud use it when {CREDENTIALS_VAR} is unset, so the pod may act as a person, not as {}. Fix: remove the mount: {}",
                        at.who(),
                        mount.volume,
                        quote(&mount.path),
                        self.ksa,
                        json_patch(at.w, &[op], &format!("the mount at {} removed", quote(&mount.path)))
                    ),
                ));
            }
        }
    }

    /// The audience the workload's projected token should carry: one the provider accepts.
    fn token_audience(&self, federation: &FederationPlan) -> String {
        self.allowed
            .as_ref()
            .and_then(|a| a.iter().find(|x| **x == federation.audience).or(a.first()))
            .cloned()
            .unwrap_or_else(|| federation.audience.clone())
    }

    /// The create-cred-config command for this provider and GSA, writing `output`.
    fn create_cred_config(&self, federation: &FederationPlan, token_file: &str, output: &str) -> String {
        let sa = match (self.plan.access, self.gsa) {
            (Access::Impersonation, Some(gsa)) => format!(" --service-account={gsa}"),
            _ => String::new(),
        };
        format!(
            "gcloud iam workload-identity-pools create-cred-config {}{sa} --credential-source-file={token_file} --credential-source-type=text --output-file={output}",
            federation.provider
        )
    }

    /// Where the container already mounts a projected token, else the sample's place.
    fn token_file(&self, at: &At<'_>) -> String {
        at.c.mounts
            .iter()
            .find_map(|m| {
                let v = at.w.pod.volumes.iter().find(|v| v.name == m.volume && m.sub_path.is_none())?;
                let VolumeSource::Projected(sources) = &v.source else { return None };
                sources.iter().find_map(|p| match p {
                    Projection::ServiceAccountToken { path, .. } => {
                        Some(format!("{}/{}", trimmed(&m.path), trimmed(path)))
                    }
                    _ => None,
                })
            })
            .unwrap_or_else(|| format!("{SAMPLE_TOKEN_DIR}/token"))
    }

    /// Writing the configuration anew into ConfigMap `name` under `key`.
    fn regenerate(&self, federation: &FederationPlan, at: &At<'_>, name: &str, key: &str) -> String {
        format!(
            "{} && kubectl create configmap {name} -n {} --from-file={key} --dry-run=client -o yaml | kubectl apply -f -",
            self.create_cred_config(federation, &self.token_file(at), key),
            at.w.namespace
        )
    }

    fn federation_config(&self, w: &Workload, federation: &FederationPlan, found: &mut Vec<Problem>) {
        let setters: Vec<&Container> = w.pod.containers.iter().filter(|c| c.credentials.is_some()).collect();
        if setters.is_empty() {
            let who = format!("{} {}/{}", w.kind, w.namespace, w.name);
            if let Some(c) = w.pod.containers.iter().find(|c| c.env_from) {
                found.push(Problem::unknown(
                    Reason::CredentialConfigUnreadable,
                    format!(
                        "no container of {who} sets {CREDENTIALS_VAR} in env, but container {} takes variables from envFrom, which authprobe does not read; set {CREDENTIALS_VAR} in env so it can be checked",
                        c.name
                    ),
                ));
                return;
            }
            let Some(first) = w.pod.containers.iter().find(|c| !c.init).or(w.pod.containers.first()) else {
                return;
            };
            let at = At { w, c: first };
            let path = format!("{SAMPLE_CONFIG_DIR}/{SAMPLE_CONFIG_FILE}");
            let config_map = format!("{}-workload-identity", w.name);
            let patch = merge_patch(
                w,
                json!({
                    "volumes": [
                        {"name": "workload-identity-config", "configMap": {"name": config_map}},
                        {"name": "workload-identity-token", "projected": {"sources": [{"serviceAccountToken": {"audience": self.token_audience(federation), "expirationSeconds": 3600, "path": "token"}}]}}
                    ],
                    at.list(): [{"name": &*first.name, "volumeMounts": [
                        {"name": "workload-identity-config", "mountPath": SAMPLE_CONFIG_DIR, "readOnly": true},
                        {"name": "workload-identity-token", "mountPath": SAMPLE_TOKEN_DIR, "readOnly": true}
                    ]}]
                }),
                "the configuration and token mounted",
            );
            found.push(Problem::fail(
                Reason::CredentialConfigMissing,
                format!(
                    "no container of {who} (init containers included) sets {CREDENTIALS_VAR}, so ADC finds no credential configuration and falls back to a metadata server this cluster does not have; the pods never act as {}. Fix: {} && kubectl create configmap {config_map} -n {} --from-file={SAMPLE_CONFIG_FILE} && {patch} && {}",
                    self.ksa,
                    self.create_cred_config(federation, &format!("{SAMPLE_TOKEN_DIR}/token"), SAMPLE_CONFIG_FILE),
                    w.namespace,
                    at.set_env(&format!("{CREDENTIALS_VAR}={path}"))
                ),
            ));
            return;
        }
        for c in setters {
            let at = At { w, c };
            match &c.credentials {
                Some(EnvValue::Value(path)) => self.config_file(&at, federation, path, found),
                Some(EnvValue::ValueFrom) => found.push(Problem::unknown(
                    Reason::CredentialConfigUnreadable,
                    format!(
                        "{} sets {CREDENTIALS_VAR} through valueFrom, so the file it names is only known in the running pod; set it literally so it can be checked: {}",
                        at.who(),
                        at.set_env(&format!("{CREDENTIALS_VAR}={SAMPLE_CONFIG_DIR}/{SAMPLE_CONFIG_FILE}"))
                    ),
                )),
                None => {}
            }
        }
    }

    fn config_file(&self, at: &At<'_>, federation: &FederationPlan, path: &str, found: &mut Vec<Problem>) {
        let shown = quote(path);
        let who = at.who();
        let ns = &at.w.namespace;
        let fresh = |key: &str| self.create_cred_config(federation, &self.token_file(at), key);
        let missing = |detail: String| Problem::fail(Reason::CredentialConfigMissing, detail);
        let (name, key) = match resolve(at.w, at.c, path) {
            Served::ConfigMap { name, key } => (name, key),
            Served::Secret { name } => {
                found.push(Problem::unknown(
                    Reason::CredentialConfigUnreadable,
                    format!(
                        "{who} loads {CREDENTIALS_VAR}={shown} from Secret {name}, and authprobe never reads Secrets. A credential configuration holds no secret: keep it in a ConfigMap (kubectl create configmap {}-workload-identity -n {ns} --from-file={}) and mount that instead, so it can be checked",
                        at.w.name,
                        file_name(path)
                    ),
                ));
                return;
            }
            served @ (Served::Other { .. } | Served::Expanded) => {
                found.push(Problem::unknown(
                    Reason::CredentialConfigUnreadable,
                    format!(
                        "{who} sets {CREDENTIALS_VAR}={shown}, but {}, whose content only exists in the running pod; mount the configuration from a ConfigMap so it can be checked",
                        served.describe()
                    ),
                ));
                return;
            }
            served @ Served::Token { .. } => {
                found.push(Problem::fail(
                    Reason::CredentialConfigInvalid,
                    format!(
                        "{who} sets {CREDENTIALS_VAR}={shown}, but {}, not a credential configuration. Fix: point {CREDENTIALS_VAR} at the mounted configuration, or create one: {}",
                        served.describe(),
                        fresh(SAMPLE_CONFIG_FILE)
                    ),
                ));
                return;
            }
            served @ (Served::NotMounted | Served::Directory | Served::NoSuchFile { .. }) => {
                found.push(missing(format!(
                    "{who} sets {CREDENTIALS_VAR}={shown}, but {}, so ADC finds no credential configuration. Fix: mount the ConfigMap holding it so that file exists, or create one: {} && kubectl create configmap {}-workload-identity -n {ns} --from-file={} and mount it at {}",
                    served.describe(),
                    fresh(file_name(path)),
                    at.w.name,
                    file_name(path),
                    quote(parent(path))
                )));
                return;
            }
        };
        let from = format!("{who} loads {CREDENTIALS_VAR}={shown}, key {} of ConfigMap {name}", quote(&key));
        let regenerate = self.regenerate(federation, at, name, &key);
        let data = match self.config_maps.get(&(ns.to_string(), name.to_string())) {
            Some(ConfigMapRead::Found(data)) => data.clone(),
            Some(ConfigMapRead::Missing) => {
                found.push(missing(format!("{from}, which does not exist. Fix: {regenerate}")));
                return;
            }
            Some(ConfigMapRead::Unreadable { reason, detail }) => {
                found.push(Problem::unknown(
                    *reason,
                    format!("cannot read ConfigMap {ns}/{name} for {who}: {detail}"),
                ));
                return;
            }
            None => {
                found.push(Problem::unknown(
                    Reason::KubernetesUnavailable,
                    format!("ConfigMap {ns}/{name} was not read for {who}"),
                ));
                return;
            }
        };
        let text = match data.keys.get(&key) {
            None => {
                let keys: Vec<&String> = data.keys.keys().take(10).collect();
                found.push(missing(format!(
                    "{from}, which has no such key (its keys: {keys:?}). Fix: {regenerate}"
                )));
                return;
            }
            Some(ConfigValue::Text(text)) => text,
            Some(ConfigValue::Binary) => {
                found.push(Problem::fail(
                    Reason::CredentialConfigInvalid,
                    format!(
                        "{from}, which is binaryData, not a JSON credential configuration. Fix: {regenerate}"
                    ),
                ));
                return;
            }
            Some(ConfigValue::TooLarge(len)) => {
                found.push(Problem::fail(
                    Reason::CredentialConfigInvalid,
                    format!("{from}, which holds {len} bytes: no credential configuration is that large. Fix: {regenerate}"),
                ));
                return;
            }
        };
        let config = match parse_external_account(text) {
            Ok(config) => config,
            Err(why) => {
                found.push(Problem::fail(
                    Reason::CredentialConfigInvalid,
                    format!("{from}, which {why}. Fix: {regenerate}"),
                ));
                return;
            }
        };
        let differences = self.differences(&config, federation);
        if !differences.is_empty() {
            found.push(Problem::fail(
                Reason::CredentialConfigMismatch,
                format!(
                    "{from}, which does not match provider {}{}: {}. Fix: {regenerate}",
                    federation.provider,
                    self.gsa.map(|g| format!(" and GSA {g}")).unwrap_or_default(),
                    differences.join("; ")
                ),
            ));
        }
        self.credential_source(at, federation, &config, &from, &regenerate, found);
    }

    /// Each field that differs from what the provider and access need, expected and found.
    fn differences(&self, config: &ExternalAccount, federation: &FederationPlan) -> Vec<String> {
        let shown = |v: &Option<String>| v.as_deref().map_or("(absent)".to_string(), quote);
        let mut diffs = Vec::new();
        let audience = format!("//iam.googleapis.com/{}", federation.provider);
        if config.audience.as_deref() != Some(audience.as_str()) {
            diffs.push(format!("audience: expected {}, found {}", quote(&audience), shown(&config.audience)));
        }
        if !config.token_url.as_deref().is_some_and(is_sts_token_url) {
            diffs.push(format!(
                "token_url: expected \"{STS_TOKEN_URL}\" (or a regional https://sts.LOCATION.rep.googleapis.com/v1/token), found {}",
                shown(&config.token_url)
            ));
        }
        if config.subject_token_type.as_deref() != Some(JWT_TOKEN_TYPE) {
            diffs.push(format!(
                "subject_token_type: expected \"{JWT_TOKEN_TYPE}\", found {}",
                shown(&config.subject_token_type)
            ));
        }
        let url = &config.service_account_impersonation_url;
        let names = |gsa: &GsaEmail| {
            url.as_deref().and_then(impersonated).is_some_and(|g| g.eq_ignore_ascii_case(gsa.as_str()))
        };
        match (self.plan.access, self.gsa) {
            (Access::Impersonation, Some(gsa)) if !names(gsa) => diffs.push(format!(
                "service_account_impersonation_url: expected {} (the ServiceAccount's GSA), found {}",
                quote(&impersonation_url(gsa)),
                shown(url)
            )),
            (Access::Direct, _) if url.is_some() => diffs.push(format!(
                "service_account_impersonation_url: expected none (access: Direct grants roles to the principal itself), found {}",
                shown(url)
            )),
            _ => {}
        }
        if let Some(universe) = config.universe_domain.as_deref().filter(|u| *u != UNIVERSE_DOMAIN) {
            diffs.push(format!("universe_domain: expected \"{UNIVERSE_DOMAIN}\", found {}", quote(universe)));
        }
        let format = config
            .credential_source
            .as_ref()
            .and_then(|s| s.format.as_ref())
            .and_then(|f| f.type_.as_deref());
        if let Some(format) = format.filter(|f| *f != "text") {
            diffs.push(format!(
                "credential_source.format.type: expected \"text\" (a projected token file is the bare JWT), found {}",
                quote(format)
            ));
        }
        diffs
    }

    /// `credential_source.file` must be a projected token whose audience the provider accepts.
    fn credential_source(
        &self,
        at: &At<'_>,
        federation: &FederationPlan,
        config: &ExternalAccount,
        from: &str,
        regenerate: &str,
        found: &mut Vec<Problem>,
    ) {
        let audience = self.token_audience(federation);
        let Some(file) = config.credential_source.as_ref().and_then(|s| s.file.as_deref()) else {
            found.push(Problem::fail(
                Reason::CredentialSourceNotMounted,
                format!(
                    "{from}, whose credential_source has no file, so it does not send the pod's projected ServiceAccount token. Fix: {regenerate}"
                ),
            ));
            return;
        };
        if trimmed(file) == AUTOMOUNTED_TOKEN {
            found.push(Problem::fail(
                Reason::CredentialSourceNotMounted,
                format!(
                    "{from}, whose credential_source.file is {AUTOMOUNTED_TOKEN}, the automounted API server token: its audience is the API server, which provider {} refuses. Fix: mount a projected serviceAccountToken with audience {} (e.g. at {SAMPLE_TOKEN_DIR}, path token) and regenerate: {regenerate}",
                    federation.provider,
                    quote(&audience)
                ),
            ));
            return;
        }
        match resolve(at.w, at.c, file) {
            Served::Token { audience: token_audience, volume, source } => {
                let Some(allowed) = &self.allowed else { return };
                // Without an audience the token is for the API server, whose default is its issuer.
                let Some(actual) = token_audience.or(self.issuer) else { return };
                if allowed.iter().any(|a| a == actual) {
                    return;
                }
                let op = json!({"op": "add", "path": format!("/volumes/{volume}/projected/sources/{source}/serviceAccountToken/audience"), "value": audience});
                found.push(Problem::fail(
                    Reason::AudienceNotAllowed,
                    format!(
                        "{} reads credential_source.file {}, a projected ServiceAccount token with audience {}{}, but provider {} accepts only {allowed:?}, so STS refuses the exchange. Fix: {}",
                        at.who(),
                        quote(file),
                        quote(actual),
                        if token_audience.is_none() { " (none requested: the API server's own)" } else { "" },
                        federation.provider,
                        json_patch(at.w, &[op], &format!("the token's audience set to {}", quote(&audience)))
                    ),
                ));
            }
            served => {
                let dir = parent(file);
                let mounted_there = at.c.mounts.iter().any(|m| trimmed(&m.path) == dir);
                let fix = if mounted_there || dir == "/" {
                    format!(
                        "mount a projected serviceAccountToken with audience {} at {SAMPLE_TOKEN_DIR} (path token) and regenerate with --credential-source-file={SAMPLE_TOKEN_DIR}/token",
                        quote(&audience)
                    )
                } else {
                    merge_patch(
                        at.w,
                        json!({
                            "volumes": [{"name": "workload-identity-token", "projected": {"sources": [{"serviceAccountToken": {"audience": audience, "expirationSeconds": 3600, "path": file_name(file)}}]}}],
                            at.list(): [{"name": &*at.c.name, "volumeMounts": [{"name": "workload-identity-token", "mountPath": dir, "readOnly": true}]}]
                        }),
                        "a projected token mounted",
                    )
                };
                found.push(Problem::fail(
                    Reason::CredentialSourceNotMounted,
                    format!(
                        "{from}, whose credential_source.file {} is not a projected ServiceAccount token in that container ({}), so ADC has no token to exchange. Fix: {fix}",
                        quote(file),
                        served.describe()
                    ),
                ));
            }
        }
    }
}

impl Plan {
    /// The ConfigMaps the stage reads for these workloads: those a `GOOGLE_APPLICATION_CREDENTIALS`
    /// path of a workload running as `ksa` resolves to (Federation only), as (namespace, name).
    pub fn config_maps_to_read(&self, ksa: &str, workloads: &[Arc<Workload>]) -> Vec<(String, String)> {
        if !self.inspect_workloads || self.federation.is_none() {
            return vec![];
        }
        let mut wanted = Vec::new();
        for w in workloads.iter().filter(|w| w.runs_as(ksa)) {
            for c in &w.pod.containers {
                if let Some(EnvValue::Value(path)) = &c.credentials
                    && let Served::ConfigMap { name, .. } = resolve(w, c, path)
                {
                    wanted.push((w.namespace.to_string(), name.to_string()));
                }
            }
        }
        wanted.sort();
        wanted.dedup();
        wanted
    }

    /// The Workload stage for a KSA that passed the static checks, over the workloads of its
    /// namespace (those running as another KSA are skipped), or why they could not be listed.
    /// One finding: a failing reason before an undecided one, then the design's table order,
    /// listing the workloads that have it.
    pub fn workload_stage(
        &self,
        prepared: &Prepared,
        workloads: Result<&[Arc<Workload>], &Unavailable>,
        config_maps: &ConfigMaps,
        facts: &Facts<'_>,
    ) -> Option<Finding> {
        if !self.inspect_workloads {
            return None;
        }
        let ksa = &prepared.ksa;
        let workloads = match workloads {
            Ok(workloads) => workloads,
            Err(why) => {
                return Some(Finding::unknown(
                    Stage::Workload,
                    why.reason,
                    format!(
                        "cannot tell which credential the workloads of ServiceAccount {}/{} load: {}",
                        ksa.namespace, ksa.name, why.detail
                    ),
                ));
            }
        };
        let provider = facts.provider.and_then(|p| p.provider.as_ref().ok()).and_then(Option::as_ref);
        let allowed = provider.and_then(|p| {
            let oidc = p.oidc.as_ref()?;
            Some(if oidc.allowed_audiences.is_empty() {
                default_audiences(&p.name).to_vec()
            } else {
                oidc.allowed_audiences.clone()
            })
        });
        let check = Check {
            plan: self,
            federation: self.federation.as_ref(),
            ksa: format!("ServiceAccount {}/{}", ksa.namespace, ksa.name),
            gsa: prepared.gsa.as_ref(),
            config_maps,
            allowed,
            issuer: facts.cluster.and_then(|c| c.as_ref().ok()).map(|c| c.issuer.as_str()),
        };
        // Per reason: each workload that has it (sorted by `Kind/name`) and its first message.
        let mut by_reason: BTreeMap<(Verdict, usize), (Reason, BTreeMap<String, String>)> = BTreeMap::new();
        for w in workloads.iter().filter(|w| w.runs_as(&ksa.name)) {
            for p in check.problems(w) {
                let entry = by_reason.entry(p.rank()).or_insert_with(|| (p.reason, BTreeMap::new()));
                entry.1.entry(w.reference()).or_insert(p.message);
            }
        }
        let ((verdict, _), (reason, mut named)) = by_reason.pop_first()?;
        let count = named.len();
        let (first, message) = named.pop_first()?;
        let mut listed = vec![first];
        listed.extend(named.into_keys().take(MAX_WORKLOADS - 1));
        let message = if count > 1 {
            format!("{message} ({count} workloads of {} have this problem: {})", check.ksa, listed.join(", "))
        } else {
            message
        };
        Some(Finding { stage: Stage::Workload, reason, verdict, message, workloads: listed })
    }
}

#[cfg(test)]
mod tests;
