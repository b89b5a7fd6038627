//! Reload benchmarks (issue 4):
//! 1. parse + validate + swap of an entitlements file with 100,000 tenants (goal: <= 1 s);
//! 2. the request decision's latency (p50/p99/max) on one thread, without reloads and while
//!    another thread reloads the 100,000-tenant configuration back to back, in the same run.
//!
//! Run: `cargo bench --bench reload`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use criterion::Criterion;
use http::{HeaderMap, HeaderValue};
use turnstile::clock::SystemClock;
use turnstile::config::{build, ConfigSource, Texts};
use turnstile::proxy::{decide, Decision};
use turnstile::server::Gateway;

const TENANTS: usize = 100_000;

fn texts(ledger: &std::path::Path) -> Texts {
    let mut ents = String::with_capacity(TENANTS * 400);
    ents.push_str("{\"tenants\": {");
    for i in 0..TENANTS {
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
    let main = format!(
        "[server]\nupstream = \"http://127.0.0.1:1\"\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[ledger]\ndir = \"{}\"\n[[routes]]\npath = \"/v1/face/compare\"\nfeature = \"face-comparison-1-1\"\n",
        ledger.display()
    );
    Texts::in_memory(main, include_str!("../config/catalog.toml"), ents)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Decision latencies (ns) on this thread for `dur`, rotating over 1,000 tenants.
fn traffic(gw: &Gateway, dur: Duration) -> Vec<u64> {
    let keys: Vec<HeaderMap> = (0..1000)
        .map(|i| {
            let mut h = HeaderMap::new();
            h.insert("x-api-key", HeaderValue::from_str(&format!("key-{i}")).expect("key"));
            h
        })
        .collect();
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
    out.sort_unstable();
    out
}

fn main() {
    let dir = tempfile::tempdir().expect("tmp");
    let t = texts(dir.path());
    let mut c = Criterion::default().configure_from_args().sample_size(10).measurement_time(Duration::from_secs(10));
    let swap = ArcSwap::from_pointee(build(&t, 1).unwrap_or_else(|e| panic!("{e}")));
    c.bench_function("reload/parse_validate_swap_100k_tenants", |b| {
        b.iter(|| swap.store(Arc::new(build(&t, 2).unwrap_or_else(|e| panic!("{e}")))))
    });
    c.final_summary();

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("rt");
    let gw = rt.block_on(async {
        let snap = build(&t, 1).unwrap_or_else(|e| panic!("{e}"));
        Gateway::new(t.clone(), snap, ConfigSource::Embedded, None, SystemClock::shared()).expect("gateway")
    });
    let quiet = traffic(&gw, Duration::from_secs(3));
    let stop = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (gw, stop) = (gw.clone(), stop.clone());
        let handle = rt.handle().clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                handle.block_on(gw.reload("bench")).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
            n
        })
    };
    let busy = traffic(&gw, Duration::from_secs(6));
    stop.store(true, Ordering::SeqCst);
    let reloads = reloader.join().expect("reloader");
    println!("\ndecision latency, one thread, 1,000 rotating tenants of 100,000 (ns):");
    println!("| run | decisions | p50 | p99 | p99.9 | max |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    for (name, v) in [("no reloads", &quiet), (&*format!("{reloads} reloads in 6 s"), &busy)] {
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
