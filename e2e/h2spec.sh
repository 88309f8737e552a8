#!/usr/bin/env bash
# HTTP/2 conformance: runs h2spec (-t -k, every test group) against the
# pinaka binary started with explicit configuration on a random loopback
# port. Fails on any failed or skipped case: Pinaka's HTTP/2 engine passes
# every one (docs/CONFORMANCE.md).
#
# h2spec's requests are for the proxy itself (":scheme https", ":path /"),
# which Pinaka answers "400 not a proxy request" with a short body; h2spec
# checks framing, not the status, and the body lets the flow-control cases
# (which need response data) run instead of being skipped.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

H2SPEC=${H2SPEC:-$(command -v h2spec || echo "$(go env GOPATH)/bin/h2spec")}
if [ ! -x "$H2SPEC" ]; then
  echo "h2spec: not installed (scripts/deps.sh installs it)" >&2
  exit 1
fi
echo "h2spec: $("$H2SPEC" --version 2>&1 | head -1); module $(go version -m "$H2SPEC" 2>/dev/null | awk '$1 == "mod" {print $3}')"

e2e_setup
e2e_start_proxy

set +e
"$H2SPEC" -t -k -h 127.0.0.1 -p "$PROXY_PORT" -o 5 -j "$WORK/h2spec.xml" >"$WORK/h2spec.txt" 2>&1
h2rc=$?
set -e
summary=$(grep -E '^[0-9]+ tests, [0-9]+ passed, [0-9]+ skipped, [0-9]+ failed' "$WORK/h2spec.txt" | tail -1 || true)
if [ -z "$summary" ] || [ ! -s "$WORK/h2spec.xml" ]; then
  echo "h2spec: no summary (exit $h2rc):" >&2
  tail -n 40 "$WORK/h2spec.txt" >&2
  exit 1
fi
echo "h2spec: $summary"

# Each case as "package#n" with its outcome, from the JUnit report.
awk '
  /<testcase / {
    match($0, /package="[^"]*"/); pkg = substr($0, RSTART + 9, RLENGTH - 10)
    match($0, /classname="[^"]*"/); name = substr($0, RSTART + 11, RLENGTH - 12)
    id = pkg "#" (++n[pkg])
    if ($0 ~ /<\/testcase>/) { print "PASS", id, name; cur = ""; next }
    cur = id " " name; next
  }
  cur != "" && /<(failure|error)/ { print "FAIL", cur; cur = ""; next }
  cur != "" && /<skipped/ { print "SKIP", cur; cur = ""; next }
' "$WORK/h2spec.xml" >"$WORK/cases.txt"

bad=0
while read -r outcome id name; do
  case "$outcome" in
    FAIL) echo "h2spec: FAILED: $id $name" >&2; bad=1 ;;
    SKIP) echo "h2spec: SKIPPED: $id $name" >&2; bad=1 ;;
  esac
done <"$WORK/cases.txt"

total=$(wc -l <"$WORK/cases.txt")
if [ "$total" -eq 0 ]; then
  echo "h2spec: no test cases in the report" >&2
  exit 1
fi
if [ "$bad" -ne 0 ]; then
  echo "h2spec: details:" >&2
  sed -n '/^Failures:/,$p' "$WORK/h2spec.txt" >&2
  exit 1
fi
# The requests h2spec makes are answered as requests for the proxy itself.
if ! grep -q '"error":"not_a_proxy_request"' "$WORK/proxy.log"; then
  echo "h2spec: expected the proxy to answer h2spec's requests with 400 not_a_proxy_request" >&2
  exit 1
fi
echo "h2spec: ok ($total cases, all passed)"
