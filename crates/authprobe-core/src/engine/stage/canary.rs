//! Stage `Canary`, last in chain order: what the pod's own first token says, judged from the
//! canary's report. One reason per KSA, in this order: `AdcSourceUnexpected` (ADC resolved from
//! another source than the platform implies), `MetadataServerUnreachable` (no token by the
//! deadline), `CredentialSourceDrift` (the pod's credential is not the identity authprobe
//! proves), `MetadataServerSlowStart` (the first token came after the libraries' 3 s timeout);
//! `CanaryNotScheduled` (Unknown) when the Job never ran. Every message names the last fingerprint.
//!
//! For Federation, a token that does not come from the right `external_account` file is the live
//! chain's to judge (stage `TokenExchange`): the canary judges where ADC resolves and which
//! subject token the file presents.

use super::super::{
    Finding, Plan,
    canary::{ATTEMPT_TIMEOUT, DEADLINE, FingerprintOf, Report, Source, WorkloadRef, book::Outcome},
};
use crate::api::{Platform, Reason, Stage};

/// Who and what a canary finding is about.
#[derive(Clone, Copy, Debug)]
pub struct CanarySubject<'a> {
    /// The namespace.
    pub namespace: &'a str,
    /// The ServiceAccount the canary ran as.
    pub service_account: &'a str,
    /// The workload it copied.
    pub workload: &'a WorkloadRef,
    /// What authprobe computed for the KSA (see [`crate::engine::canary::expected_fingerprint`]).
    pub expected: Option<&'a str>,
    /// The last complete run's fingerprint.
    pub last_fingerprint: Option<&'a str>,
}

const WAIT_FOR_METADATA: &str = "add an init container that waits for the metadata server before the app starts (curl -sf -H 'Metadata-Flavor: Google' --retry 30 --retry-connrefused --retry-max-time 60 --connect-timeout 3 http://169.254.169.254/computeMetadata/v1/instance/service-accounts/default/token -o /dev/null), or make the client retry its first token fetch";

impl Plan {
    /// The canary's finding for a KSA, from the last thing known of its canary; `None`: it passed.
    pub fn canary_stage(&self, outcome: &Outcome, s: &CanarySubject<'_>) -> Option<Finding> {
        let who = format!(
            "The canary of {} (as ServiceAccount {}/{}, with the workload's credential environment)",
            s.workload, s.namespace, s.service_account
        );
        let last = match s.last_fingerprint {
            Some(fp) => format!("last fingerprint {fp}"),
            None => "no fingerprint yet".to_string(),
        };
        match outcome {
            Outcome::Carried(finding) => Some(finding.clone()),
            Outcome::NotScheduled { job, why } => Some(Finding::unknown(
                Stage::Canary,
                Reason::CanaryNotScheduled,
                format!(
                    "{who} did not run: Job {}/{job}: {}. authprobe cannot tell how the pod's first token behaves until a canary runs ({last}). Fix: let the canary run where the workload runs (it takes the workload's node selector, tolerations and node affinity), check the namespace's quota, and that nodes can pull the operator's image",
                    s.namespace,
                    why.trim_end_matches(['.', ' '])
                ),
            )),
            Outcome::Reported { job, report, .. } => {
                self.judge_report(report, s, &who, &format!("Job {}/{job}, {last}", s.namespace))
            }
        }
    }

    fn judge_report(&self, r: &Report, s: &CanarySubject<'_>, who: &str, run: &str) -> Option<Finding> {
        let fail = |reason, message: String| Some(Finding::fail(Stage::Canary, reason, message));
        let from = match (&r.path, &r.credential_type) {
            (Some(path), Some(t)) => format!("{} ({path}, type {t})", r.source),
            (Some(path), None) => format!("{} ({path})", r.source),
            _ => r.source.to_string(),
        };
        let error = r.error.as_deref().map(|e| format!("; last error: {e}")).unwrap_or_default();
        match (self.platform, r.source) {
            (Platform::Gke, Source::CredentialsFile | Source::GcloudWellKnownFile) => {
                return fail(
                    Reason::AdcSourceUnexpected,
                    format!(
                        "{who} resolved Application Default Credentials from {from}, not from the metadata server: the pod does not use Workload Identity for GKE ({run}). Fix: remove {} from {}'s pod template, so ADC falls through to the metadata server",
                        match r.source {
                            Source::CredentialsFile => "GOOGLE_APPLICATION_CREDENTIALS and its volume",
                            _ => "the mounted gcloud credentials (and CLOUDSDK_CONFIG)",
                        },
                        s.workload
                    ),
                );
            }
            (Platform::Federation, _) if r.credential_type.as_deref() != Some("external_account") => {
                return fail(
                    Reason::AdcSourceUnexpected,
                    format!(
                        "{who} resolved Application Default Credentials from {from}, not from an external_account credential configuration, so it never exchanges the KSA's token through the provider ({run}). Fix: set GOOGLE_APPLICATION_CREDENTIALS in {} to the configuration `gcloud iam workload-identity-pools create-cred-config` writes, mounted from a ConfigMap",
                        s.workload
                    ),
                );
            }
            _ => {}
        }
        let metadata = r.source == Source::MetadataServer;
        let host = r.metadata_host.as_deref().unwrap_or("the metadata server");
        let first = r.first_token();
        if metadata && first.is_none() {
            return fail(
                Reason::MetadataServerUnreachable,
                format!(
                    "{who} got no token from the metadata server at {host} within {}s of the container's start ({} attempts of {}s each{error}; {run}). Fix: check that the node pool runs the GKE metadata server (gcloud container node-pools update POOL --cluster=CLUSTER --workload-metadata=GKE_METADATA), that the gke-metadata-server DaemonSet in kube-system is ready, and that no NetworkPolicy blocks 169.254.169.254",
                    DEADLINE.as_secs(),
                    r.attempts,
                    ATTEMPT_TIMEOUT.as_secs()
                ),
            );
        }
        if let (Some(expected), Some(got)) = (s.expected, r.fingerprint.as_deref())
            && expected != got
        {
            let (what, fix) = match (self.platform, r.fingerprint_of) {
                (Platform::Federation, _) | (_, Some(FingerprintOf::SubjectToken)) => (
                    "the subject token its credential configuration sends",
                    "point credential_source.file at a projected serviceAccountToken volume with the provider's audience, of the workload's own ServiceAccount",
                ),
                _ => (
                    "the ID token the metadata server hands it",
                    "make sure the node pool runs Workload Identity for GKE (GKE_METADATA; GCE_METADATA hands out the node's service account) and that the KSA's iam.gke.io/gcp-service-account annotation names the GSA the workload should be",
                ),
            };
            return fail(
                Reason::CredentialSourceDrift,
                format!(
                    "{who} authenticates as another identity than the one authprobe proves for the KSA: {what} fingerprints to {got}, the KSA's identity to {expected} ({run}). Fix: {fix}"
                ),
            );
        }
        match first {
            Some(took) if metadata && took > ATTEMPT_TIMEOUT => fail(
                Reason::MetadataServerSlowStart,
                format!(
                    "{who} got its first token from the metadata server at {host} {:.1}s after the container started ({} attempts), later than the client libraries' {}s metadata timeout: a client that asks once at start fails with UNAUTHENTICATED or \"could not find default credentials\" until it retries ({run}). Fix: {WAIT_FOR_METADATA}",
                    took.as_secs_f64(),
                    r.attempts,
                    ATTEMPT_TIMEOUT.as_secs()
                ),
            ),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests;
