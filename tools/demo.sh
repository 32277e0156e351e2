#!/usr/bin/env bash
# `make demo`: the incident, end to end, on a local control plane and a fake Google.
#
# Act 1: three namespaces labelled team=payments each run a KSA "app" annotated with the same GSA,
# whose policy maps billing and ledger but not checkout (forgotten after a migration). authprobe
# names checkout, the reason and the exact gcloud fix; the fix is applied to the fake and the probe
# turns Ready. Act 2: a Deployment in billing sets GOOGLE_APPLICATION_CREDENTIALS to a key mounted
# from a Secret, so its pods would never use Workload Identity; authprobe names it on the
# Deployment, the fix from its Event is run, Ready again. Interactive by default;
# AUTHPROBE_DEMO_ONESHOT=1 runs unattended and exits 0 only if all four outcomes were observed.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
oneshot=${AUTHPROBE_DEMO_ONESHOT:-0}
work=$(mktemp -d -t authprobe-demo-XXXXXX)
bin=$root/target/debug
kubectl=$root/.tools/bin/kubectl
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '\033[2m$ %s\033[0m\n' "$*"; "$@"; }
pause() {
  if [ "$oneshot" != 1 ]; then read -r -p "   (press Enter to $1) " _; fi
}
fail() { echo "demo: $*" >&2; exit 1; }

step "Building the control plane tools and authprobe (first run: several minutes)"
tools/build.sh
cargo build --quiet --locked --workspace --bins

step "Starting a local kube-apiserver + etcd and the fake Google"
"$bin/local-cluster" --no-crds >"$work/cluster.out" 2>"$work/cluster.log" &
pids+=($!)
for _ in $(seq 1 240); do grep -q '^export KUBECONFIG=' "$work/cluster.out" && break; sleep 0.5; done
grep -q '^export KUBECONFIG=' "$work/cluster.out" || fail "the control plane did not start: $(cat "$work/cluster.log")"
eval "$(grep '^export KUBECONFIG=' "$work/cluster.out")"
# The fake trusts this cluster's tokens: render its scenario with the issuer and CA.
issuer=$($kubectl get --raw /.well-known/openid-configuration | sed 's/.*"issuer":"\([^"]*\)".*/\1/')
ca_pem=$(sed 's/^/    /' "$(dirname "$KUBECONFIG")/pki/ca.crt")
template=$(<examples/demo/fake-google.yaml)
template=${template//'${ISSUER}'/$issuer}
printf '%s\n' "${template//'${CA_PEM}'/$ca_pem}" >"$work/fake-google.yaml"
"$bin/fake-google" --scenario "$work/fake-google.yaml" >"$work/google.out" 2>"$work/google.log" &
pids+=($!)
for _ in $(seq 1 100); do grep -q '^AUTHPROBE_GOOGLE_ENDPOINTS=' "$work/google.out" && break; sleep 0.1; done
endpoints=$(sed -n 's/^AUTHPROBE_GOOGLE_ENDPOINTS=//p' "$work/google.out")
[ -n "$endpoints" ] || fail "the fake Google did not start: $(cat "$work/google.log")"
fake=$(sed -n 's#.*iam=\(http://[^/]*\)/iam.*#\1#p' <<<"$endpoints")
echo "   kube-apiserver $($kubectl version -o json | sed -n 's/.*"gitVersion": "\(v1[^"]*\)".*/\1/p' | tail -1), fake Google at $fake"

step "The payments team's namespaces: a KSA 'app' in each, annotated with the same GSA"
for ns in billing checkout ledger; do
  $kubectl create namespace "$ns" >/dev/null
  $kubectl label namespace "$ns" team=payments >/dev/null
  $kubectl create serviceaccount app -n "$ns" >/dev/null
  $kubectl annotate serviceaccount app -n "$ns" iam.gke.io/gcp-service-account=payments@acme-prod.iam.gserviceaccount.com >/dev/null
done
show "$kubectl" get serviceaccounts -A --field-selector metadata.name=app

step "Installing the CRD and the AuthProbe, then starting the operator"
show "$kubectl" apply -f crds/authprobe.yaml
show "$kubectl" apply -f examples/payments.yaml
echo demo-operator-token >"$work/operator-token"
AUTHPROBE_GOOGLE_ENDPOINTS=$endpoints "$bin/authprobe" run --http-addr 127.0.0.1:0 \
  --google-access-token-file "$work/operator-token" --log-format compact >"$work/operator.log" 2>&1 &
pids+=($!)

ready() { $kubectl get authprobe payments -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}/{.status.conditions[?(@.type=="Ready")].reason}' 2>/dev/null; }
await_ready() {
  for _ in $(seq 1 240); do [ "$(ready)" = "$1" ] && return 0; sleep 0.25; done
  echo "demo: Ready is $(ready), not $1; operator log:" >&2; tail -20 "$work/operator.log" >&2; return 1
}

step "authprobe finds the broken namespace"
await_ready False/PrincipalNotMapped
broken=yes
show "$kubectl" get authprobes
show "$kubectl" get authprobe payments -o jsonpath='{range .status.conditions[*]}{.type}{"\t"}{.status}{"\t"}{.reason}{"\n"}{end}'
show "$kubectl" describe serviceaccount app -n checkout
fix=$($kubectl get events.events.k8s.io -n checkout --field-selector reason=PrincipalNotMapped -o jsonpath='{.items[0].note}' | grep -o 'gcloud iam service-accounts add-iam-policy-binding .*' || true)
member=$(grep -o -- '--member="[^"]*"' <<<"$fix" | sed 's/--member="\(.*\)"/\1/')
role=$(grep -o -- '--role=[^ ]*' <<<"$fix" | sed 's/--role=//')
[ -n "$member" ] && [ -n "$role" ] || fail "no fix found in the event"

step "Applying the fix the event names (to the fake Google)"
echo "   $fix"
pause "apply it"
curl -fsS -X POST -H 'content-type: application/json' \
  -d "{\"role\":\"$role\",\"member\":\"$member\"}" \
  "$fake/admin/serviceAccounts/payments@acme-prod.iam.gserviceaccount.com/members" >/dev/null
show "$kubectl" annotate authprobe payments authprobe.io/probe-now="$(date +%s)" --overwrite

step "The probe turns Ready, and the live chain verifies every namespace"
await_ready True/Verified
show "$kubectl" get authprobes
show "$kubectl" get authprobe payments -o jsonpath='{range .status.conditions[*]}{.type}{"\t"}{.status}{"\t"}{.reason}{"\n"}{end}'
echo "   Google calls made by the chain: $(curl -fsS "$fake/admin/counts")"
show "$kubectl" get events -n checkout

fixed=yes

step "Act 2: billing deploys with a service account key mounted and named by GOOGLE_APPLICATION_CREDENTIALS"
# A stand-in for the key a developer exported; authprobe never reads it (it never reads Secrets).
"$kubectl" create secret generic payments-key -n billing \
  --from-literal=key.json='{"type": "service_account", "private_key": "(demo: not a key)"}' >/dev/null
cat >"$work/billing-api.yaml" <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api
  namespace: billing
spec:
  selector:
    matchLabels: {app: api}
  template:
    metadata:
      labels: {app: api}
    spec:
      serviceAccountName: app
      containers:
      - name: api
        image: ghcr.io/acme/billing-api:2.3.1
        env:
        - name: GOOGLE_APPLICATION_CREDENTIALS
          value: /var/secrets/google/key.json
        volumeMounts:
        - name: google-key
          mountPath: /var/secrets/google
          readOnly: true
      volumes:
      - name: google-key
        secret:
          secretName: payments-key
YAML
show "$kubectl" apply -f "$work/billing-api.yaml"
await_ready False/CredentialFileOverridesWorkloadIdentity
overridden=yes
show "$kubectl" get authprobes
show "$kubectl" get authprobe payments -o jsonpath='{range .status.failures[*]}{.namespace}/{.serviceAccount}{"\t"}{.stage}{"\t"}{.reason}{"\t"}{.workloads}{"\n"}{end}'
show "$kubectl" describe deployment api -n billing
note=$($kubectl get events.events.k8s.io -n billing --field-selector reason=CredentialFileOverridesWorkloadIdentity -o jsonpath='{.items[0].note}')
workload_fix=$(grep -o 'kubectl set env [^,]*' <<<"$note" || true)
[ -n "$workload_fix" ] || fail "no fix found in the Deployment's event: $note"

step "Applying the fix the Deployment's event names"
echo "   $workload_fix"
pause "apply it"
read -r -a fix_args <<<"${workload_fix#kubectl }"
show "$kubectl" "${fix_args[@]}"

step "billing's Deployment now uses Workload Identity: Ready again"
await_ready True/Verified
show "$kubectl" get authprobes
show "$kubectl" describe deployment api -n billing

if [ "${broken:-}" = yes ] && [ "${fixed:-}" = yes ] && [ "${overridden:-}" = yes ] && [ "$(ready)" = True/Verified ]; then
  echo
  echo "demo: act 1 observed Ready=False/PrincipalNotMapped for checkout, then Ready=True after the fix"
  echo "demo: act 2 observed Ready=False/CredentialFileOverridesWorkloadIdentity for Deployment billing/api, then Ready=True after the fix"
  pause "stop the demo"
  exit 0
fi
fail "the demo did not observe all four outcomes"
