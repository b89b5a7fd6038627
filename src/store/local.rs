//! The local backend (`store = "local"`): token buckets, package balances and holds, monthly
//! usage, image counts, alerts and overrides in process memory (DashMap, one small mutex per
//! record), made durable by a writer thread that group-commits dirty records to the redb ledger
//! ([`crate::ledger`]).
//!
//! The request path hands it deltas, each idempotent on the [`RequestId`]; only the writer turns
//! a record into an absolute value, and only one process writes the ledger. Batched mode commits
//! every `flush_interval`; strict mode commits as soon as a record is dirty and
//! [`Durable::durable`] waits for it at most `strict_timeout`, reverting every delta of the
//! request exactly past it. A failed commit keeps everything in memory, marks the store
//! unhealthy (`/readyz` 503) and is retried (SPEC §7). Every operation answers without
//! suspending (the async trait methods only wrap the synchronous ones).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;
use tokio::sync::watch;

use super::{
    Admit, BalanceStore, BucketKey, Candidate, Durable, ImageStore, MonthUsage, Override, OverrideStore, Quota,
    RateState, RateStore, RequestId, StoreError, Taken, TenantKey, UsageStore, UsageTo,
};
use crate::admission::{BucketStore, LocalBuckets};
use crate::clock::SharedClock;
use crate::config::gateway::{Durability, ImageOp};
use crate::config::Dec;
use crate::ledger::{self, LedgerError, LedgerStore, MonthRecord, PackageRecord, Record};
use crate::metrics::Metrics;
use crate::units;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How long the idempotency markers of settled requests are kept: a repeat of a request id
/// within it is a no-op. Locally every request settles once, at once, so this only bounds the
/// memory of the markers (the gateway sweeps every 5 s).
pub const DONE_TTL: Duration = Duration::from_secs(30);
const DONE_TTL_NANOS: i64 = 30 * 1_000_000_000;

#[derive(Default)]
struct PkgInner {
    /// Committed micro-points.
    consumed: i64,
    /// Of `consumed`, what the last successful ledger commit wrote (strict mode's low-balance
    /// check: a charge settled but not yet durable may still be reverted).
    on_disk: i64,
    /// Micro-points held by calls in flight.
    held: i64,
    alerted: bool,
    dirty: bool,
    /// Counts the changes of `consumed`: a charge's delta remembers the number its change got,
    /// so that its revert knows whether a read of the record for the ledger held it.
    version: u64,
    /// `version` when the writer last read the record for a commit, and the points of charges
    /// in that read reverted since (the commit, if it lands, writes them all the same).
    read_version: u64,
    read_reverted: i64,
    /// The same of what the last successful commit wrote: `on_disk - on_disk_reverted` is the
    /// consumption that stands on disk once the reverts reach it (a strict charge reverted
    /// while the commit that held it was still on its way, SPEC §7).
    on_disk_version: u64,
    on_disk_reverted: i64,
}

struct Pkg {
    tenant: String,
    id: String,
    inner: Mutex<PkgInner>,
}

struct Hold {
    pkg: Arc<Pkg>,
    index: usize,
    points: i64,
    expires: i64,
}

/// A month's pay-as-you-go units per price cell, sorted by cell. A month nearly always has one
/// cell (the empty name of a per-call feature), which is held in place: in a `BTreeMap` its node
/// was one more line to fetch per settlement, a cold one when many tenants take turns (two more
/// misses of a 1 MiB L2 per call with 10,000 tenants under callgrind's cache model).
#[derive(Default)]
struct Cells(SmallVec<[(String, i64); 1]>);

impl Cells {
    fn find(&self, cell: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(c, _)| c.as_str().cmp(cell))
    }

    fn get(&self, cell: &str) -> Option<i64> {
        self.find(cell).ok().map(|i| self.0[i].1)
    }

    /// Adds `n` units to `cell`; its name is allocated once, when the month first uses it.
    fn add(&mut self, cell: &str, n: i64) {
        match self.find(cell) {
            Ok(i) => self.0[i].1 += n,
            Err(i) => self.0.insert(i, (cell.to_string(), n)),
        }
    }

    /// Takes `n` units of `cell` back; a cell left at zero goes.
    fn take_back(&mut self, cell: &str, n: i64) {
        if let Ok(i) = self.find(cell) {
            self.0[i].1 -= n;
            if self.0[i].1 == 0 {
                self.0.remove(i);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&String, i64)> {
        self.0.iter().map(|(c, n)| (c, *n))
    }
}

impl FromIterator<(String, i64)> for Cells {
    /// From a map's cells (each once).
    fn from_iter<I: IntoIterator<Item = (String, i64)>>(cells: I) -> Self {
        let mut v: SmallVec<[(String, i64); 1]> = cells.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Cells(v)
    }
}

struct MonthInner {
    units: [i64; 5],
    payg: Cells,
    unpaid: i64,
    dirty: bool,
}

struct Month {
    tenant: String,
    feature: String,
    month: String,
    inner: Mutex<MonthInner>,
}

struct ImgInner {
    count: u64,
    held: u64,
    dirty: bool,
}

struct Img {
    tenant: String,
    inner: Mutex<ImgInner>,
}

/// A record changed since the writer last committed it: its state itself, so that the writer
/// reads it without a map lookup (states are never removed from their maps).
enum Dirty {
    Package(Arc<Pkg>),
    Month(Arc<Month>),
    Image(Arc<Img>),
}

impl Dirty {
    /// The state's address: what the writer's set of dirty records is keyed on.
    fn addr(&self) -> usize {
        match self {
            Dirty::Package(p) => Arc::as_ptr(p) as usize,
            Dirty::Month(m) => Arc::as_ptr(m) as usize,
            Dirty::Image(i) => Arc::as_ptr(i) as usize,
        }
    }
}

enum Msg {
    /// A record was queued while the writer waited for work ([`Queues::idle`]).
    Wake,
    Flush(mpsc::Sender<()>),
    Stop,
}

/// One thread's records marked dirty since the writer last took them.
type List = Arc<Mutex<Vec<Dirty>>>;

/// The records each thread marked dirty, in a list per thread, which the writer takes at each
/// commit ("per-core settlement accumulators feeding one ledger writer", issue 14). With many
/// tenants nearly every settlement queues a record; through one channel, every settlement of
/// every core wrote the channel's tail, one cache line passed from core to core per call. A
/// thread's list is written by that thread, and by the writer once per commit.
#[derive(Default)]
struct Queues {
    lists: Mutex<Vec<(std::thread::ThreadId, List)>>,
    /// True while the writer waits for work: the thread that queues a record then wakes it
    /// (once: the first to swap it back to false).
    idle: AtomicBool,
}

impl Queues {
    /// The calling thread's list, made on its first record.
    fn this_threads(&self) -> List {
        let me = std::thread::current().id();
        let mut lists = lock(&self.lists);
        if let Some((_, l)) = lists.iter().find(|(t, _)| *t == me) {
            return l.clone();
        }
        let l = List::default();
        lists.push((me, l.clone()));
        l
    }

    /// Moves every queued record into `keys` (each once, by its state's address). A list no
    /// thread holds any more (its thread ended) is dropped once taken.
    fn take_all(&self, keys: &mut HashMap<usize, Dirty, FxBuildHasher>, spare: &mut Vec<Dirty>) {
        lock(&self.lists).retain(|(_, l)| {
            std::mem::swap(&mut *lock(l), spare);
            for d in spare.drain(..) {
                keys.entry(d.addr()).or_insert(d);
            }
            // Counted under `lists`' lock, where a thread gets its list: 1 is ours alone.
            Arc::strong_count(l) > 1
        });
    }
}

/// One delta a request applied (strict mode keeps them until durable, to revert exactly).
enum Delta {
    /// (package, micro-points, the package's `version` after the change).
    Consumed(Arc<Pkg>, i64, u64),
    Usage {
        month: Arc<Month>,
        to: UsageTo,
        cell: Option<String>,
        units: i64,
        slot: u8,
    },
}

struct Pending {
    seq: u64,
    deltas: Vec<Delta>,
}

/// [`LocalStore::close`] could not commit everything: `records` ledger records stay unwritten.
#[derive(Debug, thiserror::Error)]
#[error("{records} ledger record(s) could not be flushed to {ledger}")]
pub struct Unflushed {
    pub records: usize,
    pub ledger: String,
}

pub struct LocalStore {
    buckets: LocalBuckets,
    packages: DashMap<u64, Arc<Pkg>, FxBuildHasher>,
    holds: DashMap<RequestId, Hold, FxBuildHasher>,
    months: DashMap<(u64, u32), Arc<Month>, FxBuildHasher>,
    images: DashMap<u32, Arc<Img>, FxBuildHasher>,
    /// Image slots of adds in flight. No lease (as for a local package hold): a slot lives as
    /// long as its call, however long (any `upstream_timeout_ms` is accepted locally, a streamed
    /// gRPC answer is settled at its trailers), and its guard's drop gives it back
    /// synchronously. A slot the sweep gave back after 10 minutes let another add take it while
    /// its own add was still upstream: the instance then ended over its capacity.
    slots: DashMap<RequestId, Arc<Img>, FxBuildHasher>,
    /// (request, usage slot) already added.
    usage_done: UsageDone,
    takes: DashMap<RequestId, (Vec<Taken>, i64), FxBuildHasher>,
    images_done: DashMap<RequestId, (u64, i64), FxBuildHasher>,
    overrides: Mutex<Vec<(String, String, Override)>>,
    /// Strict mode: the deltas of each request not yet known durable.
    pending: DashMap<RequestId, Pending, FxBuildHasher>,
    clock: SharedClock,
    tx: mpsc::Sender<Msg>,
    queues: Arc<Queues>,
    /// Strict mode: the number of the latest change remembered; `durable` says how far the
    /// commits reached (batched mode numbers nothing: no settlement waits for a commit).
    seq: AtomicU64,
    durable: watch::Sender<u64>,
    strict: bool,
    strict_timeout: Duration,
    healthy: AtomicBool,
    metrics: Arc<Metrics>,
    ledger_name: String,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Records of the commit the writer is making (marked clean, not yet on disk): unflushed
    /// for `close` if the writer is still in it at its deadline.
    committing: std::sync::atomic::AtomicUsize,
    closed: AtomicBool,
    /// Tells this store from another in a thread's memo of its last month ([`LocalStore::with_month`]).
    id: u64,
}

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

/// `YYYY-MM` as a month index (`year × 12 + month0`).
pub fn month_index_of(s: &str) -> Option<u32> {
    // The form the gateway writes, without the general parse (settlements pass it per call).
    if let &[y0, y1, y2, y3, b'-', m0, m1] = s.as_bytes() {
        let digits = [y0, y1, y2, y3, m0, m1];
        if digits.iter().all(u8::is_ascii_digit) {
            let n = |d: &[u8]| d.iter().fold(0u32, |n, &b| n * 10 + u32::from(b - b'0'));
            let (y, m) = (n(&digits[..4]), n(&digits[4..]));
            return (1..=12).contains(&m).then_some(y * 12 + m - 1);
        }
    }
    let (y, m) = s.split_once('-')?;
    let (y, m): (u32, u32) = (y.parse().ok()?, m.parse().ok()?);
    (1..=12).contains(&m).then_some(y * 12 + m - 1)
}

fn usage_slot(to: UsageTo) -> u8 {
    match to {
        UsageTo::Payer(k) => k as u8,
        UsageTo::Unpaid => 5,
    }
}

/// The markers of the usage a request added, one bit per (request, usage slot), each kept at
/// least [`DONE_TTL`] after it was set. One entry holds the bits of 8 consecutive request ids:
/// ids come from per-thread blocks ([`crate::store::RequestIds`]), so a thread's calls share an
/// entry, most often still in the cache from its call before. One entry per request made every
/// settlement a cache miss into a table of ~30 s of traffic (a million entries at 35k calls/s).
struct UsageDone(DashMap<u128, (u64, i64), FxBuildHasher>);

impl Default for UsageDone {
    /// Every settlement writes here (a shard's write lock and its table), from every core: 256
    /// shards, so two cores' settlements rarely meet in one (the default is 4 per CPU).
    fn default() -> Self {
        UsageDone(DashMap::with_hasher_and_shard_amount(FxBuildHasher, 256))
    }
}

impl UsageDone {
    fn at(id: RequestId, slot: u8) -> (u128, u64) {
        (id.0 >> 3, 1 << ((id.0 & 7) as u32 * 8 + u32::from(slot)))
    }

    /// Marks (request, slot), to expire at `expires` at the earliest; false when it already was.
    fn mark(&self, id: RequestId, slot: u8, expires: i64) -> bool {
        let (key, bit) = Self::at(id, slot);
        let mut e = self.0.entry(key).or_insert((0, expires));
        if e.0 & bit != 0 {
            return false;
        }
        e.0 |= bit;
        e.1 = e.1.max(expires);
        true
    }

    /// Takes a marker back (a reverted delta may be applied again).
    fn unmark(&self, id: RequestId, slot: u8) {
        let (key, bit) = Self::at(id, slot);
        self.0.remove_if_mut(&key, |_, e| {
            e.0 &= !bit;
            e.0 == 0
        });
    }

    fn sweep(&self, now: i64) {
        self.0.retain(|_, e| e.1 > now);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.0.iter().map(|e| e.0.count_ones() as usize).sum()
    }
}

fn dec_i64(d: Dec) -> i64 {
    i64::try_from(d.0.round()).unwrap_or(0)
}

impl LocalStore {
    /// Loads the ledger and starts the writer thread. `video` tells which features count video
    /// usage: ledger records written before integer units kept decimal minutes for them.
    pub fn open(
        store: Box<dyn LedgerStore>,
        durability: Durability,
        flush_interval: Duration,
        strict_timeout: Duration,
        metrics: Arc<Metrics>,
        clock: SharedClock,
        video: &dyn Fn(&str) -> bool,
    ) -> Result<Arc<LocalStore>, LedgerError> {
        let records = store.load()?;
        let (tx, rx) = mpsc::channel();
        let s = Arc::new(LocalStore {
            buckets: LocalBuckets::new(clock.clone()),
            packages: DashMap::with_hasher(FxBuildHasher),
            holds: DashMap::with_hasher(FxBuildHasher),
            months: DashMap::with_hasher(FxBuildHasher),
            images: DashMap::with_hasher(FxBuildHasher),
            slots: DashMap::with_hasher(FxBuildHasher),
            usage_done: UsageDone::default(),
            takes: DashMap::with_hasher(FxBuildHasher),
            images_done: DashMap::with_hasher(FxBuildHasher),
            overrides: Mutex::new(Vec::new()),
            pending: DashMap::with_hasher(FxBuildHasher),
            clock,
            tx,
            queues: Arc::default(),
            seq: AtomicU64::new(0),
            durable: watch::Sender::new(0),
            strict: durability == Durability::Strict,
            strict_timeout,
            healthy: AtomicBool::new(true),
            metrics,
            ledger_name: store.describe(),
            writer: Mutex::new(None),
            committing: std::sync::atomic::AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            id: crate::intern::instance_id(),
        });
        for r in records {
            match r {
                Record::Package(p) => {
                    let (t, tl) = crate::intern::tenant(&p.tenant);
                    let (id, _) = crate::intern::package(&p.id);
                    let st = s.pkg(TenantKey { name: tl, local: t }, crate::intern::pair(t, id), &p.id);
                    let mut g = lock(&st.inner);
                    // Exact for every value written since integer units (at most 6 decimals).
                    g.consumed = i64::try_from((p.consumed.0 * rust_decimal::Decimal::from(units::MICRO)).round())
                        .unwrap_or(i64::MAX);
                    g.on_disk = g.consumed;
                    g.alerted = p.alerted;
                }
                Record::Month(m) => {
                    let Some(mi) = month_index_of(&m.month) else { continue };
                    let (t, tl) = crate::intern::tenant(&m.tenant);
                    let (f, fl) = crate::intern::feature(&m.feature);
                    let key = BucketKey { tenant: tl, bucket: fl, local: crate::intern::pair(t, f) };
                    let st = s.month_state(key, mi, &m.month);
                    let conv =
                        |d: Dec| if !m.integer && video(&m.feature) { units::minutes_to_ms(d.0) } else { dec_i64(d) };
                    let mut g = lock(&st.inner);
                    for (i, u) in m.units.iter().enumerate() {
                        g.units[i] = conv(*u);
                    }
                    g.payg = m.payg.iter().map(|(k, v)| (k.clone(), conv(*v))).collect();
                    g.unpaid = conv(m.unpaid);
                }
                Record::ImageCount(i) => {
                    let (t, tl) = crate::intern::tenant(&i.tenant);
                    lock(&s.img(TenantKey { name: tl, local: t }).inner).count = i.count;
                }
            }
        }
        let weak = Arc::downgrade(&s);
        let handle = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn({
                let queues = s.queues.clone();
                move || writer(weak, &queues, store, rx, flush_interval)
            })
            .map_err(|e| LedgerError::Write { path: "ledger-writer".into(), reason: e.to_string() })?;
        *lock(&s.writer) = Some(handle);
        Ok(s)
    }

    fn send(&self, msg: Msg) {
        // Fails only after close(): the change then stays in memory (and counts as unflushed).
        let _ = self.tx.send(msg);
    }

    /// Queues a record for the writer when it was clean (once per commit, however often it
    /// changes meanwhile), in this thread's list ([`Queues`]).
    fn mark(&self, dirty: &mut bool, record: impl FnOnce() -> Dirty) {
        if *dirty {
            return;
        }
        *dirty = true;
        type Mine = Option<(u64, List)>;
        thread_local! {
            // The thread's list in the store it queued into last (told apart by the store's id).
            static MINE: Cell<Mine> = const { Cell::new(None) };
        }
        MINE.with(|mine| {
            let list = match mine.take() {
                Some((id, l)) if id == self.id => l,
                _ => self.queues.this_threads(),
            };
            lock(&list).push(record());
            mine.set(Some((self.id, list)));
        });
        // After the push: a writer that saw no record before it began to wait reads true here.
        if self.queues.idle.load(Ordering::SeqCst) && self.queues.idle.swap(false, Ordering::SeqCst) {
            self.send(Msg::Wake);
        }
    }

    /// Strict mode: remembers a delta of `id` until [`Durable::durable`] settles it (made only
    /// then: batched mode allocates nothing for it).
    fn remember(&self, id: RequestId, d: impl FnOnce() -> Delta) {
        if !self.strict {
            return;
        }
        let d = d();
        let seq = self.seq.fetch_add(1, Ordering::SeqCst) + 1;
        let mut e = self.pending.entry(id).or_insert_with(|| Pending { seq, deltas: Vec::new() });
        e.seq = e.seq.max(seq);
        e.deltas.push(d);
    }

    fn pkg(&self, tenant: TenantKey<'_>, key: u64, id: &str) -> Arc<Pkg> {
        get_or_insert(&self.packages, key, || Pkg {
            tenant: tenant.name.to_string(),
            id: id.to_string(),
            inner: Mutex::new(PkgInner::default()),
        })
    }

    /// Calls `f` with the state of `key`'s month `mi`: the thread's last one again without the
    /// map (a `DashMap` read takes its shard's lock and the `Arc`'s count, writes to cache lines
    /// that every core settling the same pair writes too). Months are never removed from the
    /// map, so the one remembered is the map's as long as the store lives.
    fn with_month<R>(&self, key: BucketKey<'_>, mi: u32, month: &str, f: impl FnOnce(&Arc<Month>) -> R) -> R {
        type Last = Option<(u64, (u64, u32), Arc<Month>)>;
        thread_local! {
            static LAST: Cell<Last> = const { Cell::new(None) };
        }
        let want = (key.local, mi);
        LAST.with(|last| {
            // Taken out while `f` runs (and put back after), so `f` may use months itself.
            let st = match last.take() {
                Some((id, k, st)) if id == self.id && k == want => st,
                _ => self.month_state(key, mi, month),
            };
            let r = f(&st);
            last.set(Some((self.id, want, st)));
            r
        })
    }

    fn month_state(&self, key: BucketKey<'_>, mi: u32, month: &str) -> Arc<Month> {
        get_or_insert(&self.months, (key.local, mi), || Month {
            tenant: key.tenant.to_string(),
            feature: key.bucket.to_string(),
            month: month.to_string(),
            inner: Mutex::new(MonthInner { units: [0; 5], payg: Cells::default(), unpaid: 0, dirty: false }),
        })
    }

    fn img(&self, tenant: TenantKey<'_>) -> Arc<Img> {
        get_or_insert(&self.images, tenant.local, || Img {
            tenant: tenant.name.to_string(),
            inner: Mutex::new(ImgInner { count: 0, held: 0, dirty: false }),
        })
    }

    // ---- rate ----

    pub fn admit_now(&self, key: BucketKey<'_>, q: Quota) -> Admit {
        self.buckets.admit(key.local, q.limit, q.depth)
    }

    pub fn refund_now(&self, key: BucketKey<'_>, q: Quota) {
        self.buckets.refund(key.local, q.limit, q.depth)
    }

    /// The bucket as it is, nothing taken or written (see [`RateStore::peek`]).
    pub fn peek_now(&self, key: BucketKey<'_>, q: Quota) -> RateState {
        self.buckets.peek(key.local, q.limit, q.depth)
    }

    /// Drops one pair's bucket (a reload removed its tenant or feature).
    pub fn remove_bucket(&self, pair: u64) {
        self.buckets.remove(pair)
    }

    pub fn bucket_count(&self) -> usize {
        self.buckets.len()
    }

    // ---- balances ----

    pub fn reserve_now(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
        lease: Duration,
    ) -> Option<usize> {
        if let Some(h) = self.holds.get(&id) {
            return Some(h.index);
        }
        let lease = i64::try_from(lease.as_nanos()).unwrap_or(i64::MAX);
        for (i, c) in candidates.iter().enumerate() {
            let pkg = self.pkg(tenant, c.local, c.id);
            let mut g = lock(&pkg.inner);
            if crate::payer::pays_whole(c.points - g.consumed - g.held, want) {
                g.held += want;
                drop(g);
                let expires = self.clock.unix_nanos().saturating_add(lease);
                self.holds.insert(id, Hold { pkg, index: i, points: want, expires });
                return Some(i);
            }
        }
        None
    }

    pub fn commit_now(&self, id: RequestId) -> Option<i64> {
        let (_, h) = self.holds.remove(&id)?;
        let mut g = lock(&h.pkg.inner);
        g.held -= h.points;
        g.consumed += h.points;
        g.version += 1;
        let (consumed, version) = (g.consumed, g.version);
        self.mark(&mut g.dirty, || Dirty::Package(h.pkg.clone()));
        drop(g);
        self.remember(id, || Delta::Consumed(h.pkg, h.points, version));
        Some(consumed)
    }

    pub fn release_now(&self, id: RequestId) {
        if let Some((_, h)) = self.holds.remove(&id) {
            lock(&h.pkg.inner).held -= h.points;
        }
    }

    pub fn take_now(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
    ) -> Vec<Taken> {
        if let Some(t) = self.takes.get(&id) {
            return t.0.clone();
        }
        let mut left = want.max(0);
        let mut out = Vec::with_capacity(candidates.len());
        for c in candidates {
            let pkg = self.pkg(tenant, c.local, c.id);
            let mut g = lock(&pkg.inner);
            let available = (c.points - g.consumed - g.held).max(0);
            let taken = available.min(left);
            if taken > 0 {
                g.consumed += taken;
                g.version += 1;
                left -= taken;
                self.mark(&mut g.dirty, || Dirty::Package(pkg.clone()));
            }
            let (consumed, version) = (g.consumed, g.version);
            drop(g);
            if taken > 0 {
                self.remember(id, || Delta::Consumed(pkg, taken, version));
            }
            out.push(Taken { taken, consumed });
        }
        self.takes.insert(id, (out.clone(), self.clock.unix_nanos().saturating_add(DONE_TTL_NANOS)));
        out
    }

    pub fn consumed_now(&self, tenant: TenantKey<'_>, package: Candidate<'_>) -> i64 {
        lock(&self.pkg(tenant, package.local, package.id).inner).consumed
    }

    pub fn alerted_now(&self, tenant: TenantKey<'_>, package: Candidate<'_>) -> bool {
        lock(&self.pkg(tenant, package.local, package.id).inner).alerted
    }

    /// Marks the package's low-balance alert fired; true only the first time.
    pub fn mark_alerted_now(&self, tenant: TenantKey<'_>, package: Candidate<'_>) -> bool {
        self.mark_alerted_if_low_now(tenant, package, |_| true).is_some()
    }

    /// Marks the package's low-balance alert fired if it was not yet and `low` holds for its
    /// consumption on disk (what the last successful commit wrote, less the charges in it
    /// reverted since: their revert is the next commit's; read and marked under the package's
    /// lock); returns that consumption when it marked it. Strict mode calls it once a charge is
    /// durable: neither a reverted charge nor one settled since and still waiting (which may yet
    /// be reverted) counts, and the mark is never a charge's delta.
    pub fn mark_alerted_if_low_now(
        &self,
        tenant: TenantKey<'_>,
        package: Candidate<'_>,
        low: impl FnOnce(i64) -> bool,
    ) -> Option<i64> {
        let pkg = self.pkg(tenant, package.local, package.id);
        let mut g = lock(&pkg.inner);
        let stands = g.on_disk - g.on_disk_reverted;
        if g.alerted || !low(stands) {
            return None;
        }
        g.alerted = true;
        self.mark(&mut g.dirty, || Dirty::Package(pkg.clone()));
        Some(stands)
    }

    /// Gives back expired holds, and forgets expired idempotency markers.
    pub fn sweep_now(&self) -> u64 {
        let now = self.clock.unix_nanos();
        let expired: Vec<RequestId> = self.holds.iter().filter(|h| h.expires <= now).map(|h| *h.key()).collect();
        let mut n = 0;
        for id in expired {
            if self.holds.remove_if(&id, |_, h| h.expires <= now).is_some_and(|(_, h)| {
                lock(&h.pkg.inner).held -= h.points;
                true
            }) {
                n += 1;
            }
        }
        self.usage_done.sweep(now);
        self.takes.retain(|_, (_, exp)| *exp > now);
        self.images_done.retain(|_, (_, exp)| *exp > now);
        n
    }

    // ---- usage ----

    pub fn add_usage_now(
        &self,
        key: BucketKey<'_>,
        month: &str,
        to: UsageTo,
        n: i64,
        cell: &str,
        id: RequestId,
    ) -> i64 {
        let mi = month_index_of(month).unwrap_or(0);
        self.with_month(key, mi, month, |st| self.add_usage_to(st, to, n, cell, id))
    }

    fn add_usage_to(&self, st: &Arc<Month>, to: UsageTo, n: i64, cell: &str, id: RequestId) -> i64 {
        let slot = usage_slot(to);
        let fresh = self.usage_done.mark(id, slot, self.clock.unix_nanos().saturating_add(DONE_TTL_NANOS));
        let mut g = lock(&st.inner);
        if fresh && n != 0 {
            match to {
                UsageTo::Payer(k) => g.units[k as usize] += n,
                UsageTo::Unpaid => g.unpaid += n,
            }
            if to == UsageTo::Payer(crate::payer::PayerKind::Payg) {
                g.payg.add(cell, n);
            }
            self.mark(&mut g.dirty, || Dirty::Month(st.clone()));
        }
        let total = match to {
            UsageTo::Payer(crate::payer::PayerKind::Payg) => g.payg.get(cell).unwrap_or(0),
            UsageTo::Payer(k) => g.units[k as usize],
            UsageTo::Unpaid => g.unpaid,
        };
        drop(g);
        if fresh && n != 0 {
            self.remember(id, || {
                let cell = (to == UsageTo::Payer(crate::payer::PayerKind::Payg)).then(|| cell.to_string());
                Delta::Usage { month: st.clone(), to, cell, units: n, slot }
            });
        }
        total
    }

    /// A tenant's usage of a `YYYY-MM` month, per feature, sorted by feature id.
    pub fn month_now(&self, tenant: &str, month: &str) -> Vec<MonthUsage> {
        let mut out: Vec<MonthUsage> = self
            .months
            .iter()
            .filter(|e| e.value().tenant == tenant && e.value().month == month)
            .map(|e| {
                let g = lock(&e.value().inner);
                MonthUsage {
                    feature: e.value().feature.clone(),
                    units: g.units,
                    payg: g.payg.iter().map(|(c, n)| (c.clone(), n)).collect(),
                    unpaid: g.unpaid,
                }
            })
            .collect();
        out.sort_by(|a, b| a.feature.cmp(&b.feature));
        out
    }

    // ---- images ----

    pub fn reserve_image_slot_now(&self, tenant: TenantKey<'_>, capacity: u64, id: RequestId) -> bool {
        if self.slots.contains_key(&id) {
            return true;
        }
        let img = self.img(tenant);
        let mut g = lock(&img.inner);
        if g.count + g.held >= capacity {
            return false;
        }
        g.held += 1;
        drop(g);
        self.slots.insert(id, img);
        true
    }

    pub fn settle_images_now(&self, tenant: TenantKey<'_>, op: ImageOp, id: RequestId, reported: Option<u64>) -> u64 {
        if let Some(done) = self.images_done.get(&id) {
            return done.0;
        }
        let held = self.slots.remove(&id).map(|(_, img)| img);
        let img = held.clone().unwrap_or_else(|| self.img(tenant));
        let mut g = lock(&img.inner);
        let before = g.count;
        if held.is_some() {
            g.held = g.held.saturating_sub(1);
        }
        match op {
            // The upstream added it: it counts, with or without a slot (as on Redis).
            ImageOp::Add => g.count += 1,
            ImageOp::Delete => g.count = g.count.saturating_sub(1),
            ImageOp::Search => {}
        }
        if let Some(n) = reported {
            g.count = n;
        }
        if g.count != before {
            self.mark(&mut g.dirty, || Dirty::Image(img.clone()));
        }
        let count = g.count;
        drop(g);
        self.images_done.insert(id, (count, self.clock.unix_nanos().saturating_add(DONE_TTL_NANOS)));
        count
    }

    pub fn release_image_slot_now(&self, id: RequestId) {
        if let Some((_, img)) = self.slots.remove(&id) {
            let mut g = lock(&img.inner);
            g.held = g.held.saturating_sub(1);
        }
    }

    pub fn image_count_now(&self, tenant: TenantKey<'_>) -> u64 {
        self.images.get(&tenant.local).map_or(0, |i| lock(&i.inner).count)
    }

    // ---- overrides ----

    pub fn put_override_now(&self, tenant: &str, feature: &str, ov: Override) {
        let mut all = lock(&self.overrides);
        let item = (tenant.to_string(), feature.to_string(), ov);
        if !all.contains(&item) {
            all.push(item);
            all.sort_by(|a, b| (&a.0, &a.1, a.2.from).cmp(&(&b.0, &b.1, b.2.from)));
        }
    }

    pub fn overrides_now(&self) -> Vec<(String, String, Override)> {
        lock(&self.overrides).clone()
    }

    // ---- durability ----

    /// Takes every delta of `id` back out of memory, exactly; the records are marked dirty, so
    /// the reverted state is what the writer commits next. (Low-balance alerts are not deltas:
    /// strict mode marks them only once a charge is durable.)
    fn revert(&self, deltas: Vec<Delta>, id: RequestId) {
        for d in deltas {
            match d {
                Delta::Consumed(pkg, n, version) => {
                    let mut g = lock(&pkg.inner);
                    g.consumed -= n;
                    g.version += 1;
                    // A read for a commit (the one on its way, or the last one written) made
                    // after the charge holds it: it counts as reverted there until the next.
                    if version <= g.read_version {
                        g.read_reverted += n;
                    }
                    if version <= g.on_disk_version {
                        g.on_disk_reverted += n;
                    }
                    self.mark(&mut g.dirty, || Dirty::Package(pkg.clone()));
                }
                Delta::Usage { month, to, cell, units: n, slot } => {
                    let mut g = lock(&month.inner);
                    match to {
                        UsageTo::Payer(k) => g.units[k as usize] -= n,
                        UsageTo::Unpaid => g.unpaid -= n,
                    }
                    if let Some(cell) = cell {
                        g.payg.take_back(&cell, n);
                    }
                    self.mark(&mut g.dirty, || Dirty::Month(month.clone()));
                    drop(g);
                    self.usage_done.unmark(id, slot);
                }
            }
        }
        self.takes.remove(&id);
    }

    pub async fn durable_now(&self, id: RequestId) -> Result<(), StoreError> {
        let Some((_, Pending { seq, deltas })) = self.pending.remove(&id) else { return Ok(()) };
        let mut rx = self.durable.subscribe();
        let on_disk =
            tokio::time::timeout(self.strict_timeout, rx.wait_for(|&d| d >= seq)).await.is_ok_and(|r| r.is_ok());
        drop(rx);
        if on_disk {
            return Ok(());
        }
        // Timed out, or the writer is gone (closed): not durable.
        self.revert(deltas, id);
        Err(StoreError::NotDurable { timeout_ms: u64::try_from(self.strict_timeout.as_millis()).unwrap_or(u64::MAX) })
    }

    /// False while ledger commits fail; true again once one succeeds.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    pub fn is_strict(&self) -> bool {
        self.strict
    }

    pub fn ledger_name(&self) -> &str {
        &self.ledger_name
    }

    /// Commits everything settled so far and waits for it, at most `wait`; true when on disk.
    pub fn flush_within(&self, wait: Duration) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Msg::Flush(tx));
        if let Some(h) = lock(&self.writer).as_ref() {
            h.thread().unpark(); // the writer may be parked in its gather window
        }
        rx.recv_timeout(wait).is_ok()
    }

    /// Flushes (waiting at most `wait`), then stops the writer with a last commit attempt.
    /// Reports how many records could not be written; later changes stay in memory only.
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

    fn unflushed(&self) -> usize {
        self.committing.load(Ordering::SeqCst)
            + self.packages.iter().filter(|e| lock(&e.value().inner).dirty).count()
            + self.months.iter().filter(|e| lock(&e.value().inner).dirty).count()
            + self.images.iter().filter(|e| lock(&e.value().inner).dirty).count()
    }
}

impl Dirty {
    /// Writes the record as it is now into `into`, and marks it clean: a change after this
    /// queues it again. `into` is a record of an earlier commit, reused: its names are
    /// overwritten in place (`clone_from` keeps their buffers) and its price cells too when
    /// they are the same cells, so a commit allocates nothing per record once its records have
    /// been seen (with 10,000 tenants each commit writes ~100 distinct records; built anew,
    /// each cost four allocations and their frees).
    fn record_into(&self, into: &mut Record) {
        match (self, into) {
            (Dirty::Package(st), Record::Package(r)) => {
                let mut g = lock(&st.inner);
                g.dirty = false;
                // Every charge reverted so far is out of this read.
                (g.read_version, g.read_reverted) = (g.version, 0);
                r.tenant.clone_from(&st.tenant);
                r.id.clone_from(&st.id);
                r.consumed = Dec(units::from_micro(g.consumed));
                r.alerted = g.alerted;
            }
            (Dirty::Image(st), Record::ImageCount(r)) => {
                let mut g = lock(&st.inner);
                g.dirty = false;
                r.tenant.clone_from(&st.tenant);
                r.count = g.count;
            }
            (Dirty::Month(st), Record::Month(r)) => {
                let mut g = lock(&st.inner);
                g.dirty = false;
                let d = |v: i64| Dec(rust_decimal::Decimal::from(v));
                r.tenant.clone_from(&st.tenant);
                r.feature.clone_from(&st.feature);
                r.month.clone_from(&st.month);
                r.units = g.units.map(d);
                if r.payg.keys().eq(g.payg.iter().map(|(c, _)| c)) {
                    for (to, (_, from)) in r.payg.values_mut().zip(g.payg.iter()) {
                        *to = d(from);
                    }
                } else {
                    r.payg = g.payg.iter().map(|(c, n)| (c.clone(), d(n))).collect();
                }
                r.unpaid = d(g.unpaid);
                r.integer = true;
            }
            (_, into) => *into = self.record(),
        }
    }

    /// The record as it is now, marked clean: a change after this queues it again.
    fn record(&self) -> Record {
        let (name, zero) = (String::new, Dec(rust_decimal::Decimal::ZERO));
        let mut r = match self {
            Dirty::Package(_) => {
                Record::Package(PackageRecord { tenant: name(), id: name(), consumed: zero, alerted: false })
            }
            Dirty::Image(_) => Record::ImageCount(ledger::ImageCountRecord { tenant: name(), count: 0 }),
            Dirty::Month(_) => Record::Month(MonthRecord {
                tenant: name(),
                feature: name(),
                month: name(),
                units: [zero; 5],
                payg: Default::default(),
                unpaid: zero,
                integer: true,
            }),
        };
        self.record_into(&mut r);
        r
    }

    /// Marks the record dirty again after a failed commit (the writer keeps it).
    fn redirty(&self) {
        match self {
            Dirty::Package(st) => lock(&st.inner).dirty = true,
            Dirty::Month(st) => lock(&st.inner).dirty = true,
            Dirty::Image(st) => lock(&st.inner).dirty = true,
        }
    }
}

/// The writer thread: one ledger transaction per group of dirty records. A failed commit keeps
/// every record in memory, marked dirty, and is retried; the first failure of a spell is logged
/// as an error and makes the store unhealthy (`/readyz` 503) until a commit succeeds again.
fn writer(
    store: std::sync::Weak<LocalStore>,
    queues: &Queues,
    ledger: Box<dyn LedgerStore>,
    rx: mpsc::Receiver<Msg>,
    interval: Duration,
) {
    // The records to commit, each once: by their state's address (the `Arc` keeps it theirs).
    let mut keys: HashMap<usize, Dirty, FxBuildHasher> = HashMap::default();
    let mut spare: Vec<Dirty> = Vec::new();
    // The records of the commits so far, rewritten in place by the next ([`Dirty::record_into`]):
    // as many as the largest commit had, each a copy of a record the store holds anyway.
    let mut records: Vec<Record> = Vec::new();
    let mut waiters: Vec<mpsc::Sender<()>> = Vec::new();
    let mut stop = false;
    let mut failures: u64 = 0;
    let take = |m: Msg, waiters: &mut Vec<mpsc::Sender<()>>, stop: &mut bool| match m {
        Msg::Wake => {}
        Msg::Flush(w) => waiters.push(w),
        Msg::Stop => *stop = true,
    };
    loop {
        let Some(strict) = store.upgrade().map(|b| b.strict) else { return };
        // Waits only when no thread has queued a record: idle first, then a last look, so a
        // record queued after the look finds the writer idle and wakes it.
        queues.idle.store(true, Ordering::SeqCst);
        queues.take_all(&mut keys, &mut spare);
        let first = if !keys.is_empty() {
            None
        } else if strict || failures > 0 {
            // Strict mode also wakes every 2 ms: a settlement whose record was committed before
            // its sequence number was taken still needs `durable` advanced past that number.
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
        queues.idle.store(false, Ordering::SeqCst);
        let Some(b) = store.upgrade() else { return };
        match first {
            Some(m) => take(m, &mut waiters, &mut stop),
            None if !keys.is_empty() || b.seq.load(Ordering::SeqCst) > *b.durable.borrow() => {}
            None => continue,
        }
        if !b.strict && waiters.is_empty() && !stop && failures == 0 {
            // Batched: gather for one interval, parked instead of waking for each record (with
            // many tenants nearly every settlement queues one, and a wake-up each cost a context
            // switch per request); `flush_within` and `close` unpark it.
            let deadline = Instant::now() + interval;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                std::thread::park_timeout(left);
                while let Ok(m) = rx.try_recv() {
                    take(m, &mut waiters, &mut stop);
                }
                if !waiters.is_empty() || stop {
                    break;
                }
            }
        }
        // Every change numbered up to `target` queued its record before taking its number.
        let target = b.seq.load(Ordering::SeqCst);
        while let Ok(m) = rx.try_recv() {
            take(m, &mut waiters, &mut stop);
        }
        queues.take_all(&mut keys, &mut spare);
        if keys.is_empty() {
            // Every change numbered up to `target` is already committed (its record would
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
        for (i, d) in keys.values().enumerate() {
            match records.get_mut(i) {
                Some(r) => d.record_into(r),
                None => records.push(d.record()),
            }
        }
        let records = &records[..keys.len()];
        let started = Instant::now();
        b.committing.store(records.len(), Ordering::SeqCst);
        let committed = ledger.commit(records);
        if committed.is_err() {
            for k in keys.values() {
                k.redirty();
            }
        }
        b.committing.store(0, Ordering::SeqCst);
        match committed {
            Ok(()) => {
                // What each package's record said is on disk now; before the watermark moves,
                // so a charge found durable sees its own points there.
                for (k, r) in keys.values().zip(records) {
                    if let (Dirty::Package(st), Record::Package(p)) = (k, r) {
                        let mut g = lock(&st.inner);
                        g.on_disk = units::to_micro(p.consumed.0).unwrap_or(i64::MAX);
                        (g.on_disk_version, g.on_disk_reverted) = (g.read_version, g.read_reverted);
                    }
                }
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

// ---- the interfaces: each completes without suspending ----

impl RateStore for LocalStore {
    async fn admit(&self, key: BucketKey<'_>, q: Quota) -> Result<Admit, StoreError> {
        Ok(self.admit_now(key, q))
    }
    /// In process a refund is applied by the one call that makes it (nothing sends it again),
    /// so `id` has nothing to guard against here.
    async fn refund(&self, key: BucketKey<'_>, q: Quota, _id: RequestId) -> Result<(), StoreError> {
        self.refund_now(key, q);
        Ok(())
    }
    async fn peek(&self, key: BucketKey<'_>, q: Quota) -> Result<RateState, StoreError> {
        Ok(self.peek_now(key, q))
    }
}

impl BalanceStore for LocalStore {
    async fn reserve(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
        lease: Duration,
    ) -> Result<Option<usize>, StoreError> {
        Ok(self.reserve_now(tenant, candidates, want, id, lease))
    }
    async fn commit(&self, _tenant: TenantKey<'_>, id: RequestId) -> Result<Option<i64>, StoreError> {
        Ok(self.commit_now(id))
    }
    async fn release(&self, _tenant: TenantKey<'_>, id: RequestId) -> Result<(), StoreError> {
        self.release_now(id);
        Ok(())
    }
    fn release_in_background(&self, _tenant: TenantKey<'_>, id: RequestId) {
        self.release_now(id)
    }
    async fn take_up_to(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
    ) -> Result<Vec<Taken>, StoreError> {
        Ok(self.take_now(tenant, candidates, want, id))
    }
    async fn consumed(&self, tenant: TenantKey<'_>, package: Candidate<'_>) -> Result<i64, StoreError> {
        Ok(self.consumed_now(tenant, package))
    }
    async fn mark_alerted(&self, tenant: TenantKey<'_>, package: Candidate<'_>) -> Result<bool, StoreError> {
        Ok(self.mark_alerted_now(tenant, package))
    }
    async fn sweep(&self) -> Result<u64, StoreError> {
        Ok(self.sweep_now())
    }
}

impl UsageStore for LocalStore {
    async fn add_usage(
        &self,
        key: BucketKey<'_>,
        month: &str,
        to: UsageTo,
        units: i64,
        cell: &str,
        id: RequestId,
    ) -> Result<i64, StoreError> {
        Ok(self.add_usage_now(key, month, to, units, cell, id))
    }
    async fn month(&self, tenant: TenantKey<'_>, month: &str) -> Result<Vec<MonthUsage>, StoreError> {
        Ok(self.month_now(tenant.name, month))
    }
}

impl ImageStore for LocalStore {
    async fn reserve_image_slot(
        &self,
        tenant: TenantKey<'_>,
        capacity: u64,
        id: RequestId,
    ) -> Result<bool, StoreError> {
        Ok(self.reserve_image_slot_now(tenant, capacity, id))
    }
    async fn settle_images(
        &self,
        tenant: TenantKey<'_>,
        op: ImageOp,
        id: RequestId,
        reported: Option<u64>,
    ) -> Result<u64, StoreError> {
        Ok(self.settle_images_now(tenant, op, id, reported))
    }
    async fn release_image_slot(&self, _tenant: TenantKey<'_>, id: RequestId) -> Result<(), StoreError> {
        self.release_image_slot_now(id);
        Ok(())
    }
    fn release_image_slot_in_background(&self, _tenant: TenantKey<'_>, id: RequestId) {
        self.release_image_slot_now(id)
    }
    async fn image_count(&self, tenant: TenantKey<'_>) -> Result<u64, StoreError> {
        Ok(self.image_count_now(tenant))
    }
}

impl OverrideStore for LocalStore {
    async fn put_override(&self, tenant: &str, feature: &str, ov: Override) -> Result<(), StoreError> {
        self.put_override_now(tenant, feature, ov);
        Ok(())
    }
    async fn overrides(&self) -> Result<Vec<(String, String, Override)>, StoreError> {
        Ok(self.overrides_now())
    }
}

impl Durable for LocalStore {
    async fn durable(&self, id: RequestId) -> Result<(), StoreError> {
        self.durable_now(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use rust_decimal::Decimal;
    use std::collections::BTreeMap;

    #[test]
    fn usage_markers_are_per_request_and_slot_and_outlive_their_latest_mark() {
        let d = UsageDone::default();
        let base = (7u128 << 64) | 40;
        // Ids 38..=49 straddle two entries (40..=47 share one); every slot of each id is its own.
        for n in 38..50u128 {
            for slot in 0..=5 {
                assert!(d.mark(RequestId(base - 40 + n), slot, 100), "{n}/{slot} first");
            }
        }
        for n in 38..50u128 {
            for slot in 0..=5 {
                assert!(!d.mark(RequestId(base - 40 + n), slot, 100), "{n}/{slot} again: a no-op");
            }
        }
        assert_eq!(d.len(), 12 * 6);
        d.unmark(RequestId(base), 3);
        assert!(d.mark(RequestId(base), 3, 100), "taken back, it may be added again");
        // An entry lives until its latest mark expires.
        assert!(d.mark(RequestId(base + 16), 0, 150));
        assert!(d.mark(RequestId(base + 17), 1, 300), "same entry, later expiry");
        d.sweep(200);
        assert_eq!(d.len(), 2, "only the entry marked until 300 is left");
        assert!(!d.mark(RequestId(base + 16), 0, 300), "its entry is kept until its latest mark expires");
        assert!(d.mark(RequestId(base), 0, 300), "its entry expired at 100");
        d.sweep(400);
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn price_cells_stay_sorted_add_up_and_go_at_zero() {
        let cells = |c: &Cells| c.iter().map(|(k, n)| (k.clone(), n)).collect::<Vec<_>>();
        let want = |v: &[(&str, i64)]| v.iter().map(|(k, n)| (k.to_string(), *n)).collect::<Vec<_>>();
        let mut c = Cells::default();
        c.add("fps<=60,lines<=1440", 3);
        c.add("", 2);
        c.add("fps<=30,lines<=720", 1);
        c.add("", 5);
        assert_eq!(cells(&c), want(&[("", 7), ("fps<=30,lines<=720", 1), ("fps<=60,lines<=1440", 3)]));
        assert_eq!((c.get(""), c.get("fps<=30,lines<=720"), c.get("unpriced")), (Some(7), Some(1), None));
        c.take_back("fps<=30,lines<=720", 1);
        c.take_back("", 2);
        c.take_back("unpriced", 4);
        assert_eq!(
            cells(&c),
            want(&[("", 5), ("fps<=60,lines<=1440", 3)]),
            "a cell at zero goes, an absent one stays absent"
        );
        let loaded: Cells = [("z".to_string(), 1), ("a".to_string(), 2), ("".to_string(), 3)].into_iter().collect();
        assert_eq!(cells(&loaded), want(&[("", 3), ("a", 2), ("z", 1)]), "loaded cells are sorted");
    }

    #[test]
    fn a_reused_record_is_rewritten_to_what_a_new_one_would_be() {
        let month = |tenant: &str, feature: &str, cells: &[(&str, i64)], unpaid: i64| {
            Dirty::Month(Arc::new(Month {
                tenant: tenant.into(),
                feature: feature.into(),
                month: "2026-12".into(),
                inner: Mutex::new(MonthInner {
                    units: [1, 2, 3, 4, unpaid + 5],
                    payg: cells.iter().map(|(c, n)| (c.to_string(), *n)).collect(),
                    unpaid,
                    dirty: true,
                }),
            }))
        };
        let package = |tenant: &str, id: &str, consumed: i64, alerted: bool| {
            Dirty::Package(Arc::new(Pkg {
                tenant: tenant.into(),
                id: id.into(),
                inner: Mutex::new(PkgInner {
                    consumed,
                    on_disk: consumed,
                    held: 7,
                    alerted,
                    dirty: true,
                    ..Default::default()
                }),
            }))
        };
        let image = |tenant: &str, count: u64| {
            Dirty::Image(Arc::new(Img {
                tenant: tenant.into(),
                inner: Mutex::new(ImgInner { count, held: 1, dirty: true }),
            }))
        };
        let states = [
            month("acme", "face-comparison-1-1", &[("", 40)], 0),
            month("a-much-longer-tenant-name", "ocr", &[("", 41)], 2),
            month("b", "video", &[("fps<=30,lines<=720", 9), ("fps<=60,lines<=1440", 3)], 1),
            month("b", "video", &[("fps<=60,lines<=1440", 4)], 0),
            month("c", "ocr", &[], 0),
            package("acme", "od-small", 1_500_000, false),
            package("a-much-longer-tenant-name", "img-1", 3, true),
            image("acme", 12),
            image("b", 0),
        ];
        let d = |v: i64| Dec(Decimal::from(v));
        assert_eq!(
            states[2].record(),
            Record::Month(MonthRecord {
                tenant: "b".into(),
                feature: "video".into(),
                month: "2026-12".into(),
                units: [1, 2, 3, 4, 6].map(d),
                payg: BTreeMap::from([("fps<=30,lines<=720".into(), d(9)), ("fps<=60,lines<=1440".into(), d(3))]),
                unpaid: d(1),
                integer: true,
            })
        );
        let consumed = Dec(units::from_micro(1_500_000));
        let want = PackageRecord { tenant: "acme".into(), id: "od-small".into(), consumed, alerted: false };
        assert_eq!(states[5].record(), Record::Package(want));
        assert_eq!(
            states[7].record(),
            Record::ImageCount(ledger::ImageCountRecord { tenant: "acme".into(), count: 12 })
        );
        // Every state written over every earlier record (another kind, longer or shorter
        // names, other cells) reads exactly as one written over an empty record, and is marked clean.
        for from in &states {
            for to in &states {
                let mut reused = from.record();
                to.redirty();
                to.record_into(&mut reused);
                let clean = match to {
                    Dirty::Package(st) => !lock(&st.inner).dirty,
                    Dirty::Month(st) => !lock(&st.inner).dirty,
                    Dirty::Image(st) => !lock(&st.inner).dirty,
                };
                assert!(clean, "written, the state is clean until it changes again");
                assert_eq!(reused, to.record(), "{:?} over {:?}", to.record(), from.record());
            }
        }
    }

    #[test]
    fn month_indexes_read_the_written_form_and_the_general_one() {
        assert_eq!(month_index_of("2026-02"), Some(2026 * 12 + 1));
        assert_eq!(month_index_of("0000-12"), Some(11));
        assert_eq!(month_index_of("2026-2"), Some(2026 * 12 + 1));
        for bad in ["2026-13", "2026-00", "2026x02", "20a6-02", "", "2026-"] {
            assert_eq!(month_index_of(bad), None, "{bad}");
        }
    }

    fn open(clock: SharedClock) -> (Arc<LocalStore>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = crate::ledger::RedbLedger::open(dir.path()).unwrap();
        (open_on(Box::new(ledger), clock), dir)
    }

    /// A batched store on `ledger`, committing every 5 ms.
    fn open_on(ledger: Box<dyn LedgerStore>, clock: SharedClock) -> Arc<LocalStore> {
        LocalStore::open(
            ledger,
            Durability::Batched,
            Duration::from_millis(5),
            Duration::from_secs(2),
            Arc::new(Metrics::new(true)),
            clock,
            &|_| false,
        )
        .unwrap()
    }

    /// A ledger whose commits hang (a stuck disk, NFS) until `release` is set.
    struct HangingStore {
        inner: crate::ledger::RedbLedger,
        entered: Arc<AtomicBool>,
        release: Arc<AtomicBool>,
    }

    impl LedgerStore for HangingStore {
        fn load(&self) -> Result<Vec<Record>, LedgerError> {
            self.inner.load()
        }
        fn commit(&self, records: &[Record]) -> Result<(), LedgerError> {
            self.entered.store(true, Ordering::SeqCst);
            while !self.release.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(5));
            }
            self.inner.commit(records)
        }
        fn describe(&self) -> String {
            "hanging".into()
        }
    }

    /// SPEC §7 (SIGTERM reports, log and exit status 1, the charges it could not
    /// flush): a commit that does not finish within the close's wait leaves its records
    /// unwritten, yet they were marked clean when the writer took them, so `close` says Ok.
    #[test]
    fn close_with_a_commit_still_hanging_reports_its_records_unflushed() {
        let dir = tempfile::tempdir().unwrap();
        let (entered, release) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
        let ledger = HangingStore {
            inner: crate::ledger::RedbLedger::open(dir.path()).unwrap(),
            entered: entered.clone(),
            release: release.clone(),
        };
        let s = open_on(Box::new(ledger), ManualClock::at("2026-03-01T00:00:00Z"));
        let ids = crate::store::RequestIds::new();
        let (t, tl) = crate::intern::tenant("acme");
        let (f, fl) = crate::intern::feature("ocr");
        let key = BucketKey { tenant: tl, bucket: fl, local: crate::intern::pair(t, f) };
        s.add_usage_now(key, "2026-03", UsageTo::Payer(crate::payer::PayerKind::Payg), 1, "", ids.next());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !entered.load(Ordering::SeqCst) {
            assert!(Instant::now() < deadline, "the writer never committed");
            std::thread::sleep(Duration::from_millis(2));
        }
        let closed = s.close(Duration::from_millis(200));
        release.store(true, Ordering::SeqCst);
        assert!(closed.is_err(), "close said everything was flushed while the commit still hung");
    }

    /// The writer's per-thread lists (`Queues`): records queued by many threads at once, each
    /// thread moving between two stores, are each committed to their own store's ledger; the
    /// list of a thread that ended is dropped once the writer took it.
    #[test]
    fn records_queued_on_many_threads_are_each_committed_and_an_ended_threads_list_dropped() {
        const THREADS: u64 = 6;
        const PAIRS: u64 = 40;
        let clock = ManualClock::at("2026-03-01T00:00:00Z");
        let (a, da) = open(clock.clone());
        let (b, db) = open(clock.clone());
        let ids = Arc::new(crate::store::RequestIds::new());
        let payg = UsageTo::Payer(crate::payer::PayerKind::Payg);
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (a, b, ids) = (a.clone(), b.clone(), ids.clone());
                std::thread::spawn(move || {
                    for p in 0..PAIRS {
                        // Its own pair in `a`, then the pair all threads share, in `b`.
                        let own = format!("t{t}-p{p}");
                        a.add_usage_now(
                            BucketKey { tenant: &own, bucket: "f", local: 1000 + t * PAIRS + p },
                            "2026-03",
                            payg,
                            1,
                            "",
                            ids.next(),
                        );
                        b.add_usage_now(
                            BucketKey { tenant: "shared", bucket: "f", local: 1 },
                            "2026-03",
                            payg,
                            1,
                            "",
                            ids.next(),
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(a.flush_within(Duration::from_secs(5)) && b.flush_within(Duration::from_secs(5)));
        assert_eq!(lock(&a.queues.lists).len(), 0, "the ended threads' lists are dropped");
        assert_eq!(lock(&b.queues.lists).len(), 0);
        a.close(Duration::from_secs(5)).unwrap();
        b.close(Duration::from_secs(5)).unwrap();
        drop((a, b));
        let units = |dir: &tempfile::TempDir| -> BTreeMap<String, Decimal> {
            crate::ledger::RedbLedger::open(dir.path())
                .unwrap()
                .load()
                .unwrap()
                .into_iter()
                .filter_map(|r| match r {
                    Record::Month(m) => Some((m.tenant, m.units[crate::payer::PayerKind::Payg as usize].0)),
                    _ => None,
                })
                .collect()
        };
        let a = units(&da);
        assert_eq!(a.len() as u64, THREADS * PAIRS);
        assert!(a.values().all(|u| *u == Decimal::ONE), "{a:?}");
        assert_eq!(units(&db), BTreeMap::from([("shared".to_string(), Decimal::from(THREADS * PAIRS))]));
    }

    #[test]
    fn a_threads_last_month_serves_only_its_own_store_pair_and_month() {
        let clock = ManualClock::at("2026-03-01T00:00:00Z");
        let (a, _da) = open(clock.clone());
        let (b, _db) = open(clock.clone());
        let f = BucketKey { tenant: "acme", bucket: "f", local: 9 };
        let g = BucketKey { tenant: "acme", bucket: "g", local: 10 };
        let payg = UsageTo::Payer(crate::payer::PayerKind::Payg);
        let ids = crate::store::RequestIds::new();
        // Each call's running total of its store, pair and month.
        let calls = [
            (&a, f, "2026-03", 1),
            (&a, f, "2026-03", 2),
            (&b, f, "2026-03", 1),
            (&a, f, "2026-03", 3),
            (&a, g, "2026-03", 1),
            (&a, f, "2026-04", 1),
            (&a, f, "2026-03", 4),
            (&b, f, "2026-03", 2),
        ];
        for (i, (s, key, month, total)) in calls.into_iter().enumerate() {
            assert_eq!(s.add_usage_now(key, month, payg, 1, "", ids.next()), total, "call {i}");
        }
        let units = |s: &LocalStore, month: &str| -> Vec<(String, i64)> {
            s.month_now("acme", month)
                .into_iter()
                .map(|m| (m.feature, m.units[crate::payer::PayerKind::Payg as usize]))
                .collect()
        };
        assert_eq!(units(&a, "2026-03"), [("f".to_string(), 4), ("g".to_string(), 1)]);
        assert_eq!(units(&a, "2026-04"), [("f".to_string(), 1)]);
        assert_eq!(units(&b, "2026-03"), [("f".to_string(), 2)]);
        // Another thread settling the same month adds to the same state.
        std::thread::scope(|sc| {
            sc.spawn(|| assert_eq!(a.add_usage_now(f, "2026-03", payg, 1, "", ids.next()), 5));
        });
        assert_eq!(a.add_usage_now(f, "2026-03", payg, 1, "", ids.next()), 6);
    }

    #[test]
    fn the_sweep_keeps_live_holds_and_slots_and_forgets_markers_after_their_ttl() {
        let clock = ManualClock::at("2026-03-01T00:00:00Z");
        let (s, _dir) = open(clock.clone());
        let t = TenantKey { name: "acme", local: 1 };
        let p = Candidate { id: "p", points: 10, local: 7 };
        let key = BucketKey { tenant: "acme", bucket: "f", local: 9 };
        let ids = crate::store::RequestIds::new();
        let (hold, slot, used) = (ids.next(), ids.next(), ids.next());
        assert_eq!(s.reserve_now(t, &[p], 10, hold, Duration::from_secs(600)), Some(0));
        assert!(s.reserve_image_slot_now(t, 1, slot));
        s.add_usage_now(key, "2026-03", UsageTo::Payer(crate::payer::PayerKind::Payg), 1, "", used);
        clock.advance(DONE_TTL + Duration::from_secs(1));
        assert_eq!(s.sweep_now(), 0, "a hold and a slot in flight are not swept before their lease");
        assert_eq!(s.usage_done.len(), 0, "the settled request's marker is forgotten");
        assert_eq!(s.commit_now(hold), Some(10));
        assert!(!s.reserve_image_slot_now(t, 1, ids.next()), "the slot is still held");
        clock.advance(Duration::from_secs(24 * 3600));
        assert_eq!(s.sweep_now(), 0, "a slot has no lease: it lives as long as its add");
        assert!(!s.reserve_image_slot_now(t, 1, ids.next()), "the slot is still held");
        s.release_image_slot_now(slot);
        assert!(s.reserve_image_slot_now(t, 1, ids.next()), "given back by its guard");
    }

    #[test]
    fn legacy_video_minutes_load_as_ms_and_integer_records_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let month = |feature: &str, v: &str, integer: bool| {
            let d = Dec(v.parse().unwrap());
            let mut units = crate::ledger::zero_units();
            units[3] = d;
            Record::Month(MonthRecord {
                tenant: "acme".into(),
                feature: feature.into(),
                month: "2026-03".into(),
                units,
                payg: BTreeMap::from([("fps<=60,lines<=1440".to_string(), d)]),
                unpaid: Dec(rust_decimal::Decimal::ZERO),
                integer,
            })
        };
        {
            let l = crate::ledger::RedbLedger::open(dir.path()).unwrap();
            l.commit(&[
                month("video-old", "2.3333333333333333333333333333", false),
                month("video-new", "140000", true),
                month("calls", "15", false),
            ])
            .unwrap();
        }
        let ledger = crate::ledger::RedbLedger::open(dir.path()).unwrap();
        let s = LocalStore::open(
            Box::new(ledger),
            Durability::Batched,
            Duration::from_millis(5),
            Duration::from_secs(2),
            Arc::new(Metrics::new(true)),
            crate::clock::SystemClock::shared(),
            &|f| f.starts_with("video"),
        )
        .unwrap();
        let got = s.month_now("acme", "2026-03");
        let payg: Vec<(String, i64)> = got.iter().map(|u| (u.feature.clone(), u.units[3])).collect();
        assert_eq!(
            payg,
            [("calls".to_string(), 15), ("video-new".to_string(), 140_000), ("video-old".to_string(), 140_000)]
        );
    }
}
