#!/usr/bin/env bash
# Benchmarks ssegate side by side with nchan (nginx + libnginx-mod-nchan on Redis storage) and
# against the Redis ceiling (redis-benchmark), in one run, with one load generator
# (ssegate-bench). Installs and starts its peers itself, then writes BENCHMARKS.md.
#
#   scripts/bench.sh            full run (several minutes), writes BENCHMARKS.md
#   scripts/bench.sh --smoke    seconds-long run proving the bench works; writes nothing
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
out=BENCHMARKS.md
[ $smoke -eq 1 ] && out=$(mktemp)

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-benchmark >/dev/null 2>&1 || missing+=(redis-tools)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo build --release --workspace --locked -q

DIR=$(mktemp -d)
BASE=${BENCH_PORT:-7600}
REDIS_PORT=$BASE SSEGATE_PORT=$((BASE + 1)) NCHAN_PORT=$((BASE + 2)) SSEGATE_B_PORT=$((BASE + 3))
NCHAN_B_PORT=$((BASE + 4))
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$DIR/nginx.pid" ] && kill "$(cat "$DIR/nginx.pid")" 2>/dev/null || true
  [ -f "$DIR/b/nginx.pid" ] && kill "$(cat "$DIR/b/nginx.pid")" 2>/dev/null || true
  [ -f "$DIR/tlsn/nginx.pid" ] && kill "$(cat "$DIR/tlsn/nginx.pid")" 2>/dev/null || true
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  pkill -f -- "--listen 127.0.0.1:$((BASE + 20))" 2>/dev/null || true
  for p in $(seq $((BASE + 10)) $((BASE + 15))); do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  rm -rf "$DIR"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR" --save '' --appendonly no \
  --daemonize yes --logfile "$DIR/redis.log"
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done

RUST_LOG=warn target/release/ssegate --listen "127.0.0.1:$SSEGATE_PORT" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$DIR/ssegate.log" 2>&1 &
SSEGATE_PID=$!
pids+=("$SSEGATE_PID")
# A second node on the same Redis, for publish -> receive across nodes.
RUST_LOG=warn target/release/ssegate --listen "127.0.0.1:$SSEGATE_B_PORT" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$DIR/ssegate-b.log" 2>&1 &
pids+=("$!")
# A node for the Mercure hub's scenarios: a key (private updates need one) and all history kept
# (the resume scenario puts a million updates between two ids).
MERCURE_PORT=$((BASE + 5))
MERCURE_KEY=$(head -c 32 /dev/urandom | base64 | tr -d '\n')
SSEGATE_AUTH__JWT_KEY=$MERCURE_KEY SSEGATE_RETENTION__MAX_EVENTS=0 RUST_LOG=warn \
  target/release/ssegate --listen "127.0.0.1:$MERCURE_PORT" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$DIR/ssegate-mercure.log" 2>&1 &
MERCURE_PID=$!
pids+=("$MERCURE_PID")
# Publishes anywhere; receives private updates of every https://example.com/t/<topic>.
MERCURE_TOKEN=$(SSEGATE_AUTH__JWT_KEY=$MERCURE_KEY target/release/ssegate token \
  --mercure-publish '*' --mercure-subscribe 'https://example.com/t/{id}' --ttl 6h)
for port in "$SSEGATE_PORT" "$SSEGATE_B_PORT" "$MERCURE_PORT"; do
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.05; done
done
sed -e "s/@NCHAN_PORT@/$NCHAN_PORT/" -e "s/@REDIS_PORT@/$REDIS_PORT/" bench/nchan.conf > "$DIR/nchan.conf"
nginx -p "$DIR" -c "$DIR/nchan.conf" -g "pid $DIR/nginx.pid; error_log $DIR/nginx-error.log warn;"
# A second nchan node on the same Redis, for publish -> receive across nodes.
mkdir -p "$DIR/b"
sed -e "s/@NCHAN_PORT@/$NCHAN_B_PORT/" -e "s/@REDIS_PORT@/$REDIS_PORT/" bench/nchan.conf > "$DIR/b/nchan.conf"
nginx -p "$DIR/b" -c "$DIR/b/nchan.conf" -g "pid $DIR/b/nginx.pid; error_log $DIR/b/nginx-error.log warn;"
for port in "$SSEGATE_PORT" "$SSEGATE_B_PORT" "$NCHAN_PORT" "$NCHAN_B_PORT"; do
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.05; done
done
NCHAN_PID=$(pgrep -P "$(cat "$DIR/nginx.pid")" | head -n 1)

# Waits until Redis, the ssegate nodes and the nginx workers are idle: under 10 % of a core all
# together over half a second, for at most 30 s. A hub still tidying up after a scenario (nchan
# takes seconds to drop 15,000 idle channels, with Redis busy too) would otherwise slow the next
# scenario, whichever hub that one measures: ssegate's per-user p99 went from 1.4 ms to 7 ms
# when it ran right after nchan's idle step.
REDIS_PID=$(redis-cli -p "$REDIS_PORT" info server | tr -d '\r' | sed -n 's/^process_id://p')
settle() {
  local procs="$REDIS_PID ${pids[*]} $(pgrep -P "$(cat "$DIR/nginx.pid")") $(pgrep -P "$(cat "$DIR/b/nginx.pid")")"
  local hz
  hz=$(getconf CLK_TCK)
  ticks() { local t=0 p; for p in $procs; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }
  local before after
  for _ in $(seq 60); do
    before=$(ticks)
    sleep 0.5
    after=$(ticks)
    [ $((after - before)) -le $((hz / 20)) ] && return 0
  done
  echo "warning: still busy after 30 s; measuring anyway" >&2
}
bench() { settle; target/release/ssegate-bench "$@"; }
# Before the scenarios with a topic per subscriber: waits until Redis has had `quiet_secs` (30)
# quiet seconds in a row (under 200 commands/s), for at most 120 s. After its subscribers leave,
# nchan tidies their channels in bursts: 215k commands in the 40 s after its 15,000 idle
# subscribers left (Redis at up to 56 % of a core), and after its per-user fan-out, quiet for
# 17 s, then 60k commands between 18 and 25 s. `settle` passes between such bursts.
settle_redis() {
  local quiet=0 before after
  for _ in $(seq 120); do
    before=$(redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | sed -n 's/^total_commands_processed://p')
    sleep 1
    after=$(redis-cli -p "$REDIS_PORT" info stats | tr -d '\r' | sed -n 's/^total_commands_processed://p')
    if [ $((after - before)) -lt 200 ]; then quiet=$((quiet + 1)); else quiet=0; fi
    [ $quiet -ge "$quiet_secs" ] && return 0
  done
  echo "warning: Redis still busy after 120 s; measuring anyway" >&2
}
S="--url http://127.0.0.1:$SSEGATE_PORT --target ssegate"
M="--url http://127.0.0.1:$MERCURE_PORT --target mercure --token $MERCURE_TOKEN"
B="--url http://127.0.0.1:$SSEGATE_B_PORT --target ssegate"
N="--url http://127.0.0.1:$NCHAN_PORT --target nchan"
NB="--url http://127.0.0.1:$NCHAN_B_PORT --target nchan"
if [ $smoke -eq 1 ]; then
  secs=1 subs=50 rate=50 trate=100 steps=100,200 storm=50 users=200 urate=100 hold=2 quiet_secs=2 wsecs=1
  tsteps=100,200
  lsubs=50 lsubs_small=10 lrate=20
  mconns=50 mper=4 mtopics=50 mrate=100
  msubs=20 mbystanders=100 mmrate=20 mbehind=1000
else
  # One topic: every event to every subscriber (1M deliveries/s offered). Ten topics: more
  # events, each to a tenth of the subscribers (500k/s offered).
  secs=10 subs=1000 rate=1000 trate=5000 steps=1000,5000,10000,15000 storm=10000 quiet_secs=30 wsecs=5
  # HTTPS idle streams: 50 connections of 100 streams at the last step over HTTP/2.
  tsteps=1000,3000,5000
  # One topic per user: 10,000 users, 1,000 events/s spread over them.
  users=10000 urate=1000 hold=10
  # Latency below saturation, across nodes: 1,000 subscribers x 100 events/s (100k deliveries/s)
  # and 100 x 100 (10k/s).
  lsubs=1000 lsubs_small=100 lrate=100
  # Several topics per connection: 1,000 connections x 10 topics over 1,000 topics.
  mconns=1000 mper=10 mtopics=1000 mrate=1000
  # Mercure selector matching: 1,000 subscribers with a template each, all matching, 100
  # updates/s (100k deliveries/s), then with 9,000 more whose templates match nothing. Resume:
  # from an id a million updates back.
  msubs=1000 mbystanders=9000 mmrate=100 mbehind=1000000
fi

echo "== publish" >&2
pub_s=$(bench $S publish --concurrency 32 --seconds $secs)
pub_n=$(bench $N publish --concurrency 32 --seconds $secs)
batch_s=$(bench $S publish --concurrency 8 --batch 100 --seconds $secs)
ceiling=$(redis-benchmark -p "$REDIS_PORT" -q -n $((secs * 200000)) -c 50 -P 32 xadd bench:ceiling '*' data xxxxxxxxxxxxxxxx \
  | tr '\r' '\n' | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -n 1)
echo "== publish to many topics" >&2
# "Tell these 100 users": arrays of 100 events, one for each of 100 topics, and one event to 100
# topics ({"topics": [...]}, counted in stream entries), both c=8 like the one-topic arrays; the
# Redis ceiling is pipelined XADD over 100 keys. nchan has no batches (its multiplexed publish
# takes at most 4 channels): the same events as single publishes over the 100 topics, c=32.
spread_s=$(bench $S publish --concurrency 8 --batch 100 --topics 100 --shape per-topic --seconds $secs)
many_s=$(bench $S publish --concurrency 8 --batch 100 --topics 100 --shape to-many --seconds $secs)
spread32_s=$(bench $S publish --concurrency 32 --batch 100 --topics 100 --shape per-topic --seconds $secs)
spread_n=$(bench $N publish --concurrency 32 --topics 100 --seconds $secs)
ceiling100=$(redis-benchmark -p "$REDIS_PORT" -q -n $((secs * 200000)) -r 100 -c 50 -P 32 xadd 'bench:ceiling:__rand_int__' '*' data xxxxxxxxxxxxxxxx \
  | tr '\r' '\n' | sed -n 's/.*: \([0-9.]*\) requests per second.*/\1/p' | tail -n 1)
echo "== single publish: wrk, 3 alternating pairs" >&2
# The single-publish target's own measure: wrk (a lighter load generator than ssegate-bench, so
# the hubs get more of the two cores), c=32, 64-byte events on one topic, three runs of each hub
# alternating on the same Redis; the median of each. Any answer other than 2xx fails the run.
cat >"$DIR/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = string.rep("x", 64)
wrk.headers["Content-Type"] = "text/plain"
LUA
# The same through the Mercure hub: a form with a topic IRI and the 64-byte data.
cat >"$DIR/form.lua" <<'LUA'
wrk.method = "POST"
wrk.body = "topic=https%3A%2F%2Fexample.com%2Ft%2Fwrk&data=" .. string.rep("x", 64)
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
LUA
wrk_rate() { # url [script]
  settle
  local out
  out=$(wrk -t2 -c32 -d"${wsecs}s" -s "${2:-$DIR/post.lua}" "$1")
  if echo "$out" | grep -q "Non-2xx"; then
    echo "wrk got errors from $1:" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "$out" | awk '/^Requests\/sec:/ { print $2 }'
}
wrk_s="" wrk_n=""
for _ in 1 2 3; do
  wrk_s="$wrk_s $(wrk_rate "http://127.0.0.1:$SSEGATE_PORT/v1/events?topic=wrk")"
  wrk_n="$wrk_n $(wrk_rate "http://127.0.0.1:$NCHAN_PORT/pub/wrk")"
done
echo "== fan-out" >&2
fan_s=$(bench $S fanout --subscribers $subs --topics 1 --rate $rate --seconds $secs)
fan_n=$(bench $N fanout --subscribers $subs --topics 1 --rate $rate --seconds $secs)
fant_s=$(bench $S fanout --subscribers $subs --topics 10 --rate $trate --seconds $secs)
fant_n=$(bench $N fanout --subscribers $subs --topics 10 --rate $trate --seconds $secs)
echo "== across nodes" >&2
# Subscribers on node B, events published to node A.
cross=$(bench $B fanout --subscribers $subs --topics 1 --rate $rate --seconds $secs \
  --publish-url "http://127.0.0.1:$SSEGATE_PORT")
cross_t=$(bench $B fanout --subscribers $subs --topics 10 --rate $rate --seconds $secs \
  --publish-url "http://127.0.0.1:$SSEGATE_PORT")
echo "== latency below saturation, across nodes" >&2
# Subscribers on node B, events published to node A, for both hubs.
lat_s=$(bench $B fanout --subscribers $lsubs --topics 1 --rate $lrate --seconds $secs \
  --publish-url "http://127.0.0.1:$SSEGATE_PORT")
lat_n=$(bench $NB fanout --subscribers $lsubs --topics 1 --rate $lrate --seconds $secs \
  --publish-url "http://127.0.0.1:$NCHAN_PORT")
latl_s=$(bench $B fanout --subscribers $lsubs_small --topics 1 --rate $lrate --seconds $secs \
  --publish-url "http://127.0.0.1:$SSEGATE_PORT")
latl_n=$(bench $NB fanout --subscribers $lsubs_small --topics 1 --rate $lrate --seconds $secs \
  --publish-url "http://127.0.0.1:$NCHAN_PORT")
echo "== idle connections" >&2
idle_s=$(bench $S idle --steps $steps --pid "$SSEGATE_PID")
idle_n=$(bench $N idle --steps $steps --pid "$NCHAN_PID")
echo "== one topic per user" >&2
# Each connection on a topic of its own; the Redis commands while all sit idle are counted (both
# hubs share the Redis, so each figure includes the other's background, e.g. ssegate's health
# PINGs, one a second per node).
maxstep=${steps##*,}
R="redis://127.0.0.1:$REDIS_PORT/0"
idleu_s=$(bench $S idle --steps $steps --pid "$SSEGATE_PID" --topics "$maxstep" --redis-url "$R" --hold $hold)
# The same through the Mercure hub, on the same node right after (so on the same footing: both
# reuse what the node freed before).
idlem=$(bench --url "http://127.0.0.1:$SSEGATE_PORT" --target mercure idle --steps $steps \
  --pid "$SSEGATE_PID" --topics "$maxstep")
idleu_n=$(bench $N idle --steps $steps --pid "$NCHAN_PID" --topics "$maxstep" --redis-url "$R" --hold $hold)
settle_redis
fanu_s=$(bench $S fanout --subscribers $users --topics $users --rate $urate --seconds $secs)
settle_redis
fanu_n=$(bench $N fanout --subscribers $users --topics $users --rate $urate --seconds $secs)
echo "== several topics per connection" >&2
settle_redis
fanm_s=$(bench $S fanout --subscribers $mconns --topics $mtopics --per-connection $mper --rate $mrate --seconds $secs)
settle_redis
fanm_n=$(bench $N fanout --subscribers $mconns --topics $mtopics --per-connection $mper --rate $mrate --seconds $secs)
echo "== Mercure" >&2
# Form publishes against /v1 publishes on the same node (node A, no key), alternating.
mwrk_v1="" mwrk_m=""
for _ in 1 2 3; do
  mwrk_v1="$mwrk_v1 $(wrk_rate "http://127.0.0.1:$SSEGATE_PORT/v1/events?topic=wrk")"
  mwrk_m="$mwrk_m $(wrk_rate "http://127.0.0.1:$SSEGATE_PORT/.well-known/mercure" "$DIR/form.lua")"
done
# And on the Mercure node while it is fresh (it has served nothing yet), with a token whose
# template allows private updates: what a new node grows by.
idlemf=$(bench $M idle --steps $steps --pid "$MERCURE_PID" --topics "$maxstep")
# A private topic each, the token holding a template, against the native topic-per-user run.
settle_redis
fanum=$(bench $M --private fanout --subscribers $users --topics $users --rate $urate --seconds $secs)
# Selector matching: the node's CPU per update, without and with subscribers matching nothing.
match0=$(bench $M fanout --subscribers $msubs --topics 1 --rate $mmrate --seconds $secs \
  --selector 'https://example.com/t/{id}{?u%s}' --pid "$MERCURE_PID")
match9=$(bench $M fanout --subscribers $msubs --topics 1 --rate $mmrate --seconds $secs \
  --selector 'https://example.com/t/{id}{?u%s}' --bystanders $mbystanders --pid "$MERCURE_PID")
mresume=$(bench $M resume --behind $mbehind --replay 10 --rounds 3 --redis-url "$R")
echo "== reconnect storm" >&2
storm_s=$(bench $S storm --clients $storm --behind 100 --redis-url "redis://127.0.0.1:$REDIS_PORT/0")

echo "== presence: fresh nodes with and without it" >&2
# Two fresh nodes, presence off and on (its default), each alone while measured: idle
# connections with a topic each (memory, and the Redis commands of everything while idle), then a
# reconnect storm. The other gateway nodes have served their scenarios and stop first, so the idle
# Redis figure is what one node holding the clients costs, plus nchan's idle nodes.
for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
fresh_node() { # port, then VAR=value settings; prints the pid
  local port=$1
  shift
  env "$@" RUST_LOG=warn target/release/ssegate --listen "127.0.0.1:$port" \
    --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$DIR/ssegate-$port.log" 2>&1 &
  local pid=$!
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.05; done
  echo "$pid"
}
POFF_PORT=$((BASE + 6)) PON_PORT=$((BASE + 7))
settle_redis
POFF_PID=$(fresh_node "$POFF_PORT" SSEGATE_PRESENCE__ENABLED=false)
pids+=("$POFF_PID")
idle_poff=$(bench --url "http://127.0.0.1:$POFF_PORT" --target ssegate idle --steps $steps \
  --pid "$POFF_PID" --topics "$maxstep" --redis-url "$R" --hold $hold)
storm_poff=$(bench --url "http://127.0.0.1:$POFF_PORT" --target ssegate storm --clients $storm --behind 100 --redis-url "$R")
kill "$POFF_PID"
settle_redis
PON_PID=$(fresh_node "$PON_PORT")
pids+=("$PON_PID")
idle_pon=$(bench --url "http://127.0.0.1:$PON_PORT" --target ssegate idle --steps $steps \
  --pid "$PON_PID" --topics "$maxstep" --redis-url "$R" --hold $hold)
storm_pon=$(bench --url "http://127.0.0.1:$PON_PORT" --target ssegate storm --clients $storm --behind 100 --redis-url "$R")
# The registry saw the storm's clients come and go: nothing of theirs is left in it (the node
# writes its batches every 100 ms; 5 s allowed).
for _ in $(seq 100); do
  presence_left=$(redis-cli -p "$REDIS_PORT" --scan --pattern 'ssegate:{storm*}:presence' | wc -l)
  [ "$presence_left" -eq 0 ] && break
  sleep 0.05
done
kill "$PON_PID"

echo "== Redis Cluster: publish on 1 vs 3 masters" >&2
# A cluster of `masters` masters, each with one replica, made by hand (redis-cli --cluster create
# wants 3 masters at least), and one ssegate node on it; publishes over many topics (spread over
# the slots) with min_replicas_ack 0 and 1. Prints one JSON line per run, with the masters' CPU
# (INFO cpu, user + sys) per event.
CLUSTER_BASE=$((BASE + 10)) CLUSTER_SSEGATE_PORT=$((BASE + 20))
cluster_cpu() { # total CPU seconds of the ports given
  local port total=0 t
  for port in "$@"; do
    t=$(redis-cli -p "$port" info cpu | tr -d '\r' | awk -F: '/^used_cpu_(user|sys):/ { s += $2 } END { print s }')
    total=$(python3 -c "print($total + $t)")
  done
  echo "$total"
}
cluster_run() { # masters
  local masters=$1 n port ports=() master_ports=() seeds="" per ack
  for n in $(seq $((masters * 2))); do
    port=$((CLUSTER_BASE + n - 1))
    ports+=("$port")
    mkdir -p "$DIR/cluster$n"
    redis-server --port "$port" --bind 127.0.0.1 --dir "$DIR/cluster$n" --save '' --appendonly no \
      --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
      --daemonize yes --logfile "$DIR/cluster$n.log"
    until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
    seeds="$seeds${seeds:+,}redis://127.0.0.1:$port/0"
  done
  per=$((16384 / masters))
  for n in $(seq "$masters"); do
    port=${ports[$((n - 1))]}
    master_ports+=("$port")
    local last=$((n * per - 1))
    [ "$n" -eq "$masters" ] && last=16383
    redis-cli -p "$port" cluster addslotsrange $(((n - 1) * per)) "$last" >/dev/null
  done
  for port in "${ports[@]:1}"; do redis-cli -p "$port" cluster meet 127.0.0.1 "${ports[0]}" >/dev/null; done
  for n in $(seq "$masters"); do # node masters+n replicates master n
    local id replica=${ports[$((masters + n - 1))]}
    id=$(redis-cli -p "${ports[$((n - 1))]}" cluster myid)
    until redis-cli -p "$replica" cluster nodes | grep -q "^$id"; do sleep 0.05; done
    redis-cli -p "$replica" cluster replicate "$id" >/dev/null
  done
  for port in "${ports[@]}"; do
    until redis-cli -p "$port" cluster info | grep -q 'cluster_state:ok' \
      && { redis-cli -p "$port" role | head -1 | grep -q master \
        || redis-cli -p "$port" info replication | grep -q 'master_link_status:up'; }; do
      sleep 0.05
    done
  done
  for ack in 0 1; do
    SSEGATE_REDIS__MIN_REPLICAS_ACK=$ack RUST_LOG=warn target/release/ssegate \
      --listen "127.0.0.1:$CLUSTER_SSEGATE_PORT" --redis-url "$seeds" >>"$DIR/ssegate-cluster.log" 2>&1 &
    local pid=$!
    for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$CLUSTER_SSEGATE_PORT/readyz" && break; sleep 0.05; done
    local C="--url http://127.0.0.1:$CLUSTER_SSEGATE_PORT --target ssegate" kind args before after result
    local kinds="single batched"
    [ "$ack" = 0 ] && kinds="single batched per-topic to-many"
    for kind in $kinds; do
      case $kind in
        single) args="--concurrency 32 --topics 256" ;;
        batched) args="--concurrency 8 --batch 100 --topics 256" ;;
        *) args="--concurrency 8 --batch 100 --topics 100 --shape $kind" ;;
      esac
      before=$(cluster_cpu "${master_ports[@]}")
      # shellcheck disable=SC2086
      result=$(bench $C publish $args --seconds $secs)
      after=$(cluster_cpu "${master_ports[@]}")
      python3 -c "import json,sys; r=json.loads(sys.argv[1]); r.update(masters=int(sys.argv[2]), min_replicas_ack=int(sys.argv[3]), kind=sys.argv[4], redis_cpu_us_per_event=(float(sys.argv[6])-float(sys.argv[5]))*1e6/max(r['events'],1)); print(json.dumps(r))" \
        "$result" "$masters" "$ack" "$kind" "$before" "$after"
    done
    kill "$pid"
    wait "$pid" 2>/dev/null || true
  done
  for port in "${ports[@]}"; do redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true; done
}
cluster_1=$(cluster_run 1)
cluster_3=$(cluster_run 3)

echo "== HTTPS and HTTP/2" >&2
# Both hubs serving TLS themselves with the same certificate (ECDSA P-256, from a CA made here
# that the load generator trusts): ssegate's listener, and nginx+nchan with `ssl http2` on the
# same locations. Each measurement gets fresh hubs, so memory freed by an earlier one does not
# flatten the next one's slope. The ssegate node is on the bench's Redis, nchan too.
TLS_DIR="$DIR/tls" TLS_S_PORT=$((BASE + 8)) TLS_N_PORT=$((BASE + 9))
mkdir -p "$TLS_DIR"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=ssegate bench CA" \
  -keyout "$TLS_DIR/ca.key" -out "$TLS_DIR/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=127.0.0.1" \
  -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/req.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$TLS_DIR/ext"
openssl x509 -req -in "$TLS_DIR/req.csr" -CA "$TLS_DIR/ca.pem" -CAkey "$TLS_DIR/ca.key" -CAcreateserial \
  -days 2 -extfile "$TLS_DIR/ext" -out "$TLS_DIR/cert.pem" 2>/dev/null
TS="--url https://127.0.0.1:$TLS_S_PORT --target ssegate --ca $TLS_DIR/ca.pem"
TN="--url https://127.0.0.1:$TLS_N_PORT --target nchan --ca $TLS_DIR/ca.pem"
TLS_PID=""
tls_up() { # starts both hubs afresh; sets TLS_PID (ssegate) and TLS_NCHAN_PID (nchan's worker)
  tls_down
  SSEGATE_TLS__CERT="$TLS_DIR/cert.pem" SSEGATE_TLS__KEY="$TLS_DIR/key.pem" RUST_LOG=warn \
    target/release/ssegate --listen "127.0.0.1:$TLS_S_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT/0" \
    >>"$DIR/ssegate-tls.log" 2>&1 &
  TLS_PID=$!
  pids+=("$TLS_PID")
  mkdir -p "$DIR/tlsn"
  sed -e "s|listen 127.0.0.1:@NCHAN_PORT@;|listen 127.0.0.1:$TLS_N_PORT ssl http2; ssl_certificate $TLS_DIR/cert.pem; ssl_certificate_key $TLS_DIR/key.pem;|" \
    -e "s/@REDIS_PORT@/$REDIS_PORT/" bench/nchan.conf >"$DIR/tlsn/nchan.conf"
  nginx -p "$DIR/tlsn" -c "$DIR/tlsn/nchan.conf" -g "pid $DIR/tlsn/nginx.pid; error_log $DIR/tlsn/nginx-error.log warn;"
  for port in "$TLS_S_PORT" "$TLS_N_PORT"; do
    for _ in $(seq 200); do curl -s -o /dev/null --cacert "$TLS_DIR/ca.pem" "https://127.0.0.1:$port/" && break; sleep 0.05; done
  done
  TLS_NCHAN_PID=$(pgrep -P "$(cat "$DIR/tlsn/nginx.pid")" | head -n 1)
}
tls_down() {
  if [ -n "$TLS_PID" ]; then kill "$TLS_PID" 2>/dev/null || true; wait "$TLS_PID" 2>/dev/null || true; fi
  if [ -f "$DIR/tlsn/nginx.pid" ]; then
    local master
    master=$(cat "$DIR/tlsn/nginx.pid")
    kill "$master" 2>/dev/null || true
    while kill -0 "$master" 2>/dev/null; do sleep 0.05; done
  fi
}
tmax=${tsteps##*,}
# Idle streams: over HTTP/2, 100 on each connection, on one shared topic and on a topic each;
# then one stream per connection, over HTTP/1.1 and over HTTP/2.
tls_idle() { # the idle scenario's options; prints ssegate's JSON line, then nchan's (hubs from tls_up)
  bench $TS "$@" --pid "$TLS_PID"
  bench $TN "$@" --pid "$TLS_NCHAN_PID"
}
tls_up
# shellcheck disable=SC2086
tls_h2=$(tls_idle idle --steps $tsteps --streams-per-connection 100)
tls_up
# shellcheck disable=SC2086
tls_h2u=$(tls_idle idle --steps $tsteps --streams-per-connection 100 --topics "$tmax")
tls_up
# shellcheck disable=SC2086
tls_h1=$(tls_idle --http1 idle --steps $tsteps)
tls_up
# shellcheck disable=SC2086
tls_h2c=$(tls_idle idle --steps $tsteps --streams-per-connection 1)
# Clients resuming at once, a TLS connection and handshake each (ALPN: HTTP/2).
tls_up
tls_storm_s=$(bench $TS storm --clients $storm --behind 100)
tls_storm_n=$(bench $TN storm --clients $storm --behind 100)
# Single publishes over HTTPS, wrk c=32 (HTTP/1.1 over TLS), 3 alternating pairs.
tls_wrk_s="" tls_wrk_n=""
for _ in 1 2 3; do
  tls_wrk_s="$tls_wrk_s $(wrk_rate "https://127.0.0.1:$TLS_S_PORT/v1/events?topic=wrk")"
  tls_wrk_n="$tls_wrk_n $(wrk_rate "https://127.0.0.1:$TLS_N_PORT/pub/wrk")"
done
tls_down

field() { python3 -c "import json,sys; v=json.loads(sys.argv[1]); print(round(v$2, 2) if isinstance(v$2, float) else v$2)" "$1"; }
# One comparison row: label, ssegate's JSON, nchan's JSON, the field compared.
row() {
  local a b
  a=$(field "$2" "[\"$4\"]")
  b=$(field "$3" "[\"$4\"]")
  echo "| $1 | $a | $b | $(ratio "$a" "$b") |"
}
ratio() { python3 -c "import sys; a,b=float(sys.argv[1]),float(sys.argv[2]); print(f'{a/b:.2f}' if b else 'n/a')" "$1" "$2"; }

{
  echo "# Benchmarks"
  echo
  echo "Written by \`scripts/bench.sh\` on $(date -u +%Y-%m-%d). One machine: $(nproc) cores,"
  echo "$(free -g | awk '/Mem:/ {print $2}') GiB, $(sed -n 's/model name\t: //p' /proc/cpuinfo | head -n 1)."
  echo "Everything on loopback: Redis $(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/'), ssegate (one node; a second"
  echo "one for the runs across nodes), nginx $(nginx -v 2>&1 | sed 's/.*\///') with nchan and one worker, all on that Redis,"
  echo "and the load generator (\`ssegate-bench\`) sharing the same cores."
  echo "Command: \`scripts/bench.sh\` (ports from \`BENCH_PORT\`, default 7600)."
  echo
  echo "| scenario | ssegate | nchan | ssegate / nchan |"
  echo "|---|---|---|---|"
  row "single-event publish, c=32 (events/s)" "$pub_s" "$pub_n" events_per_sec
  row "fan-out, $subs subscribers on 1 topic, $rate events/s (deliveries/s)" "$fan_s" "$fan_n" deliveries_per_sec
  row "fan-out, 1 topic: p99 latency (ms)" "$fan_s" "$fan_n" latency_p99_ms
  row "fan-out, $subs subscribers over 10 topics, $trate events/s (deliveries/s)" "$fant_s" "$fant_n" deliveries_per_sec
  row "fan-out, 10 topics: p99 latency (ms)" "$fant_s" "$fant_n" latency_p99_ms
  row "idle connection (RSS bytes each, slope)" "$idle_s" "$idle_n" bytes_per_connection
  row "idle connection, one topic each (RSS bytes each, slope)" "$idleu_s" "$idleu_n" bytes_per_connection
  row "one topic each, idle: Redis commands/s" "$idleu_s" "$idleu_n" idle_redis_commands_per_second
  row "fan-out, $users subscribers on a topic each, $urate events/s (deliveries/s)" "$fanu_s" "$fanu_n" deliveries_per_sec
  row "fan-out, a topic each: p99 latency (ms)" "$fanu_s" "$fanu_n" latency_p99_ms
  row "$mconns connections x $mper topics each, $mrate events/s over $mtopics topics (deliveries/s)" "$fanm_s" "$fanm_n" deliveries_per_sec
  row "several topics per connection: p99 latency (ms)" "$fanm_s" "$fanm_n" latency_p99_ms
  for l in "$lat_s $lat_n" "$latl_s $latl_n"; do
    set -- $l
    d=$(( $(field "$1" '["subscribers"]') * $(field "$1" '["rate"]' | cut -d. -f1) ))
    row "across nodes, $d deliveries/s (below saturation): p50 (ms)" "$1" "$2" latency_p50_ms
    row "across nodes, $d deliveries/s: p99 (ms)" "$1" "$2" latency_p99_ms
    row "across nodes, $d deliveries/s: p999 (ms)" "$1" "$2" latency_p999_ms
  done
  echo
  a=$(field "$batch_s" '["events_per_sec"]')
  python3 - "$wrk_s" "$wrk_n" "$wsecs" <<'PY'
import statistics, sys
s, n = ([float(x) for x in a.split()] for a in sys.argv[1:3])
print(f"Single-event publish with wrk (c=32, one topic, 3 alternating pairs of {sys.argv[3]} s): "
      f"ssegate {' / '.join(f'{x:.0f}' for x in s)}, median {statistics.median(s):.0f}/s; nchan "
      f"{' / '.join(f'{x:.0f}' for x in n)}, median {statistics.median(n):.0f}/s; ratio "
      f"{statistics.median(s) / statistics.median(n):.2f}.")
PY
  echo
  echo "Batched publish (JSON arrays of 100, c=8): $a events/s; pipelined \`redis-benchmark\` XADD"
  echo "(-P 32, c=50) on the same Redis: $ceiling/s; ratio $(ratio "$a" "$ceiling")."
  echo
  echo "## Publishing to many topics"
  echo
  echo "\"Tell these 100 users\": each request carries 100 events, one for each of 100 topics (an array),"
  echo "or one event to 100 topics (\`{\"topics\": [...]}\`, counted in stream entries); c=8 unless said."
  echo "The Redis ceiling is pipelined \`redis-benchmark\` XADD (-P 32, c=50) over 100 keys on the same"
  echo "Redis. nchan takes the same events as single publishes over the 100 topics (c=32)."
  echo
  python3 - "$spread_s" "$many_s" "$spread32_s" "$spread_n" "$batch_s" "$ceiling100" "$ceiling" <<'PY'
import json, sys
spread, many, spread32, nchan, batch = (json.loads(a) for a in sys.argv[1:6])
ceiling100, ceiling = float(sys.argv[6] or 0), float(sys.argv[7] or 0)
print("| publish | events/s | request p50 / p99 (ms) | / pipelined XADD |")
print("|---|---|---|---|")
for label, r, c in (("array of 100, one per topic", spread, ceiling100),
                    ("one event to 100 topics", many, ceiling100),
                    ("array of 100, one per topic, c=32", spread32, ceiling100),
                    ("array of 100 on one topic (as above)", batch, ceiling),
                    ("nchan: single publishes over 100 topics, c=32", nchan, ceiling100)):
    print(f"| {label} | {r['events_per_sec']:.0f} | {r['request_p50_ms']:.2f} / {r['request_p99_ms']:.2f} | "
          f"{r['events_per_sec'] / c if c else 0:.2f}x |")
print()
print(f"Pipelined XADD: {ceiling100:.0f}/s over 100 keys, {ceiling:.0f}/s on one key.")
PY
  echo
  for c in "$cross" "$cross_t"; do
    echo "Across nodes, $(field "$c" '["subscribers"]') subscribers on node B over $(field "$c" '["topics"]') topic(s),"
    echo "$(field "$c" '["rate"]') events/s published to node A: $(field "$c" '["deliveries_per_sec"]') deliveries/s"
    echo "($(field "$c" '["delivered"]') of $(field "$c" '["expected_deliveries"]')), latency p50 $(field "$c" '["latency_p50_ms"]') ms,"
    echo "p99 $(field "$c" '["latency_p99_ms"]') ms, p999 $(field "$c" '["latency_p999_ms"]') ms."
    echo
  done
  echo "Reconnect storm: $(field "$storm_s" '["clients"]') clients resuming 100 events behind, all at once:"
  echo "$(field "$storm_s" '["caught_up"]') caught up in $(field "$storm_s" '["seconds_until_all_caught_up"]') s;"
  echo "Redis commands issued: $(field "$storm_s" '["redis_commands"]["total"]')."
  echo
  echo "## Redis Cluster: publish on 1 vs 3 masters"
  echo
  echo "One ssegate node on a Redis Cluster of 1 or 3 masters, each with one replica, on the same"
  echo "two cores; publishes spread over 256 topics (single events c=32; arrays of 100 on one topic c=8);"
  echo "per-topic and to-many: arrays of 100 with one event per topic, and one event to 100 topics, over"
  echo "100 topics (on 3 masters a third on each), c=8, min_replicas_ack 0."
  echo "Redis CPU is the masters' \`used_cpu_user + used_cpu_sys\` per event published."
  echo
  echo "| masters | min_replicas_ack | publish | events/s | request p50 / p99 (ms) | masters' CPU per event (µs) |"
  echo "|---|---|---|---|---|---|"
  python3 - "$cluster_1" "$cluster_3" <<'PY'
import json, sys
for block in sys.argv[1:]:
    for line in block.splitlines():
        r = json.loads(line)
        print(f"| {r['masters']} | {r['min_replicas_ack']} | {r['kind']} | {r['events_per_sec']:.0f} | "
              f"{r['request_p50_ms']:.2f} / {r['request_p99_ms']:.2f} | {r['redis_cpu_us_per_event']:.1f} |")
PY
  echo
  cat bench/CLUSTER.md
  echo
  echo "## Targets"
  echo
  python3 - "$pub_s" "$pub_n" "$batch_s" "$ceiling" "$fan_s" "$fan_n" "$fant_s" "$fant_n" "$idle_s" "$storm_s" "$cross" "$idleu_s" "$lat_s" "$lat_n" "$wrk_s" "$wrk_n" "$spread_s" "$many_s" "$ceiling100" "$cluster_1" "$cluster_3" <<'PY'
import json, statistics, sys
pub_s, pub_n, batch_s = (json.loads(a) for a in sys.argv[1:4])
ceiling = float(sys.argv[4] or 0)
fan_s, fan_n, fant_s, fant_n, idle_s, storm_s, cross, idleu_s, lat_s, lat_n = (json.loads(a) for a in sys.argv[5:15])
def row(name, figure, ok):
    print(f"| {name} | {figure} | {'met' if ok else 'not met'} |")
print("| target | measured | outcome |")
print("|---|---|---|")
r = pub_s["events_per_sec"] / max(pub_n["events_per_sec"], 1)
row("single-event publish >= 2x nchan", f"{r:.2f}x", r >= 2)
ws, wn = (statistics.median(float(x) for x in a.split()) for a in sys.argv[15:17])
r = ws / max(wn, 1)
row("single-event publish >= 2x nchan (wrk, median of 3 alternating pairs)", f"{r:.2f}x", r >= 2)
r = batch_s["events_per_sec"] / ceiling if ceiling else 0
row("batched publish >= 0.5x pipelined XADD", f"{r:.2f}x", r >= 0.5)
spread, many, ceiling100 = json.loads(sys.argv[17]), json.loads(sys.argv[18]), float(sys.argv[19] or 0)
r = spread["events_per_sec"] / ceiling100 if ceiling100 else 0
row("array of 100 events, one per topic, one Redis >= 0.5x pipelined XADD", f"{r:.2f}x", r >= 0.5)
r = many["events_per_sec"] / ceiling100 if ceiling100 else 0
row("one event to 100 topics >= 0.5x pipelined XADD (stream entries/s)", f"{r:.2f}x", r >= 0.5)
cl = {(r["masters"], r["kind"]): r for b in sys.argv[20:22] for r in map(json.loads, b.splitlines()) if r["min_replicas_ack"] == 0}
for kind in ("per-topic", "to-many"):
    one, three = cl[(1, kind)]["events_per_sec"], cl[(3, kind)]["events_per_sec"]
    row(f"{kind} over 100 topics on 3 masters >= 1 master", f"{three:.0f} vs {one:.0f}/s ({three / one:.2f}x)", three >= one)
for label, s, n in (("1 topic", fan_s, fan_n), ("10 topics", fant_s, fant_n)):
    r = s["deliveries_per_sec"] / max(n["deliveries_per_sec"], 1)
    ok = r >= 1.5 and s["latency_p99_ms"] <= n["latency_p99_ms"]
    row(f"fan-out ({label}) >= 1.5x nchan at p99 <= nchan's",
        f"{r:.2f}x, p99 {s['latency_p99_ms']:.1f} ms vs {n['latency_p99_ms']:.1f} ms", ok)
b = idle_s["bytes_per_connection"]
row("idle connection, shared topic <= 4 KiB RSS", f"{b / 1024:.1f} KiB", b <= 4 * 1024)
b = idleu_s["bytes_per_connection"]
row("idle connection, one topic each <= 6 KiB RSS", f"{b / 1024:.1f} KiB", b <= 6 * 1024)
c = idleu_s["idle_redis_commands_per_second"]
n = idleu_s["points"][-1]["connections"]
row(f"{n} idle topics cost <= 10 Redis commands/s", f"{c:.1f}/s", c is not None and c <= 10)
t = storm_s["seconds_until_all_caught_up"]
ok = t <= 3 and storm_s["caught_up"] == storm_s["clients"]
row(f"reconnect storm ({storm_s['clients']} clients) caught up <= 3 s", f"{t:.2f} s, {storm_s['redis_commands']['total'] if storm_s['redis_commands'] else '?'} Redis commands", ok)
d = lat_s["subscribers"] * lat_s["rate"]
p, q = lat_s["latency_p99_ms"], lat_n["latency_p99_ms"]
row(f"publish->receive p99 <= 5 ms and <= nchan's, {d:.0f} deliveries/s across nodes (below saturation)",
    f"p99 {p:.2f} ms vs nchan {q:.2f} ms", p <= 5 and p <= q)
p99 = cross["latency_p99_ms"]
row(f"publish->receive p99 <= 5 ms, {cross['rate']:.0f} events/s to {cross['subscribers']} subscribers on another node",
    f"p99 {p99:.1f} ms ({cross['deliveries_per_sec']:.0f} deliveries/s)", p99 <= 5)
PY
  echo
  echo "## HTTPS and HTTP/2"
  echo
  echo "Both hubs serving TLS themselves in the same run: an ssegate node and nginx+nchan (\`ssl http2\`,"
  echo "one worker), both on the bench's Redis, with the same ECDSA P-256 certificate; fresh hubs for"
  echo "each idle measurement and for the storm. Over HTTP/2 the load generator puts 100 streams on a"
  echo "connection, or one; wrk speaks HTTP/1.1 over TLS."
  echo
  python3 - "$tls_h2" "$tls_h2u" "$tls_h1" "$tls_h2c" "$tls_storm_s" "$tls_storm_n" "$tls_wrk_s" "$tls_wrk_n" <<'PY'
import json, statistics, sys
h2, h2u, h1, h2c = ([json.loads(l) for l in a.splitlines()] for a in sys.argv[1:5])
storm_s, storm_n = json.loads(sys.argv[5]), json.loads(sys.argv[6])
ws, wn = ([float(x) for x in a.split()] for a in sys.argv[7:9])
print("| over TLS | ssegate | nchan | ssegate / nchan |")
print("|---|---|---|---|")
def row(label, a, b, fmt="{:.0f}"):
    print(f"| {label} | {fmt.format(a)} | {fmt.format(b)} | {a / b if b else 0:.2f} |")
n = h2[0]["points"][-1]["connections"]
row(f"idle stream, HTTP/2, 100 a connection, shared topic, {n} streams (RSS bytes each)", h2[0]["bytes_per_connection"], h2[1]["bytes_per_connection"])
row(f"idle stream, HTTP/2, 100 a connection, a topic each (RSS bytes each)", h2u[0]["bytes_per_connection"], h2u[1]["bytes_per_connection"])
row(f"idle connection, HTTP/1.1, a stream each (RSS bytes each)", h1[0]["bytes_per_connection"], h1[1]["bytes_per_connection"])
row(f"idle connection, HTTP/2, a stream each (RSS bytes each)", h2c[0]["bytes_per_connection"], h2c[1]["bytes_per_connection"])
row(f"{storm_s['clients']} clients resuming 100 behind at once (s until all caught up)",
    storm_s["seconds_until_all_caught_up"], storm_n["seconds_until_all_caught_up"], "{:.2f}")
row("single publish, wrk c=32 (median of 3 alternating pairs, events/s)", statistics.median(ws), statistics.median(wn))
print()
print(f"Storm: ssegate {storm_s['caught_up']} of {storm_s['clients']} caught up ({storm_s['received_exactly_behind']} with exactly 100), "
      f"nchan {storm_n['caught_up']} ({storm_n['received_exactly_behind']} with exactly 100). "
      f"wrk over HTTPS: ssegate {' / '.join(f'{x:.0f}' for x in ws)}/s, nchan {' / '.join(f'{x:.0f}' for x in wn)}/s.")
print()
def target(name, figure, ok):
    print(f"| {name} | {figure} | {'met' if ok else 'not met'} |")
print("| target | measured | outcome |")
print("|---|---|---|")
b = h2[0]["bytes_per_connection"]
target("idle stream over HTTPS/HTTP/2, 100 a connection, shared topic <= 4 KiB", f"{b / 1024:.1f} KiB", b <= 4096)
b = h2u[0]["bytes_per_connection"]
target("idle stream over HTTPS/HTTP/2, 100 a connection, a topic each <= 6 KiB", f"{b / 1024:.1f} KiB", b <= 6144)
for label, r in (("HTTP/1.1", h1), ("HTTP/2", h2c)):
    a, b = r[0]["bytes_per_connection"], r[1]["bytes_per_connection"]
    target(f"idle connection over HTTPS, {label}, a stream each <= nchan's", f"{a / 1024:.1f} KiB vs {b / 1024:.1f} KiB", a <= b)
a, b = storm_s["seconds_until_all_caught_up"], storm_n["seconds_until_all_caught_up"]
ok = a <= b and storm_s["received_exactly_behind"] == storm_s["clients"]
target(f"{storm_s['clients']} clients resuming at once over HTTPS <= nchan's time", f"{a:.2f} s vs {b:.2f} s", ok)
r = statistics.median(ws) / max(statistics.median(wn), 1)
target("single publish over HTTPS, wrk c=32 >= 1.5x nchan", f"{r:.2f}x", r >= 1.5)
PY
  echo
  echo "## Presence"
  echo
  echo "Two fresh nodes in the same run, one with \`presence.enabled = false\`, one with presence on"
  echo "(its defaults: a heartbeat every 5 s, writes batched every 100 ms), each the only ssegate node"
  echo "while measured (nchan's two idle nodes stay up on the same Redis)."
  echo
  python3 - "$idle_poff" "$idle_pon" "$storm_poff" "$storm_pon" "$presence_left" <<'PY'
import json, sys
idle_off, idle_on, storm_off, storm_on = (json.loads(a) for a in sys.argv[1:5])
left = int(sys.argv[5])
def row(name, figure, target, ok):
    print(f"| {name} | {figure} | {target} | {'met' if ok else 'not met'} |")
print("| metric | measured | target | outcome |")
print("|---|---|---|---|")
t_off, t_on = storm_off["seconds_until_all_caught_up"], storm_on["seconds_until_all_caught_up"]
r = t_on / max(t_off, 1e-9)
ok = r <= 1.5 and storm_on["caught_up"] == storm_on["clients"]
row(f"reconnect storm, {storm_on['clients']} clients 100 events behind: all caught up",
    f"{t_on:.2f} s vs {t_off:.2f} s without presence: {r:.2f}x", "<= 1.5x", ok)
n = idle_on["points"][-1]["connections"]
c = idle_on["idle_redis_commands_per_second"]
c_off = idle_off["idle_redis_commands_per_second"]
row(f"{n} idle present clients (a topic each): Redis commands/s, everything on the Redis",
    f"{c:.1f}/s ({c - c_off:+.1f}/s against {c_off:.1f}/s without presence)",
    "<= 10/s", c is not None and c <= 10)
d = idle_on["bytes_per_connection"] - idle_off["bytes_per_connection"]
row("idle memory per present connection (RSS slope)",
    f"{idle_on['bytes_per_connection']:.0f} B vs {idle_off['bytes_per_connection']:.0f} B: {d:+.0f} B",
    "<= +512 B", d <= 512)
print()
print(f"Storm Redis commands: {storm_on['redis_commands']['total'] if storm_on['redis_commands'] else '?'} with presence, "
      f"{storm_off['redis_commands']['total'] if storm_off['redis_commands'] else '?'} without. "
      f"Presence hashes of the storm's topic left after its clients went: {left}.")
PY
  echo
  echo "## Mercure"
  echo
  echo "The Mercure hub (\`/.well-known/mercure\`) in the same run: form publishes and idle subscribers"
  echo "on node A beside their \`/v1\` counterparts; the other scenarios on a node of their own with a"
  echo "key (private updates need one) and all history kept, against the native figures above."
  echo
  python3 - "$mwrk_v1" "$mwrk_m" "$idlem" "$idleu_s" "$fanum" "$fanu_s" "$match0" "$match9" "$mresume" "$idlemf" <<'PY'
import json, statistics, sys
v1, m = (statistics.median(float(x) for x in a.split()) for a in sys.argv[1:3])
idlem, idleu, fanum, fanu, match0, match9, resume, idlemf = (json.loads(a) for a in sys.argv[3:11])
def row(name, figure, target, ok):
    print(f"| {name} | {figure} | {target} | {'met' if ok else 'not met'} |")
print("| metric | measured | target | outcome |")
print("|---|---|---|---|")
r = m / max(v1, 1)
row("form publish, single update, wrk c=32 (median of 3 alternating pairs)",
    f"{m:.0f}/s vs /v1 {v1:.0f}/s: {r:.2f}x", ">= 0.8x /v1", r >= 0.8)
d = idlem["bytes_per_connection"] - idleu["bytes_per_connection"]
row(f"idle subscriber, one exact topic each ({idlem['points'][-1]['connections']} connections)",
    f"{idlem['bytes_per_connection'] / 1024:.2f} KiB vs native {idleu['bytes_per_connection'] / 1024:.2f} KiB",
    "<= native + 1 KiB", d <= 1024)
r = fanum["latency_p99_ms"] / max(fanu["latency_p99_ms"], 1e-9)
row(f"{fanum['subscribers']} subscribers on a private topic each, {fanum['rate']:.0f} updates/s: p99",
    f"{fanum['latency_p99_ms']:.2f} ms vs native {fanu['latency_p99_ms']:.2f} ms: {r:.2f}x",
    "<= 1.5x native", r <= 1.5)
c0, c9 = match0["hub_cpu_us_per_event"], match9["hub_cpu_us_per_event"]
r = c9 / max(c0, 1e-9)
row(f"selector matching: node CPU per update, {match9['bystanders']} non-matching template subscribers join {match0['subscribers']} matching",
    f"{c0:.0f} -> {c9:.0f} us: {r:.2f}x", "<= 1.5x", r <= 1.5)
r = resume["far_over_near"]
row(f"resume from an id {resume['behind']} updates back vs 10 back, {resume['replay']} replayed",
    f"{resume['far_ms']:.1f} ms vs {resume['near_ms']:.1f} ms: {r:.1f}x", "<= 2x", r <= 2)
print()
print(f"Form publishes: {' / '.join(sys.argv[2].split())}/s; /v1 on the same node: {' / '.join(sys.argv[1].split())}/s.")
print(f"Idle Mercure subscribers with a topic each on a fresh node, each with a token holding a template: "
      f"{idlemf['bytes_per_connection'] / 1024:.2f} KiB each.")
print(f"Private topic each: p50 {fanum['latency_p50_ms']:.2f} ms (native {fanu['latency_p50_ms']:.2f} ms), "
      f"{fanum['delivered']} of {fanum['expected_deliveries']} delivered. Matching: p99 "
      f"{match0['latency_p99_ms']:.1f} ms without and {match9['latency_p99_ms']:.1f} ms with the non-matching subscribers.")
PY
  echo
  cat bench/FINDINGS.md
  # The last recorded soak (scripts/soak.sh --record), which runs for an hour on its own.
  if [ -f bench/SOAK.md ]; then echo; cat bench/SOAK.md; fi
  echo
  echo "## Raw results"
  echo
  echo '```'
  for r in "$pub_s" "$pub_n" "$batch_s" "$spread_s" "$many_s" "$spread32_s" "$spread_n" "$fan_s" "$fan_n" "$fant_s" "$fant_n" "$cross" "$cross_t" "$idle_s" "$idle_n" "$idleu_s" "$idleu_n" "$fanu_s" "$fanu_n" "$fanm_s" "$fanm_n" "$lat_s" "$lat_n" "$latl_s" "$latl_n" "$storm_s" "$cluster_1" "$cluster_3" "$idlem" "$idlemf" "$fanum" "$match0" "$match9" "$mresume" "$idle_poff" "$idle_pon" "$storm_poff" "$storm_pon" "$tls_h2" "$tls_h2u" "$tls_h1" "$tls_h2c" "$tls_storm_s" "$tls_storm_n"; do echo "$r"; done
  echo '```'
} > "$out"
if [ $smoke -eq 1 ]; then
  cat "$out"
  rm -f "$out"
  # Every scenario must have done real work, on both hubs.
  python3 - "$pub_s" "$pub_n" "$batch_s" "$fan_s" "$fan_n" "$fant_s" "$fant_n" "$storm_s" "$cross" "$idleu_s" "$fanu_s" "$fanu_n" "$fanm_s" "$fanm_n" "$lat_s" "$lat_n" "$wrk_s" "$wrk_n" "$cluster_1" "$cluster_3" "$spread_s" "$many_s" "$spread32_s" "$spread_n" <<'PY'
import json, sys
pub_s, pub_n, batch_s, fan_s, fan_n, fant_s, fant_n, storm_s, cross, idleu_s, fanu_s, fanu_n, fanm_s, fanm_n, lat_s, lat_n = map(json.loads, sys.argv[1:17])
wrk_s, wrk_n = ([float(x) for x in a.split()] for a in sys.argv[17:19])
checks = {
    "wrk publishes to ssegate, 3 runs": len(wrk_s) == 3 and min(wrk_s) > 0,
    "wrk publishes to nchan, 3 runs": len(wrk_n) == 3 and min(wrk_n) > 0,
    "ssegate publishes": pub_s["events"] > 0 and pub_s["errors"] == 0,
    "nchan publishes": pub_n["events"] > 0 and pub_n["errors"] == 0,
    "ssegate batches": batch_s["events"] > 0 and batch_s["errors"] == 0,
    **{f"ssegate {r['shape']} publishes, c={r['concurrency']}": r["events"] > 0 and r["errors"] == 0
       for r in map(json.loads, sys.argv[21:24])},
    "nchan publishes over 100 topics": json.loads(sys.argv[24])["events"] > 0,
    "ssegate fans out every event": fan_s["delivered"] == fan_s["expected_deliveries"] > 0,
    "nchan fans out": fan_n["delivered"] > 0,
    "ssegate fans out over topics": fant_s["delivered"] == fant_s["expected_deliveries"] > 0,
    "nchan fans out over topics": fant_n["delivered"] > 0,
    "every storm client caught up exactly": storm_s["received_exactly_behind"] == storm_s["clients"],
    "ssegate fans out across nodes": cross["delivered"] == cross["expected_deliveries"] > 0,
    "ssegate holds a topic per connection": idleu_s["points"][-1]["connections"] > 0,
    "idle Redis commands are counted": idleu_s["idle_redis_commands_per_second"] is not None,
    "ssegate fans out to a topic each": fanu_s["delivered"] == fanu_s["expected_deliveries"] > 0,
    "nchan fans out to a topic each": fanu_n["delivered"] > 0,
    "ssegate delivers every event on multi-topic connections": fanm_s["delivered"] == fanm_s["expected_deliveries"] > 0,
    "nchan delivers on multiplexed channels": fanm_n["delivered"] > 0,
    "ssegate delivers across nodes below saturation": lat_s["delivered"] == lat_s["expected_deliveries"] > 0,
    "nchan delivers across its two nodes": lat_n["delivered"] > 0,
}
for block in sys.argv[19:21]:
    for line in block.splitlines():
        r = json.loads(line)
        checks[f"cluster {r['masters']} masters, ack {r['min_replicas_ack']}, {r['kind']} publishes"] = r["events"] > 0 and r["errors"] == 0
failed = [k for k, ok in checks.items() if not ok]
if failed:
    sys.exit("bench smoke run failed: " + ", ".join(failed))
PY
  python3 - "$mwrk_v1" "$mwrk_m" "$idlem" "$fanum" "$match0" "$match9" "$mresume" <<'PY'
import json, sys
v1, m = ([float(x) for x in a.split()] for a in sys.argv[1:3])
idlem, fanum, match0, match9, resume = map(json.loads, sys.argv[3:8])
checks = {
    "wrk form publishes to the Mercure hub, 3 runs": len(m) == 3 and min(m) > 0,
    "wrk /v1 publishes beside them, 3 runs": len(v1) == 3 and min(v1) > 0,
    "Mercure idle subscribers held": idlem["points"][-1]["connections"] > 0,
    "Mercure private topic each, every update delivered": fanum["delivered"] == fanum["expected_deliveries"] > 0,
    "Mercure template subscribers, every update delivered": match0["delivered"] == match0["expected_deliveries"] > 0,
    "Mercure with bystanders, every update delivered": match9["delivered"] == match9["expected_deliveries"] > 0 and match9["bystanders"] > 0,
    "Mercure CPU per update measured": match0["hub_cpu_us_per_event"] is not None,
    "Mercure resumes replay exactly": resume["replayed_exactly"],
}
failed = [k for k, ok in checks.items() if not ok]
if failed:
    sys.exit("bench smoke run failed: " + ", ".join(failed))
PY
  python3 - "$idle_poff" "$idle_pon" "$storm_poff" "$storm_pon" "$presence_left" <<'PY'
import json, sys
idle_off, idle_on, storm_off, storm_on = map(json.loads, sys.argv[1:5])
checks = {
    "presence off: every storm client caught up exactly": storm_off["received_exactly_behind"] == storm_off["clients"],
    "presence on: every storm client caught up exactly": storm_on["received_exactly_behind"] == storm_on["clients"],
    "presence on: idle clients held": idle_on["points"][-1]["connections"] > 0,
    "presence on: idle Redis commands counted": idle_on["idle_redis_commands_per_second"] is not None,
    "presence: the storm's entries went with its clients": int(sys.argv[5]) == 0,
}
failed = [k for k, ok in checks.items() if not ok]
if failed:
    sys.exit("bench smoke run failed: " + ", ".join(failed))
PY
  python3 - "$tls_h2" "$tls_h2u" "$tls_h1" "$tls_h2c" "$tls_storm_s" "$tls_storm_n" "$tls_wrk_s" "$tls_wrk_n" <<'PY'
import json, sys
idles = [[json.loads(l) for l in a.splitlines()] for a in sys.argv[1:5]]
storm_s, storm_n = json.loads(sys.argv[5]), json.loads(sys.argv[6])
ws, wn = ([float(x) for x in a.split()] for a in sys.argv[7:9])
want = idles[0][0]["points"][-1]["connections"]
checks = {
    **{f"HTTPS idle ({i}): both hubs held every stream": len(r) == 2 and all(h["points"][-1]["connections"] == want > 0 for h in r)
       for i, r in enumerate(idles)},
    "HTTPS storm: every ssegate client caught up exactly": storm_s["received_exactly_behind"] == storm_s["clients"],
    "HTTPS storm: nchan's clients caught up": storm_n["caught_up"] > 0,
    "wrk publishes over HTTPS to both hubs, 3 runs each": len(ws) == len(wn) == 3 and min(ws + wn) > 0,
}
failed = [k for k, ok in checks.items() if not ok]
if failed:
    sys.exit("bench smoke run failed: " + ", ".join(failed))
PY
  echo "bench smoke run: ok"
else
  echo "wrote $out"
fi
