#!/usr/bin/env bash
# Installs the IPMI peers used by pcg-ipmi's tests: ipmi_sim (Debian openipmi) and ipmitool.
# Idempotent; run as root on Debian bookworm. The tests start ipmi_sim themselves, on 127.0.0.1
# with a free port, from the recipe files in scripts/peers/ipmi/.
set -euo pipefail

need=()
command -v ipmi_sim >/dev/null 2>&1 || need+=(openipmi)
command -v ipmitool >/dev/null 2>&1 || need+=(ipmitool)
if ((${#need[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-ipmi: need root to install ${need[*]} (apt-get install -y openipmi ipmitool)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # The tests start ipmi_sim themselves: keep Debian from starting the packages' services
  # (openipmi, ipmievd) while installing, unless a policy is already in place.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
  fi
  trap '[[ $own_policy == 1 ]] && rm -f "$policy"' EXIT
  if ! apt-get install -y -qq --no-install-recommends openipmi ipmitool; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends openipmi ipmitool
  fi
fi
command -v ipmi_sim >/dev/null && command -v ipmitool >/dev/null
echo "install-ipmi: ipmi_sim at $(command -v ipmi_sim), ipmitool at $(command -v ipmitool)"
