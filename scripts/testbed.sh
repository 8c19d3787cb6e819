#!/usr/bin/env bash
# A multi-node ssegate cluster on one machine, without Docker: redis-server with AOF on, three
# ssegate nodes and HAProxy in front (deploy/haproxy.cfg), all on loopback.
#
#   scripts/testbed.sh start             start everything; prints the load balancer's URL
#   scripts/testbed.sh stop              stop everything
#   scripts/testbed.sh status            what runs
#   scripts/testbed.sh kill-node N       SIGKILL node N (1-3)
#   scripts/testbed.sh term-node N       SIGTERM node N and wait until it exited (drain)
#   scripts/testbed.sh start-node N      start node N again
#   scripts/testbed.sh kill-redis        SIGKILL redis-server
#   scripts/testbed.sh start-redis       start redis-server again (same data: AOF)
#
# Environment: TESTBED_DIR (state and logs, default /tmp/ssegate-testbed), TESTBED_PORT (first of
# five ports: load balancer, redis, nodes 1-3; default 7400), TESTBED_BIN (default
# target/release/ssegate, built if missing). Extra SSEGATE_* variables reach the nodes.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${TESTBED_DIR:-/tmp/ssegate-testbed}
BASE=${TESTBED_PORT:-7400}
LB_PORT=$BASE
REDIS_PORT=$((BASE + 1))
node_port() { echo $((BASE + 1 + $1)); }
BIN=${TESTBED_BIN:-target/release/ssegate}

die() { echo "testbed: $*" >&2; exit 1; }

pid_of() { [ -f "$DIR/$1.pid" ] && cat "$DIR/$1.pid" || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

wait_http() { # URL expected-status seconds
  local deadline=$((SECONDS + $3))
  while [ $SECONDS -lt $deadline ]; do
    [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" = "$2" ] && return 0
    sleep 0.05
  done
  return 1
}

start_redis() {
  mkdir -p "$DIR/redis"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR/redis" --save '' \
    --appendonly yes --appendfsync always --logfile "$DIR/redis.log" \
    --pidfile "$DIR/redis-server.pid" >/dev/null 2>&1 &
  echo $! > "$DIR/redis.pid"
  local deadline=$((SECONDS + 10))
  until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "redis-server did not start (see $DIR/redis.log)"
    sleep 0.05
  done
}

start_node() {
  local n=$1 port
  port=$(node_port "$n")
  SSEGATE_SHUTDOWN_TIMEOUT=${SSEGATE_SHUTDOWN_TIMEOUT:-5s} \
    "$BIN" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$REDIS_PORT/0" \
    >>"$DIR/node$n.log" 2>&1 &
  echo $! > "$DIR/node$n.pid"
  wait_http "http://127.0.0.1:$port/healthz" 200 20 || die "node $n did not start (see $DIR/node$n.log)"
}

start_lb() {
  SSEGATE_LB_BIND="127.0.0.1:$LB_PORT" \
  SSEGATE_NODE1="127.0.0.1:$(node_port 1)" \
  SSEGATE_NODE2="127.0.0.1:$(node_port 2)" \
  SSEGATE_NODE3="127.0.0.1:$(node_port 3)" \
    haproxy -f deploy/haproxy.cfg -p "$DIR/haproxy.pid" -D >"$DIR/haproxy.log" 2>&1 \
    || die "haproxy did not start (see $DIR/haproxy.log)"
  wait_http "http://127.0.0.1:$LB_PORT/readyz" 200 20 || die "no node is ready behind the load balancer"
}

stop_one() { # name signal
  local p
  p=$(pid_of "$1")
  [ -n "$p" ] || return 0
  kill "-$2" "$p" 2>/dev/null || true
  local deadline=$((SECONDS + 15))
  while kill -0 "$p" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { kill -KILL "$p" 2>/dev/null || true; }
    sleep 0.02
  done
  rm -f "$DIR/$1.pid"
}

check_node() { [[ "${1:-}" =~ ^[123]$ ]] || die "node number must be 1, 2 or 3"; }

case "${1:-}" in
  start)
    command -v redis-server >/dev/null || die "redis-server is not installed (apt-get install redis-server)"
    command -v haproxy >/dev/null || die "haproxy is not installed (apt-get install haproxy)"
    [ -x "$BIN" ] || cargo build --release --bin ssegate
    alive haproxy && die "already running in $DIR (scripts/testbed.sh stop)"
    mkdir -p "$DIR"
    start_redis
    for n in 1 2 3; do start_node "$n"; done
    start_lb
    echo "http://127.0.0.1:$LB_PORT"
    ;;
  stop)
    stop_one haproxy TERM
    for n in 1 2 3; do stop_one "node$n" TERM; done
    stop_one redis TERM
    ;;
  status)
    for name in haproxy redis node1 node2 node3; do
      if alive "$name"; then echo "$name up"; else echo "$name down"; fi
    done
    ;;
  kill-node) check_node "${2:-}"; stop_one "node$2" KILL ;;
  term-node) check_node "${2:-}"; stop_one "node$2" TERM ;;
  start-node) check_node "${2:-}"; alive "node$2" || start_node "$2" ;;
  kill-redis) stop_one redis KILL ;;
  start-redis) alive redis || start_redis ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
