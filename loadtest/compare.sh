#!/usr/bin/env bash
# Side by side, in one run: nginx with limit_req keyed on the API key and turnstile with pay-as-you-go
# metering and the ledger on, each in front of its own identical upstream (an nginx answering "ok",
# one worker, stub_status to count what it served). Rounds alternate between the two proxies so
# drifts hit both. Prints, per workload, the median table and the turnstile/nginx ratios
# (requests/s, p99, CPU µs per request). Everything listens on 127.0.0.1, every load run is bounded
# by `timeout`, and everything started here is stopped at the end (by PID).
#
#   loadtest/compare.sh                                   # LAYOUT=own-core WORKLOAD=hot, 3 rounds x 10 s, wrk, 64 conns
#   WORKLOAD="hot tenants flood" ROUNDS=5 loadtest/compare.sh
#   LAYOUT=shared loadtest/compare.sh                     # the 2026-11-23 layout
#   PROFILE=1 loadtest/compare.sh                         # then one more wrk run per proxy under perf
#   SYSCALLS=1 loadtest/compare.sh                        # then one more wrk run per proxy: system calls per request
#   TURNSTILE_BIN_B=/tmp/new/turnstile loadtest/compare.sh  # adds peer turnstile-b: before/after in the same rounds
#   LEDGER_B='flush_interval_ms = 20' loadtest/compare.sh   # turnstile-b: the same build with these [ledger] lines
#                                                           # (`dir = "/dev/shm/x"`: its ledger on tmpfs; use a new folder)
#
# LAYOUT (issue 14):
#   own-core    (default) the proxy under test ALONE on core 1; load generator and upstream on core 0.
#               The proxy is the only bottleneck; requests/s is the proxy's own per-request cost.
#   shared      today's older layout: upstream and proxy on core 1, load generator on core 0.
#   both-cores  EXTRA, not a clean measurement: proxies may use cores 0-1 (turnstile: 2 runtime threads,
#               nginx: 2 workers) while the load generator and upstream also run on 0-1.
#   (PROXY_CPU, UPSTREAM_CPU, LOADGEN_CPU override the layout's cores.)
# WORKLOAD (one or several, space separated):
#   hot      one tenant/feature, every call admitted and metered pay-as-you-go (nginx: limit_req
#            rate=1000000r/s burst=100000 nodelay, never triggering). Checks: zero non-2xx, billed units
#            == requests the turnstile upstream served.
#   tenants  $TENANTS (10,000) tenants spread evenly: wrk rotates their API keys (loadtest/tenants.lua); nginx's
#            limit_req is keyed on the key as in hot; each tenant pay-as-you-go.
#   flood    a 50 QPS limit with depth 1 flooded: nearly every answer the proxy's own 429 (nginx:
#            limit_req rate=50r/s, burst 0, limit_req_status 429).
#   paced    hot's tenant and limits over many lightly used connections: $PACED_CONNS (512) connections,
#            each waiting $PACE_MS (20) ms before each request (loadtest/paced.lua), about 25,000
#            requests/s offered to both proxies alike: CPU µs/request when each readiness event carries
#            one request (the issue's k6 observation), not a saturated loop. Checks as in hot.
# CPU µs/request = user+system time (/proc/PID/stat, every thread / worker of the proxy) during a run,
# over the requests wrk completed. "other on proxy cores" = busy time of the proxy's cores (/proc/stat)
# not spent by the proxy, in cores: above ~0.05 something else (a compile) shared the proxy's core
# and requests/s of that run is noisy; CPU µs/request is much less affected.
#
# Needs: nginx (with stub_status), wrk (Debian packages), taskset; optionally oha (TOOLS="wrk oha");
# for PROFILE and SYSCALLS: perf (apt-get install linux-perf; run as root); inferno (cargo install inferno)
# only for flamegraph SVGs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export NO_PROXY='*' no_proxy='*'

DURATION=${DURATION:-10}; CONNS=${CONNS:-64}; ROUNDS=${ROUNDS:-3}; WARMUP=${WARMUP:-2}
TOOLS=${TOOLS:-wrk}; API_KEY=${API_KEY:-tenant-a}; export TENANTS=${TENANTS:-10000}   # read by loadtest/tenants.lua too
PACED_CONNS=${PACED_CONNS:-512}; export PACE_MS=${PACE_MS:-20}                        # read by loadtest/paced.lua
LAYOUT=${LAYOUT:-own-core}; WORKLOAD=${WORKLOAD:-hot}
case $LAYOUT in
  own-core) d_load=0; d_up=0; d_proxy=1 ;;
  shared) d_load=0; d_up=1; d_proxy=1 ;;
  both-cores) d_load=0-1; d_up=0-1; d_proxy=0-1 ;;
  *) echo "LAYOUT must be own-core, shared or both-cores"; exit 1 ;;
esac
LOADGEN_CPU=${LOADGEN_CPU:-$d_load}; UPSTREAM_CPU=${UPSTREAM_CPU:-$d_up}; PROXY_CPU=${PROXY_CPU:-$d_proxy}
PROXY_CORES=$(taskset -c "$PROXY_CPU" nproc)
for w in $WORKLOAD; do
  case $w in hot | tenants | flood | paced) ;; *) echo "WORKLOAD must be among: hot tenants flood paced"; exit 1 ;; esac
done
UP_NGX=18180; UP_TS=18183; NGINX_PORT=18181; TS_PORT=18182; TS_ADMIN=18192
RUN=${RUN_DIR:-/tmp/turnstile-compare/run-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RUN/raw"

for t in nginx taskset wrk curl; do command -v "$t" >/dev/null || { echo "missing $t (apt-get install nginx-light wrk)"; exit 1; }; done
for p in $UP_NGX $UP_TS $NGINX_PORT $TS_PORT $TS_ADMIN $((TS_PORT + 2)) $((TS_ADMIN + 2)); do
  if (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "port $p is busy"; exit 1; fi
done

PROFILE=${PROFILE:-}; SYSCALLS=${SYSCALLS:-}; BUILD=release
[ -z "$PROFILE$SYSCALLS" ] || command -v perf >/dev/null || { echo "missing perf (apt-get install linux-perf)"; exit 1; }
[ -z "$PROFILE" ] || BUILD=profiling   # release code with debug symbols, for perf's DWARF call graphs
BIN=${TURNSTILE_BIN:-$ROOT/target/$BUILD/turnstile}
[ -x "$BIN" ] && [ -z "${REBUILD:-}" ] || cargo build --profile "$BUILD" --locked --bin turnstile
BIN=$(readlink -f "$BIN")
BIN_B=${TURNSTILE_BIN_B:+$(readlink -f "$TURNSTILE_BIN_B")}   # optional second build, measured in the same rounds
LEDGER_B=${LEDGER_B:-}; [ -n "$LEDGER_B$BIN_B" ] && BIN_B=${BIN_B:-$BIN}   # or the same build with other ledger settings

PIDS=()
stop() { # pid...: TERM, then KILL after 5 s, then reap
  local pid
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null && [ "$(awk '{print $3}' /proc/"$pid"/stat 2>/dev/null)" != Z ] || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
  done
}
cleanup() { [ ${#PIDS[@]} -eq 0 ] || stop "${PIDS[@]}"; }
trap cleanup EXIT
start() { # name cpus command...  (PID appended to PIDS; $! is the process itself thanks to exec)
  local name=$1 cpus=$2; shift 2
  taskset -c "$cpus" "$@" > "$RUN/$name.out" 2>&1 &
  PIDS+=($!)
}
wait_port() { for _ in $(seq 100); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open"; exit 1; }

# --- the two upstreams (identical; one per proxy so each one's served count can be read) ---
common_http='access_log off; default_type text/plain; keepalive_requests 10000000; keepalive_timeout 65s;
    client_body_temp_path temp/body; proxy_temp_path temp/proxy; fastcgi_temp_path temp/fastcgi;
    uwsgi_temp_path temp/uwsgi; scgi_temp_path temp/scgi;'
for up in $UP_NGX $UP_TS; do
  mkdir -p "$RUN/upstream-$up"/{logs,temp}
  cat > "$RUN/upstream-$up/nginx.conf" <<CONF
worker_processes 1; pid logs/nginx.pid; error_log logs/error.log warn;
events { worker_connections 4096; multi_accept on; }
http { $common_http
  server { listen 127.0.0.1:$up backlog=4096; location = /__count { stub_status; } location / { return 200 "ok\n"; } } }
CONF
  start "upstream-$up" "$UPSTREAM_CPU" nginx -g 'daemon off;' -e logs/error.log -p "$RUN/upstream-$up/" -c "$RUN/upstream-$up/nginx.conf"
  wait_port "$up"
done
UPSTREAM_PIDS=("${PIDS[@]}")
served() { curl -fsS "http://127.0.0.1:$1/__count" | awk '/^ *[0-9]+ +[0-9]+ +[0-9]+/ {print $3}'; }  # requests, this one included

# --- per-process counters (all threads / all workers) ---
family() { echo "$1" $(pgrep -P "$1" || true); }
counters() { # pid... -> user ticks, system ticks, context switches
  local u=0 s=0 c=0 pid a b
  for pid in "$@"; do
    read -r a b < <(awk '{print $14, $15}' "/proc/$pid/stat")
    u=$((u + a)); s=$((s + b))
    c=$((c + $(cat /proc/"$pid"/task/*/status 2>/dev/null | awk '/ctxt_switches/ {n += $2} END {print n + 0}')))
  done
  echo "$u $s $c"
}
cores_busy() { # ticks of the cores in $PROXY_CPU (/proc/stat): user+nice, system, irq+softirq, steal
  taskset -c "$PROXY_CPU" python3 -c "
import os
cores = os.sched_getaffinity(0); t = [0, 0, 0, 0]
for l in open('/proc/stat'):
    f = l.split()
    if f[0].startswith('cpu') and f[0] != 'cpu' and int(f[0][3:]) in cores:
        v = list(map(int, f[1:9]))
        for i, x in enumerate((v[0] + v[1], v[2], v[5] + v[6], v[7])):
            t[i] += x
print(*t)"
}


load() { # workload tool port seconds outfile
  local w=$1 tool=$2 port=$3 secs=$4 out=$5 url="http://127.0.0.1:$3/v1/infer"
  local keyarg=(-H "x-api-key: $API_KEY") conns=$CONNS
  [ "$w" = tenants ] && keyarg=(-s "$ROOT/loadtest/tenants.lua")
  [ "$w" = paced ] && keyarg+=(-s "$ROOT/loadtest/paced.lua") && conns=$PACED_CONNS
  case $tool in
    wrk) timeout -k 5 $((secs + 30)) taskset -c "$LOADGEN_CPU" wrk -t1 -c "$conns" -d "${secs}s" --latency "${keyarg[@]}" "$url" > "$out" ;;
    oha)
      case $w in tenants | paced) echo "oha cannot rotate keys or pace connections: $w runs with wrk only" > "$out"; return 0 ;; esac
      timeout -k 5 $((secs + 30)) taskset -c "$LOADGEN_CPU" oha --no-tui --output-format json -z "${secs}s" -c "$CONNS" "${keyarg[@]}" "$url" > "$out" ;;
  esac
}

write_configs() { # workload dir
  local w=$1 d=$2 rl qps=1000000 burst=1.0
  mkdir -p "$d/nginx"/{logs,temp} "$d/tmpl"
  case $w in
    flood) rl='limit_req_zone $http_x_api_key zone=rl:10m rate=50r/s;'; qps=50; burst=0.02
      lim='limit_req zone=rl;' ;;   # burst 0
    *) rl='limit_req_zone $http_x_api_key zone=rl:10m rate=1000000r/s;'; lim='limit_req zone=rl burst=100000 nodelay;' ;;
  esac
  cat > "$d/nginx/nginx.conf" <<CONF
worker_processes $PROXY_CORES; pid logs/nginx.pid; error_log logs/error.log warn;
events { worker_connections 8192; multi_accept on; }
http { $common_http
  upstream up { server 127.0.0.1:$UP_NGX; keepalive 128; keepalive_requests 10000000; keepalive_timeout 60s; }
  $rl
  proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host; proxy_buffering on;
  server { listen 127.0.0.1:$NGINX_PORT backlog=4096 reuseport;
    limit_req_status 429; limit_req_log_level info;
    location / { $lim proxy_pass http://up; } } }
CONF
  cp config/catalog.toml "$d/tmpl/catalog.toml"
  cat > "$d/tmpl/turnstile.toml" <<CONF
[server]
listen = "127.0.0.1:$TS_PORT"
admin_listen = "127.0.0.1:$TS_ADMIN"
upstream = "http://127.0.0.1:$UP_TS"
[admission]
default_qps = $qps
burst_seconds = $burst        # flood: depth max(1, floor(50 x 0.02)) = 1, like burst 0
[ledger]
dir = "ledger"
durability = "batched"
[files]
watch = false
[[routes]]
path = "/v1/infer"
feature = "license-plate-recognition"   # pay-as-you-go with graduated tiers: every admitted call is metered
CONF
  local n=1 prefix=$API_KEY
  [ "$w" = tenants ] && n=$TENANTS && prefix=tenant-
  python3 - "$n" "$prefix" > "$d/tmpl/entitlements.json" <<'PY'
import hashlib, json, sys
n, prefix = int(sys.argv[1]), sys.argv[2]
keys = [prefix] if n == 1 else [f"{prefix}{i}" for i in range(1, n + 1)]
print(json.dumps({"tenants": {f"t{i}": {"api_keys": [hashlib.sha256(k.encode()).hexdigest()],
                                         "services": ["text_recognition"]} for i, k in enumerate(keys, 1)}}))
PY
  "$BIN" check --config "$d/tmpl/turnstile.toml" > /dev/null
}

echo "$DURATION" > "$RUN/duration"
{
  echo "run folder: $RUN"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ); machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); kernel $(uname -r)"
  echo "nginx $(nginx -v 2>&1 | cut -d/ -f2); wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'); turnstile $("$BIN" --version | cut -d' ' -f2) ($BIN)"
  echo "layout $LAYOUT: proxy on cpu $PROXY_CPU ($PROXY_CORES core(s)), upstream on $UPSTREAM_CPU, load generator on $LOADGEN_CPU;" \
    "workloads: $WORKLOAD; tools: $TOOLS; $ROUNDS rounds x ${DURATION}s, $CONNS connections (paced: $PACED_CONNS, ${PACE_MS} ms apart); load average $(cut -d' ' -f1-3 /proc/loadavg)"
} | tee "$RUN/header.txt"

for w in $WORKLOAD; do
  d="$RUN/$w"; write_configs "$w" "$d"
  before_ts=$(served $UP_TS)
  start "nginx-$w" "$PROXY_CPU" nginx -g 'daemon off;' -e logs/error.log -p "$d/nginx/" -c "$d/nginx/nginx.conf"
  NGX_PID=${PIDS[-1]}
  # turnstile (and, with TURNSTILE_BIN_B, a second build "turnstile-b" on the next ports, same upstream)
  declare -A PORT_OF=([nginx]=$NGINX_PORT) PIDS_OF=() UPS_OF=() ADMIN_OF=()
  PEERS=(nginx turnstile); TS_PIDS=()
  [ -n "$BIN_B" ] && PEERS+=(turnstile-b)
  for peer in "${PEERS[@]:1}"; do
    bin=$BIN; port=$TS_PORT; admin=$TS_ADMIN
    [ "$peer" = turnstile-b ] && bin=$BIN_B && port=$((TS_PORT + 2)) && admin=$((TS_ADMIN + 2))
    mkdir -p "$d/$peer"
    sed -e "s/:$TS_PORT\"/:$port\"/" -e "s/:$TS_ADMIN\"/:$admin\"/" "$d/tmpl/turnstile.toml" > "$d/$peer/turnstile.toml"
    # A key given twice is a TOML error: LEDGER_B's lines replace the template's lines of the same keys.
    [ "$peer" = turnstile-b ] && [ -n "$LEDGER_B" ] && python3 - "$d/$peer/turnstile.toml" "$LEDGER_B" <<'PY'
import re, sys
path, extra = sys.argv[1], sys.argv[2]
keys = {l.split("=")[0].strip() for l in extra.splitlines() if "=" in l}
out, section = [], None
for line in open(path).read().splitlines():
    m = re.match(r"\[(\w+)\]", line)
    section = m.group(1) if m else section
    if section == "ledger" and "=" in line and line.split("=")[0].strip() in keys:
        continue
    out.append(line)
    if line == "[ledger]":
        out.extend(extra.splitlines())
open(path, "w").write("\n".join(out) + "\n")
PY
    cp "$d/tmpl/catalog.toml" "$d/tmpl/entitlements.json" "$d/$peer/"
    (cd "$d/$peer" && exec taskset -c "$PROXY_CPU" env -u TURNSTILE_ADMIN_TOKEN "$bin" serve --config turnstile.toml) > "$d/$peer.out" 2>&1 &
    PIDS+=($!); TS_PIDS+=($!); PIDS_OF[$peer]=$!; PORT_OF[$peer]=$port; ADMIN_OF[$peer]=$admin
  done
  sanity_key=$API_KEY; [ "$w" = tenants ] && sanity_key=tenant-1
  for peer in "${PEERS[@]}"; do
    wait_port "${PORT_OF[$peer]}"
    code=$(curl -sS -o /dev/null -w '%{http_code}' -H "x-api-key: $sanity_key" "http://127.0.0.1:${PORT_OF[$peer]}/v1/infer")
    [ "$code" = 200 ] || { echo "sanity: $peer answered $code, not 200"; cat "$d"/*.out; exit 1; }
  done
  PIDS_OF[nginx]=$(family "$NGX_PID"); UPS_OF[nginx]=$(family "${UPSTREAM_PIDS[0]}")
  for peer in "${PEERS[@]:1}"; do UPS_OF[$peer]=$(family "${UPSTREAM_PIDS[1]}"); done
  for tool in $TOOLS; do
    command -v "$tool" >/dev/null || { echo "skipping $tool: not installed"; continue; }
    for peer in "${PEERS[@]}"; do load "$w" "$tool" "${PORT_OF[$peer]}" "$WARMUP" "$RUN/raw/$w.$tool.$peer.warm"; done
    for r in $(seq "$ROUNDS"); do
      n=${#PEERS[@]}; order=()   # rotate the order each round so drifts hit every peer
      for i in $(seq 0 $((n - 1))); do order+=("${PEERS[$(((i + r - 1) % n))]}"); done
      for peer in "${order[@]}"; do
        [ "$w" = flood ] && sleep 1.1   # let the 50 r/s bucket refill, as for every peer
        b="$(counters ${PIDS_OF[$peer]}) $(counters ${UPS_OF[$peer]}) $(cores_busy)"
        load "$w" "$tool" "${PORT_OF[$peer]}" "$DURATION" "$RUN/raw/$w.$tool.$peer.$r.txt"
        a="$(counters ${PIDS_OF[$peer]}) $(counters ${UPS_OF[$peer]}) $(cores_busy)"
        paste -d' ' <(tr ' ' '\n' <<< "$a") <(tr ' ' '\n' <<< "$b") | awk '{printf "%d ", $1 - $2}' > "$RUN/raw/$w.$tool.$peer.$r.cpu"
        echo "  $w $tool round $r $peer done (load average $(cut -d' ' -f1 /proc/loadavg))"
      done
    done
  done
  if [ -n "$PROFILE" ]; then
    # One more wrk run per proxy, sampled by perf on the CPU clock (no hardware counters on this VM)
    # with DWARF call graphs; perf starts a second into the run and stops a second before its end.
    for peer in "${PEERS[@]}"; do
      ppid=${PIDS_OF[$peer]}; [ "$peer" = nginx ] && ppid=$(echo ${PIDS_OF[nginx]} | tr ' ' ',')
      load "$w" wrk "${PORT_OF[$peer]}" "$DURATION" "$RUN/$w.$peer-profiled-wrk.txt" &
      lp=$!
      sleep 1
      perf record -q -e cpu-clock -F 499 --call-graph dwarf,16384 -p "$ppid" -o "$RUN/$w.$peer.perf.data" \
        -- sleep $((DURATION > 3 ? DURATION - 2 : 1)) 2>/dev/null || true
      wait $lp
      perf script -i "$RUN/$w.$peer.perf.data" 2>/dev/null | python3 "$ROOT/loadtest/compare_table.py" --fold > "$RUN/$w.$peer.folded"
      if command -v inferno-flamegraph >/dev/null; then
        inferno-flamegraph --minwidth 1 --title "$peer, $w, $LAYOUT" < "$RUN/$w.$peer.folded" > "$RUN/$w.$peer-flamegraph.svg"
      fi
      [ -n "${KEEP_PERF_DATA:-}" ] || rm -f "$RUN/$w.$peer.perf.data"   # 20-60 MB each; the folded stacks stay
      echo "  profiled $peer: $RUN/$w.$peer.folded"
    done
  fi
  if [ -n "$SYSCALLS" ]; then
    # One more wrk run per proxy (7 s), its system calls and context switches counted by perf on
    # tracepoints (every thread / worker) for 5 s from a second into it, over its requests/s.
    for peer in "${PEERS[@]}"; do
      load "$w" wrk "${PORT_OF[$peer]}" 7 "$RUN/$w.$peer-syscalls-wrk.txt" &
      lp=$!
      sleep 1
      perf stat -x, -o "$RUN/$w.$peer.syscalls" -p "$(echo ${PIDS_OF[$peer]} | tr ' ' ',')" -e \
        'syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_fdatasync,sched:sched_switch' \
        -- sleep 5 2>/dev/null || true
      wait $lp
      awk -F, -v rps="$(awk '/Requests\/sec/ {print $2}' "$RUN/$w.$peer-syscalls-wrk.txt")" -v head="$w $peer" '
        $3 ~ /:/ { n = $3; sub(/.*(sys_enter_|:)/, "", n); line = line sprintf(" %s %.3f", n, $1 / (rps * 5)) }
        END { printf "%s: per request%s (at %s requests/s)\n", head, line, rps }' "$RUN/$w.$peer.syscalls" | tee -a "$RUN/syscalls.txt"
    done
  fi
  sleep 1   # let in-flight settlements land before counting
  : > "$RUN/$w.turnstile-metrics.txt"
  for peer in "${PEERS[@]:1}"; do curl -fsS "http://127.0.0.1:${ADMIN_OF[$peer]}/metrics" >> "$RUN/$w.turnstile-metrics.txt"; done
  echo $(( $(served $UP_TS) - before_ts - 1 )) > "$RUN/$w.upstream-served"
  stop "$NGX_PID" "${TS_PIDS[@]}"
  PIDS=("${UPSTREAM_PIDS[@]}")
  unset PORT_OF PIDS_OF UPS_OF ADMIN_OF
done
python3 "$ROOT/loadtest/compare_table.py" "$RUN" | tee "$RUN/summary.txt"
[ -z "$PROFILE" ] || python3 "$ROOT/loadtest/compare_table.py" --profile "$RUN" | tee "$RUN/profile.txt"
