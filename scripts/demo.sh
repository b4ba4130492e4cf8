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

echo "==> real peer: ipmi_sim (a BMC) and ipmitool"
bash scripts/peers/install-ipmi.sh >/dev/null

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

echo "==> bare metal through the tunnel: ipmi_sim on 127.0.0.1"
bmc_port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$run/bmc/chassis"
sed -e "s|@PORT@|$bmc_port|" -e "s|@USER@|admin|" -e "s|@PASS@|demo-bmc-pw|" \
    -e "s|@CHASSIS@|$root/scripts/peers/ipmi/chassis-control.sh $run/bmc/chassis|" \
    scripts/peers/ipmi/lan.conf.in >"$run/bmc/lan.conf"
ipmi_sim -n -c "$run/bmc/lan.conf" -f scripts/peers/ipmi/bmc.emu -s "$run/bmc/state" >"$run/bmc/ipmi_sim.log" 2>&1 &
pids+=($!)
ipmitool_() { ipmitool -I lanplus -C 3 -H 127.0.0.1 -p "$bmc_port" -U admin -P demo-bmc-pw -N 1 -R 2 "$@"; }
for _ in $(seq 100); do ipmitool_ chassis power status >/dev/null 2>&1 && break; sleep 0.1; done
run_cmd() { # KIND PAYLOAD -> prints state and result
  local id
  id=$(rest POST "/v1/gateways/$gw/commands" "$key" "{\"kind\":\"$1\",\"payload\":$2}" | json 'd["id"]')
  rest GET "/v1/commands/$id?wait_seconds=60" "$key" |
    json '"    " + d["kind"] + ": " + d["state"] + " " + __import__("json").dumps(d["result"]["output"] if d["result"]["ok"] else d["result"]["error_message"])[:300]'
}
run_cmd baremetal.enrol "{\"name\":\"node1\",\"protocol\":\"ipmi\",\"endpoint\":{\"address\":\"127.0.0.1:$bmc_port\",\"user\":\"admin\",\"password\":\"demo-bmc-pw\"}}"
run_cmd baremetal.power '{"bmc":"node1","action":"on","wait":true}'
echo "    ipmitool reads back: $(ipmitool_ chassis power status)"
run_cmd baremetal.get '{"bmc":"node1"}'

echo "==> status"
"$bin/pcgctl" status
echo
echo "logs and state: $run"
