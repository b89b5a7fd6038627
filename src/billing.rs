//! Who pays, as orchestration (SPEC §6): at admission the payer is chosen ([`crate::payer`])
//! and a package's share is held in the store; on a 2xx the hold is committed and the units
//! added to the month; otherwise the hold is given back (the [`Reservation`] guard's drop).
//! Low-balance alerts, package and image gauges, and the charge metrics live here; the state
//! itself lives in the store ([`crate::store::local::LocalStore`]), in integer units, changed by
//! deltas that are idempotent on the request id.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use http::HeaderValue;
use prometheus::{Gauge, IntGauge};
use rust_decimal::Decimal;
use rustc_hash::FxBuildHasher;

use crate::catalog::Unit;
use crate::config::entitlements::{Package, Tenant};
use crate::config::gateway::Durability;
use crate::config::Dec;
use crate::ledger::{LedgerError, LedgerStore};
use crate::metrics::Metrics;
use crate::pricing;
use crate::snapshot::Snapshot;
use crate::store::local::LocalStore;
use crate::store::{
    Admit, BalanceStore, BucketKey, Candidate, Durable, ImageStore, Quota, RateState, RateStore, RequestId, RequestIds,
    StoreError, Stores, TenantKey, UsageStore, UsageTo, CALL_CELL, UNPRICED,
};
use crate::units;

pub use crate::alerts::Alert;
pub use crate::payer::PayerKind;
pub use crate::store::local::Unflushed;

/// How long a hold lives before the sweep gives it back. Local: never. A local hold is given
/// back by its guard's drop, synchronously, and a call may stay in flight for any time (any
/// `upstream_timeout_ms` is accepted in local mode, and a streamed gRPC answer is settled at its
/// trailers); a lease that ran out under a live call let its settlement find no hold and record
/// a package-paid call the package never paid for, while the points paid another call.
const HOLD_LEASE: Duration = Duration::MAX;

fn tenant_key(t: &Tenant) -> TenantKey<'static> {
    TenantKey { name: t.label, local: t.intern }
}

fn candidate(t: &Tenant, p: &Package) -> Candidate<'static> {
    Candidate { id: p.label, points: p.points_micro, local: crate::intern::pair(t.intern, p.intern) }
}

/// A payer chosen at admission. A held package share is given back when this is dropped
/// without [`Billing::settle_call`] (upstream error, non-2xx, client gone).
pub struct Reservation {
    pub payer: PayerKind,
    header: HeaderValue,
    /// The request's id: the key of its hold and of every delta it settles.
    id: RequestId,
    /// The package named as payer (for a per-call feature: holding `factor` micro-points).
    package: Option<(TenantKey<'static>, Candidate<'static>)>,
    /// Set while a hold exists: dropping the reservation releases it.
    held: Option<Stores>,
    /// Video features: the payer is decided from the usage the upstream reports.
    pub deferred: bool,
    /// Made on the local fallback (cluster mode, Redis unreachable): settled locally and
    /// journaled for the replay.
    pub fallback: bool,
    /// Shadow mode (SPEC §5.5): nothing could pay, and the call is forwarded all the same; a
    /// 2xx charges nobody and records its units as unpaid ([`Billing::unpaid`]).
    unpaid: bool,
}

impl Reservation {
    pub fn header(&self) -> HeaderValue {
        self.header.clone()
    }

    pub fn id(&self) -> RequestId {
        self.id
    }

    /// Whether this is a shadow-mode call with no payer ([`Billing::unpaid`]).
    pub fn is_unpaid(&self) -> bool {
        self.unpaid
    }
}

/// `x-turnstile-payer` of a shadow-mode call nothing could pay for: what the usage report and
/// `turnstile_unpaid_units_total` record it as.
pub const UNPAID_HEADER: &str = "unpaid";

impl Drop for Reservation {
    fn drop(&mut self) {
        if let (Some(store), Some((t, _))) = (self.held.take(), self.package) {
            store.release_in_background(t, self.id);
        }
    }
}

/// A capacity slot held by an image-search add in flight; given back when dropped unsettled.
pub struct ImageSlot {
    id: RequestId,
    tenant: TenantKey<'static>,
    store: Option<Stores>,
}

impl Drop for ImageSlot {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            store.release_image_slot_in_background(self.tenant, self.id);
        }
    }
}

/// The Image Search part of a call's settlement: the operation, the add's slot, and the count
/// the upstream reported.
pub struct ImageSettle {
    pub op: crate::config::gateway::ImageOp,
    pub slot: Option<ImageSlot>,
    pub reported: Option<u64>,
}

/// The settlement script's image part for `i`.
fn image_part(i: &ImageSettle) -> crate::store::redis::ImagePart {
    use crate::config::gateway::ImageOp;
    use crate::store::redis::ImagePart;
    match (i.reported, i.op) {
        (Some(n), _) => ImagePart::Set(n),
        (None, ImageOp::Add) => ImagePart::Add,
        (None, ImageOp::Delete) => ImagePart::Delete,
        (None, ImageOp::Search) => ImagePart::Release,
    }
}

/// What [`Billing::admit`] answered.
/// `quota` is the bucket's shape as enforced (on the fallback: the replica's share).
// A short-lived return value on the stack; boxing the reservation would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Admission {
    Throttled {
        retry_after: Duration,
        quota: Quota,
    },
    /// Admitted. `paid`: on Redis, the payer chosen in the same round trip (`Some(None)`: none
    /// can pay, a 402 whose token was already given back); `None`: the pay phase chooses it.
    Allowed {
        remaining: u32,
        reset_secs: u64,
        paid: Option<Option<Reservation>>,
        quota: Quota,
    },
}

/// The metrics of one settlement (counted at once in batched mode, once durable in strict).
struct Charge {
    pair: u64,
    tenant: &'static str,
    feature: &'static str,
    units: [Decimal; 5],
    payg_amount: Option<Decimal>,
    unpaid: Decimal,
    currency: String,
    /// Packages that paid: their gauges are set again after a revert.
    packages: Vec<(TenantKey<'static>, Candidate<'static>)>,
    /// Strict mode: packages this charge left at or below the low-balance ratio (not yet
    /// alerted), checked again, marked and fired once the charge is durable (a reverted charge
    /// was never made: it marks and fires nothing).
    alerts: Vec<PendingAlert>,
    /// Strict mode on the cluster fallback: what Redis must replay of this charge, journaled
    /// once the charge is durable (a reverted charge was never made: Redis never gets it), each
    /// with when its live settlement was tried ([`crate::cluster::Remote::tried_now`]).
    journal: Vec<(crate::cluster::Replay, Option<crate::cluster::journal::Sent>)>,
}

/// What Redis must replay of a strict charge made on the cluster fallback, journaled when
/// dropped: once the charge is durable, or when the wait for it is dropped (the charge is then
/// neither reverted nor lost: it reaches the disk). A reverted charge clears it first.
struct JournalOnDrop<'a> {
    remote: Option<&'a crate::cluster::Remote>,
    entries: Vec<(crate::cluster::Replay, Option<crate::cluster::journal::Sent>)>,
}

impl Drop for JournalOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(remote) = self.remote {
            self.entries.drain(..).for_each(|(j, sent)| remote.journal_sent(j, sent));
        }
    }
}

/// A package whose low-balance alert waits for its charge to be durable: (tenant, package with
/// its whole points, what Redis had consumed of it beyond the local ledger (cluster fallback;
/// else 0), ratio, time).
type PendingAlert = (TenantKey<'static>, Candidate<'static>, i64, Decimal, i64);

/// Whether package `c` is low (SPEC §6) with `consumed` micro-points of it used.
fn is_low(c: Candidate<'_>, consumed: i64, ratio: Decimal) -> bool {
    crate::alerts::crossed(units::from_micro(c.points), units::from_micro((c.points - consumed).max(0)), ratio)
}

/// What a settlement did: who paid first (for `x-turnstile-payer`), the request id whose deltas
/// [`Billing::durable`] waits for in strict mode, and (strict only) the charge's metrics.
pub struct Settled {
    pub payer: HeaderValue,
    id: RequestId,
    pending: Option<Box<Charge>>,
}

/// A strict-mode charge that was not on disk within `[ledger].strict_timeout_ms`; it was
/// reverted, so the call is not charged.
#[derive(Debug, thiserror::Error)]
#[error("the charge was not durable within {timeout_ms} ms; it was reverted")]
pub struct NotDurable {
    pub timeout_ms: u64,
}

/// The usage of one (tenant, feature, month), as the usage report (SPEC §9) shows it: calls,
/// or minutes (exact decimals of the ms kept) for video features.
#[derive(Debug, Clone)]
pub struct MonthUsage {
    pub feature: String,
    /// Units per payer, indexed like [`crate::payer::PAYERS`].
    pub units: [Decimal; 5],
    /// Pay-as-you-go units per price cell.
    pub payg: std::collections::BTreeMap<String, Decimal>,
    /// Units nothing could pay for.
    pub unpaid: Decimal,
}

/// The usage an upstream reported for a video call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoUsage {
    pub ms: u64,
    pub fps: u32,
    pub lines: u32,
}

/// A package's live balance, as the admin views show it.
pub struct PackageView {
    consumed: Decimal,
    alerted: bool,
}

impl PackageView {
    pub fn consumed(&self) -> Decimal {
        self.consumed
    }
    pub fn alerted(&self) -> bool {
        self.alerted
    }
}

/// A tenant's Image Search count, as the admin views show it.
pub struct ImageView(u64);

impl ImageView {
    pub fn count(&self) -> u64 {
        self.0
    }
}

pub struct Billing {
    store: Arc<LocalStore>,
    /// The backend the request path awaits: the local store, or Redis in cluster mode.
    stores: Stores,
    /// `Stores::Local(store)`: the local store through the interfaces (cluster fallback).
    local: Stores,
    /// Cluster mode (SPEC §11): Redis, the failure policy, the fallback and its journal.
    remote: Option<Arc<crate::cluster::Remote>>,
    ids: RequestIds,
    metrics: Arc<Metrics>,
    alerts: crate::alerts::Outbox,
    gauges: DashMap<u64, Gauge, FxBuildHasher>,
    image_gauges: DashMap<u32, IntGauge, FxBuildHasher>,
    /// `single_package:<id>` / `general_package:<id>` per (tenant, package), made once.
    headers: DashMap<(u64, bool), HeaderValue, FxBuildHasher>,
    /// The time of alerts fired off the request path (a replay to Redis).
    clock: crate::clock::SharedClock,
}

/// A metric's value (Prometheus values are floats): nothing allocated on the settle path, and
/// the general conversion (~280 instructions) only for a new fraction: a call's units are whole,
/// and its amount is the same unit price call after call (the thread's last one is kept).
fn to_f64(d: Decimal) -> f64 {
    use rust_decimal::prelude::ToPrimitive;
    thread_local! {
        static LAST: std::cell::Cell<(i128, u32, f64)> = const { std::cell::Cell::new((0, 0, 0.0)) };
    }
    let (mantissa, scale) = (d.mantissa(), d.scale());
    if scale == 0 && mantissa.unsigned_abs() < 1 << 53 {
        return mantissa as f64;
    }
    LAST.with(|last| {
        let (m, s, f) = last.get();
        if (m, s) == (mantissa, scale) {
            return f;
        }
        let f = d.to_f64().unwrap_or(0.0);
        last.set((mantissa, scale, f));
        f
    })
}

impl Billing {
    /// Loads the ledger (with the system clock, no legacy video records) and starts the writer
    /// thread. Returns the alert receiver for the webhook sender.
    pub fn open(
        store: Box<dyn LedgerStore>,
        durability: Durability,
        flush_interval: Duration,
        strict_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Billing>, crate::alerts::Inbox), LedgerError> {
        let clock = crate::clock::SystemClock::shared();
        Self::open_with(store, durability, flush_interval, strict_timeout, metrics, clock, &|_| false)
    }

    /// [`Billing::open`] with the gateway's clock and which features count video (ledger
    /// records written before integer units kept decimal minutes for them).
    pub fn open_with(
        store: Box<dyn LedgerStore>,
        durability: Durability,
        flush_interval: Duration,
        strict_timeout: Duration,
        metrics: Arc<Metrics>,
        clock: crate::clock::SharedClock,
        video: &dyn Fn(&str) -> bool,
    ) -> Result<(Arc<Billing>, crate::alerts::Inbox), LedgerError> {
        Self::open_cluster(store, durability, flush_interval, strict_timeout, metrics, clock, video, None)
    }

    /// [`Billing::open_with`] with, in cluster mode, Redis as the store the request path awaits
    /// (the local store stays: the ledger of the fallback, SPEC §11.6).
    #[allow(clippy::too_many_arguments)]
    pub fn open_cluster(
        store: Box<dyn LedgerStore>,
        durability: Durability,
        flush_interval: Duration,
        strict_timeout: Duration,
        metrics: Arc<Metrics>,
        clock: crate::clock::SharedClock,
        video: &dyn Fn(&str) -> bool,
        remote: Option<crate::cluster::Remote>,
    ) -> Result<(Arc<Billing>, crate::alerts::Inbox), LedgerError> {
        let store =
            LocalStore::open(store, durability, flush_interval, strict_timeout, metrics.clone(), clock.clone(), video)?;
        let (alerts, alert_rx) = crate::alerts::channel();
        let remote = remote.map(Arc::new);
        let billing = Arc::new(Billing {
            stores: remote.as_ref().map_or_else(|| Stores::Local(store.clone()), |r| r.stores.clone()),
            local: Stores::Local(store.clone()),
            remote,
            store,
            ids: RequestIds::new(),
            metrics,
            alerts,
            gauges: DashMap::with_hasher(FxBuildHasher),
            image_gauges: DashMap::with_hasher(FxBuildHasher),
            headers: DashMap::with_hasher(FxBuildHasher),
            clock,
        });
        if let Some(r) = &billing.remote {
            let weak = Arc::downgrade(&billing);
            r.on_replayed_alert(move |a| {
                if let Some(b) = weak.upgrade() {
                    b.replayed_alert(&a);
                }
            });
            let weak = Arc::downgrade(&billing);
            r.on_replayed_charge(move |c| {
                if let Some(b) = weak.upgrade() {
                    b.replayed_charge(&c);
                }
            });
        }
        Ok((billing, alert_rx))
    }

    /// Low-balance alerts fired and not yet through their webhook delivery.
    pub fn alerts_pending(&self) -> usize {
        self.alerts.pending()
    }

    /// The local store behind it (ledger, flush, gauges from load).
    pub fn store(&self) -> &Arc<LocalStore> {
        &self.store
    }

    /// The backend the request path awaits.
    pub fn stores(&self) -> &Stores {
        &self.stores
    }

    /// Cluster mode: Redis and the fallback state.
    pub fn remote(&self) -> Option<&Arc<crate::cluster::Remote>> {
        self.remote.as_ref()
    }

    /// True when every operation of the request path completes without suspending: the local
    /// store (no Redis), and for settlements, batched durability (strict mode waits for the
    /// disk). The proxy then runs those phases in place instead of keeping their futures.
    pub fn decides_at_once(&self) -> bool {
        self.remote.is_none()
    }

    /// See [`Billing::decides_at_once`].
    pub fn settles_at_once(&self) -> bool {
        self.remote.is_none() && !self.store.is_strict()
    }

    /// Whether [`Billing::defer_call`] may spawn a settlement: on Redis in batched mode (it still
    /// hands a call back while the fallback serves or its bound is reached).
    pub fn may_defer(&self) -> bool {
        self.remote.is_some() && !self.store.is_strict()
    }

    /// True while cluster mode serves on the local fallback.
    pub fn in_fallback(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| r.in_fallback())
    }

    /// The store a request made now uses: Redis, or the local store in fallback.
    fn current(&self) -> (&Stores, bool) {
        match &self.remote {
            Some(r) if r.in_fallback() => (&self.local, true),
            _ => (&self.stores, false),
        }
    }

    /// A store error: 503 (`deny`, or local mode) or the switch to the fallback (`local`).
    fn failover(&self, e: StoreError) -> Result<(), StoreError> {
        match &self.remote {
            Some(r) => r.failover(e),
            None => Err(e),
        }
    }

    /// A settlement Redis failed: true when the replica switched to the fallback (`local`);
    /// false for a `deferred` one that `deny` would answer 503, but whose answer already went
    /// out: it is journaled all the same, the replica staying on Redis (its admissions answer
    /// 503 while Redis is down). Otherwise the error (`deny`: 503, the answer dropped).
    fn settlement_failed(&self, e: StoreError, deferred: bool, tenant: &str) -> Result<bool, StoreError> {
        match self.failover(e) {
            Ok(()) => Ok(true),
            Err(e) if deferred => {
                tracing::warn!(tenant, error = %e, "batched settlement: store unreachable; journaled, replayed when it answers");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Admission (SPEC §5.4, §11.1) of one call and, on Redis for a per-call feature that
    /// packages may pay, its package hold in the same round trip. Local mode and the fallback
    /// take from the local buckets (the fallback at `limit / expected_replicas`).
    #[allow(clippy::too_many_arguments)]
    pub async fn admit(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        key: BucketKey<'static>,
        q: Quota,
        now: i64,
    ) -> Result<Admission, StoreError> {
        if let Some(remote) = self.remote.as_ref().filter(|r| !r.in_fallback()) {
            // Boxed, like every Redis call: its state would size the local path's future too.
            match Box::pin(self.admit_redis(remote, snap, tenant, feature_idx, key, q, now)).await {
                Ok(a) => return Ok(a),
                Err(e) => self.failover(e)?,
            }
        }
        let (stores, fallback) = self.current();
        let q = match (&self.remote, fallback) {
            (Some(r), true) => r.local_quota(q),
            _ => q,
        };
        Ok(match stores.admit(key, q).await? {
            Admit::Allowed { remaining, reset_secs } => {
                Admission::Allowed { remaining, reset_secs, paid: None, quota: q }
            }
            Admit::Throttled { retry_after } => Admission::Throttled { retry_after, quota: q },
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn admit_redis(
        &self,
        remote: &crate::cluster::Remote,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        key: BucketKey<'static>,
        q: Quota,
        now: i64,
    ) -> Result<Admission, StoreError> {
        let f = &snap.catalog.features[feature_idx];
        let bucket = Some((key.bucket, q.limit, q.depth));
        let per_call_package =
            f.unit != Unit::VideoMinute && !crate::payer::prepaid(&snap.catalog, tenant, feature_idx, now);
        let chosen: Vec<(&Package, PayerKind)> = if per_call_package {
            crate::payer::candidates(&snap.catalog, tenant, feature_idx, now).collect()
        } else {
            Vec::new()
        };
        if chosen.is_empty() {
            let a = remote.redis.admit_and_hold(key.tenant, bucket, None).await?;
            return Ok(match a.admit {
                Ok((remaining, reset_secs)) => Admission::Allowed { remaining, reset_secs, paid: None, quota: q },
                Err(retry_after) => Admission::Throttled { retry_after, quota: q },
            });
        }
        let cands: Vec<(&str, i64)> = chosen.iter().map(|(p, _)| (p.label, p.points_micro)).collect();
        let id = self.ids.next();
        let fallback_payer = crate::payer::call_fallback(f);
        let hold = crate::store::redis::HoldReq {
            candidates: &cands,
            want: f.factor_micro,
            id: id.0,
            lease: remote.redis_lease(),
            undo_if_none: fallback_payer.is_none(),
        };
        let a = match remote.redis.admit_and_hold(key.tenant, bucket, Some(hold)).await {
            Ok(a) => a,
            Err(e) => {
                remote.journal_unanswered_hold(key.tenant, id.0);
                return Err(e);
            }
        };
        let (remaining, reset_secs) = match a.admit {
            Ok(x) => x,
            Err(retry_after) => return Ok(Admission::Throttled { retry_after, quota: q }),
        };
        let paid = match a.hold.and_then(|i| chosen.get(i).map(|c| (i, c))) {
            Some((_, (p, kind))) => Some(Reservation {
                payer: *kind,
                header: self.header(tenant, p, *kind),
                id,
                package: Some((tenant_key(tenant), candidate(tenant, p))),
                held: Some(self.stores.clone()),
                deferred: false,
                fallback: false,
                unpaid: false,
            }),
            None => fallback_payer.map(|k| Reservation {
                payer: k,
                header: HeaderValue::from_static(k.as_str()),
                id,
                package: None,
                held: None,
                deferred: false,
                fallback: false,
                unpaid: false,
            }),
        };
        // `paid: Some(None)` is a 402 whose token the script already gave back.
        Ok(Admission::Allowed { remaining, reset_secs, paid: Some(paid), quota: q })
    }

    /// Gives back the token of an admitted call refused afterwards (402, 409, 413), in the
    /// store serving now; `q` is the shape [`Billing::admit`] enforced. The refund has an id of
    /// its own: the store applies it once even when the command is sent again.
    pub async fn refund(&self, key: BucketKey<'static>, q: Quota) -> Result<(), StoreError> {
        self.current().0.refund(key, q, self.ids.next()).await
    }

    /// The bucket of `key` as it is, for a refusal decided before admission (SPEC §4): nothing
    /// taken, nothing written. Read where an admission made now would take its token (Redis, or
    /// the local buckets on the fallback at the replica's share, which it returns as the shape
    /// the fields show). On Redis one read-only call (none while this replica holds a 429 of
    /// the bucket); a store error is the caller's to handle (a refusal is still a refusal) and
    /// switches nothing to the fallback: the next admission does that.
    pub async fn peek(&self, key: BucketKey<'static>, q: Quota) -> Result<(Quota, RateState), StoreError> {
        let (stores, fallback) = self.current();
        let q = match (&self.remote, fallback) {
            (Some(r), true) => r.local_quota(q),
            _ => q,
        };
        Ok((q, stores.peek(key, q).await?))
    }

    /// False while ledger commits fail; true again once one succeeds.
    pub fn healthy(&self) -> bool {
        self.store.healthy()
    }

    fn header(&self, tenant: &Tenant, p: &Package, kind: PayerKind) -> HeaderValue {
        let general = kind == PayerKind::GeneralPackage;
        let key = (crate::intern::pair(tenant.intern, p.intern), general);
        if let Some(h) = self.headers.get(&key) {
            return h.clone();
        }
        let prefix = if general { "general_package" } else { "single_package" };
        let h = HeaderValue::try_from(format!("{prefix}:{}", p.label)).unwrap_or(HeaderValue::from_static("package"));
        self.headers.entry(key).or_insert(h).clone()
    }

    fn set_gauge(&self, t: TenantKey<'static>, c: Candidate<'static>, consumed: i64) {
        let remaining = units::from_micro((c.points - consumed).max(0));
        let g = match self.gauges.get(&c.local) {
            Some(g) => g.clone(),
            None => self.gauges.entry(c.local).or_insert_with(|| self.metrics.package_gauge(t.name, c.id)).clone(),
        };
        g.set(to_f64(remaining));
    }

    /// The image count of a tenant's instance (as kept in the ledger).
    pub fn images(&self, tenant: &Tenant) -> ImageView {
        ImageView(self.store.image_count_now(tenant_key(tenant)))
    }

    /// The image count of a tenant's instance in the store the gateway serves from (Redis in
    /// cluster mode: the same answer on every replica).
    pub async fn images_shared(&self, tenant: &Tenant) -> Result<ImageView, StoreError> {
        let (stores, _) = self.current();
        Ok(ImageView(stores.image_count(tenant_key(tenant)).await?))
    }

    /// Reserves one image slot for an add (under a fresh id); `None` when at capacity (409).
    pub async fn reserve_image_add(&self, tenant: &Tenant, capacity: u64) -> Result<Option<ImageSlot>, StoreError> {
        let (id, t) = (self.ids.next(), tenant_key(tenant));
        let held = self.stores.reserve_image_slot(t, capacity, id).await?;
        Ok(held.then(|| ImageSlot { id, tenant: t, store: Some(self.stores.clone()) }))
    }

    /// Reserves one image slot for the add of `r` (under its request id, so the settlement
    /// script can turn it into an image); `None` when the instance is at capacity (409).
    pub async fn reserve_image_add_for(
        &self,
        tenant: &Tenant,
        capacity: u64,
        r: &Reservation,
    ) -> Result<Option<ImageSlot>, StoreError> {
        let t = tenant_key(tenant);
        let stores = if r.fallback { &self.local } else { &self.stores };
        let held = stores.reserve_image_slot(t, capacity, r.id).await?;
        Ok(held.then(|| ImageSlot { id: r.id, tenant: t, store: Some(stores.clone()) }))
    }

    fn set_image_gauge(&self, tenant: &Tenant, count: u64) {
        let g = match self.image_gauges.get(&tenant.intern) {
            Some(g) => g.clone(),
            None => {
                self.image_gauges.entry(tenant.intern).or_insert_with(|| self.metrics.image_gauge(tenant.label)).clone()
            }
        };
        g.set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// Sets the image count to `reported`, the upstream's `x-usage-image-count` on an answer
    /// that is not charged (a non-2xx, a gRPC error): SPEC §4 makes it the instance's count
    /// after the call, whatever its status. In the store serving now (the fallback's while
    /// Redis is away: the next count reported to Redis corrects Redis).
    pub async fn resync_images(&self, tenant: &Tenant, reported: u64) -> Result<(), StoreError> {
        let (stores, _) = self.current();
        self.settle_images_in(stores, tenant, crate::config::gateway::ImageOp::Search, None, Some(reported)).await
    }

    async fn settle_images_in(
        &self,
        stores: &Stores,
        tenant: &Tenant,
        op: crate::config::gateway::ImageOp,
        slot: Option<ImageSlot>,
        reported: Option<u64>,
    ) -> Result<(), StoreError> {
        // Taking the store out of the slot turns the hold into an image (no give-back).
        let id = match slot {
            Some(mut s) => {
                s.store = None;
                s.id
            }
            None => self.ids.next(),
        };
        let count = stores.settle_images(tenant_key(tenant), op, id, reported).await?;
        self.set_image_gauge(tenant, count);
        Ok(())
    }

    /// The live balance of a tenant's package.
    pub fn package(&self, tenant: &Tenant, p: &Package) -> PackageView {
        let (t, c) = (tenant_key(tenant), candidate(tenant, p));
        PackageView {
            consumed: units::from_micro(self.store.consumed_now(t, c)),
            alerted: self.store.alerted_now(t, c),
        }
    }

    /// Sets a package's `turnstile_package_remaining_points` from its points and what the ledger
    /// says it consumed (SPEC §10: the series exists from the moment the package is loaded).
    pub fn refresh_package_gauge(&self, tenant: &Tenant, p: &Package) {
        let (t, c) = (tenant_key(tenant), candidate(tenant, p));
        self.set_gauge(t, c, self.store.consumed_now(t, c));
    }

    /// Local mode, before a scrape: sets every package gauge of `snap` and every image-count
    /// gauge from the store. A settlement sets its gauge from its own answer after the store's
    /// lock is released, so two settlements racing on one package (or instance) may leave the
    /// older value last; read here, the scrape shows what the ledger and the usage report hold.
    /// Cluster mode keeps the values Redis answered (the local store is only its fallback).
    pub fn refresh_gauges(&self, snap: &Snapshot) {
        if self.remote.is_some() {
            return;
        }
        for t in &snap.tenants {
            for p in &t.packages {
                self.refresh_package_gauge(t, p);
            }
            // Only the series that exist: a tenant's image series starts with its first change.
            if let Some(g) = self.image_gauges.get(&t.intern) {
                g.set(i64::try_from(self.store.image_count_now(tenant_key(t))).unwrap_or(i64::MAX));
            }
        }
    }

    /// Gives every package of `snap` its `turnstile_package_remaining_points` series (points
    /// less what the store says it consumed) and hides the series of packages no longer
    /// configured. In cluster mode the consumption is read from Redis off this thread (a task):
    /// until it answers, the series shows the full points.
    pub fn show_packages(self: &Arc<Self>, metrics: &Metrics, snap: &Arc<Snapshot>) {
        metrics.show_packages(snap.tenants.iter().flat_map(|t| t.packages.iter().map(move |p| (t.label, p.label))));
        if self.remote.is_none() {
            for t in &snap.tenants {
                for p in &t.packages {
                    self.refresh_package_gauge(t, p);
                }
            }
            return;
        }
        if let Some(r) = &self.remote {
            // The sweeper gives back the expired holds of every configured tenant.
            r.redis.set_tenants(snap.tenants.iter().map(|t| t.label));
        }
        for t in &snap.tenants {
            for p in &t.packages {
                let c = candidate(t, p);
                self.set_gauge(tenant_key(t), c, 0);
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else { return };
        let (billing, snap) = (Arc::downgrade(self), snap.clone());
        rt.spawn(async move {
            let Some(b) = billing.upgrade() else { return };
            let Some(remote) = b.remote.clone() else { return };
            for t in &snap.tenants {
                for p in &t.packages {
                    let (tk, c) = (tenant_key(t), candidate(t, p));
                    match remote.stores.consumed(tk, c).await {
                        Ok(consumed) => {
                            b.note_consumed(&remote, tk, c, consumed);
                            b.set_gauge(tk, c, consumed);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "package gauges: cannot read the balances from Redis");
                            return;
                        }
                    }
                }
            }
        });
    }

    /// The live balance of a tenant's package in the store the gateway serves from (Redis in
    /// cluster mode, so every replica answers the same).
    pub async fn package_shared(&self, tenant: &Tenant, p: &Package) -> Result<PackageView, StoreError> {
        let (t, c) = (tenant_key(tenant), candidate(tenant, p));
        match (&self.remote, self.current().1) {
            (Some(r), false) => {
                let consumed = r.redis.package_consumed(t.name, c.id).await?;
                let alerted = r.redis.alerted(t.name, c.id).await?;
                Ok(PackageView { consumed: units::from_micro(consumed), alerted })
            }
            _ => Ok(self.package(tenant, p)),
        }
    }

    /// [`Billing::usage`] from the store the gateway serves from (Redis in cluster mode).
    pub async fn usage_shared(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        month: &str,
    ) -> Result<Vec<MonthUsage>, StoreError> {
        let (stores, _) = self.current();
        let raw = stores.month(tenant_key(tenant), month).await?;
        Ok(Self::shown(snap, raw))
    }

    /// Chooses and reserves the payer of one call at admission; `None` means 402.
    pub async fn reserve(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        now: i64,
    ) -> Result<Option<Reservation>, StoreError> {
        let (stores, fallback) = self.current();
        match self.reserve_in(stores, fallback, snap, tenant, feature_idx, now).await {
            Err(e) if !fallback && self.remote.is_some() => {
                self.failover(e)?;
                self.reserve_in(&self.local, true, snap, tenant, feature_idx, now).await
            }
            r => r,
        }
    }

    /// Cluster mode: notes what Redis says a package consumed, less what the local ledger had
    /// charged it by then (earlier fallback spells, all replayed into that count before the
    /// replica left the fallback): the local ledger, which keeps those charges, then subtracts
    /// only what a fallback charges after this note. Not noted while in the fallback.
    fn note_consumed(
        &self,
        remote: &crate::cluster::Remote,
        t: TenantKey<'static>,
        c: Candidate<'static>,
        consumed: i64,
    ) {
        if !remote.in_fallback() {
            remote.note_consumed(c.local, consumed - self.store.consumed_now(t, c));
        }
    }

    /// A package as a candidate in `stores`: in the fallback it offers the local ledger only
    /// what Redis last said it had left.
    fn candidate_in(&self, fallback: bool, tenant: &Tenant, p: &Package) -> Candidate<'static> {
        let mut c = candidate(tenant, p);
        if let (true, Some(r)) = (fallback, &self.remote) {
            c.points = (c.points - r.known_consumed(c.local)).max(0);
        }
        c
    }

    #[allow(clippy::too_many_arguments)]
    async fn reserve_in(
        &self,
        stores: &Stores,
        fallback: bool,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        now: i64,
    ) -> Result<Option<Reservation>, StoreError> {
        let f = &snap.catalog.features[feature_idx];
        let id = self.ids.next();
        let video = f.unit == Unit::VideoMinute;
        let plain = |payer: PayerKind, deferred| Reservation {
            payer,
            header: HeaderValue::from_static(payer.as_str()),
            id,
            package: None,
            held: None,
            deferred,
            fallback,
            unpaid: false,
        };
        if crate::payer::prepaid(&snap.catalog, tenant, feature_idx, now) {
            // Image search instances are prepaid subscriptions.
            return Ok(Some(plain(PayerKind::PrepaidQps, false)));
        }
        let lease = match &self.remote {
            Some(r) if !fallback => r.redis_lease(),
            _ => HOLD_LEASE,
        };
        let t = tenant_key(tenant);
        for (p, kind) in crate::payer::candidates(&snap.catalog, tenant, feature_idx, now) {
            let c = self.candidate_in(fallback, tenant, p);
            if video {
                // Nothing is held (the minutes are not known yet); the first package with a
                // balance names the payer, also on a failed call.
                if c.points - stores.consumed(t, c).await? > 0 {
                    let header = self.header(tenant, p, kind);
                    let r = Reservation {
                        payer: kind,
                        header,
                        id,
                        package: Some((t, c)),
                        held: None,
                        deferred: true,
                        fallback,
                        unpaid: false,
                    };
                    return Ok(Some(r));
                }
                continue;
            }
            // One candidate at a time keeps the hot path free of a candidate list allocation;
            // the store applies the whole-factor rule.
            if stores.reserve(t, std::slice::from_ref(&c), f.factor_micro, id, lease).await?.is_some() {
                let header = self.header(tenant, p, kind);
                return Ok(Some(Reservation {
                    payer: kind,
                    header,
                    id,
                    package: Some((t, c)),
                    held: Some(stores.clone()),
                    deferred: false,
                    fallback,
                    unpaid: false,
                }));
            }
        }
        Ok(crate::payer::call_fallback(f).map(|k| plain(k, video)))
    }

    /// The reservation of a call nothing can pay for, forwarded in shadow mode (SPEC §5.5):
    /// no payer and nothing held (`payer` is not read); a 2xx is settled by
    /// [`Billing::settle_unpaid`]. Made in the store serving now, like [`Billing::reserve`].
    pub fn unpaid(&self) -> Reservation {
        Reservation {
            payer: PayerKind::FreeDefault,
            header: HeaderValue::from_static(UNPAID_HEADER),
            id: self.ids.next(),
            package: None,
            held: None,
            deferred: false,
            fallback: self.current().1,
            unpaid: true,
        }
    }

    /// Settles a 2xx of a shadow-mode call nothing could pay for: nobody is charged, and its
    /// units (1 call, or the reported video ms) are recorded unpaid in the month, as video
    /// minutes nothing can pay are (SPEC §6), so the usage report's `unpaid` and
    /// `turnstile_unpaid_units_total` show what shadow mode served without a payer.
    #[allow(clippy::too_many_arguments)]
    async fn settle_unpaid(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        r: Reservation,
        n: i64,
        now: i64,
        deferred: bool,
    ) -> Result<Settled, StoreError> {
        let f = &snap.catalog.features[feature_idx];
        let pair = crate::intern::pair(tenant.intern, f.intern);
        let key = BucketKey { tenant: tenant.label, bucket: f.label, local: pair };
        let month = crate::ledger::month_text(now, snap.settings.timezone);
        let month = month.as_str();
        let mut fallback = r.fallback;
        // A deferred record Redis failed under `deny` (the answer went out): journaled only.
        let mut journal_only = false;
        // When Redis was tried and failed: the record may have reached it then.
        let mut tried = None;
        let stores = if fallback { &self.local } else { &self.stores };
        if let Err(e) = stores.add_usage(key, month, UsageTo::Unpaid, n, CALL_CELL, r.id).await {
            let Some(remote) = self.remote.as_ref().filter(|_| !fallback) else {
                return Err(e);
            };
            tried = Some(remote.tried_now());
            // Redis failed: on `local` the units are recorded on the fallback and replayed
            // under the same id (applied once, whether or not Redis had them); a deferred
            // record under `deny` is replayed the same way, the replica staying on Redis.
            if self.settlement_failed(e, deferred, tenant.label)? {
                fallback = true;
                self.local.add_usage(key, month, UsageTo::Unpaid, n, CALL_CELL, r.id).await?;
            } else {
                journal_only = true;
            }
        }
        let journal = (fallback || journal_only).then(|| crate::cluster::Replay::Usage {
            tenant: tenant.name.clone(),
            feature: f.id.clone(),
            month: month.to_string(),
            to: UsageTo::Unpaid,
            units: n,
            cell: String::new(),
            id: r.id,
        });
        let charge = Charge {
            pair,
            tenant: tenant.label,
            feature: f.label,
            units: [Decimal::ZERO; 5],
            payg_amount: None,
            unpaid: if f.unit == Unit::VideoMinute { units::ms_to_minutes(n) } else { Decimal::from(n) },
            currency: String::new(),
            packages: Vec::new(),
            alerts: Vec::new(),
            journal: Vec::new(),
        };
        let payer = r.header();
        if journal_only {
            if let (Some(remote), Some(j)) = (&self.remote, journal) {
                remote.journal_sent(j, tried);
            }
            // Counted now, as a record made on the fallback is: its replay counts nothing.
            self.count(&charge);
            return Ok(Settled { payer, id: r.id, pending: None });
        }
        if self.remote.is_some() && !fallback {
            // Redis acknowledged it (SPEC §11.5).
            self.count(&charge);
            return Ok(Settled { payer, id: r.id, pending: None });
        }
        let mut settled = self.finish(payer, r.id, charge);
        self.journal_once_durable(&mut settled, journal, tried);
        Ok(settled)
    }

    /// Hands what Redis must replay of a settlement made on the fallback to the journal: at
    /// once when the settlement counts at once, else (strict) once [`Billing::durable`] has it on
    /// disk: a charge reverted for durability was never made, so Redis must never get it.
    /// `tried`: when Redis was tried for it and failed (none: never sent).
    fn journal_once_durable(
        &self,
        settled: &mut Settled,
        entries: impl IntoIterator<Item = crate::cluster::Replay>,
        tried: Option<crate::cluster::journal::Sent>,
    ) {
        let Some(remote) = &self.remote else { return };
        match settled.pending.as_mut() {
            Some(charge) => charge.journal.extend(entries.into_iter().map(|j| (j, tried))),
            None => entries.into_iter().for_each(|j| remote.journal_sent(j, tried)),
        }
    }

    /// After a package paid: sets its gauge and fires the low-balance alert the first time the
    /// balance falls to the ratio (once: the store remembers it). A strict charge of the local
    /// store (not yet durable) marks nothing: it leaves the package in `pending`, and
    /// [`Billing::durable`] marks and fires the alert once the charge is on disk, if the balance
    /// is still low then (a concurrent charge that crossed first may have been reverted).
    #[allow(clippy::too_many_arguments)]
    async fn paid(
        &self,
        stores: &Stores,
        t: TenantKey<'static>,
        c: Candidate<'static>,
        consumed: i64,
        ratio: Decimal,
        now: i64,
        pending: &mut Vec<PendingAlert>,
    ) -> Result<(), StoreError> {
        self.set_gauge(t, c, consumed);
        // On the cluster fallback a package offers only what Redis last said it had left (its
        // points less `known`): the ratio is of its whole points (SPEC §6), and so is the alert.
        let known = match (&self.remote, stores) {
            (Some(r), Stores::Local(_)) => r.known_consumed(c.local),
            _ => 0,
        };
        let whole = Candidate { points: c.points + known, ..c };
        if !is_low(whole, consumed + known, ratio) {
            return Ok(());
        }
        if matches!(stores, Stores::Local(_)) && self.store.is_strict() {
            if !self.store.alerted_now(t, c) {
                pending.push((t, whole, known, ratio, now));
            }
        } else if stores.mark_alerted(t, c).await? {
            self.journal_alert(stores, t, c);
            self.alert_fired(t, whole, consumed + known, ratio, now);
        }
        Ok(())
    }

    /// An alert marked on the local store in cluster mode (the fallback): Redis must learn it
    /// when it is back, or a replica fires it again (SPEC §11.3).
    fn journal_alert(&self, stores: &Stores, t: TenantKey<'static>, c: Candidate<'static>) {
        if let (Some(r), Stores::Local(_)) = (&self.remote, stores) {
            r.journal(crate::cluster::Replay::Alert { tenant: t.name.to_string(), package: c.id.to_string() });
        }
    }

    /// Cluster mode: a replayed charge marked a package's alert in Redis, the first time in the
    /// cluster (SPEC §6, §11.3). It fires here, through the same path as any alert, unless this
    /// replica already fired it on its fallback: the local store's mark, set by whichever comes
    /// first (this, or the fallback's own crossing, even one still waiting for its strict
    /// durability), lets exactly one of them fire.
    fn replayed_alert(&self, a: &crate::cluster::ReplayedAlert) {
        let (ti, tenant) = crate::intern::tenant(&a.tenant);
        let (pi, package) = crate::intern::package(&a.package);
        let t = TenantKey { name: tenant, local: ti };
        let c = Candidate { id: package, points: a.points, local: crate::intern::pair(ti, pi) };
        if self.store.mark_alerted_now(t, c) {
            self.alert_fired(t, c, a.consumed, a.ratio, self.clock.unix_nanos());
        }
    }

    /// Cluster mode: the replay of a settlement Redis did not answer live (nothing was counted
    /// then) succeeded: its unit counts now, under whoever Redis says paid it, at the price of
    /// the month's total Redis reports, as a live settlement counts it ([`Billing::call_charge`]).
    fn replayed_charge(&self, c: &crate::cluster::ReplayedCharge) {
        let (ti, tenant) = crate::intern::tenant(&c.tenant);
        let (fi, feature) = crate::intern::feature(&c.feature);
        let payer = match c.to {
            UsageTo::Payer(k) => Some(k),
            UsageTo::Unpaid => None,
        };
        let pair = crate::intern::pair(ti, fi);
        let (tiers, currency) = (&c.count.payg_tiers, c.count.currency.clone());
        self.count(&Self::call_charge(pair, tenant, feature, payer, c.cell_total, tiers, currency));
    }

    /// The metrics of one call's unit settled on Redis: under `payer` (`None`: nothing could
    /// pay it, unpaid), and for pay-as-you-go the price (`tiers`) of the month's call-cell
    /// `cell_total`-th call.
    fn call_charge(
        pair: u64,
        tenant: &'static str,
        feature: &'static str,
        payer: Option<PayerKind>,
        cell_total: Option<i64>,
        tiers: &[crate::catalog::Tier],
        currency: String,
    ) -> Charge {
        let mut units = [Decimal::ZERO; 5];
        let mut unpaid = Decimal::ZERO;
        match payer {
            Some(k) => units[k as usize] = Decimal::ONE,
            None => unpaid = Decimal::ONE,
        }
        let payg_amount = match (payer, cell_total) {
            (Some(PayerKind::Payg), Some(total)) => pricing::marginal_price(tiers, Decimal::from(total - 1)),
            _ => None,
        };
        Charge {
            pair,
            tenant,
            feature,
            units,
            payg_amount,
            unpaid,
            currency,
            packages: Vec::new(),
            alerts: Vec::new(),
            journal: Vec::new(),
        }
    }

    /// The low-balance alert fired (the store said it was the first time): log, metric, webhook.
    fn alert_fired(&self, t: TenantKey<'static>, c: Candidate<'static>, consumed: i64, ratio: Decimal, now: i64) {
        let (points, remaining) = (units::from_micro(c.points), units::from_micro((c.points - consumed).max(0)));
        tracing::warn!(tenant = t.name, package = c.id, %points, %remaining, "package balance low");
        self.metrics.low_balance_alert(t.name, c.id);
        self.alerts.send(Alert {
            tenant: t.name.to_string(),
            package: c.id.to_string(),
            points: Dec(points),
            remaining: Dec(remaining),
            ratio: Dec(ratio),
            at: crate::time::format_utc(now),
        });
    }

    /// Batched mode: the charge counts in the metrics at once. Strict mode: it is kept (boxed)
    /// in the [`Settled`] and counts once [`Billing::durable`] saw it on disk.
    fn finish(&self, payer: HeaderValue, id: RequestId, charge: Charge) -> Settled {
        if self.store.is_strict() {
            return Settled { payer, id, pending: Some(Box::new(charge)) };
        }
        self.count(&charge);
        Settled { payer, id, pending: None }
    }

    fn count(&self, c: &Charge) {
        for (i, u) in c.units.iter().enumerate() {
            if !u.is_zero() {
                self.metrics.billed(c.pair, c.tenant, c.feature, i, to_f64(*u));
            }
        }
        if let Some(a) = c.payg_amount {
            self.metrics.payg_amount(c.pair, c.tenant, c.feature, &c.currency, to_f64(a));
        }
        if !c.unpaid.is_zero() {
            self.metrics.unpaid(c.tenant, c.feature, to_f64(c.unpaid));
        }
    }

    /// Settles a per-call feature after the upstream answered 2xx.
    pub fn settle_call<'a>(
        &'a self,
        snap: &'a Snapshot,
        tenant: &'a Tenant,
        feature_idx: usize,
        r: Reservation,
        now: i64,
    ) -> impl std::future::Future<Output = Result<Settled, StoreError>> + Send + 'a {
        self.settle_call_as(snap, tenant, feature_idx, r, now, None, false)
    }

    /// [`Billing::settle_call`] with the Image Search count change of the same call
    /// (`(op, slot, reported count)`). On Redis the whole settlement — hold commit, month units,
    /// low-balance alert, image count — is one script call (SPEC §11.2–3).
    /// Not an `async fn` of its own: it hands back [`Billing::settle_call_as`]'s future as it is,
    /// where a wrapping future would hold it and move it again (+430 instructions a call in
    /// `loadtest/instructions.sh`, most of them `memcpy`).
    pub fn settle_call_with<'a>(
        &'a self,
        snap: &'a Snapshot,
        tenant: &'a Tenant,
        feature_idx: usize,
        r: Reservation,
        now: i64,
        image: Option<ImageSettle>,
    ) -> impl std::future::Future<Output = Result<Settled, StoreError>> + Send + 'a {
        self.settle_call_as(snap, tenant, feature_idx, r, now, image, false)
    }

    /// [`Billing::settle_call_with`]; `deferred`: its answer already went out
    /// ([`Billing::defer_call`]), so a Redis failure journals the charge whatever
    /// `on_store_error` says (see [`Billing::settle_call_redis`]).
    #[allow(clippy::too_many_arguments)]
    async fn settle_call_as(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        mut r: Reservation,
        now: i64,
        image: Option<ImageSettle>,
        deferred: bool,
    ) -> Result<Settled, StoreError> {
        if r.unpaid {
            // Image Search calls are prepaid: an unpaid call has no image part.
            return self.settle_unpaid(snap, tenant, feature_idx, r, 1, now, deferred).await;
        }
        match &self.remote {
            Some(remote) if !r.fallback => {
                Box::pin(self.settle_call_redis(remote, snap, tenant, feature_idx, r, now, image, deferred)).await
            }
            Some(_) => {
                let journal = Self::call_replay(snap, tenant, feature_idx, &r, now, image.as_ref());
                let mut settled =
                    self.settle_call_in(&self.local, snap, tenant, feature_idx, &mut r, now, image).await?;
                // Never sent to Redis.
                self.journal_once_durable(&mut settled, journal, None);
                Ok(settled)
            }
            None => self.settle_call_in(&self.stores, snap, tenant, feature_idx, &mut r, now, image).await,
        }
    }

    /// Batched mode on Redis (SPEC §11.5): the settlement of a per-call 2xx is spawned and the
    /// answer goes out at once with the payer chosen at admission. At most
    /// [`crate::cluster::MAX_DEFERRED`] are in flight; past that (and in strict mode, local mode
    /// or the fallback) the call is handed back to be settled on the request.
    /// What a crash can lose: the spawned settlements not yet acknowledged by Redis (their holds
    /// come back after the lease, so those calls go uncharged, never double-charged). One that
    /// Redis fails is journaled, whatever `on_store_error` says: the answer went out.
    #[allow(clippy::result_large_err)]
    pub fn defer_call(
        self: &Arc<Self>,
        snap: &Arc<Snapshot>,
        tenant: &'static str,
        feature_idx: usize,
        r: Reservation,
        now: i64,
        image: Option<ImageSettle>,
    ) -> Result<Settled, (Reservation, Option<ImageSettle>)> {
        let Some(remote) = self.remote.as_ref().filter(|_| !r.fallback && self.may_defer()) else {
            return Err((r, image));
        };
        let Ok(permit) = remote.deferred.clone().try_acquire_owned() else { return Err((r, image)) };
        let settled = Settled { payer: r.header(), id: r.id, pending: None };
        let (billing, snap) = (self.clone(), snap.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let Some(t) = snap.tenant(tenant) else { return };
            if let Err(e) = billing.settle_call_as(&snap, t, feature_idx, r, now, image, true).await {
                tracing::error!(tenant, error = %e, "batched settlement failed: this call is not charged");
            }
        });
        Ok(settled)
    }

    /// The settlement script's parts for a per-call charge: (usage field, cell field, alert at).
    fn call_parts(r: &Reservation, ratio: Decimal) -> (String, String, Option<i64>) {
        let (field, also) = Self::payer_fields(Some(r.payer));
        (field, also, r.package.map(|(_, c)| Self::alert_at(c.points, ratio)))
    }

    /// The month fields one call's unit goes to on Redis: its payer's, and for pay-as-you-go
    /// the call cell too; `None`: nobody could pay (`unpaid`).
    fn payer_fields(payer: Option<PayerKind>) -> (String, String) {
        use crate::store::redis::{CELL_FIELD, PAYER_FIELD, UNPAID_FIELD};
        match payer {
            Some(PayerKind::Payg) => (format!("{PAYER_FIELD}payg"), format!("{CELL_FIELD}{CALL_CELL}")),
            Some(k) => (format!("{PAYER_FIELD}{}", k.as_str()), String::new()),
            None => (UNPAID_FIELD.to_string(), String::new()),
        }
    }

    /// The consumption (micro-points) at which a package of `points` has `ratio` of them left.
    fn alert_at(points: i64, ratio: Decimal) -> i64 {
        let keep = (ratio * Decimal::from(points)).floor();
        points - i64::try_from(keep).unwrap_or(0).clamp(0, points)
    }

    /// How a per-call commit pays when its hold is gone: its lease ran out under a call still in
    /// flight (a long gRPC stream, a long upstream timeout) and the sweep gave the points back.
    /// The call was served, so it is paid as SPEC §6 pays a call now: by the tenant's packages
    /// for the feature in order (the first holding the whole factor), else by pay-as-you-go or
    /// `free_default` as the feature's billing says, else its unit is recorded unpaid (never
    /// silently free). `chosen`: the candidate packages, in that order.
    fn pay_instead(
        f: &crate::catalog::Feature,
        chosen: &[(&Package, PayerKind)],
        ratio: Decimal,
    ) -> crate::cluster::PayInstead {
        let (field, also) = Self::payer_fields(crate::payer::call_fallback(f));
        crate::cluster::PayInstead {
            want: f.factor_micro,
            candidates: chosen
                .iter()
                .map(|(p, k)| {
                    let points = p.points_micro;
                    (p.label.to_string(), points, Some(Self::alert_at(points, ratio)), Self::payer_fields(Some(*k)).0)
                })
                .collect(),
            field,
            also,
        }
    }

    /// What a call settled on the fallback replays to Redis: its units and image change in one
    /// settlement (no hold there), and its package charge as a take of the same id.
    fn call_replay(
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        r: &Reservation,
        now: i64,
        image: Option<&ImageSettle>,
    ) -> Vec<crate::cluster::Replay> {
        let f = &snap.catalog.features[feature_idx];
        let month = crate::ledger::month_of(now, snap.settings.timezone);
        let ratio = snap.settings.low_balance_ratio;
        let (field, also, _) = Self::call_parts(r, ratio);
        let mut out = vec![crate::cluster::Replay::Settle {
            tenant: tenant.name.clone(),
            id: r.id.0,
            hold: crate::store::redis::HoldAction::None,
            held: None,
            alert_at: None,
            ratio,
            usage: Some((f.id.clone(), month, field, 1)),
            also,
            image: image.map_or(crate::store::redis::ImagePart::None, image_part),
            instead: None,
            // Counted on the fallback.
            count: None,
        }];
        if let (Some(_), Some((_, c))) = (&r.held, r.package) {
            let points = tenant.packages.iter().find(|p| p.label == c.id).map_or(c.points, |p| p.points_micro);
            // Its alert too: the crossing may show only in Redis (what other replicas charged
            // meanwhile adds to it), and the replay fires it then.
            out.push(crate::cluster::Replay::Take {
                tenant: tenant.name.clone(),
                candidates: vec![(c.id.to_string(), points, Some(Self::alert_at(points, ratio)))],
                want: f.factor_micro,
                id: r.id,
                ratio,
            });
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    async fn settle_call_redis(
        &self,
        remote: &crate::cluster::Remote,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        mut r: Reservation,
        now: i64,
        image: Option<ImageSettle>,
        deferred: bool,
    ) -> Result<Settled, StoreError> {
        use crate::store::redis::{HoldAction, PaidInstead, Settle};
        let f = &snap.catalog.features[feature_idx];
        let pair = crate::intern::pair(tenant.intern, f.intern);
        let month = crate::ledger::month_text(now, snap.settings.timezone);
        let month = month.as_str();
        let ratio = snap.settings.low_balance_ratio;
        let (field, also, alert_at) = Self::call_parts(&r, ratio);
        // The hold is settled here (committed, or replayed), never released by the guard.
        let hold = if r.held.take().is_some() { HoldAction::Commit } else { HoldAction::None };
        // A commit that finds its hold swept pays as SPEC §6 pays the call now (in the script).
        let chosen: Vec<(&Package, PayerKind)> = if hold == HoldAction::Commit {
            crate::payer::candidates(&snap.catalog, tenant, feature_idx, now).collect()
        } else {
            Vec::new()
        };
        let instead = (hold == HoldAction::Commit).then(|| Self::pay_instead(f, &chosen, ratio));
        let froms = instead.as_ref().map(crate::cluster::PayInstead::froms).unwrap_or_default();
        let img = image.as_ref().map_or(crate::store::redis::ImagePart::None, image_part);
        // The slot is held under the call's own id: the script turns it into an image (or
        // the replay does), so the guard must not give it back.
        if let Some(mut slot) = image.and_then(|i| i.slot) {
            slot.store = None;
        }
        let s = Settle {
            hold,
            alert_at: alert_at.filter(|_| hold == HoldAction::Commit),
            usage: Some((f.label, month, &field, 1)),
            image: img,
            also: &also,
            part: crate::cluster::SETTLE_PART,
            instead: instead.as_ref().map(|i| i.part(&froms)),
        };
        let out = match remote.redis.settle(tenant.label, r.id.0, s).await {
            Ok(out) => out,
            Err(e) => {
                let tried = remote.tried_now();
                self.settlement_failed(e, deferred, tenant.label)?;
                // Its hold commits at the replay: not the fallback's to spend meanwhile.
                if let (HoldAction::Commit, Some((_, c))) = (hold, r.package) {
                    remote.note_journaled_hold(c.local, f.factor_micro);
                }
                // The settlement may or may not have reached Redis: the identical call (same
                // id and part) is replayed, so it applies exactly once (while the marker it
                // left, if it reached Redis, lives: `tried`).
                remote.journal_sent(
                    crate::cluster::Replay::Settle {
                        tenant: tenant.name.clone(),
                        id: r.id.0,
                        hold,
                        held: r.package.map(|(_, c)| (c.id.to_string(), c.points)),
                        alert_at: s.alert_at,
                        ratio,
                        usage: Some((f.id.clone(), month.to_string(), field.clone(), 1)),
                        also: also.clone(),
                        image: img,
                        instead: instead.clone(),
                        // Not counted here: Redis may or may not have it; its replay counts it.
                        count: Some(Box::new(crate::cluster::Uncounted {
                            currency: snap.catalog.currency.clone(),
                            payg_tiers: f.payg_tiers.clone(),
                        })),
                    },
                    Some(tried),
                );
                // Strict: nothing is charged for it in the local ledger, so this journal line is
                // the charge's only record: on disk before the 2xx (SPEC §7, §11.5).
                if let Some(journal) = self.remote.as_ref().filter(|_| self.store.is_strict()) {
                    journal.sync_journal_async().await;
                }
                let payer = r.header();
                return Ok(Settled { payer, id: r.id, pending: None });
            }
        };
        // Who paid: the hold's package as reserved, or (its hold swept) who paid instead.
        let t = tenant_key(tenant);
        let (payer, package, header) = match out.instead {
            None => (Some(r.payer), r.package, r.header()),
            Some(PaidInstead::Package(i)) => match chosen.get(i) {
                Some(&(p, k)) => (Some(k), Some((t, candidate(tenant, p))), self.header(tenant, p, k)),
                None => {
                    // The script answers an index into the candidates this call sent.
                    tracing::error!(tenant = tenant.label, index = i, "settlement named an unknown candidate");
                    (Some(r.payer), r.package, r.header())
                }
            },
            Some(PaidInstead::Fallback) => match crate::payer::call_fallback(f) {
                Some(k) => (Some(k), None, HeaderValue::from_static(k.as_str())),
                None => (None, None, HeaderValue::from_static(UNPAID_HEADER)),
            },
        };
        if out.instead.is_some() {
            tracing::warn!(
                tenant = tenant.label,
                feature = f.label,
                payer = header.to_str().unwrap_or(""),
                "a call outlived its package hold's lease (cluster.hold_lease_ms); it was paid at its settlement"
            );
        }
        let currency = snap.catalog.currency.clone();
        let charge = Self::call_charge(pair, tenant.label, f.label, payer, out.cell_total, &f.payg_tiers, currency);
        if let (Some((t, c)), Some(consumed)) = (package, out.consumed) {
            self.note_consumed(remote, t, c, consumed);
            self.set_gauge(t, c, consumed);
            if out.alert_fired {
                self.alert_fired(t, c, consumed, ratio, now);
            }
        }
        if let Some(n) = out.images {
            self.set_image_gauge(tenant, n);
        }
        // Redis acknowledged the script: in strict mode its AOF policy (checked by `turnstile
        // check`) made it durable before the answer (SPEC §11.5).
        self.count(&charge);
        Ok(Settled { payer: header, id: r.id, pending: None })
    }

    #[allow(clippy::too_many_arguments)]
    async fn settle_call_in(
        &self,
        stores: &Stores,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        // Borrowed, not moved: the caller's state keeps the one copy of it (dropped there).
        r: &mut Reservation,
        now: i64,
        image: Option<ImageSettle>,
    ) -> Result<Settled, StoreError> {
        let f = &snap.catalog.features[feature_idx];
        let pair = crate::intern::pair(tenant.intern, f.intern);
        let key = BucketKey { tenant: tenant.label, bucket: f.label, local: pair };
        let month = crate::ledger::month_text(now, snap.settings.timezone);
        let month = month.as_str();
        let mut units = [Decimal::ZERO; 5];
        units[r.payer as usize] = Decimal::ONE;
        let strict = self.store.is_strict();
        let mut charge = Charge {
            pair,
            tenant: tenant.label,
            feature: f.label,
            units,
            payg_amount: None,
            unpaid: Decimal::ZERO,
            currency: if strict { snap.catalog.currency.clone() } else { String::new() },
            packages: Vec::new(),
            alerts: Vec::new(),
            journal: Vec::new(),
        };
        let total = stores.add_usage(key, month, UsageTo::Payer(r.payer), 1, CALL_CELL, r.id).await?;
        if r.payer == PayerKind::Payg {
            charge.payg_amount = pricing::marginal_price(&f.payg_tiers, Decimal::from(total - 1));
        }
        if let (Some(_), Some((t, c))) = (r.held.take(), r.package) {
            if let Some(consumed) = stores.commit(t, r.id).await? {
                self.paid(stores, t, c, consumed, snap.settings.low_balance_ratio, now, &mut charge.alerts).await?;
                if strict {
                    charge.packages.push((t, c));
                }
            }
        }
        if let Some(i) = image {
            self.settle_images_in(stores, tenant, i.op, i.slot, i.reported).await?;
        }
        if !strict {
            // `count` takes the currency from here in batched mode (no copy per call).
            if let Some(a) = charge.payg_amount.take() {
                self.metrics.payg_amount(pair, tenant.label, f.label, &snap.catalog.currency, to_f64(a));
            }
        }
        let payer = r.header();
        Ok(self.finish(payer, r.id, charge))
    }

    /// Settles a video-minute call from the upstream's usage report, in integer ms: the packages
    /// in payer order give, in one step each, up to the micro-points the ms cost
    /// ([`crate::payer::video_want`]), [`crate::payer::split_video`] splits the ms over what
    /// they gave, and the rest goes to pay-as-you-go when the feature's billing includes it or
    /// the feature has a price for the reported cell, else to `free_default` when its billing
    /// includes `prepaid_qps`, else it is recorded unpaid (never silently free).
    /// `usage = None` (missing or malformed report) bills 0 minutes and records nothing else.
    pub async fn settle_video(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        mut r: Reservation,
        usage: Option<VideoUsage>,
        now: i64,
    ) -> Result<Settled, StoreError> {
        if r.unpaid {
            let ms = usage.map_or(0, |u| i64::try_from(u.ms).unwrap_or(i64::MAX));
            return self.settle_unpaid(snap, tenant, feature_idx, r, ms, now, false).await;
        }
        match self.settle_video_in(snap, tenant, feature_idx, &r, usage, now, None).await {
            Err(e) if !r.fallback && self.remote.is_some() => {
                // Redis failed part-way: on `local` the settlement is made again on the
                // fallback and journaled under the same id; the parts Redis did apply answer
                // the replay from their markers instead of applying twice (while they live:
                // when Redis was tried goes with the entries).
                let tried = self.remote.as_ref().map(|remote| remote.tried_now());
                self.failover(e)?;
                r.fallback = true;
                self.settle_video_in(snap, tenant, feature_idx, &r, usage, now, tried).await
            }
            other => other,
        }
    }

    /// `tried`: on the fallback after Redis failed this settlement part-way, when it was tried.
    #[allow(clippy::too_many_arguments)]
    async fn settle_video_in(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        r: &Reservation,
        usage: Option<VideoUsage>,
        now: i64,
        tried: Option<crate::cluster::journal::Sent>,
    ) -> Result<Settled, StoreError> {
        let f = &snap.catalog.features[feature_idx];
        let pair = crate::intern::pair(tenant.intern, f.intern);
        let key = BucketKey { tenant: tenant.label, bucket: f.label, local: pair };
        let month = crate::ledger::month_text(now, snap.settings.timezone);
        let month = month.as_str();
        let ms = usage.map_or(0, |u| i64::try_from(u.ms).unwrap_or(i64::MAX));
        let mut first: Option<HeaderValue> = None;
        let mut charge = Charge {
            pair,
            tenant: tenant.label,
            feature: f.label,
            units: [Decimal::ZERO; 5],
            payg_amount: None,
            unpaid: Decimal::ZERO,
            currency: snap.catalog.currency.clone(),
            packages: Vec::new(),
            alerts: Vec::new(),
            journal: Vec::new(),
        };
        let mut by_kind = [0i64; 5];
        let mut left = ms;
        let t = tenant_key(tenant);
        let stores = if r.fallback { &self.local } else { &self.stores };
        // The fallback journals what it charges: replayed to Redis under the same id.
        let mut journal: Vec<crate::cluster::Replay> = Vec::new();
        let fallback = r.fallback && self.remote.is_some();
        let mut usage_log = |to: UsageTo, units: i64, cell: &str| {
            if fallback {
                journal.push(crate::cluster::Replay::Usage {
                    tenant: tenant.name.clone(),
                    feature: f.id.clone(),
                    month: month.to_string(),
                    to,
                    units,
                    cell: cell.to_string(),
                    id: r.id,
                });
            }
        };
        let mut take_log: Option<crate::cluster::Replay> = None;
        if r.payer == PayerKind::PrepaidQps {
            by_kind[PayerKind::PrepaidQps as usize] = ms;
            left = 0;
            first = Some(r.header());
        } else if ms > 0 {
            let chosen: Vec<(&Package, PayerKind)> =
                crate::payer::candidates(&snap.catalog, tenant, feature_idx, now).collect();
            if !chosen.is_empty() {
                let cands: Vec<Candidate<'static>> =
                    chosen.iter().map(|(p, _)| self.candidate_in(r.fallback, tenant, p)).collect();
                let want = crate::payer::video_want(ms, f.factor_micro);
                let taken = stores.take_up_to(t, &cands, want, r.id).await?;
                if fallback {
                    let got: i64 = taken.iter().map(|x| x.taken).sum();
                    let ratio = snap.settings.low_balance_ratio;
                    take_log = Some(crate::cluster::Replay::Take {
                        tenant: tenant.name.clone(),
                        candidates: chosen
                            .iter()
                            .map(|(p, _)| (p.id.clone(), p.points_micro, Some(Self::alert_at(p.points_micro, ratio))))
                            .collect(),
                        want: got,
                        id: r.id,
                        ratio,
                    });
                }
                let amounts: Vec<i64> = taken.iter().map(|x| x.taken).collect();
                let (parts, rest) = crate::payer::split_video(ms, f.factor_micro, &amounts);
                for (i, ((p, kind), x)) in chosen.iter().zip(taken.iter()).enumerate() {
                    if x.taken <= 0 {
                        continue;
                    }
                    first.get_or_insert_with(|| self.header(tenant, p, *kind));
                    by_kind[*kind as usize] += parts[i];
                    if let (Some(remote), false) = (&self.remote, r.fallback) {
                        self.note_consumed(remote, t, cands[i], x.consumed);
                    }
                    let ratio = snap.settings.low_balance_ratio;
                    self.paid(stores, t, cands[i], x.consumed, ratio, now, &mut charge.alerts).await?;
                    charge.packages.push((t, cands[i]));
                }
                left = rest;
            }
        }
        if ms == 0 {
            // Nothing to bill: the month still lists the feature (units 0), as a report shows.
            stores.add_usage(key, month, UsageTo::Payer(r.payer), 0, CALL_CELL, r.id).await?;
            usage_log(UsageTo::Payer(r.payer), 0, CALL_CELL);
        }
        for (i, n) in by_kind.iter().enumerate() {
            if *n > 0 {
                let to = UsageTo::Payer(crate::payer::PayerKind::ALL[i]);
                stores.add_usage(key, month, to, *n, CALL_CELL, r.id).await?;
                usage_log(to, *n, CALL_CELL);
                charge.units[i] = units::ms_to_minutes(*n);
            }
        }
        if left > 0 {
            let cell = usage.and_then(|u| pricing::video_cell(&f.video_prices, u.fps, u.lines));
            let minutes = units::ms_to_minutes(left);
            match crate::payer::video_fallback(f, cell.is_some()) {
                Some(kind) => {
                    // A payg feature without a price for this cell is still metered (SPEC §3.2).
                    let cell_key = match (kind, cell) {
                        (PayerKind::Payg, Some(c)) => c.cell(),
                        (PayerKind::Payg, None) => UNPRICED.to_string(),
                        _ => String::new(),
                    };
                    stores.add_usage(key, month, UsageTo::Payer(kind), left, &cell_key, r.id).await?;
                    usage_log(UsageTo::Payer(kind), left, &cell_key);
                    charge.units[kind as usize] += minutes;
                    if kind == PayerKind::Payg {
                        charge.payg_amount = cell.map(|c| c.price * minutes);
                    }
                    first.get_or_insert_with(|| HeaderValue::from_static(kind.as_str()));
                }
                None => {
                    tracing::warn!(
                        tenant = tenant.label,
                        feature = f.label,
                        %minutes,
                        "video minutes beyond the packages and nothing else can pay: recorded unpaid"
                    );
                    stores.add_usage(key, month, UsageTo::Unpaid, left, CALL_CELL, r.id).await?;
                    usage_log(UsageTo::Unpaid, left, CALL_CELL);
                    charge.unpaid = minutes;
                }
            }
        }
        let payer = first.unwrap_or_else(|| r.header());
        if self.remote.is_some() && !r.fallback {
            // Redis acknowledged every step before this point (SPEC §11.5).
            self.count(&charge);
            return Ok(Settled { payer, id: r.id, pending: None });
        }
        let mut settled = self.finish(payer, r.id, charge);
        if fallback {
            self.journal_once_durable(&mut settled, take_log.into_iter().chain(journal), tried);
        }
        Ok(settled)
    }

    /// Waits until a settlement is durable and returns its payer header. Batched mode returns at
    /// once. Strict mode waits at most `[ledger].strict_timeout_ms`; past it the charge is
    /// reverted (the call is not charged) and the error says so (SPEC §7). A durable strict
    /// charge that left a package low marks its low-balance alert and fires it, the first time,
    /// if the balance is still low now (charges reverted meanwhile no longer count in it).
    pub async fn durable(&self, settled: Settled) -> Result<HeaderValue, NotDurable> {
        let Settled { payer, id, pending } = settled;
        let Some(mut charge) = pending else { return Ok(payer) };
        // A wait dropped before its answer (the client reset its stream) reverts nothing: the
        // charge stands and reaches the disk, so Redis gets it too (journaled on drop).
        let mut journal =
            JournalOnDrop { remote: self.remote.as_deref(), entries: std::mem::take(&mut charge.journal) };
        match self.local.durable(id).await {
            Ok(()) => {
                self.count(&charge);
                let journaled = !journal.entries.is_empty();
                drop(journal);
                // What Redis must replay of it is on disk too before the 2xx (SPEC §7, §11.6).
                if let Some(r) = self.remote.as_ref().filter(|_| journaled) {
                    r.sync_journal_async().await;
                }
                for &(t, c, known, ratio, now) in &charge.alerts {
                    if let Some(consumed) = self.store.mark_alerted_if_low_now(t, c, |n| is_low(c, n + known, ratio)) {
                        self.journal_alert(&self.local, t, c);
                        self.alert_fired(t, c, consumed + known, ratio, now);
                    }
                }
                Ok(payer)
            }
            Err(e) => {
                // Reverted: never made, so Redis never gets it.
                journal.entries.clear();
                for (t, c) in &charge.packages {
                    self.set_gauge(*t, *c, self.store.consumed_now(*t, *c));
                }
                let timeout_ms = match e {
                    StoreError::NotDurable { timeout_ms } => timeout_ms,
                    _ => 0,
                };
                Err(NotDurable { timeout_ms })
            }
        }
    }

    /// Commits everything settled so far and waits for it, at most `wait`; true when on disk.
    pub fn flush_within(&self, wait: Duration) -> bool {
        self.store.flush_within(wait)
    }

    /// Commits everything settled so far and waits for it (tests, benches), at most 30 s.
    pub fn flush(&self) -> bool {
        self.flush_within(Duration::from_secs(30))
    }

    /// Cluster batched mode: waits (at most `wait`) for the settlements spawned after their
    /// answers to be acknowledged by Redis, so SIGTERM loses none of them. Returns how many
    /// were still in flight at the deadline (0: none lost).
    pub async fn drain_deferred(&self, wait: Duration) -> usize {
        let Some(r) = &self.remote else { return 0 };
        let all = u32::try_from(crate::cluster::MAX_DEFERRED).unwrap_or(u32::MAX);
        match tokio::time::timeout(wait, r.deferred.acquire_many(all)).await {
            Ok(_) => 0,
            Err(_) => crate::cluster::MAX_DEFERRED - r.deferred.available_permits(),
        }
    }

    /// Flushes (waiting at most `wait`), then stops the writer with a last commit attempt.
    /// Reports how many records could not be written; later settlements stay in memory only.
    pub fn close(&self, wait: Duration) -> Result<(), Unflushed> {
        self.store.close(wait)
    }

    pub fn ledger_name(&self) -> &str {
        self.store.ledger_name()
    }

    /// Usage of a tenant for a `YYYY-MM` month, per feature, sorted by feature id, in the units
    /// the report shows: calls, or exact decimal minutes of the ms kept for video features.
    pub fn usage(&self, snap: &Snapshot, tenant: &str, month: &str) -> Vec<MonthUsage> {
        Self::shown(snap, self.store.month_now(tenant, month))
    }

    fn shown(snap: &Snapshot, raw: Vec<crate::store::MonthUsage>) -> Vec<MonthUsage> {
        raw.into_iter()
            .map(|u| {
                let video = snap.catalog.feature(&u.feature).is_some_and(|f| f.unit == Unit::VideoMinute);
                let show = |n: i64| if video { units::ms_to_minutes(n) } else { Decimal::from(n) };
                MonthUsage {
                    units: u.units.map(show),
                    payg: u.payg.iter().map(|(k, v)| (k.clone(), show(*v))).collect(),
                    unpaid: show(u.unpaid),
                    feature: u.feature,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Record, RedbLedger};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::Instant;

    const MAIN: &str = "[server]\nupstream = \"http://127.0.0.1:1\"\n";

    #[test]
    fn metric_values_are_the_decimals_general_conversion() {
        use rust_decimal::prelude::ToPrimitive;
        let values = ["1", "0.0025", "1", "0.0025", "0.0030", "0.003", "-7", "9007199254740993", "2.50", "0", "-0.5"];
        // Twice over, so that each value also follows a different one than the first time.
        for v in values.iter().chain(values.iter().rev()) {
            let d: Decimal = v.parse().unwrap();
            assert_eq!(to_f64(d).to_bits(), d.to_f64().unwrap().to_bits(), "{v}");
        }
    }

    fn snapshot(catalog: &str, ents: &str) -> Snapshot {
        let texts = crate::config::Texts::in_memory(MAIN, catalog, ents);
        crate::snapshot::build(&texts, 1).unwrap_or_else(|e| panic!("{e}"))
    }

    const SHIPPED: &str = include_str!("../config/catalog.toml");
    const KEY: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

    fn ents(packages: &str, services: &str) -> String {
        format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{KEY}"], "services": [{services}], "packages": [{packages}]}}}}}}"#
        )
    }

    fn t(s: &str) -> i64 {
        crate::time::parse_rfc3339(s).unwrap()
    }

    // The billing engine on the local store completes every call without suspending: these run
    // it synchronously (from plain threads, as the racing tests need).
    fn reserve(b: &Billing, s: &Snapshot, t: &Tenant, f: usize, now: i64) -> Option<Reservation> {
        crate::store::ready(b.reserve(s, t, f, now)).expect("local: ready").expect("local: no store error")
    }

    fn settle_call(b: &Billing, s: &Snapshot, t: &Tenant, f: usize, r: Reservation, now: i64) -> Settled {
        crate::store::ready(b.settle_call(s, t, f, r, now)).expect("local: ready").expect("local: no store error")
    }

    fn settle_video(
        b: &Billing,
        s: &Snapshot,
        t: &Tenant,
        f: usize,
        r: Reservation,
        u: Option<VideoUsage>,
        now: i64,
    ) -> Settled {
        crate::store::ready(b.settle_video(s, t, f, r, u, now)).expect("local: ready").expect("local: no store error")
    }

    fn open(dir: &std::path::Path, d: Durability) -> Arc<Billing> {
        open_at(dir, d, crate::clock::SystemClock::shared())
    }

    /// [`open`] on `clock`.
    fn open_at(dir: &std::path::Path, d: Durability, clock: crate::clock::SharedClock) -> Arc<Billing> {
        let store = RedbLedger::open(dir).unwrap();
        Billing::open_with(
            Box::new(store),
            d,
            Duration::from_millis(5),
            Duration::from_secs(2),
            Arc::new(Metrics::new(true)),
            clock,
            &|_| false,
        )
        .unwrap()
        .0
    }

    fn feature(s: &Snapshot, id: &str) -> usize {
        s.catalog.feature_index[id]
    }

    /// A shipped-catalog snapshot with one tenant owning `package`, a batched billing engine on
    /// a fresh ledger, the index of `feature`, and a time in the package's validity.
    fn fixture(
        package: &str,
        services: &str,
        feature_id: &str,
    ) -> (tempfile::TempDir, Snapshot, Arc<Billing>, usize, i64) {
        let dir = tempfile::tempdir().unwrap();
        let s = snapshot(SHIPPED, &ents(package, services));
        let b = open(dir.path(), Durability::Batched);
        let f = feature(&s, feature_id);
        (dir, s, b, f, t("2026-03-01T00:00:00Z"))
    }

    #[test]
    fn payg_tiers_give_the_seed_figure_for_15000_license_plate_calls() {
        let dir = tempfile::tempdir().unwrap();
        let s = snapshot(SHIPPED, &ents("", "\"text_recognition\""));
        let b = open(dir.path(), Durability::Batched);
        let f = feature(&s, "license-plate-recognition");
        let now = t("2026-01-15T12:00:00+08:00");
        for _ in 0..15_000 {
            let r = reserve(&b, &s, &s.tenants[0], f, now).expect("payg pays");
            assert_eq!(r.payer, PayerKind::Payg);
            settle_call(&b, &s, &s.tenants[0], f, r, now);
        }
        let usage = b.usage(&s, "acme", "2026-01");
        assert_eq!(usage.len(), 1);
        assert_eq!(usage[0].units[PayerKind::Payg as usize], Decimal::from(15_000));
        let lines = pricing::graduated(&s.catalog.features[f].payg_tiers, Decimal::ZERO, usage[0].payg[""]);
        let total: Decimal = lines.iter().map(|l| l.amount).sum();
        assert_eq!(total, Decimal::new(200_000, 2));
    }

    #[test]
    fn package_order_soonest_expiry_then_ordered_then_id_and_expired_skipped() {
        let pk = |id: &str, ordered: &str, expires: &str| {
            format!(
                r#"{{"id": "{id}", "feature": "object-detection", "points": "1", "ordered_at": "{ordered}", "expires_at": "{expires}"}}"#
            )
        };
        let packages = [
            pk("z-late", "2026-01-01T00:00:00Z", "2027-06-01T00:00:00Z"),
            pk("b-same", "2026-01-02T00:00:00Z", "2027-01-01T00:00:00Z"),
            pk("a-same-later-order", "2026-01-03T00:00:00Z", "2027-01-01T00:00:00Z"),
            pk("c-same", "2026-01-02T00:00:00Z", "2027-01-01T00:00:00Z"),
            pk("expired", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
            r#"{"id": "gen", "scope": "vision-image", "points": "1", "ordered_at": "2025-01-01T00:00:00Z", "expires_at": "2026-06-01T00:00:00Z"}"#.to_string(),
        ]
        .join(",");
        let dir = tempfile::tempdir().unwrap();
        let s = snapshot(SHIPPED, &ents(&packages, "\"object_detection\""));
        let b = open(dir.path(), Durability::Batched);
        let f = feature(&s, "object-detection");
        let now = t("2026-03-01T00:00:00Z");
        let mut order = Vec::new();
        // 1 point at 0.2 per call = 5 calls per package.
        for _ in 0..26 {
            let r = reserve(&b, &s, &s.tenants[0], f, now).expect("payer");
            order.push(r.header().to_str().unwrap().to_string());
            settle_call(&b, &s, &s.tenants[0], f, r, now);
        }
        let expect: Vec<String> = [
            "single_package:b-same",
            "single_package:c-same",
            "single_package:a-same-later-order",
            "single_package:z-late",
            "general_package:gen",
        ]
        .iter()
        .flat_map(|h| std::iter::repeat_n(h.to_string(), 5))
        .chain(["payg".to_string()])
        .collect();
        assert_eq!(order, expect);
    }

    #[test]
    fn a_package_pays_only_if_it_holds_the_whole_factor_and_release_gives_it_back() {
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "0.5", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let (_dir, s, b, f, now) = fixture(pk, "\"object_detection\"", "object-detection");
        let r1 = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        let r2 = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        let r3 = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        assert_eq!(
            (r1.payer, r2.payer, r3.payer),
            (PayerKind::SinglePackage, PayerKind::SinglePackage, PayerKind::Payg),
            "0.1 left < 0.2"
        );
        drop(r2); // upstream failed: the share comes back
        let r4 = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        assert_eq!(r4.payer, PayerKind::SinglePackage);
        settle_call(&b, &s, &s.tenants[0], f, r1, now);
        settle_call(&b, &s, &s.tenants[0], f, r4, now);
        let st = b.package(&s.tenants[0], &s.tenants[0].packages[0]);
        assert_eq!(st.consumed(), Decimal::new(4, 1));
        assert!(st.alerted(), "0.1 of 0.5 left is at most 20%");
    }

    #[test]
    fn racing_tasks_never_spend_more_than_a_package_holds() {
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "100", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let (_dir, s, b, f, now) = fixture(pk, "\"object_detection\"", "object-detection");
        let s = Arc::new(s);
        let paid_by_package = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (s, b, n) = (s.clone(), b.clone(), paid_by_package.clone());
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
                        if r.payer == PayerKind::SinglePackage {
                            if i % 3 == 0 {
                                drop(r); // failed call: released
                                continue;
                            }
                            n.fetch_add(1, Ordering::SeqCst);
                        }
                        settle_call(&b, &s, &s.tenants[0], f, r, now);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let st = b.package(&s.tenants[0], &s.tenants[0].packages[0]);
        assert_eq!(st.consumed(), Decimal::from(100), "exactly all of it: 500 calls at 0.2");
        assert_eq!(paid_by_package.load(Ordering::SeqCst), 500);
    }

    /// SPEC §6 under concurrency, several packages for one feature: calls at two instants race
    /// (one nanosecond before a package's expiry, and at it), each call paid by the first
    /// package holding the whole factor, a third of them failing upstream (the share comes
    /// back). Single-category before general-purpose, the soonest expiry first; a package
    /// pays only calls made while it is valid, and never more than it holds; what each package
    /// is said to have paid (`x-turnstile-payer`) is exactly its consumption; and the last
    /// factor's worth of each is spendable, so nothing stays held.
    #[test]
    fn racing_calls_spend_single_then_general_packages_each_within_its_points_and_validity() {
        let at = "2026-03-01T00:00:00Z";
        let pk = |id: &str, target: &str, points: &str, expires: &str| {
            format!(
                r#"{{"id": "{id}", {target}, "points": "{points}", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "{expires}"}}"#
            )
        };
        let od = r#""feature": "object-detection""#;
        let packages = [
            // Expires at the instant the later calls are made: only the earlier ones may use it.
            pk("od-ending", od, "2", at),
            pk("od-a", od, "3", "2026-06-01T00:00:00Z"),
            // Same expiry, ordered at the same time: the smaller id first.
            pk("od-b", od, "1", "2026-06-01T00:00:00Z"),
            pk("gen", r#""scope": "vision-image""#, "4", "2026-06-01T00:00:00Z"),
        ]
        .join(",");
        let (_dir, s, b, f, _) = fixture(&packages, "\"object_detection\"", "object-detection");
        let s = Arc::new(s);
        let now = t(at);
        let start = Arc::new(std::sync::Barrier::new(8));
        let threads: Vec<_> = (0..8i64)
            .map(|th| {
                let (s, b, start) = (s.clone(), b.clone(), start.clone());
                std::thread::spawn(move || {
                    // Half the threads call one nanosecond before `od-ending` expires.
                    let when = now - (th % 2);
                    start.wait();
                    let mut paid: std::collections::BTreeMap<String, (u64, i64)> = Default::default();
                    for i in 0..30 {
                        let r = reserve(&b, &s, &s.tenants[0], f, when).unwrap();
                        if i % 3 == 0 {
                            drop(r); // the upstream failed: the share comes back
                            continue;
                        }
                        let e = paid.entry(r.header().to_str().unwrap().to_string()).or_default();
                        e.0 += 1;
                        e.1 = e.1.max(when);
                        settle_call(&b, &s, &s.tenants[0], f, r, when);
                    }
                    paid
                })
            })
            .collect();
        let mut paid: std::collections::BTreeMap<String, (u64, i64)> = Default::default();
        for th in threads {
            for (k, (n, latest)) in th.join().unwrap() {
                let e = paid.entry(k).or_default();
                e.0 += n;
                e.1 = e.1.max(latest);
            }
        }
        let tenant = &s.tenants[0];
        let calls = |id: &str| paid.get(id).map_or(0, |p| p.0);
        for p in &tenant.packages {
            let header = if p.label == "gen" {
                "general_package:gen".to_string()
            } else {
                format!("single_package:{}", p.label)
            };
            let consumed = b.package(tenant, p).consumed();
            assert_eq!(consumed, Decimal::from(calls(&header)) * Decimal::new(2, 1), "{header}: {paid:?}");
            assert!(consumed <= p.points, "{header}: {consumed} of {}", p.points);
        }
        assert!(paid.get("single_package:od-ending").is_none_or(|p| p.1 < now), "used at its expiry: {paid:?}");
        let u = b.usage(&s, "acme", "2026-03");
        let units = u[0].units;
        let single = calls("single_package:od-ending") + calls("single_package:od-a") + calls("single_package:od-b");
        assert_eq!(
            (
                units[PayerKind::SinglePackage as usize],
                units[PayerKind::GeneralPackage as usize],
                units[PayerKind::Payg as usize]
            ),
            (Decimal::from(single), Decimal::from(calls("general_package:gen")), Decimal::from(calls("payg"))),
            "units per payer are the calls each was named for: {paid:?}"
        );
        assert!(calls("payg") > 0, "demand (160 calls) exceeds the 50 the packages pay: {paid:?}");
        // Nothing stays held: the still-valid packages pay the rest, to their last factor.
        loop {
            let r = reserve(&b, &s, tenant, f, now).unwrap();
            if r.payer == PayerKind::Payg {
                break;
            }
            settle_call(&b, &s, tenant, f, r, now);
        }
        for p in tenant.packages.iter().filter(|p| p.label != "od-ending") {
            assert_eq!(b.package(tenant, p).consumed(), p.points, "{} is spent to its last factor", p.label);
        }
    }

    #[test]
    fn video_minutes_split_across_packages_then_payg_and_the_seed_amount() {
        let pk = r#"{"id": "vid", "scope": "video-duration", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let (_dir, s, b, f, now) = fixture(pk, "\"video_production\"", "comprehensive-video-enhancement");
        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        assert!(r.deferred);
        let usage = VideoUsage { ms: 140_000, fps: 60, lines: 1080 };
        let settled = settle_video(&b, &s, &s.tenants[0], f, r, Some(usage), now);
        assert_eq!(settled.payer.to_str().unwrap(), "general_package:vid");
        let u = b.usage(&s, "acme", "2026-03");
        let units = &u[0].units;
        assert_eq!(units[PayerKind::GeneralPackage as usize], Decimal::ONE, "the package paid the one minute it held");
        let payg_minutes = u[0].payg["fps<=60,lines<=1440"];
        assert_eq!(pricing::round2(payg_minutes * Decimal::from(16)), Decimal::new(2133, 2), "1 min 20 s at 16/min");
        // The whole 2 min 20 s at payg is the seed's 37.33.
        let whole = Decimal::from(140_000) / Decimal::from(60_000) * Decimal::from(16);
        assert_eq!(pricing::round2(whole), Decimal::new(3733, 2));
        // Next call: the package is empty, payg pays from the start.
        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        let settled = settle_video(&b, &s, &s.tenants[0], f, r, None, now);
        assert_eq!(settled.payer.to_str().unwrap(), "payg");
    }

    const VID: &str = r#"{"id": "vid", "scope": "video-duration", "points": "30", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;

    #[test]
    fn concurrent_video_settlements_never_overdraw_and_every_minute_is_accounted() {
        // On 2 cores the old two-step take overdrew in about one run in four; five rounds.
        for round in 0..5 {
            video_drain_round(round);
        }
    }

    fn video_drain_round(round: u64) {
        // 200 small packages: every one of them running dry is a chance for two settlements to
        // split the same remainder.
        let packages: Vec<String> = (0..200)
            .map(|i| VID.replace("\"vid\"", &format!("\"vid-{i:02}\"")).replace("\"30\"", "\"0.15\""))
            .collect();
        let (_dir, s, b, f, now) =
            fixture(&packages.join(","), "\"video_production\"", "comprehensive-video-enhancement");
        let s = Arc::new(s);
        let threads: Vec<_> = (0..16u64)
            .map(|th| {
                let (s, b) = (s.clone(), b.clone());
                std::thread::spawn(move || {
                    let mut minutes = Decimal::ZERO;
                    for i in 0..100u64 {
                        // 0.1 to 0.4 minutes, exact in decimal.
                        let ms = 6_000 * ((i * 7 + th + round) % 4 + 1);
                        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
                        let usage = VideoUsage { ms, fps: 60, lines: 1080 };
                        settle_video(&b, &s, &s.tenants[0], f, r, Some(usage), now);
                        minutes += Decimal::from(ms) / Decimal::from(60_000);
                    }
                    minutes
                })
            })
            .collect();
        let total: Decimal = threads.into_iter().map(|t| t.join().unwrap()).sum();
        let mut consumed = Decimal::ZERO;
        for p in &s.tenants[0].packages {
            let c = b.package(&s.tenants[0], p).consumed();
            assert!(c <= p.points, "round {round}: {} consumed {c} of {} points", p.label, p.points);
            consumed += c;
        }
        assert_eq!(consumed, Decimal::from(30), "demand exceeds the packages: all of them are spent");
        let u = b.usage(&s, "acme", "2026-03");
        let units = &u[0].units;
        assert_eq!(units[PayerKind::GeneralPackage as usize], consumed);
        assert_eq!(
            units[PayerKind::GeneralPackage as usize] + units[PayerKind::Payg as usize],
            total,
            "package + fallback minutes == reported minutes"
        );
        assert_eq!(u[0].payg.values().copied().sum::<Decimal>(), units[PayerKind::Payg as usize]);
    }

    #[test]
    fn a_missing_video_report_bills_zero_and_leaves_no_unpriced_cell() {
        let (_dir, s, b, f, now) = fixture("", "\"video_production\"", "comprehensive-video-enhancement");
        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        settle_video(&b, &s, &s.tenants[0], f, r, Some(VideoUsage { ms: 60_000, fps: 60, lines: 1080 }), now);
        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        let settled = settle_video(&b, &s, &s.tenants[0], f, r, None, now);
        assert_eq!(settled.payer.to_str().unwrap(), "payg");
        let u = b.usage(&s, "acme", "2026-03");
        assert_eq!(u[0].units[PayerKind::Payg as usize], Decimal::ONE);
        assert_eq!(u[0].payg.keys().collect::<Vec<_>>(), ["fps<=60,lines<=1440"], "no unpriced cell: {:?}", u[0].payg);
    }

    /// SPEC §3.2: a feature whose billing includes `payg` but has no price "is still metered; its
    /// amounts are `null` and the usage report says 'no price configured'". A video feature
    /// without any video price (video OCR) showed `"amount": "0.00"`, as if its minutes were free.
    #[test]
    fn a_video_feature_without_any_price_reports_a_null_amount() {
        let (_dir, s, b, f, now) = fixture("", "\"video_understanding\"", "video-ocr");
        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        settle_video(&b, &s, &s.tenants[0], f, r, Some(VideoUsage { ms: 60_000, fps: 30, lines: 720 }), now);
        let u = crate::store::ready(crate::report::usage(&s, &b, &s.tenants[0], "2026-03")).unwrap().unwrap();
        let v = &u["features"]["video-ocr"];
        assert_eq!(v["units"]["payg"], "1", "{v}");
        assert_eq!(v["payg"]["amount"], serde_json::Value::Null, "{v}");
        assert!(v["payg"]["note"].as_str().is_some_and(|n| n.contains("no price configured")), "{v}");
        assert_eq!(u["total"], "0.00");
    }

    #[test]
    fn a_failed_video_call_names_the_package_it_would_have_used() {
        let (_dir, s, b, f, now) = fixture(VID, "\"video_production\"", "comprehensive-video-enhancement");
        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        assert!(r.deferred);
        assert_eq!(r.header().to_str().unwrap(), "general_package:vid");
        drop(r);
        assert_eq!(b.package(&s.tenants[0], &s.tenants[0].packages[0]).consumed(), Decimal::ZERO);
    }

    /// The shipped catalog with three video features sold by package only: one priced (the seed
    /// matrix), one unpriced capacity-billed, one unpriced and nothing else.
    fn package_only_video_catalog() -> String {
        let swap = |cat: String, id: &str, billing: &str| {
            let head = format!("[features.{id}]\n");
            let at = cat.find(&head).unwrap();
            let b = at + cat[at..].find("billing = ").unwrap();
            let e = b + cat[b..].find('\n').unwrap();
            format!("{}billing = {billing}{}", &cat[..b], &cat[e..])
        };
        let cat = swap(SHIPPED.to_string(), "comprehensive-video-enhancement", r#"["general_package"]"#);
        let cat = swap(cat, "video-super-resolution", r#"["general_package"]"#);
        swap(cat, "video-frame-interpolation", r#"["general_package", "prepaid_qps"]"#)
    }

    #[test]
    fn video_minutes_beyond_packages_go_to_a_payg_price_else_free_default_else_unpaid() {
        let s = snapshot(&package_only_video_catalog(), &ents(&VID.replace("\"30\"", "\"1\""), "\"video_production\""));
        let now = t("2026-03-01T00:00:00Z");
        let three = Some(VideoUsage { ms: 180_000, fps: 60, lines: 1080 });
        // (feature, where the 2 minutes beyond the 1-point package go; None = unpaid)
        let cases = [
            ("comprehensive-video-enhancement", Some(PayerKind::Payg)),
            ("video-frame-interpolation", Some(PayerKind::FreeDefault)),
            ("video-super-resolution", None),
        ];
        for (id, fallback) in cases {
            let dir = tempfile::tempdir().unwrap();
            let b = open(dir.path(), Durability::Batched);
            let f = feature(&s, id);
            let r = reserve(&b, &s, &s.tenants[0], f, now).expect("the package pays");
            let settled = settle_video(&b, &s, &s.tenants[0], f, r, three, now);
            assert_eq!(settled.payer.to_str().unwrap(), "general_package:vid", "{id}");
            let u = b.usage(&s, "acme", "2026-03");
            let units = &u[0].units;
            assert_eq!(units[PayerKind::GeneralPackage as usize], Decimal::ONE, "{id}");
            for k in [PayerKind::PrepaidQps, PayerKind::SinglePackage, PayerKind::Payg, PayerKind::FreeDefault] {
                let want = if Some(k) == fallback { Decimal::TWO } else { Decimal::ZERO };
                assert_eq!(units[k as usize], want, "{id}: {}", k.as_str());
            }
            if fallback == Some(PayerKind::Payg) {
                assert_eq!(u[0].payg["fps<=60,lines<=1440"], Decimal::TWO, "priced at the seed's 16/min");
            }
            let unpaid = if fallback.is_none() { Decimal::TWO } else { Decimal::ZERO };
            assert_eq!(u[0].unpaid, unpaid, "{id}");
            let series = format!(r#"turnstile_unpaid_units_total{{feature="{id}",tenant="acme"}} 2"#);
            assert_eq!(b.metrics.render().contains(&series), fallback.is_none(), "{id}");
            // Unpaid minutes are durable.
            assert!(b.close(Duration::from_secs(5)).is_ok());
            drop(b);
            let b = open(dir.path(), Durability::Batched);
            assert_eq!(b.usage(&s, "acme", "2026-03")[0].unpaid, unpaid, "{id} after restart");
        }
    }

    /// A ledger that fails every commit while `fail` is set (disk full, I/O error), then works.
    struct FlakyStore {
        inner: RedbLedger,
        fail: Arc<AtomicBool>,
    }

    impl LedgerStore for FlakyStore {
        fn load(&self) -> Result<Vec<Record>, LedgerError> {
            self.inner.load()
        }
        fn commit(&self, records: &[Record]) -> Result<(), LedgerError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(LedgerError::Write { path: "flaky".into(), reason: "No space left on device".into() });
            }
            self.inner.commit(records)
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    /// A thread that makes a [`FlakyStore`] fail for `failing`, then work for 15 ms, in turn,
    /// until stopped (working again from then on).
    struct Flapping {
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<()>,
    }

    impl Flapping {
        fn start(fail: &Arc<AtomicBool>, failing: Duration) -> Flapping {
            let stop = Arc::new(AtomicBool::new(false));
            let (fail, stopped) = (fail.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                let mut on = false;
                while !stopped.load(Ordering::SeqCst) {
                    on = !on;
                    fail.store(on, Ordering::SeqCst);
                    std::thread::sleep(if on { failing } else { Duration::from_millis(15) });
                }
                fail.store(false, Ordering::SeqCst);
            });
            Flapping { stop, thread }
        }

        fn stop(self) {
            self.stop.store(true, Ordering::SeqCst);
            self.thread.join().unwrap();
        }
    }

    /// How long a strict charge waits for its commit in these tests: long enough for a commit
    /// on a loaded 2-core CI machine (100 ms was not), so only a failing ledger reverts.
    const STRICT_WAIT: Duration = Duration::from_secs(1);

    fn open_flaky(dir: &std::path::Path, d: Durability, strict_timeout: Duration) -> (Arc<Billing>, Arc<AtomicBool>) {
        let fail = Arc::new(AtomicBool::new(false));
        let store = FlakyStore { inner: RedbLedger::open(dir).unwrap(), fail: fail.clone() };
        let b =
            Billing::open(Box::new(store), d, Duration::from_millis(5), strict_timeout, Arc::new(Metrics::new(true)))
                .unwrap()
                .0;
        (b, fail)
    }

    fn ledger_errors(b: &Billing) -> u64 {
        b.metrics.ledger_errors.get()
    }

    fn wait_until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn failing_commits_are_counted_make_billing_unhealthy_and_recover_losing_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = snapshot(SHIPPED, &ents("", "\"text_recognition\""));
        let f = feature(&s, "license-plate-recognition");
        let now = t("2026-01-15T12:00:00+08:00");
        let (b, fail) = open_flaky(dir.path(), Durability::Batched, Duration::from_secs(2));
        assert!(b.healthy());
        fail.store(true, Ordering::SeqCst);
        for _ in 0..10 {
            let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
            settle_call(&b, &s, &s.tenants[0], f, r, now);
        }
        wait_until("two failed commits", || ledger_errors(&b) >= 2);
        assert!(!b.healthy(), "not ready while commits fail");
        assert!(!b.flush_within(Duration::from_millis(50)), "a flush cannot succeed meanwhile");
        // Served from memory meanwhile.
        assert_eq!(b.usage(&s, "acme", "2026-01")[0].units[PayerKind::Payg as usize], Decimal::from(10));
        for _ in 0..5 {
            let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
            settle_call(&b, &s, &s.tenants[0], f, r, now);
        }
        fail.store(false, Ordering::SeqCst);
        assert!(b.flush(), "commits succeed again");
        assert!(b.healthy());
        let errors = ledger_errors(&b);
        assert!(b.close(Duration::from_secs(5)).is_ok());
        drop(b);
        let b = open(dir.path(), Durability::Batched);
        assert_eq!(
            b.usage(&s, "acme", "2026-01")[0].units[PayerKind::Payg as usize],
            Decimal::from(15),
            "nothing lost"
        );
        assert!(errors >= 2);
    }

    #[test]
    fn strict_charge_not_durable_in_time_is_reverted_exactly_and_the_revert_is_committed() {
        let dir = tempfile::tempdir().unwrap();
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"},
                    {"id": "vid", "scope": "video-duration", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, &ents(pk, "\"object_detection\", \"text_recognition\", \"video_production\""));
        let (od, lp, vid) = (
            feature(&s, "object-detection"),
            feature(&s, "license-plate-recognition"),
            feature(&s, "comprehensive-video-enhancement"),
        );
        let now = t("2026-03-01T00:00:00Z");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (b, fail) = open_flaky(dir.path(), Durability::Strict, STRICT_WAIT);
        let tenant = &s.tenants[0];
        // One of each, made durable: the state the reverts must come back to.
        for fi in [od, lp] {
            let r = reserve(&b, &s, tenant, fi, now).unwrap();
            assert!(rt.block_on(b.durable(settle_call(&b, &s, tenant, fi, r, now))).is_ok());
        }
        let r = reserve(&b, &s, tenant, vid, now).unwrap();
        let usage = Some(VideoUsage { ms: 30_000, fps: 60, lines: 1080 });
        assert!(rt.block_on(b.durable(settle_video(&b, &s, tenant, vid, r, usage, now))).is_ok());
        let before = b.usage(&s, "acme", "2026-03");
        let consumed = |i: usize| b.package(tenant, &tenant.packages[i]).consumed();
        let (od_before, vid_before) = (consumed(0), consumed(1));
        assert_eq!((od_before, vid_before), (Decimal::new(2, 1), Decimal::new(5, 1)));
        let charge_series = |b: &Billing| -> Vec<String> {
            let text = b.metrics.render();
            let keep = ["turnstile_billed_units_total", "turnstile_payg_amount_total", "turnstile_package_remaining"];
            text.lines().filter(|l| keep.iter().any(|k| l.starts_with(k))).map(str::to_string).collect()
        };
        let billed_before = charge_series(&b);
        assert!(billed_before.len() >= 4, "{billed_before:?}");

        fail.store(true, Ordering::SeqCst);
        let started = Instant::now();
        for fi in [od, lp] {
            let r = reserve(&b, &s, tenant, fi, now).unwrap();
            let e = rt.block_on(b.durable(settle_call(&b, &s, tenant, fi, r, now))).expect_err("not durable");
            assert_eq!(u128::from(e.timeout_ms), STRICT_WAIT.as_millis());
        }
        // 2 minutes: 0.5 from the package, 1.5 at payg.
        let r = reserve(&b, &s, tenant, vid, now).unwrap();
        let usage = Some(VideoUsage { ms: 120_000, fps: 60, lines: 1080 });
        assert!(rt.block_on(b.durable(settle_video(&b, &s, tenant, vid, r, usage, now))).is_err());
        assert!(started.elapsed() < STRICT_WAIT * 3 + Duration::from_secs(2), "bounded by the timeout, not blocked");
        assert!(!b.healthy());
        let after = b.usage(&s, "acme", "2026-03");
        for (x, y) in before.iter().zip(after.iter()) {
            assert_eq!(
                (&x.feature, x.units, &x.payg, x.unpaid),
                (&y.feature, y.units, &y.payg, y.unpaid),
                "not charged"
            );
        }
        assert_eq!((consumed(0), consumed(1)), (od_before, vid_before), "package consumption given back");
        assert_eq!(charge_series(&b), billed_before, "no billed metric for an uncharged call");

        fail.store(false, Ordering::SeqCst);
        assert!(b.flush());
        assert!(b.healthy());
        assert!(b.close(Duration::from_secs(5)).is_ok());
        drop(b);
        let b = open(dir.path(), Durability::Batched);
        let consumed = |i: usize| b.package(tenant, &tenant.packages[i]).consumed();
        let reopened = b.usage(&s, "acme", "2026-03");
        for (x, y) in before.iter().zip(reopened.iter()) {
            assert_eq!((&x.feature, x.units, &x.payg), (&y.feature, y.units, &y.payg), "the reverted state is on disk");
        }
        assert_eq!((consumed(0), consumed(1)), (od_before, vid_before));
    }

    #[test]
    fn concurrent_strict_settlements_under_a_flapping_ledger_charge_exactly_the_answered_calls() {
        let dir = tempfile::tempdir().unwrap();
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "20", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let (_d, s, _b, f, now) = fixture(pk, "\"object_detection\"", "object-detection");
        let s = Arc::new(s);
        let (b, fail) = open_flaky(dir.path(), Durability::Strict, Duration::from_millis(20));
        let flapping = Flapping::start(&fail, Duration::from_millis(40));
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (s, b) = (s.clone(), b.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    let (mut ok, mut ok_package, mut refused) = (0u64, 0u64, 0u64);
                    for _ in 0..40 {
                        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
                        let by_package = r.payer == PayerKind::SinglePackage;
                        match rt.block_on(b.durable(settle_call(&b, &s, &s.tenants[0], f, r, now))) {
                            Ok(_) => {
                                ok += 1;
                                ok_package += u64::from(by_package);
                            }
                            Err(_) => refused += 1,
                        }
                    }
                    (ok, ok_package, refused)
                })
            })
            .collect();
        let (mut ok, mut ok_package, mut refused) = (0, 0, 0);
        for t in threads {
            let (a, p, r) = t.join().unwrap();
            (ok, ok_package, refused) = (ok + a, ok_package + p, refused + r);
        }
        flapping.stop();
        assert!(refused > 0 && ok > 0, "the ledger flapped: {ok} answered, {refused} refused");
        assert!(b.flush());
        assert!(b.close(Duration::from_secs(5)).is_ok());
        drop(b);
        let b = open(dir.path(), Durability::Batched);
        let u = b.usage(&s, "acme", "2026-03");
        let units = u[0].units;
        assert_eq!(
            units.iter().copied().sum::<Decimal>(),
            Decimal::from(ok),
            "every answered call, once; no refused one"
        );
        assert_eq!(units[PayerKind::SinglePackage as usize], Decimal::from(ok_package));
        let consumed = b.package(&s.tenants[0], &s.tenants[0].packages[0]).consumed();
        assert_eq!(consumed, Decimal::from(ok_package) * Decimal::new(2, 1));
        assert!(consumed <= Decimal::from(20));
    }

    /// SPEC §6/§7 under concurrency, strict mode on a ledger that keeps failing and recovering:
    /// per-call charges on a single-category package (then payg), tiered payg calls, and video
    /// minutes on a general-purpose package (then payg) settle from several threads at once, and
    /// every charge that is not durable in time is reverted. What stays on disk is exactly the
    /// answered calls, per payer, and their points; no revert takes another charge's units, and
    /// each package's alert is marked (and counted once) exactly when what stands is low.
    #[test]
    fn concurrent_strict_calls_and_video_under_a_flapping_ledger_charge_exactly_the_answered_ones() {
        let dir = tempfile::tempdir().unwrap();
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "4", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"},
                    {"id": "vid", "scope": "video-duration", "points": "2", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s =
            Arc::new(snapshot(SHIPPED, &ents(pk, "\"object_detection\", \"text_recognition\", \"video_production\"")));
        let (od, lp, vid) = (
            feature(&s, "object-detection"),
            feature(&s, "license-plate-recognition"),
            feature(&s, "comprehensive-video-enhancement"),
        );
        let now = t("2026-03-01T00:00:00Z");
        let (b, fail) = open_flaky(dir.path(), Durability::Strict, Duration::from_millis(20));
        let flapping = Flapping::start(&fail, Duration::from_millis(35));
        // Per thread: answered (od by the package, od at payg, license plates, video ms), refused.
        let threads: Vec<_> = (0..6u64)
            .map(|th| {
                let (s, b) = (s.clone(), b.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    let tenant = &s.tenants[0];
                    let (mut ok, mut refused) = ([0u64; 4], 0u64);
                    for i in 0..60u64 {
                        let (f, kind) = [(od, 0), (lp, 2), (vid, 3)][((i + th) % 3) as usize];
                        let r = reserve(&b, &s, tenant, f, now).unwrap();
                        let kind = if kind == 0 && r.payer == PayerKind::Payg { 1 } else { kind };
                        // 0.1 to 0.5 minutes, exact in decimal.
                        let ms = 6_000 * ((i * 7 + th) % 5 + 1);
                        let settled = if f == vid {
                            settle_video(&b, &s, tenant, f, r, Some(VideoUsage { ms, fps: 60, lines: 1080 }), now)
                        } else {
                            settle_call(&b, &s, tenant, f, r, now)
                        };
                        match rt.block_on(b.durable(settled)) {
                            Ok(_) => ok[kind] += if f == vid { ms } else { 1 },
                            Err(_) => refused += 1,
                        }
                    }
                    (ok, refused)
                })
            })
            .collect();
        let (mut ok, mut refused) = ([0u64; 4], 0);
        for t in threads {
            let (o, r) = t.join().unwrap();
            ok.iter_mut().zip(o).for_each(|(a, b)| *a += b);
            refused += r;
        }
        flapping.stop();
        assert!(refused > 0 && ok.iter().all(|n| *n > 0), "the ledger flapped: {ok:?} answered, {refused} refused");
        assert!(b.flush());
        let alerts = alert_series(&b);
        assert!(b.close(Duration::from_secs(5)).is_ok());
        drop(b);

        let b = open(dir.path(), Durability::Batched);
        let u = b.usage(&s, "acme", "2026-03");
        let units = |id: &str| u.iter().find(|m| m.feature == id).map(|m| m.units).unwrap_or_default();
        let (od_units, lp_units, vid_units) =
            (units("object-detection"), units("license-plate-recognition"), units("comprehensive-video-enhancement"));
        let d = |n: u64| Decimal::from(n);
        assert_eq!(
            (od_units[PayerKind::SinglePackage as usize], od_units[PayerKind::Payg as usize]),
            (d(ok[0]), d(ok[1])),
            "object detection: (package, payg) calls answered"
        );
        assert_eq!(lp_units.iter().copied().sum::<Decimal>(), d(ok[2]), "license plates answered");
        let minutes = d(ok[3]) / d(60_000);
        assert_eq!(
            vid_units[PayerKind::GeneralPackage as usize] + vid_units[PayerKind::Payg as usize],
            minutes,
            "video minutes answered, package then payg"
        );
        let tenant = &s.tenants[0];
        let consumed = |i: usize| b.package(tenant, &tenant.packages[i]).consumed();
        assert_eq!(consumed(0), od_units[PayerKind::SinglePackage as usize] * Decimal::new(2, 1), "0.2 a call");
        assert_eq!(consumed(1), vid_units[PayerKind::GeneralPackage as usize], "a point a minute");
        // The alert of each package: marked, and counted once, exactly when what stands is low.
        for (i, p) in tenant.packages.iter().enumerate() {
            let low = p.points - consumed(i) <= p.points * Decimal::new(2, 1);
            assert!(consumed(i) <= p.points, "{}: {} of {}", p.label, consumed(i), p.points);
            assert_eq!(
                b.package(tenant, p).alerted(),
                low,
                "{}: alerted after {} of {}",
                p.label,
                consumed(i),
                p.points
            );
            let line =
                format!(r#"turnstile_package_low_balance_alerts_total{{package="{}",tenant="acme"}} 1"#, p.label);
            assert_eq!(alerts.contains(&line), low, "{}: {alerts:?}", p.label);
        }
        assert!(alerts.len() <= 2, "{alerts:?}");
    }

    #[test]
    fn close_reports_the_records_it_could_not_flush() {
        let dir = tempfile::tempdir().unwrap();
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "5", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, &ents(pk, "\"object_detection\", \"text_recognition\""));
        let now = t("2026-03-01T00:00:00Z");
        let (b, fail) = open_flaky(dir.path(), Durability::Batched, Duration::from_secs(2));
        fail.store(true, Ordering::SeqCst);
        for id in ["object-detection", "license-plate-recognition"] {
            let f = feature(&s, id);
            let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
            settle_call(&b, &s, &s.tenants[0], f, r, now);
        }
        let started = Instant::now();
        let e = b.close(Duration::from_millis(200)).expect_err("the disk fails: not flushed");
        assert!(started.elapsed() < Duration::from_secs(2), "bounded");
        // The package and the two month records.
        assert_eq!(e.records, 3, "{e}");
        assert!(e.to_string().contains("3 ledger record(s) could not be flushed to flaky"), "{e}");

        // A close that could flush says so.
        let dir = tempfile::tempdir().unwrap();
        let (b, _fail) = open_flaky(dir.path(), Durability::Batched, Duration::from_secs(2));
        let f = feature(&s, "license-plate-recognition");
        let r = reserve(&b, &s, &s.tenants[0], f, now).unwrap();
        settle_call(&b, &s, &s.tenants[0], f, r, now);
        assert!(b.close(Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn recovery_restores_consumption_months_and_alerts_and_month_rolls_over() {
        let dir = tempfile::tempdir().unwrap();
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, &ents(pk, "\"object_detection\", \"text_recognition\""));
        let od = feature(&s, "object-detection");
        let lp = feature(&s, "license-plate-recognition");
        {
            let b = open(dir.path(), Durability::Strict);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            // Strict: each charge counts (and the alert is marked) once durable, as serving does.
            let charge = |f: usize, at: &str| {
                let r = reserve(&b, &s, &s.tenants[0], f, t(at)).unwrap();
                assert!(rt.block_on(b.durable(settle_call(&b, &s, &s.tenants[0], f, r, t(at)))).is_ok());
            };
            for _ in 0..5 {
                charge(od, "2026-01-31T15:59:59Z");
            }
            charge(lp, "2026-01-31T15:59:59Z");
            // 16:00Z is midnight in +08:00: February.
            charge(lp, "2026-01-31T16:00:00Z");
            b.close(Duration::from_secs(5)).unwrap();
        }
        let b = open(dir.path(), Durability::Batched);
        let st = b.package(&s.tenants[0], &s.tenants[0].packages[0]);
        assert_eq!(st.consumed(), Decimal::ONE);
        assert!(st.alerted());
        let jan = b.usage(&s, "acme", "2026-01");
        let feb = b.usage(&s, "acme", "2026-02");
        assert_eq!(jan.len(), 2);
        assert_eq!(feb.len(), 1);
        assert_eq!(feb[0].units[PayerKind::Payg as usize], Decimal::ONE);
        // The package is spent: the next object-detection call falls through to payg.
        assert_eq!(reserve(&b, &s, &s.tenants[0], od, t("2026-02-02T00:00:00Z")).unwrap().payer, PayerKind::Payg);
    }

    /// A call may be in flight longer than any fixed local hold lease: the config accepts any
    /// `upstream_timeout_ms` in local mode (only cluster mode checks its lease against it), and
    /// a streamed gRPC answer is settled at its trailers, however late. Its hold must still be
    /// there then (it was swept after 600 s: the package paid another call with the points).
    #[test]
    fn a_call_in_flight_past_the_local_hold_lease_is_still_charged_to_its_package() {
        let dir = tempfile::tempdir().unwrap();
        // 0.2 points: exactly one object-detection call.
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "0.2", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, &ents(pk, "\"object_detection\""));
        let f = feature(&s, "object-detection");
        let clock = crate::clock::ManualClock::at("2026-03-01T00:00:00Z");
        let b = open_at(dir.path(), Durability::Batched, clock.clone());
        let tenant = &s.tenants[0];
        let now = t("2026-03-01T00:00:00Z");
        let r = reserve(&b, &s, tenant, f, now).unwrap();
        assert_eq!(r.payer, PayerKind::SinglePackage);
        // The upstream answers after 11 minutes; the gateway's sweeper ran meanwhile.
        clock.advance(Duration::from_secs(11 * 60));
        b.store().sweep_now();
        let later = now + 11 * 60 * 1_000_000_000;
        // Another call meanwhile: the package must not pay it, its only call is still in flight.
        let r2 = reserve(&b, &s, tenant, f, later).unwrap();
        let r2_payer = r2.payer;
        settle_call(&b, &s, tenant, f, r, later);
        settle_call(&b, &s, tenant, f, r2, later);
        let u = b.usage(&s, "acme", "2026-03");
        let consumed = b.package(tenant, &tenant.packages[0]).consumed();
        assert_eq!(
            (u[0].units[PayerKind::SinglePackage as usize] * Decimal::new(2, 1), consumed, r2_payer),
            (Decimal::new(2, 1), Decimal::new(2, 1), PayerKind::Payg),
            "calls the package is said to have paid x 0.2 == points it gave; the second call is payg"
        );
    }

    /// The value of `series` (its name and whole label set) in what a scrape of `b` shows (the
    /// admin listener's `/metrics`: gauges refreshed from the store, then rendered).
    fn scraped(b: &Billing, s: &Snapshot, series: &str) -> Option<f64> {
        b.refresh_gauges(s);
        b.metrics.render().lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
    }

    /// SPEC §10 against §9: after a burst of calls racing on one package and of adds racing on
    /// one Image Search instance, a scrape shows the package's remaining points and the image
    /// count that the store (the ledger, the usage report) holds. Each settlement sets the gauge
    /// from its own answer after the store's lock is released, so two settlements of one
    /// package could leave the older value last.
    #[test]
    fn a_scrape_after_a_concurrent_burst_shows_the_stores_balance_and_image_count() {
        const THREADS: usize = 4;
        // On 2 cores about one run in two had a stale scrape in 300 rounds.
        const ROUNDS: usize = 600;
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "100000", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let ents = format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{KEY}"], "services": ["object_detection"], "packages": [{pk}],
                "image_search": {{"capacity": 1000000, "qps": 5, "expires_at": "2027-01-01T00:00:00Z"}}}}}}}}"#
        );
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(snapshot(SHIPPED, &ents));
        let b = open(dir.path(), Durability::Batched);
        b.show_packages(&b.metrics.clone(), &s);
        let (f, now) = (feature(&s, "object-detection"), t("2026-03-01T00:00:00Z"));
        let (mut stale_package, mut stale_images) = (0, 0);
        // Rounds of threads let go at once, each with a few calls: a round's last settlements race.
        for _ in 0..ROUNDS {
            let start = Arc::new(std::sync::Barrier::new(THREADS));
            let threads: Vec<_> = (0..THREADS)
                .map(|_| {
                    let (s, b, start) = (s.clone(), b.clone(), start.clone());
                    std::thread::spawn(move || {
                        let tenant = &s.tenants[0];
                        start.wait();
                        for _ in 0..3 {
                            let r = reserve(&b, &s, tenant, f, now).unwrap();
                            assert_eq!(r.payer, PayerKind::SinglePackage);
                            settle_call(&b, &s, tenant, f, r, now);
                            let slot = crate::store::ready(b.reserve_image_add(tenant, 1_000_000)).unwrap().unwrap();
                            let add =
                                b.settle_images_in(&b.stores, tenant, crate::config::gateway::ImageOp::Add, slot, None);
                            crate::store::ready(add).unwrap().unwrap();
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            let tenant = &s.tenants[0];
            let remaining = Decimal::from(100_000) - b.package(tenant, &tenant.packages[0]).consumed();
            let shown = scraped(&b, &s, r#"turnstile_package_remaining_points{package="od",tenant="acme"}"#);
            stale_package += usize::from(shown != Some(to_f64(remaining)));
            let shown = scraped(&b, &s, r#"turnstile_image_search_images{tenant="acme"}"#);
            stale_images += usize::from(shown != Some(b.images(tenant).count() as f64));
        }
        assert_eq!((stale_package, stale_images), (0, 0), "(package, image) scrapes of {ROUNDS} that were stale");
    }

    /// Seed 004 (capacity) as for a package hold above: an add may be in flight longer than any
    /// fixed local lease (any `upstream_timeout_ms` is accepted locally, and a streamed gRPC
    /// answer is settled at its trailers). Its slot must still be held then, or another add
    /// takes it and the instance ends over its capacity; and its image must count.
    #[test]
    fn an_image_add_in_flight_past_the_old_slot_lease_keeps_its_slot_and_counts_its_image() {
        let dir = tempfile::tempdir().unwrap();
        let ents = format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{KEY}"], "services": [],
                "image_search": {{"capacity": 1, "qps": 5, "expires_at": "2027-01-01T00:00:00Z"}}}}}}}}"#
        );
        let s = snapshot(SHIPPED, &ents);
        let clock = crate::clock::ManualClock::at("2026-03-01T00:00:00Z");
        let b = open_at(dir.path(), Durability::Batched, clock.clone());
        let tenant = &s.tenants[0];
        let reserve = || crate::store::ready(b.reserve_image_add(tenant, 1)).unwrap().unwrap();
        let first = reserve().expect("room for one");
        // The upstream answers after 11 minutes; the gateway's sweeper ran meanwhile.
        clock.advance(Duration::from_secs(11 * 60));
        b.store().sweep_now();
        let second = reserve();
        let add = b.settle_images_in(&b.stores, tenant, crate::config::gateway::ImageOp::Add, Some(first), None);
        crate::store::ready(add).unwrap().unwrap();
        assert_eq!(
            (second.is_some(), b.images(tenant).count()),
            (false, 1),
            "(a second add admitted while the first was in flight, images counted)"
        );
    }

    /// The strict-alert tests' setting: package `od` of 1 point (object detection: 0.2 a call),
    /// a ledger folder, and a runtime for `durable`: (folder, snapshot, feature, now, runtime).
    /// One call of `s`'s first tenant to feature `f`, reserved and settled at `now`.
    fn od_call(b: &Billing, s: &Snapshot, f: usize, now: i64) -> Settled {
        let tenant = &s.tenants[0];
        settle_call(b, s, tenant, f, reserve(b, s, tenant, f, now).unwrap(), now)
    }

    fn one_point_od() -> (tempfile::TempDir, Snapshot, usize, i64, tokio::runtime::Runtime) {
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, &ents(pk, "\"object_detection\""));
        let od = feature(&s, "object-detection");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        (tempfile::tempdir().unwrap(), s, od, t("2026-03-01T00:00:00Z"), rt)
    }

    /// SPEC §7: a strict charge not durable in time "is not charged"; SPEC §6: the
    /// low-balance alert fires once, "when remaining first drops to low_balance_ratio". A
    /// reverted charge must not leave the package marked alerted (nor count an alert), or the
    /// real crossing later never alerts.
    #[test]
    fn a_reverted_strict_charge_does_not_fire_or_use_up_the_low_balance_alert() {
        let (dir, s, od, now, rt) = one_point_od();
        let (b, fail) = open_flaky(dir.path(), Durability::Strict, STRICT_WAIT);
        let tenant = &s.tenants[0];
        // 3 calls of 0.2: 0.4 of 1 left (40%), no alert.
        for _ in 0..3 {
            assert!(rt.block_on(b.durable(od_call(&b, &s, od, now))).is_ok());
        }
        assert!(!b.package(tenant, &tenant.packages[0]).alerted());
        // The 4th would leave 0.2 (20%), but the ledger fails: reverted, not charged.
        fail.store(true, Ordering::SeqCst);
        assert!(rt.block_on(b.durable(od_call(&b, &s, od, now))).is_err());
        let after_revert = alert_state(&b, tenant);
        // The ledger works again; the 4th call really leaves 0.2: now the alert fires.
        fail.store(false, Ordering::SeqCst);
        assert!(rt.block_on(b.durable(od_call(&b, &s, od, now))).is_ok());
        let one = fired_once("od");
        assert_eq!(
            (after_revert, alert_state(&b, tenant)),
            ((Decimal::new(6, 1), false, vec![]), (Decimal::new(8, 1), true, one)),
            "(consumed, alerted, alert metric) after the revert, then after the real crossing"
        );
    }

    /// The alert series once acme's `package` fired its low-balance alert.
    fn fired_once(package: &str) -> Vec<String> {
        vec![format!(r#"turnstile_package_low_balance_alerts_total{{package="{package}",tenant="acme"}} 1"#)]
    }

    /// (consumed, alerted, alert metric) of `tenant`'s first package.
    fn alert_state(b: &Billing, tenant: &Tenant) -> (Decimal, bool, Vec<String>) {
        let st = b.package(tenant, &tenant.packages[0]);
        (st.consumed(), st.alerted(), alert_series(b))
    }

    /// The `turnstile_package_low_balance_alerts_total` lines of `b`'s metrics.
    fn alert_series(b: &Billing) -> Vec<String> {
        b.metrics
            .render()
            .lines()
            .filter(|l| l.starts_with("turnstile_package_low_balance_alerts_total"))
            .map(str::to_string)
            .collect()
    }

    /// SPEC §6/§7, two strict charges in flight together: A crosses the ratio, B follows the
    /// crossing; A is not durable in time (reverted), B is. What stays on disk is a balance at
    /// the ratio, so the alert fires (exactly once, at B's durability, never before), and it is
    /// not fired again after a restart.
    #[test]
    fn the_alert_fires_once_for_a_durable_charge_after_the_crossing_one_was_reverted() {
        let (dir, s, od, now, rt) = one_point_od();
        let tenant = &s.tenants[0];
        let one = fired_once("od");
        {
            let (b, fail) = open_flaky(dir.path(), Durability::Strict, STRICT_WAIT);
            // 3 calls of 0.2: 0.4 of 1 left (40%), no alert.
            for _ in 0..3 {
                assert!(rt.block_on(b.durable(od_call(&b, &s, od, now))).is_ok());
            }
            fail.store(true, Ordering::SeqCst);
            // A leaves 0.2 (20%: crosses), B then 0 (follows the crossing); neither durable yet.
            let a = od_call(&b, &s, od, now);
            let b2 = od_call(&b, &s, od, now);
            assert_eq!(alert_series(&b), Vec::<String>::new(), "no alert before durability");
            // A is not durable in time: reverted, not charged.
            assert!(rt.block_on(b.durable(a)).is_err());
            assert_eq!(alert_series(&b), Vec::<String>::new(), "a reverted charge fires nothing");
            // The ledger works again: B is on disk, and with it a balance of 0.2 (20%).
            fail.store(false, Ordering::SeqCst);
            assert!(b.flush());
            assert!(rt.block_on(b.durable(b2)).is_ok());
            assert_eq!(
                alert_state(&b, tenant),
                (Decimal::new(8, 1), true, one.clone()),
                "(consumed, alerted, alert metric) once B is durable"
            );
            assert!(b.close(Duration::from_secs(5)).is_ok());
        }
        // Restarted: the alert is remembered; the next charge (0 left) does not fire it again.
        let (b, _fail) = open_flaky(dir.path(), Durability::Strict, STRICT_WAIT);
        assert!(b.package(tenant, &tenant.packages[0]).alerted(), "the fired alert survives the restart");
        let r = reserve(&b, &s, tenant, od, now).unwrap();
        assert_eq!(r.payer, PayerKind::SinglePackage);
        assert!(rt.block_on(b.durable(settle_call(&b, &s, tenant, od, r, now))).is_ok());
        assert_eq!(alert_series(&b), Vec::<String>::new(), "not fired again after the restart");
    }

    /// The other side of the crossing: A crosses the ratio, B's settlement saw a balance past it
    /// only because A's charge was still in memory. A is reverted, so what is durable (B alone)
    /// is above the ratio: B's durability must not fire the alert; the real crossing later does.
    #[test]
    fn a_charge_that_crossed_only_with_a_reverted_one_does_not_fire_the_alert() {
        let dir = tempfile::tempdir().unwrap();
        let pk = r#"{"id": "vid", "scope": "video-duration", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, &ents(pk, "\"video_production\""));
        let vid = feature(&s, "comprehensive-video-enhancement");
        let now = t("2026-03-01T00:00:00Z");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (b, fail) = open_flaky(dir.path(), Durability::Strict, STRICT_WAIT);
        let tenant = &s.tenants[0];
        // A video point is a minute (60,000 ms).
        let video = |ms: u64| {
            let r = reserve(&b, &s, tenant, vid, now).unwrap();
            settle_video(&b, &s, tenant, vid, r, Some(VideoUsage { ms, fps: 60, lines: 1080 }), now)
        };
        // 0.4 used: 0.6 left.
        assert!(rt.block_on(b.durable(video(24_000))).is_ok());
        fail.store(true, Ordering::SeqCst);
        // A: 0.45 (0.15 left: crossed); B: 0.1 (0.05 left with A, 0.5 without it).
        let a = video(27_000);
        let b2 = video(6_000);
        assert!(rt.block_on(b.durable(a)).is_err());
        fail.store(false, Ordering::SeqCst);
        assert!(b.flush());
        assert!(rt.block_on(b.durable(b2)).is_ok());
        let after_b = alert_state(&b, tenant);
        // 0.3 more: 0.2 left (20%), the real crossing.
        assert!(rt.block_on(b.durable(video(18_000))).is_ok());
        let one = fired_once("vid");
        assert_eq!(
            (after_b, alert_state(&b, tenant)),
            ((Decimal::new(5, 1), false, vec![]), (Decimal::new(8, 1), true, one)),
            "(consumed, alerted, alert metric) after B, then after the real crossing"
        );
    }

    /// The check at durability reads what is on disk, not the consumption in memory, which may
    /// hold a later charge not durable yet: A (durable) saw the balance low only with W, which
    /// was reverted; C, settled after A's commit, brings it low in memory only, and is reverted
    /// too. 0.4 left on disk is not low: nothing fires, nothing is used up, and the real
    /// crossing later fires the alert.
    #[test]
    fn a_later_charge_not_yet_durable_does_not_fire_the_alert_at_an_earlier_durability() {
        let (dir, s, od, now, rt) = one_point_od();
        let tenant = &s.tenants[0];
        let (b, fail) = open_flaky(dir.path(), Durability::Strict, STRICT_WAIT);
        // 2 calls of 0.2: 0.6 of 1 left.
        for _ in 0..2 {
            assert!(rt.block_on(b.durable(od_call(&b, &s, od, now))).is_ok());
        }
        fail.store(true, Ordering::SeqCst);
        // W: 0.4 left; A: 0.2 left with W (low), 0.4 without it.
        let w = od_call(&b, &s, od, now);
        let a = od_call(&b, &s, od, now);
        assert!(rt.block_on(b.durable(w)).is_err(), "W is reverted");
        // A reaches the disk (0.4 left there).
        fail.store(false, Ordering::SeqCst);
        assert!(b.flush());
        // C is settled before A's waiter looks (0.2 left in memory), and never reaches the disk.
        fail.store(true, Ordering::SeqCst);
        let c = od_call(&b, &s, od, now);
        assert!(rt.block_on(b.durable(a)).is_ok(), "A is durable");
        assert!(rt.block_on(b.durable(c)).is_err(), "C is reverted");
        assert_eq!(
            alert_state(&b, tenant),
            (Decimal::new(6, 1), false, Vec::<String>::new()),
            "(consumed, alerted, alert metric): 0.4 left on disk is not low"
        );
        // The real crossing: 0.2 left, durable (once the ledger commits again: C's revert first).
        fail.store(false, Ordering::SeqCst);
        assert!(b.flush());
        let d = od_call(&b, &s, od, now);
        assert!(rt.block_on(b.durable(d)).is_ok());
        let one = fired_once("od");
        assert_eq!(alert_state(&b, tenant), (Decimal::new(8, 1), true, one), "the real crossing");
    }

    /// A ledger whose commits wait at a gate: the n-th commit (from 1) goes through once
    /// `allowed` reaches n; `entered` counts the commits begun.
    struct GatedStore {
        inner: RedbLedger,
        entered: Arc<AtomicU64>,
        allowed: Arc<AtomicU64>,
    }

    impl LedgerStore for GatedStore {
        fn load(&self) -> Result<Vec<Record>, LedgerError> {
            self.inner.load()
        }
        fn commit(&self, records: &[Record]) -> Result<(), LedgerError> {
            let n = self.entered.fetch_add(1, Ordering::SeqCst) + 1;
            // Bounded: a test that forgets to open the gate fails instead of hanging.
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.allowed.load(Ordering::SeqCst) < n && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.inner.commit(records)
        }
        fn describe(&self) -> String {
            "gated".into()
        }
    }

    /// SPEC §7 and §6: a strict charge A reverted while the commit that holds it is still on
    /// its way to the disk. That commit then lands with A in it (the next one writes A's revert),
    /// and B, durable by that same commit, must not see A's points as spent: the balance that
    /// stands (B without A) is 40% of the package, not low, so nothing fires and the alert is
    /// kept for the real crossing.
    #[test]
    fn a_charge_reverted_while_its_commit_lands_does_not_count_in_the_alert_check() {
        let dir = tempfile::tempdir().unwrap();
        let pk = r#"{"id": "od", "feature": "object-detection", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, &ents(pk, "\"object_detection\", \"text_recognition\""));
        let (od, lp, now) =
            (feature(&s, "object-detection"), feature(&s, "license-plate-recognition"), t("2026-03-01T00:00:00Z"));
        let (entered, allowed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(u64::MAX)));
        let ledger = GatedStore {
            inner: RedbLedger::open(dir.path()).unwrap(),
            entered: entered.clone(),
            allowed: allowed.clone(),
        };
        let b = Billing::open(
            Box::new(ledger),
            Durability::Strict,
            Duration::from_millis(5),
            STRICT_WAIT,
            Arc::new(Metrics::new(true)),
        )
        .unwrap()
        .0;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let tenant = &s.tenants[0];
        let charge = |f: usize| settle_call(&b, &s, tenant, f, reserve(&b, &s, tenant, f, now).unwrap(), now);
        // 0.4 of 1 point spent, on disk.
        for _ in 0..2 {
            assert!(rt.block_on(b.durable(charge(od))).is_ok());
        }
        let wait_entered = |n: u64| wait_until(&format!("commit {n} begun"), || entered.load(Ordering::SeqCst) >= n);
        // Commit k (another record) hangs; A and B wait behind it, then go in commit k+1 together.
        let k = entered.load(Ordering::SeqCst) + 1;
        allowed.store(k - 1, Ordering::SeqCst);
        let _other = charge(lp);
        wait_entered(k);
        let a = charge(od); // 0.6 spent in memory: 40% left
        let b2 = charge(od); // 0.8 with A: 20% left, low
        allowed.store(k, Ordering::SeqCst);
        wait_entered(k + 1);
        // A's wait times out while commit k+1 (holding A and B) is still on its way: reverted.
        assert!(rt.block_on(b.durable(a)).is_err(), "A is not durable in time");
        std::thread::scope(|sc| {
            let waiter = sc.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(b.durable(b2)).is_ok()
            });
            // Commit k+1 lands (with A in it); the next one (A's revert) waits at the gate.
            std::thread::sleep(Duration::from_millis(20));
            allowed.store(k + 1, Ordering::SeqCst);
            assert!(waiter.join().unwrap(), "B is durable");
        });
        allowed.store(u64::MAX, Ordering::SeqCst);
        assert!(b.flush());
        assert_eq!(
            alert_state(&b, tenant),
            (Decimal::new(6, 1), false, Vec::<String>::new()),
            "(consumed, alerted, alert metric): 0.4 left is not low"
        );
        // The real crossing fires it, once.
        assert!(rt.block_on(b.durable(charge(od))).is_ok());
        let one = fired_once("od");
        assert_eq!(alert_state(&b, tenant), (Decimal::new(8, 1), true, one), "the real crossing");
        assert!(b.close(Duration::from_secs(5)).is_ok());
    }

    /// Cluster mode (SPEC §11) on a real Redis: a call that outlives its hold's lease.
    mod on_redis {
        use super::*;
        use crate::config::gateway::OnStoreError;
        use crate::store::redis::harness;

        const OD: &str = r#"{"id": "od", "feature": "object-detection", "points": "POINTS", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        /// object-detection's factor: 0.2 points.
        const FACTOR: i64 = 200_000;
        const LEASE: Duration = Duration::from_millis(200);

        struct Fixture {
            redis: harness::RedisServer,
            _dir: tempfile::TempDir,
            b: Arc<Billing>,
            /// The low-balance alerts sent to the webhook sender.
            alerts: crate::alerts::Inbox,
            s: Arc<Snapshot>,
            f: usize,
            now: i64,
        }

        /// A billing engine on a fresh Redis whose holds live `LEASE`, and `acme` with one
        /// object-detection package of `points` (billing: package, then payg).
        async fn fixture(test: &str, points: &str) -> Option<Fixture> {
            fixture_with(test, points, OnStoreError::Deny, harness::Opts::default()).await
        }

        /// [`fixture`] with a failure policy and Redis options (`aof_always`: a restart keeps
        /// what Redis had).
        async fn fixture_with(
            test: &str,
            points: &str,
            on_store_error: OnStoreError,
            redis_opts: harness::Opts,
        ) -> Option<Fixture> {
            let dir = tempfile::tempdir().unwrap();
            let ledger = Box::new(RedbLedger::open(dir.path()).unwrap());
            fixture_on(test, points, on_store_error, redis_opts, dir, ledger, Durability::Batched).await
        }

        /// [`fixture_with`] on a given ledger (in `dir`) and durability.
        async fn fixture_on(
            test: &str,
            points: &str,
            on_store_error: OnStoreError,
            redis_opts: harness::Opts,
            dir: tempfile::TempDir,
            ledger: Box<dyn LedgerStore>,
            durability: Durability,
        ) -> Option<Fixture> {
            let redis = harness::RedisServer::start(test, redis_opts)?;
            let remote = crate::cluster::test_remote(redis.url(), "tb", LEASE, on_store_error).await;
            let (b, alerts) = Billing::open_cluster(
                ledger,
                durability,
                Duration::from_millis(5),
                STRICT_WAIT,
                Arc::new(Metrics::new(true)),
                crate::clock::SystemClock::shared(),
                &|_| false,
                Some(remote),
            )
            .unwrap();
            let s = snapshot(SHIPPED, &ents(&OD.replace("POINTS", points), "\"object_detection\""));
            let f = feature(&s, "object-detection");
            Some(Fixture { redis, _dir: dir, b, alerts, s: Arc::new(s), f, now: t("2026-03-01T00:00:00Z") })
        }

        impl Fixture {
            /// Admits one call as the proxy does on Redis: the bucket and the package hold in
            /// one round trip; the reservation names the payer.
            async fn admit(&self) -> Reservation {
                let tenant = &self.s.tenants[0];
                let fe = &self.s.catalog.features[self.f];
                let key = BucketKey {
                    tenant: tenant.label,
                    bucket: fe.label,
                    local: crate::intern::pair(tenant.intern, fe.intern),
                };
                let q = Quota { limit: 100_000, depth: 100_000 };
                match self.b.admit(&self.s, tenant, self.f, key, q, self.now).await.expect("admit") {
                    Admission::Allowed { paid: Some(Some(r)), .. } => r,
                    // The fallback admits alone; the pay phase reserves (as `decide_phases` does).
                    Admission::Allowed { paid: None, .. } => {
                        self.b.reserve(&self.s, tenant, self.f, self.now).await.expect("reserve").expect("a payer")
                    }
                    Admission::Allowed { paid, .. } => panic!("admitted without a payer: {:?}", paid.is_some()),
                    Admission::Throttled { .. } => panic!("throttled"),
                }
            }

            async fn settle(&self, r: Reservation) -> Settled {
                self.b.settle_call(&self.s, &self.s.tenants[0], self.f, r, self.now).await.expect("settle")
            }

            /// Lets every hold in flight outlive its lease, and the sweep give it back.
            async fn sweep_after_the_lease(&self, holds: u64) {
                tokio::time::sleep(LEASE * 2).await;
                let swept = self.b.remote().unwrap().redis.sweep_all().await.expect("sweep");
                assert_eq!(swept, holds, "holds given back by the sweep");
            }

            async fn consumed(&self) -> i64 {
                self.b.remote().unwrap().redis.package_consumed("acme", "od").await.expect("consumed")
            }

            async fn held(&self) -> i64 {
                self.b.remote().unwrap().redis.package_held("acme", "od").await.expect("held")
            }

            /// (units billed to `payer`, pay-as-you-go amount) of acme's feature in a scrape of
            /// the metrics (0 for a series not there yet).
            /// Kills Redis, then settles `r` the batched way ([`Billing::defer_call`]: the answer
            /// goes out, the settlement is spawned) and waits (5 s at most) for that settlement
            /// to end, its permit back.
            async fn defer_with_redis_down(&mut self, r: Reservation) -> Settled {
                self.redis.kill9();
                let Ok(settled) = self.b.defer_call(&self.s, "acme", self.f, r, self.now, None) else {
                    panic!("handed back instead of deferred")
                };
                let remote = self.b.remote().expect("cluster mode");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                while remote.deferred.available_permits() < crate::cluster::MAX_DEFERRED {
                    assert!(tokio::time::Instant::now() < deadline, "the deferred settlement did not end in 5 s");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                settled
            }

            fn counted(&self, payer: PayerKind) -> (f64, f64) {
                let fe = &self.s.catalog.features[self.f].id;
                let p = payer.as_str();
                let billed = format!(r#"turnstile_billed_units_total{{feature="{fe}",payer="{p}",tenant="acme"}}"#);
                let amount = format!(r#"turnstile_payg_amount_total{{currency="CNY",feature="{fe}",tenant="acme"}}"#);
                (scraped(&self.b, &self.s, &billed).unwrap_or(0.0), scraped(&self.b, &self.s, &amount).unwrap_or(0.0))
            }

            /// (single_package units, payg units, payg units of the call cell, unpaid) of March.
            async fn units(&self) -> (i64, i64, i64, i64) {
                let t = tenant_key(&self.s.tenants[0]);
                let month = self.b.remote().unwrap().stores.month(t, "2026-03").await.expect("month");
                let fe = &self.s.catalog.features[self.f].id;
                let u = month.iter().find(|u| &u.feature == fe).cloned().unwrap_or_default();
                (
                    u.units[PayerKind::SinglePackage as usize],
                    u.units[PayerKind::Payg as usize],
                    u.payg.get(CALL_CELL).copied().unwrap_or(0),
                    u.unpaid,
                )
            }
        }

        /// A call settled after its hold was swept (a long stream, a long upstream timeout) is
        /// still paid by its package: the points are debited once, and the unit says so.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_commit_after_the_lease_sweep_still_debits_the_package() {
            let Some(x) = fixture("a_commit_after_the_lease_sweep_still_debits_the_package", "1").await else {
                return;
            };
            let r = x.admit().await;
            assert_eq!(r.payer, PayerKind::SinglePackage);
            assert_eq!(x.held().await, FACTOR);
            x.sweep_after_the_lease(1).await;
            assert_eq!(x.held().await, 0);
            let settled = x.settle(r).await;
            assert_eq!(settled.payer, "single_package:od");
            assert_eq!((x.consumed().await, x.held().await), (FACTOR, 0), "(consumed, held) after the late commit");
            assert_eq!(x.units().await, (1, 0, 0, 0), "(package, payg, payg cell, unpaid) units");
        }

        /// The swept hold's points paid another call meanwhile: the late call cannot be paid by
        /// the package (it holds no second factor), so it falls to pay-as-you-go (SPEC §6.3),
        /// and the record says so: units == upstream successes, each paid by who really paid.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_late_commit_whose_points_paid_another_call_falls_to_payg() {
            let Some(x) = fixture("a_late_commit_whose_points_paid_another_call_falls_to_payg", "0.2").await else {
                return;
            };
            let late = x.admit().await;
            assert_eq!(late.payer, PayerKind::SinglePackage);
            x.sweep_after_the_lease(1).await;
            let other = x.admit().await;
            assert_eq!(other.payer, PayerKind::SinglePackage, "the swept points are free again");
            assert_eq!(x.settle(other).await.payer, "single_package:od");
            let settled = x.settle(late).await;
            assert_eq!(settled.payer, "payg", "the package holds nothing more");
            assert_eq!(x.consumed().await, FACTOR, "the package paid one call, never two");
            assert_eq!(x.units().await, (1, 1, 1, 0), "(package, payg, payg cell, unpaid) units");
        }

        /// SPEC §11.2 ("a package never pays more than it holds") with `on_store_error =
        /// "local"` and one replica: a call held its package's points on Redis and Redis went
        /// down before its settlement, which is journaled to commit that hold when Redis is
        /// back. The fallback must offer the package less that hold: it offered what Redis last
        /// said was consumed, so it spent the held points a second time, and the replay found
        /// less than it charged (logged "overspent"; the call served, counted under the
        /// package, never paid). Found by
        /// `concurrent_calls_across_a_hung_redis_on_the_fallback_are_charged_once`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_fallback_does_not_spend_a_hold_its_journaled_settlement_commits() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let test = "the_fallback_does_not_spend_a_journaled_hold";
            // 0.4 points: two calls of 0.2.
            let Some(mut x) = fixture_with(test, "0.4", OnStoreError::Local, aof).await else { return };
            let remote = x.b.remote().unwrap().clone();
            let first = x.admit().await;
            assert_eq!(first.payer, PayerKind::SinglePackage, "held on Redis");
            x.redis.kill9();
            assert_eq!(x.settle(first).await.payer, "single_package:od", "answered, its settlement journaled");
            assert!(remote.in_fallback());
            let second = x.admit().await;
            assert_eq!(second.payer, PayerKind::SinglePackage, "the package's second call, on the fallback");
            x.settle(second).await;
            let third = x.admit().await;
            assert_eq!(
                third.payer,
                PayerKind::Payg,
                "spent: the journaled settlement commits 0.2 of the 0.4, the fallback paid the other"
            );
            x.settle(third).await;
            x.redis.restart();
            let entries = "the settlement; the 2nd call's units and take, and its alert; the 3rd call's units";
            assert_eq!(remote.replay_all().await, 5, "{entries}");
            assert_eq!(x.consumed().await, 2 * FACTOR, "the package paid its two calls");
            assert_eq!(x.units().await, (2, 1, 1, 0), "(package, payg, payg cell, unpaid) in Redis");
        }

        /// SPEC §11.2 / §11.6, `on_store_error = "local"`: an admission whose answer Redis does
        /// not give within the timeout (Redis hung) goes on on the fallback under a new id, and
        /// the fallback pays it; but the admission script, queued, runs when Redis resumes and
        /// holds the package's points under the first id, for no call. That hold counted
        /// against the replay's take of the call's charge, which found nothing ("overspent"):
        /// served, counted under the package, never paid, and the package got the points back
        /// at the lease's end. Found by
        /// `concurrent_calls_across_a_hung_redis_on_the_fallback_are_charged_once`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_hold_an_admission_timed_out_on_is_given_back_before_the_replay_takes() {
            let test = "a_hold_an_admission_timed_out_on";
            // 0.4 points: two calls. The first on Redis (it loads the scripts: an EVALSHA of a
            // script Redis does not know yet would fail, queued, and hold nothing).
            let Some(x) = fixture_with(test, "0.4", OnStoreError::Local, harness::Opts::default()).await else {
                return;
            };
            let remote = x.b.remote().unwrap().clone();
            let first = x.admit().await;
            x.settle(first).await;
            let pid = x.redis.pid().expect("running").to_string();
            let signal = |sig: &str| {
                let ok = std::process::Command::new("kill").args([sig, &pid]).status().is_ok_and(|s| s.success());
                assert!(ok, "kill {sig} {pid}");
            };
            signal("-STOP");
            let r = x.admit().await;
            signal("-CONT");
            assert!(remote.in_fallback(), "the admission timed out");
            assert_eq!(r.payer, PayerKind::SinglePackage, "paid on the fallback");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while x.held().await != FACTOR {
                assert!(tokio::time::Instant::now() < deadline, "the queued admission did not hold");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_eq!(x.settle(r).await.payer, "single_package:od");
            assert!(remote.replay_all().await > 0);
            let (consumed, held) = (x.consumed().await, x.held().await);
            assert_eq!((consumed, held), (2 * FACTOR, 0), "(consumed, held): both calls paid, no hold left");
            assert_eq!(x.units().await, (2, 0, 0, 0), "(package, payg, payg cell, unpaid) in Redis");
        }

        /// SPEC §6 / §11.3, `on_store_error = "local"`: a call held its package's points on Redis,
        /// and Redis went down before its settlement, which is journaled (nothing is charged on
        /// the fallback for it) and replayed once Redis is back. That replay commits the hold,
        /// leaves the package low and marks its alert in Redis: the alert fires then — log,
        /// metric, webhook — exactly once (a second probe, or a replay answered from the
        /// settlement's marker, fires nothing more).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn an_alert_marked_by_a_replayed_settlement_fires_once() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let Some(mut x) =
                fixture_with("an_alert_marked_by_a_replayed_settlement", "1", OnStoreError::Local, aof).await
            else {
                return;
            };
            // 0.2 a call of 1 point: three calls leave 0.4 (40%), not low.
            for _ in 0..3 {
                let r = x.admit().await;
                x.settle(r).await;
            }
            assert_eq!(x.consumed().await, 3 * FACTOR);
            // The 4th holds its 0.2 on Redis; Redis dies before the settlement.
            let r = x.admit().await;
            assert_eq!(r.payer, PayerKind::SinglePackage);
            x.redis.kill9();
            assert_eq!(x.settle(r).await.payer, "single_package:od", "answered on the fallback");
            let remote = x.b.remote().unwrap().clone();
            assert_eq!(remote.journal_len(), 1, "the settlement waits for Redis");
            assert!(remote.in_fallback());
            assert_eq!(alert_series(&x.b), Vec::<String>::new(), "nothing settled yet: no alert");
            x.redis.restart();
            assert_eq!(remote.replay_all().await, 1, "the settlement replayed");
            assert_eq!(remote.probe().await, 0, "once");
            assert_eq!(x.consumed().await, 4 * FACTOR, "0.2 left (20%): low");
            assert!(remote.redis.alerted("acme", "od").await.expect("alerted"), "marked in Redis");
            let one = fired_once("od");
            assert_eq!(alert_series(&x.b), one, "the alert the replay marked fired, once");
            let sent = x.alerts.try_recv().expect("the webhook got the alert");
            assert_eq!(
                (sent.tenant.as_str(), sent.package.as_str(), sent.points.0, sent.remaining.0),
                ("acme", "od", Decimal::ONE, Decimal::new(2, 1)),
                "{sent:?}"
            );
            assert!(x.alerts.try_recv().is_err(), "one webhook call");
            // The 5th call (0 left) on Redis does not fire it again.
            let r = x.admit().await;
            x.settle(r).await;
            assert_eq!(alert_series(&x.b), one, "fired once");
            assert!(x.alerts.try_recv().is_err(), "one webhook call");
        }

        /// SPEC §6 on the fallback (§11.6): a package there offers only what Redis last said it
        /// had left, but its low-balance ratio is of its whole points, and so is the alert: 10
        /// points, 6 used on Redis, the alert fires on the fallback when 2 are left, not when
        /// 0.8 are (a fifth of the 4 the fallback could spend).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn the_fallback_judges_a_low_balance_against_the_whole_package() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let test = "the_fallback_judges_a_low_balance";
            let Some(mut x) = fixture_with(test, "10", OnStoreError::Local, aof).await else { return };
            for _ in 0..30 {
                let r = x.admit().await;
                x.settle(r).await;
            }
            assert_eq!(x.consumed().await, 30 * FACTOR, "6 of 10 points used on Redis");
            x.redis.kill9();
            // 0.2 a call: 9 calls leave 2.2 (22 %), the 10th 2.0 (20 %).
            for _ in 0..9 {
                let r = x.admit().await;
                x.settle(r).await;
            }
            assert!(x.b.remote().unwrap().in_fallback());
            assert_eq!(alert_series(&x.b), Vec::<String>::new(), "2.2 of 10 left: not low yet");
            let r = x.admit().await;
            x.settle(r).await;
            let one = fired_once("od");
            assert_eq!(alert_series(&x.b), one, "2 of 10 left: low");
            let sent = x.alerts.try_recv().expect("the webhook got the alert");
            assert_eq!((sent.points.0, sent.remaining.0), (Decimal::from(10), Decimal::from(2)), "{sent:?}");
        }

        /// A strict replica on a flaky local ledger: one durable call on Redis (0.2 of 10
        /// points), then Redis killed, the ledger failing, and a second call admitted and settled
        /// on the fallback, not yet durable.
        async fn strict_on_the_fallback(test: &str) -> Option<(Fixture, Arc<AtomicBool>, Settled)> {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let dir = tempfile::tempdir().unwrap();
            let fail = Arc::new(AtomicBool::new(false));
            let ledger = Box::new(FlakyStore { inner: RedbLedger::open(dir.path()).unwrap(), fail: fail.clone() });
            let mut x = fixture_on(test, "10", OnStoreError::Local, aof, dir, ledger, Durability::Strict).await?;
            let r = x.admit().await;
            assert!(x.b.durable(x.settle(r).await).await.is_ok());
            assert_eq!(x.consumed().await, FACTOR, "one call on Redis");
            x.redis.kill9();
            fail.store(true, Ordering::SeqCst);
            let r = x.admit().await;
            assert!(x.b.remote().unwrap().in_fallback());
            let settled = x.settle(r).await;
            Some((x, fail, settled))
        }

        /// Redis back, the journal replayed: (points consumed, single-package units) there.
        async fn replayed(x: &mut Fixture) -> (i64, i64) {
            let remote = x.b.remote().unwrap().clone();
            x.redis.restart();
            remote.replay_all().await;
            (x.consumed().await, x.units().await.0)
        }

        /// SPEC §11.6 on the fallback, strict: a settlement whose wait for durability is dropped
        /// (the client reset its stream, a gRPC deadline) is neither reverted nor lost locally:
        /// the local ledger commits it. Redis must get it too when the journal is replayed.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_strict_charge_whose_wait_is_dropped_on_the_fallback_is_still_replayed_to_redis() {
            let test = "a_strict_charge_whose_wait_is_dropped";
            let Some((mut x, fail, settled)) = strict_on_the_fallback(test).await else { return };
            // The ledger is slow, and the caller stops waiting (dropped).
            let waited = tokio::time::timeout(Duration::from_millis(10), x.b.durable(settled)).await;
            assert!(waited.is_err(), "the wait was dropped before the charge was durable");
            // The ledger works again: the charge, never reverted, reaches the disk.
            fail.store(false, Ordering::SeqCst);
            assert!(x.b.flush());
            let st = x.b.package(&x.s.tenants[0], &x.s.tenants[0].packages[0]);
            assert_eq!(st.consumed(), Decimal::new(2, 1), "charged in the local ledger (0.2), never reverted");
            assert_eq!(replayed(&mut x).await, (2 * FACTOR, 2), "Redis has both calls the local ledger charged");
        }

        /// SPEC §7 on the fallback (§11.6): a strict charge the local ledger could not make
        /// durable in time is reverted and the client told it was not charged, so it must not
        /// reach Redis with the journal's replay either. The next call, durable, does.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_strict_charge_reverted_on_the_fallback_is_not_replayed_to_redis() {
            let test = "a_strict_charge_reverted_on_the_fallback";
            let Some((mut x, fail, settled)) = strict_on_the_fallback(test).await else { return };
            // With the ledger failing, the charge is reverted, not charged.
            assert!(x.b.durable(settled).await.is_err(), "not durable in time: reverted");
            // The ledger works again: the next call is charged on the fallback.
            fail.store(false, Ordering::SeqCst);
            assert!(x.b.flush());
            let r = x.admit().await;
            assert!(x.b.durable(x.settle(r).await).await.is_ok());
            assert_eq!(
                replayed(&mut x).await,
                (2 * FACTOR, 2),
                "Redis has the two charged calls, not the reverted one"
            );
        }

        /// SPEC §7 `strict` and §11.5 on the fallback: a call admitted on Redis whose settlement
        /// then fails is answered 2xx with the settlement journaled, to be replayed; nothing is
        /// charged for it in the local ledger, so that journal line is its only record and must
        /// be on disk (fdatasync) before the answer, like every other strict charge.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_strict_settlement_redis_did_not_answer_is_on_disk_in_the_journal_before_its_2xx() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let test = "a_strict_settlement_redis_did_not_answer";
            let dir = tempfile::tempdir().unwrap();
            let (folder, ledger) = (dir.path().to_path_buf(), Box::new(RedbLedger::open(dir.path()).unwrap()));
            let Some(mut x) = fixture_on(test, "10", OnStoreError::Local, aof, dir, ledger, Durability::Strict).await
            else {
                return;
            };
            let remote = x.b.remote().unwrap().clone();
            assert_eq!(remote.open_journal(&folder), Ok(0));
            let r = x.admit().await;
            x.redis.kill9();
            let settled = x.settle(r).await;
            assert_eq!(x.b.durable(settled).await.ok(), Some(HeaderValue::from_static("single_package:od")));
            assert_eq!(remote.journal_len(), 1, "the settlement waits for Redis in the journal");
            assert!(!remote.journal_unsynced(), "its line was fdatasync'ed before the 2xx");
            // With what its replay counts it with, should this replica stop first.
            let (_, found, _) = crate::cluster::journal::JournalFile::open(&folder).expect("the journal reads back");
            let uncounted = crate::cluster::Uncounted {
                currency: "CNY".into(),
                payg_tiers: x.s.catalog.features[x.f].payg_tiers.clone(),
            };
            assert!(
                matches!(
                    &found[..],
                    [crate::cluster::journal::Entry {
                        replay: crate::cluster::Replay::Settle { count: Some(c), .. },
                        sent: Some(_),
                        ..
                    }] if **c == uncounted
                ),
                "{found:?}"
            );
        }

        /// [`fixture_with`] whose calls are license-plate recognition: pay-as-you-go only, at
        /// 0.15 a call up to the month's 10,000th, then 0.10.
        async fn payg_fixture(test: &str, redis_opts: harness::Opts) -> Option<Fixture> {
            payg_fixture_with(test, OnStoreError::Local, redis_opts).await
        }

        /// [`payg_fixture`] with a failure policy.
        async fn payg_fixture_with(
            test: &str,
            on_store_error: OnStoreError,
            redis_opts: harness::Opts,
        ) -> Option<Fixture> {
            let mut x = fixture_with(test, "1", on_store_error, redis_opts).await?;
            let services = "\"object_detection\", \"text_recognition\"";
            x.s = Arc::new(snapshot(SHIPPED, &ents(&OD.replace("POINTS", "1"), services)));
            x.f = feature(&x.s, "license-plate-recognition");
            Some(x)
        }

        /// SPEC §10 / §11.6 (`local`): a pay-as-you-go call whose settlement Redis did not answer
        /// (killed) is journaled and answered; it is counted in `turnstile_billed_units_total`
        /// and `turnstile_payg_amount_total` once its replay succeeds, at the price of the
        /// month's tier Redis reports then (other replicas' 9,999 calls make it the 10,001st:
        /// 0.10), not when it is journaled, and once though the first replay attempt fails.
        /// The metrics used to miss it: the usage report showed the call, the metrics did not.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_replayed_payg_call_is_counted_in_the_metrics_once_at_its_months_tier() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let Some(mut x) = payg_fixture("a_replayed_payg_call_is_counted", aof).await else { return };
            let remote = x.b.remote().unwrap().clone();
            let fe = &x.s.catalog.features[x.f];
            let key = BucketKey { tenant: "acme", bucket: fe.label, local: 0 };
            let others = UsageTo::Payer(PayerKind::Payg);
            remote.stores.add_usage(key, "2026-03", others, 9_999, CALL_CELL, RequestId(u128::MAX)).await.unwrap();
            let r = x.admit().await;
            assert_eq!(x.settle(r).await.payer, "payg");
            assert_eq!(x.counted(PayerKind::Payg), (1.0, 0.15), "the 10,000th call, settled on Redis");
            let r = x.admit().await;
            assert_eq!(r.payer, PayerKind::Payg);
            x.redis.kill9();
            assert_eq!(x.settle(r).await.payer, "payg", "answered on the fallback");
            assert_eq!(remote.journal_len(), 1, "the settlement waits for Redis");
            assert_eq!(x.counted(PayerKind::Payg), (1.0, 0.15), "not settled yet: not counted");
            x.redis.restart();
            // Redis answers, but refuses the settlement script (an ACL): the replay fails.
            assert_eq!(x.redis.cli(&["ACL", "SETUSER", "default", "-evalsha", "-eval"]), "OK");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while !x.redis.cli(&["ACL", "LOG"]).contains("evalsha") {
                assert!(tokio::time::Instant::now() < deadline, "no replay attempted in 5 s");
                assert_eq!(remote.probe().await, 0);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(remote.journal_len(), 1, "kept, to be replayed again");
            assert_eq!(x.counted(PayerKind::Payg), (1.0, 0.15), "a failed replay counts nothing");
            assert_eq!(x.redis.cli(&["ACL", "SETUSER", "default", "+evalsha", "+eval"]), "OK");
            assert_eq!(remote.replay_all().await, 1, "the settlement replayed");
            assert_eq!(remote.probe().await, 0, "once");
            assert_eq!(x.units().await, (0, 10_001, 10_001, 0), "(package, payg, payg cell, unpaid) in Redis");
            let (units, amount) = x.counted(PayerKind::Payg);
            assert_eq!(units, 2.0, "this replica's two calls, as the report counts them beyond the others'");
            assert!((amount - 0.25).abs() < 1e-9, "0.15 for the 10,000th call, 0.10 for the 10,001st: {amount}");
        }

        /// SPEC §10 / §11.6 (`local`): a package call whose settlement Redis did not answer
        /// (killed) is counted under its package once the replay commits it, once (a second
        /// probe counts nothing more): the metrics show what the usage report shows.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_replayed_package_call_is_counted_in_the_metrics_once() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let Some(mut x) = fixture_with("a_replayed_package_call_is_counted", "10", OnStoreError::Local, aof).await
            else {
                return;
            };
            let remote = x.b.remote().unwrap().clone();
            let r = x.admit().await;
            x.settle(r).await;
            let r = x.admit().await;
            assert_eq!(r.payer, PayerKind::SinglePackage);
            x.redis.kill9();
            assert_eq!(x.settle(r).await.payer, "single_package:od", "answered on the fallback");
            assert_eq!(remote.journal_len(), 1);
            assert_eq!(x.counted(PayerKind::SinglePackage), (1.0, 0.0), "not settled yet: not counted");
            x.redis.restart();
            assert_eq!(remote.replay_all().await, 1);
            assert_eq!(remote.probe().await, 0, "once");
            assert_eq!(x.units().await, (2, 0, 0, 0), "(package, payg, payg cell, unpaid) in Redis");
            assert_eq!(x.consumed().await, 2 * FACTOR);
            assert_eq!(x.counted(PayerKind::SinglePackage), (2.0, 0.0), "as the report counts them");
            assert_eq!(x.counted(PayerKind::Payg), (0.0, 0.0));
        }

        /// A settlement that did reach Redis though its answer never came back (Redis hung past
        /// the store timeout: SIGSTOP, then SIGCONT) is journaled; its replay is answered from
        /// the settlement's marker (nothing applied twice) and counts the call, once.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_settlement_redis_applied_but_did_not_answer_is_counted_once_at_its_replay() {
            let Some(x) = payg_fixture("a_settlement_redis_applied_but_did_not_answer", harness::Opts::default()).await
            else {
                return;
            };
            let remote = x.b.remote().unwrap().clone();
            let signal = |sig: &str| {
                let pid = x.redis.pid().expect("running").to_string();
                let status = std::process::Command::new("kill").args([sig, &pid]).status().expect("kill");
                assert!(status.success(), "kill {sig}");
            };
            let r = x.admit().await;
            signal("-STOP");
            let settled = x.settle(r).await;
            signal("-CONT");
            assert_eq!(settled.payer, "payg");
            assert_eq!(remote.journal_len(), 1, "its answer did not come within the store timeout");
            assert_eq!(x.counted(PayerKind::Payg), (0.0, 0.0));
            assert_eq!(remote.replay_all().await, 1);
            assert_eq!(remote.probe().await, 0, "once");
            assert_eq!(x.units().await, (0, 1, 1, 0), "applied once in Redis");
            assert_eq!(x.counted(PayerKind::Payg), (1.0, 0.15), "counted once");
        }

        /// SPEC §7 / §11.5 / §11.6, `deny`, batched: a call admitted on Redis is answered, its
        /// settlement spawned (deferred), and Redis dies before it lands. The 2xx is out, so the
        /// charge must stand: it is journaled like `local`'s (replayed once Redis answers,
        /// counted then, once), while the replica stays off the fallback (its admissions answer
        /// 503 meanwhile). A settlement awaited on the request keeps `deny`'s answer: an error
        /// (503 `store_unavailable`, the answer dropped), nothing charged. It used to drop the
        /// deferred charge too ("batched settlement failed: this call is not charged").
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_deferred_settlement_redis_failed_is_journaled_and_charged_once_under_deny() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let test = "a_deferred_settlement_redis_failed_under_deny";
            let Some(mut x) = payg_fixture_with(test, OnStoreError::Deny, aof).await else { return };
            let remote = x.b.remote().unwrap().clone();
            assert!(x.b.may_defer(), "batched on Redis defers");
            let (deferred, on_request) = (x.admit().await, x.admit().await);
            assert_eq!(deferred.payer, PayerKind::Payg);
            let settled = x.defer_with_redis_down(deferred).await;
            assert_eq!(settled.payer, "payg", "answered with the payer chosen at admission");
            let tenant = &x.s.tenants[0];
            assert_eq!(remote.journal_len(), 1, "the deferred charge waits for Redis in the journal");
            assert!(!remote.in_fallback(), "deny stays off the fallback");
            let e = x.b.settle_call(&x.s, tenant, x.f, on_request, x.now).await.err();
            assert!(
                matches!(e, Some(StoreError::Unavailable { .. } | StoreError::Timeout { .. })),
                "on the request: 503, nothing charged: {e:?}"
            );
            assert_eq!(remote.journal_len(), 1, "the refused one is not journaled");
            let fe = &x.s.catalog.features[x.f];
            let key = BucketKey { tenant: "acme", bucket: fe.label, local: 0 };
            let q = Quota { limit: 100_000, depth: 100_000 };
            assert!(x.b.admit(&x.s, tenant, x.f, key, q, x.now).await.is_err(), "admissions answer 503");
            assert_eq!(x.counted(PayerKind::Payg), (0.0, 0.0), "not settled yet: not counted");
            x.redis.restart();
            assert_eq!(remote.replay_all().await, 1, "the deferred settlement replayed");
            assert_eq!(remote.probe().await, 0, "once");
            assert_eq!(x.units().await, (0, 1, 1, 0), "(package, payg, payg cell, unpaid) in Redis: once");
            assert_eq!(x.counted(PayerKind::Payg), (1.0, 0.15), "counted once");
        }

        /// The same for a shadow-mode call nothing could pay (SPEC §5.5): its deferred record
        /// as unpaid, which Redis fails under `deny`, is journaled and reaches Redis once it
        /// answers (the usage report's `unpaid`), counted once in `turnstile_unpaid_units_total`.
        /// It used to be dropped ("batched settlement failed: this call is not charged").
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_deferred_unpaid_record_redis_failed_is_journaled_and_kept_once_under_deny() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let test = "a_deferred_unpaid_record_redis_failed_under_deny";
            let Some(mut x) = payg_fixture_with(test, OnStoreError::Deny, aof).await else { return };
            let remote = x.b.remote().unwrap().clone();
            let r = x.b.unpaid();
            x.defer_with_redis_down(r).await;
            assert_eq!(remote.journal_len(), 1, "the unpaid record waits for Redis in the journal");
            assert!(!remote.in_fallback(), "deny stays off the fallback");
            let fe = &x.s.catalog.features[x.f].id;
            let series = format!(r#"turnstile_unpaid_units_total{{feature="{fe}",tenant="acme"}}"#);
            assert_eq!(scraped(&x.b, &x.s, &series), Some(1.0), "counted when made, as a fallback's record");
            x.redis.restart();
            assert_eq!(remote.replay_all().await, 1, "replayed");
            assert_eq!(remote.probe().await, 0, "once");
            assert_eq!(x.units().await, (0, 0, 0, 1), "(package, payg, payg cell, unpaid) in Redis: once");
            assert_eq!(scraped(&x.b, &x.s, &series), Some(1.0), "and counted once");
        }

        /// An entry Redis rejects is set aside, not replayed: its call is not counted.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_settlement_set_aside_as_rejected_is_not_counted() {
            let aof = harness::Opts { aof_always: true, cluster: false };
            let Some(mut x) = payg_fixture("a_settlement_set_aside_as_rejected", aof).await else { return };
            let remote = x.b.remote().unwrap().clone();
            let r = x.admit().await;
            x.redis.kill9();
            assert_eq!(x.settle(r).await.payer, "payg");
            x.redis.restart();
            // The month's key is written with another type: the settlement's HINCRBY answers
            // WRONGTYPE.
            let month = format!("{}m:2026-03:license-plate-recognition", remote.redis.tenant_prefix("acme"));
            assert_eq!(x.redis.cli(&["SET", &month, "x"]), "OK");
            assert_eq!(remote.replay_all().await, 0, "set aside, not replayed");
            assert_eq!(remote.journal_len(), 0);
            assert_eq!(x.counted(PayerKind::Payg), (0.0, 0.0), "not counted");
        }

        /// Late commits race new calls on one package: it never pays more than it holds,
        /// every package unit is one factor debited, and every settled call is one unit.
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn late_commits_racing_new_calls_never_overdraw_and_count_each_call_once() {
            let Some(x) = fixture("late_commits_racing_new_calls_never_overdraw", "2").await else { return };
            let x = Arc::new(x);
            let (late_n, new_n) = (8usize, 16usize);
            let mut late = Vec::new();
            for _ in 0..late_n {
                late.push(x.admit().await);
            }
            x.sweep_after_the_lease(late_n as u64).await;
            let mut tasks = Vec::new();
            for r in late {
                let x = x.clone();
                tasks.push(tokio::spawn(async move { x.settle(r).await.payer }));
            }
            for _ in 0..new_n {
                let x = x.clone();
                tasks.push(tokio::spawn(async move {
                    let r = x.admit().await;
                    x.settle(r).await.payer
                }));
            }
            let mut by_header = (0i64, 0i64);
            for task in tasks {
                match task.await.unwrap().to_str().unwrap() {
                    "single_package:od" => by_header.0 += 1,
                    "payg" => by_header.1 += 1,
                    other => panic!("payer {other}"),
                }
            }
            let (package, payg, cell, unpaid) = x.units().await;
            let consumed = x.consumed().await;
            assert!(consumed <= 10 * FACTOR, "the package paid {consumed} µpoints, it holds {}", 10 * FACTOR);
            assert_eq!(consumed, package * FACTOR, "every package unit is one factor debited");
            assert_eq!(package + payg, (late_n + new_n) as i64, "one unit per upstream success");
            assert_eq!((payg, unpaid), (cell, 0));
            assert_eq!(by_header, (package, payg), "each call's payer header names who paid it");
            assert_eq!(x.held().await, 0);
        }
    }
}
