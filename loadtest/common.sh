# Shared by the loadtest scripts: builds turnstile (release), starts a stand-in upstream and the
# gateway on 127.0.0.1 with a generated configuration, and stops both on exit.
# Tenant "bench" (key $API_KEY) has:
#   /v1/infer       license-plate-recognition, pay-as-you-go (metered), limit $PAYG_QPS
#   /v1/face/compare face-comparison-1-1 with a QPS plan of $PLAN_QPS (cap 50)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
API_KEY=${API_KEY:-tenant-a}
PAYG_QPS=${PAYG_QPS:-1000000}
PLAN_QPS=${PLAN_QPS:-50}
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

wait_port() { for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open"; exit 1; }

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
[files]
watch = false
[[routes]]
path = "/v1/infer"
feature = "license-plate-recognition"
[[routes]]
path = "/v1/face/compare"
feature = "face-comparison-1-1"
CONF
  cat > "$WORK/entitlements.json" <<CONF
{"tenants": {"bench": {"api_keys": ["$("$BIN" hash-key "$API_KEY")"], "services": ["text_recognition", "face_body"],
  "qps_plans": [{"feature": "face-comparison-1-1", "qps": $PLAN_QPS, "effective_at": "$now", "expires_at": "$until"}]}}}
CONF
  ${PIN_SERVER:+taskset -c $PIN_SERVER} "$BIN" stand-in --listen "127.0.0.1:$UP_PORT" > "$WORK/upstream.log" 2>&1 &
  PIDS+=($!)
  ${PIN_SERVER:+taskset -c $PIN_SERVER} "$BIN" serve --config "$WORK/turnstile.toml" > "$WORK/gateway.log" 2>&1 &
  PIDS+=($!)
  wait_port "$UP_PORT"; wait_port "$GW_PORT"
}

need() { command -v "$1" >/dev/null || { echo "missing $1: $2"; exit 1; }; }

# oha for DURATION seconds at CONNS connections against PATH, JSON to the given file.
run_oha() { # path outfile
  ${PIN_LOADGEN:+taskset -c $PIN_LOADGEN} timeout -k 5 $((DURATION + 30)) \
    oha --no-tui --output-format json -z "${DURATION}s" -c "$CONNS" -H "x-api-key: $API_KEY" "http://127.0.0.1:$GW_PORT$1" > "$2"
}
