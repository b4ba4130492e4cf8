#!/usr/bin/env bash
# Runs every test of pcg: installs what the tests need (idempotent), builds the binaries the
# end-to-end tests start, checks formatting and lints, and runs the whole test suite.
# Usage: scripts/test.sh [extra nextest/cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "test prerequisites (real peers, tools)"
for s in scripts/peers/install-*.sh; do
  [ -e "$s" ] || continue
  echo "-- $s"
  bash "$s"
done
# Tests that need a real peer fail (instead of skipping) when it is missing.
export PCG_REQUIRE_PEERS=1

step "format"
cargo fmt --all -- --check

step "build (binaries used by the end-to-end tests)"
cargo build --workspace --bins --locked

step "lint"
cargo clippy --workspace --all-targets --locked -- -D warnings

# The OpenStack stack the tests share: started here, before the tests, so no test spends its time
# budget starting it (60-140 s cold on a busy machine); the tests find it running and reuse it.
# Stopped when this script exits, however it exits.
trap 'bash scripts/peers/openstack/stop.sh || true' EXIT
step "OpenStack test stack"
bash scripts/peers/openstack/start.sh
step "tests"
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@" || status=$?
else
  echo "cargo-nextest not found; using cargo test"
  cargo test --workspace --locked --no-fail-fast "$@" || status=$?
fi

# The appliance: image build (cached by its inputs) and boots under qemu (TCG), 10-25 minutes
# on a cold cache. Not a nextest test: it outlasts nextest's per-test bound. Runs only for the
# whole suite (no extra arguments) and can be skipped with PCG_SKIP_APPLIANCE=1.
if [[ $# -eq 0 && -z ${PCG_SKIP_APPLIANCE:-} ]]; then
  step "appliance boot test (appliance/boot-test.sh)"
  bash appliance/boot-test.sh || status=$?
fi
exit "$status"
