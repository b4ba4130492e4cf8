#!/usr/bin/env bash
# Installs the operations tools the tests use: promtool (Debian `prometheus`, no service started)
# to check both services' metrics. Idempotent; run as root on Debian bookworm.
set -euo pipefail
source "$(dirname "$0")/apt.sh"

if ! command -v promtool >/dev/null 2>&1; then
  apt_install install-ops prometheus
fi
echo "install-ops: $(promtool --version 2>&1 | head -1)"
