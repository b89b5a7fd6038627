#!/usr/bin/env bash
# User-space instructions per request of the gateway, counted by valgrind's callgrind: the same
# count for the same binary and traffic whatever else the machine does (CPU time on a shared VM
# moves by 10-30 % between runs), so it shows what a change to the request path costs or saves.
# Per thread: the runtime that serves requests (main, or a per-core worker), the ledger writer and
# the ledger's fold thread. wrk sends the calls at the rate the instrumented gateway manages
# (~2-4k/s: callgrind runs it 20-50x slower), so the writer's per-commit work and the fold's
# per-fold work are spread over fewer calls than at full speed: compare their figures between
# builds, not with CPU time.
#
#   loadtest/instructions.sh                         # hot: one tenant, every call metered pay-as-you-go
#   WORKLOAD=flood loadtest/instructions.sh          # a 50 QPS limit flooded: nearly every answer a 429
#   WORKLOAD=tenants loadtest/instructions.sh        # 10,000 tenants (a warm-up long enough to touch them all)
#   TURNSTILE_BIN=/tmp/before/turnstile loadtest/instructions.sh   # another build
#   KEEP=/tmp/cg loadtest/instructions.sh            # also keeps the callgrind files (callgrind_annotate)
#
# Needs valgrind (callgrind_control and callgrind_annotate come with it) and wrk. Prints one line:
#   requests=N  main=I  ledger-fold=I  ledger-writer=I  total=I   (instructions per request)
set -euo pipefail
WORKLOAD=${WORKLOAD:-hot}
case $WORKLOAD in
  hot) WARMUP=${WARMUP:-2} ;;
  flood) export PAYG_QPS=50 BURST_SECONDS=0.02; WARMUP=${WARMUP:-2} ;;
  tenants) export TENANTS=10000; WARMUP=${WARMUP:-10} ;;
  *) echo "WORKLOAD must be hot, flood or tenants"; exit 1 ;;
esac
source "$(dirname "$0")/common.sh"
need valgrind "apt-get install valgrind"
need wrk "apt-get install wrk"
DURATION=${DURATION:-5}; CONNS=${CONNS:-16}
PIN_SERVER=${PIN_SERVER:-1}; PIN_LOADGEN=${PIN_LOADGEN:-0}
GATEWAY_WRAP="valgrind --tool=callgrind --separate-threads=yes --callgrind-out-file=$WORK/cg.%p"
WAIT_TRIES=400 start_gateway
gw=${PIDS[1]}
url="http://127.0.0.1:$GW_PORT/v1/infer"
load=(-H "x-api-key: $API_KEY")
[ "$WORKLOAD" = tenants ] && load=(-s "$ROOT/loadtest/tenants.lua")
taskset -c "$PIN_LOADGEN" timeout $((WARMUP + 30)) wrk -t1 -c"$CONNS" -d"${WARMUP}s" "${load[@]}" "$url" > /dev/null
sleep 0.5
callgrind_control -z "$gw" > /dev/null
taskset -c "$PIN_LOADGEN" timeout $((DURATION + 30)) wrk -t1 -c"$CONNS" -d"${DURATION}s" "${load[@]}" "$url" > "$WORK/wrk.txt"
callgrind_control -d "$gw" > /dev/null
sleep 0.5
requests=$(grep -oP '\d+(?= requests in)' "$WORK/wrk.txt")
line="binary: $BIN; workload: $WORKLOAD; requests=$requests"
total=0
for f in "$WORK"/cg."$gw".1-*; do
  ir=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
  ir=${ir//[^0-9]/}; ir=${ir:-0}   # a thread that ran nothing after the reset prints "."
  total=$((total + ir))
  per=$((ir / requests))
  [ "$per" -lt 50 ] && continue   # threads that did next to nothing (signals, the admin listener)
  name=$(grep -m1 -oP '(?<=^thread: )\d+' "$f" || true)
  case $name in 1) name=main ;; *) name="thread$name" ;; esac
  # The ledger writer runs the commits (the log appends); the fold thread, redb's transactions.
  if grep -q 'fold_loop' "$f"; then name=ledger-fold; elif grep -q 'RedbLedger' "$f"; then name=ledger-writer; fi
  line="$line  $name=$per"
done
echo "$line  total=$((total / requests))  (user-space instructions per request)"
[ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$WORK"/cg.* "$KEEP"/ && echo "callgrind files in $KEEP"
