//! How the request path's own work scales over cores (issue 14), without sockets: N threads, one
//! per core, each deciding and settling pay-as-you-go calls (`proxy::decide_now`, then
//! `proxy::settle_now` as for a 2xx, ledger on) as fast as it can for a fixed time. Two
//! workloads, as in `loadtest/compare.sh`: `hot`, every thread calling for one (tenant, feature)
//! pair, whose bucket, monthly usage and counters are shared by nature; `tenants`, each thread
//! rotating over its own share of 10,000 tenants, which share nothing but what every call writes
//! in common. Whatever a call costs more at N threads than at one is a cache line several cores
//! write: what keeps a gateway's requests/s from growing with its cores.
//!
//! Prints, per workload and thread count: calls/s of all threads together, ns per call of one
//! thread, and the scaling against one thread (N threads scale perfectly at N.00x); the CPU time
//! the whole process spent per call (every thread: the callers, the ledger writer and its fold;
//! `getrusage`) and its ratio to one thread's; the medians of the rounds, then every round's
//! calls/s. The CPU per call is the figure a machine with few cores can read: on 2 cores the
//! ledger writer has no core of its own once both callers run, so calls/s cannot double there
//! even when nothing is shared, while a CPU per call that stays flat says the calls do not slow
//! each other down. Not a criterion bench: criterion times one thread's loop,
//! where this needs all threads' calls over the same seconds.
//!
//! Run: `cargo bench --bench scaling` (`SCALING_THREADS="1 2 4"`, default 1 up to the cores;
//! `SCALING_SECS=2`, seconds per measurement; `SCALING_ROUNDS=5`; `SCALING_WORKLOADS=hot`).
//! Threads are pinned one per core, and the rounds alternate the thread counts so that a noisy
//! moment hits all of them.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use http::HeaderMap;
use turnstile::clock::SystemClock;
use turnstile::config::ConfigSource;
use turnstile::server::Gateway;
use turnstile::snapshot::build;

const TENANTS: usize = 10_000;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[cfg(target_os = "linux")]
fn pin(core: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays within it for core < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(core % libc::CPU_SETSIZE as usize, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(not(target_os = "linux"))]
fn pin(_core: usize) {}

/// User + system CPU time of the whole process so far, in nanoseconds.
fn process_cpu_nanos() -> f64 {
    // SAFETY: getrusage writes the zeroed struct it is given and nothing else.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let t = |tv: libc::timeval| tv.tv_sec as f64 * 1e9 + tv.tv_usec as f64 * 1e3;
    t(ru.ru_utime) + t(ru.ru_stime)
}

/// Calls per second of `threads` threads over `secs`, for `workload`, and the process's CPU
/// nanoseconds per call over the same time.
fn measure(gw: &Gateway, workload: &str, threads: usize, secs: f64) -> (f64, f64) {
    let start = Barrier::new(threads + 1);
    let stop = AtomicBool::new(false);
    let calls = AtomicU64::new(0);
    let (elapsed, cpu_before) = std::thread::scope(|s| {
        for t in 0..threads {
            let (start, stop, calls) = (&start, &stop, &calls);
            s.spawn(move || {
                pin(t);
                // hot: one key for all; tenants: this thread's share, t, t + threads, ...
                let heads: Vec<HeaderMap> = match workload {
                    "hot" => vec![common::head("key-0")],
                    _ => (t..TENANTS).step_by(threads).map(|i| common::head(&format!("key-{i}"))).collect(),
                };
                let ok = HeaderMap::new();
                let (mut n, mut i) = (0u64, 0usize);
                start.wait();
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        common::decide_and_settle(gw, &heads[i], &ok);
                        i = if i + 1 == heads.len() { 0 } else { i + 1 };
                    }
                    n += 64;
                }
                calls.fetch_add(n, Ordering::Relaxed);
            });
        }
        start.wait();
        let (began, cpu) = (Instant::now(), process_cpu_nanos());
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        (began.elapsed(), cpu)
    });
    let cpu = process_cpu_nanos() - cpu_before;
    let n = calls.load(Ordering::Relaxed) as f64;
    (n / elapsed.as_secs_f64(), cpu / n.max(1.0))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter argument is not used here.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads: Vec<usize> = std::env::var("SCALING_THREADS")
        .ok()
        .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).filter(|&n| n > 0).collect())
        .unwrap_or_else(|| (1..=cores).filter(|n| n.is_power_of_two() || *n == cores).collect());
    let secs: f64 = env_or("SCALING_SECS", 2.0);
    let rounds: usize = env_or("SCALING_ROUNDS", 5).max(1);

    let dir = tempfile::tempdir().expect("tmp");
    let t = common::texts(TENANTS, dir.path());
    let clock = SystemClock::shared();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let gw = rt.block_on(async {
        let s = build(&t, 1).unwrap_or_else(|e| panic!("{e}"));
        Gateway::new(t.clone(), s, ConfigSource::Embedded, None, clock).expect("gateway")
    });
    println!("scaling: {cores} cores; threads {threads:?}; {rounds} rounds x {secs} s");
    println!(
        "| workload | threads | calls/s (median) | ns/call per thread | scaling | CPU ns/call, all threads | CPU/call vs 1 thread | calls/s per round |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    let workloads = std::env::var("SCALING_WORKLOADS").unwrap_or_else(|_| "hot tenants".into());
    for workload in workloads.split_whitespace().filter(|w| ["hot", "tenants"].contains(w)) {
        // Warm up: every tenant's bucket, month and counters made, the verified keys known.
        measure(&gw, workload, threads.iter().copied().max().unwrap_or(1), secs.min(1.0));
        let mut per: Vec<Vec<f64>> = vec![Vec::new(); threads.len()];
        let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); threads.len()];
        for r in 0..rounds {
            // Alternate the order, so that a noisy moment is not always the same count's.
            let order: Vec<usize> =
                if r % 2 == 0 { (0..threads.len()).collect() } else { (0..threads.len()).rev().collect() };
            for i in order {
                let (rate, ns) = measure(&gw, workload, threads[i], secs);
                per[i].push(rate);
                cpu[i].push(ns);
            }
        }
        let (mut one, mut one_cpu) = (None, None);
        for (i, &n) in threads.iter().enumerate() {
            let each: Vec<String> = per[i].iter().map(|v| format!("{v:.0}")).collect();
            let m = median(&mut per[i].clone());
            let c = median(&mut cpu[i]);
            let base = *one.get_or_insert(m / n as f64);
            let base_cpu = *one_cpu.get_or_insert(c);
            println!(
                "| {workload} | {n} | {m:.0} | {:.0} | {:.2}x | {c:.0} | {:.2}x | {} |",
                1e9 * n as f64 / m,
                m / base,
                c / base_cpu,
                each.join(" ")
            );
        }
    }
    let _ = gw.billing.close(Duration::from_secs(5));
}
