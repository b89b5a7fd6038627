//! Memory of 1,000,000 active (tenant, feature) buckets (issue 7 goal: <= 100 MB RSS).
//! Not a criterion bench: it fills the bucket store and prints the process's resident memory
//! before and after, from /proc/self/status.
//!
//! Run: `cargo bench --bench memory`.

use turnstile::admission::{Admit, BucketStore, LocalBuckets};
use turnstile::clock::SystemClock;

// The binary's allocator (src/main.rs), so the figure is the gateway's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").to_string()))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes every bench target
    }
    const PAIRS: u32 = 1_000_000;
    let before = rss_kib();
    let buckets = LocalBuckets::new(SystemClock::shared());
    // 10,000 tenants x 100 features, each bucket used once.
    for t in 0..PAIRS / 100 {
        for f in 0..100 {
            let admitted = buckets.admit(turnstile::intern::pair(t, f), 40, 40);
            assert!(matches!(admitted, Admit::Allowed { .. }));
        }
    }
    let after = rss_kib();
    assert_eq!(buckets.len(), PAIRS as usize);
    let mib = (after.saturating_sub(before)) as f64 / 1024.0;
    println!("buckets: {}  RSS before: {:.1} MiB  after: {:.1} MiB  growth: {mib:.1} MiB ({:.0} bytes per bucket; goal: <= 100 MB)",
        buckets.len(), before as f64 / 1024.0, after as f64 / 1024.0, mib * 1024.0 * 1024.0 / f64::from(PAIRS));
}
