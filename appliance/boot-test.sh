#!/usr/bin/env bash
# The appliance boot test: builds the image (appliance/build.sh, cached by its inputs), then runs
# pcg-appliance-boot (tests/src/bin/pcg-appliance-boot.rs): the OVA read and imported by
# govmomi (pcg-vcsim ova -import), pcg-saas on the host, and three boots of the qcow2 under
# qemu-system-x86_64 (TCG) on one disk: a malformed token (console error, no loop), the token
# fixed (paired, connected, gateway.diagnose), a power-cycle (same id, no second pairing).
#
# Needs root, the tools of scripts/peers/install-appliance.sh and pcg-vcsim
# (scripts/peers/install-vsphere.sh); both installers are idempotent and run here. Expects the
# debug binaries pcg-saas and pcg-appliance-boot (`cargo build --workspace --bins`).
# Work files (serial logs, results.json) stay in target/appliance/boot-test.
# Environment: PCG_APPLIANCE_BOOT_TIMEOUT (seconds per boot, default 900).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
peers="${PCG_PEERS_DIR:-$repo/.pcg-peers}"
work="${PCG_APPLIANCE_DIR:-$repo/target/appliance}"

bash scripts/peers/install-appliance.sh
bash scripts/peers/install-vsphere.sh
for b in pcg-saas pcg-appliance-boot; do
  [[ -x target/debug/$b ]] || { echo "boot-test.sh: target/debug/$b is missing: run cargo build --workspace --bins" >&2; exit 1; }
done
start=$(date +%s)
bash appliance/build.sh --out "$work/out"
echo "boot-test.sh: image ready after $(($(date +%s) - start)) s"
exec target/debug/pcg-appliance-boot run \
  --qcow2 "$work/out/pcg-gateway.qcow2" --ova "$work/out/pcg-gateway.ova" \
  --vcsim "${PCG_VCSIM:-$peers/bin/pcg-vcsim}" --work "$work/boot-test" \
  --boot-timeout "${PCG_APPLIANCE_BOOT_TIMEOUT:-900}"
