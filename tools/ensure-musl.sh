#!/usr/bin/env bash
# Makes sure the static (musl) build can run: the Rust musl target, and musl-gcc for aws-lc's C code.
set -euo pipefail
if ! command -v musl-gcc >/dev/null; then
  echo "tools: installing musl-tools from Debian" >&2
  "$(dirname "$0")/apt-install.sh" musl-tools
fi
rustup target list --installed | grep -qx x86_64-unknown-linux-musl || rustup target add x86_64-unknown-linux-musl
