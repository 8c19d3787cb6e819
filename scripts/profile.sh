#!/usr/bin/env bash
# Profiles ssegate where the benchmarks say time goes, next to nchan, and prints what it finds:
#
#   - perf (software clock, call graphs) of one ssegate node while it takes single publishes and
#     while it fans out, turned into flamegraphs (inferno) and a kernel / user-space split;
#   - callgrind instruction counts per publish, for ssegate and for nchan's nginx worker, per
#     event in ssegate's arrays of 100, and per delivery on a node fanning out events published
#     on another: counts stay the same on a busy, noisy machine, so they compare builds and peers
#     where timings cannot.
#
#   scripts/profile.sh        writes target/profile/{publish,fanout}.svg and prints the figures
#
# Needs what scripts/bench.sh installs, plus linux-perf and valgrind (installed when missing) and
# inferno (cargo install, when missing).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v perf >/dev/null 2>&1 || missing+=(linux-perf)
command -v valgrind >/dev/null 2>&1 || missing+=(valgrind)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
[ -f /usr/lib/nginx/modules/ngx_nchan_module.so ] || missing+=(libnginx-mod-nchan)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v inferno-flamegraph >/dev/null 2>&1 || cargo install inferno --locked -q
cargo build --release --workspace --locked -q

OUT=target/profile
mkdir -p "$OUT"
DIR=$(mktemp -d)
BASE=${PROFILE_PORT:-7650}
REDIS_PORT=$BASE PORT=$((BASE + 1)) NCHAN_PORT=$((BASE + 2))
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT
ulimit -n 20000 2>/dev/null || true

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR" --save '' --appendonly no \
  --daemonize yes --logfile "$DIR/redis.log"
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done
wait_http() { for _ in $(seq 600); do curl -s -o /dev/null "http://127.0.0.1:$1/" && return; sleep 0.1; done; }
bench() { target/release/ssegate-bench "$@"; }
field() { python3 -c "import json,sys; print(json.loads(sys.argv[1])$2)" "$1"; }

# --- perf: where one node's CPU goes --------------------------------------------------------
RUST_LOG=warn target/release/ssegate --listen "127.0.0.1:$PORT" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$DIR/ssegate.log" 2>&1 &
node=$!
pids+=("$node")
wait_http "$PORT"
S="--url http://127.0.0.1:$PORT --target ssegate"
profile() { # name, then the bench arguments
  local name=$1
  shift
  perf record -q -e cpu-clock -F 999 -g -p "$node" -o "$DIR/$name.data" -- sleep 6 >/dev/null 2>&1 &
  local rec=$!
  sleep 0.5
  bench $S "$@" >"$DIR/$name.json"
  wait "$rec" || true
  perf script -i "$DIR/$name.data" 2>/dev/null | inferno-collapse-perf --all >"$DIR/$name.folded"
  inferno-flamegraph --title "ssegate: $name" <"$DIR/$name.folded" >"$OUT/$name.svg"
  python3 - "$name" "$DIR/$name.folded" <<'PY'
import sys
name, path = sys.argv[1], sys.argv[2]
total = kernel = writev = malloc = 0
for line in open(path):
    stack, _, n = line.rpartition(" ")
    n = int(n)
    total += n
    frames = stack.split(";")
    if frames[-1].endswith("_[k]"):
        kernel += n
    if any("writev" in f or "sendmsg" in f for f in frames):
        writev += n
    # mimalloc's functions (the binary's allocator), or glibc's (built without it).
    if any(f.startswith(("mi_", "_mi_")) or f in ("malloc", "_int_malloc", "_int_free", "cfree", "realloc", "malloc_consolidate") for f in frames[-2:]):
        malloc += n
pct = lambda x: f"{100 * x / max(total, 1):.0f}%"
print(f"{name}: kernel {pct(kernel)} of the node's CPU, socket writes {pct(writev)}, malloc/free {pct(malloc)}")
PY
}
profile publish publish --concurrency 32 --seconds 5
echo "  publish: $(field "$(cat "$DIR/publish.json")" '["events_per_sec"]') events/s under perf"
profile fanout fanout --subscribers 1000 --topics 10 --rate 1000 --seconds 5
echo "  fan-out: $(field "$(cat "$DIR/fanout.json")" '["deliveries_per_sec"]') deliveries/s under perf"
kill "$node"
wait "$node" 2>/dev/null || true

# --- callgrind: instructions per publish, ssegate and nchan; per batched event, ssegate -------
dumped_instructions() { # name: instructions in the newest callgrind dump (not the start-up part)
  local file
  file=$(ls -t "$DIR"/callgrind."$1".* | grep -v '\.0$' | head -n 1 || true)
  [ -n "$file" ] || file=$(ls -t "$DIR"/callgrind."$1".* | head -n 1)
  sed -n 's/^summary: *//p; s/^totals: *//p' "$file" | head -n 1 | awk '{print $1}'
}
count() { # name, port, pid of the process under callgrind, bench target, what, publish options
  local name=$1 port=$2 pid=$3 target=$4 what=$5
  shift 5
  wait_http "$port"
  bench --url "http://127.0.0.1:$port" --target "$target" publish --concurrency 4 "$@" --seconds 2 >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  local events
  events=$(bench --url "http://127.0.0.1:$port" --target "$target" publish --concurrency 4 "$@" --seconds 10)
  callgrind_control -d "$pid" >/dev/null 2>&1
  events=$(field "$events" '["events"]')
  echo "  $name: $events $what, $(($(dumped_instructions "$name") / events)) instructions each (user space)"
}
callgrind_node() { # name, port: an ssegate node under callgrind, in the background ($! is its pid)
  valgrind --tool=callgrind --callgrind-out-file="$DIR/callgrind.$1.%p" \
    target/release/ssegate --listen "127.0.0.1:$2" --redis-url "redis://127.0.0.1:$REDIS_PORT/0" \
    >"$DIR/callgrind-$1.log" 2>&1 &
  pids+=("$!")
}
callgrind_node ssegate "$PORT"
ssegate_pid=$!
echo "callgrind:"
count ssegate "$PORT" "$ssegate_pid" ssegate publishes
count ssegate "$PORT" "$ssegate_pid" ssegate "events in arrays of 100" --batch 100
sed -e "s/@NCHAN_PORT@/$NCHAN_PORT/" -e "s/@REDIS_PORT@/$REDIS_PORT/" \
  -e 's/^daemon on;/daemon off; master_process off;/' bench/nchan.conf >"$DIR/nchan.conf"
valgrind --tool=callgrind --callgrind-out-file="$DIR/callgrind.nchan.%p" \
  nginx -p "$DIR" -c "$DIR/nchan.conf" -g "pid $DIR/nginx.pid; error_log $DIR/nginx-error.log warn;" \
  >"$DIR/callgrind-nchan.log" 2>&1 &
pids+=("$!")
count nchan "$NCHAN_PORT" "$!" nchan publishes

# --- callgrind: instructions per delivery on the subscribers' node ----------------------------
# Node A takes the publishes; node B, under callgrind, fans them out to 100 subscribers (20
# events/s, so that callgrind keeps up). Counts what a delivery costs node B in user space.
B_PORT=$((BASE + 3)) A_PORT=$((BASE + 4))
RUST_LOG=warn target/release/ssegate --listen "127.0.0.1:$A_PORT" \
  --redis-url "redis://127.0.0.1:$REDIS_PORT/0" >"$DIR/node-a.log" 2>&1 &
pids+=("$!")
callgrind_node deliveries "$B_PORT"
b_pid=$!
wait_http "$A_PORT"
wait_http "$B_PORT"
across() { bench --url "http://127.0.0.1:$B_PORT" --target ssegate fanout --subscribers 100 --topics 1 \
  --rate 20 --seconds "$1" --publish-url "http://127.0.0.1:$A_PORT"; }
across 3 >/dev/null
callgrind_control -z "$b_pid" >/dev/null 2>&1
delivered=$(field "$(across 10)" '["delivered"]')
callgrind_control -d "$b_pid" >/dev/null 2>&1
echo "  deliveries (node B, events published on node A): $delivered, $(($(dumped_instructions deliveries) / delivered)) instructions each (user space)"
echo "flamegraphs: $OUT/publish.svg $OUT/fanout.svg"
