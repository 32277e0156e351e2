#!/usr/bin/env bash
# Installs Debian packages, with sudo when not root.
set -euo pipefail
sudo=$([ "$(id -u)" = 0 ] || echo sudo)
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "$@"
