//! The durable ledger (SPEC §7): package consumption, monthly usage per payer, alerts fired.
//!
//! [`LedgerStore`] is the narrow interface (load everything at start; commit a batch of absolute
//! records atomically) so that a shared store can replace [`RedbLedger`]. Records hold absolute
//! values, so writing one twice is harmless and the latest commit always wins.
//!
//! [`RedbLedger`] keeps them in `<dir>/ledger.redb` (redb: ACID, copy-on-write B-trees,
//! checksummed) behind a write-ahead log ([`wal`]): a commit appends one checksummed frame to
//! the log and makes it durable with one `fdatasync`, and a thread of its own folds the log into
//! redb every few seconds, one transaction per fold, each record inserted once however often it
//! changed meanwhile. The fold also notes in redb the last log segment it holds, so a segment
//! left behind is never replayed over newer values. Opening replays what the last fold did not
//! hold; a torn tail of the log (a commit cut short by a crash, never acknowledged) is dropped
//! with a warning; a file redb cannot open, a damaged log before its tail, or a record that does
//! not decode is an error that names the path: balances are never silently reset.

mod codec;
mod wal;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use rust_decimal::Decimal;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};

use crate::config::Dec;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger {path}: cannot create the folder: {reason}")]
    CreateDir { path: PathBuf, reason: String },
    #[error("ledger {path}: cannot open: {reason}")]
    Open { path: PathBuf, reason: String },
    #[error("ledger {path}: corrupt record {key}: {reason}")]
    Corrupt { path: PathBuf, key: String, reason: String },
    #[error("ledger {path}: damaged log: {reason}")]
    Log { path: PathBuf, reason: String },
    #[error("ledger {path}: write failed: {reason}")]
    Write { path: PathBuf, reason: String },
}

pub use crate::payer::PAYERS;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PackageRecord {
    pub tenant: String,
    pub id: String,
    pub consumed: Dec,
    pub alerted: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonthRecord {
    pub tenant: String,
    pub feature: String,
    /// `YYYY-MM` in the billing timezone.
    pub month: String,
    /// Units per payer, indexed like [`PAYERS`].
    pub units: [Dec; 5],
    /// Pay-as-you-go units per price cell: `""` for tiered per-call features, the video cell
    /// (`fps<=60,lines<=1440`) for video, [`UNPRICED`] where no price applies.
    pub payg: BTreeMap<String, Dec>,
    /// Video minutes nothing could pay for (no package left, no price, no `prepaid_qps`).
    /// Absent in records written before it existed: zero.
    #[serde(default = "zero_dec")]
    pub unpaid: Dec,
    /// True since integer units (issue 12): the values are store units (calls, or ms for
    /// video). Absent (false) in older records, which kept decimal minutes for video.
    #[serde(default)]
    pub integer: bool,
}

/// The pay-as-you-go cell of video minutes outside the feature's price matrix (or of a video
/// feature without prices): metered, shown with a null amount.
pub const UNPRICED: &str = "unpriced";

fn zero_dec() -> Dec {
    Dec(Decimal::ZERO)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageCountRecord {
    pub tenant: String,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Package(PackageRecord),
    Month(MonthRecord),
    ImageCount(ImageCountRecord),
}

impl Record {
    /// Its table, in the log and in redb: 0 packages, 1 months, 2 image counts ([`TABLES`]).
    fn table(&self) -> u8 {
        match self {
            Record::Package(_) => 0,
            Record::Month(_) => 1,
            Record::ImageCount(_) => 2,
        }
    }

    /// Its key in redb: the JSON array of its names (`["acme","od-1"]`). Serialized from a
    /// tuple, not a `serde_json::Value`: the same text without the tree.
    fn key(&self) -> String {
        let key = match self {
            Record::Package(p) => serde_json::to_string(&(&p.tenant, &p.id)),
            Record::Month(m) => serde_json::to_string(&(&m.tenant, &m.feature, &m.month)),
            Record::ImageCount(i) => serde_json::to_string(&(&i.tenant,)),
        };
        // Strings only: serializing them cannot fail.
        key.unwrap_or_default()
    }

    /// Its value in redb: its JSON.
    fn json(&self) -> serde_json::Result<Vec<u8>> {
        match self {
            Record::Package(p) => serde_json::to_vec(p),
            Record::Month(m) => serde_json::to_vec(m),
            Record::ImageCount(i) => serde_json::to_vec(i),
        }
    }
}

/// What a ledger must do.
pub trait LedgerStore: Send + Sync {
    /// Every record, as last committed.
    fn load(&self) -> Result<Vec<Record>, LedgerError>;
    /// Writes all `records` in one atomic, durable step.
    fn commit(&self, records: &[Record]) -> Result<(), LedgerError>;
    /// Where it lives (for messages).
    fn describe(&self) -> String;
}

const PACKAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("packages");
const MONTHS: TableDefinition<&str, &[u8]> = TableDefinition::new("months");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("image_counts");
/// Indexed by a record's table number.
const TABLES: [TableDefinition<&str, &[u8]>; 3] = [PACKAGES, MONTHS, IMAGES];
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// The last log segment folded into redb: segments up to it are never replayed.
const FOLDED: &str = "folded_log_segment";

/// When the log is folded into redb: once its current segment holds `max_bytes`, or is
/// `max_age` old at a commit. A crash replays at most about two segments at the next start.
#[derive(Debug, Clone, Copy)]
pub struct Checkpoint {
    pub max_bytes: u64,
    pub max_age: Duration,
}

impl Default for Checkpoint {
    fn default() -> Self {
        Checkpoint { max_bytes: 32 << 20, max_age: Duration::from_secs(10) }
    }
}

/// The latest value of each record in the log's form ([`codec`]), by its name: what a fold
/// writes. Boxed bytes, so that a record already held is found (and its value overwritten in
/// place) without allocating.
type Latest = HashMap<Box<[u8]>, Vec<u8>, FxBuildHasher>;

/// Records as redb holds them, by (table, key).
type Stored = BTreeMap<(u8, String), Record>;

/// A logged record read back: the table is a name's first byte.
fn decode_logged(name: &[u8], value: &[u8]) -> Result<Record, &'static str> {
    let (table, identity) = name.split_first().ok_or("a name without a table")?;
    codec::decode(usize::from(*table), identity, value)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The redb file and the folder of the log, shared with the folding thread.
struct Files {
    dir: PathBuf,
    path: PathBuf,
    /// `None` after a failed fold: redb refuses every operation after an I/O error
    /// (`PreviousIo`) until the database is reopened, so the next fold reopens it first.
    /// Held for a whole fold and for a whole `load`, so a `load` never sees a segment deleted
    /// under it.
    db: Mutex<Option<Database>>,
}

impl Files {
    fn write_err(&self, e: impl std::fmt::Display) -> LedgerError {
        LedgerError::Write { path: self.path.clone(), reason: e.to_string() }
    }

    fn open_err(&self, e: impl std::fmt::Display) -> LedgerError {
        LedgerError::Open { path: self.path.clone(), reason: e.to_string() }
    }

    fn db<'a>(&self, guard: &'a mut Option<Database>) -> Result<&'a Database, LedgerError> {
        if guard.is_none() {
            // Reopening also lets redb repair what the failed transaction left behind.
            *guard = Some(Database::create(&self.path).map_err(|e| self.write_err(format!("reopening: {e}")))?);
        }
        guard.as_ref().ok_or_else(|| self.write_err("closed"))
    }

    /// Writes `latest` and marks the log folded up to segment `upto`, in one transaction; then
    /// deletes those segments (a segment left behind is skipped by its number).
    fn fold(&self, latest: &Latest, upto: u64) -> Result<(), LedgerError> {
        let mut rows = Vec::with_capacity(latest.len());
        for (name, value) in latest {
            // From commits, or from a log checked when it was replayed.
            let record = decode_logged(name, value).map_err(|e| self.write_err(format!("a logged record: {e}")))?;
            rows.push((usize::from(record.table()), record.key(), record.json().map_err(|e| self.write_err(e))?));
        }
        let mut guard = lock(&self.db);
        let db = self.db(&mut guard)?;
        let result = (|| -> Result<(), redb::Error> {
            let txn = db.begin_write()?;
            {
                let mut tables = [txn.open_table(PACKAGES)?, txn.open_table(MONTHS)?, txn.open_table(IMAGES)?];
                for (table, key, json) in &rows {
                    tables[*table].insert(key.as_str(), json.as_slice())?;
                }
                let mut meta = txn.open_table(META)?;
                let folded = meta.get(FOLDED)?.map(|v| v.value()).unwrap_or(0);
                meta.insert(FOLDED, folded.max(upto))?;
            }
            txn.commit()?;
            Ok(())
        })();
        if let Err(e) = result {
            // Closed (its file lock released); reopened by the next attempt.
            *guard = None;
            return Err(self.write_err(e));
        }
        for (seq, path) in wal::segments(&self.dir).map_err(|e| self.write_err(e))? {
            if seq <= upto {
                if let Err(e) = std::fs::remove_file(&path) {
                    tracing::warn!(log = %path.display(), error = %e, "cannot delete a folded ledger log segment (it is skipped on replay)");
                }
            }
        }
        Ok(())
    }

    /// Every record in redb by (table, key), with the last folded segment. Called with `db`
    /// locked.
    fn read_db(&self, db: &Database) -> Result<(Stored, u64), LedgerError> {
        let txn = db.begin_read().map_err(|e| self.open_err(e))?;
        let mut out = BTreeMap::new();
        for (n, def) in TABLES.into_iter().enumerate() {
            let table = match txn.open_table(def) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => continue,
                Err(e) => return Err(self.open_err(e)),
            };
            for row in table.iter().map_err(|e| self.open_err(e))? {
                let (k, v) = row.map_err(|e| self.open_err(e))?;
                let (key, bytes) = (k.value(), v.value());
                let record = match n {
                    0 => Record::Package(decode(&self.path, key, bytes)?),
                    1 => Record::Month(decode(&self.path, key, bytes)?),
                    _ => Record::ImageCount(decode(&self.path, key, bytes)?),
                };
                out.insert((n as u8, key.to_string()), record);
            }
        }
        Ok((out, self.folded(&txn)?))
    }

    /// The last log segment folded into redb (0: none yet).
    fn folded(&self, txn: &redb::ReadTransaction) -> Result<u64, LedgerError> {
        match txn.open_table(META) {
            Ok(meta) => Ok(meta.get(FOLDED).map_err(|e| self.open_err(e))?.map(|v| v.value()).unwrap_or(0)),
            Err(TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(self.open_err(e)),
        }
    }

    /// Overlays on `into` every segment after `folded`, oldest first. Returns the last segment's
    /// number (`folded` when there is none after it).
    fn replay(&self, folded: u64, into: &mut Latest) -> Result<u64, LedgerError> {
        let log_err = |path: &Path, reason: String| LedgerError::Log { path: path.to_path_buf(), reason };
        let segments = wal::segments(&self.dir).map_err(|e| log_err(&self.dir, e.to_string()))?;
        let mut last = folded;
        let count = segments.len();
        for (i, (seq, path)) in segments.into_iter().enumerate() {
            if seq <= folded {
                continue;
            }
            last = seq;
            let bytes = std::fs::read(&path).map_err(|e| log_err(&path, e.to_string()))?;
            let read = wal::read(&bytes).map_err(|e| log_err(&path, e))?;
            if read.dropped > 0 {
                if i + 1 < count {
                    return Err(log_err(
                        &path,
                        format!(
                            "{} bytes at its end, from byte {}, do not read as a whole frame, and it is not the last segment",
                            read.dropped, read.end
                        ),
                    ));
                }
                tracing::warn!(
                    log = %path.display(),
                    bytes = read.dropped,
                    from_byte = read.end,
                    "dropped the torn tail of the ledger log (a commit cut short by a crash, never acknowledged)"
                );
            }
            for e in read.entries {
                let record = match read.v1 {
                    false => decode_logged(e.name, e.value),
                    true => e
                        .name
                        .split_first()
                        .ok_or("a name without a table")
                        .and_then(|(table, identity)| codec::decode_v1(usize::from(*table), identity, e.value)),
                }
                .map_err(|reason| log_err(&path, format!("a record: {reason}")))?;
                if read.v1 {
                    // Held in the current form, under the name the next commits write it with.
                    let (mut name, mut value) = (vec![record.table()], Vec::new());
                    codec::identity(&record, &mut name);
                    codec::fields(&record, &mut value);
                    into.insert(name.into(), value);
                } else {
                    into.insert(e.name.into(), e.value.to_vec());
                }
            }
        }
        Ok(last)
    }
}

/// What the committing side hands the folding thread.
enum Job {
    /// Fold `latest`, everything in the segments up to `upto`.
    Fold { upto: u64, latest: Latest },
    /// Fold what is still unfolded, answer whether all of it is, and end.
    Stop(mpsc::Sender<bool>),
}

/// The log segment commits append to, and what it holds that redb does not yet.
struct Log {
    segment: wal::Segment,
    next_seq: u64,
    latest: Latest,
    frame: Vec<u8>,
    /// Where each record of the frame lies in it: name, value.
    entries: Vec<(Range<usize>, Range<usize>)>,
    /// A new segment could not be created; logged once until one can.
    rotate_failed: bool,
}

pub struct RedbLedger {
    files: Arc<Files>,
    log: Mutex<Log>,
    checkpoint: Checkpoint,
    /// `None` once closed.
    folds: Mutex<Option<(mpsc::Sender<Job>, JoinHandle<()>)>>,
}

impl RedbLedger {
    pub const FILE: &'static str = "ledger.redb";

    /// Opens (or creates) `<dir>/ledger.redb`, folds into it whatever of the log the last run
    /// did not, and starts a new log segment (proving the folder can be written now, not at the
    /// first charge).
    pub fn open(dir: &Path) -> Result<RedbLedger, LedgerError> {
        Self::open_with(dir, Checkpoint::default())
    }

    pub fn open_with(dir: &Path, checkpoint: Checkpoint) -> Result<RedbLedger, LedgerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LedgerError::CreateDir { path: dir.to_path_buf(), reason: e.to_string() })?;
        let path = dir.join(Self::FILE);
        let db =
            Database::create(&path).map_err(|e| LedgerError::Open { path: path.clone(), reason: e.to_string() })?;
        let files = Arc::new(Files { dir: dir.to_path_buf(), path, db: Mutex::new(Some(db)) });
        let (unfolded, last) = {
            let guard = lock(&files.db);
            let db = guard.as_ref().ok_or_else(|| files.open_err("closed"))?;
            let folded = files.folded(&db.begin_read().map_err(|e| files.open_err(e))?)?;
            let mut unfolded = Latest::default();
            let last = files.replay(folded, &mut unfolded)?;
            (unfolded, last)
        };
        if !unfolded.is_empty() {
            tracing::info!(ledger = %files.path.display(), records = unfolded.len(), "replayed the ledger log");
        }
        // Also creates the tables on first use.
        files.fold(&unfolded, last)?;
        let segment = wal::Segment::create(dir, last + 1).map_err(|e| files.write_err(e))?;
        let (tx, rx) = mpsc::channel();
        let shared = files.clone();
        let folder = std::thread::Builder::new()
            .name("ledger-fold".into())
            .spawn(move || fold_loop(&shared, &rx))
            .map_err(|e| files.write_err(format!("cannot start the fold thread: {e}")))?;
        Ok(RedbLedger {
            files,
            log: Mutex::new(Log {
                segment,
                next_seq: last + 2,
                latest: Latest::default(),
                frame: Vec::new(),
                entries: Vec::new(),
                rotate_failed: false,
            }),
            checkpoint,
            folds: Mutex::new(Some((tx, folder))),
        })
    }

    /// Starts the next segment and hands the current one's records to the folding thread. When
    /// no segment can be created, commits go on appending to the current one.
    fn rotate(&self, log: &mut Log) {
        match wal::Segment::create(&self.files.dir, log.next_seq) {
            Ok(new) => {
                log.next_seq += 1;
                log.rotate_failed = false;
                let upto = std::mem::replace(&mut log.segment, new).seq;
                let latest = std::mem::take(&mut log.latest);
                if let Some((tx, _)) = lock(&self.folds).as_ref() {
                    let _ = tx.send(Job::Fold { upto, latest });
                }
            }
            Err(e) => {
                if !log.rotate_failed {
                    tracing::warn!(ledger = %self.files.path.display(), error = %e, "cannot start a new ledger log segment; appending to the current one");
                    log.rotate_failed = true;
                }
            }
        }
    }

    /// Folds everything into redb and stops the folding thread; logged, not returned, when it
    /// cannot (the log keeps it all and is replayed at the next open). Run on drop.
    fn close(&self) {
        let Some((tx, folder)) = lock(&self.folds).take() else { return };
        let (reply, answer) = mpsc::channel();
        {
            // Dropping: no commit follows, so the current segment is folded (and deleted) too.
            let mut log = lock(&self.log);
            let latest = std::mem::take(&mut log.latest);
            let _ = tx.send(Job::Fold { upto: log.segment.seq, latest });
            let _ = tx.send(Job::Stop(reply));
        }
        if answer.recv() != Ok(true) {
            tracing::warn!(ledger = %self.files.path.display(), "the ledger log could not all be folded into redb; it is replayed at the next start");
        }
        let _ = folder.join();
    }
}

#[cfg(test)]
impl RedbLedger {
    /// Stops the folding thread without folding: from here on the files stay as a crash would
    /// leave them (dropping the ledger folds nothing).
    fn stop_folding(&self) {
        if let Some((tx, folder)) = lock(&self.folds).take() {
            drop(tx);
            let _ = folder.join();
        }
    }
}

impl Drop for RedbLedger {
    fn drop(&mut self) {
        self.close();
    }
}

/// The folding thread: merges what it is handed (newer values win) and folds it in one
/// transaction; a failed fold is logged once per spell and retried every second, the log
/// keeping everything meanwhile.
fn fold_loop(files: &Files, jobs: &mpsc::Receiver<Job>) {
    let mut latest = Latest::default();
    let mut upto: Option<u64> = None;
    let mut failures: u64 = 0;
    loop {
        let job = if upto.is_some() {
            jobs.recv_timeout(Duration::from_secs(1))
        } else {
            jobs.recv().map_err(|_| mpsc::RecvTimeoutError::Disconnected)
        };
        let mut stop = None;
        let mut take = |job: Job| match job {
            Job::Fold { upto: u, latest: l } => {
                latest.extend(l);
                upto = Some(u);
            }
            Job::Stop(reply) => stop = Some(reply),
        };
        match job {
            Ok(job) => take(job),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        while let Ok(job) = jobs.try_recv() {
            take(job);
        }
        if let Some(u) = upto {
            match files.fold(&latest, u) {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!(ledger = %files.path.display(), failed_folds = failures, "the ledger log folds into redb again");
                    }
                    failures = 0;
                    latest.clear();
                    upto = None;
                }
                Err(e) => {
                    if failures == 0 {
                        tracing::error!(error = %e, "folding the ledger log into redb failed; the log keeps every charge, retrying");
                    }
                    failures += 1;
                }
            }
        }
        if let Some(reply) = stop {
            let _ = reply.send(upto.is_none());
            return;
        }
    }
}

fn decode<T: for<'de> Deserialize<'de>>(path: &Path, key: &str, bytes: &[u8]) -> Result<T, LedgerError> {
    serde_json::from_slice(bytes).map_err(|e| LedgerError::Corrupt {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason: e.to_string(),
    })
}

impl LedgerStore for RedbLedger {
    fn load(&self) -> Result<Vec<Record>, LedgerError> {
        // No commit appends and no fold deletes a segment while the two are read.
        let _log = lock(&self.log);
        let mut guard = lock(&self.files.db);
        let db = self.files.db(&mut guard).map_err(|e| self.files.open_err(e))?;
        let (mut records, folded) = self.files.read_db(db)?;
        let mut logged = Latest::default();
        self.files.replay(folded, &mut logged)?;
        for (name, value) in &logged {
            // Checked by `replay`.
            if let Ok(record) = decode_logged(name, value) {
                records.insert((record.table(), record.key()), record);
            }
        }
        Ok(records.into_values().collect())
    }

    fn commit(&self, records: &[Record]) -> Result<(), LedgerError> {
        let mut guard = lock(&self.log);
        let log = &mut *guard;
        if records.is_empty() {
            return Ok(());
        }
        // Encoded in place, into the frame (no allocation per record once the buffers have grown).
        log.entries.clear();
        wal::start_frame(&mut log.frame);
        for r in records {
            let entry = wal::push_entry(&mut log.frame, r.table(), |b| codec::identity(r, b), |b| codec::fields(r, b));
            log.entries.push(entry);
        }
        wal::finish_frame(&mut log.frame);
        log.segment.append(&log.frame).map_err(|e| self.files.write_err(e))?;
        for (name, value) in &log.entries {
            let (name, value) = (&log.frame[name.clone()], &log.frame[value.clone()]);
            match log.latest.get_mut(name) {
                Some(held) => {
                    held.clear();
                    held.extend_from_slice(value);
                }
                None => {
                    log.latest.insert(name.into(), value.to_vec());
                }
            }
        }
        if log.segment.len() >= self.checkpoint.max_bytes || log.segment.created.elapsed() >= self.checkpoint.max_age {
            self.rotate(log);
        }
        Ok(())
    }

    fn describe(&self) -> String {
        self.files.path.display().to_string()
    }
}

/// The `YYYY-MM` month of a Unix time in `offset`, as text.
pub fn month_of(unix_nanos: i64, offset: chrono::FixedOffset) -> String {
    month_text(unix_nanos, offset).as_str().to_string()
}

/// A `YYYY-MM` month on the stack: four digits, `-`, two digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonthText([u8; 7]);

impl MonthText {
    pub fn as_str(&self) -> &str {
        // ASCII digits and `-` only: always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or("0000-00")
    }
}

/// The `YYYY-MM` month of a Unix time in `offset`, on the stack (settlements take it per call).
/// Worked out once a second per thread: a fixed offset is whole seconds, so a month starts on a
/// whole second.
pub fn month_text(unix_nanos: i64, offset: chrono::FixedOffset) -> MonthText {
    use chrono::{Datelike, TimeZone};
    thread_local! {
        static LAST: std::cell::Cell<(i64, i32, MonthText)> = const { std::cell::Cell::new((i64::MIN, 0, MonthText([0; 7]))) };
    }
    let (secs, off) = (unix_nanos.div_euclid(crate::time::NANOS_PER_SEC), offset.local_minus_utc());
    LAST.with(|last| {
        let (s, o, month) = last.get();
        if (s, o) == (secs, off) {
            return month;
        }
        // i64 nanoseconds reach the years 1677-2262: four digits.
        let t = offset.timestamp_nanos(unix_nanos);
        let (y, m) = (t.year().clamp(0, 9999) as u32, t.month());
        let d = |n: u32| b'0' + (n % 10) as u8;
        let month = MonthText([d(y / 1000), d(y / 100), d(y / 10), d(y), b'-', d(m / 10), d(m)]);
        last.set((secs, off, month));
        month
    })
}

pub fn zero_units() -> [Dec; 5] {
    [Dec(Decimal::ZERO); 5]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_are_the_json_arrays_of_their_names() {
        // The text earlier ledgers were written with (a `serde_json::Value` array), quotes and all.
        let m = month("a\"b", 1);
        let Record::Month(mr) = &m else { unreachable!() };
        assert_eq!(m.key(), serde_json::json!([mr.tenant, mr.feature, mr.month]).to_string());
        let p = Record::Package(PackageRecord {
            tenant: "t".into(),
            id: "ü".into(),
            consumed: Dec(Decimal::ONE),
            alerted: false,
        });
        assert_eq!(p.key(), r#"["t","ü"]"#);
        assert_eq!(Record::ImageCount(ImageCountRecord { tenant: "t".into(), count: 1 }).key(), r#"["t"]"#);
    }

    fn month(tenant: &str, units: u32) -> Record {
        let mut u = zero_units();
        u[3] = Dec(Decimal::from(units));
        let mut payg = BTreeMap::new();
        payg.insert(String::new(), Dec(Decimal::from(units)));
        Record::Month(MonthRecord {
            tenant: tenant.into(),
            feature: "f".into(),
            month: "2026-01".into(),
            units: u,
            payg,
            unpaid: Dec(Decimal::ZERO),
            integer: true,
        })
    }

    #[test]
    fn commits_survive_reopen_and_latest_wins() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = RedbLedger::open(dir.path()).unwrap();
            l.commit(&[month("acme", 5)]).unwrap();
            l.commit(&[
                month("acme", 7),
                Record::Package(PackageRecord {
                    tenant: "acme".into(),
                    id: "od-1".into(),
                    consumed: Dec(Decimal::new(2, 1)),
                    alerted: true,
                }),
            ])
            .unwrap();
        }
        let l = RedbLedger::open(dir.path()).unwrap();
        let mut recs = l.load().unwrap();
        recs.sort_by_key(Record::key);
        assert_eq!(recs.len(), 2);
        assert!(recs.contains(&month("acme", 7)));
    }

    fn units_of(l: &RedbLedger, tenant: &str) -> Option<Decimal> {
        l.load().unwrap().into_iter().find_map(|r| match r {
            Record::Month(m) if m.tenant == tenant => Some(m.units[3].0),
            _ => None,
        })
    }

    fn every_commit_rotates() -> Checkpoint {
        Checkpoint { max_bytes: 1, max_age: Duration::from_secs(3600) }
    }

    /// Where a segment's last whole frame ends (zeros follow it).
    fn frames_end(segment: &Path) -> usize {
        wal::read(&std::fs::read(segment).unwrap()).unwrap().end
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        wal::segments(dir).unwrap().into_iter().map(|(_, p)| p).collect()
    }

    #[test]
    fn a_crash_replays_the_log_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = RedbLedger::open(dir.path()).unwrap();
            l.stop_folding();
            l.commit(&[month("acme", 1), month("beta", 1)]).unwrap();
            l.commit(&[month("acme", 2)]).unwrap();
            // What a crash leaves: the charges only in the log.
        }
        {
            let l = RedbLedger::open(dir.path()).unwrap();
            assert_eq!(units_of(&l, "acme"), Some(Decimal::from(2)));
            assert_eq!(units_of(&l, "beta"), Some(Decimal::from(1)));
            // Folded at open: the records are in redb and only the fresh, empty segment is left.
            let files = segment_files(dir.path());
            assert_eq!(files.len(), 1, "{files:?}");
            assert_eq!(std::fs::read(&files[0]).unwrap(), wal::MAGIC);
            l.stop_folding();
            l.commit(&[month("acme", 3)]).unwrap();
            l.commit(&[month("acme", 4)]).unwrap();
        }
        // The last commit cut short by the crash: it was never acknowledged, and is dropped.
        let last = segment_files(dir.path()).pop().unwrap();
        let end = frames_end(&last) as u64;
        assert!(std::fs::metadata(&last).unwrap().len() > end, "the file is written ahead of its frames");
        std::fs::OpenOptions::new().write(true).open(&last).unwrap().set_len(end - 3).unwrap();
        let l = RedbLedger::open(dir.path()).unwrap();
        assert_eq!(units_of(&l, "acme"), Some(Decimal::from(3)));
        assert_eq!(units_of(&l, "beta"), Some(Decimal::from(1)));
    }

    /// An upgrade after a crash: the log an earlier version left (the first format) is
    /// replayed, and a record it holds is the same record as the current form writes, so a
    /// later value of it wins over the replayed one.
    #[test]
    fn a_log_in_the_first_format_is_replayed_and_newer_values_win_over_it() {
        let dir = tempfile::tempdir().unwrap();
        // Segment 1 as an earlier version wrote it: a header, one frame of two records.
        let mut payload = Vec::new();
        for r in [month("acme", 4), month("beta", 1)] {
            let (name, value) = codec::tests::v1_name_and_value(&r);
            for field in [name, value] {
                payload.extend_from_slice(&(field.len() as u32).to_le_bytes());
                payload.extend_from_slice(&field);
            }
        }
        let mut log = wal::MAGIC_V1.to_vec();
        log.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        log.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
        log.extend_from_slice(&payload);
        std::fs::write(wal::segment_path(dir.path(), 1), &log).unwrap();
        {
            let l = RedbLedger::open(dir.path()).unwrap();
            assert_eq!((units_of(&l, "acme"), units_of(&l, "beta")), (Some(Decimal::from(4)), Some(Decimal::from(1))));
            // Crashed again, with a newer value only in the (current) log.
            l.stop_folding();
            l.commit(&[month("acme", 5)]).unwrap();
        }
        let l = RedbLedger::open(dir.path()).unwrap();
        let records = l.load().unwrap();
        assert_eq!(records.len(), 2, "one record each: {records:?}");
        assert_eq!((units_of(&l, "acme"), units_of(&l, "beta")), (Some(Decimal::from(5)), Some(Decimal::from(1))));
    }

    #[test]
    fn a_segment_left_behind_by_a_fold_is_never_replayed_over_newer_values() {
        let dir = tempfile::tempdir().unwrap();
        let l = RedbLedger::open_with(dir.path(), every_commit_rotates()).unwrap();
        l.commit(&[month("acme", 1)]).unwrap();
        // The first segment, as it stood before its fold deleted it.
        let first = segment_files(dir.path()).into_iter().next().unwrap();
        let bytes = std::fs::read(&first).unwrap();
        for n in 2..=50 {
            l.commit(&[month("acme", n)]).unwrap();
        }
        drop(l); // folds everything
        assert!(segment_files(dir.path()).is_empty());
        std::fs::write(&first, bytes).unwrap();
        let l = RedbLedger::open(dir.path()).unwrap();
        assert_eq!(units_of(&l, "acme"), Some(Decimal::from(50)));
    }

    #[test]
    fn folds_run_beside_commits_and_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = RedbLedger::open_with(dir.path(), every_commit_rotates()).unwrap();
            for n in 1..=300u32 {
                l.commit(&[month("acme", n), month(&format!("t{}", n % 7), n)]).unwrap();
                if n == 150 {
                    // Mid-way, a crash: whatever the folds reached, the rest is in the log.
                    l.stop_folding();
                }
            }
        }
        let l = RedbLedger::open(dir.path()).unwrap();
        assert_eq!(units_of(&l, "acme"), Some(Decimal::from(300)));
        for t in 0..7u32 {
            let last = (1..=300u32).filter(|n| n % 7 == t).max().unwrap();
            assert_eq!(units_of(&l, &format!("t{t}")), Some(Decimal::from(last)), "t{t}");
        }
    }

    #[test]
    fn a_damaged_segment_before_the_last_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = RedbLedger::open_with(dir.path(), every_commit_rotates()).unwrap();
            l.stop_folding();
            for n in 1..=3 {
                l.commit(&[month("acme", n)]).unwrap();
            }
        }
        let files = segment_files(dir.path());
        // Three commits, and the segment started after the last.
        assert_eq!(files.len(), 4, "{files:?}");
        // A byte of each segment's last frame (the zeros after it are no frame).
        let ats: Vec<usize> = files.iter().map(|f| frames_end(f).saturating_sub(2)).collect();
        let flip = |i: usize| {
            let mut bytes = std::fs::read(&files[i]).unwrap();
            bytes[ats[i]] ^= 1;
            std::fs::write(&files[i], bytes).unwrap();
        };
        flip(1);
        let e = RedbLedger::open(dir.path()).err().expect("a damaged middle segment must be refused").to_string();
        assert!(e.contains(files[1].file_name().unwrap().to_str().unwrap()), "{e}");
        flip(1);
        // The same damage in the last segment holding a commit is a torn tail: dropped.
        flip(2);
        std::fs::remove_file(&files[3]).unwrap();
        let l = RedbLedger::open(dir.path()).unwrap();
        assert_eq!(units_of(&l, "acme"), Some(Decimal::from(2)));
    }

    /// A crash tears only the frame being appended, the last one. A damaged frame in
    /// the last segment that whole, acknowledged frames follow is not a torn tail: dropping it
    /// with them silently loses durable charges (SPEC §7: "never silently misread").
    #[test]
    fn a_damaged_frame_followed_by_whole_frames_in_the_last_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let l = RedbLedger::open(dir.path()).unwrap();
            l.stop_folding();
            for n in 1..=5 {
                l.commit(&[month("acme", n)]).unwrap();
            }
        }
        let last = segment_files(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&last).unwrap();
        // A byte inside the second frame's payload (frames are equal-sized here).
        let frame_len = (frames_end(&last) - wal::MAGIC.len()) / 5;
        let at = wal::MAGIC.len() + frame_len + frame_len - 3;
        bytes[at] ^= 1;
        std::fs::write(&last, bytes).unwrap();
        match RedbLedger::open(dir.path()) {
            Err(e) => assert!(e.to_string().contains(last.file_name().unwrap().to_str().unwrap()), "{e}"),
            Ok(l) => panic!(
                "opened with acme = {:?}: commits 2..=5 were acknowledged and are silently gone",
                units_of(&l, "acme")
            ),
        }
    }

    #[test]
    fn a_ledger_written_before_the_log_opens_with_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let old = month("acme", 9);
        {
            // What the ledger looked like before the log: redb alone, no `meta` table.
            let db = Database::create(dir.path().join(RedbLedger::FILE)).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(MONTHS).unwrap().insert(old.key().as_str(), old.json().unwrap().as_slice()).unwrap();
            txn.commit().unwrap();
        }
        {
            let l = RedbLedger::open(dir.path()).unwrap();
            assert_eq!(l.load().unwrap(), vec![old]);
            l.commit(&[month("acme", 10)]).unwrap();
        }
        let l = RedbLedger::open(dir.path()).unwrap();
        assert_eq!(units_of(&l, "acme"), Some(Decimal::from(10)));
    }

    #[test]
    fn unwritable_dir_and_garbage_file_are_errors_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let e = RedbLedger::open(&file.join("sub")).err().expect("must fail").to_string();
        assert!(e.contains("not-a-dir"), "{e}");

        let bad = dir.path().join("bad");
        std::fs::create_dir_all(&bad).unwrap();
        std::fs::write(bad.join(RedbLedger::FILE), vec![0xAB; 8192]).unwrap();
        let e = RedbLedger::open(&bad).err().expect("garbage must be refused").to_string();
        assert!(e.contains("ledger.redb"), "{e}");
    }

    #[test]
    fn the_month_of_a_settlement_turns_on_its_first_nanosecond_in_each_offset() {
        let east = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
        let odd = chrono::FixedOffset::east_opt(5 * 3600 + 1).unwrap();
        // 2026-02-01T00:00:00+08:00
        let t = 1_769_875_200 * crate::time::NANOS_PER_SEC;
        // In turn, within the same second and across it, in two offsets: the per-second
        // memo never answers for another second or offset.
        for (at, offset, month) in [
            (t - 1, east, "2026-01"),
            (t, east, "2026-02"),
            (t, odd, "2026-01"),
            (t + 999_999_999, east, "2026-02"),
            (t - 1, east, "2026-01"),
            // 2026-02-01T00:00:00+05:00:01 is 10,799 s after `t`.
            (t + 10_799 * crate::time::NANOS_PER_SEC - 1, odd, "2026-01"),
            (t + 10_799 * crate::time::NANOS_PER_SEC, odd, "2026-02"),
            (t + 10_799 * crate::time::NANOS_PER_SEC, east, "2026-02"),
        ] {
            assert_eq!(month_text(at, offset).as_str(), month, "{at} in {offset}");
            assert_eq!(month_of(at, offset), month);
        }
    }

    #[test]
    fn months_are_counted_in_the_billing_timezone() {
        let tz = crate::time::parse_offset("+08:00").unwrap();
        let t = crate::time::parse_rfc3339("2026-01-31T16:00:00Z").unwrap();
        assert_eq!(month_of(t, tz), "2026-02");
        assert_eq!(month_of(t - 1, tz), "2026-01");
    }
}
