#!/usr/bin/env bash
# The churn soak: two ssegate nodes on one Redis (retention.idle_ttl on), clients and topics coming
# and going, publishers through both nodes (single events, arrays, one event to many topics, direct
# XADDs), with idle checkpoints. Fails when something grew with uptime instead of with load: a
# node's idle RSS beyond max(8 MiB, 10 %) of the first checkpoint's, or its fds, streams,
# connections, topics or presence entries, or Redis's clients, channels or keys above the first
# checkpoint's, or Redis's used_memory beyond 10 % over it.
#
#   scripts/soak.sh [--seconds N] [--checkpoint-every N] [--connections N] [--topics N]
#                   [--rate N] [--seed N] [--record] [--heap-stats]
#                         defaults: 3600 s, a checkpoint every 300 s, 1,500 connections,
#                         3,000 topics a generation, 300 events/s. scripts/test.sh runs a short
#                         form. Each checkpoint prints a JSON line; the last line is the verdict.
#                         --record writes the checkpoint table to bench/SOAK.md, which
#                         BENCHMARKS.md includes. --heap-stats runs the diagnostic build,
#                         which counts each node's heap bytes in use (ssegate_heap_bytes), and
#                         records them next to RSS: memory the node holds, told from memory its
#                         allocator keeps.
#
# Environment: SOAK_PORT (first of three loopback ports: Redis and the two nodes; default 7700),
# SOAK_IDLE_TTL (retention.idle_ttl, default 5s; checkpoints wait three times as long, so that
# abandoned topics and their tombstones are gone).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=3600 every=300 connections=1500 topics=3000 rate=300 seed="" record=0 heap_stats=0
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds=${2:?}; shift 2 ;;
    --checkpoint-every) every=${2:?}; shift 2 ;;
    --connections) connections=${2:?}; shift 2 ;;
    --topics) topics=${2:?}; shift 2 ;;
    --rate) rate=${2:?}; shift 2 ;;
    --seed) seed=${2:?}; shift 2 ;;
    --record) record=1; shift ;;
    --heap-stats) heap_stats=1; shift ;;
    *) sed -n '2,21p' "$0" >&2; exit 2 ;;
  esac
done
command -v redis-server >/dev/null 2>&1 || {
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
}
cargo build --release --workspace --locked -q
node=target/release/ssegate
if [ $heap_stats -eq 1 ]; then
  # Its own target directory: target/release/ssegate stays the binary users run.
  CARGO_TARGET_DIR=target/heap-stats cargo build --release --locked -q --bin ssegate --features heap-stats
  node=target/heap-stats/release/ssegate
fi

ttl_s=${SOAK_IDLE_TTL:-5}
ttl_s=${ttl_s%s}
DIR=$(mktemp -d)
BASE=${SOAK_PORT:-7700}
REDIS_PORT=$BASE A_PORT=$((BASE + 1)) B_PORT=$((BASE + 2))
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$DIR"
}
trap cleanup EXIT

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$DIR" --save '' --appendonly no \
  --daemonize yes --logfile "$DIR/redis.log"
until redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; do sleep 0.05; done
for port in "$A_PORT" "$B_PORT"; do
  SSEGATE_RETENTION__IDLE_TTL="${ttl_s}s" SSEGATE_IDEMPOTENCY_WINDOW="${ttl_s}s" RUST_LOG=warn \
    "$node" --listen "127.0.0.1:$port" --redis-url "redis://127.0.0.1:$REDIS_PORT/0" \
    >"$DIR/node-$port.log" 2>&1 &
  pids+=("$!")
done
for port in "$A_PORT" "$B_PORT"; do
  for _ in $(seq 200); do curl -s -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.05; done
done
args=(soak --nodes "http://127.0.0.1:$A_PORT,http://127.0.0.1:$B_PORT" --pids "${pids[0]},${pids[1]}"
  --redis-url "redis://127.0.0.1:$REDIS_PORT/0" --seconds "$seconds" --checkpoint-every "$every"
  --connections "$connections" --topics "$topics" --rate "$rate" --quiet $((ttl_s * 3))
  --generation $((ttl_s * 4)))
[ -n "$seed" ] && args+=(--seed "$seed")
status=0
target/release/ssegate-bench "${args[@]}" | tee "$DIR/soak.jsonl" || status=$?
for p in "${pids[@]}"; do
  kill -0 "$p" 2>/dev/null || { echo "soak: a node died; its log:" >&2; cat "$DIR"/node-*.log >&2; status=1; }
done
if [ $record -eq 1 ]; then
  python3 - "$DIR/soak.jsonl" "$(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')" \
    "$connections" "$topics" "$rate" "$ttl_s" >bench/SOAK.md <<'PY'
import json, sys, datetime
lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
points, verdict = lines[:-1], lines[-1]
mib = lambda b: f"{b / 1048576:.1f}"
print("## Soak (`scripts/soak.sh --record`)")
print()
print(f"Run on {datetime.date.today()}: {verdict['seconds'] / 60:.0f} minutes, seed {verdict['seed']}. Two nodes on one "
      f"Redis {sys.argv[2]} (idle_ttl {sys.argv[6]} s); {sys.argv[3]} clients coming and going (1-15 s each, "
      f"one to three of {sys.argv[4]} topics a generation, a third resuming), {sys.argv[5]} events/s through both "
      f"nodes (single, arrays, to many topics, direct XADDs). {verdict['streams_opened']} streams opened, "
      f"{verdict['events_published']} events published, {verdict['events_received']} received, "
      f"{verdict['gaps_received']} gap notices (resumes into expired topics), {verdict['publish_errors']} publish errors.")
print()
heap = any(n.get("heap_bytes") for p in points for n in p["nodes"])
print("| idle checkpoint | at (min) | node A RSS (MiB) | node B RSS (MiB) | "
      + ("heap in use A / B (MiB) | " if heap else "")
      + "huge pages A / B (MiB) | "
      + "fds A / B | threads A / B | streams | topics A / B | Redis used_memory (MiB) | Redis clients | channels | keys |")
print("|---|---|---|---|" + ("---|" if heap else "") + "---|---|---|---|---|---|---|---|---|")
for p in points:
    a, b = p["nodes"]
    r = p["redis"]
    print(f"| {p['checkpoint']} | {p['at_seconds'] / 60:.0f} | {mib(a['rss_bytes'])} | {mib(b['rss_bytes'])} | "
          + (f"{mib(a['heap_bytes'])} / {mib(b['heap_bytes'])} | " if heap else "")
          + f"{mib(a.get('huge_page_bytes', 0))} / {mib(b.get('huge_page_bytes', 0))} | "
          + f"{a['fds']} / {b['fds']} | {a['threads']} / {b['threads']} | {a['open_streams'] + b['open_streams']:.0f} | "
          f"{a['active_topics']:.0f} / {b['active_topics']:.0f} | {mib(r['used_memory'])} | {r['connected_clients']} | "
          f"{r['pubsub_channels']} | {r['keys']} |")
print()
print("Verdict: " + ("nothing grew with uptime." if verdict["ok"] else "grew: " + "; ".join(verdict["failures"])))
PY
fi
[ $status -eq 0 ] && echo "soak: nothing grew with uptime" || echo "soak: FAILED" >&2
exit $status
