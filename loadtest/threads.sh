#!/usr/bin/env bash
# CPU time per request of each of the gateway's threads, from /proc (utime + stime, and the user
# part), with context switches per request: which thread a change moved CPU into or out of, at
# full speed (instructions.sh counts instructions, slowed down 20-50x by callgrind).
# The own-core layout: the gateway (and the stand-in upstream) on core $PIN_SERVER, wrk on core
# $PIN_LOADGEN; CPU per request is robust to a noisy box, requests/s is not.
#
#   loadtest/threads.sh                              # hot: one tenant, every call metered pay-as-you-go
#   WORKLOAD=tenants loadtest/threads.sh             # 10,000 tenants
#   WORKLOAD=flood loadtest/threads.sh               # a 50 QPS limit flooded: nearly every answer a 429
#   TURNSTILE_BIN=/tmp/before/turnstile loadtest/threads.sh
#
# Prints the requests, then per thread: name, CPU µs/request (user µs/request), switches/request.
set -euo pipefail
WORKLOAD=${WORKLOAD:-hot}
case $WORKLOAD in
  hot) ;;
  flood) export PAYG_QPS=50 BURST_SECONDS=0.02 ;;
  tenants) export TENANTS=10000 ;;
  *) echo "WORKLOAD must be hot, flood or tenants"; exit 1 ;;
esac
PIN_SERVER=${PIN_SERVER:-1}; PIN_LOADGEN=${PIN_LOADGEN:-0}
source "$(dirname "$0")/common.sh"
need wrk "apt-get install wrk"
DURATION=${DURATION:-10}; WARMUP=${WARMUP:-8}; CONNS=${CONNS:-64}
start_gateway
gw=${PIDS[1]}
url="http://127.0.0.1:$GW_PORT/v1/infer"
load=(-H "x-api-key: $API_KEY")
[ "$WORKLOAD" = tenants ] && load=(-s "$ROOT/loadtest/tenants.lua")
taskset -c "$PIN_LOADGEN" wrk -t1 -c"$CONNS" -d"${WARMUP}s" "${load[@]}" "$url" > /dev/null
# Per thread: id, name, ticks (user + system), user ticks, context switches.
snapshot() {
  for t in /proc/"$gw"/task/*; do
    printf '%s %s %s %s\n' "${t##*/}" "$(tr ' ' _ < "$t/comm")" "$(awk '{print $14 + $15, $14}' "$t/stat")" \
      "$(awk '/ctxt_switches/ {s += $2} END {print s}' "$t/status")"
  done | sort
}
snapshot > "$WORK/before"
taskset -c "$PIN_LOADGEN" wrk -t1 -c"$CONNS" -d"${DURATION}s" "${load[@]}" "$url" > "$WORK/wrk.txt"
snapshot > "$WORK/after"
requests=$(grep -oP '\d+(?= requests in)' "$WORK/wrk.txt")
echo "binary: $BIN; workload: $WORKLOAD; requests=$requests ($(grep -oP '(?<=Requests/sec:)\s*[\d.]+' "$WORK/wrk.txt" | tr -d ' ')/s)"
ticks=$(getconf CLK_TCK)
join "$WORK/before" "$WORK/after" | awk -v r="$requests" -v hz="$ticks" '
  { cpu = $7 - $3; user = $8 - $4; cs = $9 - $5
    if (cpu > 0 || cs > 0) printf "  %-16s %6.2f us/req (user %5.2f)  %.4f switches/req\n", $2, cpu * 1e6 / hz / r, user * 1e6 / hz / r, cs / r }'
