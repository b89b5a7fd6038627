"""Reads loadtest/compare.sh's raw outputs and prints, per workload, the median table and the
turnstile/nginx ratios; `--profile RUN` prints where each proxy's CPU goes (from the folded stacks);
`--fold` turns `perf script` output (stdin) into folded stacks (stdout, kernel frames suffixed `_[k]`).
Standard library only."""
import json, pathlib, re, statistics, sys


def symbolize(frames_by_dso):
    """perf 6.1 leaves the frames of recent Rust binaries as [unknown] (file offsets): map each
    offset to its address through the LOAD segments and ask addr2line, inlined frames included."""
    import subprocess
    names = {}
    for dso, offs in frames_by_dso.items():
        try:
            phdrs = subprocess.run(["readelf", "-lW", dso], capture_output=True, text=True).stdout
        except OSError:
            continue
        loads = [tuple(int(x, 16) for x in l.split()[1:4:2]) + (int(l.split()[5], 16),)
                 for l in phdrs.splitlines() if l.strip().startswith("LOAD")]  # (offset, vaddr, filesz)
        offs = sorted(offs)
        vaddr = {}
        for o in offs:
            for off, va, size in loads:
                if off <= o < off + size:
                    vaddr[o] = o - off + va
        out = subprocess.run(["addr2line", "-f", "-C", "-i", "-a", "-e", dso] + [hex(vaddr.get(o, o)) for o in offs],
                             capture_output=True, text=True).stdout.splitlines()
        groups, cur = [], None
        for line in out:
            if re.fullmatch(r"0x[0-9a-f]{16}", line):
                cur = []
                groups.append(cur)
            elif cur is not None:
                cur.append(line)
        for o, g in zip(offs, groups):
            funcs = [g[i] for i in range(0, len(g), 2) if g[i] != "??"]
            names[(dso, o)] = funcs[::-1] or ["[unknown]"]  # outermost first
    return names


def fold(lines):
    samples, comm, frames = [], None, []
    for line in lines:
        if not line.strip():
            if comm is not None and frames:
                samples.append((comm, frames))
            comm, frames = None, []
        elif not line[0].isspace():
            if comm is not None and frames:
                samples.append((comm, frames))
            frames = []
            comm = re.split(r"\s+\d+(/\d+)?\s+", line.strip(), maxsplit=1)[0].replace(" ", "_") or "?"
        else:
            parts = line.strip().split(None, 1)
            if len(parts) < 2:
                continue
            sym, _, dso = parts[1].rpartition(" (")
            frames.append((parts[0], re.sub(r"\+0x[0-9a-f]+$", "", sym), dso.rstrip(")")))
    if comm is not None and frames:
        samples.append((comm, frames))
    unknown = {}
    for _, fr in samples:
        for addr, sym, dso in fr:
            if sym == "[unknown]" and dso.startswith("/") and "kernel" not in dso:
                unknown.setdefault(dso, set()).add(int(addr, 16))
    names = symbolize(unknown)
    stacks = {}
    for comm, fr in samples:
        out = []
        for addr, sym, dso in reversed(fr):  # root first
            kernel = "kernel" in dso
            syms = names.get((dso, int(addr, 16)), [sym]) if sym == "[unknown]" and not kernel else [sym]
            out += [x.replace(";", ":").replace(" ", "") + ("_[k]" if kernel else "") for x in syms]
        key = ";".join([comm] + out)
        stacks[key] = stacks.get(key, 0) + 1
    for k, v in stacks.items():
        print(f"{k} {v}")


# Where the CPU goes. A sample's category: the thread first (the ledger writer), then for a kernel
# sample the system call it is in, and for a user sample the first frame from the leaf up that
# matches a library or module pattern (so malloc called by hyper counts as the allocator).
KERNEL = [
    ("kernel: socket writes (writev/sendto, incl. loopback delivery)", ("do_writev", "__sys_sendto", "ksys_write", "__sys_sendmsg")),
    ("kernel: socket reads (recvfrom/read)", ("__sys_recvfrom", "ksys_read", "do_readv", "__sys_recvmsg")),
    ("kernel: epoll_wait", ("do_epoll_wait", "ep_poll")),
    ("kernel: futex (cross-thread wake-ups)", ("futex",)),
    ("kernel: accept/other syscalls", ("do_syscall_64",)),
    ("kernel: other (irq, scheduler, page faults)", ("",)),
]
USER = [
    ("user: allocator (malloc/free)", ("malloc", "free", "realloc", "calloc", "_int_", "mi_", "_rjem_", "je_", "tcache")),
    ("user: memcpy/memmove", ("memcpy", "memmove", "memset")),
    ("user: metrics (prometheus counters, histograms)", ("prometheus::", "turnstile::metrics")),
    ("user: DashMap shards (buckets, billing states)", ("dashmap::",)),
    ("user: clock", ("turnstile::clock", "clock_gettime", "quanta::")),
    ("user: ledger queue (mpsc send)", ("std::sync::mpmc", "std::sync::mpsc")),
    ("user: hyper_util legacy client + pool", ("hyper_util::client",)),
    ("user: hyper HTTP/1 (server and client connections)", ("hyper::", "httparse::")),
    ("user: tokio scheduler, wake-ups, timers", ("tokio::runtime::scheduler", "tokio::runtime::task", "tokio::runtime::context",
                                                 "tokio::runtime::time", "tokio::loom", "tokio::runtime::park")),
    ("user: tokio I/O driver, mio", ("tokio::", "mio::")),
    ("user: http headers, bytes", ("http::", "bytes::")),
    ("user: turnstile decide + settle (proxy, admission, billing)", tuple(f"turnstile::{m}" for m in (
        "proxy", "admission", "billing", "path", "snapshot", "body", "server", "error", "intern", "pricing", "ledger"))),
]


def category(frames):
    comm, stack = frames[0], frames[1:]
    if comm == "ledger-writer":
        return "ledger writer thread (redb commits, fsync)"
    if stack and stack[-1].endswith("_[k]"):
        for name, pats in KERNEL:
            if any(p in f for f in stack for p in pats if f.endswith("_[k]")):
                return name
    for f in reversed(stack):
        if f.endswith("_[k]"):
            continue
        for name, pats in USER:
            if any(p in f for p in pats):
                return name
    return "user: other (std, core, unresolved)"


ORDER = (["ledger writer thread (redb commits, fsync)"] + [n for n, _ in KERNEL] + [n for n, _ in USER]
         + ["user: other (std, core, unresolved)"])


def wrk(text):
    n = int(re.search(r"(\d+) requests in", text).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))

    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        v, u = float(m.group(1)), m.group(2)
        return v / 1000 if u == "us" else v * 1000 if u == "s" else v

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    return n, rps, ms("50"), ms("99"), int(non2xx.group(1)) if non2xx else 0


def oha(text):
    d = json.loads(text)
    s = d["summary"]
    codes = d.get("statusCodeDistribution", {})
    n = sum(codes.values())
    non2xx = sum(v for k, v in codes.items() if not k.startswith("2"))
    p = d["latencyPercentiles"]
    return n, s["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000, non2xx


SHARED = False  # LAYOUT=shared: the upstream runs on the proxy's core, so it is not "other"


def load_rows(run):
    global SHARED
    header = (run / "header.txt").read_text() if (run / "header.txt").exists() else ""
    SHARED = "layout shared" in header
    rows = {}
    for f in sorted((run / "raw").glob("*.txt")):
        w, tool, peer, r = f.stem.split(".")
        text = f.read_text()
        if not text.strip() or text.startswith("oha cannot"):
            continue
        n, rps, p50, p99, non2xx = (wrk if tool == "wrk" else oha)(text)
        v = list(map(int, f.with_suffix(".cpu").read_text().split()))
        pu, ps, psw, uu, us, usw = v[:6]
        cu, cs, ci, cst = v[6:10] if len(v) >= 10 else (v[6], 0, 0, 0)  # older runs: one busy figure
        busy = cu + cs + ci + cst
        secs = n / rps if rps else 1
        rows.setdefault((w, tool, peer), []).append(dict(
            round=int(r), n=n, rps=rps, p50=p50, p99=p99, non2xx=non2xx,
            cpu=(pu + ps) * 1e4 / n, kernel=ps * 1e4 / n, sw=psw / n, up=(uu + us) * 1e4 / n,
            other=max(0.0, (busy - pu - ps - (uu + us if SHARED else 0)) / 100 / secs), irq=ci / 100 / secs,
            core=busy * 1e4 / n))
    return rows


def table(run):
    rows = load_rows(run)
    print((run / "header.txt").read_text().strip() if (run / "header.txt").exists() else "")
    print()
    print("| workload | tool | peer | runs | rps (median) | p50 ms | p99 ms | non-2xx / requests | rps cv % "
          "| proxy CPU µs/req (median, min-max) | of which kernel | switches/req | upstream CPU µs/req "
          "| proxy cores busy µs/req | of which irq+softirq (cores) | other on proxy cores (max) |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    med = {}
    for (w, tool, peer), rs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        m = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99", "cpu", "kernel", "sw", "up", "core", "irq")}
        med[(w, tool, peer)] = m
        cv = 100 * statistics.pstdev([r["rps"] for r in rs]) / statistics.mean([r["rps"] for r in rs])
        cpus = [r["cpu"] for r in rs]
        print(f"| {w} | {tool} | {peer} | {len(rs)} | {m['rps']:,.0f} | {m['p50']:.3f} | {m['p99']:.3f} "
              f"| {sum(r['non2xx'] for r in rs):,} / {sum(r['n'] for r in rs):,} | {cv:.1f} "
              f"| {m['cpu']:.1f} ({min(cpus):.1f}-{max(cpus):.1f}) | {m['kernel']:.1f} | {m['sw']:.3f} | {m['up']:.1f} "
              f"| {m['core']:.1f} | {m['irq']:.2f} | {max(r['other'] for r in rs):.2f} |")
    print()
    for (w, tool) in sorted({(w, t) for w, t, _ in med}):
        pairs = [(p, "nginx") for p in ("turnstile", "turnstile-b")] + [("turnstile-b", "turnstile")]
        for a, b in pairs:
            if (w, tool, a) not in med or (w, tool, b) not in med:
                continue
            n, t = med[(w, tool, b)], med[(w, tool, a)]
            rn = {r["round"]: r for r in rows[(w, tool, b)]}
            rs = [r for r in rows[(w, tool, a)] if r["round"] in rn]
            per_round = " ".join(f"{r['rps'] / rn[r['round']]['rps']:.2f}" for r in rs)
            cpu_round = " ".join(f"{r['cpu'] / rn[r['round']]['cpu']:.2f}" for r in rs)
            goal = " (goal: rps >= 1.00x, CPU/req <= 1.00x)" if b == "nginx" else ""
            print(f"{w} {tool}: {a}/{b} rps {t['rps'] / n['rps']:.2f}x, p99 {t['p99'] / n['p99']:.2f}x, "
                  f"CPU/req {t['cpu'] / n['cpu']:.2f}x ({b} {n['cpu']:.1f}, {a} {t['cpu']:.1f} µs/req); "
                  f"per round: rps {per_round}, CPU/req {cpu_round}{goal}")
        noisy = max(r["other"] for (ww, tt, _), rs in rows.items() if (ww, tt) == (w, tool) for r in rs)
        shared_cores = "layout both-cores" in ((run / "header.txt").read_text() if (run / "header.txt").exists() else "")
        if noisy > 0.05 and not shared_cores:  # both-cores: the load generator and upstream share them by design
            print(f"  noisy: up to {noisy:.2f} of a core on the proxy cores was used by other processes during"
                  f" some runs; trust CPU µs/req over requests/s")
    for w in sorted({w for w, _, _ in med}):
        ts = [r for (ww, _, p), rs in rows.items() if ww == w and p.startswith("turnstile") for r in rs]
        ng = [r for (ww, _, p), rs in rows.items() if ww == w and p == "nginx" for r in rs]
        if w in ("hot", "paced"):
            bad = sum(r["non2xx"] for r in ts + ng)
            print(f"{w}: non-2xx {'0: ok' if bad == 0 else f'{bad}: NOT ZERO'}")
        if w == "flood":
            share = [r["non2xx"] / max(r["n"], 1) for r in ts + ng]
            print(f"flood: refused share per run {min(share):.4f}-{max(share):.4f}"
                  f" ({'ok' if min(share) >= 0.99 else 'BELOW 0.99'})")
        metrics = run / f"{w}.turnstile-metrics.txt"
        served = run / f"{w}.upstream-served"
        if metrics.exists() and served.exists():
            text = metrics.read_text().splitlines()
            billed = sum(float(l.rsplit(" ", 1)[1]) for l in text if l.startswith("turnstile_billed_units_total"))
            admitted = sum(float(l.rsplit(" ", 1)[1]) for l in text
                           if l.startswith("turnstile_requests_total") and 'outcome="admitted"' in l)
            up = int(served.read_text())
            # 2xx the load generator received from turnstile (rounds, warm-ups, profiled run) + the sanity call
            got = 1
            for f in list((run / "raw").glob(f"{w}.*.turnstile*.*")) + list(run.glob(f"{w}.turnstile*-profiled-wrk.txt")):
                if f.suffix in (".txt", ".warm") and f.read_text().strip() and not f.read_text().startswith("oha cannot"):
                    tool = "oha" if f.read_text().lstrip().startswith("{") else "wrk"
                    n, _, _, _, non2xx = (wrk if tool == "wrk" else oha)(f.read_text())
                    got += n - non2xx
            ok = got <= billed <= up and billed == admitted
            print(f"{w}: turnstile billed units {billed:.0f} (admitted {admitted:.0f}); 2xx the load generator got {got};"
                  f" requests its upstream received {up}: {'ok' if ok else 'MISMATCH'} (billed between the two;"
                  f" {up - billed:.0f} upstream requests not billed: cut off when a load run stopped and closed its"
                  f" connections, the client never got them)")

def profile(run):
    rows = load_rows(run)
    for folded in sorted(run.glob("*.turnstile.folded")):
        w = folded.name.split(".")[0]
        peers = [p for p in ("nginx", "turnstile", "turnstile-b") if (run / f"{w}.{p}.folded").exists()]
        cpu = {p: statistics.median(r["cpu"] for r in rows.get((w, "wrk", p), [{"cpu": float("nan")}])) for p in peers}
        shares = {}
        for p in peers:
            counts = dict.fromkeys(ORDER, 0)
            for line in (run / f"{w}.{p}.folded").read_text().splitlines():
                stack, n = line.rsplit(" ", 1)
                counts[category(stack.split(";"))] += int(n)
            total = sum(counts.values()) or 1
            shares[p] = ({c: v / total for c, v in counts.items()}, total)
        print(f"\n{w}: where the proxy's CPU goes (perf samples: " + ", ".join(f"{p} {shares[p][1]}" for p in peers) + ")")
        print("| category | " + " | ".join(f"{p} %" for p in peers) + " | " + " | ".join(f"{p} µs/req" for p in peers) + " |")
        print("| --- |" + " ---: |" * (2 * len(peers)))
        for c in ORDER:
            if all(shares[p][0][c] < 0.0005 for p in peers):
                continue
            pct = " | ".join(f"{100 * shares[p][0][c]:.1f}" for p in peers)
            us = " | ".join(f"{shares[p][0][c] * cpu[p]:.2f}" for p in peers)
            print(f"| {c} | {pct} | {us} |")


if __name__ == "__main__":
    if sys.argv[1] == "--fold":
        fold(sys.stdin)
    elif sys.argv[1] == "--profile":
        profile(pathlib.Path(sys.argv[2]))
    else:
        table(pathlib.Path(sys.argv[1]))
