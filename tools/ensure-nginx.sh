#!/usr/bin/env bash
# Makes sure Debian's nginx is installed: the integration tests put it, as a real edge path, in
# front of the fake origin. Only the binary is used: each test runs it on loopback with its own
# configuration, prefix and logs (tests/harness/src/nginx.rs); the package's service is not needed.
set -euo pipefail
if [ -z "${AUTHPROBE_NGINX:-}" ] && [ ! -x /usr/sbin/nginx ] && ! command -v nginx >/dev/null; then
  echo "tools: installing nginx from Debian" >&2
  "$(dirname "$0")/apt-install.sh" nginx
fi
