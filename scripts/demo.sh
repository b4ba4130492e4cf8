#!/usr/bin/env bash
# The main job, end to end on this machine: builds pcg, starts pcg-saas on 127.0.0.1, creates a
# tenant and a pairing token over REST, pairs a gateway with `pcgctl pair`, starts the gateway
# daemon, sends commands through the tunnel and prints their results and `pcgctl status`.
# Everything runs under .pcg-run/demo (kept afterwards for inspection); all processes are
# stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
run=$root/.pcg-run/demo
rm -rf "$run"; mkdir -p "$run"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "==> building"
cargo build --workspace --bins --quiet
bin=$root/target/debug
need() { # COMMAND DEBIAN-PACKAGE: installs the package when the command is missing
  command -v "$1" >/dev/null && return
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq "$2" >/dev/null
  else
    echo "missing $1: apt-get install -y $2" >&2; exit 1
  fi
}
need curl curl; need python3 python3

json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

echo "==> starting pcg-saas"
cat >"$run/saas.toml" <<TOML
data_dir = "$run/saas"
api_listen = "127.0.0.1:0"
broker_listen = "127.0.0.1:0"
TOML
"$bin/pcg-saas" serve --config "$run/saas.toml" --ready-file "$run/saas.ready" 2>"$run/saas.log" &
pids+=($!)
for _ in $(seq 200); do [ -s "$run/saas.ready" ] && break; sleep 0.05; done
[ -s "$run/saas.ready" ] || { echo "pcg-saas did not start:"; cat "$run/saas.log"; exit 1; }
api=$(json 'd["api"]' <"$run/saas.ready")
ca=$run/saas/ca.pem
op=$(cat "$run/saas/operator.key")
rest() { # METHOD PATH KEY [BODY]
  curl -sS --fail-with-body --cacert "$ca" -X "$1" "$api$2" -H "Authorization: Bearer $3" \
    -H 'content-type: application/json' ${4:+-d "$4"}
}
echo "    REST API $api"

echo "==> tenant, API key and pairing token (REST)"
tenant=$(rest POST /v1/tenants "$op" '{"name":"demo"}')
key=$(echo "$tenant" | json 'd["admin_api_key"]')
echo "    tenant $(echo "$tenant" | json 'd["tenant"]["id"]')"
token=$(rest POST /v1/pairing-tokens "$key" '{"name":"demo-site","ttl_seconds":600}' | json 'd["token"]')

echo "==> pairing the gateway (pcgctl pair)"
cat >"$run/gateway.toml" <<TOML
data_dir = "$run/gateway"
TOML
export PCG_GATEWAY_CONFIG=$run/gateway.toml
"$bin/pcgctl" pair "$token"

echo "==> starting pcg-gateway"
"$bin/pcg-gateway" run 2>"$run/gateway.log" &
pids+=($!)
for _ in $(seq 200); do
  "$bin/pcgctl" status --json 2>/dev/null | grep -q '"state": "connected"' && break
  sleep 0.05
done
gw=$("$bin/pcgctl" status --json | json 'd["gateway_id"]')

echo "==> command round trip: gateway.diagnose through the tunnel"
cmd=$(rest POST "/v1/gateways/$gw/commands" "$key" '{"kind":"gateway.diagnose"}' | json 'd["id"]')
rest GET "/v1/commands/$cmd?wait_seconds=30" "$key" | python3 -m json.tool

echo "==> status"
"$bin/pcgctl" status
echo
echo "logs and state: $run"
