#!/usr/bin/env bash
# Overload accuracy: a tenant with a PLAN_QPS (50) QPS plan is flooded for DURATION (10) seconds;
# GCRA with depth = limit admits between limit x T and limit x T + depth (+1 for the first
# request of an idle key): 500 to 551 for 50 QPS over 10 s. Exits 1 outside that range.
source "$(dirname "$0")/common.sh"
need oha "cargo install oha --locked"
DURATION=${DURATION:-10}; CONNS=${CONNS:-64}
start_gateway
run_oha /v1/face/compare "$WORK/oha.json"
python3 - "$WORK/oha.json" "$PLAN_QPS" "$DURATION" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); qps, secs = int(sys.argv[2]), float(sys.argv[3])
codes = d.get("statusCodeDistribution", {})
ok, throttled = codes.get("200", 0), codes.get("429", 0)
elapsed = d["summary"]["total"]
low, high = int(qps * secs), int(qps * secs + qps + 1)
print(f"{qps} QPS flooded for {elapsed:.2f} s: admitted {ok}, throttled {throttled}, other {sum(codes.values()) - ok - throttled}; expected {low}..{high}")
sys.exit(0 if low <= ok <= high else 1)
PY
