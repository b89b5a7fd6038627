"""Reads loadtest/compare.sh's raw outputs and prints the median table and turnstile/nginx ratios."""
import json, pathlib, re, statistics, sys

profile = sys.argv[1] == "--profile"
run = pathlib.Path(sys.argv[-1])

def wrk(text):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    def ms(label):
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
        v, u = float(m.group(1)), m.group(2)
        return v / 1000 if u == "us" else v * 1000 if u == "s" else v
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors:.*", text)
    return rps, ms("50"), ms("99"), int(non2xx.group(1)) if non2xx else 0, errors.group(0) if errors else ""

def oha(text):
    d = json.loads(text)
    s = d["summary"]
    codes = d.get("statusCodeDistribution", {})
    non2xx = sum(v for k, v in codes.items() if not k.startswith("2"))
    p = d["latencyPercentiles"]
    return s["requestsPerSec"], p["p50"] * 1000, p["p99"] * 1000, non2xx, ""

# Where each proxy's CPU goes, from the folded stacks of `PROFILE=1 loadtest/compare.sh`. A sample is
# counted in the first category whose test it meets. Kernel frames carry inferno's "_[k]" suffix.
CATEGORIES = [
    ("ledger writer thread (commits, fsync)", lambda st: st[0] == "ledger-writer"),
    ("socket writes (writev, kernel)", lambda st: any(f in ("do_writev_[k]", "__sys_sendto_[k]", "ksys_write_[k]") for f in st)),
    ("socket reads (recv, kernel)", lambda st: any(f in ("__sys_recvfrom_[k]", "ksys_read_[k]", "do_readv_[k]") for f in st)),
    ("epoll_wait (kernel)", lambda st: "do_epoll_wait_[k]" in st),
    ("other kernel", lambda st: any(f.endswith("_[k]") for f in st)),
    ("user space", lambda st: True),
]

def profile_table(cpu_us):
    print("| where the proxy's CPU goes (perf samples) | " + " | ".join(f"{p} %" for p in cpu_us) + " | "
          + " | ".join(f"{p} µs/req" for p in cpu_us) + " |")
    print("| --- |" + " ---: |" * (2 * len(cpu_us)))
    shares = {}
    for peer in cpu_us:
        counts = dict.fromkeys((c for c, _ in CATEGORIES), 0)
        for line in (run / f"{peer}.folded").read_text().splitlines():
            stack, n = line.rsplit(" ", 1)
            frames = stack.split(";")
            counts[next(c for c, test in CATEGORIES if test(frames))] += int(n)
        total = sum(counts.values()) or 1
        shares[peer] = {c: v / total for c, v in counts.items()}
    for c, _ in CATEGORIES:
        pct = " | ".join(f"{100 * shares[p][c]:.1f}" for p in cpu_us)
        us = " | ".join(f"{shares[p][c] * cpu_us[p]:.1f}" for p in cpu_us)
        print(f"| {c} | {pct} | {us} |")

rows = {}
duration = run / "duration"
for f in sorted((run / "raw").glob("*.txt")):
    tool, peer, _ = f.stem.split("-")
    r = (wrk if tool == "wrk" else oha)(f.read_text())
    cpu = f.with_suffix(".cpu")
    per_req = [float("nan")] * 6
    if cpu.exists() and duration.exists():
        # user and system ticks (1/100 s) and context switches: proxy, then upstream
        pu, ps, psw, uu, us, usw = map(int, cpu.read_text().split())
        n = r[0] * float(duration.read_text())
        per_req = [(pu + ps) * 1e4 / n, ps * 1e4 / n, psw / n, (uu + us) * 1e4 / n, us * 1e4 / n, usw / n]
    rows.setdefault((tool, peer), []).append((*r, *per_req))

if profile:
    wrk_cpu = {peer: statistics.median(r[5] for r in rs) for (tool, peer), rs in rows.items() if tool == "wrk"}
    profile_table({p: wrk_cpu.get(p, float("nan")) for p in ("nginx", "turnstile")})
    sys.exit(0)

print("| tool | peer | runs | rps (median) | p50 ms | p99 ms | non-2xx | rps cv % "
      "| proxy CPU µs/req | of which kernel | proxy switches/req | upstream CPU µs/req |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
med = {}
for (tool, peer), rs in sorted(rows.items()):
    rps = [r[0] for r in rs]
    m = [statistics.median(r[i] for r in rs) for i in range(len(rs[0])) if i not in (3, 4)]
    # m: rps, p50, p99, proxy CPU, proxy kernel, proxy switches, upstream CPU, upstream kernel, upstream switches
    med[(tool, peer)] = m
    cv = 100 * statistics.pstdev(rps) / statistics.mean(rps)
    print(f"| {tool} | {peer} | {len(rs)} | {m[0]:.0f} | {m[1]:.3f} | {m[2]:.3f} | {sum(r[3] for r in rs)} | {cv:.1f} "
          f"| {m[3]:.1f} | {m[4]:.1f} | {m[5]:.3f} | {m[6]:.1f} |")
print()
for tool in sorted({t for t, _ in med}):
    if (tool, "nginx") in med and (tool, "turnstile") in med:
        n, t = med[(tool, "nginx")], med[(tool, "turnstile")]
        print(f"{tool}: turnstile/nginx rps = {t[0] / n[0]:.2f}x (goal >= 1.25), p99 = {t[2] / n[2]:.2f}x (goal <= 0.80)")
        # The server core runs the proxy and the upstream, so requests/s ~ 1 / (proxy + upstream CPU per
        # request). A proxy making nginx's socket calls pays at least nginx's kernel time for them.
        bound = (n[3] + n[6]) / (n[4] + n[6])
        print(f"{tool}: ceiling for a proxy with nginx's kernel time per request and no user time: {bound:.2f}x")
metrics = (run / "turnstile-metrics.txt")
if metrics.exists():
    billed = [l for l in metrics.read_text().splitlines() if l.startswith("turnstile_billed_units_total")]
    print("metering:", "; ".join(billed) or "NONE")
