//! The metrics one admitted, metered call counts (SPEC §10): its request by outcome, its units by
//! payer, its pay-as-you-go amount, and the two latency histograms (request, upstream). On one
//! thread for one pair and spread over 10,000 pairs, and with a second thread counting the same
//! pair meanwhile: every call of a hot pair on every core touches these, so what two cores share
//! here is what the gateway's cores share.
//!
//! Run: `cargo bench --bench metrics`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use turnstile::metrics::{Metrics, Outcome};

const PAIRS: u64 = 10_000;

/// Labels as the gateway has them: interned, `'static`.
fn labels() -> Vec<&'static str> {
    (0..PAIRS).map(|i| &*Box::leak(format!("t{i}").into_boxed_str())).collect()
}

/// What the gateway counts for one admitted call paid by pay-as-you-go.
fn call(m: &Metrics, pair: u64, tenant: &'static str) {
    m.upstream_duration.observe(0.000_8);
    m.billed(pair, tenant, "license-plate-recognition", 3, 1.0); // payg
    m.payg_amount(pair, tenant, "license-plate-recognition", "CNY", 0.0025);
    m.request_pair(pair, tenant, "license-plate-recognition", Outcome::Admitted);
    m.observe_duration(Outcome::Admitted, 0.000_9);
}

fn bench(c: &mut Criterion) {
    let m = Arc::new(Metrics::new(true));
    let tenants = labels();
    let mut g = c.benchmark_group("metrics");
    g.throughput(Throughput::Elements(1)).measurement_time(Duration::from_secs(4));
    g.bench_function("one_pair_one_thread", |b| b.iter(|| call(&m, 0, tenants[0])));
    let mut i = 0u64;
    g.bench_function("10k_pairs_one_thread", |b| {
        b.iter(|| {
            i = (i + 7919) % PAIRS;
            call(&m, i, tenants[i as usize])
        })
    });
    g.bench_function(BenchmarkId::new("one_pair_two_threads", "contended"), |b| {
        let stop = Arc::new(AtomicBool::new(false));
        let other = {
            let (m, stop, t) = (m.clone(), stop.clone(), tenants[0]);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    call(&m, 0, t);
                }
            })
        };
        b.iter(|| call(&m, 0, tenants[0]));
        stop.store(true, Ordering::Relaxed);
        let _ = other.join();
    });
    g.finish();
    assert!(m.render().contains(
        "turnstile_requests_total{feature=\"license-plate-recognition\",outcome=\"admitted\",tenant=\"t0\"}"
    ));
}

criterion_group!(benches, bench);
criterion_main!(benches);
