#!/usr/bin/env bash
# Usage: scripts/fuzz.sh [CASES]   (default 1000000 per target)
#
# Runs every hostile-input property test (request heads, subscriptions, publish bodies, ids and
# topics, topic patterns, credentials, tokens, SSE framing round-tripped through an independent
# parser) with CASES cases each, in release mode. The test command runs 1000 each. Every target
# prints its seed; PROPTEST_SEED=<seed> replays a run.
set -euo pipefail
cd "$(dirname "$0")/.."
cases=${1:-1000000}
export PROPTEST_CASES=$cases
start=$(date +%s)
cargo test --release --lib --locked -- --nocapture --test-threads 2 \
  hostile patterns_match_like_the_reference ids_round_trip 2>&1 | tee /dev/stderr |
  grep -E '^test result:' | tail -1
echo "fuzz: $cases cases per target in $(( $(date +%s) - start )) s"
