//! Who pays (SPEC §6): payer selection and reservation at admission, settlement on a 2xx,
//! release otherwise; pay-as-you-go tiers per tenant, feature and month; low-balance alerts;
//! and the group-committing writer that keeps the [`LedgerStore`] up to date.
//!
//! Live state (package consumption, monthly units) is in memory, one small mutex per package and
//! per (tenant, feature, month): only requests of the same tenant ever wait on one. A change marks
//! its record dirty; the writer thread commits all dirty records in one transaction every
//! `flush_interval` (batched) or as soon as any are dirty (strict, where the request waits for it).

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
use crate::ledger::{self, LedgerError, LedgerStore, MonthRecord, PackageRecord, Record};
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
            let mut g = lock(&state.inner);
            g.reserved -= factor;
        }
    }
}

/// What a settlement did: who paid first (for `x-turnstile-payer`) and the commit sequence to
/// wait for in strict mode.
pub struct Settled {
    pub payer: HeaderValue,
    pub seq: u64,
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
    tx: Mutex<mpsc::Sender<Msg>>,
    seq: AtomicU64,
    durable: watch::Sender<u64>,
    strict: bool,
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
        metrics: Arc<Metrics>,
    ) -> Result<(Arc<Billing>, tokio::sync::mpsc::UnboundedReceiver<Alert>), LedgerError> {
        let records = store.load()?;
        let (tx, rx) = mpsc::channel();
        let (alerts, alert_rx) = tokio::sync::mpsc::unbounded_channel();
        let billing = Arc::new(Billing {
            packages: DashMap::with_hasher(FxBuildHasher),
            months: DashMap::with_hasher(FxBuildHasher),
            images: DashMap::with_hasher(FxBuildHasher),
            tx: Mutex::new(tx),
            seq: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            strict: durability == Durability::Strict,
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
        let _ = lock(&self.tx).send(msg);
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
            inner: Mutex::new(MonthInner { units: [Decimal::ZERO; 5], payg: BTreeMap::new(), dirty: false }),
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
                    return Some(Reservation { payer: kind, package: None, deferred: true });
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

    /// Consumes `points` from a package (already reserved or checked) and fires the
    /// low-balance alert the first time the balance falls to the ratio.
    fn consume(&self, state: &PackageState, p: &Package, points: Decimal, reserved: Decimal, ratio: Decimal, now: i64) {
        let mut g = lock(&state.inner);
        g.reserved -= reserved;
        g.consumed += points;
        let remaining = (p.points - g.consumed).max(Decimal::ZERO);
        let fire = !g.alerted && remaining <= p.points * ratio;
        if fire {
            g.alerted = true;
        }
        self.mark(&mut g.dirty, DirtyKey::Package(state.key));
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
    }

    fn find_package<'a>(tenant: &'a Tenant, state: &PackageState) -> Option<&'a Package> {
        tenant.packages.iter().find(|p| p.label == state.id)
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
        let mut amount = None;
        {
            let mut g = lock(&month.inner);
            g.units[r.payer as usize] += Decimal::ONE;
            if r.payer == PayerKind::Payg {
                let before = g.payg.get("").copied().unwrap_or_default();
                amount = pricing::marginal_price(&f.payg_tiers, before);
                *g.payg.entry(String::new()).or_default() += Decimal::ONE;
            }
            self.mark(&mut g.dirty, DirtyKey::Month(pair, mi));
        }
        if let Some((state, factor)) = r.package.take() {
            match Self::find_package(tenant, &state) {
                Some(p) => self.consume(&state, p, factor, factor, snap.settings.low_balance_ratio, now),
                // The package left the configuration while the call was in flight: still charge it.
                None => {
                    let mut g = lock(&state.inner);
                    g.reserved -= factor;
                    g.consumed += factor;
                    self.mark(&mut g.dirty, DirtyKey::Package(state.key));
                }
            }
        }
        self.metrics.billed(pair, tenant.label, f.label, r.payer as usize, 1.0);
        if let Some(a) = amount {
            self.metrics.payg_amount(pair, tenant.label, f.label, &snap.catalog.currency, to_f64(a));
        }
        Settled { payer, seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1 }
    }

    /// Settles a video-minute call from the upstream's usage report: the minutes are taken from
    /// packages in payer order, each paying up to what it holds, and the rest falls through to
    /// pay-as-you-go (or `free_default`). `usage = None` (missing or malformed report) bills 0.
    pub fn settle_video(
        &self,
        snap: &Snapshot,
        tenant: &Tenant,
        feature_idx: usize,
        r: Reservation,
        usage: Option<VideoUsage>,
        now: i64,
    ) -> Settled {
        let f = &snap.catalog.features[feature_idx];
        let pair = crate::intern::pair(tenant.intern, f.intern);
        let mut left = usage.map(|u| Decimal::from(u.ms) / Decimal::from(60_000u32)).unwrap_or_default();
        let mi = month_index(now, snap.settings.timezone);
        let month = self.month_state(pair, mi, tenant.label, f.label, || ledger::month_of(now, snap.settings.timezone));
        let mut first: Option<HeaderValue> = None;
        let mut paid: Vec<(PayerKind, Decimal)> = Vec::new();
        if r.payer == PayerKind::PrepaidQps {
            paid.push((PayerKind::PrepaidQps, left));
            left = Decimal::ZERO;
            first = Some(r.header());
        } else {
            for p in &tenant.packages {
                if left <= Decimal::ZERO {
                    break;
                }
                let Some(kind) = Self::applies(snap, f, feature_idx, p, now) else { continue };
                let state = self.package(tenant, p);
                let take_points = {
                    let g = lock(&state.inner);
                    (p.points - g.consumed - g.reserved).max(Decimal::ZERO).min(left * f.points_per_unit)
                };
                if take_points <= Decimal::ZERO {
                    continue;
                }
                let minutes = take_points / f.points_per_unit;
                self.consume(&state, p, take_points, Decimal::ZERO, snap.settings.low_balance_ratio, now);
                first.get_or_insert_with(|| state.header(kind));
                paid.push((kind, minutes));
                left -= minutes;
            }
        }
        let fallback = if f.billing.has(Method::Payg) { PayerKind::Payg } else { PayerKind::FreeDefault };
        if left > Decimal::ZERO || first.is_none() {
            paid.push((fallback, left.max(Decimal::ZERO)));
            first.get_or_insert_with(|| HeaderValue::from_static(fallback.as_str()));
        }
        let mut amount = None;
        {
            let mut g = lock(&month.inner);
            for (kind, minutes) in &paid {
                g.units[*kind as usize] += *minutes;
                if *kind == PayerKind::Payg {
                    let cell = usage.and_then(|u| pricing::video_cell(&f.video_prices, u.fps, u.lines));
                    let key = cell.map_or_else(|| "unpriced".to_string(), |c| c.cell());
                    *g.payg.entry(key).or_default() += *minutes;
                    amount = cell.map(|c| c.price * *minutes);
                }
            }
            self.mark(&mut g.dirty, DirtyKey::Month(pair, mi));
        }
        for (kind, minutes) in &paid {
            self.metrics.billed(pair, tenant.label, f.label, *kind as usize, to_f64(*minutes));
        }
        if let Some(a) = amount {
            self.metrics.payg_amount(pair, tenant.label, f.label, &snap.catalog.currency, to_f64(a));
        }
        drop(r);
        Settled {
            payer: first.unwrap_or(HeaderValue::from_static("payg")),
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
        }
    }

    /// Strict mode: waits until the settlement `seq` is on disk. Batched: returns at once.
    pub async fn durable(&self, seq: u64) {
        if !self.strict {
            return;
        }
        let mut rx = self.durable.subscribe();
        let _ = rx.wait_for(|&d| d >= seq).await;
    }

    /// Commits everything settled so far and waits for it (shutdown, tests).
    pub fn flush(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Flush(tx));
        let _ = rx.recv_timeout(Duration::from_secs(30));
    }

    /// Flushes and stops the writer. Later settlements are kept in memory only.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        self.flush();
        let (tx, _) = mpsc::channel();
        *lock(&self.tx) = tx;
        if let Some(h) = lock(&self.writer).take() {
            let _ = h.join();
        }
    }

    pub fn ledger_name(&self) -> &str {
        &self.ledger_name
    }

    /// Month states of a tenant for a `YYYY-MM` month: (feature id, units per payer, payg units per cell).
    pub fn usage(&self, tenant: &str, month: &str) -> Vec<(&'static str, [Decimal; 5], BTreeMap<String, Decimal>)> {
        let mut out: Vec<_> = self
            .months
            .iter()
            .filter(|e| e.value().tenant == tenant && e.value().month == month)
            .map(|e| {
                let g = lock(&e.value().inner);
                (e.value().feature, g.units, g.payg.clone())
            })
            .collect();
        out.sort_by_key(|x| x.0);
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
                }))
            }
        }
    }

    fn remark(&self, key: DirtyKey) {
        match &key {
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
        self.send(Msg::Dirty(key));
    }
}

/// The writer thread: one ledger transaction per group of dirty records.
fn writer(billing: std::sync::Weak<Billing>, store: Box<dyn LedgerStore>, rx: mpsc::Receiver<Msg>, interval: Duration) {
    let mut keys: HashSet<DirtyKey> = HashSet::new();
    let mut waiters: Vec<mpsc::Sender<()>> = Vec::new();
    loop {
        let Some(strict) = billing.upgrade().map(|b| b.strict) else { return };
        // Strict mode also wakes every 2 ms: a settlement whose record was committed before its
        // sequence number was taken still needs `durable` advanced past that number.
        let first = if strict {
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
        let take = |m: Msg, keys: &mut HashSet<DirtyKey>, waiters: &mut Vec<mpsc::Sender<()>>| match m {
            Msg::Dirty(k) => {
                keys.insert(k);
            }
            Msg::Flush(w) => waiters.push(w),
        };
        match first {
            Some(m) => take(m, &mut keys, &mut waiters),
            None if b.seq.load(Ordering::SeqCst) > *b.durable.borrow() => {}
            None => continue,
        }
        if !b.strict && waiters.is_empty() {
            // Batched: gather for one interval, unless someone asks for a flush meanwhile.
            let deadline = Instant::now() + interval;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                match rx.recv_timeout(left) {
                    Ok(m) => {
                        take(m, &mut keys, &mut waiters);
                        if !waiters.is_empty() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        let target = b.seq.load(Ordering::SeqCst);
        while let Ok(m) = rx.try_recv() {
            take(m, &mut keys, &mut waiters);
        }
        if keys.is_empty() {
            // Every settlement numbered up to `target` is already committed (its record would
            // otherwise be dirty and queued).
            b.durable.send_replace(target);
            for w in waiters.drain(..) {
                let _ = w.send(());
            }
            continue;
        }
        let records: Vec<Record> = keys.iter().filter_map(|k| b.record(k)).collect();
        let started = Instant::now();
        match store.commit(&records) {
            Ok(()) => {
                b.metrics.ledger_flush_duration.observe(started.elapsed().as_secs_f64());
                keys.clear();
                b.durable.send_replace(target);
                for w in waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = records.len(), "ledger commit failed; retrying");
                for k in keys.drain() {
                    b.remark(k);
                }
                drop(b);
                std::thread::sleep(interval.max(Duration::from_millis(50)));
            }
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
        Billing::open(Box::new(store), d, Duration::from_millis(5), Arc::new(Metrics::new(true))).unwrap().0
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
        assert_eq!(usage[0].1[PayerKind::Payg as usize], Decimal::from(15_000));
        let lines = pricing::graduated(&s.catalog.features[f].payg_tiers, Decimal::ZERO, usage[0].2[""]);
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
        let units = &u[0].1;
        assert_eq!(units[PayerKind::GeneralPackage as usize], Decimal::ONE, "the package paid the one minute it held");
        let payg_minutes = u[0].2["fps<=60,lines<=1440"];
        assert_eq!(pricing::round2(payg_minutes * Decimal::from(16)), Decimal::new(2133, 2), "1 min 20 s at 16/min");
        // The whole 2 min 20 s at payg is the seed's 37.33.
        let whole = Decimal::from(140_000) / Decimal::from(60_000) * Decimal::from(16);
        assert_eq!(pricing::round2(whole), Decimal::new(3733, 2));
        // Next call: the package is empty, payg pays from the start.
        let r = b.reserve(&s, &s.tenants[0], f, now).unwrap();
        let settled = b.settle_video(&s, &s.tenants[0], f, r, None, now);
        assert_eq!(settled.payer.to_str().unwrap(), "payg");
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
            b.close();
        }
        let b = open(dir.path(), Durability::Batched);
        let st = b.package(&s.tenants[0], &s.tenants[0].packages[0]);
        assert_eq!(st.consumed(), Decimal::ONE);
        assert!(st.alerted());
        let jan = b.usage("acme", "2026-01");
        let feb = b.usage("acme", "2026-02");
        assert_eq!(jan.len(), 2);
        assert_eq!(feb.len(), 1);
        assert_eq!(feb[0].1[PayerKind::Payg as usize], Decimal::ONE);
        // The package is spent: the next object-detection call falls through to payg.
        assert_eq!(b.reserve(&s, &s.tenants[0], od, t("2026-02-02T00:00:00Z")).unwrap().payer, PayerKind::Payg);
    }
}
