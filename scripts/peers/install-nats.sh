#!/usr/bin/env bash
# Installs nats-server (Debian `nats-server`, JetStream) for the broker-cluster tests, which run
# their own three-node clusters on 127.0.0.1; the package's own service is not started.
# Idempotent; run as root on Debian bookworm.
set -euo pipefail

if ! command -v nats-server >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-nats: need root to install nats-server" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  trap '[[ $own_policy == 1 ]] && rm -f "$policy"' EXIT
  if ! apt-get install -y -qq --no-install-recommends nats-server >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends nats-server >/dev/null
  fi
  # The package's default instance is not ours: keep it from starting at boot.
  if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now nats-server >/dev/null 2>&1 || true
  fi
fi
echo "install-nats: $(nats-server --version 2>&1 | head -1)"
