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
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
else
  echo "cargo-nextest not found; using cargo test"
  cargo test --workspace --locked --no-fail-fast "$@"
fi
