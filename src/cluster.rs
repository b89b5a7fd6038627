//! Cluster mode wiring (SPEC §11): the Redis store as the billing engine's primary store, the
//! `on_store_error` policy, the local fallback with its replay journal, and the shared upgrade
//! overrides.
//!
//! Fallback (`on_store_error = "local"`, SPEC §11.6): the first store error switches this
//! replica to its local buckets (each at `limit / expected_replicas`, at least 1) and its local
//! ledger; every charge made meanwhile is also written to a journal, kept in memory and in the
//! ledger folder ([`journal`]: a replica stopped before Redis came back replays it at its next
//! start). A task probes
//! Redis every [`PROBE_EVERY`]; once it answers, the journal is replayed in order through
//! operations that are idempotent on the request id (a replay of a replay changes nothing), and
//! only when the journal is empty does the replica go back to Redis and set
//! `turnstile_store_fallback` to 0. An entry Redis rejects (an error reply that no retry can
//! change, [`StoreError::is_rejection`]) would stop that replay for good: it is set aside into
//! [`journal::REJECTED`] next to the journal file, logged, and the replay goes on. An entry
//! that fails every time with an error that may pass (a script that always times out, an ACL
//! refusal) is never set aside (it may have been applied): after [`STUCK_AFTER`] failures in a
//! row it is named in one error log, and `turnstile_store_journal_blocked` is 1 until it leaves.
//!
//! Exactly once holds while the marker of an entry's first send lives (a replay whose answer
//! was lost, or whose "replayed" line never reached the file, is sent again): each entry
//! records when it was first sent ([`journal::Sent`]: a live settlement Redis failed when it
//! was tried, its marker kept `done_ttl`; else its first replay, whose marker is kept
//! `replay_done_ttl`, a week), and one first sent longer ago than 9/10 of that is set aside
//! like a rejected entry instead of sent blindly.
//!
//! The journal's own metrics ([`FallbackMetrics`], an extension of SPEC §10):
//! `turnstile_store_journal_entries` (entries waiting for Redis),
//! `turnstile_store_journal_set_aside_total` and `turnstile_store_journal_blocked`.
//!
//! Metrics (SPEC §10): a charge made on the fallback is counted when it is made. A live
//! settlement Redis did not answer is journaled uncounted ([`Uncounted`]); its replay hands
//! the charge back to the billing engine ([`ReplayedCharge`]), which counts it then, once.

pub mod journal;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use prometheus::{IntCounter, IntGauge};
use rust_decimal::Decimal;
use rustc_hash::FxBuildHasher;

use crate::catalog::Tier;
use crate::clock::SharedClock;
use crate::config::gateway::{ClusterSettings, ImageOp, OnStoreError};
use crate::store::redis::{HoldAction, ImagePart, Instead, InsteadFrom, PaidInstead, RedisStore, Settle, TakeFrom};
use crate::store::{BucketKey, ImageStore, Quota, RequestId, StoreError, Stores, TenantKey, UsageStore, UsageTo};

/// How often a replica in fallback (or with a journal to replay) probes Redis.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Failures in a row of the journal's first entry (each at a probe that found Redis answering)
/// after which it is named as blocking the journal: a few seconds at [`PROBE_EVERY`], about 4 s
/// when each attempt runs into the 500 ms store timeout.
pub const STUCK_AFTER: u32 = 5;

/// Settlements spawned in batched mode and not yet acknowledged by Redis, at most; past it a
/// settlement is awaited on the request (backpressure, never an unbounded queue).
pub const MAX_DEFERRED: usize = 4096;

/// How often every replica polls the override version counter (SPEC §11.4: applied within 1 s).
pub const OVERRIDE_POLL: Duration = Duration::from_millis(200);

/// One charge to apply to Redis again, with the request id it was made under.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Replay {
    /// A settlement script call (per-call features): same id and part, so a settlement that did
    /// reach Redis before its answer was lost is not applied twice.
    Settle {
        tenant: String,
        id: u128,
        hold: HoldAction,
        /// The package the hold is on (id, points in micro-points): the one whose alert
        /// `alert_at` fires.
        held: Option<(String, i64)>,
        alert_at: Option<i64>,
        /// `[billing].low_balance_ratio` when the charge was made (what an alert reports).
        ratio: Decimal,
        usage: Option<(String, String, String, i64)>,
        also: String,
        image: ImagePart,
        /// How the commit pays when the hold is gone by then (swept after its lease): the same
        /// as the live settlement would have (see [`Instead`]).
        instead: Option<PayInstead>,
        /// A live settlement Redis did not answer: its metrics wait for this replay
        /// ([`Uncounted`]). `None`: counted when it was made (a charge of the fallback, or an
        /// entry written before this field).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        count: Option<Box<Uncounted>>,
    },
    /// Micro-points taken from packages in candidate order (a package charge made locally):
    /// (package, points, alert at), all in micro-points; `ratio` as in [`Replay::Settle`].
    Take { tenant: String, candidates: Vec<(String, i64, Option<i64>)>, want: i64, id: RequestId, ratio: Decimal },
    /// Units added to a month (video settlements made locally).
    Usage { tenant: String, feature: String, month: String, to: UsageTo, units: i64, cell: String, id: RequestId },
    /// An image count change made locally.
    Images { tenant: String, op: ImageOp, id: RequestId, reported: Option<u64> },
    /// A low-balance alert fired on the fallback: marked in Redis so that no replica fires it
    /// again (SPEC §6, §11.3: once in the whole cluster).
    Alert { tenant: String, package: String },
    /// The package hold an admission may have left under `id` when Redis did not answer it (a
    /// hung Redis runs the queued script when it resumes): the call went on on the fallback,
    /// so the hold is no call's. Given back before the journal is replayed
    /// ([`Remote::replay_journal`]), and again, as a no-op, in its turn.
    Release { tenant: String, id: u128 },
}

impl Replay {
    /// What the entry replays, as logs name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Replay::Settle { .. } => "settle",
            Replay::Take { .. } => "take",
            Replay::Usage { .. } => "usage",
            Replay::Images { .. } => "images",
            Replay::Alert { .. } => "alert",
            Replay::Release { .. } => "release",
        }
    }

    /// The request id the entry is replayed under (an alert has none).
    pub fn request_id(&self) -> Option<RequestId> {
        match self {
            Replay::Settle { id, .. } | Replay::Release { id, .. } => Some(RequestId(*id)),
            Replay::Take { id, .. } | Replay::Usage { id, .. } | Replay::Images { id, .. } => Some(*id),
            Replay::Alert { .. } => None,
        }
    }

    /// Whether sending the entry again after Redis applied it would apply it again, were its
    /// marker gone: a charge would; a hold's release (nothing left to give back) and an alert's
    /// mark (set once) would not.
    pub fn applies_twice_without_its_marker(&self) -> bool {
        !matches!(self, Replay::Release { .. } | Replay::Alert { .. })
    }

    /// The tenant the entry charges.
    pub fn tenant(&self) -> &str {
        match self {
            Replay::Settle { tenant, .. }
            | Replay::Take { tenant, .. }
            | Replay::Usage { tenant, .. }
            | Replay::Images { tenant, .. }
            | Replay::Alert { tenant, .. }
            | Replay::Release { tenant, .. } => tenant,
        }
    }
}

/// A low-balance alert that a replayed charge marked in Redis (the first mark in the cluster):
/// nobody has fired it there, so the replica that replayed the charge fires it (unless it
/// already did on its fallback; see [`Remote::on_replayed_alert`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayedAlert {
    pub tenant: String,
    pub package: String,
    /// The package's points and its consumption after the charge, in micro-points.
    pub points: i64,
    pub consumed: i64,
    pub ratio: Decimal,
}

/// Where [`Remote`] hands the alerts its replay marked (the billing engine fires them).
type AlertSink = Box<dyn Fn(ReplayedAlert) + Send + Sync>;

/// What the billing engine counts a per-call charge with (SPEC §10) when its live settlement
/// failed: nothing was counted then (Redis may or may not have applied it), so the replay that
/// Redis answers counts it, once. The catalog's currency and the feature's pay-as-you-go tiers
/// when the call was made; the tier is the one of the month's total Redis reports then.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Uncounted {
    pub currency: String,
    pub payg_tiers: Vec<Tier>,
}

/// A replayed settlement that carried [`Uncounted`]: who paid its unit (as Redis applied it:
/// the hold's payer, or who paid instead when the hold was gone) and the month's call-cell
/// total after it (pay-as-you-go). The billing engine counts it ([`Remote::on_replayed_charge`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ReplayedCharge {
    pub tenant: String,
    pub feature: String,
    pub to: UsageTo,
    pub cell_total: Option<i64>,
    pub count: Uncounted,
}

/// Where [`Remote`] hands the charges its replay settled uncounted (the billing engine counts them).
type ChargeSink = Box<dyn Fn(ReplayedCharge) + Send + Sync>;

/// What one replayed entry hands back to the billing engine.
#[derive(Default)]
struct Replayed {
    alerts: Vec<ReplayedAlert>,
    charge: Option<ReplayedCharge>,
}

/// An owned [`Instead`]: how a commit pays when its hold is gone, kept to be journaled.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PayInstead {
    /// Micro-points of the whole factor.
    pub want: i64,
    /// (package, points, alert at, usage field), in SPEC §6 order.
    pub candidates: Vec<(String, i64, Option<i64>, String)>,
    /// The usage fields when no candidate can pay.
    pub field: String,
    pub also: String,
}

impl PayInstead {
    /// The candidates as the settlement takes them (borrowed from `self`).
    pub fn froms(&self) -> Vec<InsteadFrom<'_>> {
        self.candidates
            .iter()
            .map(|(p, points, alert_at, field)| InsteadFrom { package: p, points: *points, alert_at: *alert_at, field })
            .collect()
    }

    /// The settlement's part, over `froms` (from [`PayInstead::froms`]).
    pub fn part<'a>(&'a self, froms: &'a [InsteadFrom<'a>]) -> Instead<'a> {
        Instead { want: self.want, candidates: froms, field: &self.field, also: &self.also }
    }
}

/// The metrics of the `local` fallback and its journal (cluster mode only, on the gateway's
/// registry): `turnstile_store_fallback` is SPEC §10's; the journal's three are this
/// implementation's extension (README "Metrics").
#[derive(Clone)]
pub struct FallbackMetrics {
    /// 1 while this replica serves on the local fallback.
    pub fallback: IntGauge,
    /// Entries in the journal: charges waiting for Redis.
    pub journal_entries: IntGauge,
    /// Entries set aside for an operator ([`journal::REJECTED`]): Redis rejected them, or they
    /// were first sent longer ago than their replay marker is kept.
    pub set_aside: IntCounter,
    /// 1 while the journal's first entry has failed [`STUCK_AFTER`] times in a row or more.
    pub journal_blocked: IntGauge,
}

impl FallbackMetrics {
    pub fn new() -> prometheus::Result<FallbackMetrics> {
        Ok(FallbackMetrics {
            fallback: IntGauge::new(
                "turnstile_store_fallback",
                "1 while this replica serves on the local fallback of SPEC §11.6",
            )?,
            journal_entries: IntGauge::new(
                "turnstile_store_journal_entries",
                "Charges in the fallback's journal waiting to be replayed to Redis (cluster mode)",
            )?,
            set_aside: IntCounter::new(
                "turnstile_store_journal_set_aside_total",
                "Journal entries set aside in redis-journal.rejected to be reconciled by hand: Redis rejected them, or they were first sent longer ago than their replay marker is kept (cluster mode)",
            )?,
            journal_blocked: IntGauge::new(
                "turnstile_store_journal_blocked",
                "1 while the journal's first entry keeps failing and holds back the replay (cluster mode)",
            )?,
        })
    }

    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.fallback.clone()))?;
        registry.register(Box::new(self.journal_entries.clone()))?;
        registry.register(Box::new(self.set_aside.clone()))?;
        registry.register(Box::new(self.journal_blocked.clone()))
    }
}

/// The Redis side of the billing engine.
pub struct Remote {
    pub redis: RedisStore,
    /// `redis` keeping its settlement markers `replay_done_ttl`: what the journal replays
    /// through ([`RedisStore::for_replays`]).
    replayer: RedisStore,
    /// When entries are first sent, and whether one was sent too long ago to be sent again.
    clock: SharedClock,
    /// `Stores::Redis(redis)`.
    pub stores: Stores,
    pub on_error: OnStoreError,
    pub expected_replicas: u32,
    fallback: AtomicBool,
    metrics: FallbackMetrics,
    /// Charges made on the fallback, oldest first; an entry leaves it only once Redis has it.
    journal: Mutex<Journal>,
    /// The journal file's data written since its last `fdatasync`: a handle on the file, and
    /// what wakes [`journal_sync_loop`].
    unsynced: AtomicBool,
    sync: OnceLock<Arc<std::fs::File>>,
    wrote: Arc<tokio::sync::Notify>,
    /// A replay is running (one at a time: each removes the entries it replayed).
    replaying: AtomicBool,
    /// The rejected file could not be written at the last try (its error is logged once).
    set_aside_failing: AtomicBool,
    /// Batched mode: permits for settlements spawned after the answer went out.
    pub deferred: std::sync::Arc<tokio::sync::Semaphore>,
    /// The last consumption Redis reported per (tenant, package) ([`crate::intern::pair`]): in
    /// fallback a package offers only `points - known` to the local ledger.
    known: DashMap<u64, i64, FxBuildHasher>,
    /// Fires the alerts a replay marked in Redis ([`Remote::on_replayed_alert`]).
    alert_sink: OnceLock<AlertSink>,
    /// Counts the charges a replay settled uncounted ([`Remote::on_replayed_charge`]).
    charge_sink: OnceLock<ChargeSink>,
}

/// The journal: its entries with their sequence numbers, oldest first, the next number, and
/// its file (none in tests that keep it in memory); the gauges that show it.
struct Journal {
    entries: VecDeque<journal::Entry>,
    next: u64,
    file: Option<journal::JournalFile>,
    /// The first entry's sequence number and its failures in a row, while it fails.
    failing: Option<(u64, u32)>,
    /// `turnstile_store_journal_entries`, `turnstile_store_journal_blocked`.
    entries_gauge: IntGauge,
    blocked_gauge: IntGauge,
}

impl Journal {
    fn new(m: &FallbackMetrics) -> Journal {
        m.journal_entries.set(0);
        m.journal_blocked.set(0);
        Journal {
            entries: VecDeque::new(),
            next: 0,
            file: None,
            failing: None,
            entries_gauge: m.journal_entries.clone(),
            blocked_gauge: m.journal_blocked.clone(),
        }
    }

    fn push_back(&mut self, e: journal::Entry) {
        self.entries.push_back(e);
        self.entries_gauge.set(gauge_value(self.entries.len()));
    }

    /// The first entry, `seq`, failed again with an error that may pass: its failures in a
    /// row (counted afresh for a new first entry).
    fn head_failed(&mut self, seq: u64) -> u32 {
        let n = match self.failing {
            Some((s, n)) if s == seq => n.saturating_add(1),
            _ => 1,
        };
        self.failing = Some((seq, n));
        if n >= STUCK_AFTER {
            self.blocked_gauge.set(1);
        }
        n
    }

    /// Redis has the oldest entry, `seq`: it leaves the journal, and the file says so (the
    /// file is emptied with the journal, so it does not grow while Redis answers). Whatever
    /// blocked the journal behind it is over.
    fn pop_front(&mut self, seq: u64) {
        self.entries.pop_front();
        self.entries_gauge.set(gauge_value(self.entries.len()));
        self.failing = None;
        self.blocked_gauge.set(0);
        let Some(f) = self.file.as_mut() else { return };
        let written = if self.entries.is_empty() { f.clear() } else { f.append_done(seq) };
        if let Err(e) = written {
            // Replayed again at the next start if it stops first: idempotent while its marker
            // lives (the file says when it was first sent; past that it is set aside).
            tracing::error!(file = %f.path().display(), error = %e, "journal: cannot mark an entry replayed");
        }
    }
}

/// A count as a gauge's value.
fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Remote {
    pub fn new(redis: RedisStore, c: &ClusterSettings, metrics: FallbackMetrics, clock: SharedClock) -> Remote {
        metrics.fallback.set(0);
        Remote {
            stores: Stores::Redis(redis.clone()),
            replayer: redis.for_replays(),
            clock,
            redis,
            on_error: c.on_store_error,
            expected_replicas: c.expected_replicas.max(1),
            fallback: AtomicBool::new(false),
            journal: Mutex::new(Journal::new(&metrics)),
            metrics,
            unsynced: AtomicBool::new(false),
            sync: OnceLock::new(),
            wrote: Arc::new(tokio::sync::Notify::new()),
            replaying: AtomicBool::new(false),
            set_aside_failing: AtomicBool::new(false),
            deferred: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_DEFERRED)),
            known: DashMap::with_hasher(FxBuildHasher),
            alert_sink: OnceLock::new(),
            charge_sink: OnceLock::new(),
        }
    }

    /// Sets what receives the low-balance alerts a replayed charge marked in Redis (once; the
    /// billing engine sets it when it opens). Without one they are only logged.
    pub fn on_replayed_alert(&self, sink: impl Fn(ReplayedAlert) + Send + Sync + 'static) {
        let _ = self.alert_sink.set(Box::new(sink));
    }

    fn replayed_alert(&self, a: ReplayedAlert) {
        match self.alert_sink.get() {
            Some(sink) => sink(a),
            None => tracing::warn!(tenant = a.tenant, package = a.package, "package balance low (marked by a replay)"),
        }
    }

    /// Sets what counts the charges a replay settled whose live settlement counted nothing
    /// ([`Uncounted`]; once, the billing engine sets it when it opens). Without one they are
    /// not counted.
    pub fn on_replayed_charge(&self, sink: impl Fn(ReplayedCharge) + Send + Sync + 'static) {
        let _ = self.charge_sink.set(Box::new(sink));
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
            self.metrics.fallback.set(1);
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

    /// What Redis answered a package consumed (less the local ledger's part, see
    /// `Billing::note_consumed`). Settlements end on different tasks, so an older answer may be
    /// noted after a newer one: the most is kept (a package's consumption only grows), or the
    /// fallback would offer points already spent on Redis.
    pub fn note_consumed(&self, pair: u64, consumed: i64) {
        self.known.entry(pair).and_modify(|k| *k = (*k).max(consumed)).or_insert(consumed);
    }

    /// A settlement journaled with its package hold still to commit (Redis failed it): the
    /// replay commits `points` more than Redis last said was consumed, so the fallback, which
    /// offers the package its points less [`Remote::known_consumed`], must not offer them again.
    pub fn note_journaled_hold(&self, pair: u64, points: i64) {
        *self.known.entry(pair).or_insert(0) += points;
    }

    /// An admission with a package hold that Redis did not answer (`id`): under `local` the
    /// call goes on on the fallback, which pays it; Redis may have run the script, or run it
    /// when it resumes, holding the points for no call until the lease's end. Journaled
    /// ([`Replay::Release`]) to give them back once Redis answers.
    pub fn journal_unanswered_hold(&self, tenant: &str, id: u128) {
        if self.on_error == OnStoreError::Local {
            self.journal(Replay::Release { tenant: tenant.to_string(), id });
        }
    }

    pub fn known_consumed(&self, pair: u64) -> i64 {
        self.known.get(&pair).map_or(0, |v| *v)
    }

    /// Keeps the journal in `dir` (the ledger folder) from now on, after reading what it held:
    /// entries a previous run of this replica journaled (on the fallback, or a deferred
    /// settlement Redis failed, under either policy) and did not replay. With
    /// some, `local` starts on the fallback, so they reach Redis (at the first probe) before
    /// this replica's new charges do. Returns how many it found.
    pub fn open_journal(&self, dir: &std::path::Path) -> Result<usize, String> {
        let (file, found, cut) = journal::JournalFile::open(dir)?;
        if cut > 0 {
            tracing::warn!(file = %file.path().display(), bytes = cut, "journal: dropped a line cut short by a crash");
        }
        let sync = file.sync_handle().map_err(|e| format!("{}: {e}", file.path().display()))?;
        let _ = self.sync.set(Arc::new(sync));
        let n = found.len();
        let mut j = self.journal.lock().map_err(|_| "journal lock poisoned".to_string())?;
        j.next = found.last().map_or(0, |e| e.seq) + 1;
        j.entries = found.into();
        j.entries_gauge.set(gauge_value(n));
        j.file = Some(file);
        drop(j);
        if n > 0 {
            tracing::info!(
                entries = n,
                "charges made on the local fallback before the last stop: replayed to Redis first"
            );
            if self.on_error == OnStoreError::Local && !self.fallback.swap(true, Ordering::SeqCst) {
                self.metrics.fallback.set(1);
            }
        }
        Ok(n)
    }

    /// Journals `r`, a charge never sent to Redis (made on the fallback): it is first sent by
    /// its replay.
    pub fn journal(&self, r: Replay) {
        self.journal_sent(r, None);
    }

    /// When a live settlement Redis failed was sent (read at its failure): if Redis applied
    /// it, its marker is kept `done_ttl` from about then.
    pub fn tried_now(&self) -> journal::Sent {
        journal::Sent { at: self.now_ms(), ttl: self.redis.done_ttl_ms() }
    }

    /// Journals `r`; `sent`: when its live settlement was tried ([`Remote::tried_now`]), none
    /// when it never was. Its replays are not sent past [`journal::Sent::replay_until`].
    pub fn journal_sent(&self, r: Replay, sent: Option<journal::Sent>) {
        if let Ok(mut j) = self.journal.lock() {
            let seq = j.next;
            j.next += 1;
            if let Some(f) = j.file.as_mut() {
                match f.append_entry(seq, &r, sent) {
                    Ok(()) => self.wrote_to_journal(),
                    Err(e) => {
                        tracing::error!(file = %f.path().display(), error = %e, "journal: cannot write an entry; it is kept in memory only")
                    }
                }
            }
            j.push_back(journal::Entry { seq, replay: r, sent });
        }
    }

    /// The injected clock's wall time in milliseconds.
    fn now_ms(&self) -> i64 {
        self.clock.unix_nanos() / 1_000_000
    }

    /// Marks every entry not yet sent as first sent now, its marker kept `replay_done_ttl`: in
    /// memory, and in the file, synced before any of them is sent (a replica killed after
    /// Redis applied one, before its "replayed" line reached the disk, knows at its next start
    /// when it was sent). False when the journal cannot be read.
    async fn mark_sent(&self) -> bool {
        let sent = journal::Sent { at: self.now_ms(), ttl: self.replayer.done_ttl_ms() };
        {
            let Ok(mut j) = self.journal.lock() else { return false };
            let mut upto = None;
            for e in j.entries.iter_mut().filter(|e| e.sent.is_none()) {
                e.sent = Some(sent);
                upto = Some(e.seq);
            }
            let (Some(upto), Some(f)) = (upto, j.file.as_mut()) else { return true };
            if let Err(e) = f.append_sent(upto, sent) {
                // Sent all the same, as a "replayed" line that cannot be written is: only a
                // start more than `replay_done_ttl` later could then charge one twice.
                tracing::error!(file = %f.path().display(), error = %e, "journal: cannot record when entries were first sent");
                return true;
            }
        }
        self.sync_journal_async().await;
        true
    }

    /// The journal file has a change not yet synced: [`journal_sync_loop`] syncs it within
    /// `flush_interval_ms`.
    fn wrote_to_journal(&self) {
        if !self.unsynced.swap(true, Ordering::SeqCst) {
            self.wrote.notify_one();
        }
    }

    /// Where the journal is kept (none: in memory only).
    pub fn journal_path(&self) -> Option<String> {
        let j = self.journal.lock().ok()?;
        Some(j.file.as_ref()?.path().display().to_string())
    }

    pub fn journal_len(&self) -> usize {
        self.journal.lock().map_or(0, |j| j.entries.len())
    }

    /// `fdatasync` of the journal file, off the runtime's threads:
    /// on return, every entry written before the call is on disk (a sync already running may
    /// have begun before it was written, so none is skipped). Strict mode before the 2xx of a
    /// charge made on the fallback, [`journal_sync_loop`], the exit, and before a replay sends
    /// entries never sent ([`Remote::mark_sent`]).
    pub async fn sync_journal_async(&self) {
        let Some(f) = self.sync.get().map(Arc::clone) else { return };
        self.unsynced.store(false, Ordering::SeqCst);
        let synced =
            tokio::task::spawn_blocking(move || f.sync_data()).await.map_err(std::io::Error::other).and_then(|r| r);
        if let Err(e) = synced {
            self.unsynced.store(true, Ordering::SeqCst);
            tracing::error!(error = %e, "journal: fdatasync failed");
        }
    }

    /// Applies one journal entry to Redis through `redis` (idempotent on its request id).
    /// Returns the low-balance alerts it marked in Redis, the first time in the cluster: those
    /// of a settlement or a take (a replay answered from their marker, whose first answer was
    /// lost, returns them too); never that of a [`Replay::Alert`], fired on the fallback already.
    /// And the charge of a settlement that carries [`Uncounted`] (answered from its marker too:
    /// the live settlement, or an earlier replay, whose answer was lost counted nothing).
    async fn replay(redis: &RedisStore, r: &Replay) -> Result<Replayed, StoreError> {
        match r {
            Replay::Settle { tenant, id, hold, held, alert_at, ratio, usage, also, image, instead, count } => {
                let froms = instead.as_ref().map(PayInstead::froms).unwrap_or_default();
                let s = Settle {
                    hold: *hold,
                    alert_at: *alert_at,
                    usage: usage.as_ref().map(|(f, m, field, n)| (f.as_str(), m.as_str(), field.as_str(), *n)),
                    image: *image,
                    also,
                    part: SETTLE_PART,
                    instead: instead.as_ref().map(|i| i.part(&froms)),
                };
                let out = redis.settle(tenant, *id, s).await?;
                let charge = count.as_ref().and_then(|count| {
                    let (feature, _, field, _) = usage.as_ref()?;
                    // The month field its unit went to: the hold's payer's, or who paid instead.
                    let field = match out.instead {
                        None => Some(field),
                        Some(PaidInstead::Package(i)) => {
                            instead.as_ref().and_then(|x| x.candidates.get(i)).map(|c| &c.3)
                        }
                        Some(PaidInstead::Fallback) => instead.as_ref().map(|x| &x.field),
                    };
                    match field.and_then(|f| crate::store::redis::field_payer(f)) {
                        Some(to) => Some(ReplayedCharge {
                            tenant: tenant.clone(),
                            feature: feature.clone(),
                            to,
                            cell_total: out.cell_total,
                            count: Uncounted::clone(count),
                        }),
                        None => {
                            tracing::error!(tenant, "a replayed settlement paid a unit to a field that names no payer");
                            None
                        }
                    }
                });
                if !out.alert_fired {
                    return Ok(Replayed { alerts: Vec::new(), charge });
                }
                // The package that paid: the hold's, or the candidate that paid instead.
                let paid = match out.instead {
                    None => held.clone(),
                    Some(PaidInstead::Package(i)) => {
                        instead.as_ref().and_then(|x| x.candidates.get(i)).map(|(p, points, _, _)| (p.clone(), *points))
                    }
                    Some(PaidInstead::Fallback) => None,
                };
                let alerts = match (paid, out.consumed) {
                    (Some((package, points)), Some(consumed)) => {
                        vec![ReplayedAlert { tenant: tenant.clone(), package, points, consumed, ratio: *ratio }]
                    }
                    _ => {
                        tracing::error!(tenant, "a replayed settlement fired an alert for a package it does not name");
                        Vec::new()
                    }
                };
                Ok(Replayed { alerts, charge })
            }
            Replay::Take { tenant, candidates, want, id, ratio } => {
                let from: Vec<TakeFrom<'_>> = candidates
                    .iter()
                    .map(|(p, points, alert_at)| TakeFrom {
                        package: p,
                        points: *points,
                        cap: None,
                        alert_at: *alert_at,
                    })
                    .collect();
                let took = redis.take(tenant, &from, Some(*want), id.0).await?;
                let got: i64 = took.iter().map(|x| x.taken).sum();
                if got < *want {
                    tracing::warn!(
                        tenant,
                        wanted = want,
                        taken = got,
                        "replayed package charge: the shared balance held less than the fallback charged (overspent while Redis was unreachable)"
                    );
                }
                let alerts = candidates
                    .iter()
                    .zip(&took)
                    .filter(|(_, t)| t.alert_fired)
                    .map(|((package, points, _), t)| ReplayedAlert {
                        tenant: tenant.clone(),
                        package: package.clone(),
                        points: *points,
                        consumed: t.consumed,
                        ratio: *ratio,
                    })
                    .collect();
                Ok(Replayed { alerts, charge: None })
            }
            Replay::Usage { tenant, feature, month, to, units, cell, id } => {
                let key = BucketKey { tenant, bucket: feature, local: 0 };
                redis.add_usage(key, month, *to, *units, cell, *id).await.map(|_| Replayed::default())
            }
            Replay::Images { tenant, op, id, reported } => {
                let t = TenantKey { name: tenant, local: 0 };
                redis.settle_images(t, *op, *id, *reported).await.map(|_| Replayed::default())
            }
            // Fired on the fallback: Redis learns it, so that no replica fires it again.
            Replay::Alert { tenant, package } => redis.alert_once(tenant, package).await.map(|_| Replayed::default()),
            Replay::Release { tenant, id } => redis.release_hold(tenant, *id).await.map(|_| Replayed::default()),
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
        let Some(done) = self.replay_journal().await else { return 0 };
        if self.journal_len() == 0 && self.fallback.swap(false, Ordering::SeqCst) {
            self.metrics.fallback.set(0);
            tracing::info!(replayed = done, "store reachable again: local charges replayed; back on Redis");
        }
        done
    }

    /// Replays the journal in order (its settlements keeping their markers `replay_done_ttl`),
    /// removing each entry once Redis has it (an interrupted replay, even one whose task ends
    /// in a panic, leaves the rest in place). Entries not yet sent are first marked sent
    /// ([`Remote::mark_sent`]). An entry Redis rejects is set aside ([`Remote::set_aside`]) and
    /// removed the same way, so it does not hold back the entries after it; so is an entry
    /// first sent so long ago that its marker may be gone (past [`journal::Sent::replay_until`]:
    /// Redis may have applied it, and would apply it again). Returns the entries replayed;
    /// `None` when another replay is running or the first entry fails.
    async fn replay_journal(&self) -> Option<usize> {
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
        // Holds no call owns first: each counts against the package until then, and a take
        // before it in the journal would find less than the fallback charged.
        let releases: Vec<Replay> = match self.journal.lock() {
            Ok(j) => j
                .entries
                .iter()
                .filter(|e| matches!(e.replay, Replay::Release { .. }))
                .map(|e| e.replay.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        for r in &releases {
            // A failure leaves it to its turn in the journal.
            let _ = Self::replay(&self.replayer, r).await;
        }
        let mut done = 0;
        loop {
            let Some(head) = self.journal.lock().ok().and_then(|j| j.entries.front().cloned()) else {
                return Some(done);
            };
            let journal::Entry { seq, replay: r, sent } = head;
            let Some(sent) = sent else {
                if !self.mark_sent().await {
                    return (done > 0).then_some(done);
                }
                continue;
            };
            // Its marker may be gone: Redis may have applied it, and would apply it again.
            if r.applies_twice_without_its_marker() && self.now_ms() >= sent.replay_until() {
                if !self.set_aside_and_pop(seq, &r, &SetAsideWhy::Expired(sent)).await {
                    return (done > 0).then_some(done);
                }
                continue;
            }
            let replayed = match Self::replay(&self.replayer, &r).await {
                Ok(replayed) => replayed,
                Err(e) if e.is_rejection() => {
                    if !self.set_aside_and_pop(seq, &r, &SetAsideWhy::Rejected(&e)).await {
                        return (done > 0).then_some(done);
                    }
                    continue;
                }
                Err(e) => {
                    self.head_failed(seq, &r, &e);
                    return (done > 0).then_some(done);
                }
            };
            if let Ok(mut j) = self.journal.lock() {
                j.pop_front(seq);
            }
            done += 1;
            // Nothing is awaited between the answer and here: an entry whose answer came back
            // hands its alerts and its charge over exactly once (one whose answer was lost stays
            // in the journal, and its replay answers them again from the marker).
            for a in replayed.alerts {
                self.replayed_alert(a);
            }
            if let (Some(c), Some(sink)) = (replayed.charge, self.charge_sink.get()) {
                sink(c);
            }
        }
    }

    /// The journal's first entry, `seq`, failed with `e`, an error that may pass (not a
    /// rejection): logged as a warning while it may be a passing failure; at the
    /// [`STUCK_AFTER`]th failure in a row, one error names it as blocking the journal (and
    /// `turnstile_store_journal_blocked` reads 1), then nothing more until it leaves the journal.
    /// It is never set aside by itself: Redis may have applied it (a timeout), and a charge by
    /// hand would then charge it twice.
    fn head_failed(&self, seq: u64, r: &Replay, e: &StoreError) {
        let (n, left) = match self.journal.lock() {
            Ok(mut j) => (j.head_failed(seq), j.entries.len()),
            Err(_) => return,
        };
        if n < STUCK_AFTER {
            tracing::warn!(error = %e, left, "replay to Redis interrupted; retrying");
        } else if n == STUCK_AFTER {
            tracing::error!(
                seq,
                tenant = r.tenant(),
                kind = r.kind(),
                request_id = r.request_id().map(|id| id.to_string()),
                error = %e,
                failures = n,
                left,
                journal = self.journal_path(),
                "journal blocked: this entry failed at every replay while Redis answers, and every charge after it waits (the replica stays on the fallback); it is retried, never set aside by itself (Redis may have applied it). Check in Redis whether it was applied (its request id's marker); if it cannot pass, stop the replica and move its line from the journal to redis-journal.rejected by hand (README, \"journal blocked\")"
            );
        }
    }

    /// The journal's first entry, `seq`, is set aside ([`Remote::set_aside`]) and leaves the
    /// journal; false when it could not be set aside: it stays, and every entry after it waits
    /// (`turnstile_store_journal_blocked` reads 1).
    async fn set_aside_and_pop(&self, seq: u64, r: &Replay, why: &SetAsideWhy<'_>) -> bool {
        if !self.set_aside(seq, r, why).await {
            if let Ok(j) = self.journal.lock() {
                j.blocked_gauge.set(1);
            }
            return false;
        }
        if let Ok(mut j) = self.journal.lock() {
            j.pop_front(seq);
        }
        // Its mark is synced like an entry: replayed again after a crash, it would reach Redis
        // while its set-aside line asks an operator to reconcile it by hand.
        self.wrote_to_journal();
        true
    }

    /// Sets aside entry `seq`, which must not be sent (again) to Redis (`why`): one line in the
    /// rejected file next to the journal file (synced), and an error log naming it. True when
    /// the entry may leave the journal; false when its line could not be written (the entry
    /// then stays in the journal and is tried again at the next probe, never lost). With a
    /// journal kept in memory only there is no file: the log carries the entry.
    async fn set_aside(&self, seq: u64, r: &Replay, why: &SetAsideWhy<'_>) -> bool {
        let path = self.journal.lock().ok().and_then(|j| j.file.as_ref().map(journal::JournalFile::rejected_path));
        let error = why.to_string();
        let (kind, request_id) = (r.kind(), r.request_id().map(|id| id.to_string()));
        let Some(path) = path else {
            let entry = serde_json::to_string(r).unwrap_or_else(|e| format!("(cannot be written: {e})"));
            tracing::error!(
                tenant = r.tenant(),
                seq,
                kind,
                request_id,
                error,
                entry,
                "a journaled charge is set aside, not replayed (no journal file): it must be reconciled in Redis by hand"
            );
            self.metrics.set_aside.inc();
            return true;
        };
        let at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let (line_path, entry) = (path.clone(), r.clone());
        let (tenant, error_text) = (r.tenant().to_string(), error.clone());
        let written = tokio::task::spawn_blocking(move || {
            let line = journal::SetAside { seq, at: &at, tenant: &tenant, error: &error_text, entry: &entry };
            journal::append_rejected(&line_path, &line)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|w| w);
        if let Err(write) = written {
            if !self.set_aside_failing.swap(true, Ordering::SeqCst) {
                tracing::error!(
                    file = %path.display(),
                    tenant = r.tenant(),
                    seq,
                    kind,
                    request_id,
                    error,
                    write_error = %write,
                    "a journaled charge must be set aside, and it cannot be: kept in the journal (the entries after it wait) until the file can be written"
                );
            }
            return false;
        }
        self.set_aside_failing.store(false, Ordering::SeqCst);
        self.metrics.set_aside.inc();
        tracing::error!(
            file = %path.display(),
            tenant = r.tenant(),
            seq,
            kind,
            request_id,
            error,
            "a journaled charge is set aside in the file, not replayed: it must be reconciled in Redis by hand"
        );
        true
    }

    /// At shutdown: replays what the journal holds if Redis answers now (beside the probe
    /// loop, one replay at a time), trying until `wait` has passed. Returns the entries still
    /// not replayed: charges made on the fallback that Redis lacks until this replica starts
    /// again with its ledger folder (they wait in the journal file).
    pub async fn replay_at_exit(&self, wait: Duration) -> usize {
        let until = tokio::time::Instant::now() + wait;
        while self.journal_len() > 0 && tokio::time::Instant::now() < until {
            if tokio::time::timeout_at(until, self.replay_journal()).await.is_err() {
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

/// Why a journal entry is set aside instead of sent to Redis (the `error` of its line).
enum SetAsideWhy<'a> {
    /// Redis rejected it: sending it again cannot change that.
    Rejected(&'a StoreError),
    /// It was first sent so long ago that the marker of that send may be gone: Redis may have
    /// applied it, and would apply it again.
    Expired(journal::Sent),
}

impl std::fmt::Display for SetAsideWhy<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetAsideWhy::Rejected(e) => e.fmt(f),
            SetAsideWhy::Expired(s) => {
                let at = chrono::DateTime::from_timestamp_millis(s.at)
                    .map_or_else(|| s.at.to_string(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                write!(
                    f,
                    "not replayed: first sent to Redis at {at}, and the marker that send left if Redis applied it is kept {} s, nearly all passed: Redis may have it already and would apply it again. Check the tenant's usage in Redis before charging it by hand",
                    s.ttl / 1000
                )
            }
        }
    }
}

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

/// Syncs the journal file within `every` (`[ledger].flush_interval_ms`, the local ledger's
/// bound in batched mode) of an entry's write: wakes only when one was written (and once a
/// second to see whether the billing engine is gone).
pub async fn journal_sync_loop(billing: std::sync::Weak<crate::billing::Billing>, every: Duration) {
    loop {
        let wrote = match billing.upgrade().as_ref().and_then(|b| b.remote().map(|r| r.wrote.clone())) {
            Some(wrote) => wrote,
            None => return,
        };
        if tokio::time::timeout(Duration::from_secs(1), wrote.notified()).await.is_err() {
            continue;
        }
        tokio::time::sleep(every).await;
        let Some(b) = billing.upgrade() else { return };
        if let Some(r) = b.remote().filter(|r| r.unsynced.load(Ordering::SeqCst)) {
            r.sync_journal_async().await;
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

/// A [`Remote`] on a test Redis at `url` (key prefix `prefix`, holds leased `lease`, Redis
/// failures handled by `on_store_error`, one replica), with 2 s round trips and replay markers
/// kept a minute: what the unit tests of the cluster and of billing on Redis run against.
#[cfg(test)]
pub(crate) async fn test_remote(url: String, prefix: &str, lease: Duration, on_store_error: OnStoreError) -> Remote {
    use crate::store::redis::RedisOpts;
    let opts = RedisOpts {
        key_prefix: prefix.into(),
        op_timeout: Duration::from_secs(2),
        done_ttl: Duration::from_secs(60),
        hold_lease: lease,
        ..RedisOpts::default()
    };
    test_remote_with(url, opts, on_store_error, crate::clock::SystemClock::shared()).await
}

/// [`test_remote`] with its Redis connection settings `opts` (prefix, lease and marker TTLs),
/// on `clock`.
#[cfg(test)]
pub(crate) async fn test_remote_with(
    url: String,
    opts: crate::store::redis::RedisOpts,
    on_store_error: OnStoreError,
    clock: SharedClock,
) -> Remote {
    use crate::config::gateway::StoreKind;
    let (key_prefix, hold_lease) = (opts.key_prefix.clone(), opts.hold_lease);
    let redis = RedisStore::connect(std::slice::from_ref(&url), opts).await.expect("connect");
    let settings = ClusterSettings {
        store: StoreKind::Redis,
        redis: vec![url],
        key_prefix,
        hold_lease,
        on_store_error,
        expected_replicas: 1,
    };
    Remote::new(redis, &settings, FallbackMetrics::new().expect("metrics"), clock)
}

#[cfg(test)]
impl Remote {
    /// Lines written to the journal file since its last `fdatasync`.
    pub(crate) fn journal_unsynced(&self) -> bool {
        self.unsynced.load(Ordering::SeqCst)
    }

    /// Probes until the journal is replayed and Redis is back in use (at most 10 s), summing
    /// what each probe replayed. A Redis just restarted may refuse the first probes (the old
    /// connection is broken and is reconnected), so one probe is not enough.
    pub(crate) async fn replay_all(&self) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut done = 0;
        while self.in_fallback() || self.journal_len() > 0 {
            assert!(tokio::time::Instant::now() < deadline, "journal of {} not replayed in 10 s", self.journal_len());
            match self.probe().await {
                0 => tokio::time::sleep(Duration::from_millis(20)).await,
                n => done += n,
            }
        }
        done
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

    /// A settlement journaled while Redis was unreachable, replayed after its hold was swept
    /// (its lease ran out meanwhile): the package pays only if it holds the whole factor (SPEC
    /// §6) — here it does not (another call holds most of it) — so the call falls to
    /// pay-as-you-go, and its unit says so; nothing is taken from the package. The settlement
    /// counted nothing live (Redis did not answer it): the replay hands the charge back to be
    /// counted, under pay-as-you-go, once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replayed_commit_whose_hold_was_swept_pays_whole_or_falls_through() {
        use crate::store::redis::harness;
        let Some(server) =
            harness::RedisServer::start("a_replayed_commit_whose_hold_was_swept", harness::Opts::default())
        else {
            return;
        };
        let lease = Duration::from_millis(200);
        let remote = test_remote(server.url(), "tc", lease, OnStoreError::Local).await;
        let redis = remote.redis.clone();
        let charges = Arc::new(Mutex::new(Vec::new()));
        let sink = charges.clone();
        remote.on_replayed_charge(move |c| sink.lock().expect("charges").push(c));
        let (points, want) = (3_000_000i64, 2_000_000i64);
        // Call 1 holds on p; Redis becomes unreachable for its settlement (journaled); its lease
        // runs out and the sweep gives the points back; call 2 holds them.
        assert_eq!(redis.hold("acme", &[("p", points)], want, 1, lease).await.expect("hold"), Some(0));
        remote.journal(Replay::Settle {
            tenant: "acme".into(),
            id: 1,
            hold: HoldAction::Commit,
            held: Some(("p".into(), points)),
            alert_at: None,
            ratio: Decimal::new(2, 1),
            usage: Some(("od".into(), "2026-11".into(), "payer:single_package".into(), 1)),
            also: String::new(),
            image: ImagePart::None,
            instead: Some(PayInstead {
                want,
                candidates: vec![("p".into(), points, None, "payer:single_package".into())],
                field: "payer:payg".into(),
                also: "cell:".into(),
            }),
            count: Some(Box::new(Uncounted { currency: "CNY".into(), payg_tiers: Vec::new() })),
        });
        tokio::time::sleep(lease * 2).await;
        assert_eq!(redis.sweep_tenant("acme").await.expect("sweep"), (1, 0));
        assert_eq!(
            redis.hold("acme", &[("p", points)], want, 2, Duration::from_secs(30)).await.expect("hold"),
            Some(0)
        );
        assert_eq!(remote.probe().await, 1, "the settlement replayed");
        assert_eq!(remote.probe().await, 0, "once");
        assert_eq!(redis.package_consumed("acme", "p").await.expect("consumed"), 0, "p never paid call 1");
        assert_eq!(redis.package_held("acme", "p").await.expect("held"), want, "call 2's hold is untouched");
        let month = redis.month_cells("acme", "2026-11").await.expect("month");
        let fields = vec![("cell:".to_string(), 1), ("payer:payg".to_string(), 1)];
        assert_eq!(month, vec![("od".to_string(), fields)], "call 1 under pay-as-you-go, once");
        let counted = ReplayedCharge {
            tenant: "acme".into(),
            feature: "od".into(),
            to: UsageTo::Payer(crate::store::PayerKind::Payg),
            cell_total: Some(1),
            count: Uncounted { currency: "CNY".into(), payg_tiers: Vec::new() },
        };
        assert_eq!(*charges.lock().expect("charges"), vec![counted], "handed back once, under pay-as-you-go");
    }

    /// Journal entries of one month's usage (pay-as-you-go, one unit) for `tenant`, request `id`.
    fn usage(tenant: &str, id: u128) -> Replay {
        Replay::Usage {
            tenant: tenant.into(),
            feature: "f".into(),
            month: "2026-11".into(),
            to: UsageTo::Payer(crate::store::PayerKind::Payg),
            units: 1,
            cell: String::new(),
            id: RequestId(id),
        }
    }

    /// Makes Redis reject the usage entries of three tenants for good, as an operator or another
    /// program writing into turnstile's keys would: `wrongtype`'s month is a string (the script's
    /// `HINCRBY` answers `WRONGTYPE`), `err`'s month holds a field that is not an integer (`ERR
    /// hash value is not an integer`, a script runtime error), and `corrupt`'s replay marker for
    /// request `id` does not decode (the script answers a reply that is not a settlement's:
    /// `StoreError::Corrupt`).
    fn poison(server: &crate::store::redis::harness::RedisServer, redis: &RedisStore, corrupt_id: u128) {
        let month = |t: &str| format!("{}m:2026-11:f", redis.tenant_prefix(t));
        assert_eq!(server.cli(&["SET", &month("wrongtype"), "x"]), "OK");
        assert_eq!(server.cli(&["HSET", &month("err"), "payer:payg", "x"]), "1");
        let marker = format!("{}done:{corrupt_id:032x}:u:payer:payg:", redis.tenant_prefix("corrupt"));
        assert_eq!(server.cli(&["SET", &marker, "garbage"]), "OK");
    }

    /// The lines of `redis-journal.rejected` in `dir`, parsed (none when there is no file).
    /// What [`units`] shows for a tenant whose month holds one [`usage`] entry: one
    /// pay-as-you-go unit of feature `f`.
    fn one_payg_unit() -> Vec<(String, Vec<(String, i64)>)> {
        vec![("f".to_string(), vec![("cell:".to_string(), 1), ("payer:payg".to_string(), 1)])]
    }

    /// A Redis for `test` (none: the test is skipped) and a `local` replica on it, its journal
    /// kept in a fresh folder, switched to the fallback as a store error would.
    async fn on_the_fallback(
        test: &str,
    ) -> Option<(crate::store::redis::harness::RedisServer, tempfile::TempDir, Arc<Remote>)> {
        let server = crate::store::redis::harness::RedisServer::start(test, Default::default())?;
        let dir = tempfile::tempdir().expect("tempdir");
        let remote = Arc::new(test_remote(server.url(), "tc", Duration::from_secs(30), OnStoreError::Local).await);
        assert_eq!(remote.open_journal(dir.path()), Ok(0));
        let down = StoreError::Unavailable { backend: "redis".into(), reason: "test".into() };
        assert!(remote.failover(down).is_ok());
        Some((server, dir, remote))
    }

    fn rejected_lines(dir: &std::path::Path) -> Vec<serde_json::Value> {
        match std::fs::read_to_string(dir.join("redis-journal.rejected")) {
            Ok(text) => text.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => panic!("read the rejected file: {e}"),
        }
    }

    async fn units(redis: &RedisStore, tenant: &str) -> Vec<(String, Vec<(String, i64)>)> {
        redis.month_cells(tenant, "2026-11").await.expect("month")
    }

    /// An entry Redis rejects (an error reply that no retry can change: `WRONGTYPE`, a script
    /// runtime error, a reply that does not decode) used to stop the replay for good: it was
    /// retried at every probe, every later entry (other tenants' charges) never reached Redis,
    /// and the replica never left the fallback. Now each is set aside into
    /// `redis-journal.rejected` (one JSON line: seq, time, tenant, error, the entry) and the
    /// rest replays; a second probe replays nothing again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_redis_rejects_is_set_aside_and_the_entries_after_it_replay() {
        let Some((server, dir, remote)) = on_the_fallback("an_entry_redis_rejects_is_set_aside").await else { return };
        assert!(remote.in_fallback());
        poison(&server, &remote.redis, 4);
        let entries =
            [usage("wrongtype", 1), usage("good1", 2), usage("err", 3), usage("corrupt", 4), usage("good2", 5)];
        for e in &entries {
            remote.journal(e.clone());
        }
        let m = &remote.metrics;
        assert_eq!((m.journal_entries.get(), m.set_aside.get(), m.fallback.get()), (5, 0, 1));
        assert_eq!(remote.probe().await, 2, "the two healthy entries replayed past the rejected ones");
        assert_eq!(remote.journal_len(), 0, "nothing left in the journal");
        assert!(!remote.in_fallback(), "back on Redis");
        assert_eq!((m.journal_entries.get(), m.set_aside.get(), m.fallback.get()), (0, 3, 0), "the metrics say so");
        let one = one_payg_unit();
        assert_eq!(units(&remote.redis, "good1").await, one);
        assert_eq!(units(&remote.redis, "good2").await, one);
        let (_, left, _) = journal::JournalFile::open(dir.path()).expect("the journal reads back");
        assert!(left.is_empty(), "the journal file is emptied with the journal: {left:?}");

        let lines = rejected_lines(dir.path());
        assert_eq!(lines.len(), 3, "{lines:?}");
        for (line, (seq, tenant, error)) in
            // Sequence numbers start at 1 in a journal opened from a file.
            lines.iter().zip([
                (1, "wrongtype", "WRONGTYPE"),
                (3, "err", "not an integer"),
                (4, "corrupt", "corrupt"),
            ])
        {
            assert_eq!(line["seq"], seq, "{line}");
            assert_eq!(line["tenant"], tenant, "{line}");
            let text = line["error"].as_str().expect("error text");
            assert!(text.contains(error), "{text}");
            let at = line["at"].as_str().expect("a time");
            assert!(crate::time::parse_rfc3339(at).is_ok(), "{at}");
            let entry: Replay = serde_json::from_value(line["entry"].clone()).expect("the entry reads back");
            assert_eq!(entry, entries[seq - 1]);
        }

        assert_eq!(remote.probe().await, 0, "nothing more to replay");
        assert_eq!(rejected_lines(dir.path()).len(), 3, "nothing set aside twice");
        assert_eq!(m.set_aside.get(), 3, "nor counted twice");
        assert_eq!(units(&remote.redis, "good1").await, one, "replayed once");
    }

    /// A replica stopped with an entry Redis rejects in its journal file (and a healthy one after
    /// it) drains both at its next start: the healthy one reaches Redis, the rejected one goes
    /// to `redis-journal.rejected`, and the replica leaves the fallback it started on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_journal_file_holding_an_entry_redis_rejects_drains_at_the_next_start() {
        use crate::store::redis::harness;
        let Some(server) =
            harness::RedisServer::start("a_journal_file_holding_an_entry_redis_rejects", harness::Opts::default())
        else {
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let lease = Duration::from_secs(30);
        {
            let first = test_remote(server.url(), "tc", lease, OnStoreError::Local).await;
            assert_eq!(first.open_journal(dir.path()), Ok(0));
            first.journal(usage("wrongtype", 1));
            first.journal(usage("good1", 2));
            first.sync_journal_async().await;
        }
        let second = test_remote(server.url(), "tc", lease, OnStoreError::Local).await;
        poison(&server, &second.redis, 0);
        assert_eq!(second.open_journal(dir.path()), Ok(2));
        assert!(second.in_fallback(), "`local` starts on the fallback with entries to replay");
        assert_eq!(second.metrics.journal_entries.get(), 2, "the gauge shows the entries found on disk");
        assert_eq!(second.probe().await, 1);
        assert_eq!(second.journal_len(), 0);
        assert!(!second.in_fallback());
        let m = &second.metrics;
        assert_eq!((m.journal_entries.get(), m.set_aside.get(), m.fallback.get()), (0, 1, 0));
        let one = one_payg_unit();
        assert_eq!(units(&second.redis, "good1").await, one);
        let lines = rejected_lines(dir.path());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!((lines[0]["seq"].clone(), lines[0]["tenant"].clone()), (1.into(), "wrongtype".into()));
        let (_, left, _) = journal::JournalFile::open(dir.path()).expect("the journal reads back");
        assert!(left.is_empty(), "{left:?}");
    }

    /// The journal's mark that a set-aside entry left it is synced like an entry (within
    /// `flush_interval_ms`), not left to the kernel's writeback: a replica that lost it in a
    /// power cut would replay the entry at its next start, and once the operator has repaired
    /// the key, charge it to Redis while its rejected line still asks for it to be charged by hand.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_mark_of_a_set_aside_entry_is_synced_like_an_entry() {
        let Some((server, dir, remote)) = on_the_fallback("the_mark_of_a_set_aside_entry").await else { return };
        poison(&server, &remote.redis, 0);
        remote.journal(usage("wrongtype", 1));
        remote.sync_journal_async().await;
        assert!(!remote.journal_unsynced());
        assert_eq!(remote.probe().await, 0);
        assert_eq!((remote.journal_len(), rejected_lines(dir.path()).len()), (0, 1), "set aside");
        assert!(remote.journal_unsynced(), "the journal's change waits for the sync loop");
    }

    /// The rejected file cannot be written (here its path is a folder): the entry is not lost,
    /// it stays first in the journal (the entries after it wait, the replica stays on the
    /// fallback, `turnstile_store_journal_blocked` reads 1) and goes once the file can be
    /// written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_that_cannot_be_set_aside_stays_in_the_journal_until_it_can() {
        let Some((server, dir, remote)) = on_the_fallback("an_entry_that_cannot_be_set_aside").await else { return };
        poison(&server, &remote.redis, 0);
        let blocker = dir.path().join(journal::REJECTED);
        std::fs::create_dir(&blocker).expect("a folder where the file goes");
        remote.journal(usage("wrongtype", 1));
        remote.journal(usage("good1", 2));
        assert_eq!(remote.probe().await, 0);
        assert_eq!(remote.probe().await, 0, "tried again, still kept");
        assert_eq!(remote.journal_len(), 2, "the rejected entry is kept, and the one after it waits");
        assert!(remote.in_fallback());
        assert_eq!(remote.metrics.journal_blocked.get(), 1, "the journal is blocked behind it");
        let (_, left, _) = journal::JournalFile::open(dir.path()).expect("the journal reads back");
        assert_eq!(left.len(), 2, "and kept in the file: {left:?}");
        std::fs::remove_dir(&blocker).expect("remove the folder");
        assert_eq!(remote.probe().await, 1);
        assert_eq!((remote.journal_len(), remote.in_fallback()), (0, false));
        assert_eq!(rejected_lines(dir.path()).len(), 1);
        assert_eq!(remote.metrics.journal_blocked.get(), 0, "no longer blocked");
    }

    /// Redis calls bounded by 300 ms, live calls' markers (`done_ttl`) kept a second, and
    /// replays' markers kept `replay_done_ttl`.
    fn short_markers(replay_done_ttl: Duration) -> crate::store::redis::RedisOpts {
        crate::store::redis::RedisOpts {
            key_prefix: "tc".into(),
            op_timeout: Duration::from_millis(300),
            done_ttl: Duration::from_secs(1),
            replay_done_ttl,
            ..Default::default()
        }
    }

    /// A replica on the fallback, its journal in a fresh folder, on a Redis with `opts` and
    /// on `clock`. One entry (tenant `warm`) has been replayed already, so the settlement
    /// script is loaded and a later replay's `EVALSHA` runs as sent.
    async fn with_short_markers(
        test: &str,
        opts: crate::store::redis::RedisOpts,
        clock: SharedClock,
    ) -> Option<(crate::store::redis::harness::RedisServer, tempfile::TempDir, Remote)> {
        let server = crate::store::redis::harness::RedisServer::start(test, Default::default())?;
        let dir = tempfile::tempdir().expect("tempdir");
        let remote = test_remote_with(server.url(), opts, OnStoreError::Local, clock).await;
        assert_eq!(remote.open_journal(dir.path()), Ok(0));
        let down = StoreError::Unavailable { backend: "redis".into(), reason: "test".into() };
        assert!(remote.failover(down.clone()).is_ok());
        remote.journal(usage("warm", 99));
        assert_eq!(remote.replay_all().await, 1);
        assert!(remote.failover(down).is_ok());
        Some((server, dir, remote))
    }

    /// Replays `remote`'s journal while Redis holds every write for a second: the replay's
    /// script waits in Redis past the 300 ms bound (its answer is lost, the entry stays in the
    /// journal) and runs when the pause ends. Returns once Redis has applied it to `tenant`.
    async fn replay_with_the_answer_lost(
        server: &crate::store::redis::harness::RedisServer,
        remote: &Remote,
        tenant: &str,
    ) {
        assert_eq!(server.cli(&["CLIENT", "PAUSE", "1000", "WRITE"]), "OK");
        assert_eq!(remote.probe().await, 0, "the replay's answer was lost");
        assert_eq!(remote.journal_len(), 1, "so the entry stays in the journal");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        // Reads on the same connection wait behind the paused script (and may time out).
        while remote.redis.month_cells(tenant, "2026-11").await.ok() != Some(one_payg_unit()) {
            assert!(tokio::time::Instant::now() < deadline, "the paused replay never ran");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `first` journals one charge for `acme`, its replay's answer is lost, and it stops; after
    /// a second and a half (Redis forgets a live call's marker) and `later` on the replicas'
    /// clock, a second replica starts on the same journal, which holds the entry.
    async fn answer_lost_then_restart_later(
        server: &crate::store::redis::harness::RedisServer,
        dir: &tempfile::TempDir,
        first: Remote,
        opts: crate::store::redis::RedisOpts,
        clock: &Arc<crate::clock::ManualClock>,
        later: Duration,
    ) -> Remote {
        first.journal(usage("acme", 1));
        replay_with_the_answer_lost(server, &first, "acme").await;
        drop(first);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        clock.advance(later);
        let second = test_remote_with(server.url(), opts, OnStoreError::Local, clock.clone()).await;
        assert_eq!(second.open_journal(dir.path()), Ok(1));
        second
    }

    /// A replay that reached Redis but whose answer was lost stays in the journal and is sent
    /// again: idempotent only while its marker lives. Its marker used to be a live call's
    /// (`done_ttl`): once that had passed (here a second; an hour in production: Redis
    /// unreachable that long in between, or a replica stopped that long), the second replay
    /// charged the tenant a second time. A replay's marker is now kept `replay_done_ttl` (a
    /// week; here a minute).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_whose_answer_was_lost_is_not_charged_again_after_done_ttl() {
        let opts = short_markers(Duration::from_secs(60));
        let clock = crate::clock::SystemClock::shared();
        let Some((server, _dir, remote)) = with_short_markers("a_replay_whose_answer_was_lost", opts, clock).await
        else {
            return;
        };
        remote.journal(usage("acme", 1));
        replay_with_the_answer_lost(&server, &remote, "acme").await;
        // A live call's marker is gone by now.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        remote.replay_all().await;
        assert_eq!(units(&remote.redis, "acme").await, one_payg_unit(), "charged once in Redis");
        assert_eq!(remote.journal_len(), 0);
        assert_eq!(remote.metrics.set_aside.get(), 0, "replayed, nothing set aside");
    }

    /// An entry whose replay may have reached Redis longer ago than that replay's marker is kept
    /// (here a second) is never sent again blindly: Redis may have applied it and forgotten it.
    /// It is set aside for an operator (its line in `redis-journal.rejected` says when it was
    /// first sent), whether the time passes in one run or, as here, while the replica is
    /// stopped: the journal file keeps when each entry was first sent. Before, the entry was
    /// replayed at the next start and the tenant charged twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_first_sent_longer_ago_than_its_marker_is_kept_is_set_aside_not_charged_twice() {
        let clock = crate::clock::ManualClock::at("2026-11-02T00:00:00Z");
        let opts = short_markers(Duration::from_secs(1));
        let Some((server, dir, first)) =
            with_short_markers("an_entry_first_sent_longer_ago", opts.clone(), clock.clone()).await
        else {
            return;
        };
        // The replica stops before it replays again; Redis forgets the marker meanwhile.
        let second = answer_lost_then_restart_later(&server, &dir, first, opts, &clock, Duration::from_secs(1)).await;
        assert_eq!(second.replay_all().await, 0, "nothing replayed");
        assert_eq!(units(&second.redis, "acme").await, one_payg_unit(), "charged once in Redis");
        let m = &second.metrics;
        assert_eq!((m.journal_entries.get(), m.set_aside.get(), m.fallback.get()), (0, 1, 0), "set aside");
        let lines = rejected_lines(dir.path());
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!((lines[0]["seq"].clone(), lines[0]["tenant"].clone()), (2.into(), "acme".into()));
        let error = lines[0]["error"].as_str().expect("error text");
        assert!(error.contains("first sent to Redis at 2026-11-02T00:00:00.000Z"), "{error}");
        let entry: Replay = serde_json::from_value(lines[0]["entry"].clone()).expect("the entry reads back");
        assert_eq!(entry, usage("acme", 1));
        let (_, left, _) = journal::JournalFile::open(dir.path()).expect("the journal reads back");
        assert!(left.is_empty(), "{left:?}");
    }

    /// A live settlement Redis applied but whose answer was lost is journaled with when it was
    /// tried: its marker is a live call's (`done_ttl`, here a second), so once that has nearly
    /// passed it is set aside rather than replayed into a Redis that no longer knows it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_live_settlement_journaled_after_its_marker_expired_is_set_aside_not_charged_twice() {
        let clock = crate::clock::ManualClock::at("2026-11-02T00:00:00Z");
        let opts = short_markers(Duration::from_secs(60));
        let Some((_server, dir, remote)) =
            with_short_markers("a_live_settlement_journaled_after", opts, clock.clone()).await
        else {
            return;
        };
        // The live call, as its replay would make it; Redis applied it, its answer was lost.
        let key = BucketKey { tenant: "acme", bucket: "f", local: 0 };
        let to = UsageTo::Payer(crate::store::PayerKind::Payg);
        remote.redis.add_usage(key, "2026-11", to, 1, "", RequestId(1)).await.expect("the live call");
        remote.journal_sent(usage("acme", 1), Some(remote.tried_now()));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        clock.advance(Duration::from_secs(1));
        assert_eq!(remote.replay_all().await, 0, "nothing replayed");
        assert_eq!(units(&remote.redis, "acme").await, one_payg_unit(), "charged once in Redis");
        assert_eq!(remote.metrics.set_aside.get(), 1);
        let lines = rejected_lines(dir.path());
        assert_eq!(lines.len(), 1, "{lines:?}");
        let error = lines[0]["error"].as_str().expect("error text");
        assert!(
            error.contains("first sent to Redis at 2026-11-02T00:00:00.000Z") && error.contains("kept 1 s"),
            "{error}"
        );
    }

    /// A hold's release is no charge: sent twice it gives back nothing more (the hold is gone,
    /// or its lease ended long before), so however long ago it was first sent it is sent, not
    /// set aside for an operator to reconcile.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_release_first_sent_long_ago_is_sent_not_set_aside() {
        let clock = crate::clock::ManualClock::at("2026-11-02T00:00:00Z");
        let opts = short_markers(Duration::from_secs(60));
        let Some((_server, dir, remote)) =
            with_short_markers("a_release_first_sent_long_ago", opts, clock.clone()).await
        else {
            return;
        };
        remote.journal_sent(Replay::Release { tenant: "acme".into(), id: 5 }, Some(remote.tried_now()));
        clock.advance(Duration::from_secs(3600));
        assert_eq!(remote.replay_all().await, 1, "sent");
        assert_eq!((remote.journal_len(), remote.metrics.set_aside.get()), (0, 0), "nothing set aside");
        assert!(rejected_lines(dir.path()).is_empty());
    }

    /// Within its marker's time, an entry whose replay's answer was lost and whose replica
    /// stopped is replayed at the next start and answered from the marker: charged once,
    /// nothing set aside.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_entry_replayed_again_at_the_next_start_within_its_marker_is_charged_once() {
        let clock = crate::clock::ManualClock::at("2026-11-02T00:00:00Z");
        let opts = short_markers(Duration::from_secs(60));
        let Some((server, dir, first)) =
            with_short_markers("an_entry_replayed_again_at_the_next_start", opts.clone(), clock.clone()).await
        else {
            return;
        };
        // Past a live call's marker (a second), within the replay's (a minute).
        let second = answer_lost_then_restart_later(&server, &dir, first, opts, &clock, Duration::from_secs(50)).await;
        assert_eq!(second.replay_all().await, 1);
        assert_eq!(units(&second.redis, "acme").await, one_payg_unit(), "charged once in Redis");
        assert_eq!(second.metrics.set_aside.get(), 0);
        assert!(rejected_lines(dir.path()).is_empty());
    }

    /// An ACL that refuses a command a script calls (here `HINCRBY`, taken from the user turnstile
    /// connects as) is an operator's setting that passes once fixed, like the `NOPERM` the same
    /// command gets outside a script: Redis answers it inside a script as an `ERR` of the script
    /// (`The user executing the script can't run this command...`), which must not set the
    /// charge aside. It stays in the journal and replays once the ACL allows it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acl_refusal_inside_a_script_is_retried_not_set_aside() {
        let Some((server, dir, remote)) = on_the_fallback("an_acl_refusal_inside_a_script").await else { return };
        remote.journal(usage("good1", 1));
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "-hincrby"]), "OK");
        assert_eq!(remote.probe().await, 0);
        assert_eq!(remote.journal_len(), 1, "kept in the journal, to be replayed");
        assert!(rejected_lines(dir.path()).is_empty(), "nothing set aside: {:?}", rejected_lines(dir.path()));
        assert!(remote.in_fallback());
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "+hincrby"]), "OK");
        assert_eq!(remote.probe().await, 1);
        assert_eq!((remote.journal_len(), remote.in_fallback()), (0, false));
        let one = one_payg_unit();
        assert_eq!(units(&remote.redis, "good1").await, one, "charged once the ACL allows it");
    }

    /// A first entry that fails at every replay with an error that may pass (here an ACL refusal
    /// inside its script; a script that always times out is the same case) used to block the
    /// journal with only a warning at every probe that named nothing: the replica stayed on the
    /// fallback and nothing said which entry held it. It is still retried, never set aside (a
    /// timed-out entry may have been applied), but after [`STUCK_AFTER`] failures in a row it
    /// is named once and `turnstile_store_journal_blocked` reads 1 until it leaves; a later
    /// first entry is counted afresh.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_first_entry_that_keeps_failing_blocks_the_journal_and_says_so_until_it_passes() {
        let Some((server, dir, remote)) = on_the_fallback("a_first_entry_that_keeps_failing").await else { return };
        let m = &remote.metrics;
        remote.journal(usage("good1", 1));
        remote.journal(usage("good2", 2));
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "-hincrby"]), "OK");
        for n in 1..STUCK_AFTER {
            assert_eq!(remote.probe().await, 0);
            assert_eq!(m.journal_blocked.get(), 0, "not blocked after {n} failures");
        }
        assert_eq!(remote.probe().await, 0);
        assert_eq!(m.journal_blocked.get(), 1, "blocked at the {STUCK_AFTER}th failure in a row");
        assert_eq!(remote.probe().await, 0);
        assert_eq!((m.journal_blocked.get(), m.journal_entries.get(), m.fallback.get()), (1, 2, 1));
        assert!(rejected_lines(dir.path()).is_empty(), "never set aside by itself");
        assert_eq!(m.set_aside.get(), 0);
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "+hincrby"]), "OK");
        assert_eq!(remote.probe().await, 2);
        assert_eq!((m.journal_blocked.get(), m.journal_entries.get(), m.fallback.get()), (0, 0, 0));
        assert_eq!(units(&remote.redis, "good1").await, one_payg_unit());

        // A second spell: its first entry is counted from 1 again.
        let down = StoreError::Unavailable { backend: "redis".into(), reason: "test".into() };
        assert!(remote.failover(down).is_ok());
        remote.journal(usage("good3", 3));
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "-hincrby"]), "OK");
        for _ in 1..STUCK_AFTER {
            assert_eq!(remote.probe().await, 0);
        }
        assert_eq!(m.journal_blocked.get(), 0, "counted afresh");
        assert_eq!(remote.probe().await, 0);
        assert_eq!(m.journal_blocked.get(), 1);
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "+hincrby"]), "OK");
        assert_eq!(remote.probe().await, 1);
        assert_eq!((m.journal_blocked.get(), m.journal_entries.get(), m.fallback.get()), (0, 0, 0));
    }

    /// A first entry that failed a few times and then passed does not count toward the next
    /// one's failures: only failures in a row of one entry block the journal.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failures_of_an_entry_that_passed_do_not_count_for_the_next() {
        let Some((server, _dir, remote)) = on_the_fallback("failures_of_an_entry_that_passed").await else { return };
        let m = &remote.metrics;
        remote.journal(Replay::Alert { tenant: "t1".into(), package: "p".into() });
        remote.journal(usage("good1", 2));
        // Both fail (the alert's mark is an HSETNX), then the alert passes and the usage still fails.
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "-hincrby", "-hsetnx"]), "OK");
        for _ in 1..STUCK_AFTER {
            assert_eq!(remote.probe().await, 0);
        }
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "+hsetnx"]), "OK");
        assert_eq!(remote.probe().await, 1, "the alert passed");
        for _ in 2..STUCK_AFTER {
            assert_eq!(remote.probe().await, 0);
        }
        assert_eq!(m.journal_blocked.get(), 0, "{} failures of the usage entry so far", STUCK_AFTER - 1);
        assert_eq!(remote.probe().await, 0);
        assert_eq!(m.journal_blocked.get(), 1);
        assert_eq!(server.cli(&["ACL", "SETUSER", "default", "+hincrby"]), "OK");
        assert_eq!(remote.probe().await, 1);
        assert_eq!((m.journal_blocked.get(), m.journal_entries.get()), (0, 0));
    }

    /// A journal kept in memory only (no ledger folder): the rejected entry is logged (with the
    /// entry) and leaves the journal; the rest replays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn without_a_journal_file_a_rejected_entry_is_logged_and_the_rest_replays() {
        use crate::store::redis::harness;
        let Some(server) = harness::RedisServer::start("without_a_journal_file_a_rejected", harness::Opts::default())
        else {
            return;
        };
        let remote = test_remote(server.url(), "tc", Duration::from_secs(30), OnStoreError::Local).await;
        poison(&server, &remote.redis, 3);
        for (id, t) in [(1, "wrongtype"), (2, "err"), (3, "corrupt"), (4, "good1")] {
            remote.journal(usage(t, id));
        }
        assert_eq!(remote.replay_all().await, 1);
        assert_eq!(remote.journal_len(), 0);
        let one = one_payg_unit();
        assert_eq!(units(&remote.redis, "good1").await, one);
    }

    /// SPEC §11.2 with `on_store_error = "local"`: `known` (what Redis last said a package
    /// consumed) is what the fallback subtracts from its points. Settlements end on different
    /// tasks, so their notes come in any order: one answered earlier (less consumed) noted last
    /// lowered it, and the fallback offered points spent on Redis. Found by
    /// `concurrent_calls_across_a_hung_redis_on_the_fallback_are_charged_once` (tests/cluster.rs,
    /// 12 clients: od-1 of 60 points paid 62-63 calls in the report once Redis was back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_settlement_answered_earlier_noted_last_does_not_lower_what_the_fallback_knows() {
        use crate::store::redis::harness;
        let Some(server) = harness::RedisServer::start("known_consumed_in_any_order", harness::Opts::default()) else {
            return;
        };
        let remote = test_remote(server.url(), "tc", Duration::from_secs(30), OnStoreError::Local).await;
        remote.note_consumed(7, 2_000_000);
        remote.note_consumed(7, 1_000_000);
        assert_eq!(remote.known_consumed(7), 2_000_000, "the older answer, noted last");
    }
}
