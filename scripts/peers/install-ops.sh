#!/usr/bin/env bash
# Installs the operations tools the tests use: promtool (Debian `prometheus`, no service started)
# to check both services' metrics. Idempotent; run as root on Debian bookworm.
set -euo pipefail

if ! command -v promtool >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-ops: need root to install prometheus (promtool)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  trap '[[ $own_policy == 1 ]] && rm -f "$policy"' EXIT
  if ! apt-get install -y -qq --no-install-recommends prometheus >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  fi
fi
echo "install-ops: $(promtool --version 2>&1 | head -1)"
