#!/usr/bin/env bash
# Throughput with metering on: oha floods the pay-as-you-go route (limit never reached) for
# DURATION seconds with CONNS connections and prints requests/s, latency and the status split.
#   loadtest/oha-throughput.sh            DURATION=10 CONNS=64 PIN_SERVER=1 PIN_LOADGEN=0
source "$(dirname "$0")/common.sh"
need oha "cargo install oha --locked"
DURATION=${DURATION:-10}; CONNS=${CONNS:-64}
start_gateway
run_oha /v1/infer "$WORK/oha.json"
python3 - "$WORK/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); s = d["summary"]; p = d["latencyPercentiles"]
print(f"requests/s {s['requestsPerSec']:.0f}  p50 {p['p50']*1000:.3f} ms  p99 {p['p99']*1000:.3f} ms  statuses {d.get('statusCodeDistribution')}")
PY
curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" | grep '^turnstile_billed_units_total'
