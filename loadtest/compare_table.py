"""Reads loadtest/compare.sh's raw outputs and prints the median table and turnstile/nginx ratios."""
import json, pathlib, re, statistics, sys

run = pathlib.Path(sys.argv[1])

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

rows = {}
for f in sorted((run / "raw").glob("*.txt")):
    tool, peer, _ = f.stem.split("-")
    r = (wrk if tool == "wrk" else oha)(f.read_text())
    cpu = f.with_suffix(".cpu")
    proxy_us = upstream_us = float("nan")
    if cpu.exists():
        proxy_ticks, upstream_ticks = map(int, cpu.read_text().split())
        requests = r[0] * float(re.search(r"(\d+)", f.parent.parent.joinpath("duration").read_text()).group(1)) if f.parent.parent.joinpath("duration").exists() else None
        if requests:
            proxy_us, upstream_us = proxy_ticks * 1e4 / requests, upstream_ticks * 1e4 / requests
    rows.setdefault((tool, peer), []).append(r + (proxy_us, upstream_us))

print("| tool | peer | runs | rps (median) | p50 ms | p99 ms | non-2xx | rps cv % | proxy CPU µs/req | upstream CPU µs/req |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
med = {}
for (tool, peer), rs in sorted(rows.items()):
    rps = [r[0] for r in rs]
    m = (statistics.median(rps), statistics.median(r[1] for r in rs), statistics.median(r[2] for r in rs))
    med[(tool, peer)] = m
    cv = 100 * statistics.pstdev(rps) / statistics.mean(rps)
    pcpu = statistics.median(r[5] for r in rs)
    ucpu = statistics.median(r[6] for r in rs)
    print(f"| {tool} | {peer} | {len(rs)} | {m[0]:.0f} | {m[1]:.3f} | {m[2]:.3f} | {sum(r[3] for r in rs)} | {cv:.1f} | {pcpu:.1f} | {ucpu:.1f} |")
print()
for tool in sorted({t for t, _ in med}):
    if (tool, "nginx") in med and (tool, "turnstile") in med:
        n, t = med[(tool, "nginx")], med[(tool, "turnstile")]
        print(f"{tool}: turnstile/nginx rps = {t[0] / n[0]:.2f}x (goal >= 1.25), p99 = {t[2] / n[2]:.2f}x (goal <= 0.80)")
metrics = (run / "turnstile-metrics.txt")
if metrics.exists():
    billed = [l for l in metrics.read_text().splitlines() if l.startswith("turnstile_billed_units_total")]
    print("metering:", "; ".join(billed) or "NONE")
