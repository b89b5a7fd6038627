//! Reload benchmarks (issues 4 and 11):
//! 1. parse + validate + swap of an entitlements file with 100,000 tenants (goal: <= 1 s);
//! 2. the request decision's latency (p50/p99/p99.9/max), measured on two traffic threads that
//!    are not the reloading one, without reloads and while the 100,000-tenant configuration is
//!    reloaded back to back, alternating between a file with all tenants and one without 1,000
//!    of them, so every other reload removes (tenant, feature) pairs and their buckets. All
//!    100,000 tenants have a bucket before the runs start.
//!
//! Run: `cargo bench --bench reload` (both), or `cargo bench --bench reload -- decision` (only 2:
//! the filter matches no criterion benchmark).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::Criterion;
use http::{HeaderMap, HeaderValue};
use turnstile::clock::SystemClock;
use turnstile::config::{ConfigSource, Texts};
use turnstile::proxy::{decide, Decision};
use turnstile::server::Gateway;
use turnstile::snapshot::build;

const TENANTS: usize = 100_000;
/// Tenants left out of every other reload (the last ones; traffic never uses them).
const REMOVED: usize = 1_000;
const TRAFFIC_THREADS: usize = 2;

fn entitlements(tenants: usize) -> String {
    let mut ents = String::with_capacity(tenants * 400);
    ents.push_str("{\"tenants\": {");
    for i in 0..tenants {
        if i > 0 {
            ents.push(',');
        }
        let key = turnstile::hash_key(&format!("key-{i}"));
        let plan = if i % 2 == 0 {
            r#", "qps_plans": [{"feature": "face-comparison-1-1", "qps": 40, "effective_at": "2026-01-01T00:00:00+08:00", "expires_at": "2036-01-01T00:00:00+08:00"}]"#
        } else {
            ""
        };
        ents.push_str(&format!(
            r#""t{i}": {{"api_keys": ["{key}"], "services": ["face_body", "text_recognition"]{plan}}}"#
        ));
    }
    ents.push_str("}}");
    ents
}

fn main_toml(ledger: &Path) -> String {
    format!(
        "[server]\nupstream = \"http://127.0.0.1:1\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[ledger]\ndir = \"{}\"\n[files]\nwatch = false\n[[routes]]\npath = \"/v1/face/compare\"\nfeature = \"face-comparison-1-1\"\n",
        ledger.display()
    )
}

const CATALOG: &str = include_str!("../config/catalog.toml");

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn headers(i: usize) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_str(&format!("key-{i}")).expect("key"));
    h
}

/// Decision latencies (ns) on this thread for `dur`, rotating over tenants `from..from + 1000`.
fn traffic(gw: &Gateway, from: usize, dur: Duration) -> Vec<u64> {
    let keys: Vec<HeaderMap> = (from..from + 1000).map(headers).collect();
    let mut out = Vec::with_capacity(4_000_000);
    let end = Instant::now() + dur;
    let mut i = 0;
    while Instant::now() < end {
        let t = Instant::now();
        let d = decide(gw, &keys[i % keys.len()], "/v1/face/compare");
        let ns = t.elapsed().as_nanos() as u64;
        assert!(matches!(d, Decision::Forward(_) | Decision::Reject(..)));
        drop(d);
        out.push(ns);
        i += 1;
    }
    out
}

/// Runs the traffic threads for `dur` and returns all their latencies, sorted.
fn traffic_threads(gw: &Arc<Gateway>, dur: Duration) -> Vec<u64> {
    let threads: Vec<_> = (0..TRAFFIC_THREADS)
        .map(|n| {
            let gw = gw.clone();
            std::thread::spawn(move || traffic(&gw, n * 1000, dur))
        })
        .collect();
    let mut all: Vec<u64> = threads.into_iter().flat_map(|t| t.join().expect("traffic")).collect();
    all.sort_unstable();
    all
}

fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    let ledger = dir.path().join("ledger");
    let full = entitlements(TENANTS);
    let fewer = entitlements(TENANTS - REMOVED);
    let t = Texts::in_memory(main_toml(&ledger), CATALOG, full.clone());
    let mut c = Criterion::default().configure_from_args().sample_size(10).measurement_time(Duration::from_secs(10));
    let swap = ArcSwap::from_pointee(build(&t, 1).unwrap_or_else(|e| panic!("{e}")));
    c.bench_function("reload/parse_validate_swap_100k_tenants", |b| {
        b.iter(|| swap.store(Arc::new(build(&t, 2).unwrap_or_else(|e| panic!("{e}")))))
    });
    c.final_summary();
    drop(swap);

    // The decision run reloads from files, so each reload can change what is configured.
    let main = dir.path().join("turnstile.toml");
    std::fs::write(&main, main_toml(&ledger)).expect("write");
    std::fs::write(dir.path().join("catalog.toml"), CATALOG).expect("write");
    let ents = dir.path().join("entitlements.json");
    std::fs::write(&ents, &full).expect("write");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    let gw = rt.block_on(async {
        let source = ConfigSource::Files { main: main.clone() };
        let (texts, snap) = turnstile::server::load(&source, None, 1).unwrap_or_else(|e| panic!("{e}"));
        Gateway::new(texts, snap, source, None, SystemClock::shared()).expect("gateway")
    });
    // A bucket for every tenant, as after a day of traffic.
    for i in 0..TENANTS {
        drop(decide(&gw, &headers(i), "/v1/face/compare"));
    }
    let quiet = traffic_threads(&gw, Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (gw, stop) = (gw.clone(), stop.clone());
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let text = if n % 2 == 0 { &fewer } else { &full };
                turnstile::reload::write_atomically(&ents, text).expect("write");
                handle.block_on(gw.reload("bench")).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
            n
        })
    };
    let busy = traffic_threads(&gw, Duration::from_secs(8));
    stop.store(true, Ordering::SeqCst);
    let reloads = reloader.join().expect("reloader");
    println!(
        "\ndecision latency (ns), {TRAFFIC_THREADS} traffic threads, each rotating over 1,000 tenants of 100,000 \
         (all with a bucket); every other reload removes {REMOVED} tenants:"
    );
    println!("| run | decisions | p50 | p99 | p99.9 | max |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, v) in [("no reloads, 3 s", &quiet), (&*format!("{reloads} reloads in 8 s"), &busy)] {
        println!(
            "| {name} | {} | {} | {} | {} | {} |",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.99),
            percentile(v, 0.999),
            v.last().copied().unwrap_or(0)
        );
    }
    let _ = gw.billing.close(Duration::from_secs(5));
}
