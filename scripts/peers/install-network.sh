#!/usr/bin/env bash
# Installs the network peers of the tunnel tests: squid with OpenSSL (plain CONNECT, Basic auth,
# a refused port, and a TLS-inspecting ssl_bump proxy; the `squid-openssl` package replaces
# `squid`), nftables and iproute2 (network namespaces with a rule that silently drops the
# tunnel's packets), stress-ng (to check the suite on a busy machine) and faketime (libfaketime:
# a gateway whose clock is off, for `pcgctl diag`). Idempotent; run as
# root on Debian bookworm. The tests start squid themselves on 127.0.0.1 from the templates in
# scripts/peers/squid/; no system service is started or left running.
set -euo pipefail
source "$(dirname "$0")/apt.sh"

pkgs=(squid-openssl nftables iproute2 stress-ng faketime)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  apt_install install-network "${missing[@]}"
fi
for bin in /usr/sbin/squid /usr/lib/squid/security_file_certgen /usr/lib/squid/basic_ncsa_auth; do
  [[ -x $bin ]] || { echo "install-network: $bin is missing (squid-openssl)" >&2; exit 1; }
done
command -v nft >/dev/null && command -v ip >/dev/null && command -v faketime >/dev/null
echo "install-network: squid (OpenSSL) $(/usr/sbin/squid -v | sed -n 's/.*Version \([0-9.]*\).*/\1/p'), nft, ip, stress-ng, faketime"
