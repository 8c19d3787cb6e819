#!/usr/bin/env bash
# A multi-node ssegate cluster on one machine, without Docker: redis-server with AOF on, three
# ssegate nodes and HAProxy in front (deploy/haproxy.cfg), all on loopback.
#
#   scripts/testbed.sh start [--cluster] [--tls]
#                                        start everything; prints the load balancer's URL. With
#                                        --cluster: a Redis Cluster of 3 masters + 3 replicas
#                                        instead of one Redis (nodes get the seed list). With
#                                        --tls: the nodes serve HTTPS and HTTP/2 from a test
#                                        certificate ($TESTBED_DIR/tls, its CA in ca.pem) and
#                                        HAProxy passes TLS through (deploy/haproxy-tls.cfg)
#   scripts/testbed.sh stop              stop everything
#   scripts/testbed.sh status            what runs
#   scripts/testbed.sh kill-node N       SIGKILL node N (1-3)
#   scripts/testbed.sh term-node N       SIGTERM node N and wait until it exited (drain)
#   scripts/testbed.sh start-node N      start node N again
#   scripts/testbed.sh kill-redis        SIGKILL redis-server
#   scripts/testbed.sh start-redis       start redis-server again (same data: AOF)
#   scripts/testbed.sh kill-master       (cluster) SIGKILL a master, at random; its replica takes over
#   scripts/testbed.sh start-redis-nodes (cluster) start every stopped cluster node (they rejoin as
#                                        replicas)
#   scripts/testbed.sh reshard           (cluster) move every slot of one master to another
#
# Environment: TESTBED_DIR (state and logs, default /tmp/ssegate-testbed), TESTBED_PORT (first of
# five ports: load balancer, redis, nodes 1-3, and with --cluster six more for the cluster's
# nodes; default 7400), TESTBED_BIN (default
# target/release/ssegate, built if missing). Extra SSEGATE_* variables reach the nodes.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=${TESTBED_DIR:-/tmp/ssegate-testbed}
BASE=${TESTBED_PORT:-7400}
LB_PORT=$BASE
REDIS_PORT=$((BASE + 1))
node_port() { echo $((BASE + 1 + $1)); }
redis_node_port() { echo $((BASE + 4 + $1)); }
REDIS_NODES="1 2 3 4 5 6"
cluster_mode() { [ -f "$DIR/cluster" ]; }
tls_mode() { [ -f "$DIR/tls/tls.crt" ]; }
scheme() { if tls_mode; then echo https; else echo http; fi; }
redis_url() {
  if cluster_mode; then
    local urls="" n
    for n in $REDIS_NODES; do urls="$urls${urls:+,}redis://127.0.0.1:$(redis_node_port "$n")/0"; done
    echo "$urls"
  else
    echo "redis://127.0.0.1:$REDIS_PORT/0"
  fi
}
BIN=${TESTBED_BIN:-target/release/ssegate}

die() { echo "testbed: $*" >&2; exit 1; }

pid_of() { [ -f "$DIR/$1.pid" ] && cat "$DIR/$1.pid" || true; }
alive() { local p; p=$(pid_of "$1"); [ -n "$p" ] && kill -0 "$p" 2>/dev/null; }

wait_http() { # URL expected-status seconds
  local deadline=$((SECONDS + $3))
  while [ $SECONDS -lt $deadline ]; do
    [ "$(curl -sk -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)" = "$2" ] && return 0
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

start_redis_node() {
  local n=$1 port
  port=$(redis_node_port "$n")
  mkdir -p "$DIR/redis$n"
  redis-server --port "$port" --bind 127.0.0.1 --dir "$DIR/redis$n" --save '' \
    --appendonly yes --appendfsync always --logfile "$DIR/redis$n.log" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 1000 \
    --cluster-replica-validity-factor 0 >/dev/null 2>&1 &
  echo $! > "$DIR/redis$n.pid"
  local deadline=$((SECONDS + 10))
  until redis-cli -p "$port" ping >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || die "cluster node $n did not start (see $DIR/redis$n.log)"
    sleep 0.05
  done
}

cluster_ok() { # every running node: state ok, all slots served; every replica linked
  local n port
  for n in $REDIS_NODES; do
    alive "redis$n" || continue
    port=$(redis_node_port "$n")
    redis-cli -p "$port" cluster info 2>/dev/null | grep -q 'cluster_state:ok' || return 1
    redis-cli -p "$port" cluster info 2>/dev/null | grep -q 'cluster_slots_ok:16384' || return 1
    if redis-cli -p "$port" role 2>/dev/null | head -1 | grep -q slave; then
      redis-cli -p "$port" info replication 2>/dev/null | grep -q 'master_link_status:up' || return 1
    fi
  done
}

wait_cluster() {
  local deadline=$((SECONDS + 30))
  until cluster_ok; do
    [ $SECONDS -lt $deadline ] || die "the cluster did not become ok"
    sleep 0.1
  done
}

start_cluster() {
  local n addresses=""
  for n in $REDIS_NODES; do
    start_redis_node "$n"
    addresses="$addresses 127.0.0.1:$(redis_node_port "$n")"
  done
  # shellcheck disable=SC2086
  redis-cli --cluster create $addresses --cluster-replicas 1 --cluster-yes >"$DIR/cluster-create.log" 2>&1 \
    || die "cluster create failed (see $DIR/cluster-create.log)"
  touch "$DIR/cluster"
  wait_cluster
}

masters() { # running masters' node numbers
  local n
  for n in $REDIS_NODES; do
    alive "redis$n" || continue
    if redis-cli -p "$(redis_node_port "$n")" role 2>/dev/null | head -1 | grep -q master; then echo "$n"; fi
  done
  return 0
}

make_certificate() { # a test CA and a certificate for 127.0.0.1 and localhost signed by it
  local d="$DIR/tls"
  mkdir -p "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$d/ca.key" -out "$d/ca.pem" -subj "/CN=ssegate test bed CA" 2>/dev/null
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$d/tls.key" -out "$d/tls.csr" -subj "/CN=localhost" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$d/leaf.ext"
  openssl x509 -req -in "$d/tls.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -days 2 \
    -extfile "$d/leaf.ext" -out "$d/tls.crt" 2>/dev/null
}

start_node() {
  local n=$1 port
  port=$(node_port "$n")
  local tls=()
  tls_mode && tls=(env "SSEGATE_TLS__CERT=$DIR/tls/tls.crt" "SSEGATE_TLS__KEY=$DIR/tls/tls.key")
  SSEGATE_SHUTDOWN_TIMEOUT=${SSEGATE_SHUTDOWN_TIMEOUT:-5s} \
    "${tls[@]}" "$BIN" --listen "127.0.0.1:$port" --redis-url "$(redis_url)" \
    >>"$DIR/node$n.log" 2>&1 &
  echo $! > "$DIR/node$n.pid"
  wait_http "$(scheme)://127.0.0.1:$port/healthz" 200 20 || die "node $n did not start (see $DIR/node$n.log)"
}

start_lb() {
  SSEGATE_LB_BIND="127.0.0.1:$LB_PORT" \
  SSEGATE_NODE1="127.0.0.1:$(node_port 1)" \
  SSEGATE_NODE2="127.0.0.1:$(node_port 2)" \
  SSEGATE_NODE3="127.0.0.1:$(node_port 3)" \
    haproxy -f "$(if tls_mode; then echo deploy/haproxy-tls.cfg; else echo deploy/haproxy.cfg; fi)" \
      -p "$DIR/haproxy.pid" -D >"$DIR/haproxy.log" 2>&1 \
    || die "haproxy did not start (see $DIR/haproxy.log)"
  wait_http "$(scheme)://127.0.0.1:$LB_PORT/readyz" 200 20 || die "no node is ready behind the load balancer"
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
    rm -rf "$DIR/cluster" "$DIR/tls"
    cluster=false
    for flag in "${@:2}"; do
      case "$flag" in
        --cluster) cluster=true ;;
        --tls) make_certificate ;;
        *) die "unknown flag $flag" ;;
      esac
    done
    if $cluster; then start_cluster; else start_redis; fi
    for n in 1 2 3; do start_node "$n"; done
    start_lb
    echo "$(scheme)://127.0.0.1:$LB_PORT"
    ;;
  stop)
    stop_one haproxy TERM
    for n in 1 2 3; do stop_one "node$n" TERM; done
    stop_one redis TERM
    for n in $REDIS_NODES; do stop_one "redis$n" TERM; done
    ;;
  status)
    for name in haproxy redis redis1 redis2 redis3 redis4 redis5 redis6 node1 node2 node3; do
      if alive "$name"; then echo "$name up"; else echo "$name down"; fi
    done
    ;;
  kill-node) check_node "${2:-}"; stop_one "node$2" KILL ;;
  term-node) check_node "${2:-}"; stop_one "node$2" TERM ;;
  start-node) check_node "${2:-}"; alive "node$2" || start_node "$2" ;;
  kill-redis) stop_one redis KILL ;;
  start-redis) alive redis || start_redis ;;
  kill-master)
    cluster_mode || die "not a cluster test bed"
    victim=$(masters | shuf -n 1)
    [ -n "$victim" ] || die "no master runs"
    stop_one "redis$victim" KILL
    echo "$victim"
    ;;
  start-redis-nodes)
    cluster_mode || die "not a cluster test bed"
    for n in $REDIS_NODES; do alive "redis$n" || start_redis_node "$n"; done
    wait_cluster
    ;;
  reshard)
    cluster_mode || die "not a cluster test bed"
    wait_cluster
    mapfile -t pair < <(masters | shuf -n 2)
    [ "${#pair[@]}" -eq 2 ] || die "fewer than two masters"
    from=${pair[0]} to=${pair[1]}
    from_port=$(redis_node_port "$from")
    from_id=$(redis-cli -p "$from_port" cluster myid)
    to_id=$(redis-cli -p "$(redis_node_port "$to")" cluster myid)
    slots=$(redis-cli -p "$from_port" cluster nodes | awk -v id="$from_id" '$1 == id { n = 0; for (i = 9; i <= NF; i++) { split($i, r, "-"); n += (r[2] == "" ? 1 : r[2] - r[1] + 1) } print n }')
    redis-cli --cluster reshard "127.0.0.1:$from_port" --cluster-from "$from_id" --cluster-to "$to_id" \
      --cluster-slots "$slots" --cluster-yes >"$DIR/reshard.log" 2>&1 || die "reshard failed (see $DIR/reshard.log)"
    wait_cluster
    echo "$slots slots from node $from to node $to"
    ;;
  *) sed -n '2,25p' "$0"; exit 2 ;;
esac
