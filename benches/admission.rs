//! The admission decision (issue 7): one snapshot load, the key lookup, the route, the limit and
//! one GCRA check, on one thread (with a short and a 40-byte key), on two threads contending for
//! one key, and spread over 100,000 keys; plus the request path without its sockets: the whole
//! decision (`proxy::decide`: also the payer) and the decision followed by the settlement of a
//! 2xx (`proxy::settle_now`).
//!
//! Run: `cargo bench --bench admission`.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::HeaderMap;
use turnstile::admission::{self, Admit, BucketStore, LocalBuckets};
use turnstile::clock::{SharedClock, SystemClock};
use turnstile::config::ConfigSource;
use turnstile::proxy::{decide_now as decide, Decision};
use turnstile::server::Gateway;
use turnstile::snapshot::build;
// A thread's cache of the snapshot's `ArcSwap`, as `Gateway::request_snapshot` keeps one.
use turnstile::gateway::SnapshotCache as SnapCache;

mod common;
use common::{decide_and_settle, head, texts};

const KEYS: usize = 100_000;

/// Snapshot load (through the thread's cache), identify (verified-key lookup), route, limit,
/// GCRA: the admission decision.
fn admit(snap: &mut SnapCache, buckets: &LocalBuckets, clock: &SharedClock, key: &[u8]) -> Admit {
    let s = snap.load();
    let t = &s.tenants[s.identify(key).expect("known key")];
    let route = s.router.find("/v1/infer").expect("route");
    let f = &s.catalog.features[route.feature];
    let limit = admission::limit_at(&s.catalog, &s.settings, t, route.feature, None, clock.unix_nanos());
    let depth = admission::depth(limit.qps, s.settings.burst_seconds);
    buckets.admit(turnstile::intern::pair(t.intern, f.intern), limit.qps, depth)
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tmp");
    let t = texts(KEYS, dir.path());
    let snap = Arc::new(ArcSwap::from_pointee(build(&t, 1).unwrap_or_else(|e| panic!("{e}"))));
    let clock = SystemClock::shared();
    let buckets = Arc::new(LocalBuckets::new(clock.clone()));
    let keys: Vec<Vec<u8>> = (0..KEYS).map(|i| format!("key-{i}").into_bytes()).collect();

    let mut g = c.benchmark_group("admission");
    g.throughput(Throughput::Elements(1));
    let mut cache = SnapCache::new(snap.clone());
    g.bench_function("one_key_one_thread", |b| b.iter(|| admit(&mut cache, &buckets, &clock, &keys[0])));
    // The same with a 40-byte key, as issued API keys are (the bench's other keys are 5-9 bytes):
    // the thread's last key is compared with the call's in constant time, eight bytes a step.
    let long_key = |i: usize| format!("tsk_live_{i:031}");
    let long = Arc::new(ArcSwap::from_pointee(
        build(&common::texts_keyed(1, dir.path(), long_key), 1).unwrap_or_else(|e| panic!("{e}")),
    ));
    let (mut long_cache, long_buckets, key) =
        (SnapCache::new(long), LocalBuckets::new(clock.clone()), long_key(0).into_bytes());
    assert_eq!(key.len(), 40);
    g.bench_function("one_40_byte_key_one_thread", |b| b.iter(|| admit(&mut long_cache, &long_buckets, &clock, &key)));
    let mut i = 0usize;
    g.bench_function("100k_keys_one_thread", |b| {
        b.iter(|| {
            i = (i + 7919) % KEYS;
            admit(&mut cache, &buckets, &clock, &keys[i])
        })
    });
    // Two threads on one key: the measured thread and a second one hammering the same bucket.
    g.bench_function(BenchmarkId::new("one_key_two_threads", "contended"), |b| {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let other = {
            let (snap, buckets, clock, key, stop) =
                (snap.clone(), buckets.clone(), clock.clone(), keys[0].clone(), stop.clone());
            std::thread::spawn(move || {
                let mut cache = SnapCache::new(snap);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    admit(&mut cache, &buckets, &clock, &key);
                }
            })
        };
        b.iter(|| admit(&mut cache, &buckets, &clock, &keys[0]));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = other.join();
    });
    g.finish();

    // The request path's whole decision (identify → route → activation → limit → payer).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let gw = rt.block_on(async {
        let s = build(&t, 1).unwrap_or_else(|e| panic!("{e}"));
        Gateway::new(t.clone(), s, ConfigSource::Embedded, None, clock.clone()).expect("gateway")
    });
    let headers = head("key-0");
    let mut g = c.benchmark_group("request");
    g.throughput(Throughput::Elements(1)).measurement_time(Duration::from_secs(5));
    g.bench_function("decide_payg", |b| {
        b.iter(|| {
            let d = decide(&gw, &headers, "/v1/infer");
            assert!(matches!(d, Decision::Forward(_)));
            d
        })
    });
    let ok = HeaderMap::new();
    g.bench_function("decide_and_settle_payg", |b| b.iter(|| decide_and_settle(&gw, &headers, &ok)));
    // With a second thread deciding and settling meanwhile, for the same tenant (the hot pair on
    // two cores: its bucket, usage and metrics are shared by nature) and for another tenant
    // (nothing but what every call shares: whatever costs more here than on one thread is a
    // cache line all cores write, the thing that keeps per-core throughput from scaling).
    for (name, other_key) in [("same_tenant", "key-0"), ("other_tenant", "key-1")] {
        g.bench_function(BenchmarkId::new("decide_and_settle_payg_two_threads", name), |b| {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let other = {
                let (gw, stop) = (gw.clone(), stop.clone());
                let h = head(other_key);
                std::thread::spawn(move || {
                    let ok = HeaderMap::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        decide_and_settle(&gw, &h, &ok);
                    }
                })
            };
            b.iter(|| decide_and_settle(&gw, &headers, &ok));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = other.join();
        });
    }
    g.finish();
    let _ = gw.billing.close(Duration::from_secs(5));
}

criterion_group!(benches, bench);
criterion_main!(benches);
