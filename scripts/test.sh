#!/usr/bin/env bash
# Usage: scripts/test.sh (the chaos run inside lasts CHAOS_SECONDS, 60 by default; the one through
# TLS CHAOS_TLS_SECONDS, 30).
set -euo pipefail
cd "$(dirname "$0")/.."

# Runs every check and test. Installs what the tests use when it is missing: redis-server 7.0+
# (integration tests start their own), haproxy and curl (the test bed behind the chaos run; curl
# also as an HTTP/2 client), openssl (RSA
# and EC keys in their own PEM forms for the TLS tests), chromium (CORS and cookies in a real
# browser), node with playwright-core (the built-in page) and eventsource, php with Symfony's
# Mercure component (real Mercure clients); scripts/validate-deploy.sh installs the deploy file
# validators, scripts/bench.sh nginx with nchan for its smoke run; scripts/soak.sh runs its short
# form on what these installed.
missing=()
# `|| true`: on a fresh machine redis-server is not there yet, and pipefail would end the script.
redis_major=$( (redis-server --version 2>/dev/null || true) | sed -n 's/.* v=\([0-9]*\)\..*/\1/p')
[ "${redis_major:-0}" -ge 7 ] || missing+=(redis-server)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
# Symfony's Mercure publisher, a real client of the Mercure hub.
command -v php >/dev/null 2>&1 || missing+=(php-cli)
[ -f /usr/share/php/Symfony/Component/Mercure/Hub.php ] || missing+=(php-symfony-mercure)
if [ ${#missing[@]} -gt 0 ]; then
  echo "== installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
redis-server --version
haproxy -v | sed -n 1p
# Playwright (its core only: it drives Debian's chromium) for the built-in page's test, and the
# npm eventsource client for the Mercure hub's.
[ -d tests/ui/node_modules/playwright-core ] && [ -d tests/ui/node_modules/eventsource ] \
  || (cd tests/ui && npm ci --no-audit --no-fund --silent)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
echo "== deploy files"
scripts/validate-deploy.sh
echo "== bench smoke run (ssegate and nchan)"
scripts/bench.sh --smoke
echo "== soak, short form (two nodes on one Redis, two idle checkpoints)"
scripts/soak.sh --seconds 40 --checkpoint-every 20 --connections 300 --rate 100
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$log"
