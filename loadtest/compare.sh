#!/usr/bin/env bash
# Side by side, in one run: nginx with limit_req keyed on the API key (never triggering,
# limit_req_status 429) and turnstile with pay-as-you-go metering on, in front of the same
# upstream (an nginx answering "ok"). The load generator is pinned to one core, the servers to the
# other; rounds alternate between the two proxies so drifts hit both. Prints the median table and
# the turnstile/nginx ratios. Everything listens on 127.0.0.1 and is stopped at the end.
#
#   loadtest/compare.sh                        # 3 rounds x 10 s, wrk, 64 connections
#   ROUNDS=5 DURATION=15 TOOLS="wrk oha" loadtest/compare.sh
#   PROFILE=1 loadtest/compare.sh              # then one more wrk run per proxy under perf, with
#                                              # flamegraphs (needs perf and inferno, see below)
#
# Needs: nginx, wrk (Debian packages), optionally oha (cargo install oha --locked), taskset;
# for PROFILE: perf (apt-get install linux-perf) and inferno (cargo install inferno --locked).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DURATION=${DURATION:-10}; CONNS=${CONNS:-64}; ROUNDS=${ROUNDS:-3}; WARMUP=${WARMUP:-2}
TOOLS=${TOOLS:-wrk}; LOADGEN_CPU=${LOADGEN_CPU:-0}; SERVER_CPU=${SERVER_CPU:-1}
API_KEY=${API_KEY:-tenant-a}
UP_PORT=18180; NGINX_PORT=18181; TS_PORT=18182; TS_ADMIN=18192
RUN=${RUN_DIR:-/tmp/turnstile-compare/run-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN"/{upstream,proxy,turnstile,raw}/ "$RUN"/upstream/{logs,temp} "$RUN"/proxy/{logs,temp}

for t in nginx taskset; do command -v "$t" >/dev/null || { echo "missing $t (apt-get install nginx util-linux)"; exit 1; }; done
for p in $UP_PORT $NGINX_PORT $TS_PORT $TS_ADMIN; do
  if (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "port $p is busy"; exit 1; fi
done

PROFILE=${PROFILE:-}; BUILD=release
if [ -n "$PROFILE" ]; then
  BUILD=profiling   # release code with debug symbols, for perf's DWARF call graphs
  for t in wrk perf inferno-collapse-perf inferno-flamegraph; do
    command -v "$t" >/dev/null || { echo "missing $t (apt-get install wrk linux-perf; cargo install inferno --locked)"; exit 1; }
  done
fi
BIN=${TURNSTILE_BIN:-$ROOT/target/$BUILD/turnstile}
[ -x "$BIN" ] && [ -z "${REBUILD:-}" ] || cargo build --profile "$BUILD" --locked --bin turnstile
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# --- upstream and nginx proxy (same settings as ../shared/peers) ---
common_http='access_log off; default_type text/plain; keepalive_requests 10000000; keepalive_timeout 65s;
    client_body_temp_path temp/body; proxy_temp_path temp/proxy; fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi; scgi_temp_path temp/scgi;'
cat > "$RUN/upstream/nginx.conf" <<CONF
worker_processes 1; pid logs/nginx.pid; error_log logs/error.log warn;
events { worker_connections 4096; multi_accept on; }
http { $common_http
  server { listen 127.0.0.1:$UP_PORT backlog=4096; location / { return 200 "ok\n"; } } }
CONF
cat > "$RUN/proxy/nginx.conf" <<CONF
worker_processes 1; pid logs/nginx.pid; error_log logs/error.log warn;
events { worker_connections 8192; multi_accept on; }
http { $common_http
  upstream up { server 127.0.0.1:$UP_PORT; keepalive 128; keepalive_requests 10000000; keepalive_timeout 60s; }
  limit_req_zone \$http_x_api_key zone=rl_high:10m rate=1000000r/s;
  proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host; proxy_buffering on;
  server { listen 127.0.0.1:$NGINX_PORT backlog=4096;
    limit_req_status 429; limit_req_log_level info;
    location / { limit_req zone=rl_high burst=100000 nodelay; proxy_pass http://up; } } }
CONF

# --- turnstile: the shipped catalog, one pay-as-you-go tenant, metering on ---
cp config/catalog.toml "$RUN/turnstile/catalog.toml"
cat > "$RUN/turnstile/turnstile.toml" <<CONF
[server]
listen = "127.0.0.1:$TS_PORT"
admin_listen = "127.0.0.1:$TS_ADMIN"
upstream = "http://127.0.0.1:$UP_PORT"
[admission]
default_qps = 1000000        # never triggers, like nginx's rate=1000000r/s
burst_seconds = 1.0
[ledger]
dir = "ledger"
durability = "batched"
[files]
watch = false
[[routes]]
path = "/v1/infer"
feature = "license-plate-recognition"   # pay-as-you-go with graduated tiers: every call is metered
CONF
HASH=$("$BIN" hash-key "$API_KEY")
cat > "$RUN/turnstile/entitlements.json" <<CONF
{"tenants": {"bench": {"api_keys": ["$HASH"], "services": ["text_recognition"]}}}
CONF
"$BIN" check --config "$RUN/turnstile/turnstile.toml"

start() { # name, command...
  local name=$1; shift
  taskset -c "$SERVER_CPU" "$@" > "$RUN/$name.out" 2>&1 &
  PIDS+=($!)
}
start upstream nginx -g 'daemon off;' -e logs/error.log -p "$RUN/upstream/" -c "$RUN/upstream/nginx.conf"
start proxy nginx -g 'daemon off;' -e logs/error.log -p "$RUN/proxy/" -c "$RUN/proxy/nginx.conf"
start turnstile "$BIN" serve --config "$RUN/turnstile/turnstile.toml"
for p in $UP_PORT $NGINX_PORT $TS_PORT; do
  for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.1; done
done
curl -fsS -H "x-api-key: $API_KEY" "http://127.0.0.1:$TS_PORT/v1/infer" >/dev/null
curl -fsS -H "x-api-key: $API_KEY" "http://127.0.0.1:$NGINX_PORT/v1/infer" >/dev/null

counters() { # pid -> user CPU, system CPU (1/100 s) and context switches of all its threads
  echo "$(awk '{print $14, $15}' "/proc/$1/stat") $(cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ {n += $2} END {print n}')"
}
delta() { paste -d' ' <(tr ' ' '\n' <<< "$2") <(tr ' ' '\n' <<< "$1") | awk '{printf "%d ", $1 - $2}'; }
load() { # tool port seconds outfile
  local tool=$1 port=$2 secs=$3 out=$4 url="http://127.0.0.1:$2/v1/infer"
  case $tool in
    wrk) timeout -k 5 $((secs + 30)) taskset -c "$LOADGEN_CPU" wrk -t1 -c "$CONNS" -d "${secs}s" --latency -H "x-api-key: $API_KEY" "$url" > "$out" ;;
    oha) timeout -k 5 $((secs + 30)) taskset -c "$LOADGEN_CPU" oha --no-tui --output-format json -z "${secs}s" -c "$CONNS" -H "x-api-key: $API_KEY" "$url" > "$out" ;;
  esac
}

UP_WORKER=$(pgrep -P "${PIDS[0]}" | head -1)
PROXY_WORKER=$(pgrep -P "${PIDS[1]}" | head -1)
TS_PID=${PIDS[2]}
echo "$DURATION" > "$RUN/duration"
echo "run folder: $RUN"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); nginx $(nginx -v 2>&1 | cut -d/ -f2); turnstile $("$BIN" --version | cut -d' ' -f2)"
for tool in $TOOLS; do
  command -v "$tool" >/dev/null || { echo "skipping $tool: not installed"; continue; }
  for port in $NGINX_PORT $TS_PORT; do load "$tool" "$port" "$WARMUP" /dev/null; done
  for r in $(seq "$ROUNDS"); do
    for peer in nginx turnstile; do
      port=$NGINX_PORT; pid=$PROXY_WORKER
      [ "$peer" = turnstile ] && port=$TS_PORT && pid=$TS_PID
      before="$(counters "$pid") $(counters "$UP_WORKER")"
      load "$tool" "$port" "$DURATION" "$RUN/raw/$tool-$peer-$r.txt"
      delta "$before" "$(counters "$pid") $(counters "$UP_WORKER")" > "$RUN/raw/$tool-$peer-$r.cpu"
      echo "  $tool round $r $peer done"
    done
  done
done
if [ -n "$PROFILE" ]; then
  # One more run per proxy, sampled by perf on the CPU clock (no hardware counters on VMs) with
  # DWARF call graphs; perf starts a second into the run and stops a second before its end.
  for peer in nginx turnstile; do
    port=$NGINX_PORT; pid=$PROXY_WORKER
    [ "$peer" = turnstile ] && port=$TS_PORT && pid=$TS_PID
    load wrk "$port" "$DURATION" "$RUN/$peer-profiled-wrk.txt" &
    sleep 1
    perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$pid" -o "$RUN/$peer.perf.data" \
      -- sleep $((DURATION > 3 ? DURATION - 2 : 1)) 2>/dev/null
    wait $!
    perf script -i "$RUN/$peer.perf.data" 2>/dev/null | inferno-collapse-perf --kernel > "$RUN/$peer.folded"
    inferno-flamegraph --minwidth 1 --title "$peer under wrk ($CONNS connections)" < "$RUN/$peer.folded" > "$RUN/$peer-flamegraph.svg"
    perf report -i "$RUN/$peer.perf.data" --no-children --sort dso,sym -g none 2>/dev/null \
      | awk '!/^#/ && NF && n++ < 25' > "$RUN/$peer-top.txt"
    echo "  profiled $peer: $RUN/$peer-flamegraph.svg, $RUN/$peer-top.txt"
  done
  python3 "$ROOT/loadtest/compare_table.py" --profile "$RUN" | tee "$RUN/profile.txt"
fi
curl -fsS "http://127.0.0.1:$TS_ADMIN/metrics" > "$RUN/turnstile-metrics.txt"
python3 "$ROOT/loadtest/compare_table.py" "$RUN" | tee "$RUN/summary.txt"
