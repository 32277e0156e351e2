#!/usr/bin/env bash
# Builds the local control-plane and node tools from the Go module proxy into .tools/bin, each only
# when it is missing or was built for another version: etcd, kube-apiserver, kubectl, helm (the
# control plane), kube-controller-manager, kube-scheduler, kubelet (the node, see tests/harness/src/node.rs)
# and promtool (alert and recording rule checks); podutil (tools/podutil, the node's pause and probe
# program) is stamped with its source's hash instead of a version.
# Usage: tools/build.sh [TOOL]...   (default: all of them)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=versions.env
. "$root/tools/versions.env"
bin="$root/.tools/bin"
mkdir -p "$bin"
export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -trimpath"

# want NAME VERSION: true when NAME is missing or stamped with another version.
want() { [ ! -x "$bin/$1" ] || [ "$(cat "$bin/.$1.version" 2>/dev/null)" != "$2" ]; }
stamp() { echo "$2" > "$bin/.$1.version"; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "tools: built $name in $((SECONDS - t0))s" >&2; }

build_kube() { # every k8s.io/kubernetes binary, stamped like upstream's hack/lib/version.sh
  local name=$1 minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local ldflags="-s -w" kv
  for kv in "gitVersion=${K8S_VERSION}" gitMajor=1 "gitMinor=${minor}" gitTreeState=clean \
            "buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"; do
    ldflags+=" -X k8s.io/component-base/version.${kv} -X k8s.io/client-go/pkg/version.${kv}"
  done
  (cd "$root/tools/kube" && go build -ldflags "$ldflags" -o "$bin/$name" "k8s.io/kubernetes/cmd/$name")
}
build_etcd() { (cd "$root/tools/etcd" && go build -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3); }
build_helm() {
  (cd "$root/tools/helm" && go build -o "$bin/helm" \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${HELM_VERSION}" helm.sh/helm/v3/cmd/helm)
}
build_promtool() { # stamped like Prometheus's .promu.yml; PROMETHEUS_VERSION v0.3MM.P is Prometheus 3.MM.P
  local v=${PROMETHEUS_VERSION#v0.} ldflags="-s -w" kv
  v="3.$((10#${v%%.*} - 300)).${v#*.}"
  for kv in "Version=${v}" "Revision=${PROMETHEUS_VERSION}" Branch=HEAD BuildUser=authprobe \
            "BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"; do
    ldflags+=" -X github.com/prometheus/common/version.${kv}"
  done
  (cd "$root/tools/prometheus" && go build -tags netgo -ldflags "$ldflags" -o "$bin/promtool" \
    github.com/prometheus/prometheus/cmd/promtool)
}
build_podutil() { (cd "$root/tools/podutil" && go build -ldflags "-s -w" -o "$bin/podutil" .); }

all=(etcd kube-apiserver kubectl helm kube-scheduler kube-controller-manager kubelet promtool podutil)
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")
for t in "${targets[@]}"; do
  case $t in
    kube-apiserver|kubectl|kube-controller-manager|kube-scheduler|kubelet) v=$K8S_VERSION; fn="build_kube $t" ;;
    etcd) v=$ETCD_VERSION; fn=build_etcd ;;
    helm) v=$HELM_VERSION; fn=build_helm ;;
    promtool) v=$PROMETHEUS_VERSION; fn=build_promtool ;;
    podutil) v=$(cat "$root/tools/podutil/go.mod" "$root/tools/podutil/main.go" | sha256sum | cut -c1-16); fn=build_podutil ;;
    *) echo "tools: unknown tool $t" >&2; exit 2 ;;
  esac
  if want "$t" "$v"; then
    echo "tools: building $t $v (the first build from a cold Go cache takes many minutes)" >&2
    # shellcheck disable=SC2086
    timed "$t" $fn
    stamp "$t" "$v"
  fi
done
