//! The limit of SPEC §5 and the token buckets that enforce it.
//!
//! [`limit_at`] is a pure function of the snapshot, the tenant, the feature and the time, so
//! plan expiry and temporary upgrades take effect (and revert) by themselves, with no reload.
//! [`BucketStore`] is the narrow interface a shared (e.g. Redis-backed) store can implement.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

use crate::catalog::Catalog;
use crate::clock::SharedClock;
use crate::config::entitlements::Tenant;
use crate::config::gateway::{ImageOp, Settings};

/// Where a limit comes from (shown by the admin limits view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitSource {
    Plan,
    TemporaryUpgrade,
    FeatureDefault,
    DefaultQps,
    ImageSearch,
    ImageSearchDelete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub qps: u32,
    pub source: LimitSource,
    /// True when the family cap lowered the value.
    pub capped: bool,
}

/// The limit of `tenant` for `feature` at `t` (Unix nanoseconds), per SPEC §5.
pub fn limit_at(
    catalog: &Catalog,
    settings: &Settings,
    tenant: &Tenant,
    feature: usize,
    op: Option<ImageOp>,
    t: i64,
) -> Limit {
    if feature == catalog.image_search_feature {
        return match op {
            Some(ImageOp::Delete) => {
                Limit { qps: catalog.image_search.delete_qps, source: LimitSource::ImageSearchDelete, capped: false }
            }
            _ => Limit {
                qps: tenant.image_search.as_ref().map_or(0, |i| i.qps).max(1),
                source: LimitSource::ImageSearch,
                capped: false,
            },
        };
    }
    let f = &catalog.features[feature];
    let (qps, source) = match tenant.active_plan(feature, t) {
        Some(plan) => {
            let upgrade = plan.upgrades.iter().filter(|u| u.from <= t && t < u.until).map(|u| u.qps).max();
            match upgrade {
                Some(u) if u > plan.qps => (u, LimitSource::TemporaryUpgrade),
                _ => (plan.qps, LimitSource::Plan),
            }
        }
        None => match f.default_qps {
            Some(q) => (q, LimitSource::FeatureDefault),
            None => (settings.default_qps, LimitSource::DefaultQps),
        },
    };
    match catalog.family_cap(f) {
        Some(cap) if qps > cap => Limit { qps: cap, source, capped: true },
        _ => Limit { qps, source, capped: false },
    }
}

/// Bucket depth per SPEC §3.1: `max(1, floor(limit × burst_seconds))`.
pub fn depth(limit: u32, burst_seconds: f64) -> u32 {
    let p = f64::from(limit) * burst_seconds;
    // `burst_seconds` is the decimal of turnstile.toml read into the nearest f64, so a product
    // that is whole in decimal may land a few ulps below it (45 × 1.4 = 62.99999999999999):
    // such a product is the whole number it stands for, not the one below.
    let r = p.round();
    let d = if (p - r).abs() <= r.abs() * 1e-14 { r } else { p.floor() };
    if d.is_finite() && d >= 1.0 {
        d.min(f64::from(u32::MAX)) as u32
    } else {
        1
    }
}

pub use crate::store::{Admit, RateState};

/// Token-bucket state per (tenant, feature) pair, keyed by [`crate::intern::pair`].
pub trait BucketStore: Send + Sync {
    /// Takes one token from the pair's bucket, creating or re-shaping it if `limit`/`depth` changed.
    fn admit(&self, key: u64, limit: u32, depth: u32) -> Admit;
    /// Gives back the token an [`Admit::Allowed`] of the same shape took, for a request refused
    /// after admission (402, 409): only admitted requests use the quota (SPEC §4).
    fn refund(&self, key: u64, limit: u32, depth: u32);
    /// The pair's bucket as it is now, without taking a token or writing anything (the
    /// rate-limit fields of a refusal decided before admission, SPEC §4). No bucket, or one of
    /// another shape, reads full: the next admission starts it afresh.
    fn peek(&self, key: u64, limit: u32, depth: u32) -> RateState;
    /// Drops one pair's bucket (its tenant or feature was removed by a reload). One key at a
    /// time, so no lock is held across the map while requests use it.
    fn remove(&self, key: u64);
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A bucket's shape: its limit and depth. A bucket whose shape changes starts afresh.
fn shape(limit: u32, depth: u32) -> u64 {
    (u64::from(limit) << 32) | u64::from(depth)
}

/// GCRA with governor's maths (the Redis store's script has the same, in microseconds): the
/// emission interval `t` = 1 s / limit in whole nanoseconds, the tolerance `tau` = t × (depth −
/// 1). A bucket is its theoretical arrival time `tat` on the clock's monotonic nanoseconds, 0
/// for a fresh (full) one. The test `gcra_decides_as_governor_does` runs it beside governor's
/// keyed limiter on governor's fake clock.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    t: u64,
    tau: u64,
}

impl Gcra {
    #[inline]
    fn new(limit: u32, depth: u32) -> Gcra {
        let t = (1_000_000_000 / u64::from(limit.max(1))).max(1);
        Gcra { t, tau: t.saturating_mul(u64::from(depth.max(1) - 1)) }
    }

    /// One token at `now` from a bucket at `tat`: the bucket's next `tat`, or (throttled) the
    /// earliest time a token is there.
    #[inline]
    fn take(self, tat: u64, now: u64) -> Result<u64, u64> {
        let tat = if tat == 0 { now } else { tat };
        let earliest = tat.saturating_sub(self.tau);
        if now < earliest {
            Err(earliest)
        } else {
            Ok(tat.max(now).saturating_add(self.t))
        }
    }

    /// The tokens left at `now` in a bucket at `tat` that just admitted a call (governor's
    /// `remaining_burst_capacity`).
    #[inline]
    fn remaining(self, tat: u64, now: u64) -> u32 {
        let window = self.tau.saturating_add(self.t);
        let left = now.saturating_add(window).saturating_sub(tat).min(window) / self.t;
        u32::try_from(left).unwrap_or(u32::MAX)
    }
}

/// One bucket: the GCRA theoretical arrival time (0 = fresh) and the shape it was made for.
/// 16 bytes, so a million buckets stay well under 100 MB.
struct BucketState {
    tat: AtomicU64,
    shape: u64,
}

/// In-process buckets: a sharded map of GCRA states keyed by (tenant, feature), on the injected
/// clock. A request takes a shard's read lock only, and changes its bucket with one
/// compare-and-swap; the write lock is taken when a pair first appears or its limit changes.
pub struct LocalBuckets {
    buckets: DashMap<u64, BucketState, FxBuildHasher>,
    clock: SharedClock,
}

impl LocalBuckets {
    pub fn new(clock: SharedClock) -> Self {
        LocalBuckets { buckets: DashMap::with_hasher(FxBuildHasher), clock }
    }
}

/// Takes one token from `tat` at `now`, retrying while other threads move it meanwhile.
#[inline]
fn take(tat: &AtomicU64, gcra: Gcra, now: u64) -> Result<u64, u64> {
    let mut prev = tat.load(Ordering::Acquire);
    loop {
        let next = gcra.take(prev, now)?;
        match tat.compare_exchange_weak(prev, next, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Ok(next),
            Err(actual) => prev = actual,
        }
    }
}

impl BucketStore for LocalBuckets {
    fn admit(&self, key: u64, limit: u32, depth: u32) -> Admit {
        let (shape, gcra, now) = (shape(limit, depth), Gcra::new(limit, depth), self.clock.mono_nanos());
        let taken = match self.buckets.get(&key) {
            Some(b) if b.shape == shape => take(&b.tat, gcra, now),
            other => {
                drop(other);
                // First use of the pair, or its limit changed: a fresh bucket of the new shape.
                let mut b = self.buckets.entry(key).or_insert(BucketState { tat: AtomicU64::new(0), shape });
                if b.shape != shape {
                    *b = BucketState { tat: AtomicU64::new(0), shape };
                }
                take(&b.tat, gcra, now)
            }
        };
        match taken {
            Ok(tat) => {
                let remaining = gcra.remaining(tat, now).min(depth);
                let used = u64::from(depth - remaining);
                Admit::Allowed { remaining, reset_secs: used.div_ceil(u64::from(limit.max(1))) }
            }
            Err(earliest) => Admit::Throttled { retry_after: Duration::from_nanos(earliest - now) },
        }
    }

    fn refund(&self, key: u64, limit: u32, depth: u32) {
        let Some(b) = self.buckets.get(&key) else { return };
        if b.shape != shape(limit, depth) {
            // Re-shaped since (a reload changed the limit): the new bucket never held the token.
            return;
        }
        // Each admission moved the theoretical arrival time one emission interval on; moving it
        // back returns the token. A time at or before now is a full bucket, and 0 a fresh
        // (full) one, so saturating is exact.
        let t = Gcra::new(limit, depth).t;
        let _ =
            b.tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |tat| (tat != 0).then(|| tat.saturating_sub(t)));
    }

    fn peek(&self, key: u64, limit: u32, depth: u32) -> RateState {
        let q = crate::store::Quota { limit, depth };
        // No bucket, or one of another shape: a fresh (full) one, and none is made.
        let tat = match self.buckets.get(&key) {
            Some(b) if b.shape == shape(limit, depth) => b.tat.load(Ordering::Acquire),
            _ => 0,
        };
        let (gcra, now) = (Gcra::new(limit, depth), self.clock.mono_nanos());
        let remaining = match gcra.take(tat, now) {
            // What would remain after one more admission, and the one it would take.
            Ok(next) => gcra.remaining(next, now).saturating_add(1),
            Err(_) => 0,
        };
        RateState::of(q, remaining)
    }

    fn remove(&self, key: u64) {
        self.buckets.remove(&key);
    }

    fn len(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Texts;
    use crate::snapshot::build;
    use std::sync::Arc;
    use std::time::Duration;

    const MAIN: &str = r#"
[server]
upstream = "http://127.0.0.1:1"
[admission]
default_qps = 2
burst_seconds = 1.0
"#;
    const CATALOG: &str = r#"
currency = "CNY"
[families.face_body]
name = "Face and Body"
qps_cap = 50
[families.text_recognition]
name = "Text"
[features.face-comparison-1-1]
family = "face_body"
billing = ["payg", "general_package", "prepaid_qps"]
[features.license-plate-recognition]
family = "text_recognition"
billing = ["payg", "prepaid_qps"]
default_qps = 5
[general_packages.vision-image]
name = "Vision"
families = ["face_body"]
"#;

    fn snapshot(ents: &str) -> crate::snapshot::Snapshot {
        snapshot_with(MAIN, ents)
    }

    fn snapshot_with(main: &str, ents: &str) -> crate::snapshot::Snapshot {
        let texts = Texts::in_memory(main, CATALOG, ents);
        match build(&texts, 1) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    const KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    fn ents(plan: &str) -> String {
        format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{KEY}"], "services": ["face_body"], "qps_plans": [{plan}]}}}}}}"#
        )
    }

    fn t(s: &str) -> i64 {
        crate::time::parse_rfc3339(s).unwrap()
    }

    fn limit(snap: &crate::snapshot::Snapshot, feature: &str, at: &str) -> Limit {
        let f = snap.catalog.feature_index[feature];
        limit_at(&snap.catalog, &snap.settings, &snap.tenants[0], f, None, t(at))
    }

    const PLAN: &str = r#"{"feature": "face-comparison-1-1", "qps": 40,
        "effective_at": "2026-11-01T00:00:00+08:00", "expires_at": "2026-12-01T00:00:00+08:00",
        "temporary_upgrades": [{"qps": 50, "from": "2026-11-10T12:00:00+08:00", "until": "2026-11-10T14:00:00+08:00"}]}"#;

    #[test]
    fn plan_window_edges() {
        let s = snapshot(&ents(PLAN));
        let before = limit(&s, "face-comparison-1-1", "2026-10-31T23:59:59.999999999+08:00");
        assert_eq!((before.qps, before.source), (2, LimitSource::DefaultQps));
        let start = limit(&s, "face-comparison-1-1", "2026-11-01T00:00:00+08:00");
        assert_eq!((start.qps, start.source), (40, LimitSource::Plan), "effective_at is inclusive");
        let last = limit(&s, "face-comparison-1-1", "2026-11-30T23:59:59.999999999+08:00");
        assert_eq!(last.qps, 40);
        let expired = limit(&s, "face-comparison-1-1", "2026-12-01T00:00:00+08:00");
        assert_eq!((expired.qps, expired.source), (2, LimitSource::DefaultQps), "expires_at is exclusive");
    }

    #[test]
    fn temporary_upgrade_window_edges_and_revert() {
        let s = snapshot(&ents(PLAN));
        assert_eq!(limit(&s, "face-comparison-1-1", "2026-11-10T11:59:59.999+08:00").qps, 40);
        let up = limit(&s, "face-comparison-1-1", "2026-11-10T12:00:00+08:00");
        assert_eq!((up.qps, up.source), (50, LimitSource::TemporaryUpgrade));
        assert_eq!(limit(&s, "face-comparison-1-1", "2026-11-10T13:59:59.999+08:00").qps, 50);
        let back = limit(&s, "face-comparison-1-1", "2026-11-10T14:00:00+08:00");
        assert_eq!((back.qps, back.source), (40, LimitSource::Plan), "reverts by itself at until");
    }

    #[test]
    fn highest_active_upgrade_wins_and_lower_upgrade_is_ignored() {
        let plan = r#"{"feature": "face-comparison-1-1", "qps": 30,
            "effective_at": "2026-11-01T00:00:00Z", "expires_at": "2026-12-01T00:00:00Z",
            "temporary_upgrades": [
              {"qps": 45, "from": "2026-11-02T00:00:00Z", "until": "2026-11-04T00:00:00Z"},
              {"qps": 50, "from": "2026-11-03T00:00:00Z", "until": "2026-11-03T01:00:00Z"},
              {"qps": 10, "from": "2026-11-05T00:00:00Z", "until": "2026-11-06T00:00:00Z"}]}"#;
        let s = snapshot(&ents(plan));
        assert_eq!(limit(&s, "face-comparison-1-1", "2026-11-02T12:00:00Z").qps, 45);
        assert_eq!(limit(&s, "face-comparison-1-1", "2026-11-03T00:30:00Z").qps, 50);
        assert_eq!(limit(&s, "face-comparison-1-1", "2026-11-05T12:00:00Z").qps, 30);
    }

    #[test]
    fn feature_default_overrides_global_default() {
        let s = snapshot(&ents(PLAN));
        let l = limit(&s, "license-plate-recognition", "2026-11-10T00:00:00Z");
        assert_eq!((l.qps, l.source), (5, LimitSource::FeatureDefault));
    }

    #[test]
    fn plan_above_cap_is_a_config_error_naming_file_and_field() {
        let plan = r#"{"feature": "face-comparison-1-1", "qps": 60,
            "effective_at": "2026-11-01T00:00:00Z", "expires_at": "2026-12-01T00:00:00Z",
            "temporary_upgrades": [{"qps": 51, "from": "2026-11-02T00:00:00Z", "until": "2026-11-03T00:00:00Z"}]}"#;
        let texts = Texts::in_memory(MAIN, CATALOG, ents(plan));
        let errs = build(&texts, 1).err().expect("must be rejected").to_string();
        assert!(
            errs.contains("entitlements.json: tenants.acme.qps_plans[0].qps: 60 exceeds the face_body cap of 50"),
            "{errs}"
        );
        assert!(
            errs.contains("tenants.acme.qps_plans[0].temporary_upgrades[0].qps: 51 exceeds the face_body cap of 50"),
            "{errs}"
        );
    }

    #[test]
    fn limit_never_exceeds_the_family_cap() {
        let main = MAIN.replace("default_qps = 2", "default_qps = 80");
        let s = snapshot_with(&main, &ents(PLAN));
        let l = limit(&s, "face-comparison-1-1", "2027-06-01T00:00:00Z");
        assert_eq!((l.qps, l.source, l.capped), (50, LimitSource::DefaultQps, true), "face_body cap is 50");
        let l = limit(&s, "license-plate-recognition", "2027-06-01T00:00:00Z");
        assert_eq!((l.qps, l.capped), (5, false), "text_recognition has no cap; the feature default applies");
        let l = limit(&s, "face-comparison-1-1", "2026-11-10T13:00:00+08:00");
        assert_eq!((l.qps, l.capped), (50, false), "an upgrade exactly at the cap is allowed");
    }

    #[test]
    fn depth_follows_burst_seconds() {
        assert_eq!(depth(40, 1.0), 40);
        assert_eq!(depth(1, 0.5), 1);
        assert_eq!(depth(20, 0.25), 5);
        assert_eq!(depth(3, 2.5), 7);
    }

    /// The product of a limit and a decimal `burst_seconds` that is whole in decimal is that
    /// whole number, though the f64 product lands a few ulps below it (45 × 1.4 =
    /// 62.99999999999999 floored to 62: a depth one short of SPEC §3.1's).
    #[test]
    fn depth_is_the_decimal_product_floored() {
        assert_eq!(depth(45, 1.4), 63);
        assert_eq!(depth(90, 0.7), 63);
        assert_eq!(depth(25, 1.16), 29);
        assert_eq!(depth(10, 0.35), 3, "a product that is not whole still floors");
        assert_eq!(depth(7, 0.999), 6);
        assert_eq!(depth(u32::MAX, 3600.0), u32::MAX);
        // Every limit 1..=200 with burst_seconds of two decimals 0.01..=10.00, against the exact
        // integer arithmetic (limit × hundredths / 100).
        for limit in 1..=200u32 {
            for cents in 1..=1000u32 {
                let exact = (u64::from(limit) * u64::from(cents) / 100).max(1);
                let b: f64 = format!("{}.{:02}", cents / 100, cents % 100).parse().unwrap();
                assert_eq!(u64::from(depth(limit, b)), exact, "{limit} × {b}");
            }
        }
    }

    #[test]
    fn gcra_admits_depth_then_limit_per_second_with_injected_clock() {
        let clock = ManualClock::at("2026-11-01T00:00:00Z");
        let buckets = LocalBuckets::new(clock.clone());
        let key = crate::intern::pair(1, 1);
        let mut admitted = 0;
        // 3 s flood in 1 ms steps, 5 attempts per step.
        for _ in 0..3000 {
            for _ in 0..5 {
                if matches!(buckets.admit(key, 20, 20), Admit::Allowed { .. }) {
                    admitted += 1;
                }
            }
            clock.advance(Duration::from_millis(1));
        }
        assert!((60..=81).contains(&admitted), "admitted {admitted}");
        // The clock just moved 1 ms, which may have freed one token; the next is 50 ms away.
        let _ = buckets.admit(key, 20, 20);
        match buckets.admit(key, 20, 20) {
            Admit::Throttled { retry_after } => assert!(retry_after <= Duration::from_millis(50)),
            other => panic!("expected throttled, got {other:?}"),
        }
    }

    /// The buckets decide as governor's keyed GCRA limiter does, call by call: the same
    /// admissions, the same tokens left, the same wait before the next one, over any limit,
    /// depth and spacing of calls (governor on its own fake clock, moved as ours is).
    #[test]
    fn gcra_decides_as_governor_does() {
        use governor::clock::FakeRelativeClock;
        use governor::middleware::StateInformationMiddleware;
        use proptest::prelude::*;
        let shapes = (1u32..=2000).prop_flat_map(|limit| (Just(limit), 1u32..=limit.saturating_mul(3)));
        let steps = proptest::collection::vec(0u64..=3_000_000_000, 1..200);
        proptest!(ProptestConfig::with_cases(256), |((limit, depth) in shapes, steps in steps, spread in 0u32..4)| {
            let clock = ManualClock::at("2026-11-01T00:00:00Z");
            let buckets = LocalBuckets::new(clock.clone());
            let fake = FakeRelativeClock::default();
            let quota = governor::Quota::per_second(std::num::NonZeroU32::new(limit).unwrap())
                .allow_burst(std::num::NonZeroU32::new(depth).unwrap());
            let theirs = governor::RateLimiter::hashmap_with_clock(quota, fake.clone())
                .with_middleware::<StateInformationMiddleware>();
            let key = crate::intern::pair(7, 7);
            for step in steps {
                // Steps spread from a few nanoseconds to seconds: bursts, floods and refills.
                let by = Duration::from_nanos(step >> (8 * spread));
                clock.advance(by);
                fake.advance(by);
                let expected = match theirs.check_key(&key) {
                    Ok(state) => {
                        let remaining = state.remaining_burst_capacity().min(depth);
                        let used = u64::from(depth - remaining);
                        Admit::Allowed { remaining, reset_secs: used.div_ceil(u64::from(limit)) }
                    }
                    Err(not_until) => Admit::Throttled {
                        retry_after: not_until.wait_time_from(governor::clock::Clock::now(&fake)),
                    },
                };
                prop_assert_eq!(buckets.admit(key, limit, depth), expected);
            }
        });
    }

    #[test]
    fn refund_gives_back_exactly_one_token_of_the_same_shape() {
        let clock = ManualClock::at("2026-11-01T00:00:00Z");
        let buckets = LocalBuckets::new(clock.clone());
        let key = crate::intern::pair(3, 3);
        buckets.refund(key, 4, 4); // no bucket yet: nothing happens
        for _ in 0..4 {
            assert!(matches!(buckets.admit(key, 4, 4), Admit::Allowed { .. }));
        }
        assert!(matches!(buckets.admit(key, 4, 4), Admit::Throttled { .. }));
        buckets.refund(key, 4, 4);
        assert_eq!(buckets.admit(key, 4, 4), Admit::Allowed { remaining: 0, reset_secs: 1 }, "one token back");
        assert!(matches!(buckets.admit(key, 4, 4), Admit::Throttled { .. }), "and only one");
        buckets.refund(key, 8, 8);
        assert!(matches!(buckets.admit(key, 4, 4), Admit::Throttled { .. }), "another shape's refund is ignored");
        // A refund on a full bucket keeps it full, never fuller than its depth.
        clock.advance(Duration::from_secs(5));
        buckets.refund(key, 4, 4);
        buckets.refund(key, 4, 4);
        let admitted = (0..10).filter(|_| matches!(buckets.admit(key, 4, 4), Admit::Allowed { .. })).count();
        assert_eq!(admitted, 4);
    }

    /// Each instance has its own buckets and its own clock, and a bucket another thread made
    /// is used here as it is.
    #[test]
    fn each_instance_checks_its_own_buckets() {
        let clock = ManualClock::at("2026-11-01T00:00:00Z");
        let (a, b) = (LocalBuckets::new(clock.clone()), LocalBuckets::new(clock.clone()));
        let key = crate::intern::pair(4, 4);
        assert!(matches!(a.admit(key, 1, 1), Admit::Allowed { .. }));
        assert!(matches!(a.admit(key, 1, 1), Admit::Throttled { .. }));
        assert!(matches!(b.admit(key, 1, 1), Admit::Allowed { .. }), "b's bucket is not a's");
        assert!(matches!(a.admit(key, 1, 1), Admit::Throttled { .. }), "and a's is still empty");
        assert!(matches!(b.admit(key, 1, 1), Admit::Throttled { .. }));
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(a.admit(key, 3, 3), Admit::Allowed { remaining: 2, reset_secs: 1 }));
        });
        assert_eq!(a.admit(key, 3, 3), Admit::Allowed { remaining: 1, reset_secs: 1 });
        assert_eq!(b.admit(key, 3, 3), Admit::Allowed { remaining: 2, reset_secs: 1 });
        let other = LocalBuckets::new(ManualClock::at("2026-11-01T00:00:00Z"));
        clock.advance(Duration::from_secs(1));
        assert_eq!(other.admit(key, 3, 3), Admit::Allowed { remaining: 2, reset_secs: 1 });
        assert_eq!(a.admit(key, 3, 3), Admit::Allowed { remaining: 2, reset_secs: 1 }, "a's clock moved 1 s");
    }

    /// A peek reads the bucket with governor's maths and takes nothing: it agrees with the
    /// admission that follows it (one more than what that admission leaves, or 0 before a 429),
    /// makes no bucket, and leaves a bucket of another shape as it is.
    #[test]
    fn peek_reads_the_bucket_without_taking_a_token() {
        let clock = ManualClock::at("2026-11-01T00:00:00Z");
        let buckets = LocalBuckets::new(clock.clone());
        let key = crate::intern::pair(5, 5);
        assert_eq!(buckets.peek(key, 4, 4), RateState { remaining: 4, reset_secs: 0 }, "no bucket: full");
        assert!(buckets.is_empty(), "a peek makes no bucket");
        for _ in 0..3 {
            assert!(matches!(buckets.admit(key, 4, 4), Admit::Allowed { .. }));
        }
        for _ in 0..10 {
            assert_eq!(buckets.peek(key, 4, 4), RateState { remaining: 1, reset_secs: 1 }, "peeks take nothing");
        }
        assert_eq!(buckets.peek(key, 8, 8), RateState { remaining: 8, reset_secs: 0 }, "another shape reads full");
        assert_eq!(buckets.admit(key, 4, 4), Admit::Allowed { remaining: 0, reset_secs: 1 }, "and reshapes nothing");
        assert_eq!(buckets.peek(key, 4, 4), RateState { remaining: 0, reset_secs: 1 });
        assert!(matches!(buckets.admit(key, 4, 4), Admit::Throttled { .. }));
        clock.advance(Duration::from_millis(250));
        assert_eq!(buckets.peek(key, 4, 4), RateState { remaining: 1, reset_secs: 1 }, "a token back after 1/4 s");
        clock.advance(Duration::from_millis(750));
        assert_eq!(buckets.peek(key, 4, 4), RateState { remaining: 4, reset_secs: 0 }, "full after 1 s");
        // Against the admissions of an irregular flood: 7 QPS, depth 5, steps of 0..=99 ms.
        let (mut x, mut checked) = (12345u64, 0);
        for _ in 0..2000 {
            let peeked = buckets.peek(key, 7, 5);
            match buckets.admit(key, 7, 5) {
                Admit::Allowed { remaining, reset_secs } => {
                    assert_eq!(peeked.remaining, remaining + 1, "the token the admission took was there");
                    assert!(peeked.reset_secs <= reset_secs);
                    checked += 1;
                }
                Admit::Throttled { .. } => assert_eq!(peeked.remaining, 0),
            }
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            clock.advance(Duration::from_millis((x >> 33) % 100));
        }
        assert!(checked > 100, "{checked} admissions");
    }

    #[test]
    fn remaining_and_reset_are_reported_and_limit_change_reshapes() {
        let clock = ManualClock::at("2026-11-01T00:00:00Z");
        let buckets = LocalBuckets::new(clock.clone());
        let key = crate::intern::pair(2, 2);
        assert_eq!(buckets.admit(key, 4, 4), Admit::Allowed { remaining: 3, reset_secs: 1 });
        assert_eq!(buckets.admit(key, 4, 4), Admit::Allowed { remaining: 2, reset_secs: 1 });
        assert_eq!(buckets.admit(key, 4, 4), Admit::Allowed { remaining: 1, reset_secs: 1 });
        assert_eq!(buckets.admit(key, 4, 4), Admit::Allowed { remaining: 0, reset_secs: 1 });
        assert!(matches!(buckets.admit(key, 4, 4), Admit::Throttled { .. }));
        clock.advance(Duration::from_millis(250));
        assert!(matches!(buckets.admit(key, 4, 4), Admit::Allowed { remaining: 0, .. }));
        // A new limit gives a new bucket of the new depth.
        assert!(matches!(buckets.admit(key, 10, 10), Admit::Allowed { remaining: 9, .. }));
        assert_eq!(buckets.len(), 1);
        buckets.remove(key);
        assert!(buckets.is_empty());
        let _ = Arc::strong_count(&clock);
    }
}
