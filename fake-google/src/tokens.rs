//! Tokens the fake issues and who they stand for. A principal is matched against IAM members by
//! generating every member string that names it (not by parsing members, as authprobe does), so
//! the fake and the operator reach their verdicts independently.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::Mutex,
    time::{Duration, SystemTime},
};

use crate::scenario::Scenario;

/// Who a federated token stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Principal {
    /// A KSA through the GKE workload pool `PROJECT.svc.id.goog`.
    Gke {
        project_id: String,
        project_number: String,
        namespace: String,
        name: String,
        uid: String,
        cluster: String,
    },
    /// A mapped identity of a workload identity pool.
    Pool {
        project_number: String,
        pool_id: String,
        subject: String,
        attributes: BTreeMap<String, String>,
        groups: Vec<String>,
    },
}

impl Principal {
    /// Every IAM member string that covers this principal.
    pub fn members(&self) -> Vec<String> {
        let base = |number: &str, pool: &str| {
            format!("//iam.googleapis.com/projects/{number}/locations/global/workloadIdentityPools/{pool}")
        };
        match self {
            Principal::Gke { project_id, project_number, namespace, name, uid, cluster } => {
                let pool = base(project_number, &format!("{project_id}.svc.id.goog"));
                vec![
                    format!("serviceAccount:{project_id}.svc.id.goog[{namespace}/{name}]"),
                    format!("principal:{pool}/subject/ns/{namespace}/sa/{name}"),
                    format!("principal:{pool}/kubernetes.serviceaccount.uid/{uid}"),
                    format!("principalSet:{pool}/namespace/{namespace}"),
                    format!("principalSet:{pool}/kubernetes.cluster/{cluster}"),
                    format!("principalSet:{pool}/*"),
                ]
            }
            Principal::Pool { project_number, pool_id, subject, attributes, groups } => {
                let pool = base(project_number, pool_id);
                let mut members =
                    vec![format!("principal:{pool}/subject/{subject}"), format!("principalSet:{pool}/*")];
                members
                    .extend(attributes.iter().map(|(k, v)| format!("principalSet:{pool}/attribute.{k}/{v}")));
                members.extend(groups.iter().map(|g| format!("principalSet:{pool}/group/{g}")));
                members
            }
        }
    }
}

/// What a token the fake issued is.
#[derive(Clone, Debug)]
pub enum Issued {
    /// From STS or securetoken; `pool` is the full pool name (empty for GKE) whose disabling revokes it.
    Federated { principal: Principal, pool: String },
    /// From generateAccessToken.
    ServiceAccount { email: String },
}

/// Credentials the fake remembers so tests can prove none of them was written anywhere.
const WITNESSED: usize = 4096;

/// Live tokens, and every credential that crossed the fake (bounded).
#[derive(Debug, Default)]
pub struct Registry {
    tokens: Mutex<HashMap<String, (SystemTime, Issued)>>,
    witnessed: Mutex<VecDeque<String>>,
}

impl Registry {
    /// Issues a token for `what`, valid for `lifetime`; returns it.
    pub fn issue(&self, what: Issued, lifetime: Duration) -> String {
        use base64::Engine as _;
        let random: [u8; 24] = rand::random();
        let token = format!("ya29.{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random));
        if let Ok(mut tokens) = self.tokens.lock() {
            let now = SystemTime::now();
            tokens.retain(|_, (exp, _)| *exp > now);
            tokens.insert(token.clone(), (now + lifetime, what));
        }
        self.witness(&token);
        token
    }

    /// Remembers a credential that was presented to or issued by the fake.
    pub fn witness(&self, credential: &str) {
        if let Ok(mut seen) = self.witnessed.lock() {
            if seen.len() == WITNESSED {
                seen.pop_front();
            }
            seen.push_back(credential.to_string());
        }
    }

    /// The credentials remembered, oldest first.
    pub fn witnessed(&self) -> Vec<String> {
        self.witnessed.lock().map(|s| s.iter().cloned().collect()).unwrap_or_default()
    }

    /// What a live token is.
    pub fn lookup(&self, token: &str) -> Option<Issued> {
        let tokens = self.tokens.lock().ok()?;
        let (exp, what) = tokens.get(token)?;
        (*exp > SystemTime::now()).then(|| what.clone())
    }
}

/// Whether a federated token still works: a disabled or deleted pool revokes its tokens.
pub fn pool_allows(scenario: &Scenario, pool: &str) -> bool {
    pool.is_empty()
        || scenario.pool(pool).is_some_and(|p| !p.disabled && p.state == crate::scenario::LifeState::Active)
}
