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
