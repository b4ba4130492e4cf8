#!/usr/bin/env bash
# Installs the OpenStack peer used by pcg-openstack's tests, from Debian bookworm's own packages:
# Keystone, Placement, Glance, Nova (run with the fake compute driver), RabbitMQ for Nova's
# messaging, and python3-openstackclient (the reference client for cross-checks and benchmarks).
# Idempotent: installs only what is missing (apt-get update once, only when something is missing).
# No system service is started: a policy-rc.d that exits 101 is in place during the install, and
# any epmd the install started is stopped. scripts/peers/openstack/start.sh runs the stack on
# 127.0.0.1 under $PCG_PEERS_DIR/openstack.
set -euo pipefail

pkgs=(python3-keystone python3-nova python3-placement python3-glance rabbitmq-server
      python3-openstackclient sqlite3 curl)
missing=()
for p in "${pkgs[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  echo "install-openstack: all packages present"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "install-openstack: missing ${missing[*]}; run this script as root" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
saved=""
if [[ -e $policy ]]; then
  saved="$(mktemp)"
  cp -p "$policy" "$saved"
fi
restore() {
  if [[ -n $saved ]]; then mv -f "$saved" "$policy"; else rm -f "$policy"; fi
}
trap restore EXIT
printf '#!/bin/sh\nexit 101\n' >"$policy"
chmod 755 "$policy"

start=$(date +%s)
before=" $( (pgrep -x epmd || true) | tr '\n' ' ') "
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The packages may have started an Erlang port mapper bound to every address; the start script
# runs its own bound to 127.0.0.1.
for pid in $(pgrep -x epmd); do
  [[ $before == *" $pid "* ]] || kill "$pid" 2>/dev/null || true
done
echo "install-openstack: installed ${missing[*]} in $(( $(date +%s) - start )) s"
