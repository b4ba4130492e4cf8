#!/usr/bin/env bash
# Installs the Redfish peers used by pcg-redfish's tests: sushy-emulator (PyPI sushy-tools) and
# the sushy client library (benchmark baseline), in a Python venv under $PCG_PEERS_DIR.
# Idempotent. PCG_PEERS_DIR defaults to <repo>/.pcg-peers. The tests find the emulator at
# $PCG_PEERS_DIR/venv/bin/sushy-emulator (or $PCG_SUSHY_EMULATOR) and start it themselves on
# 127.0.0.1 with a free port, from scripts/peers/redfish/sushy-emulator.conf.in.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
peers="${PCG_PEERS_DIR:-$repo/.pcg-peers}"
venv="$peers/venv"
py="${PYTHON:-python3}"

if ! "$py" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-redfish: $py lacks venv/ensurepip; install python3-venv as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends python3-venv
fi

mkdir -p "$peers"
if [[ ! -x "$venv/bin/python" ]]; then
  "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import sushy_tools, sushy, bcrypt' >/dev/null 2>&1 \
   || [[ ! -x "$venv/bin/sushy-emulator" ]]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q sushy-tools sushy bcrypt
fi
"$venv/bin/python" -c 'import sushy_tools, sushy, bcrypt'
echo "install-redfish: sushy-emulator at $venv/bin/sushy-emulator"
