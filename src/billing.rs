//! Who pays (SPEC §6): payer selection and reservation at admission, settlement on a 2xx,
//! release otherwise; pay-as-you-go tiers per tenant, feature and month; low-balance alerts;
//! and the group-committing writer that keeps the [`LedgerStore`] up to date.
//!
//! Live state (package consumption, monthly units) is in memory, one small mutex per package and
//! per (tenant, feature, month): only requests of the same tenant ever wait on one. A change marks
//! its record dirty; the writer thread commits all dirty records in one transaction every
//! `flush_interval` (batched) or as soon as any are dirty (strict, where the request waits for it,
//! at most `strict_timeout`: past it the settlement's deltas are reverted and the call is refused).
//! A failed commit keeps everything in memory and is retried (SPEC §7).

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use http::HeaderValue;
use prometheus::Gauge;
use rust_decimal::Decimal;
use rustc_hash::FxBuildHasher;
use tokio::sync::watch;

use crate::catalog::{Feature, Method, Unit};
use crate::config::entitlements::{Package, PackageTarget, Tenant};
use crate::config::gateway::Durability;
use crate::config::Dec;
use crate::ledger::{self, LedgerError, LedgerStore, MonthRecord, PackageRecord, Record, UNPRICED};
use crate::metrics::Metrics;
use crate::pricing;
use crate::snapshot::Snapshot;

/// The payers of SPEC §6, indexed like [`ledger::PAYERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum PayerKind {
    PrepaidQps = 0,
    SinglePackage = 1,
    GeneralPackage = 2,
    Payg = 3,
    FreeDefault = 4,
}

impl PayerKind {
    pub fn as_str(self) -> &'static str {
        ledger::PAYERS[self as usize]
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct PkgInner {
    consumed: Decimal,
    reserved: Decimal,
    alerted: bool,
    dirty: bool,
}

/// Live state of one package: what was consumed (durable) and what is reserved by calls in flight.
pub struct PackageState {
    tenant: &'static str,
    id: &'static str,
    key: u64,
    inner: Mutex<PkgInner>,
    gauge: OnceLock<Gauge>,
    header_single: OnceLock<HeaderValue>,
    header_general: OnceLock<HeaderValue>,
}

impl PackageState {
    fn header(&self, kind: PayerKind) -> HeaderValue {
        let (cell, prefix) = match kind {
            PayerKind::SinglePackage => (&self.header_single, "single_package"),
            _ => (&self.header_general, "general_package"),
        };
        cell.get_or_init(|| {
            HeaderValue::try_from(format!("{prefix}:{}", self.id)).unwrap_or(HeaderValue::from_static("package"))
        })
        .clone()
    }

    pub fn consumed(&self) -> Decimal {
        lock(&self.inner).consumed
    }

    pub fn alerted(&self) -> bool {
        lock(&self.inner).alerted
    }
}

struct MonthInner {
    units: [Decimal; 5],
    payg: BTreeMap<String, Decimal>,
    /// Video minutes nothing could pay for (SPEC §6: never silently free).
    unpaid: Decimal,
    dirty: bool,
}

/// Units of one (tenant, feature, month), by payer, and pay-as-you-go units by price cell.
pub struct MonthState {
    tenant: &'static str,
    feature: &'static str,
    month: String,
    inner: Mutex<MonthInner>,
}

struct ImageInner {
    count: u64,
    /// Adds in flight: each holds a slot until the upstream answers.
    reserved: u64,
    dirty: bool,
}

/// The image count of a tenant's Image Search instance.
pub struct ImageState {
    tenant: &'static str,
    key: u32,
    inner: Mutex<ImageInner>,
    gauge: OnceLock<prometheus::IntGauge>,
}

impl ImageState {
    pub fn count(&self) -> u64 {
        lock(&self.inner).count
    }
}

/// A capacity slot held by an image-search add in flight; given back when dropped unsettled.
pub struct ImageSlot(Option<Arc<ImageState>>);

impl Drop for ImageSlot {
    fn drop(&mut self) {
        if let Some(st) = self.0.take() {
            let mut g = lock(&st.inner);
            g.reserved = g.reserved.saturating_sub(1);
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum DirtyKey {
    Package(u64),
    Month(u64, u32),
    Image(u32),
}

enum Msg {
    Dirty(DirtyKey),
    /// Commit everything now and answer when it is on disk.
    Flush(mpsc::Sender<()>),
    /// Commit what is dirty once more, then stop the writer ([`Billing::close`]).
    Stop,
}

/// A low-balance alert, as logged and POSTed to the webhook.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Alert {
    pub tenant: String,
    pub package: String,
    pub points: Dec,
    pub remaining: Dec,
    pub ratio: Dec,
    pub at: String,
}

/// A payer chosen at admission. A reserved package share is given back when this is dropped
/// without [`Billing::settle_call`] (upstream error, non-2xx, client gone).
pub struct Reservation {
    pub payer: PayerKind,
    /// The package and the share reserved from it; for a deferred video call the share is zero
    /// (minutes are known only from the response) and the package only names the payer.
    package: Option<(Arc<PackageState>, Decimal)>,
    /// Video features: the payer is decided from the usage the upstream reports.
    pub deferred: bool,
}

impl Reservation {
    pub fn header(&self) -> HeaderValue {
        match (&self.package, self.payer) {
            (Some((p, _)), kind) => p.header(kind),
            (None, kind) => HeaderValue::from_static(kind.as_str()),
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some((state, factor)) = self.package.take() {
            if !factor.is_zero() {
                lock(&state.inner).reserved -= factor;
            }
        }
    }
}

/// What a settlement did: who paid first (for `x-turnstile-payer`), the commit sequence to
/// wait for in strict mode, and (strict mode only) the charge itself, as deltas, so that
/// [`Billing::durable`] can revert it exactly when it cannot be made durable in time.
pub struct Settled {
    pub payer: HeaderValue,
    pub seq: u64,
    pending: Option<Box<Charge>>,
}

/// The deltas one settlement applied to memory.
struct Charge {
    pair: u64,
    tenant: &'static str,
    feature: &'static str,
    month: Arc<MonthState>,
    month_key: (u64, u32),
    units: [Decimal; 5],
    /// Pay-as-you-go units by price cell key, and their exact amount when priced.
    payg: Option<(String, Decimal)>,
    payg_amount: Option<Decimal>,
    unpaid: Decimal,
    /// (package, points taken, the package's points) for each package that paid.
    packages: Vec<(Arc<PackageState>, Decimal, Decimal)>,
    currency: String,
}

/// A strict-mode charge that was not on disk within `[ledger].strict_timeout_ms`; it was
/// reverted, so the call is not charged.
#[derive(Debug, thiserror::Error)]
#[error("the charge was not durable within {timeout_ms} ms; it was reverted")]
pub struct NotDurable {
    pub timeout_ms: u64,
}

/// [`Billing::close`] could not commit everything: `records` ledger records stay unwritten.
#[derive(Debug, thiserror::Error)]
#[error("{records} ledger record(s) could not be flushed to {ledger}")]
pub struct Unflushed {
    pub records: usize,
    pub ledger: String,
}

/// The usage of one (tenant, feature, month), as the usage report (SPEC §9) shows it.
#[derive(Debug, Clone)]
pub struct MonthUsage {
    pub feature: &'static str,
    /// Units per payer, indexed like [`ledger::PAYERS`].
    pub units: [Decimal; 5],
    /// Pay-as-you-go units per price cell.
    pub payg: BTreeMap<String, Decimal>,
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

pub struct Billing {
    packages: DashMap<u64, Arc<PackageState>, FxBuildHasher>,
    months: DashMap<(u64, u32), Arc<MonthState>, FxBuildHasher>,
    images: DashMap<u32, Arc<ImageState>, FxBuildHasher>,
    /// `std::sync::mpsc::Sender` is `Sync`: settlements send without any shared lock.
    tx: mpsc::Sender<Msg>,
    seq: AtomicU64,
    durable: watch::Sender<u64>,
    strict: bool,
    strict_timeout: Duration,
    /// False while ledger commits fail (SPEC §7: `/readyz` answers 503 meanwhile).
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
    alerts: tokio::sync::mpsc::UnboundedSender<Alert>,
    ledger_name: String,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    closed: AtomicBool,
}

/// The entry for `key`, created by `make` on first use; the common case takes a read lock only.
fn get_or_insert<K: std::hash::Hash + Eq, V>(
    map: &DashMap<K, Arc<V>, FxBuildHasher>,
    key: K,
    make: impl FnOnce() -> V,
) -> Arc<V> {
    if let Some(v) = map.get(&key) {
        return v.clone();
    }
    map.entry(key).or_insert_with(|| Arc::new(make())).clone()
}

fn month_index(unix_nanos: i64, offset: chrono::FixedOffset) -> u32 {
    use chrono::{Datelike, TimeZone};
    let t = offset.timestamp_nanos(unix_nanos);
    (t.year().max(0) as u32) * 12 + t.month0()
}

fn month_index_of(s: &str) -> Option<u32> {
    let (y, m) = s.split_once('-')?;
    let (y, m): (u32, u32) = (y.parse().ok()?, m.parse().ok()?);
    (1..=12).contains(&m).then_some(y * 12 + m - 1)
}

fn to_f64(d: Decimal) -> f64 {
    f64::from_str(&d.to_string()).unwrap_or(0.0)
}

impl Billing {
    /// Loads the ledger and starts the writer thread. Returns the alert receiver for the
    /// webhook sender.
    pub fn open(
        store: Box<dyn LedgerStore>,
        durability: Durability,
        flush_interval: Duration,
        strict_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Billing>, tokio::sync::mpsc::UnboundedReceiver<Alert>), LedgerError> {
        let records = store.load()?;
        let (tx, rx) = mpsc::channel();
        let (alerts, alert_rx) = tokio::sync::mpsc::unbounded_channel();
        let billing = Arc::new(Billing {
            packages: DashMap::with_hasher(FxBuildHasher),
            months: DashMap::with_hasher(FxBuildHasher),
            images: DashMap::with_hasher(FxBuildHasher),
            tx,
            seq: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            strict: durability == Durability::Strict,
            strict_timeout,
            healthy: AtomicBool::new(true),
            metrics,
            alerts,
            ledger_name: store.describe(),
            writer: Mutex::new(None),
            closed: AtomicBool::new(false),
        });
        for r in records {
            match r {
                Record::Package(p) => {
                    let (t, tl) = crate::intern::tenant(&p.tenant);
                    let (id, idl) = crate::intern::package(&p.id);
                    let st = billing.package_state(crate::intern::pair(t, id), tl, idl);
                    let mut g = lock(&st.inner);
                    g.consumed = p.consumed.0;
                    g.alerted = p.alerted;
                }
                Record::Month(m) => {
                    let Some(mi) = month_index_of(&m.month) else { continue };
                    let (t, tl) = crate::intern::tenant(&m.tenant);
                    let (f, fl) = crate::intern::feature(&m.feature);
                    let st = billing.month_state(crate::intern::pair(t, f), mi, tl, fl, || m.month.clone());
                    let mut g = lock(&st.inner);
                    for (i, u) in m.units.iter().enumerate() {
                        g.units[i] = u.0;
                    }
                    g.payg = m.payg.into_iter().map(|(k, v)| (k, v.0)).collect();
                    g.unpaid = m.unpaid.0;
                }
                Record::ImageCount(i) => {
                    let (t, tl) = crate::intern::tenant(&i.tenant);
                    lock(&billing.image_state(t, tl).inner).count = i.count;
                }
            }
        }
        let weak = Arc::downgrade(&billing);
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer(weak, store, rx, flush_interval))
            .map_err(|e| LedgerError::Write { path: "ledger-writer".into(), reason: e.to_string() })?;
        *lock(&billing.writer) = Some(handle);
        Ok((billing, alert_rx))
    }

    fn send(&self, msg: Msg) {
        // Fails only after close(): the change then stays in memory (and counts as unflushed).
        let _ = self.tx.send(msg);
    }

    /// False while ledger commits fail; true again once one succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    fn package_state(&self, key: u64, tenant: &'static str, id: &'static str) -> Arc<PackageState> {
        get_or_insert(&self.packages, key, || PackageState {
            tenant,
            id,
            key,
            inner: Mutex::new(PkgInner {
                consumed: Decimal::ZERO,
                reserved: Decimal::ZERO,
                alerted: false,
                dirty: false,
            }),
            gauge: OnceLock::new(),
            header_single: OnceLock::new(),
            header_general: OnceLock::new(),
        })
    }

    /// The state of (pair, month); `name` (`YYYY-MM`) is only formatted when it is created.
    fn month_state(
        &self,
        pair: u64,
        month: u32,
        tenant: &'static str,
        feature: &'static str,
        name: impl FnOnce() -> String,
    ) -> Arc<MonthState> {
        get_or_insert(&self.months, (pair, month), || MonthState {
            tenant,
            feature,
            month: name(),
            inner: Mutex::new(MonthInner {
                units: [Decimal::ZERO; 5],
                payg: BTreeMap::new(),
                unpaid: Decimal::ZERO,
                dirty: false,
            }),
        })
    }

    fn image_state(&self, key: u32, tenant: &'static str) -> Arc<ImageState> {
        get_or_insert(&self.images, key, || ImageState {
            tenant,
            key,
            inner: Mutex::new(ImageInner { count: 0, reserved: 0, dirty: false }),
            gauge: OnceLock::new(),
        })
    }

    /// The image count of a tenant's instance (as kept in the ledger).
    pub fn images(&self, tenant: &Tenant) -> Arc<ImageState> {
        self.image_state(tenant.intern, tenant.label)
    }

    /// Reserves one image slot for an add; `None` when the instance is at capacity (409).
    pub fn reserve_image_add(&self, tenant: &Tenant, capacity: u64) -> Option<ImageSlot> {
        let st = self.images(tenant);
        let mut g = lock(&st.inner);
        if g.count + g.reserved >= capacity {
            return None;
        }
        g.reserved += 1;
        drop(g);
        Some(ImageSlot(Some(st)))
    }

    /// Updates the image count after a 2xx: +1 for an add (its slot becomes an image), -1 for a
    /// delete, and `reported` (the upstream's `x-usage-image-count`), when given, wins.
    pub fn settle_images(
        &self,
        tenant: &Tenant,
        op: crate::config::gateway::ImageOp,
        slot: Option<ImageSlot>,
        reported: Option<u64>,
    ) {
        use crate::config::gateway::ImageOp;
        // Taking the state out of the slot turns the reservation into an image (no give-back).
        let held = slot.and_then(|mut s| s.0.take());
        let st = held.clone().unwrap_or_else(|| self.images(tenant));
        let count = {
            let mut g = lock(&st.inner);
            let before = g.count;
            match op {
                ImageOp::Add if held.is_some() => {
                    g.reserved = g.reserved.saturating_sub(1);
                    g.count += 1;
                }
                ImageOp::Delete => g.count = g.count.saturating_sub(1),
                _ => {}
            }
            if let Some(n) = reported {
                g.count = n;
            }
            if g.count != before {
                self.mark(&mut g.dirty, DirtyKey::Image(st.key));
            }
            g.count
        };
        st.gauge.get_or_init(|| self.metrics.image_gauge(st.tenant)).set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// The live state of a tenant's package (created empty if never used).
    pub fn package(&self, tenant: &Tenant, p: &Package) -> Arc<PackageState> {
        self.package_state(crate::intern::pair(tenant.intern, p.intern), tenant.label, p.label)
    }

    /// Sets a package's `turnstile_package_remaining_points` from its points and what the ledger
    /// says it consumed (SPEC §10: the series exists from the moment the package is loaded).
    pub fn refresh_package_gauge(&self, tenant: &Tenant, p: &Package) {
        let st = self.package(tenant, p);
        let remaining = (p.points - st.consumed()).max(Decimal::ZERO);
        st.gauge.get_or_init(|| self.metrics.package_gauge(st.tenant, st.id)).set(to_f64(remaining));
    }

    /// Whether a package can pay for the feature at `now` (SPEC §6.2), ignoring its balance.
    fn applies(snap: &Snapshot, f: &Feature, feature_idx: usize, p: &Package, now: i64) -> Option<PayerKind> {
        if !(p.effective_at <= now && now < p.expires_at) {
            return None;
        }
        match p.target {
            PackageTarget::Feature(i) if i == feature_idx => Some(PayerKind::SinglePackage),
            PackageTarget::Scope(g) if f.billing.has(Method::GeneralPackage) && snap.catalog.general_covers(g, f) => {
                Some(PayerKind::GeneralPackage)
            }
            _ => None,
        }
    }

    /// Chooses and reserves the payer of one call at admission; `None` means 402.
    pub fn reserve(&self, snap: &Snapshot, tenant: &Tenant, feature_idx: usize, now: i64) -> Option<Reservation> {
        let f = &snap.catalog.features[feature_idx];
        if feature_idx == snap.catalog.image_search_feature || tenant.active_plan(feature_idx, now).is_some() {
            // Image search instances are prepaid subscriptions.
            return Some(Reservation { payer: PayerKind::PrepaidQps, package: None, deferred: false });
        }
        let video = f.unit == Unit::VideoMinute;
        for p in &tenant.packages {
            let Some(kind) = Self::applies(snap, f, feature_idx, p, now) else { continue };
            let state = self.package(tenant, p);
            let mut g = lock(&state.inner);
            let available = p.points - g.consumed - g.reserved;
            if video {
                if available > Decimal::ZERO {
                    drop(g);
                    // Nothing is reserved (the minutes are not known yet); the package names
                    // the payer, also on a failed call.
                    return Some(Reservation { payer: kind, package: Some((state, Decimal::ZERO)), deferred: true });
                }
            } else if available >= f.points_per_unit {
                g.reserved += f.points_per_unit;
                drop(g);
                return Some(Reservation { payer: kind, package: Some((state, f.points_per_unit)), deferred: false });
            }
        }
        let fallback = if f.billing.has(Method::Payg) {
            PayerKind::Payg
        } else if f.billing.has(Method::PrepaidQps) {
            PayerKind::FreeDefault
        } else {
            return None;
        };
        Some(Reservation { payer: fallback, package: None, deferred: video })
    }

    /// Flags a record as changed and, the first time since its last commit, queues it for the
    /// writer. Called with the record's lock held, like every change to it.
    fn mark(&self, dirty: &mut bool, key: DirtyKey) {
        if !*dirty {
            *dirty = true;
            self.send(Msg::Dirty(key));
        }
    }

    /// Consumes from a package in one step under its lock: the share a call reserved
    /// (`reserved` > 0), or else up to `up_to` points of what the package still holds beyond
    /// the shares reserved by calls in flight (video). Fires the low-balance alert the first
    /// time the balance falls to the ratio. Returns the points consumed.
    fn consume(
        &self,
        state: &PackageState,
        p: Option<&Package>,
        reserved: Decimal,
        up_to: Decimal,
        ratio: Decimal,
        now: i64,
    ) -> Decimal {
        let mut g = lock(&state.inner);
        let points = if reserved > Decimal::ZERO {
            g.reserved -= reserved;
            reserved
        } else {
            let available = p.map_or(Decimal::ZERO, |p| p.points - g.consumed - g.reserved);
            available.max(Decimal::ZERO).min(up_to)
        };
        if points <= Decimal::ZERO {
            return Decimal::ZERO;
        }
        g.consumed += points;
        self.mark(&mut g.dirty, DirtyKey::Package(state.key));
        // The package left the configuration while the call was in flight: still charged.
        let Some(p) = p else { return points };
        let remaining = (p.points - g.consumed).max(Decimal::ZERO);
        let fire = !g.alerted && remaining <= p.points * ratio;
        if fire {
            g.alerted = true;
        }
        drop(g);
        state.gauge.get_or_init(|| self.metrics.package_gauge(state.tenant, state.id)).set(to_f64(remaining));
        if fire {
            tracing::warn!(tenant = state.tenant, package = state.id, points = %p.points, %remaining, "package balance low");
            self.metrics.low_balance_alert(state.tenant, state.id);
            let _ = self.alerts.send(Alert {
                tenant: state.tenant.to_string(),
                package: state.id.to_string(),
                points: Dec(p.points),
                remaining: Dec(remaining),
                ratio: Dec(ratio),
                at: crate::time::format_utc(now),
            });
        }
        points
    }

    fn find_package<'a>(tenant: &'a Tenant, state: &PackageState) -> Option<&'a Package> {
        tenant.packages.iter().find(|p| p.label == state.id)
    }

    /// Batched mode: the charge counts in the metrics at once. Strict mode: it is kept (boxed)
    /// in the [`Settled`] and counts once [`Billing::durable`] saw it on disk.
    fn finish(&self, payer: HeaderValue, charge: Charge) -> Settled {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        if self.strict {
            return Settled { payer, seq, pending: Some(Box::new(charge)) };
        }
        self.count(&charge);
        Settled { payer, seq, pending: None }
    }

    /// The metrics of a charge.
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

    /// Takes a charge back out of memory, exactly (deltas, so later settlements are kept); the
    /// records are marked dirty, so the reverted state is what the writer commits next. A
    /// low-balance alert already fired stays fired.
    fn revert(&self, c: &Charge) {
        {
            let mut g = lock(&c.month.inner);
            for (u, d) in g.units.iter_mut().zip(c.units.iter()) {
                *u -= *d;
            }
            g.unpaid -= c.unpaid;
            if let Some((cell, units)) = &c.payg {
                if let Some(v) = g.payg.get_mut(cell) {
                    *v -= *units;
                    if v.is_zero() {
                        g.payg.remove(cell);
                    }
                }
            }
            self.mark(&mut g.dirty, DirtyKey::Month(c.month_key.0, c.month_key.1));
        }
        for (state, taken, points) in &c.packages {
            let mut g = lock(&state.inner);
            g.consumed -= *taken;
            let remaining = (*points - g.consumed).max(Decimal::ZERO);
            self.mark(&mut g.dirty, DirtyKey::Package(state.key));
            drop(g);
            state.gauge.get_or_init(|| self.metrics.package_gauge(state.tenant, state.id)).set(to_f64(remaining));
        }
    }

    /// Settles a per-call feature after the upstream answered 2xx.
    pub fn settle_call(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        mut r: Reservation,
        now: i64,
    ) -> Settled {
        let f = &snap.catalog.features[feature_idx];
        let pair = crate::intern::pair(tenant.intern, f.intern);
        let payer = r.header();
        let mi = month_index(now, snap.settings.timezone);
        let month = self.month_state(pair, mi, tenant.label, f.label, || ledger::month_of(now, snap.settings.timezone));
        let mut units = [Decimal::ZERO; 5];
        units[r.payer as usize] = Decimal::ONE;
        let mut charge = Charge {
            pair,
            tenant: tenant.label,
            feature: f.label,
            month: month.clone(),
            month_key: (pair, mi),
            units,
            payg: None,
            payg_amount: None,
            unpaid: Decimal::ZERO,
            packages: Vec::new(),
            currency: if self.strict { snap.catalog.currency.clone() } else { String::new() },
        };
        {
            let mut g = lock(&month.inner);
            g.units[r.payer as usize] += Decimal::ONE;
            if r.payer == PayerKind::Payg {
                let before = g.payg.get("").copied().unwrap_or_default();
                charge.payg_amount = pricing::marginal_price(&f.payg_tiers, before);
                *g.payg.entry(String::new()).or_default() += Decimal::ONE;
                charge.payg = Some((String::new(), Decimal::ONE));
            }
            self.mark(&mut g.dirty, DirtyKey::Month(pair, mi));
        }
        if let Some((state, factor)) = r.package.take() {
            let p = Self::find_package(tenant, &state);
            let taken = self.consume(&state, p, factor, Decimal::ZERO, snap.settings.low_balance_ratio, now);
            if self.strict {
                charge.packages.push((state.clone(), taken, p.map_or(Decimal::ZERO, |p| p.points)));
            }
        }
        if !self.strict {
            // `count` takes the currency from here in batched mode (no copy per call).
            if let Some(a) = charge.payg_amount.take() {
                self.metrics.payg_amount(pair, tenant.label, f.label, &snap.catalog.currency, to_f64(a));
            }
        }
        self.finish(payer, charge)
    }

    /// Settles a video-minute call from the upstream's usage report: the minutes are taken from
    /// packages in payer order, each paying up to what it holds (taken in one step under the
    /// package's lock), and the rest goes to pay-as-you-go when the feature's billing includes
    /// it or the feature has a price for the reported cell, else to `free_default` when its
    /// billing includes `prepaid_qps`, else it is recorded unpaid (never silently free).
    /// `usage = None` (missing or malformed report) bills 0 minutes and records nothing else.
    pub fn settle_video(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        mut r: Reservation,
        usage: Option<VideoUsage>,
        now: i64,
    ) -> Settled {
        let f = &snap.catalog.features[feature_idx];
        let pair = crate::intern::pair(tenant.intern, f.intern);
        let mut left = usage.map(|u| Decimal::from(u.ms) / Decimal::from(60_000u32)).unwrap_or_default();
        let mi = month_index(now, snap.settings.timezone);
        let month = self.month_state(pair, mi, tenant.label, f.label, || ledger::month_of(now, snap.settings.timezone));
        let mut first: Option<HeaderValue> = None;
        let mut charge = Charge {
            pair,
            tenant: tenant.label,
            feature: f.label,
            month: month.clone(),
            month_key: (pair, mi),
            units: [Decimal::ZERO; 5],
            payg: None,
            payg_amount: None,
            unpaid: Decimal::ZERO,
            packages: Vec::new(),
            currency: snap.catalog.currency.clone(),
        };
        if r.payer == PayerKind::PrepaidQps {
            charge.units[PayerKind::PrepaidQps as usize] = left;
            left = Decimal::ZERO;
            first = Some(r.header());
        } else {
            for p in &tenant.packages {
                if left <= Decimal::ZERO {
                    break;
                }
                let Some(kind) = Self::applies(snap, f, feature_idx, p, now) else { continue };
                let state = self.package(tenant, p);
                let taken = self.consume(
                    &state,
                    Some(p),
                    Decimal::ZERO,
                    left * f.points_per_unit,
                    snap.settings.low_balance_ratio,
                    now,
                );
                if taken <= Decimal::ZERO {
                    continue;
                }
                let minutes = taken / f.points_per_unit;
                first.get_or_insert_with(|| state.header(kind));
                charge.units[kind as usize] += minutes;
                charge.packages.push((state, taken, p.points));
                left -= minutes;
            }
        }
        if left > Decimal::ZERO {
            let cell = usage.and_then(|u| pricing::video_cell(&f.video_prices, u.fps, u.lines));
            let to = if cell.is_some() || f.billing.has(Method::Payg) {
                Some(PayerKind::Payg)
            } else if f.billing.has(Method::PrepaidQps) {
                Some(PayerKind::FreeDefault)
            } else {
                None
            };
            match to {
                Some(kind) => {
                    charge.units[kind as usize] += left;
                    if kind == PayerKind::Payg {
                        // A payg feature without a price for this cell is still metered (SPEC §3.2).
                        let key = cell.map_or_else(|| UNPRICED.to_string(), |c| c.cell());
                        charge.payg = Some((key, left));
                        charge.payg_amount = cell.map(|c| c.price * left);
                    }
                    first.get_or_insert_with(|| HeaderValue::from_static(kind.as_str()));
                }
                None => {
                    tracing::warn!(
                        tenant = tenant.label,
                        feature = f.label,
                        minutes = %left,
                        "video minutes beyond the packages and nothing else can pay: recorded unpaid"
                    );
                    charge.unpaid = left;
                }
            }
        }
        {
            let mut g = lock(&month.inner);
            for (u, d) in g.units.iter_mut().zip(charge.units.iter()) {
                *u += *d;
            }
            g.unpaid += charge.unpaid;
            if let Some((cell, minutes)) = &charge.payg {
                *g.payg.entry(cell.clone()).or_default() += *minutes;
            }
            self.mark(&mut g.dirty, DirtyKey::Month(pair, mi));
        }
        r.package.take();
        let payer = first.unwrap_or_else(|| r.header());
        self.finish(payer, charge)
    }

    /// Waits until a settlement is durable and returns its payer header. Batched mode returns at
    /// once. Strict mode waits at most `[ledger].strict_timeout_ms`; past it the charge is
    /// reverted (the call is not charged) and the error says so (SPEC §7).
    pub async fn durable(&self, settled: Settled) -> Result<HeaderValue, NotDurable> {
        let Settled { payer, seq, pending } = settled;
        let Some(charge) = pending else { return Ok(payer) };
        let mut rx = self.durable.subscribe();
        let on_disk =
            tokio::time::timeout(self.strict_timeout, rx.wait_for(|&d| d >= seq)).await.is_ok_and(|r| r.is_ok());
        drop(rx);
        match on_disk {
            true => {
                self.count(&charge);
                Ok(payer)
            }
            // Timed out, or the writer is gone (closed): not durable.
            false => {
                self.revert(&charge);
                Err(NotDurable { timeout_ms: u64::try_from(self.strict_timeout.as_millis()).unwrap_or(u64::MAX) })
            }
        }
    }

    /// Commits everything settled so far and waits for it, at most `wait`; true when it is on
    /// disk.
    pub fn flush_within(&self, wait: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Flush(tx));
        if let Some(h) = lock(&self.writer).as_ref() {
            h.thread().unpark(); // the writer may be parked in its gather window
        }
        rx.recv_timeout(wait).is_ok()
    }

    /// Commits everything settled so far and waits for it (tests, benches), at most 30 s.
    pub fn flush(&self) -> bool {
        self.flush_within(Duration::from_secs(30))
    }

    /// Flushes (waiting at most `wait`), then stops the writer with a last commit attempt.
    /// Reports how many records could not be written; later settlements stay in memory only.
    pub fn close(&self, wait: Duration) -> Result<(), Unflushed> {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.flush_within(wait);
            self.send(Msg::Stop);
            if let Some(h) = lock(&self.writer).take() {
                h.thread().unpark();
                // The writer answers Stop within one commit attempt; wait a bounded time for it.
                let deadline = Instant::now() + wait.max(Duration::from_millis(100));
                while !h.is_finished() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                if h.is_finished() {
                    let _ = h.join();
                }
            }
        }
        match self.unflushed() {
            0 => Ok(()),
            records => Err(Unflushed { records, ledger: self.ledger_name.clone() }),
        }
    }

    /// Records changed in memory and not (yet) committed.
    fn unflushed(&self) -> usize {
        self.packages.iter().filter(|e| lock(&e.value().inner).dirty).count()
            + self.months.iter().filter(|e| lock(&e.value().inner).dirty).count()
            + self.images.iter().filter(|e| lock(&e.value().inner).dirty).count()
    }

    pub fn ledger_name(&self) -> &str {
        &self.ledger_name
    }

    /// Usage of a tenant for a `YYYY-MM` month, per feature, sorted by feature id.
    pub fn usage(&self, tenant: &str, month: &str) -> Vec<MonthUsage> {
        let mut out: Vec<_> = self
            .months
            .iter()
            .filter(|e| e.value().tenant == tenant && e.value().month == month)
            .map(|e| {
                let g = lock(&e.value().inner);
                MonthUsage { feature: e.value().feature, units: g.units, payg: g.payg.clone(), unpaid: g.unpaid }
            })
            .collect();
        out.sort_by_key(|x| x.feature);
        out
    }

    fn record(&self, key: &DirtyKey) -> Option<Record> {
        match key {
            DirtyKey::Package(k) => {
                let st = self.packages.get(k)?.clone();
                let mut g = lock(&st.inner);
                g.dirty = false;
                Some(Record::Package(PackageRecord {
                    tenant: st.tenant.to_string(),
                    id: st.id.to_string(),
                    consumed: Dec(g.consumed),
                    alerted: g.alerted,
                }))
            }
            DirtyKey::Image(k) => {
                let st = self.images.get(k)?.clone();
                let mut g = lock(&st.inner);
                g.dirty = false;
                Some(Record::ImageCount(ledger::ImageCountRecord { tenant: st.tenant.to_string(), count: g.count }))
            }
            DirtyKey::Month(pair, m) => {
                let st = self.months.get(&(*pair, *m))?.clone();
                let mut g = lock(&st.inner);
                g.dirty = false;
                Some(Record::Month(MonthRecord {
                    tenant: st.tenant.to_string(),
                    feature: st.feature.to_string(),
                    month: st.month.clone(),
                    units: g.units.map(Dec),
                    payg: g.payg.iter().map(|(k, v)| (k.clone(), Dec(*v))).collect(),
                    unpaid: Dec(g.unpaid),
                }))
            }
        }
    }

    /// Marks a record dirty again after a failed commit (the writer keeps its key), so that
    /// [`Billing::close`] counts it and a change meanwhile does not queue it twice.
    fn redirty(&self, key: &DirtyKey) {
        match key {
            DirtyKey::Package(k) => {
                if let Some(st) = self.packages.get(k) {
                    lock(&st.inner).dirty = true;
                }
            }
            DirtyKey::Month(p, m) => {
                if let Some(st) = self.months.get(&(*p, *m)) {
                    lock(&st.inner).dirty = true;
                }
            }
            DirtyKey::Image(k) => {
                if let Some(st) = self.images.get(k) {
                    lock(&st.inner).dirty = true;
                }
            }
        }
    }
}

/// The writer thread: one ledger transaction per group of dirty records. A failed commit keeps
/// every record in memory, marked dirty, and is retried; the first failure of a spell is logged
/// as an error and makes the billing unhealthy (`/readyz` 503) until a commit succeeds again.
fn writer(billing: std::sync::Weak<Billing>, store: Box<dyn LedgerStore>, rx: mpsc::Receiver<Msg>, interval: Duration) {
    let mut keys: HashSet<DirtyKey> = HashSet::new();
    let mut waiters: Vec<mpsc::Sender<()>> = Vec::new();
    let mut stop = false;
    let mut failures: u64 = 0;
    loop {
        let Some(strict) = billing.upgrade().map(|b| b.strict) else { return };
        // Strict mode also wakes every 2 ms: a settlement whose record was committed before its
        // sequence number was taken still needs `durable` advanced past that number.
        let first = if strict || failures > 0 {
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(m) => Some(m),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(m) => Some(m),
                Err(_) => return,
            }
        };
        let Some(b) = billing.upgrade() else { return };
        let take = |m: Msg, keys: &mut HashSet<DirtyKey>, waiters: &mut Vec<mpsc::Sender<()>>, stop: &mut bool| match m
        {
            Msg::Dirty(k) => {
                keys.insert(k);
            }
            Msg::Flush(w) => waiters.push(w),
            Msg::Stop => *stop = true,
        };
        match first {
            Some(m) => take(m, &mut keys, &mut waiters, &mut stop),
            None if !keys.is_empty() || b.seq.load(Ordering::SeqCst) > *b.durable.borrow() => {}
            None => continue,
        }
        if !b.strict && waiters.is_empty() && !stop && failures == 0 {
            // Batched: gather for one interval, parked instead of waking for each message (with
            // many tenants nearly every settlement queues a key, and a wake-up each cost a context
            // switch per request); `flush_within` and `close` unpark it.
            let deadline = Instant::now() + interval;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                std::thread::park_timeout(left);
                while let Ok(m) = rx.try_recv() {
                    take(m, &mut keys, &mut waiters, &mut stop);
                }
                if !waiters.is_empty() || stop {
                    break;
                }
            }
        }
        let target = b.seq.load(Ordering::SeqCst);
        while let Ok(m) = rx.try_recv() {
            take(m, &mut keys, &mut waiters, &mut stop);
        }
        if keys.is_empty() {
            // Every settlement numbered up to `target` is already committed (its record would
            // otherwise be dirty and queued).
            b.durable.send_replace(target);
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
            if stop {
                return;
            }
            continue;
        }
        let records: Vec<Record> = keys.iter().filter_map(|k| b.record(k)).collect();
        let started = Instant::now();
        match store.commit(&records) {
            Ok(()) => {
                b.metrics.ledger_flush_duration.observe(started.elapsed().as_secs_f64());
                if failures > 0 {
                    tracing::info!(
                        ledger = %b.ledger_name,
                        failed_commits = failures,
                        records = records.len(),
                        "ledger commits succeed again; everything kept in memory is on disk"
                    );
                    failures = 0;
                }
                b.healthy.store(true, Ordering::SeqCst);
                keys.clear();
                b.durable.send_replace(target);
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            Err(e) => {
                b.metrics.ledger_errors.inc();
                b.healthy.store(false, Ordering::SeqCst);
                if failures == 0 {
                    tracing::error!(
                        error = %e,
                        records = records.len(),
                        "ledger commit failed; serving from memory and retrying (not ready until it succeeds)"
                    );
                }
                failures += 1;
                // The records stay dirty in memory and in `keys`: the next attempt writes their
                // latest state.
                for k in &keys {
                    b.redirty(k);
                }
            }
        }
        drop(b);
        if stop {
            return;
        }
        if failures > 0 {
            // Back off before the next attempt; a Stop or Flush meanwhile is seen at the next turn.
            std::thread::sleep(interval.clamp(Duration::from_millis(20), Duration::from_millis(200)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::RedbLedger;

    const MAIN: &str = "[server]\nupstream = \"http://127.0.0.1:1\"\n";

    fn snapshot(catalog: &str, ents: &str) -> Snapshot {
        let texts = crate::config::Texts::in_memory(MAIN, catalog, ents);
        crate::config::build(&texts, 1).unwrap_or_else(|e| panic!("{e}"))
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

    fn open(dir: &std::path::Path, d: Durability) -> Arc<Billing> {
        let store = RedbLedger::open(dir).unwrap();
        Billing::open(
            Box::new(store),
            d,
            Duration::from_millis(5),
            Duration::from_secs(2),
            Arc::new(Metrics::new(true)),
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
            let r = b.reserve(&s, &s.tenants[0], f, now).expect("payg pays");
            assert_eq!(r.payer, PayerKind::Payg);
            b.settle_call(&s, &s.tenants[0], f, r, now);
        }
        let usage = b.usage("acme", "2026-01");
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
            let r = b.reserve(&s, &s.tenants[0], f, now).expect("payer");
            order.push(r.header().to_str().unwrap().to_string());
            b.settle_call(&s, &s.tenants[0], f, r, now);
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
        let r1 = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        let r2 = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        let r3 = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        assert_eq!(
            (r1.payer, r2.payer, r3.payer),
            (PayerKind::SinglePackage, PayerKind::SinglePackage, PayerKind::Payg),
            "0.1 left < 0.2"
        );
        drop(r2); // upstream failed: the share comes back
        let r4 = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        assert_eq!(r4.payer, PayerKind::SinglePackage);
        b.settle_call(&s, &s.tenants[0], f, r1, now);
        b.settle_call(&s, &s.tenants[0], f, r4, now);
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
                        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
                        if r.payer == PayerKind::SinglePackage {
                            if i % 3 == 0 {
                                drop(r); // failed call: released
                                continue;
                            }
                            n.fetch_add(1, Ordering::SeqCst);
                        }
                        b.settle_call(&s, &s.tenants[0], f, r, now);
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

    #[test]
    fn video_minutes_split_across_packages_then_payg_and_the_seed_amount() {
        let pk = r#"{"id": "vid", "scope": "video-duration", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}"#;
        let (_dir, s, b, f, now) = fixture(pk, "\"video_production\"", "comprehensive-video-enhancement");
        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        assert!(r.deferred);
        let usage = VideoUsage { ms: 140_000, fps: 60, lines: 1080 };
        let settled = b.settle_video(&s, &s.tenants[0], f, r, Some(usage), now);
        assert_eq!(settled.payer.to_str().unwrap(), "general_package:vid");
        let u = b.usage("acme", "2026-03");
        let units = &u[0].units;
        assert_eq!(units[PayerKind::GeneralPackage as usize], Decimal::ONE, "the package paid the one minute it held");
        let payg_minutes = u[0].payg["fps<=60,lines<=1440"];
        assert_eq!(pricing::round2(payg_minutes * Decimal::from(16)), Decimal::new(2133, 2), "1 min 20 s at 16/min");
        // The whole 2 min 20 s at payg is the seed's 37.33.
        let whole = Decimal::from(140_000) / Decimal::from(60_000) * Decimal::from(16);
        assert_eq!(pricing::round2(whole), Decimal::new(3733, 2));
        // Next call: the package is empty, payg pays from the start.
        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        let settled = b.settle_video(&s, &s.tenants[0], f, r, None, now);
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
                        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
                        let usage = VideoUsage { ms, fps: 60, lines: 1080 };
                        b.settle_video(&s, &s.tenants[0], f, r, Some(usage), now);
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
        let u = b.usage("acme", "2026-03");
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
        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        b.settle_video(&s, &s.tenants[0], f, r, Some(VideoUsage { ms: 60_000, fps: 60, lines: 1080 }), now);
        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        let settled = b.settle_video(&s, &s.tenants[0], f, r, None, now);
        assert_eq!(settled.payer.to_str().unwrap(), "payg");
        let u = b.usage("acme", "2026-03");
        assert_eq!(u[0].units[PayerKind::Payg as usize], Decimal::ONE);
        assert_eq!(u[0].payg.keys().collect::<Vec<_>>(), ["fps<=60,lines<=1440"], "no unpriced cell: {:?}", u[0].payg);
    }

    #[test]
    fn a_failed_video_call_names_the_package_it_would_have_used() {
        let (_dir, s, b, f, now) = fixture(VID, "\"video_production\"", "comprehensive-video-enhancement");
        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
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
            let r = b.reserve(&s, &s.tenants[0], f, now).expect("the package pays");
            let settled = b.settle_video(&s, &s.tenants[0], f, r, three, now);
            assert_eq!(settled.payer.to_str().unwrap(), "general_package:vid", "{id}");
            let u = b.usage("acme", "2026-03");
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
            assert_eq!(b.usage("acme", "2026-03")[0].unpaid, unpaid, "{id} after restart");
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
            let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
            b.settle_call(&s, &s.tenants[0], f, r, now);
        }
        wait_until("two failed commits", || ledger_errors(&b) >= 2);
        assert!(!b.healthy(), "not ready while commits fail");
        assert!(!b.flush_within(Duration::from_millis(50)), "a flush cannot succeed meanwhile");
        // Served from memory meanwhile.
        assert_eq!(b.usage("acme", "2026-01")[0].units[PayerKind::Payg as usize], Decimal::from(10));
        for _ in 0..5 {
            let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
            b.settle_call(&s, &s.tenants[0], f, r, now);
        }
        fail.store(false, Ordering::SeqCst);
        assert!(b.flush(), "commits succeed again");
        assert!(b.healthy());
        let errors = ledger_errors(&b);
        assert!(b.close(Duration::from_secs(5)).is_ok());
        drop(b);
        let b = open(dir.path(), Durability::Batched);
        assert_eq!(b.usage("acme", "2026-01")[0].units[PayerKind::Payg as usize], Decimal::from(15), "nothing lost");
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
        let (b, fail) = open_flaky(dir.path(), Durability::Strict, Duration::from_millis(100));
        let tenant = &s.tenants[0];
        // One of each, made durable: the state the reverts must come back to.
        for fi in [od, lp] {
            let r = b.reserve(&s, tenant, fi, now).unwrap();
            assert!(rt.block_on(b.durable(b.settle_call(&s, tenant, fi, r, now))).is_ok());
        }
        let r = b.reserve(&s, tenant, vid, now).unwrap();
        let usage = Some(VideoUsage { ms: 30_000, fps: 60, lines: 1080 });
        assert!(rt.block_on(b.durable(b.settle_video(&s, tenant, vid, r, usage, now))).is_ok());
        let before = b.usage("acme", "2026-03");
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
            let r = b.reserve(&s, tenant, fi, now).unwrap();
            let e = rt.block_on(b.durable(b.settle_call(&s, tenant, fi, r, now))).expect_err("not durable");
            assert_eq!(e.timeout_ms, 100);
        }
        // 2 minutes: 0.5 from the package, 1.5 at payg.
        let r = b.reserve(&s, tenant, vid, now).unwrap();
        let usage = Some(VideoUsage { ms: 120_000, fps: 60, lines: 1080 });
        assert!(rt.block_on(b.durable(b.settle_video(&s, tenant, vid, r, usage, now))).is_err());
        assert!(started.elapsed() < Duration::from_secs(2), "bounded by the timeout, not blocked");
        assert!(!b.healthy());
        let after = b.usage("acme", "2026-03");
        for (x, y) in before.iter().zip(after.iter()) {
            assert_eq!((x.feature, x.units, &x.payg, x.unpaid), (y.feature, y.units, &y.payg, y.unpaid), "not charged");
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
        let reopened = b.usage("acme", "2026-03");
        for (x, y) in before.iter().zip(reopened.iter()) {
            assert_eq!((x.feature, x.units, &x.payg), (y.feature, y.units, &y.payg), "the reverted state is on disk");
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
        let stop = Arc::new(AtomicBool::new(false));
        let flapper = {
            let (fail, stop) = (fail.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut on = false;
                while !stop.load(Ordering::SeqCst) {
                    on = !on;
                    fail.store(on, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(if on { 40 } else { 15 }));
                }
                fail.store(false, Ordering::SeqCst);
            })
        };
        let threads: Vec<_> = (0..6)
            .map(|_| {
                let (s, b) = (s.clone(), b.clone());
                std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                    let (mut ok, mut ok_package, mut refused) = (0u64, 0u64, 0u64);
                    for _ in 0..40 {
                        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
                        let by_package = r.payer == PayerKind::SinglePackage;
                        match rt.block_on(b.durable(b.settle_call(&s, &s.tenants[0], f, r, now))) {
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
        stop.store(true, Ordering::SeqCst);
        flapper.join().unwrap();
        assert!(refused > 0 && ok > 0, "the ledger flapped: {ok} answered, {refused} refused");
        assert!(b.flush());
        assert!(b.close(Duration::from_secs(5)).is_ok());
        drop(b);
        let b = open(dir.path(), Durability::Batched);
        let u = b.usage("acme", "2026-03");
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
            let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
            b.settle_call(&s, &s.tenants[0], f, r, now);
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
        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        b.settle_call(&s, &s.tenants[0], f, r, now);
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
            for _ in 0..5 {
                let r = b.reserve(&s, &s.tenants[0], od, t("2026-01-31T15:59:59Z")).unwrap();
                b.settle_call(&s, &s.tenants[0], od, r, t("2026-01-31T15:59:59Z"));
            }
            let r = b.reserve(&s, &s.tenants[0], lp, t("2026-01-31T15:59:59Z")).unwrap();
            b.settle_call(&s, &s.tenants[0], lp, r, t("2026-01-31T15:59:59Z"));
            // 16:00Z is midnight in +08:00: February.
            let r = b.reserve(&s, &s.tenants[0], lp, t("2026-01-31T16:00:00Z")).unwrap();
            b.settle_call(&s, &s.tenants[0], lp, r, t("2026-01-31T16:00:00Z"));
            b.close(Duration::from_secs(5)).unwrap();
        }
        let b = open(dir.path(), Durability::Batched);
        let st = b.package(&s.tenants[0], &s.tenants[0].packages[0]);
        assert_eq!(st.consumed(), Decimal::ONE);
        assert!(st.alerted());
        let jan = b.usage("acme", "2026-01");
        let feb = b.usage("acme", "2026-02");
        assert_eq!(jan.len(), 2);
        assert_eq!(feb.len(), 1);
        assert_eq!(feb[0].units[PayerKind::Payg as usize], Decimal::ONE);
        // The package is spent: the next object-detection call falls through to payg.
        assert_eq!(b.reserve(&s, &s.tenants[0], od, t("2026-02-02T00:00:00Z")).unwrap().payer, PayerKind::Payg);
    }
}
