#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine, skipping what is
# already there: PostgreSQL (collector tests), curl, Chromium and its driver
# (browser test), systemd-analyze (unit check), h2spec, playwright-core,
# redis-server (fleet tests start their own on a free port), prometheus and
# promtool (deploy/monitoring_test.go starts its own on a free port).
set -euo pipefail
# go.mod asks for Go 1.27.3; fetched when the machine's Go is older.
export GOTOOLCHAIN=${GOTOOLCHAIN:-go1.27.3}
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need=()
command -v curl >/dev/null || need+=(curl)
command -v psql >/dev/null || need+=(postgresql postgresql-client)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
command -v systemd-analyze >/dev/null || need+=(systemd)
command -v node >/dev/null || need+=(nodejs npm)
command -v openssl >/dev/null || need+=(openssl)
command -v redis-server >/dev/null || need+=(redis-server)
if [ ${#need[@]} -gt 0 ]; then
  echo "deps: apt-get install ${need[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Prometheus on its own: without its recommended node exporter. promtool
# checks the real /metrics (cmd/pinaka TestMetricsPassPromtool) and the
# alert rules; the tests start their own Prometheus; a packaged service started by the install
# (on a machine running systemd) would hold 127.0.0.1:9090, pinaka's
# default ADMIN_ADDR, so it is stopped and disabled.
if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "deps: apt-get install prometheus"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

# PostgreSQL must be running for the collector tests.
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  echo "deps: starting PostgreSQL"
  ver=$(ls /etc/postgresql | sort -V | tail -1)
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$ver" main start || $SUDO pg_ctlcluster "$ver" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
# Tests connect as postgres over TCP without a password (trust on loopback).
if ! psql "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable" -Atc 'select 1' >/dev/null 2>&1; then
  echo "deps: allowing trust auth for postgres on loopback"
  hba=$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -1)
  $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main reload || true
fi

GOBIN=$(go env GOPATH)/bin
if [ ! -x "$GOBIN/h2spec" ]; then
  echo "deps: go install h2spec"
  go install github.com/summerwind/h2spec/cmd/h2spec@latest
fi

if [ ! -d e2e/node_modules/playwright-core ] && [ -f e2e/package.json ]; then
  echo "deps: npm install (e2e)"
  (cd e2e && npm install --no-audit --no-fund --silent)
fi
echo "deps: ok"
