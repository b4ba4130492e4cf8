#!/usr/bin/env bash
# Installs the IPMI peers used by pcg-ipmi's tests: ipmi_sim (Debian openipmi) and ipmitool, and
# pyghmi (PyPI; its BMC server is the base of OpenStack's VirtualBMC) in the Python venv under
# $PCG_PEERS_DIR (default <repo>/.pcg-peers), shared with the Redfish peers. Idempotent; run as
# root on Debian bookworm. The tests start ipmi_sim and scripts/peers/ipmi/pyghmi-bmc.py
# themselves, on 127.0.0.1 with a free port, from the recipe files in scripts/peers/ipmi/.
set -euo pipefail
source "$(dirname "$0")/apt.sh"

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
peers="${PCG_PEERS_DIR:-$repo/.pcg-peers}"
venv="$peers/venv"
py="${PYTHON:-python3}"

need=()
command -v ipmi_sim >/dev/null 2>&1 || need+=(openipmi)
command -v ipmitool >/dev/null 2>&1 || need+=(ipmitool)
"$py" -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if ((${#need[@]})); then
  # The tests start ipmi_sim themselves: Debian does not start the packages' services (openipmi,
  # ipmievd) while installing.
  apt_install install-ipmi "${need[@]}"
fi
command -v ipmi_sim >/dev/null && command -v ipmitool >/dev/null

mkdir -p "$peers"
if [[ ! -x "$venv/bin/python" ]]; then
  "$py" -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import pyghmi.ipmi.bmc' >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q pyghmi
fi
"$venv/bin/python" -c 'import pyghmi.ipmi.bmc'
echo "install-ipmi: ipmi_sim at $(command -v ipmi_sim), ipmitool at $(command -v ipmitool), pyghmi in $venv"
