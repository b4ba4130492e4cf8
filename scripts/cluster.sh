#!/usr/bin/env bash
# pcg-saas as a cluster on this machine: a three-node NATS JetStream cluster (mutual TLS on routes
# and client connections, the internal CA of `pcg-saas cluster init`) and two pcg-saas replicas
# serving from it, then a gateway paired through one replica and a command submitted to the
# other, its result read from both; then replica1 is killed, the gateway moves to replica2, a
# command still runs; replica1 is started again and gets its share of tunnels back.
# Everything runs under .pcg-run/cluster (kept afterwards for inspection); all processes are
# stopped on exit. Ports: NATS 14222-14224 (clients), 16222-16224 (routes), 18222-18224
# (monitoring); replicas 17443 and 17444.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
run=$root/.pcg-run/cluster
rm -rf "$run"; mkdir -p "$run"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

echo "==> NATS server (Debian nats-server 2.9)"
bash scripts/peers/install-nats.sh >/dev/null
echo "==> building"
cargo build --workspace --bins --quiet
bin=$root/target/debug
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1], {'d': d}))" "$1"; }

echo "==> the cluster's PKI (pcg-saas cluster init)"
pki=$run/pki
"$bin/pcg-saas" cluster init --dir "$pki" | sed 's/^/    /'

echo "==> three NATS nodes"
routes='"nats-route://127.0.0.1:16222", "nats-route://127.0.0.1:16223", "nats-route://127.0.0.1:16224"'
for i in 1 2 3; do
  n=node$i
  mkdir -p "$run/$n"
  tls="tls { cert_file: \"$pki/nats-$n.pem\", key_file: \"$pki/nats-$n.key\", ca_file: \"$pki/internal-ca.pem\", verify: true, timeout: 2 }"
  cat >"$run/$n.conf" <<CONF
server_name: $n
host: 127.0.0.1
port: 1422$((i + 1))
http: "127.0.0.1:1822$((i + 1))"
$tls
jetstream { store_dir: "$run/$n/js", max_memory_store: 64MB, max_file_store: 1GB }
cluster {
  name: pcg
  listen: "127.0.0.1:1622$((i + 1))"
  routes: [ $routes ]
  $tls
}
CONF
  nats-server -c "$run/$n.conf" 2>"$run/$n.log" &
  pids+=($!)
done
nats_urls='"tls://127.0.0.1:14222", "tls://127.0.0.1:14223", "tls://127.0.0.1:14224"'

replica_conf() { # NAME PORT
  cat >"$run/$1.toml" <<TOML
data_dir = "$run/$1"
api_listen = "127.0.0.1:$2"
public_broker_urls = ["https://127.0.0.1:17443", "https://127.0.0.1:17444"]
ca_cert_file = "$pki/gateway-ca.pem"
ca_key_file = "$pki/gateway-ca.key"
[cluster]
nats_urls = [$nats_urls]
ca_file = "$pki/internal-ca.pem"
cert_file = "$pki/replica-$1.pem"
key_file = "$pki/replica-$1.key"
TOML
}
replica_conf replica1 17443
replica_conf replica2 17444
echo "==> waiting for the JetStream quorum (pcg-saas cluster check)"
for _ in $(seq 60); do
  "$bin/pcg-saas" cluster check --config "$run/replica1.toml" >"$run/check.json" 2>"$run/check.err" && break
  sleep 1
done
[ -s "$run/check.json" ] || { echo "no quorum:"; cat "$run/check.err"; exit 1; }
echo "    leader $(json 'd["leader"]' <"$run/check.json"), replicas $(json '[r["name"] for r in d["replicas"]]' <"$run/check.json")"

declare -A replica_pid
start_replica() { # NAME
  rm -f "$run/$1.ready"
  "$bin/pcg-saas" serve --config "$run/$1.toml" --ready-file "$run/$1.ready" 2>>"$run/$1.log" &
  replica_pid[$1]=$!
  pids+=($!)
  for _ in $(seq 600); do [ -s "$run/$1.ready" ] && break; sleep 0.1; done
  [ -s "$run/$1.ready" ] || { echo "$1 did not start:"; tail -20 "$run/$1.log"; exit 1; }
  echo "    $1 at $(json 'd["api"]' <"$run/$1.ready")"
}
echo "==> two pcg-saas replicas"
start_replica replica1
start_replica replica2
ca=$pki/gateway-ca.pem
rest() { # REPLICA METHOD PATH KEY [BODY]
  local port=17443; [ "$1" = replica2 ] && port=17444
  curl -sS --fail-with-body --cacert "$ca" -X "$2" "https://127.0.0.1:$port$3" \
    -H "Authorization: Bearer $4" -H 'content-type: application/json' ${5:+-d "$5"}
}
tunnels() { curl -sS --cacert "$ca" "https://127.0.0.1:$1/healthz" | json 'd["tunnels"]'; }

echo "==> a tenant made on replica1, a pairing token on replica2"
op=$(cat "$run/replica1/operator.key")
tenant=$(rest replica1 POST /v1/tenants "$op" '{"name":"demo"}')
key=$(echo "$tenant" | json 'd["admin_api_key"]')
token=$(rest replica2 POST /v1/pairing-tokens "$key" '{"name":"site","ttl_seconds":600}' | json 'd["token"]')

echo "==> a gateway paired through replica2 (it is handed both brokers)"
cat >"$run/gateway.toml" <<TOML
data_dir = "$run/gateway"
TOML
export PCG_GATEWAY_CONFIG=$run/gateway.toml
"$bin/pcgctl" pair "$token"
"$bin/pcg-gateway" run 2>"$run/gateway.log" &
pids+=($!)
for _ in $(seq 300); do
  "$bin/pcgctl" status --json 2>/dev/null | grep -q '"state": "connected"' && break
  sleep 0.1
done
gw=$("$bin/pcgctl" status --json | json 'd["gateway_id"]')
echo "    gateway $gw connected to $("$bin/pcgctl" status --json | json 'd["tunnel"]["broker_endpoint"]')"
echo "    tunnels: replica1 $(tunnels 17443), replica2 $(tunnels 17444)"

round_trip() { # SUBMIT-TO READ-FROM
  local id
  id=$(rest "$1" POST "/v1/gateways/$gw/commands" "$key" '{"kind":"gateway.echo","payload":{"hello":"cluster"}}' | json 'd["id"]')
  echo "    $id submitted to $1; $2 says: $(rest "$2" GET "/v1/commands/$id?wait_seconds=30" "$key" | json 'd["state"] + " " + str(d["result"]["output"])')"
}
echo "==> a command submitted to each replica, its result read from the other"
round_trip replica1 replica2
round_trip replica2 replica1

echo "==> replica1 killed: the gateway moves to replica2"
kill -9 "${replica_pid[replica1]}"
for _ in $(seq 300); do [ "$(tunnels 17444)" = 1 ] && break; sleep 0.1; done
echo "    tunnels: replica2 $(tunnels 17444)"
round_trip replica2 replica2

echo "==> replica1 started again (it catches up with the log)"
start_replica replica1
round_trip replica2 replica1

echo "==> status"
"$bin/pcgctl" status
echo
echo "logs and state: $run"
