#!/usr/bin/env bash
# Heap allocations per request of the gateway: a uprobe on glibc's malloc counts every call the
# gateway process makes while wrk sends pay-as-you-go calls through it (one hot tenant and
# feature, every call admitted, forwarded and metered, ledger on). Unlike CPU time on a shared VM
# this count is deterministic to a few hundredths, so it shows what a change to the request path
# costs or saves even when the machine is noisy.
#
#   loadtest/mallocs.sh                                  # target/release/turnstile
#   TURNSTILE_BIN=/tmp/before/turnstile loadtest/mallocs.sh
#
# Needs root (perf probe), perf (apt-get install linux-perf) and wrk. The probe is added once and
# left in place (`perf probe -d probe_libc:malloc` removes it).
set -euo pipefail
source "$(dirname "$0")/common.sh"
need wrk "apt-get install wrk"
need perf "apt-get install linux-perf"
DURATION=${DURATION:-3}; CONNS=${CONNS:-16}
LIBC=$(ldconfig -p | awk '/libc.so.6 .*x86-64/ {print $NF; exit}')
perf probe -l 2>/dev/null | grep -q 'probe_libc:malloc' || perf probe -q -x "$LIBC" malloc
PIN_SERVER=${PIN_SERVER:-1}; PIN_LOADGEN=${PIN_LOADGEN:-0}
start_gateway
gw=${PIDS[1]}
url="http://127.0.0.1:$GW_PORT/v1/infer"
# Warm up: connections open, pools and maps filled.
taskset -c "$PIN_LOADGEN" wrk -t1 -c"$CONNS" -d1s -H "x-api-key: $API_KEY" "$url" > /dev/null
perf stat -x, -e probe_libc:malloc -p "$gw" -o "$WORK/perf.csv" -- sleep $((DURATION + 1)) &
stat_pid=$!
sleep 0.5
taskset -c "$PIN_LOADGEN" timeout $((DURATION + 10)) wrk -t1 -c"$CONNS" -d"${DURATION}s" -H "x-api-key: $API_KEY" "$url" > "$WORK/wrk.txt"
wait $stat_pid
requests=$(grep -oP '\d+(?= requests in)' "$WORK/wrk.txt")
mallocs=$(grep probe_libc "$WORK/perf.csv" | cut -d, -f1)
non2xx=$(grep -oP '(?<=Non-2xx or 3xx responses: )\d+' "$WORK/wrk.txt" || echo 0)
echo "binary: $BIN"
echo "requests: $requests (non-2xx: $non2xx), mallocs: $mallocs"
python3 -c "print(f'mallocs per request: {$mallocs / $requests:.2f} (idle timers and the ledger writer included)')"
