//! The fallback's journal on disk (SPEC §11.6: charges made on the `local` fallback are
//! replayed to Redis exactly once when it is back). Each entry is appended when it is journaled
//! and marked done once Redis has it, so a replica stopped or killed before Redis came back
//! replays the rest at its next start with the same ledger folder. The file is emptied whenever
//! the journal is.
//!
//! ```text
//! file = line*
//! line = xxh3-64 of json (16 lowercase hex) ' ' json '\n'
//! json = {"entry": [seq, Replay]} | {"done": seq}
//! ```
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

/// Next to the journal: the entries Redis rejected (an error no retry can change), set aside
/// instead of replayed, one JSON line each ([`SetAside`]), for an operator to reconcile.
pub const REJECTED: &str = "redis-journal.rejected";

/// One line of [`REJECTED`]: the entry's sequence number, when it was set aside (RFC 3339,
/// UTC), its tenant, Redis's error, and the entry as the journal held it.
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

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line<R> {
    Entry(u64, R),
    Done(u64),
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
pub type Opened = (JournalFile, Vec<(u64, Replay)>, usize);

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

    pub fn append_entry(&mut self, seq: u64, r: &Replay) -> io::Result<()> {
        self.append(&Line::Entry(seq, r))
    }

    pub fn append_done(&mut self, seq: u64) -> io::Result<()> {
        self.append(&Line::<&Replay>::Done(seq))
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
fn parse(text: &[u8]) -> Result<(Vec<(u64, Replay)>, usize), String> {
    let mut live = BTreeMap::new();
    let mut at = 0;
    let mut damaged: Option<usize> = None;
    for (n, line) in text.split_inclusive(|&b| b == b'\n').enumerate() {
        let Some(body) = line.strip_suffix(b"\n") else { break };
        if let Some(first) = damaged {
            return Err(format!("line {} is damaged and whole lines follow it (line {})", first + 1, n + 1));
        }
        match read_line(body) {
            Some(Line::Entry(seq, r)) => {
                live.insert(seq, r);
            }
            Some(Line::Done(seq)) => {
                live.remove(&seq);
            }
            None => {
                damaged = Some(n);
                continue;
            }
        }
        at += line.len();
    }
    Ok((live.into_iter().collect(), at))
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

    #[test]
    fn entries_not_done_read_back_in_order_and_an_emptied_file_reads_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (mut f, found, cut) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((found.len(), cut), (0, 0));
        for n in 1..=3 {
            f.append_entry(u64::from(n), &alert(n)).unwrap();
        }
        f.append_done(1).unwrap();
        drop(f);
        let (mut f, found, cut) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((found, cut), (vec![(2, alert(2)), (3, alert(3))], 0));
        f.clear().unwrap();
        f.append_entry(4, &alert(4)).unwrap();
        let (_, found, _) = JournalFile::open(dir.path()).unwrap();
        assert_eq!(found, vec![(4, alert(4))]);
    }

    /// A journal of two entries of the same length in `dir`: its path and bytes.
    fn two_entries(dir: &Path) -> (PathBuf, Vec<u8>) {
        let (mut f, _, _) = JournalFile::open(dir).unwrap();
        f.append_entry(1, &alert(1)).unwrap();
        f.append_entry(2, &alert(2)).unwrap();
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
            assert_eq!((found, dropped), (vec![(1, alert(1))], whole.len() / 2 - cut), "cut {cut}");
            f.append_entry(3, &alert(3)).unwrap();
            let (_, found, _) = JournalFile::open(dir.path()).unwrap();
            assert_eq!(found, vec![(1, alert(1)), (3, alert(3))], "cut {cut}");
        }
        let mut damaged = whole.clone();
        let last = damaged.len() - 5;
        damaged[last] ^= 1;
        std::fs::write(&path, &damaged).unwrap();
        let (_, found, dropped) = JournalFile::open(dir.path()).unwrap();
        assert_eq!((found, dropped), (vec![(1, alert(1))], whole.len() / 2));
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
            assert_eq!((found, cut), (vec![(1, alert(1)), (3, alert(3)), (4, alert(4))], 0));
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
        f.append_entry(1, &alert(1)).unwrap();
        // Room for 10 more bytes: the next line is written in part, then the write fails.
        let len = std::fs::metadata(dir.join(FILE)).unwrap().len();
        limit(&(len + 10).to_string());
        assert!(f.append_entry(2, &alert(2)).is_err(), "the write past the limit fails");
        limit("unlimited");
        f.append_entry(3, &alert(3)).unwrap();
        f.append_entry(4, &alert(4)).unwrap();
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
