#!/usr/bin/env bash
# Runs every cargo-fuzz target of the project for a bounded time each and writes the figures
# (executions, executions per second, crashes) to target/fuzz/report.md. Not part of the test
# suite: a benchmark-style run, `scripts/fuzz.sh [seconds per target, default 600]`.
#
# Installs cargo-fuzz if missing (crates.io). The machine's stable toolchain builds the targets
# with RUSTC_BOOTSTRAP=1 (cargo-fuzz passes unstable compiler flags); AddressSanitizer is on.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
export RUSTC_BOOTSTRAP=1
mkdir -p target/fuzz
report=target/fuzz/report.md
{
  echo "| crate | target | seconds | executions | exec/s | result |"
  echo "|---|---|---:|---:|---:|---|"
} >"$report"
for dir in gateway/proto/fuzz providers/ipmi/fuzz providers/redfish/fuzz providers/vsphere/fuzz saas-stub/fuzz; do
  [[ -f $dir/Cargo.toml ]] || continue
  crate=$(dirname "$dir")
  for target in $(sed -n 's/^name = "\([a-z_]*\)"$/\1/p' "$dir/Cargo.toml" | grep -v -- '-fuzz$'); do
    log=target/fuzz/$(basename "$crate")-$target.log
    echo "fuzz.sh: $crate $target for ${secs}s (log: $log)"
    set +e
    (cd "$dir" && cargo fuzz run "$target" -- -max_total_time="$secs" -print_final_stats=1) >"$log" 2>&1
    rc=$?
    set -e
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo 0)
    rate=$(( runs / (secs > 0 ? secs : 1) ))
    result=$([[ $rc -eq 0 ]] && echo "no crash" || echo "FAILED (rc $rc, see $log)")
    echo "| $crate | $target | $secs | $runs | $rate | $result |" >>"$report"
  done
done
cat "$report"
