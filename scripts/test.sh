#!/usr/bin/env bash
# Runs every check and test of ssegate. Installs what the tests need (redis-server >= 7.0) when
# it is missing. Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_redis() {
  command -v redis-server >/dev/null 2>&1 || return 0
  local major
  major=$(redis-server --version | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')
  [ "${major:-0}" -lt 7 ]
}

if need_redis; then
  echo "== installing redis-server (the integration tests start their own)"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null
fi
redis-server --version

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --all-targets --locked -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --locked 2>&1 | tee "$log"
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
