# Shared by the loadtest scripts: builds turnstile (release), starts a stand-in upstream and the
# gateway on 127.0.0.1 with a generated configuration, and stops both on exit.
# Tenant "bench" (key $API_KEY) has:
#   /v1/infer       license-plate-recognition, pay-as-you-go (metered), limit $PAYG_QPS
#                   (bucket depth: $PAYG_QPS x $BURST_SECONDS, at least 1)
#   /v1/face/compare face-comparison-1-1 with a QPS plan of $PLAN_QPS (cap 50)
# With TENANTS=N (N > 1), N more tenants t1..tN (keys tenant-1..tenant-N) call /v1/infer the
# same way (wrk -s loadtest/tenants.lua rotates their keys; export TENANTS for it).
# GATEWAY_WRAP (e.g. a valgrind command line) is put before the gateway's command.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
API_KEY=${API_KEY:-tenant-a}
PAYG_QPS=${PAYG_QPS:-1000000}
BURST_SECONDS=${BURST_SECONDS:-1.0}
PLAN_QPS=${PLAN_QPS:-50}
TENANTS=${TENANTS:-1}
UP_PORT=${UP_PORT:-18280}; GW_PORT=${GW_PORT:-18281}; ADMIN_PORT=${ADMIN_PORT:-18291}
WORK=$(mktemp -d /tmp/turnstile-loadtest.XXXXXX)
BIN=${TURNSTILE_BIN:-$ROOT/target/release/turnstile}
[ -x "$BIN" ] && [ -z "${REBUILD:-}" ] || (cd "$ROOT" && cargo build --release --locked --bin turnstile)
PIDS=()
stop_all() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap stop_all EXIT

wait_port() { for _ in $(seq "${WAIT_TRIES:-100}"); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open"; exit 1; }

start_gateway() {
  local now until
  now=$(date -u -d '-1 hour' +%Y-%m-%dT%H:%M:%SZ); until=$(date -u -d '+1 day' +%Y-%m-%dT%H:%M:%SZ)
  cp "$ROOT/config/catalog.toml" "$WORK/catalog.toml"
  cat > "$WORK/turnstile.toml" <<CONF
[server]
listen = "127.0.0.1:$GW_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
upstream = "http://127.0.0.1:$UP_PORT"
shutdown_grace_ms = 0                # no load balancer here: stop at once, so the next run can bind
[admission]
default_qps = $PAYG_QPS
burst_seconds = $BURST_SECONDS
[files]
watch = false
[[routes]]
path = "/v1/infer"
feature = "license-plate-recognition"
[[routes]]
path = "/v1/face/compare"
feature = "face-comparison-1-1"
CONF
  python3 - "$("$BIN" hash-key "$API_KEY")" "$PLAN_QPS" "$now" "$until" "$TENANTS" > "$WORK/entitlements.json" <<'PY'
import hashlib, json, sys
key, plan, now, until, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
tenants = {"bench": {"api_keys": [key], "services": ["text_recognition", "face_body"],
                     "qps_plans": [{"feature": "face-comparison-1-1", "qps": plan, "effective_at": now, "expires_at": until}]}}
if n > 1:
    for i in range(1, n + 1):
        tenants[f"t{i}"] = {"api_keys": [hashlib.sha256(f"tenant-{i}".encode()).hexdigest()], "services": ["text_recognition"]}
print(json.dumps({"tenants": tenants}))
PY
  ${PIN_SERVER:+taskset -c $PIN_SERVER} "$BIN" stand-in --listen "127.0.0.1:$UP_PORT" > "$WORK/upstream.log" 2>&1 &
  PIDS+=($!)
  ${PIN_SERVER:+taskset -c $PIN_SERVER} ${GATEWAY_WRAP:-} "$BIN" serve --config "$WORK/turnstile.toml" > "$WORK/gateway.log" 2>&1 &
  PIDS+=($!)
  wait_port "$UP_PORT"; wait_port "$GW_PORT"
}

need() { command -v "$1" >/dev/null || { echo "missing $1: $2"; exit 1; }; }

# oha for DURATION seconds at CONNS connections against PATH, JSON to the given file.
run_oha() { # path outfile
  ${PIN_LOADGEN:+taskset -c $PIN_LOADGEN} timeout -k 5 $((DURATION + 30)) \
    oha --no-tui --output-format json -z "${DURATION}s" -c "$CONNS" -H "x-api-key: $API_KEY" "http://127.0.0.1:$GW_PORT$1" > "$2"
}
