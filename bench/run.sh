#!/usr/bin/env bash
# bench/run.sh — what `make bench` runs.
#
# Measures, in one run on this machine: the direct baselines (TCP/TLS
# straight to pinaka-bench's loopback origins), Pinaka (HTTP/1.1, HTTP/2,
# and HTTP/3 with HTTP3_ENABLED for the tunnel throughput workloads), and
# where installed Squid (https_port) and nghttpx in front of Squid. Each
# proxy is started fresh for each protocol run, so that the memory workload
# (which runs first) sees an unused process. Writes bench/results/latest.md
# and prints it.
#
# Fleet mode: right after each Pinaka protocol run, the same proxy with
# REDIS_URL pointing at a redis-server this script starts on a free port
# (column "Pinaka+Redis", the setup and forwarding workloads; its CPU is
# Pinaka's plus redis-server's). Without redis-server it is not measured.
#
# CONNECT-UDP (RFC 9298, HTTP/3): a Pinaka run of its own with
# HTTP3_ENABLED, workload udp (datagrams/s through flows to a UDP echo
# server, proxy CPU per datagram); no peer offers CONNECT-UDP, so it is
# Pinaka's alone. Left out when BENCH_WORKLOADS names workloads without udp.
#
# Environment: BENCH_DURATION (default 3s per measurement),
# BENCH_IDLE_TUNNELS (default 2000, as the idle-memory target), BENCH_TUNNELS (16), BENCH_CLIENTS (16),
# BENCH_SKIP (space-separated: pinaka redis udp squid nghttpx),
# BENCH_WORKLOADS (pinaka-bench -workloads for every run; default all),
# BENCH_REDIS_WORKLOADS (for the Redis runs; default setup,setup-warm,forward),
# BENCH_OUT (the table; default bench/results/latest.md: give partial runs
# another file).
set -euo pipefail
# go.mod asks for Go 1.27.3; fetched when the machine's Go is older.
export GOTOOLCHAIN=${GOTOOLCHAIN:-go1.27.3}

cd "$(dirname "$0")/.."
root=$(pwd)
duration=${BENCH_DURATION:-3s}
idle=${BENCH_IDLE_TUNNELS:-2000}
tunnels=${BENCH_TUNNELS:-16}
clients=${BENCH_CLIENTS:-16}
skip=" ${BENCH_SKIP:-} "
workloads=${BENCH_WORKLOADS:-all}
redis_workloads=${BENCH_REDIS_WORKLOADS:-setup,setup-warm,forward}

work=$(mktemp -d /tmp/pinaka-bench.XXXXXX)
chmod 755 "$work" # Squid drops privileges to its own user and must read its files
started=()         # pids of everything this script started

cleanup() {
	local pid
	for pid in "${started[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${started[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '== %s\n' "$*" >&2; }

# stop PID: end one process this script started, wait for it and forget it
# (so that cleanup never signals a recycled pid).
stop() {
	[[ -n $1 ]] || return 0
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
	local keep=() pid
	for pid in "${started[@]}"; do
		[[ $pid == "$1" ]] || keep+=("$pid")
	done
	started=("${keep[@]}")
}

# wait_port PORT: until something accepts on 127.0.0.1:PORT (10s).
wait_port() {
	local i
	for i in $(seq 100); do
		if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
			return 0
		fi
		sleep 0.1
	done
	return 1
}

log "building pinaka-bench"
go build -o "$work/pinaka-bench" ./cmd/pinaka-bench
bench="$work/pinaka-bench"
# Each proxy run measures its own direct baseline right before each figure
# (-baseline): the ratios stay right when load from elsewhere on the machine
# changes during the suite. The separate direct run is the table's column.
common=(-json -duration "$duration" -tunnels "$tunnels" -clients "$clients" -idle-tunnels "$idle")
run_workloads=(-workloads "$workloads")
reports=()
notes=()

# run NAME ARGS...: one pinaka-bench run whose JSON report is kept even when
# some workloads failed (the failures are in the report).
run() {
	local name=$1
	shift
	log "measuring $name"
	"$bench" "${common[@]}" "${run_workloads[@]}" "$@" >"$work/$name.json" || true
	if [[ -s "$work/$name.json" ]]; then
		reports+=("$work/$name.json")
	else
		notes+=("$name: no report (see messages above)")
	fi
}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
	-keyout "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=127.0.0.1 \
	-addext subjectAltName=IP:127.0.0.1 2>/dev/null
chmod 644 "$work/key.pem" "$work/cert.pem"

read -r p_pinaka p_squid_http p_squid_https p_nghttpx p_redis p_admin <<<"$("$bench" ports 6)"

run direct -label direct -baseline=false

# --- Pinaka ---------------------------------------------------------------
if [[ $skip == *" pinaka "* ]]; then
	notes+=("Pinaka: skipped (BENCH_SKIP)")
elif ! go build -o "$work/pinaka" ./cmd/pinaka 2>"$work/pinaka-build.log"; then
	notes+=("Pinaka: not measured, ./cmd/pinaka does not build")
	cat "$work/pinaka-build.log" >&2
else
	secret=$(openssl rand -hex 32)
	token=$(JWT_SECRET=$secret "$work/pinaka" token --user bench --token-id bench --regions '*' --ttl 2h)
	# start_pinaka [VAR=VALUE...]: the proxy, with extra environment.
	start_pinaka() {
		env JWT_SECRET="$secret" TLS_CERT_PATH="$work/cert.pem" TLS_KEY_PATH="$work/key.pem" \
			PROXY_BIND=127.0.0.1 PROXY_PORT="$p_pinaka" ADMIN_ADDR=off "$@" \
			EGRESS_ALLOW_CIDRS=127.0.0.0/8 PROBE_NODE_REGION=bench PROBE_NODE_NAME=bench \
			RATE_LIMIT_REQUESTS_PER_MINUTE=1000000000 RATE_LIMIT_BURST_SIZE=1000000000 \
			MAX_TUNNELS_PER_TOKEN=1000000 MAX_FORWARDS_PER_TOKEN=1000000 MAX_CONNECTIONS=1000000 \
			MAX_CONNECTIONS_PER_IP=0 MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP=0 LOG_LEVEL=warn \
			"$work/pinaka" serve >"$work/pinaka.log" 2>&1 &
		pinaka_pid=$!
		started+=("$pinaka_pid")
		wait_port "$p_pinaka" || { cat "$work/pinaka.log" >&2; return 1; }
	}
	# Fleet mode, measured next to each protocol's run: a redis-server of
	# our own (no persistence, like the tests'), REDIS_TIMEOUT long enough
	# that no decision falls back to local state (counted and noted if one
	# does: the figure would then understate Redis's cost).
	redis_pid=""
	if [[ $skip == *" redis "* ]]; then
		notes+=("Pinaka+Redis: skipped (BENCH_SKIP)")
	elif ! command -v redis-server >/dev/null; then
		notes+=("Pinaka+Redis: not measured (redis-server not installed: Debian package redis-server)")
	else
		mkdir "$work/redis"
		redis-server --port "$p_redis" --bind 127.0.0.1 --save "" --appendonly no \
			--dir "$work/redis" >"$work/redis/out.log" 2>&1 &
		redis_pid=$!
		started+=("$redis_pid")
		if ! wait_port "$p_redis"; then
			cat "$work/redis/out.log" >&2
			notes+=("Pinaka+Redis: not measured (redis-server did not start)")
			stop "$redis_pid"
			redis_pid=""
		fi
	fi
	for proto in h1 h2 h3; do
		flags=() extra=()
		[[ $proto == h2 ]] && flags=(-proxy-h2)
		# HTTP/3: QUIC on the UDP port of the same number; pinaka-bench runs
		# the throughput workloads only.
		[[ $proto == h3 ]] && flags=(-proxy-h3) extra=(HTTP3_ENABLED=true)
		if start_pinaka "${extra[@]}"; then
			run "pinaka-$proto" -label Pinaka -proxy "https://127.0.0.1:$p_pinaka" -insecure \
				-bearer "$token" -pid "$pinaka_pid" "${flags[@]}"
			stop "$pinaka_pid"
		else
			notes+=("Pinaka $proto: did not start")
		fi
		[[ -n $redis_pid && $proto != h3 ]] || continue
		if start_pinaka REDIS_URL="redis://127.0.0.1:$p_redis/0" REDIS_TIMEOUT=1s FLEET_SIZE=1 \
			ADMIN_ADDR="127.0.0.1:$p_admin"; then
			run_workloads=(-workloads "$redis_workloads")
			run "pinaka-redis-$proto" -label Pinaka+Redis -proxy "https://127.0.0.1:$p_pinaka" -insecure \
				-bearer "$token" -pid "$pinaka_pid,$redis_pid" "${flags[@]}"
			run_workloads=(-workloads "$workloads")
			fallback=$(curl -s "http://127.0.0.1:$p_admin/metrics" | awk '/^pinaka_redis_fallback_total/ {n += $2} END {print n + 0}') || fallback="?"
			notes+=("Pinaka+Redis $proto: $fallback decisions fell back to local state (0 expected)")
			stop "$pinaka_pid"
		else
			notes+=("Pinaka+Redis $proto: did not start")
		fi
	done
	stop "$redis_pid"
	# CONNECT-UDP over HTTP/3 (udp.go in cmd/pinaka-bench), and its direct
	# baseline (plain UDP to the same echo server) for the direct column.
	if [[ $skip == *" udp "* ]]; then
		notes+=("Pinaka CONNECT-UDP: skipped (BENCH_SKIP)")
	elif [[ $workloads != all && ",$workloads," != *,udp,* ]]; then
		: # not asked for
	elif start_pinaka HTTP3_ENABLED=true MAX_UDP_FLOWS_PER_TOKEN=1000000; then
		run direct-udp -label direct -baseline=false -workloads udp
		run pinaka-h3-udp -label Pinaka -proxy "https://127.0.0.1:$p_pinaka" -proxy-h3 -insecure \
			-bearer "$token" -pid "$pinaka_pid" -workloads udp
		stop "$pinaka_pid"
		notes+=("CONNECT-UDP (HTTP/3): Pinaka only; Squid and nghttpx offer no CONNECT-UDP")
	else
		notes+=("Pinaka CONNECT-UDP: did not start")
	fi
	notes+=("HTTP/3 rows: Pinaka only; Squid and nghttpx, as run here, have no HTTP/3 proxy listener")
fi

# --- Squid, and nghttpx in front of it ---------------------------------------
if [[ $skip != *" squid "* ]] && command -v squid >/dev/null; then
	mkdir -m 777 "$work/squid"
	cat >"$work/squid.conf" <<EOF
http_port 127.0.0.1:$p_squid_http
https_port 127.0.0.1:$p_squid_https tls-cert=$work/cert.pem tls-key=$work/key.pem
acl bench src 127.0.0.0/8
http_access allow bench
http_access deny all
cache deny all
cache_mem 0 MB
access_log none
cache_store_log none
cache_log $work/squid/cache.log
pid_filename $work/squid/squid.pid
coredump_dir $work/squid
max_filedescriptors 65536
pinger_enable off
shutdown_lifetime 0 seconds
forwarded_for delete
EOF
	start_squid() {
		squid -N -f "$work/squid.conf" >>"$work/squid/out.log" 2>&1 &
		squid_pid=$!
		started+=("$squid_pid")
		wait_port "$p_squid_https" || { cat "$work/squid/out.log" >&2; return 1; }
	}
	if start_squid; then
		run squid -label Squid -proxy "https://127.0.0.1:$p_squid_https" -insecure -pid "$squid_pid"
		stop "$squid_pid"
	else
		notes+=("Squid: did not start")
	fi

	if [[ $skip != *" nghttpx "* ]] && command -v nghttpx >/dev/null; then
		# Large HTTP/2 windows: nghttpx's 64 KB default would measure flow
		# control, not the proxy.
		start_nghttpx() {
			start_squid || return 1
			nghttpx --conf=/dev/null --http2-proxy --single-process --no-ocsp \
				-b "127.0.0.1,$p_squid_http" -f "127.0.0.1,$p_nghttpx" \
				--backend-connections-per-host=1000000 --rlimit-nofile=65536 \
				--frontend-http2-window-size=4194304 \
				--frontend-http2-connection-window-size=1073741824 \
				"$work/key.pem" "$work/cert.pem" >"$work/nghttpx.log" 2>&1 &
			nghttpx_pid=$!
			started+=("$nghttpx_pid")
			wait_port "$p_nghttpx" || { cat "$work/nghttpx.log" >&2; return 1; }
		}
		for proto in h1 h2; do
			nghttpx_pid="" squid_pid=""
			if start_nghttpx; then
				flags=()
				[[ $proto == h2 ]] && flags=(-proxy-h2)
				run "nghttpx-$proto" -label "nghttpx+Squid" -proxy "https://127.0.0.1:$p_nghttpx" -insecure \
					-pid "$nghttpx_pid,$squid_pid" "${flags[@]}"
			else
				notes+=("nghttpx+Squid $proto: did not start")
			fi
			stop "$nghttpx_pid"
			stop "$squid_pid"
		done
	else
		notes+=("nghttpx+Squid: not measured (nghttpx not installed: Debian package nghttp2-proxy)")
	fi
else
	notes+=("Squid: not measured (squid not installed: Debian package squid)")
fi

# --- Table ---------------------------------------------------------------------
mkdir -p bench/results
out=${BENCH_OUT:-bench/results/latest.md}
{
	echo "# pinaka-bench results"
	echo
	echo "$(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')),"
	echo "$(go version | cut -d' ' -f3), ${duration} per measurement, $tunnels tunnels, $clients clients, $idle idle tunnels."
	command -v squid >/dev/null && echo "$(squid -v | head -1)."
	command -v nghttpx >/dev/null && echo "$(nghttpx --version | head -1)."
	echo
	echo "Ratios in parentheses are to a direct baseline measured by the same pinaka-bench"
	echo "run right before that figure (so they hold when load from elsewhere on the machine"
	echo "changes during the suite); the direct column is the suite's first, separate baseline"
	echo "run. ✓/✗ mark the targets from the performance issue. MB = 10^6 bytes."
	echo
	"$bench" table "${reports[@]}"
	if ((${#notes[@]})); then
		echo
		for n in "${notes[@]}"; do echo "- $n"; done
	fi
} >"$out"
cat "$out"
