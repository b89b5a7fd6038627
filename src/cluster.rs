//! Cluster mode wiring (SPEC §11): the Redis store as the billing engine's primary store, the
//! `on_store_error` policy, the local fallback with its replay journal, and the shared upgrade
//! overrides.
//!
//! Fallback (`on_store_error = "local"`, SPEC §11.6): the first store error switches this
//! replica to its local buckets (each at `limit / expected_replicas`, at least 1) and its local
//! ledger; every charge made meanwhile is also written to an in-memory journal. A task probes
//! Redis every [`PROBE_EVERY`]; once it answers, the journal is replayed in order through
//! operations that are idempotent on the request id (a replay of a replay changes nothing), and
//! only when the journal is empty does the replica go back to Redis and set
//! `turnstile_store_fallback` to 0.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use dashmap::DashMap;
use prometheus::IntGauge;
use rustc_hash::FxBuildHasher;

use crate::config::gateway::{ClusterSettings, ImageOp, OnStoreError};
use crate::store::redis::{HoldAction, ImagePart, RedisStore, Settle};
use crate::store::{
    BalanceStore, BucketKey, Candidate, ImageStore, Quota, RequestId, StoreError, Stores, TenantKey, UsageStore,
    UsageTo,
};

/// How often a replica in fallback (or with a journal to replay) probes Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Settlements spawned in batched mode and not yet acknowledged by Redis, at most; past it a
/// settlement is awaited on the request (backpressure, never an unbounded queue).
pub const MAX_DEFERRED: usize = 4096;

/// How often every replica polls the override version counter (SPEC §11.4: applied within 1 s).
pub const OVERRIDE_POLL: Duration = Duration::from_millis(200);

/// One charge to apply to Redis again, with the request id it was made under.
#[derive(Debug, Clone)]
pub enum Replay {
    /// A settlement script call (per-call features): same id and part, so a settlement that did
    /// reach Redis before its answer was lost is not applied twice.
    Settle {
        tenant: String,
        id: u128,
        hold: HoldAction,
        alert_at: Option<i64>,
        usage: Option<(String, String, String, i64)>,
        also: String,
        image: ImagePart,
        /// When the hold is gone by the time of the replay (swept after its lease): take the
        /// package's share instead (package, points, micro-points).
        take: Option<(String, i64, i64)>,
    },
    /// Micro-points taken from packages in candidate order (a package charge made locally).
    Take { tenant: String, candidates: Vec<(String, i64)>, want: i64, id: RequestId },
    /// Units added to a month (video settlements made locally).
    Usage { tenant: String, feature: String, month: String, to: UsageTo, units: i64, cell: String, id: RequestId },
    /// An image count change made locally.
    Images { tenant: String, op: ImageOp, id: RequestId, reported: Option<u64> },
    /// A low-balance alert fired on the fallback: marked in Redis so that no replica fires it
    /// again (SPEC §6, §11.3: once in the whole cluster).
    Alert { tenant: String, package: String },
}

/// The Redis side of the billing engine.
pub struct Remote {
    pub redis: RedisStore,
    /// `Stores::Redis(redis)`.
    pub stores: Stores,
    pub on_error: OnStoreError,
    pub expected_replicas: u32,
    fallback: AtomicBool,
    gauge: IntGauge,
    /// Charges made on the fallback, oldest first; an entry leaves it only once Redis has it.
    journal: Mutex<VecDeque<Replay>>,
    /// A replay is running (one at a time: each removes the entries it replayed).
    replaying: AtomicBool,
    /// Batched mode: permits for settlements spawned after the answer went out.
    pub deferred: std::sync::Arc<tokio::sync::Semaphore>,
    /// The last consumption Redis reported per (tenant, package) ([`crate::intern::pair`]): in
    /// fallback a package offers only `points - known` to the local ledger.
    known: DashMap<u64, i64, FxBuildHasher>,
}

impl Remote {
    pub fn new(redis: RedisStore, c: &ClusterSettings, gauge: IntGauge) -> Remote {
        gauge.set(0);
        Remote {
            stores: Stores::Redis(redis.clone()),
            redis,
            on_error: c.on_store_error,
            expected_replicas: c.expected_replicas.max(1),
            fallback: AtomicBool::new(false),
            gauge,
            journal: Mutex::new(VecDeque::new()),
            replaying: AtomicBool::new(false),
            deferred: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_DEFERRED)),
            known: DashMap::with_hasher(FxBuildHasher),
        }
    }

    /// True while this replica serves on its local fallback.
    pub fn in_fallback(&self) -> bool {
        self.fallback.load(Ordering::Relaxed)
    }

    /// A store error: `deny` passes it on (503); `local` switches to the fallback (once per
    /// spell, logged) and answers `Ok`, so the caller goes on with the local store.
    pub fn failover(&self, e: StoreError) -> Result<(), StoreError> {
        if self.on_error == OnStoreError::Deny {
            return Err(e);
        }
        if !self.fallback.swap(true, Ordering::SeqCst) {
            self.gauge.set(1);
            tracing::error!(
                error = %e,
                "store unreachable: serving on the local fallback (limit / {} per replica, local ledger); charges are replayed to Redis when it is back",
                self.expected_replicas
            );
        }
        Ok(())
    }

    /// The local share of a bucket while in fallback: `limit / expected_replicas` (at least 1),
    /// the depth scaled the same way.
    pub fn local_quota(&self, q: Quota) -> Quota {
        let n = self.expected_replicas.max(1);
        Quota { limit: (q.limit / n).max(1), depth: (q.depth / n).max(1) }
    }

    /// The lease of Redis holds (`[cluster].hold_lease_ms`).
    pub fn redis_lease(&self) -> Duration {
        self.redis.hold_lease()
    }

    pub fn note_consumed(&self, pair: u64, consumed: i64) {
        self.known.insert(pair, consumed);
    }

    pub fn known_consumed(&self, pair: u64) -> i64 {
        self.known.get(&pair).map_or(0, |v| *v)
    }

    pub fn journal(&self, r: Replay) {
        if let Ok(mut j) = self.journal.lock() {
            j.push_back(r);
        }
    }

    pub fn journal_len(&self) -> usize {
        self.journal.lock().map_or(0, |j| j.len())
    }

    /// Applies one journal entry to Redis through `redis` (idempotent on its request id).
    async fn replay(redis: &RedisStore, r: &Replay) -> Result<(), StoreError> {
        match r {
            Replay::Settle { tenant, id, hold, alert_at, usage, also, image, take } => {
                let s = Settle {
                    hold: *hold,
                    alert_at: *alert_at,
                    usage: usage.as_ref().map(|(f, m, field, n)| (f.as_str(), m.as_str(), field.as_str(), *n)),
                    image: *image,
                    also,
                    part: SETTLE_PART,
                };
                let out = redis.settle(tenant, *id, s).await?;
                if let (Some((pkg, points, want)), false) = (take, out.hold) {
                    let t = TenantKey { name: tenant, local: 0 };
                    let c = [Candidate { id: pkg, points: *points, local: 0 }];
                    redis.take_up_to(t, &c, *want, RequestId(*id)).await?;
                }
                Ok(())
            }
            Replay::Take { tenant, candidates, want, id } => {
                let c: Vec<Candidate<'_>> =
                    candidates.iter().map(|(p, pts)| Candidate { id: p, points: *pts, local: 0 }).collect();
                let t = TenantKey { name: tenant, local: 0 };
                let taken = redis.take_up_to(t, &c, *want, *id).await?;
                let got: i64 = taken.iter().map(|x| x.taken).sum();
                if got < *want {
                    tracing::warn!(
                        tenant,
                        wanted = want,
                        taken = got,
                        "replayed package charge: the shared balance held less than the fallback charged (overspent while Redis was unreachable)"
                    );
                }
                Ok(())
            }
            Replay::Usage { tenant, feature, month, to, units, cell, id } => {
                let key = BucketKey { tenant, bucket: feature, local: 0 };
                redis.add_usage(key, month, *to, *units, cell, *id).await.map(|_| ())
            }
            Replay::Images { tenant, op, id, reported } => {
                let t = TenantKey { name: tenant, local: 0 };
                redis.settle_images(t, *op, *id, *reported).await.map(|_| ())
            }
            Replay::Alert { tenant, package } => redis.alert_once(tenant, package).await.map(|_| ()),
        }
    }

    /// One probe: when Redis answers, replays the journal in order; when it is empty, leaves the
    /// fallback. Returns the entries replayed.
    pub async fn probe(&self) -> usize {
        if !self.in_fallback() && self.journal_len() == 0 {
            return 0;
        }
        if self.redis.override_version().await.is_err() {
            return 0;
        }
        let Some(done) = self.replay_journal(&self.redis).await else { return 0 };
        if self.journal_len() == 0 && self.fallback.swap(false, Ordering::SeqCst) {
            self.gauge.set(0);
            tracing::info!(replayed = done, "store reachable again: local charges replayed; back on Redis");
        }
        done
    }

    /// Replays the journal in order through `redis`, removing each entry once Redis has it (an
    /// interrupted replay, even one whose task ends in a panic, leaves the rest in place).
    /// `None` when another replay is running or the first entry fails.
    async fn replay_journal(&self, redis: &RedisStore) -> Option<usize> {
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        if self.replaying.swap(true, Ordering::SeqCst) {
            return None;
        }
        let _running = Running(&self.replaying);
        let mut done = 0;
        loop {
            let Some(r) = self.journal.lock().ok().and_then(|j| j.front().cloned()) else { return Some(done) };
            if let Err(e) = Self::replay(redis, &r).await {
                tracing::warn!(error = %e, left = self.journal_len(), "replay to Redis interrupted; retrying");
                return (done > 0).then_some(done);
            }
            if let Ok(mut j) = self.journal.lock() {
                j.pop_front();
            }
            done += 1;
        }
    }

    /// At shutdown: replays what the journal holds if Redis answers now (beside the probe
    /// loop, one replay at a time), trying until `wait` has passed. Returns the entries still
    /// not replayed: charges made on the fallback that are in this replica's local ledger only,
    /// as the journal is not kept across restarts.
    pub async fn replay_at_exit(&self, wait: Duration) -> usize {
        let until = tokio::time::Instant::now() + wait;
        while self.journal_len() > 0 && tokio::time::Instant::now() < until {
            if tokio::time::timeout_at(until, self.replay_journal(&self.redis)).await.is_err() {
                break;
            }
            if self.journal_len() > 0 {
                tokio::time::sleep_until(until.min(tokio::time::Instant::now() + PROBE_EVERY)).await;
            }
        }
        self.journal_len()
    }
}

/// The marker part of a per-call settlement (`done:<id>:s`).
pub const SETTLE_PART: &str = "s";

/// Runs [`Remote::probe`] every [`PROBE_EVERY`] while the billing engine lives.
pub async fn probe_loop(billing: std::sync::Weak<crate::billing::Billing>) {
    let mut tick = tokio::time::interval(PROBE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(b) = billing.upgrade() else { return };
        if let Some(r) = b.remote() {
            r.probe().await;
        }
    }
}

/// Overlays the shared upgrade overrides (SPEC §11.4) on a snapshot built from the files: a
/// permanent one raises the QPS of the tenant's plans for the feature that are active at its
/// `from` (never lowers it); a temporary one is added to those plans' temporary upgrades (an
/// identical one already in the file is not added twice). Overrides naming a tenant, feature or
/// plan the files no longer have are ignored.
pub fn overlay(snap: &mut crate::snapshot::Snapshot, overrides: &[(String, String, crate::store::Override)]) {
    for (tenant, feature, ov) in overrides {
        let Some(&fi) = snap.catalog.feature_index.get(feature.as_str()) else { continue };
        let Some(&ti) = snap.tenant_index.get(tenant.as_str()) else { continue };
        let Some(t) = snap.tenants.get_mut(ti) else { continue };
        for plan in t.plans.iter_mut().filter(|p| p.feature == fi && p.active_at(ov.from)) {
            match ov.until {
                None => plan.qps = plan.qps.max(ov.qps),
                Some(until) => {
                    let u = crate::config::entitlements::Upgrade { qps: ov.qps, from: ov.from, until };
                    if !plan.upgrades.iter().any(|x| x.qps == u.qps && x.from == u.from && x.until == u.until) {
                        plan.upgrades.push(u);
                    }
                }
            }
        }
    }
}

/// Polls the override version counter every [`OVERRIDE_POLL`] and, when it moved, reads the
/// overrides and republishes the configuration with them (one `GET` per poll otherwise).
pub async fn poll_overrides(gw: std::sync::Weak<crate::gateway::Gateway>) {
    let mut seen: Option<i64> = None;
    let mut failing = false;
    loop {
        tokio::time::sleep(OVERRIDE_POLL).await;
        let Some(gw) = gw.upgrade() else { return };
        let Some(remote) = gw.billing.remote().cloned() else { return };
        let v = match remote.redis.override_version().await {
            Ok(v) => v,
            Err(_) => continue,
        };
        if Some(v) == seen {
            continue;
        }
        match gw.sync_overrides().await {
            Ok(_) => {
                seen = Some(v);
                failing = false;
            }
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot read the shared upgrades; retrying");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Override;

    const MAIN: &str = "[server]\nupstream = \"http://127.0.0.1:1\"\n";
    const CATALOG: &str = r#"currency = "CNY"
[families.face_body]
name = "Face and Body"
qps_cap = 50
[features.face-comparison-1-1]
family = "face_body"
billing = ["prepaid_qps"]
"#;

    fn t(s: &str) -> i64 {
        crate::time::parse_rfc3339(s).unwrap()
    }

    fn snapshot() -> crate::snapshot::Snapshot {
        let ents = r#"{"tenants": {"acme": {"api_keys": ["00000000000000000000000000000000000000000000000000000000000000aa"], "services": ["face_body"], "qps_plans": [
            {"feature": "face-comparison-1-1", "qps": 20, "effective_at": "2026-01-01T00:00:00Z", "expires_at": "2026-02-01T00:00:00Z",
             "temporary_upgrades": [{"qps": 30, "from": "2026-01-10T00:00:00Z", "until": "2026-01-11T00:00:00Z"}]},
            {"feature": "face-comparison-1-1", "qps": 10, "effective_at": "2026-02-01T00:00:00Z", "expires_at": "2026-03-01T00:00:00Z"}]}}}"#;
        let texts = crate::config::Texts::in_memory(MAIN, CATALOG, ents);
        crate::snapshot::build(&texts, 1).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn overlay_raises_the_plan_active_at_from_and_adds_upgrades_once() {
        let mut s = snapshot();
        let f = "face-comparison-1-1".to_string();
        let ovs = vec![
            ("acme".to_string(), f.clone(), Override { qps: 25, from: t("2026-01-05T00:00:00Z"), until: None }),
            // A lower permanent one never lowers a plan.
            ("acme".to_string(), f.clone(), Override { qps: 15, from: t("2026-01-06T00:00:00Z"), until: None }),
            // Identical to the file's upgrade: not added twice.
            (
                "acme".to_string(),
                f.clone(),
                Override { qps: 30, from: t("2026-01-10T00:00:00Z"), until: Some(t("2026-01-11T00:00:00Z")) },
            ),
            (
                "acme".to_string(),
                f.clone(),
                Override { qps: 40, from: t("2026-01-20T00:00:00Z"), until: Some(t("2026-01-21T00:00:00Z")) },
            ),
            // Unknown tenant and feature: ignored.
            ("nobody".to_string(), f.clone(), Override { qps: 40, from: t("2026-01-20T00:00:00Z"), until: None }),
            (
                "acme".to_string(),
                "nope".to_string(),
                Override { qps: 40, from: t("2026-01-20T00:00:00Z"), until: None },
            ),
        ];
        overlay(&mut s, &ovs);
        let plans = &s.tenants[0].plans;
        assert_eq!(plans[0].qps, 25);
        assert_eq!(plans[0].upgrades.len(), 2, "{:?}", plans[0].upgrades);
        assert_eq!(plans[0].upgrades[1].qps, 40);
        assert_eq!(plans[1].qps, 10, "a plan not active at the override's from is left alone");
        assert!(plans[1].upgrades.is_empty());
    }
}
