#!/usr/bin/env bash
# bench/redis-cost.sh — what fleet mode (REDIS_URL) costs per request and
# per tunnel, measured the way docs/PERFORMANCE.md "Fleet mode: the cost of
# Redis" describes: alternating runs without and with Redis, each proxy
# started fresh, CPU per unit read from /proc (Pinaka's, and with Redis
# Pinaka's plus redis-server's), at 1 and 16 clients, HTTP/1.1 and HTTP/2
# forwarding and HTTP/2 tunnel setup on a warm connection.
#
# Prints one tab-separated line per figure:
#   round mode proto workload clients value unit p50_ms p99_ms cpu redis_cpu cpu_unit fallbacks
# where cpu is the total per unit (Pinaka, plus redis-server with Redis)
# and redis_cpu is redis-server's share. Then the medians per figure.
#
# Environment: ROUNDS (default 3), CLIENTS (default "1 16"),
# DURATION (default 3s), PINAKA_BIN (default: built from this tree).
set -euo pipefail
export GOTOOLCHAIN=${GOTOOLCHAIN:-go1.27.3}
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
clients_list=${CLIENTS:-1 16}
duration=${DURATION:-3s}

work=$(mktemp -d /tmp/pinaka-redis-cost.XXXXXX)
started=()
cleanup() {
	local pid
	for pid in "${started[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${started[@]}"; do wait "$pid" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
log() { printf '== %s\n' "$*" >&2; }
stop() {
	kill "$1" 2>/dev/null || true
	wait "$1" 2>/dev/null || true
	local keep=() pid
	for pid in "${started[@]}"; do [[ $pid == "$1" ]] || keep+=("$pid"); done
	started=("${keep[@]}")
}
wait_port() {
	local i
	for i in $(seq 100); do
		(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
		sleep 0.1
	done
	return 1
}
# cpu_ticks PID: user+system clock ticks of a process so far.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

go build -o "$work/pinaka-bench" ./cmd/pinaka-bench
bench=$work/pinaka-bench
pinaka=${PINAKA_BIN:-}
if [[ -z $pinaka ]]; then
	go build -o "$work/pinaka" ./cmd/pinaka
	pinaka=$work/pinaka
fi
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
	-keyout "$work/key.pem" -out "$work/cert.pem" -days 2 -subj /CN=127.0.0.1 \
	-addext subjectAltName=IP:127.0.0.1 2>/dev/null
read -r p_pinaka p_redis p_admin <<<"$("$bench" ports 3)"
secret=$(openssl rand -hex 32)
token=$(JWT_SECRET=$secret "$pinaka" token --user bench --token-id bench --regions '*' --ttl 2h)

mkdir "$work/redis"
redis-server --port "$p_redis" --bind 127.0.0.1 --save "" --appendonly no \
	--dir "$work/redis" >"$work/redis/out.log" 2>&1 &
redis_pid=$!
started+=("$redis_pid")
wait_port "$p_redis" || { cat "$work/redis/out.log" >&2; exit 1; }
hz=$(getconf CLK_TCK)

start_pinaka() {
	env JWT_SECRET="$secret" TLS_CERT_PATH="$work/cert.pem" TLS_KEY_PATH="$work/key.pem" \
		PROXY_BIND=127.0.0.1 PROXY_PORT="$p_pinaka" ADMIN_ADDR="127.0.0.1:$p_admin" "$@" \
		EGRESS_ALLOW_CIDRS=127.0.0.0/8 PROBE_NODE_REGION=bench PROBE_NODE_NAME=bench \
		RATE_LIMIT_REQUESTS_PER_MINUTE=1000000000 RATE_LIMIT_BURST_SIZE=1000000000 \
		MAX_TUNNELS_PER_TOKEN=1000000 MAX_FORWARDS_PER_TOKEN=1000000 MAX_CONNECTIONS=1000000 \
		MAX_CONNECTIONS_PER_IP=0 MAX_UNAUTHENTICATED_CONNECTIONS_PER_IP=0 LOG_LEVEL=warn \
		"$pinaka" serve >"$work/pinaka.log" 2>&1 &
	pinaka_pid=$!
	started+=("$pinaka_pid")
	wait_port "$p_pinaka" || { cat "$work/pinaka.log" >&2; return 1; }
}

# measure ROUND MODE PROTO WORKLOAD CLIENTS: one figure, one line.
measure() {
	local round=$1 mode=$2 proto=$3 w=$4 c=$5 pids=$pinaka_pid flags=() r0 r1 fb
	[[ $proto == h2 ]] && flags=(-proxy-h2)
	[[ $mode == with ]] && pids="$pinaka_pid,$redis_pid"
	r0=$(cpu_ticks "$redis_pid")
	"$bench" -json -baseline=false -duration "$duration" -clients "$c" -workloads "$w" \
		-proxy "https://127.0.0.1:$p_pinaka" -insecure -bearer "$token" -pid "$pids" \
		"${flags[@]}" >"$work/out.json" || true
	r1=$(cpu_ticks "$redis_pid")
	fb=$(curl -s "http://127.0.0.1:$p_admin/metrics" | awk '/^pinaka_redis_fallback_total/ {n += $2} END {print n + 0}')
	jq -r --arg round "$round" --arg mode "$mode" --arg proto "$proto" --arg c "$c" \
		--argjson rticks "$((r1 - r0))" --argjson hz "$hz" --arg fb "$fb" '
		.results[0] as $r |
		(if $mode == "with" and $r.ops > 0 then ($rticks / $hz * 1e6 / $r.ops) else 0 end) as $rc |
		[$round, $mode, $proto, $r.workload, $c, ($r.value | floor), $r.unit, $r.p50_ms, $r.p99_ms,
		 (($r.proxy_cpu // 0) * 10 | round / 10), ($rc | round), $r.cpu_unit, $fb, ($r.error // "")] | @tsv' \
		"$work/out.json"
}

for round in $(seq "$rounds"); do
	for mode in without with; do
		for proto in h1 h2; do
			if [[ $mode == with ]]; then
				start_pinaka REDIS_URL="redis://127.0.0.1:$p_redis/0" REDIS_TIMEOUT=1s FLEET_SIZE=1
			else
				start_pinaka
			fi
			log "round $round, $mode Redis, $proto (load $(cut -d' ' -f1-3 /proc/loadavg))"
			for c in $clients_list; do
				measure "$round" "$mode" "$proto" forward "$c"
				[[ $proto == h2 ]] && measure "$round" "$mode" "$proto" setup-warm "$c"
			done
			stop "$pinaka_pid"
		done
	done
done | tee "$work/all.tsv"

echo
echo "medians of $rounds rounds (load now: $(cut -d' ' -f1-3 /proc/loadavg); redis_cpu is an estimate from /proc over the whole invocation):"
printf 'proto\tworkload\tclients\tmode\tp50_ms\tp99_ms\tcpu/unit\tredis_cpu\tvalue\n'
sort -t$'\t' -k3,3 -k4,4 -k5,5n -k2,2r "$work/all.tsv" | awk -F'\t' '
function med(s,   a, n) { n = split(s, a, " "); asort(a); return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
{ k = $3 "\t" $4 "\t" $5 "\t" $2; if (!(k in seen)) { seen[k] = 1; order[++n] = k }
  p50[k] = p50[k] " " $8; p99[k] = p99[k] " " $9; cpu[k] = cpu[k] " " $10; rc[k] = rc[k] " " $11; v[k] = v[k] " " $6 }
END { for (i = 1; i <= n; i++) { k = order[i]; printf "%s\t%.2f\t%.2f\t%.0f\t%.0f\t%.0f\n", k, med(p50[k]), med(p99[k]), med(cpu[k]), med(rc[k]), med(v[k]) } }'
