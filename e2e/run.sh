#!/usr/bin/env bash
# End-to-end tests against the built pinaka binary, configured explicitly
# (no --dev) on a random loopback port:
#   1. Chromium (Debian's /usr/bin/chromium via playwright-core) uses Pinaka
#      as its HTTPS proxy for http://, https:// and ws:// origins.
#   2. The Go end-to-end tests in this directory: curl through the proxy
#      (forwarding, -p tunnels, 407, 403) and RFC 8441 against the binary.
# scripts/deps.sh installs what this needs (chromium, curl, npm install).
set -euo pipefail
. "$(dirname "$0")/lib.sh"

CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] || { echo "e2e: $CHROMIUM not found (scripts/deps.sh installs it)" >&2; exit 1; }
[ -d "$E2E_DIR/node_modules/playwright-core" ] || { echo "e2e: run 'npm install' in e2e/ (scripts/deps.sh does)" >&2; exit 1; }

e2e_setup
e2e_start_proxy
token=$(e2e_token e2e-user e2e-chromium us-east)

echo "e2e: chromium"
(cd "$E2E_DIR" && PROXY_PORT="$PROXY_PORT" PROXY_TOKEN="$token" PROXY_LOG="$WORK/proxy.log" \
  TLS_CERT="$WORK/cert.pem" TLS_KEY="$WORK/key.pem" CHROMIUM="$CHROMIUM" \
  SHOT="${SHOT:-/tmp/e2e-shot.png}" timeout 180 node chromium.mjs)
e2e_stop_proxy

echo "e2e: go tests (curl, RFC 8441) against the binary"
(cd "$REPO_DIR" && PINAKA_BIN="$WORK/pinaka" E2E_REQUIRE=1 go test -count=1 -v ./e2e/)
echo "e2e: ok"
