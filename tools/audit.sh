#!/usr/bin/env bash
# Supply-chain checks with cargo-deny (policy in deny.toml): licences, bans and sources always;
# RustSec advisories only when the advisory database can be fetched. It lives on GitHub, which an
# offline machine cannot reach, so that case is reported loudly instead of passing silently.
set -euo pipefail
command -v cargo-deny >/dev/null || cargo install cargo-deny --locked
cargo deny --workspace check licenses bans sources
if cargo deny fetch db >/dev/null 2>&1; then
  cargo deny --workspace check advisories
else
  echo "audit: RustSec advisories NOT checked: the advisory database could not be fetched" >&2
fi
