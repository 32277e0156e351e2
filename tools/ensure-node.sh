#!/usr/bin/env bash
# Makes sure the node's runtime parts are installed: containerd, runc and the CNI plugins, from
# Debian (tests/harness/src/node.rs starts its own containerd; the package's service is not used).
# Idempotent: installs nothing when all three are present.
set -euo pipefail
missing=()
command -v containerd >/dev/null && command -v ctr >/dev/null || missing+=(containerd)
command -v runc >/dev/null || missing+=(runc)
[ -x /usr/lib/cni/bridge ] && [ -x /usr/lib/cni/host-local ] && [ -x /usr/lib/cni/loopback ] ||
  missing+=(containernetworking-plugins)
[ ${#missing[@]} -eq 0 ] && exit 0
echo "tools: installing ${missing[*]} from Debian" >&2
"$(dirname "$0")/apt-install.sh" "${missing[@]}"
