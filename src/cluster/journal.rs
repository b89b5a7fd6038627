//! The fallback's journal on disk (SPEC §11.6: charges made on the `local` fallback are
//! replayed to Redis exactly once when it is back). Each entry is appended when it is journaled
//! and marked done once Redis has it, so a replica stopped or killed before Redis came back
//! replays the rest at its next start with the same ledger folder. The file is emptied whenever
//! the journal is.
//!
//! ```text
//! file = line*
//! line = xxh3-64 of json (16 lowercase hex) ' ' json '\n'
//! json = {"entry": [seq, Replay]} | {"entry": [seq, Replay, Sent]} | {"done": seq}
//!      | {"sent": [seq, Sent]}
//! Sent = {"at": unix ms, "ttl": ms}
//! ```
//!
//! [`Sent`] says when an entry was first sent to Redis and how long the marker that send left
//! (if Redis applied it) is kept: written in the entry's own line when a live settlement was
//! tried before it was journaled, else in a `sent` line (every entry up to `seq` not yet sent)
//! synced before the first replay of those entries. An entry line of two elements (every line
//! written before [`Sent`] existed) is an entry never sent.
//!
//! A crash can cut the last line short (no newline, or a checksum that fails with nothing whole
//! after it): it is dropped. A damaged line followed by whole ones is an error naming the file
//! (SPEC §7: never silently misread).
//! A write that fails part-way (a full disk) is cut back to the last whole line, so that
//! the lines written after it stay whole; its entry is kept in memory only.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use super::Replay;

/// The journal's file name in the ledger folder.
pub const FILE: &str = "redis-journal.log";

/// Next to the journal: the entries set aside instead of replayed, one JSON line each
/// ([`SetAside`]), for an operator to reconcile: those Redis rejected (an error no retry can
/// change), and those first sent longer ago than their marker is kept ([`Sent::replay_until`]).
pub const REJECTED: &str = "redis-journal.rejected";

/// One line of [`REJECTED`]: the entry's sequence number, when it was set aside (RFC 3339,
/// UTC), its tenant, why (Redis's error, or when it was first sent), and the entry as the
/// journal held it.
#[derive(serde::Serialize)]
pub struct SetAside<'a> {
    pub seq: u64,
    pub at: &'a str,
    pub tenant: &'a str,
    pub error: &'a str,
    pub entry: &'a Replay,
}

/// Appends `line` ([`SetAside`]) to the rejected file at `path` (created when missing) and
/// syncs it: on `Ok` the line is on disk. A line cut short by an earlier crash is ended first,
/// so that this one starts on a line of its own; a write that fails part-way is cut back.
pub fn append_rejected(path: &Path, line: &SetAside<'_>) -> io::Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut out = serde_json::to_vec(line).map_err(io::Error::other)?;
    out.push(b'\n');
    let mut file = OpenOptions::new().read(true).append(true).create(true).open(path)?;
    let len = file.metadata()?.len();
    if len > 0 {
        let mut last = [0u8];
        file.seek(SeekFrom::Start(len - 1))?;
        file.read_exact(&mut last)?;
        if last[0] != b'\n' {
            out.insert(0, b'\n');
        }
    }
    if let Err(e) = file.write_all(&out) {
        let _ = file.set_len(len);
        return Err(e);
    }
    file.sync_data()
}

/// When an entry was first sent to Redis (unix ms, the replica's clock) and how long (ms) the
/// replay marker that send left, if Redis applied it, is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Sent {
    pub at: i64,
    pub ttl: u64,
}

impl Sent {
    /// The time (unix ms) from which the entry is no longer sent: 9/10 of its marker's TTL
    /// after its first send. The tenth left is a margin for the replica's clock against
    /// Redis's, and for the time between the reading of the clock and the marker's write
    /// (which only makes the marker live longer).
    pub fn replay_until(&self) -> i64 {
        let ttl = i64::try_from(self.ttl).unwrap_or(i64::MAX);
        self.at.saturating_add(ttl - ttl / 10)
    }
}

/// One entry of the journal: its sequence number, the charge, and when it was first sent to
/// Redis (none: never yet).
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub replay: Replay,
    pub sent: Option<Sent>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line<R> {
    Entry(u64, R, #[serde(default, skip_serializing_if = "Option::is_none")] Option<Sent>),
    Done(u64),
    /// Every entry up to this sequence number that had not been sent was first sent then.
    Sent(u64, Sent),
}

/// The journal file, appended to under the journal's lock (so its order is the journal's).
pub struct JournalFile {
    path: PathBuf,
    file: File,
    /// Where the last whole line ends: a write that fails part-way (a full disk) is cut back
    /// to it, or the next line would be glued to its piece, one damaged line that stops `serve`
    /// at the next start once whole lines follow it.
    len: u64,
    /// A piece of a failed write may still follow `len` (cutting it failed too): nothing more
    /// is written until it is cut.
    torn: bool,
}

/// What [`JournalFile::open`] found: the file, the entries not done (oldest first), and how
/// many bytes of a line cut short it dropped.
pub type Opened = (JournalFile, Vec<Entry>, usize);

impl JournalFile {
    /// Opens (or creates) the journal in `dir` and reads the entries not yet done.
    pub fn open(dir: &Path) -> Result<Opened, String> {
        let path = dir.join(FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| format!("{}: cannot open: {e}", path.display()))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let (entries, whole) = parse(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let cut = text.len() - whole;
        if cut > 0 {
            // The torn tail goes, so the next line starts on a line of its own.
            file.set_len(whole as u64).map_err(|e| format!("{}: cannot drop a torn tail: {e}", path.display()))?;
        }
        Ok((JournalFile { path, file, len: whole as u64, torn: false }, entries, cut))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the entries Redis rejected go: [`REJECTED`] next to the journal.
    pub fn rejected_path(&self) -> PathBuf {
        self.path.with_file_name(REJECTED)
    }

    /// A handle on the same file for [`File::sync_data`] outside the journal's lock.
    pub fn sync_handle(&self) -> io::Result<File> {
        self.file.try_clone()
    }

    pub fn append_entry(&mut self, seq: u64, r: &Replay, sent: Option<Sent>) -> io::Result<()> {
        self.append(&Line::Entry(seq, r, sent))
    }

    pub fn append_done(&mut self, seq: u64) -> io::Result<()> {
        self.append(&Line::<&Replay>::Done(seq))
    }

    /// Every entry up to `seq` not yet sent is first sent now: `sent`.
    pub fn append_sent(&mut self, seq: u64, sent: Sent) -> io::Result<()> {
        self.append(&Line::<&Replay>::Sent(seq, sent))
    }

    /// The journal is empty: so is the file.
    pub fn clear(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        (self.len, self.torn) = (0, false);
        Ok(())
    }

    fn append(&mut self, line: &Line<&Replay>) -> io::Result<()> {
        let json = serde_json::to_vec(line).map_err(io::Error::other)?;
        let mut out = Vec::with_capacity(json.len() + 18);
        write!(out, "{:016x} ", xxhash_rust::xxh3::xxh3_64(&json))?;
        out.extend_from_slice(&json);
        out.push(b'\n');
        if self.torn {
            self.file.set_len(self.len)?;
            self.torn = false;
        }
        // One write: a crash leaves the line whole or cut short, never interleaved.
        match self.file.write_all(&out) {
            Ok(()) => {
                self.len += out.len() as u64;
                Ok(())
            }
            Err(e) => {
                // Part of the line may be in the file (the write stopped when the disk filled).
                self.torn = self.file.set_len(self.len).is_err();
                Err(e)
            }
        }
    }
}

/// The entries not done, oldest first, and the length of the whole lines read.
fn parse(text: &[u8]) -> Result<(Vec<Entry>, usize), String> {
    let mut live: BTreeMap<u64, (Replay, Option<Sent>)> = BTreeMap::new();
    // `sent` lines name ever later entries: each looks only past the one before it.
    let mut sent_upto: Option<u64> = None;
    let mut at = 0;
    let mut damaged: Option<usize> = None;
    for (n, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        let Some(body) = line.strip_suffix(b"\n") else { break };
        if let Some(first) = damaged {
            return Err(format!("line {} is damaged and whole lines follow it (line {})", first + 1, n + 1));
        }
        match read_line(body) {
            Some(Line::Entry(seq, r, sent)) => {
                live.insert(seq, (r, sent));
            }
            Some(Line::Done(seq)) => {
                live.remove(&seq);
            }
            Some(Line::Sent(upto, s)) => {
                let from = match sent_upto {
                    Some(before) if before < upto => before + 1,
                    _ => 0,
                };
                for (_, (_, sent)) in live.range_mut(from..=upto) {
                    sent.get_or_insert(s);
                }
                sent_upto = Some(upto);
            }
            None => {
                damaged = Some(n);
                continue;
            }
        }
        at += line.len();
    }
    Ok((live.into_iter().map(|(seq, (replay, sent))| Entry { seq, replay, sent }).collect(), at))
}

fn read_line(body: &[u8]) -> Option<Line<Replay>> {
    let (sum, json) = (body.get(..16)?, body.get(17..)?);
    let sum = u64::from_str_radix(std::str::from_utf8(sum).ok()?, 16).ok()?;
    if body.get(16) != Some(&b' ') || sum != xxhash_rust::xxh3::xxh3_64(json) {
        return None;
    }
    serde_json::from_slice(json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(n: u32) -> Replay {
        Replay::Alert { tenant: format!("t{n}"), package: "p".into() }
    }

    fn unsent(seq: u64, replay: Replay) -> Entry {
        Entry { seq, replay, sent: None }
    }

    #[test]
    fn entries_not_done_read_back_in_order_and_an_emptied_file_reads_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, found, cut) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((found.len(), cut), (0, 0));
        for n in 1..=3 {
            f.append_entry(u64::from(n), &alert(n), None).unwrap();
        }
        f.append_done(1).unwrap();
        drop(f);
        let (mut f, found, cut) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((found, cut), (vec![unsent(2, alert(2)), unsent(3, alert(3))], 0));
        f.clear().unwrap();
        f.append_entry(4, &alert(4), None).unwrap();
        let (_, found, _) = JournalFile::open(dir.path()).unwrap();
        assert_eq!(found, vec![unsent(4, alert(4))]);
    }

    /// When each entry was first sent reads back: from its own line (a live settlement tried
    /// before it was journaled), else from the first `sent` line after it that covers its
    /// number (a later one does not move it); an entry line of two elements, as every line was
    /// written before `Sent` existed, is an entry never sent.
    #[test]
    fn when_each_entry_was_first_sent_reads_back_and_old_entry_lines_read_as_never_sent() {
        let dir = tempfile::tempdir().unwrap();
        let (live, first, later) =
            (Sent { at: 10, ttl: 1_000 }, Sent { at: 20, ttl: 9_000 }, Sent { at: 30, ttl: 9_000 });
        let (mut f, _, _) = JournalFile::open(dir.path()).unwrap();
        f.append_entry(1, &alert(1), None).unwrap();
        f.append_entry(2, &alert(2), Some(live)).unwrap();
        f.append_entry(3, &alert(3), None).unwrap();
        f.append_sent(3, first).unwrap();
        f.append_entry(4, &alert(4), None).unwrap();
        f.append_sent(4, later).unwrap();
        f.append_entry(5, &alert(5), None).unwrap();
        drop(f);
        let (_, found, _) = JournalFile::open(dir.path()).unwrap();
        let sent: Vec<_> = found.iter().map(|e| (e.seq, e.sent)).collect();
        assert_eq!(sent, vec![(1, Some(first)), (2, Some(live)), (3, Some(first)), (4, Some(later)), (5, None)]);

        // A line as the build before `Sent` wrote it, with its type of line.
        #[derive(serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        enum Before<'a> {
            Entry(u64, &'a Replay),
        }
        let json = serde_json::to_vec(&Before::Entry(7, &alert(7))).unwrap();
        let mut line = format!("{:016x} ", xxhash_rust::xxh3::xxh3_64(&json)).into_bytes();
        line.extend_from_slice(&json);
        line.push(b'\n');
        let old = tempfile::tempdir().unwrap();
        std::fs::write(old.path().join(FILE), &line).unwrap();
        let (_, found, cut) = JournalFile::open(old.path()).unwrap();
        assert_eq!((found, cut), (vec![unsent(7, alert(7))], 0));
        // And an entry never sent is written the same way.
        let (mut f, _, _) = JournalFile::open(dir.path()).unwrap();
        f.clear().unwrap();
        f.append_entry(7, &alert(7), None).unwrap();
        assert_eq!(std::fs::read(dir.path().join(FILE)).unwrap(), line);
    }

    /// A journal of two entries of the same length in `dir`: its path and bytes.
    fn two_entries(dir: &Path) -> (PathBuf, Vec<u8>) {
        let (mut f, _, _) = JournalFile::open(dir).unwrap();
        f.append_entry(1, &alert(1), None).unwrap();
        f.append_entry(2, &alert(2), None).unwrap();
        let path = dir.join(FILE);
        let whole = std::fs::read(&path).unwrap();
        (path, whole)
    }

    #[test]
    fn a_line_cut_short_is_dropped_and_the_next_line_starts_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (path, whole) = two_entries(dir.path());
        for cut in 1..30 {
            // Cut short without its newline, or with a changed byte before it (damaged at the end).
            std::fs::write(&path, &whole[..whole.len() - cut]).unwrap();
            let (mut f, found, dropped) = JournalFile::open(dir.path()).unwrap();
            assert_eq!((found, dropped), (vec![unsent(1, alert(1))], whole.len() / 2 - cut), "cut {cut}");
            f.append_entry(3, &alert(3), None).unwrap();
            let (_, found, _) = JournalFile::open(dir.path()).unwrap();
            assert_eq!(found, vec![unsent(1, alert(1)), unsent(3, alert(3))], "cut {cut}");
        }
        let mut damaged = whole.clone();
        let last = damaged.len() - 5;
        damaged[last] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let (_, found, dropped) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((found, dropped), (vec![unsent(1, alert(1))], whole.len() / 2));
    }

    /// A write that fails part-way (a full disk, a file-size limit) must not leave its piece in
    /// the file: the next line written would be glued to it, one damaged line, which stops
    /// `serve` at the next start once whole lines follow it (or, last, takes the whole line
    /// glued to it away as a line cut short).
    #[cfg(unix)]
    #[test]
    fn a_write_that_fails_part_way_leaves_no_piece_of_its_line() {
        const CHILD: &str = "TURNSTILE_TEST_JOURNAL_FSIZE_DIR";
        const NAME: &str = "cluster::journal::tests::a_write_that_fails_part_way_leaves_no_piece_of_its_line";
        let Some(dir) = std::env::var_os(CHILD) else {
            // RLIMIT_FSIZE is per process: set in a child running this test alone, never in
            // the test binary every other test runs in.
            let dir = tempfile::tempdir().unwrap();
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--test-threads=1", "--nocapture"])
                .env(CHILD, dir.path())
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            let (_, found, cut) = JournalFile::open(dir.path()).expect("the file reads back");
            assert_eq!((found, cut), (vec![unsent(1, alert(1)), unsent(3, alert(3)), unsent(4, alert(4))], 0));
            return;
        };
        // The child: a write past the limit fails with EFBIG, and SIGXFSZ must not kill it
        // (a handler replaces the default, as `serve` does).
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _xfsz = rt
            .block_on(async { tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ)) })
            .unwrap();
        let limit = |soft: &str| {
            let pid = std::process::id().to_string();
            let status = std::process::Command::new("prlimit")
                .args(["--pid", &pid, &format!("--fsize={soft}:unlimited")])
                .status()
                .expect("prlimit");
            assert!(status.success(), "prlimit");
        };
        let dir = std::path::PathBuf::from(dir);
        let (mut f, _, _) = JournalFile::open(&dir).unwrap();
        f.append_entry(1, &alert(1), None).unwrap();
        // Room for 10 more bytes: the next line is written in part, then the write fails.
        let len = std::fs::metadata(dir.join(FILE)).unwrap().len();
        limit(&(len + 10).to_string());
        assert!(f.append_entry(2, &alert(2), None).is_err(), "the write past the limit fails");
        limit("unlimited");
        f.append_entry(3, &alert(3), None).unwrap();
        f.append_entry(4, &alert(4), None).unwrap();
    }

    #[test]
    fn a_damaged_line_before_whole_ones_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut text) = two_entries(dir.path());
        text[20] ^= 1;
        std::fs::write(&path, &text).unwrap();
        let e = JournalFile::open(dir.path()).err().expect("refused");
        assert!(e.contains(FILE) && e.contains("line 1 is damaged"), "{e}");
    }
}
