# shellcheck shell=bash
# Helpers shared by h2spec.sh and run.sh: build pinaka, make a test
# certificate, start the proxy on a free loopback port with explicit
# configuration (no .env, no --dev), stop it. Everything stays on loopback.

# go.mod asks for Go 1.27.3; fetched when the machine's Go is older.
export GOTOOLCHAIN=${GOTOOLCHAIN:-go1.27.3}

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$E2E_DIR/.." && pwd)
E2E_SECRET=e2e-secret-0123456789abcdef0123456789abcdef
# Loopback only, whatever a client asks for (Chromium makes background
# requests to public hosts): every IPv4 range but 127.0.0.0/8, and all of
# IPv6, is denied (deny wins over allow), and DNS goes to a closed loopback
# port, so no lookup leaves the machine either.
E2E_DENY_CIDRS=0.0.0.0/2,64.0.0.0/3,96.0.0.0/4,112.0.0.0/5,120.0.0.0/6,124.0.0.0/7,126.0.0.0/8,128.0.0.0/1,::/0
E2E_DNS=127.0.0.1:9

# e2e_setup creates $WORK (removed on exit, with the proxy stopped), builds
# the binary into it and writes a self-signed certificate for 127.0.0.1 and
# localhost, used by the proxy and by the test origins.
e2e_setup() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/pinaka-e2e.XXXXXX")
  PROXY_PID=""
  trap e2e_cleanup EXIT
  trap 'exit 130' INT TERM
  echo "e2e: building pinaka"
  (cd "$REPO_DIR" && go build -o "$WORK/pinaka" ./cmd/pinaka)
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
}

e2e_cleanup() {
  local rc=$?
  e2e_stop_proxy
  if [ "$rc" -ne 0 ] && [ -n "${WORK:-}" ] && [ -s "$WORK/proxy.log" ]; then
    echo "e2e: last lines of the proxy log:" >&2
    tail -n 30 "$WORK/proxy.log" >&2
  fi
  [ -n "${WORK:-}" ] && [ -z "${E2E_KEEP:-}" ] && rm -rf "$WORK"
  return "$rc"
}

# e2e_start_proxy [VAR=value...] starts pinaka on a random free loopback
# port ($PROXY_PORT); its JSON log goes to $WORK/proxy.log. The port is
# picked at random and retried if it turns out to be taken.
e2e_start_proxy() {
  local attempt i
  for attempt in 1 2 3 4 5 6 7 8; do
    PROXY_PORT=$((20000 + RANDOM % 40000))
    env JWT_SECRET="$E2E_SECRET" \
      TLS_CERT_PATH="$WORK/cert.pem" TLS_KEY_PATH="$WORK/key.pem" \
      PROXY_BIND=127.0.0.1 PROXY_PORT="$PROXY_PORT" ADMIN_ADDR=off \
      EGRESS_ALLOW_CIDRS=127.0.0.0/8 EGRESS_DENY_CIDRS="$E2E_DENY_CIDRS" DNS_SERVERS="$E2E_DNS" \
      PROBE_NODE_REGION=us-east PROBE_NODE_NAME=e2e \
      LOG_LEVEL=info BACKEND_URL= SHUTDOWN_TIMEOUT=5s "$@" \
      "$WORK/pinaka" serve --env-file /dev/null >"$WORK/proxy.out" 2>"$WORK/proxy.log" &
    PROXY_PID=$!
    for i in $(seq 1 100); do
      if grep -q '"msg":"pinaka listening"' "$WORK/proxy.log"; then
        echo "e2e: pinaka listening on 127.0.0.1:$PROXY_PORT (pid $PROXY_PID)"
        return 0
      fi
      kill -0 "$PROXY_PID" 2>/dev/null || break
      sleep 0.1
    done
    e2e_stop_proxy
    if ! grep -q "address already in use" "$WORK/proxy.log"; then
      echo "e2e: pinaka did not start:" >&2
      cat "$WORK/proxy.log" >&2
      return 1
    fi
  done
  echo "e2e: no free port found" >&2
  return 1
}

e2e_stop_proxy() {
  if [ -n "${PROXY_PID:-}" ]; then
    kill -TERM "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=""
  fi
}

# e2e_token USER TOKEN_ID REGIONS prints a one-hour token.
e2e_token() {
  JWT_SECRET="$E2E_SECRET" "$WORK/pinaka" token --env-file /dev/null --user "$1" --token-id "$2" --regions "$3" --ttl 1h
}
