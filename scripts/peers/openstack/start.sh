#!/usr/bin/env bash
# Starts the OpenStack test stack on 127.0.0.1: Keystone, Placement, Glance, Nova (api, conductor,
# scheduler, compute with the fake driver), RabbitMQ (with its own epmd) and a Neutron stand-in
# that answers empty lists. State lives in $PCG_PEERS_DIR/openstack (default
# <repo>/.pcg-peers/openstack). Idempotent: a healthy stack from an earlier start is reused; a
# stack whose databases exist is started again without re-initialising (warm start); anything else
# is set up from scratch (cold start). On success it writes, in the state dir:
#   openrc       OS_* variables for the admin user (source it; the openstack CLI reads them)
#   clouds.yaml  the same as cloud "pcg" (OS_CLIENT_CONFIG_FILE=<this file>, OS_CLOUD=pcg)
#   stack.env    ports, pids, and how the stack was started (reused / warm / cold, seconds)
# and prints how long it took. Stop with stop.sh. Needs install-openstack.sh first.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
S="${PCG_PEERS_DIR:-$repo/.pcg-peers}/openstack"
PY=/usr/bin/python3
mkdir -p "$S"
exec 9>"$S/.start.lock"
flock 9
t0=$(date +%s%N)
elapsed() { local ms=$((($(date +%s%N) - t0) / 1000000)); printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

log() { printf 'openstack-start: %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

healthy() {
  [[ -f $S/stack.env && -f $S/ports ]] || return 1
  # shellcheck disable=SC1091
  . "$S/ports"
  local f
  for f in "$S"/run/*.pid; do
    [[ -e $f ]] || return 1
    kill -0 "$(cat "$f")" 2>/dev/null || return 1
  done
  curl -fsS -m 5 -o /dev/null "http://127.0.0.1:$KEYSTONE_PORT/v3" || return 1
  curl -fsS -m 5 -o /dev/null "http://127.0.0.1:$NOVA_PORT/" || return 1
  curl -sS -m 5 -o /dev/null "http://127.0.0.1:$GLANCE_PORT/versions" || return 1
  curl -sS -m 5 -o /dev/null "http://127.0.0.1:$PLACEMENT_PORT/" || return 1
}

if healthy; then
  sed -i 's/^STARTED=.*/STARTED=reused/; s/^START_SECONDS=.*/START_SECONDS='"$(elapsed)"'/' "$S/stack.env"
  log "reused the running stack in $(elapsed) s ($S)"
  exit 0
fi

# Whatever is left of an earlier start (some processes died) is stopped first.
bash "$here/stop.sh" >/dev/null 2>&1 || true

mode=warm
if [[ ! -f $S/initialised || ! -f $S/ports ]]; then
  mode=cold
else
  . "$S/ports"
  for p in $KEYSTONE_PORT $PLACEMENT_PORT $GLANCE_PORT $NOVA_PORT $NEUTRON_PORT $RABBIT_PORT $EPMD_PORT $DIST_PORT; do
    if port_open "$p"; then mode=cold; log "port $p is taken; setting up afresh"; break; fi
  done
fi

if [[ $mode == cold ]]; then
  find "$S" -mindepth 1 -maxdepth 1 ! -name .start.lock ! -name .test.lock -exec rm -rf {} +
  read -r KEYSTONE_PORT PLACEMENT_PORT GLANCE_PORT NOVA_PORT NEUTRON_PORT RABBIT_PORT EPMD_PORT DIST_PORT < <(
    $PY -c '
import socket
ss=[socket.socket() for _ in range(8)]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))')
  ADMIN_PASSWORD="$($PY -c 'import secrets; print(secrets.token_urlsafe(18))')"
  cat >"$S/ports" <<EOT
KEYSTONE_PORT=$KEYSTONE_PORT
PLACEMENT_PORT=$PLACEMENT_PORT
GLANCE_PORT=$GLANCE_PORT
NOVA_PORT=$NOVA_PORT
NEUTRON_PORT=$NEUTRON_PORT
RABBIT_PORT=$RABBIT_PORT
EPMD_PORT=$EPMD_PORT
DIST_PORT=$DIST_PORT
ADMIN_PASSWORD=$ADMIN_PASSWORD
EOT
  chmod 600 "$S/ports"
fi
. "$S/ports"
mkdir -p "$S/run" "$S/log" "$S/rabbit" "$S/nova/instances" "$S/nova/lock" "$S/images" "$S/placement" "$S/glance-lock"

KS="http://127.0.0.1:$KEYSTONE_PORT/v3"
cat >"$S/openrc" <<EOT
export OS_AUTH_URL=$KS
export OS_IDENTITY_API_VERSION=3
export OS_USERNAME=admin
export OS_PASSWORD=$ADMIN_PASSWORD
export OS_PROJECT_NAME=admin
export OS_USER_DOMAIN_NAME=Default
export OS_PROJECT_DOMAIN_NAME=Default
export OS_REGION_NAME=RegionOne
export OS_INTERFACE=public
EOT
cat >"$S/clouds.yaml" <<EOT
clouds:
  pcg:
    auth:
      auth_url: $KS
      username: admin
      password: $ADMIN_PASSWORD
      project_name: admin
      user_domain_name: Default
      project_domain_name: Default
    region_name: RegionOne
    interface: public
    identity_api_version: 3
EOT
chmod 600 "$S/openrc" "$S/clouds.yaml"

authtoken="www_authenticate_uri = $KS
auth_url = $KS
auth_type = password
username = admin
password = $ADMIN_PASSWORD
project_name = admin
user_domain_name = Default
project_domain_name = Default
region_name = RegionOne"

cat >"$S/keystone.conf" <<EOT
[DEFAULT]
log_file = $S/log/keystone.log
[database]
connection = sqlite:///$S/keystone.db?timeout=60
[token]
provider = fernet
[fernet_tokens]
key_repository = $S/fernet-keys
[fernet_receipts]
key_repository = $S/fernet-keys
[credential]
key_repository = $S/credential-keys
EOT
cat >"$S/placement/placement.conf" <<EOT
[DEFAULT]
log_file = $S/log/placement.log
[placement_database]
connection = sqlite:///$S/placement.db?timeout=60
[api]
auth_strategy = keystone
[keystone_authtoken]
$authtoken
EOT
cp "$here/glance-api-paste.ini" "$S/glance-api-paste.ini"
cat >"$S/glance-api.conf" <<EOT
[DEFAULT]
bind_host = 127.0.0.1
bind_port = $GLANCE_PORT
workers = 1
log_file = $S/log/glance-api.log
[database]
connection = sqlite:///$S/glance.db?timeout=60
[glance_store]
stores = file
default_store = file
filesystem_store_datadir = $S/images
[paste_deploy]
flavor = keystone
config_file = $S/glance-api-paste.ini
[oslo_concurrency]
lock_path = $S/glance-lock
[keystone_authtoken]
$authtoken
EOT
cp "$here/nova-api-paste.ini" "$S/nova-api-paste.ini"
cat >"$S/nova.conf" <<EOT
[DEFAULT]
transport_url = rabbit://guest:guest@127.0.0.1:$RABBIT_PORT/
compute_driver = fake.FakeDriver
state_path = $S/nova
instances_path = $S/nova/instances
host = pcg-compute
my_ip = 127.0.0.1
enabled_apis = osapi_compute
osapi_compute_listen = 127.0.0.1
osapi_compute_listen_port = $NOVA_PORT
osapi_compute_workers = 1
cpu_allocation_ratio = 100.0
ram_allocation_ratio = 10.0
[api]
auth_strategy = keystone
[wsgi]
api_paste_config = $S/nova-api-paste.ini
[api_database]
connection = sqlite:///$S/nova_api.db?timeout=60
[database]
connection = sqlite:///$S/nova.db?timeout=60
[conductor]
workers = 1
[scheduler]
workers = 1
discover_hosts_in_cells_interval = 5
[quota]
instances = 1000
cores = -1
ram = -1
[oslo_concurrency]
lock_path = $S/nova/lock
[vnc]
enabled = false
[keystone_authtoken]
$authtoken
[placement]
$authtoken
[neutron]
$authtoken
[glance]
region_name = RegionOne
EOT
echo '[].' >"$S/rabbit/enabled_plugins"
cat >"$S/rabbit/rabbitmq.conf" <<EOT
listeners.tcp.1 = 127.0.0.1:$RABBIT_PORT
loopback_users.guest = true
EOT

# The sqlite URLs carry a 60 s busy timeout (Python's default is 5 s): Nova's api, conductor and
# scheduler write the same files, and on a loaded 2-core machine 5 s is not always enough.

# Starts "$@" in its own session (so stop.sh can end its children too), logs to log/NAME.log.
run() {
  local name=$1; shift
  setsid "$@" </dev/null >>"$S/log/$name.log" 2>&1 9>&- &
  echo $! >"$S/run/$name.pid"
}
wait_http() { # name url seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    if curl -sS -m 2 -o /dev/null "$2" 2>/dev/null; then return 0; fi
    local pid; pid=$(cat "$S/run/$1.pid")
    kill -0 "$pid" 2>/dev/null || { log "$1 exited; see $S/log/$1.log"; tail -n 20 "$S/log/$1.log" >&2; exit 1; }
    sleep 0.2
  done
  log "$1 did not answer $2 within $3 s; see $S/log/$1.log"; exit 1
}
wait_port() { # name port seconds
  local i
  for ((i = 0; i < $3 * 5; i++)); do
    port_open "$2" && return 0
    kill -0 "$(cat "$S/run/$1.pid")" 2>/dev/null || { log "$1 exited; see $S/log/$1.log"; tail -n 20 "$S/log/$1.log" >&2; exit 1; }
    sleep 0.2
  done
  log "$1 did not open port $2 within $3 s"; exit 1
}
pyrun() { # module-with-main args...
  local m=$1; shift
  $PY -c "import sys; from $m import main; sys.argv[0] = '$m'; sys.exit(main())" "$@"
}
wal() { for db in "$@"; do sqlite3 "$S/$db" 'PRAGMA journal_mode=WAL;' >/dev/null; done; }
nova_manage=($PY -c "import sys; from nova.cmd.manage import main; sys.argv[0] = 'nova-manage'; sys.exit(main())" --config-file "$S/nova.conf")

# RabbitMQ and its port mapper, both on 127.0.0.1 only.
export ERL_EPMD_ADDRESS=127.0.0.1 ERL_EPMD_PORT=$EPMD_PORT
run epmd epmd -port "$EPMD_PORT"
wait_port epmd "$EPMD_PORT" 20
HOME="$S/rabbit" RABBITMQ_NODENAME=pcgos@localhost RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
  RABBITMQ_NODE_PORT=$RABBIT_PORT RABBITMQ_DIST_PORT=$DIST_PORT \
  RABBITMQ_CONFIG_FILE="$S/rabbit/rabbitmq.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$S/rabbit/enabled_plugins" \
  RABBITMQ_MNESIA_BASE="$S/rabbit/mnesia" RABBITMQ_LOG_BASE="$S/log" RABBITMQ_LOGS=- \
  RABBITMQ_PID_FILE="$S/rabbit/rabbit.pid" RABBITMQ_CONF_ENV_FILE=/dev/null \
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
  run rabbitmq /usr/lib/rabbitmq/bin/rabbitmq-server

# Keystone.
if [[ $mode == cold ]]; then
  wal keystone.db
  keystone-manage --config-file "$S/keystone.conf" db_sync >>"$S/log/setup.log" 2>&1
  keystone-manage --config-file "$S/keystone.conf" fernet_setup --keystone-user root --keystone-group root >>"$S/log/setup.log" 2>&1
  keystone-manage --config-file "$S/keystone.conf" credential_setup --keystone-user root --keystone-group root >>"$S/log/setup.log" 2>&1
  keystone-manage --config-file "$S/keystone.conf" bootstrap --bootstrap-password "$ADMIN_PASSWORD" \
    --bootstrap-admin-url "$KS" --bootstrap-internal-url "$KS" --bootstrap-public-url "$KS" \
    --bootstrap-region-id RegionOne >>"$S/log/setup.log" 2>&1
fi
OS_KEYSTONE_CONFIG_FILES="$S/keystone.conf" run keystone keystone-wsgi-public --host 127.0.0.1 --port "$KEYSTONE_PORT"
run neutron $PY "$here/neutron-standin.py" "$NEUTRON_PORT"
wait_http keystone "$KS" 60
log "keystone up after $(elapsed) s"

set -a; . "$S/openrc"; set +a
if [[ $mode == cold ]]; then
  $PY "$here/bootstrap.py" catalog "compute=http://127.0.0.1:$NOVA_PORT/v2.1" \
    "placement=http://127.0.0.1:$PLACEMENT_PORT" "image=http://127.0.0.1:$GLANCE_PORT" \
    "network=http://127.0.0.1:$NEUTRON_PORT" 2>>"$S/log/setup.log"
  wal placement.db glance.db nova_api.db nova.db nova_cell0.db
  {
    placement-manage --config-file "$S/placement/placement.conf" db sync
    pyrun glance.cmd.manage --config-file "$S/glance-api.conf" db_sync
    "${nova_manage[@]}" api_db sync
    "${nova_manage[@]}" cell_v2 map_cell0 --database_connection "sqlite:///$S/nova_cell0.db?timeout=60"
    "${nova_manage[@]}" db sync
    "${nova_manage[@]}" cell_v2 create_cell --name cell1
  } >>"$S/log/setup.log" 2>&1 || { log "database setup failed; see $S/log/setup.log"; tail -n 30 "$S/log/setup.log" >&2; exit 1; }
  log "databases ready after $(elapsed) s"
fi

OS_PLACEMENT_CONFIG_DIR="$S/placement" run placement placement-api --host 127.0.0.1 --port "$PLACEMENT_PORT"
run glance-api $PY -c "import sys; from glance.cmd.api import main; sys.argv[0] = 'glance-api'; main()" --config-file "$S/glance-api.conf"
wait_port rabbitmq "$RABBIT_PORT" 120
log "rabbitmq up after $(elapsed) s"
# Through nova-service.py: sqlite's "database is locked" reaches Nova as a deadlock, which it
# retries (as it does on MySQL) instead of failing a build or a delete on a busy machine.
for svc in api conductor scheduler compute; do
  run "nova-$svc" $PY "$here/nova-service.py" "$svc" --config-file "$S/nova.conf"
done
wait_http placement "http://127.0.0.1:$PLACEMENT_PORT/" 60
wait_http glance-api "http://127.0.0.1:$GLANCE_PORT/versions" 60
wait_http nova-api "http://127.0.0.1:$NOVA_PORT/" 120
log "nova-api up after $(elapsed) s"
$PY "$here/bootstrap.py" wait-compute 240 "${nova_manage[@]}" 2>>"$S/log/setup.log"
log "nova-compute up after $(elapsed) s"
if [[ $mode == cold ]]; then
  head -c 1048576 /dev/zero >"$S/pcg-image.raw"
  $PY "$here/bootstrap.py" content "$S/pcg-image.raw"
  touch "$S/initialised"
fi

rss=0
for f in "$S"/run/*.pid; do
  for p in $(pgrep -s "$(cat "$f")" 2>/dev/null); do
    r=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    rss=$((rss + ${r:-0}))
  done
done
cat >"$S/stack.env" <<EOT
STATE_DIR=$S
OPENRC=$S/openrc
CLOUDS_YAML=$S/clouds.yaml
STARTED=$mode
START_SECONDS=$(elapsed)
RSS_KIB=$rss
EOT
log "$mode start took $(elapsed) s; $((rss / 1024)) MiB RSS; credentials in $S/openrc and $S/clouds.yaml"
