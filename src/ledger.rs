//! The durable ledger (SPEC §7): package consumption, monthly usage per payer, alerts fired.
//!
//! [`LedgerStore`] is the narrow interface (load everything at start; commit a batch of absolute
//! records atomically) so that a shared store can replace [`RedbLedger`]. Records hold absolute
//! values, so writing one twice is harmless and the latest commit always wins.
//!
//! [`RedbLedger`] keeps them in one redb file (`<dir>/ledger.redb`): ACID, copy-on-write B-trees,
//! checksummed; one write transaction per group commit. A crash mid-commit leaves the previous
//! commit intact; a file redb cannot open, or a record that does not decode, is an error that
//! names the path: balances are never silently reset.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use rust_decimal::Decimal;
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
    /// Its key: the JSON array of its names (`["acme","od-1"]`). Serialized from a tuple, not
    /// a `serde_json::Value`: the same text without the tree.
    fn key(&self) -> String {
        let key = match self {
            Record::Package(p) => serde_json::to_string(&(&p.tenant, &p.id)),
            Record::Month(m) => serde_json::to_string(&(&m.tenant, &m.feature, &m.month)),
            Record::ImageCount(i) => serde_json::to_string(&(&i.tenant,)),
        };
        // Strings only: serializing them cannot fail.
        key.unwrap_or_default()
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

pub struct RedbLedger {
    /// `None` after a failed commit: redb refuses every operation after an I/O error
    /// (`PreviousIo`) until the database is reopened, so the next commit reopens it first.
    db: Mutex<Option<Database>>,
    path: PathBuf,
}

impl RedbLedger {
    pub const FILE: &'static str = "ledger.redb";

    /// Opens (or creates) `<dir>/ledger.redb` and checks it can be written.
    pub fn open(dir: &Path) -> Result<RedbLedger, LedgerError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| LedgerError::CreateDir { path: dir.to_path_buf(), reason: e.to_string() })?;
        let path = dir.join(Self::FILE);
        let db =
            Database::create(&path).map_err(|e| LedgerError::Open { path: path.clone(), reason: e.to_string() })?;
        let ledger = RedbLedger { db: Mutex::new(Some(db)), path };
        // Creates the tables on first use and proves the file is writable now, not at the first charge.
        ledger.commit(&[])?;
        Ok(ledger)
    }

    fn write_err(&self, e: impl std::fmt::Display) -> LedgerError {
        LedgerError::Write { path: self.path.clone(), reason: e.to_string() }
    }

    fn write(&self, db: &Database, records: &[Record]) -> Result<(), LedgerError> {
        let txn = db.begin_write().map_err(|e| self.write_err(e))?;
        {
            let mut packages = txn.open_table(PACKAGES).map_err(|e| self.write_err(e))?;
            let mut months = txn.open_table(MONTHS).map_err(|e| self.write_err(e))?;
            let mut images = txn.open_table(IMAGES).map_err(|e| self.write_err(e))?;
            for r in records {
                let key = r.key();
                let value = match r {
                    Record::Package(p) => serde_json::to_vec(p),
                    Record::Month(m) => serde_json::to_vec(m),
                    Record::ImageCount(i) => serde_json::to_vec(i),
                }
                .map_err(|e| self.write_err(e))?;
                let table = match r {
                    Record::Package(_) => &mut packages,
                    Record::Month(_) => &mut months,
                    Record::ImageCount(_) => &mut images,
                };
                table.insert(key.as_str(), value.as_slice()).map_err(|e| self.write_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.write_err(e))
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
        let open_err = |e: &dyn std::fmt::Display| LedgerError::Open { path: self.path.clone(), reason: e.to_string() };
        let guard = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let db = guard.as_ref().ok_or_else(|| open_err(&"closed after a failed commit"))?;
        let txn = db.begin_read().map_err(|e| open_err(&e))?;
        let mut out = Vec::new();
        for (def, kind) in [(PACKAGES, 0u8), (MONTHS, 1), (IMAGES, 2)] {
            let table = txn.open_table(def).map_err(|e| open_err(&e))?;
            for row in table.iter().map_err(|e| open_err(&e))? {
                let (k, v) = row.map_err(|e| open_err(&e))?;
                let (key, bytes) = (k.value(), v.value());
                out.push(match kind {
                    0 => Record::Package(decode(&self.path, key, bytes)?),
                    1 => Record::Month(decode(&self.path, key, bytes)?),
                    _ => Record::ImageCount(decode(&self.path, key, bytes)?),
                });
            }
        }
        Ok(out)
    }

    fn commit(&self, records: &[Record]) -> Result<(), LedgerError> {
        let mut guard = self.db.lock().unwrap_or_else(PoisonError::into_inner);
        let db = match guard.take() {
            Some(db) => db,
            // Reopening also lets redb repair what the failed commit left behind.
            None => Database::create(&self.path).map_err(|e| self.write_err(format!("reopening: {e}")))?,
        };
        let result = self.write(&db, records);
        if result.is_ok() {
            *guard = Some(db);
        }
        // Else `db` is dropped here: closed (its file lock released), reopened by the next attempt.
        result
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

/// Formats a Unix time as the `YYYY-MM` month in `offset`.
pub fn month_of(unix_nanos: i64, offset: chrono::FixedOffset) -> String {
    use chrono::{Datelike, TimeZone};
    let t = offset.timestamp_nanos(unix_nanos);
    format!("{:04}-{:02}", t.year(), t.month())
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
        recs.sort_by_key(|r| r.key());
        assert_eq!(recs.len(), 2);
        assert!(recs.contains(&month("acme", 7)));
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
    fn months_are_counted_in_the_billing_timezone() {
        let tz = crate::time::parse_offset("+08:00").unwrap();
        let t = crate::time::parse_rfc3339("2026-01-31T16:00:00Z").unwrap();
        assert_eq!(month_of(t, tz), "2026-02");
        assert_eq!(month_of(t - 1, tz), "2026-01");
    }
}
