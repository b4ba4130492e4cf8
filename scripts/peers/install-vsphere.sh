#!/usr/bin/env bash
# Installs the vSphere peer used by pcg-vsphere's tests: pcg-vcsim, the project's launcher of
# govmomi's vCenter simulator (and its reference client, `pcg-vcsim ref`), built offline from
# scripts/peers/vsphere/src with Debian's Go and govmomi source packages.
# Idempotent: installs the packages only when missing (root; apt-get update once), rebuilds only
# when the launcher source changed. PCG_PEERS_DIR defaults to <repo>/.pcg-peers; the binary lands
# in $PCG_PEERS_DIR/bin/pcg-vcsim (tests also honour $PCG_VCSIM).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
peers="${PCG_PEERS_DIR:-$repo/.pcg-peers}"
src="$repo/scripts/peers/vsphere"
bin="$peers/bin/pcg-vcsim"
stamp="$peers/bin/pcg-vcsim.src-sha256"
gomvi=/usr/share/gocode/src/github.com/vmware/govmomi/simulator

if ! command -v go >/dev/null 2>&1 || [[ ! -d $gomvi ]]; then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-vsphere: need golang-go and golang-github-vmware-govmomi-dev; run as root" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq golang-go golang-github-vmware-govmomi-dev >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq golang-go golang-github-vmware-govmomi-dev
  fi
fi

mkdir -p "$peers/bin" "$peers/go-cache"
sum="$(cd "$src" && find src -type f -name '*.go' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
if [[ -x $bin && -f $stamp && "$(cat "$stamp")" == "$sum" ]]; then
  echo "install-vsphere: pcg-vcsim up to date at $bin"
  exit 0
fi
(
  cd "$src"
  GOPATH="$src:/usr/share/gocode" GO111MODULE=off GOPROXY=off \
    GOCACHE="$peers/go-cache" go build -o "$bin.tmp" pcg-vcsim
)
mv "$bin.tmp" "$bin"
echo "$sum" >"$stamp"
echo "install-vsphere: built pcg-vcsim at $bin"
