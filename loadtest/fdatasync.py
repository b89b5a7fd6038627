#!/usr/bin/env python3
"""Kernel time and wait per commit of the ledger log's two ways to append, on this machine's disk:
a frame appended past the end of the file (the file grows at every commit: fdatasync writes its
size and block map too) against one written over zeros written ahead (src/ledger/wal.rs).

    python3 loadtest/fdatasync.py [DIR] [FRAME_BYTES] [COMMITS]    # defaults: target 25000 2000

25,000 bytes is a 5 ms commit of the 10,000-tenant workload (~140 month records); 200 bytes is
the hot workload's (one record). Kernel time comes from os.times() (clock ticks: keep COMMITS
high), the wait from the wall clock."""
import os, sys, time

folder = sys.argv[1] if len(sys.argv) > 1 else "target"
size = int(sys.argv[2]) if len(sys.argv) > 2 else 25000
commits = int(sys.argv[3]) if len(sys.argv) > 3 else 2000
frame = os.urandom(size)


def run(ahead):
    path = os.path.join(folder, "fdatasync-bench.wal")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        if ahead:
            zeros = b"\0" * (1 << 20)
            for i in range(commits * size // len(zeros) + 2):
                os.pwrite(fd, zeros, i * len(zeros))
            os.fdatasync(fd)
        t0, w0 = os.times(), time.monotonic()
        at = 8
        for _ in range(commits):
            os.pwrite(fd, frame, at)
            at += size
            os.fdatasync(fd)
        t1, w1 = os.times(), time.monotonic()
    finally:
        os.close(fd)
        os.unlink(path)
    kernel = (t1.system - t0.system) / commits * 1e6
    wait = (w1 - w0) / commits * 1e6
    print(f"{'over zeros written ahead' if ahead else 'growing the file':>26}: {kernel:5.0f} us kernel, {wait:5.0f} us wait per {size}-byte commit")


for _ in range(2):
    run(False)
    run(True)
