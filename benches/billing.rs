//! Billing and ledger benchmarks (issue 3):
//! - payer selection + reservation + settlement of one call (pay-as-you-go, and a package);
//! - settlements per second with the batched ledger writer running;
//! - strict-mode latency: settle, then wait until the charge is on disk.
//!
//! Run: `cargo bench --bench billing`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use turnstile::billing::Billing;
use turnstile::config::gateway::Durability;
use turnstile::config::Texts;
use turnstile::ledger::RedbLedger;
use turnstile::metrics::Metrics;
use turnstile::snapshot::build;
use turnstile::snapshot::Snapshot;

fn snapshot() -> Snapshot {
    let key = turnstile::hash_key("bench");
    let ents = format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{key}"], "services": ["text_recognition", "object_detection"],
        "packages": [{{"id": "big", "feature": "object-detection", "points": "1000000000000",
          "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2036-01-01T00:00:00Z"}}]}}}}}}"#
    );
    let texts =
        Texts::in_memory("[server]\nupstream = \"http://127.0.0.1:1\"\n", include_str!("../config/catalog.toml"), ents);
    build(&texts, 1).unwrap_or_else(|e| panic!("{e}"))
}

fn billing(dir: &std::path::Path, d: Durability) -> Arc<Billing> {
    let store = RedbLedger::open(dir).expect("ledger");
    Billing::open(Box::new(store), d, Duration::from_millis(5), Duration::from_secs(2), Arc::new(Metrics::new(true)))
        .expect("billing")
        .0
}

fn now() -> i64 {
    turnstile::time::parse_rfc3339("2026-06-01T00:00:00Z").expect("time")
}

fn bench(c: &mut Criterion) {
    let snap = snapshot();
    let tenant = &snap.tenants[0];
    let lp = snap.catalog.feature_index["license-plate-recognition"];
    let od = snap.catalog.feature_index["object-detection"];
    let dir = tempfile::tempdir().expect("tmp");
    let b = billing(dir.path(), Durability::Batched);

    let mut g = c.benchmark_group("payer");
    g.throughput(Throughput::Elements(1));
    g.bench_function("reserve_release_package", |bch| {
        bch.iter(|| drop(b.reserve(&snap, tenant, od, now())));
    });
    g.bench_function("reserve_settle_payg_batched", |bch| {
        bch.iter(|| {
            let r = b.reserve(&snap, tenant, lp, now()).expect("payg");
            b.settle_call(&snap, tenant, lp, r, now())
        });
    });
    g.bench_function("reserve_settle_package_batched", |bch| {
        bch.iter(|| {
            let r = b.reserve(&snap, tenant, od, now()).expect("package");
            b.settle_call(&snap, tenant, od, r, now())
        });
    });
    g.finish();
    let _ = b.close(Duration::from_secs(5));

    let sdir = tempfile::tempdir().expect("tmp");
    let strict = billing(sdir.path(), Durability::Strict);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let mut g = c.benchmark_group("ledger");
    g.sample_size(30).measurement_time(Duration::from_secs(5));
    g.bench_function("strict_settle_until_on_disk", |bch| {
        bch.iter(|| {
            let r = strict.reserve(&snap, tenant, lp, now()).expect("payg");
            let s = strict.settle_call(&snap, tenant, lp, r, now());
            let _ = rt.block_on(strict.durable(s));
        });
    });
    g.finish();
    let _ = strict.close(Duration::from_secs(5));
}

criterion_group!(benches, bench);
criterion_main!(benches);
