#!/usr/bin/env bash
# The baseline: how teams check Workload Identity mappings today. List every ServiceAccount with
# kubectl, then one getIamPolicy per annotated KSA with curl, against the same (fake) Google.
# Usage: naive-check.sh IAM_BASE_URL TOKEN POOL [PARALLEL]   (KUBECONFIG set; prints "ok N fail M")
set -euo pipefail
iam=$1 token=$2 pool=$3 parallel=${4:-8}
kubectl=${KUBECTL:-kubectl}
export iam token pool

check() {
  local ns=$1 name=$2 gsa=$3
  local member="serviceAccount:${pool}[${ns}/${name}]"
  if curl -fsS -X POST -H "Authorization: Bearer ${token}" \
      "${iam}/v1/projects/-/serviceAccounts/${gsa}:getIamPolicy?options.requestedPolicyVersion=3" \
    | jq -e --arg m "$member" \
      '[.bindings[]? | select(.role == "roles/iam.workloadIdentityUser") | .members[]] | index($m) != null' >/dev/null; then
    echo ok
  else
    echo fail
  fi
}
export -f check

"$kubectl" get serviceaccounts --all-namespaces -o json \
  | jq -r '.items[] | select(.metadata.annotations["iam.gke.io/gcp-service-account"] != null)
           | [.metadata.namespace, .metadata.name, .metadata.annotations["iam.gke.io/gcp-service-account"]] | @tsv' \
  | xargs -P "$parallel" -L 1 bash -c 'check "$@"' _ \
  | sort | uniq -c | awk '{n[$2]=$1} END {printf "ok %d fail %d\n", n["ok"], n["fail"]}'
