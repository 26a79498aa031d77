#!/usr/bin/env bash
# A local optagent cluster from local binaries: Redis, PostgreSQL and N `optagent worker` processes.
#
#   deploy/local-cluster.sh start [N]   start Redis, PostgreSQL (initdb into a fresh directory) and N workers
#   deploy/local-cluster.sh status      show what runs
#   deploy/local-cluster.sh stop        stop everything started here (by the pids in the pid file)
#
# State lives in $OPTAGENT_CLUSTER_DIR (default $TMPDIR/optagent-cluster). Passwords are generated and
# written only to $DIR/cluster.env (mode 600); `source` it to point optagent at the cluster.
set -euo pipefail

DIR="${OPTAGENT_CLUSTER_DIR:-${TMPDIR:-/tmp}/optagent-cluster}"
OPTAGENT="${OPTAGENT_BIN:-optagent}"
PYTHON="${OPTAGENT_PYTHON:-python3}"
QUEUE="${OPTAGENT_QUEUE:-optagent}"

die() { echo "local-cluster: $*" >&2; exit 1; }
free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
random_word() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' | head -c "$1"; }
pg_bin() {
  command -v "$1" 2>/dev/null && return
  for d in /usr/local/bin /usr/lib/postgresql/*/bin; do [ -x "$d/$1" ] && { echo "$d/$1"; return; }; done
  die "$1 not found; install PostgreSQL server binaries"
}
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }  # initdb refuses root

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not start; see the logs in $DIR"
    sleep 0.2
  done
}

start() {
  local n="${1:-2}"
  [[ "$n" =~ ^[1-9][0-9]*$ ]] || die "worker count must be a positive number, got '$n'"
  [ -e "$DIR/pids" ] && die "a cluster already runs in $DIR; run '$0 stop' first"
  command -v redis-server >/dev/null || die "redis-server not found; install Redis"
  command -v "$OPTAGENT" >/dev/null || die "$OPTAGENT not found; install optagent or set OPTAGENT_BIN"
  local initdb pg_ctl; initdb=$(pg_bin initdb); pg_ctl=$(pg_bin pg_ctl)
  mkdir -p "$DIR"; chmod 700 "$DIR"; : > "$DIR/pids"
  # PostgreSQL's directory must be reachable by the postgres user when we run as root.
  local pg="$DIR/pg"
  if [ "$(id -u)" = 0 ]; then pg=$(mktemp -d "${TMPDIR:-/tmp}/optagent-pg.XXXXXX"); chown postgres "$pg"; else mkdir -p "$pg"; fi
  echo "$pg" > "$DIR/pgdir"
  local redis_port pg_port password secret
  redis_port=$(free_port); pg_port=$(free_port); password=$(random_word 24); secret=$(random_word 32)

  # Redis: the password goes in a mode-600 config file, never on a command line (ps shows those).
  (umask 077; printf 'port %s\nbind 127.0.0.1\ndir %s\nappendonly yes\nsave ""\nrequirepass %s\n' \
    "$redis_port" "$DIR" "$password" > "$DIR/redis.conf")
  redis-server "$DIR/redis.conf" > "$DIR/redis.log" 2>&1 &
  echo "$! redis" >> "$DIR/pids"
  wait_for 15 "Redis" env REDISCLI_AUTH="$password" redis-cli -p "$redis_port" ping

  # PostgreSQL in a fresh data directory on a free port (trust auth on 127.0.0.1 only).
  (cd / && as_pg "$initdb" -D "$pg/data" -U postgres --auth=trust -E UTF8) > "$DIR/initdb.log" 2>&1 \
    || die "initdb failed; see $DIR/initdb.log"
  (cd / && as_pg "$pg_ctl" -D "$pg/data" -o "-p $pg_port -k $pg -c listen_addresses=127.0.0.1" \
    -l "$pg/postgres.log" -w start) > /dev/null || die "PostgreSQL did not start; see $pg/postgres.log"
  echo "$(head -1 "$pg/data/postmaster.pid") postgres" >> "$DIR/pids"
  local db=postgres
  if command -v psql > /dev/null && psql -h 127.0.0.1 -p "$pg_port" -U postgres -qc 'CREATE DATABASE optagent' \
      > /dev/null 2>&1; then db=optagent; fi

  (umask 077; cat > "$DIR/cluster.env" <<ENV
export OPTAGENT_BROKER_URL='redis://:$password@127.0.0.1:$redis_port/0'
export OPTAGENT_DB='postgresql+psycopg://postgres@127.0.0.1:$pg_port/$db'
export OPTAGENT_SECRET='$secret'
ENV
  )
  # Workers: each in its own session (process group), so stop can end it with its children.
  for i in $(seq 1 "$n"); do
    (set -a; . "$DIR/cluster.env"; exec setsid "$OPTAGENT" worker --queue "$QUEUE" --concurrency 1 \
      --hostname "local$i@%h") > "$DIR/worker$i.log" 2>&1 &
    echo "$! worker$i" >> "$DIR/pids"
  done
  for i in $(seq 1 "$n"); do wait_for 90 "worker $i" grep -q " ready." "$DIR/worker$i.log"; done

  echo "Redis:      redis://:***@127.0.0.1:$redis_port/0"
  echo "PostgreSQL: postgresql+psycopg://postgres@127.0.0.1:$pg_port/$db"
  echo "Workers:    $n on queue $QUEUE (logs in $DIR)"
  echo "Use it:     source $DIR/cluster.env && optagent search model.py --broker \"\$OPTAGENT_BROKER_URL\" --db \"\$OPTAGENT_DB\""
  echo "Stop it:    $0 stop"
}

alive() { kill -0 "$1" 2> /dev/null; }

stop() {
  [ -f "$DIR/pids" ] || { echo "no cluster runs in $DIR"; return 0; }
  local pid name pids=()
  while read -r pid name; do
    case "$name" in
      worker*) kill -TERM "$pid" 2> /dev/null || true ;;  # it stops its celery children (warm shutdown)
      postgres) (cd / && as_pg "$(pg_bin pg_ctl)" -D "$(cat "$DIR/pgdir")/data" -m fast stop) > /dev/null 2>&1 \
        || kill "$pid" 2> /dev/null || true ;;
      *) kill -TERM "$pid" 2> /dev/null || true ;;
    esac
    pids+=("$pid")
  done < "$DIR/pids"
  local deadline=$((SECONDS + 30))
  for pid in "${pids[@]}"; do
    while alive "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.2; done
    if alive "$pid"; then kill -KILL "$pid" 2> /dev/null || true; fi
  done
  while read -r pid name; do  # leftovers of each worker's process group, if any
    case "$name" in worker*) kill -KILL -- "-$pid" 2> /dev/null || true ;; esac
  done < "$DIR/pids"
  local pg; pg=$(cat "$DIR/pgdir" 2> /dev/null || true)
  [ -n "$pg" ] && [ "$pg" != "$DIR/pg" ] && rm -rf "$pg"  # a root run's separate PostgreSQL directory
  rm -f "$DIR/pids" "$DIR/cluster.env" "$DIR/redis.conf" "$DIR/pgdir"
  echo "stopped (logs kept in $DIR)"
}

status() {
  [ -f "$DIR/pids" ] || { echo "no cluster runs in $DIR"; return 0; }
  local pid name
  while read -r pid name; do
    if alive "$pid"; then echo "$name: running (pid $pid)"; else echo "$name: not running"; fi
  done < "$DIR/pids"
}

case "${1:-}" in
  start) shift; start "$@" ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start [N] | status | stop" >&2; exit 2 ;;
esac
