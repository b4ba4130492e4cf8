#!/usr/bin/env bash
# Installs nats-server (Debian `nats-server`, JetStream) for the broker-cluster tests, which run
# their own three-node clusters on 127.0.0.1; the package's own service is not started.
# Idempotent; run as root on Debian bookworm.
set -euo pipefail
source "$(dirname "$0")/apt.sh"

if ! command -v nats-server >/dev/null 2>&1; then
  apt_install install-nats nats-server
  # The package's default instance is not ours: keep it from starting at boot.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now nats-server >/dev/null 2>&1 || true
  fi
fi
echo "install-nats: $(nats-server --version 2>&1 | head -1)"
