#!/usr/bin/env bash
# Stops the OpenStack test stack started by start.sh: every process it started (by the pids it
# recorded, each with its session, so forked workers go too). Keeps the state dir, so the next
# start is a warm one. Usage: stop.sh [--purge]  (--purge also deletes the state dir).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
S="${PCG_PEERS_DIR:-$repo/.pcg-peers}/openstack"
[[ -d $S/run ]] || { echo "openstack-stop: nothing to stop"; exit 0; }
pids=()
for f in "$S"/run/*.pid; do
  [[ -e $f ]] || continue
  pid=$(cat "$f")
  for p in $(pgrep -s "$pid" 2>/dev/null); do pids+=("$p"); done
  rm -f "$f"
done
[[ ${#pids[@]} -gt 0 ]] && kill -TERM "${pids[@]}" 2>/dev/null
for _ in $(seq 1 100); do
  alive=()
  for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive+=("$p"); done
  [[ ${#alive[@]} -eq 0 ]] && break
  sleep 0.1
done
[[ ${#alive[@]} -gt 0 ]] && kill -KILL "${alive[@]}" 2>/dev/null
rm -f "$S/stack.env"
if [[ ${1:-} == --purge ]]; then rm -rf "$S"; fi
echo "openstack-stop: stopped ${#pids[@]} processes"
