#!/usr/bin/env bash
# Where each proxy's CPU per request goes, user space against the kernel, and its system calls
# and context switches per request: nginx (limit_req, as in compare.sh) and turnstile (hot: one
# tenant, pay-as-you-go, ledger on), one after the other, in the own-core layout (the proxy
# alone on core 1; an nginx upstream and wrk on core 0). README, "2026-12-07".
#
#   loadtest/kernel.sh                         # ROUNDS=1, 8 s wrk runs, 64 connections
#   TURNSTILE_BIN=/tmp/other/turnstile ROUNDS=2 loadtest/kernel.sh
#
# Per proxy and round prints requests/s; user and kernel µs per request of the proxy's threads
# and of the rest of core 1 (perf record -C 1 on the CPU clock, 6 s); then system calls and
# context switches per request (perf stat on tracepoints, 5 s, a separate wrk run).
# Needs nginx, wrk, perf (apt-get install nginx-light wrk linux-perf), run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${TURNSTILE_BIN:-$ROOT/target/release/turnstile}
[ -x "$BIN" ] || cargo build --release --locked --bin turnstile
ROUNDS=${ROUNDS:-1}; CONNS=${CONNS:-64}
for t in nginx wrk perf taskset; do command -v "$t" >/dev/null || { echo "missing $t"; exit 1; }; done
UP=18480; NGX=18481; TS=18482; TS_ADMIN=18492
for p in $UP $NGX $TS $TS_ADMIN; do
  if (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null; then echo "port $p is busy"; exit 1; fi
done
D=$(mktemp -d /tmp/turnstile-kernel.XXXXXX)
mkdir -p "$D"/up/{logs,temp} "$D"/px/{logs,temp} "$D"/ts
common='access_log off; default_type text/plain; keepalive_requests 10000000; keepalive_timeout 65s;
  client_body_temp_path temp/body; proxy_temp_path temp/proxy; fastcgi_temp_path temp/fastcgi;
  uwsgi_temp_path temp/uwsgi; scgi_temp_path temp/scgi;'
cat > "$D/up/nginx.conf" <<CONF
worker_processes 1; pid logs/nginx.pid; error_log logs/error.log warn;
events { worker_connections 4096; multi_accept on; }
http { $common server { listen 127.0.0.1:$UP backlog=4096; location / { return 200 "ok\n"; } } }
CONF
cat > "$D/px/nginx.conf" <<CONF
worker_processes 1; pid logs/nginx.pid; error_log logs/error.log warn;
events { worker_connections 8192; multi_accept on; }
http { $common
  upstream up { server 127.0.0.1:$UP; keepalive 128; keepalive_requests 10000000; keepalive_timeout 60s; }
  limit_req_zone \$http_x_api_key zone=rl:10m rate=1000000r/s;
  proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host \$host; proxy_buffering on;
  server { listen 127.0.0.1:$NGX backlog=4096 reuseport;
    location / { limit_req zone=rl burst=100000 nodelay; proxy_pass http://up; } } }
CONF
cp config/catalog.toml "$D/ts/"
cat > "$D/ts/turnstile.toml" <<CONF
[server]
listen = "127.0.0.1:$TS"
admin_listen = "127.0.0.1:$TS_ADMIN"
upstream = "http://127.0.0.1:$UP"
[admission]
default_qps = 1000000
[ledger]
dir = "ledger"
durability = "batched"
[files]
watch = false
[[routes]]
path = "/v1/infer"
feature = "license-plate-recognition"
CONF
python3 -c "
import hashlib, json
print(json.dumps({'tenants': {'t1': {'api_keys': [hashlib.sha256(b'tenant-a').hexdigest()], 'services': ['text_recognition']}}}))" \
  > "$D/ts/entitlements.json"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$D"
}
trap cleanup EXIT
taskset -c 0 nginx -g 'daemon off;' -e logs/error.log -p "$D/up/" -c "$D/up/nginx.conf" & PIDS+=($!)
taskset -c 1 nginx -g 'daemon off;' -e logs/error.log -p "$D/px/" -c "$D/px/nginx.conf" & PIDS+=($!)
NGX_MASTER=$!
(cd "$D/ts" && exec taskset -c 1 "$BIN" serve --config turnstile.toml > turnstile.log 2>&1) & PIDS+=($!)
TS_PID=$!
for p in $UP $NGX $TS; do
  for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$p) 2>/dev/null && break; sleep 0.05; done
done
sleep 0.5
NGX_WORKER=$(pgrep -P "$NGX_MASTER")
wrk_run() { # port seconds outfile
  timeout -k 5 $(($2 + 30)) taskset -c 0 wrk -t1 -c"$CONNS" -d"$2s" -H 'x-api-key: tenant-a' "http://127.0.0.1:$1/v1/infer" > "$3"
}
rps() { grep Requests/sec "$1" | awk '{print $2}'; }
for r in $(seq "$ROUNDS"); do
  for peer in nginx turnstile; do
    port=$NGX; pid=$NGX_WORKER; comm=nginx
    [ $peer = turnstile ] && port=$TS && pid=$TS_PID && comm=turnstile
    wrk_run "$port" 2 /dev/null
    # User against kernel on core 1: samples by thread name (turnstile's threads all start with
    # "turnstile" or "ledger-"), by address space.
    wrk_run "$port" 8 "$D/wrk.txt" &
    w=$!; sleep 1
    perf record -q -e cpu-clock -F 4999 -C 1 -o "$D/perf.data" -- sleep 6 2>/dev/null
    wait $w
    perf report -i "$D/perf.data" --sort comm,dso --stdio 2>/dev/null | grep -E '^ +[0-9]' > "$D/split.txt" || true
    python3 - "$(rps "$D/wrk.txt")" "$peer" "$r" "$comm" "$D/split.txt" <<'PY'
import sys
rps, peer, rnd, comm, path = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
mine = {"nginx": ("nginx",), "turnstile": ("turnstile", "ledger-", "tokio-")}[comm]
user = kern = other = idle = 0.0
for line in open(path):
    f = line.split()
    share, name, dso = float(f[0].rstrip("%")) / 100, f[1], f[-1]
    if name == "swapper":
        idle += share
    elif name.startswith(mine):
        if "kernel" in dso: kern += share
        else: user += share
    else:
        other += share
us = lambda s: s / rps * 1e6   # 6 s of samples are shares of core 1's time
print(f"{peer} round {rnd}: {rps:,.0f} requests/s; proxy {us(user):.1f} us user + {us(kern):.1f} us kernel per request; "
      f"rest of core 1 {us(other):.1f} us/request (kworkers, perf), idle {idle * 100:.1f} %")
PY
    # System calls and switches per request (all of the proxy's threads).
    wrk_run "$port" 7 "$D/wrk2.txt" &
    w=$!; sleep 1
    perf stat -x, -e 'syscalls:sys_enter_recvfrom,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_fdatasync,sched:sched_switch' \
      -p "$pid" -o "$D/stat.txt" -- sleep 5 2>/dev/null || true
    wait $w
    awk -F, -v rps="$(rps "$D/wrk2.txt")" -v peer="$peer" '
      $3 ~ /:/ { split($3, n, "sys_enter_"); name = (n[2] != "") ? n[2] : $3; line = line sprintf(" %s %.3f", name, $1 / (rps * 5)) }
      END { printf "%s: per request%s (at %s requests/s)\n", peer, line, rps }' "$D/stat.txt"
  done
done
