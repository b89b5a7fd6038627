//! The ledger's write-ahead log: numbered segment files `<dir>/ledger-<seq>.wal`.
//!
//! A segment starts with [`MAGIC`]; each commit appends one frame and makes it durable with one
//! `fdatasync`:
//!
//! ```text
//! frame   = payload length (u32 LE) | xxh3-64 of the payload (u64 LE) | payload
//! payload = entry*
//! entry   = name length (LEB128) | name | value length (LEB128) | value
//! name    = table (u8) | the record's identity (its names, `super::codec`)
//! value   = the record's other fields (`super::codec`)
//! ```
//!
//! A segment of the first format ([`MAGIC_V1`], lengths as u32 LE, records in their first
//! form) is still read, so a log left by an earlier version is replayed after an upgrade.
//!
//! A frame is all of one commit or, cut short or failing its checksum, none of it. Only the last
//! segment can end that way (a crash mid-append): reading stops there and the tail is dropped.
//! A segment before the last one was complete before the next was created, so a bad frame there
//! is an error, never skipped.
//!
//! A segment's file is written ahead of its frames with zeros ([`Segment::append`]), so its
//! frames end in zeros: a tail of zeros after the last whole frame is a clean end (a frame's
//! head is never all zeros: the checksum of an empty payload is not 0).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

pub const MAGIC: &[u8; 8] = b"TSWAL02\n";
/// The first format's header: lengths as u32 LE, records in [`super::codec::decode_v1`]'s form.
pub const MAGIC_V1: &[u8; 8] = b"TSWAL01\n";
const FRAME_HEAD: usize = 12;

/// How far ahead of its frames a segment's file is written with zeros: at least this, ...
const AHEAD_MIN: u64 = 64 << 10;
/// ... and at most this at once, the step doubling with the segment (a quiet segment stays small).
const AHEAD_MAX: u64 = 4 << 20;
static ZEROS: [u8; AHEAD_MIN as usize] = [0; AHEAD_MIN as usize];

pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("ledger-{seq:010}.wal"))
}

/// The segments in `dir`, oldest first.
pub fn segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_prefix("ledger-"))
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        out.push((seq, entry.path()));
    }
    out.sort_unstable_by_key(|(seq, _)| *seq);
    Ok(out)
}

/// Starts a frame in `buf` (cleared): room for its head, filled by [`finish_frame`].
pub fn start_frame(buf: &mut Vec<u8>) {
    buf.clear();
    buf.extend_from_slice(&[0; FRAME_HEAD]);
}

/// Appends one entry to a started frame, its identity and value written in place by `key` and
/// `value`. Returns where its name (table and identity) and its value lie in `buf`.
pub fn push_entry(
    buf: &mut Vec<u8>,
    table: u8,
    key: impl FnOnce(&mut Vec<u8>),
    value: impl FnOnce(&mut Vec<u8>),
) -> (Range<usize>, Range<usize>) {
    let name = sized(buf, |buf| {
        buf.push(table);
        key(buf);
    });
    (name, sized(buf, value))
}

/// Writes a length-prefixed field in place: one byte is set aside for its length, and the
/// field moves up in the rare case that its length needs more (128 bytes or longer).
fn sized(buf: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) -> Range<usize> {
    let at = buf.len();
    buf.push(0);
    write(buf);
    let len = buf.len() - at - 1;
    if len < 0x80 {
        buf[at] = len as u8;
        return at + 1..buf.len();
    }
    let mut head = Vec::with_capacity(5);
    super::codec::uint(&mut head, len as u128);
    buf.splice(at..at + 1, head.iter().copied());
    at + head.len()..buf.len()
}

pub fn finish_frame(buf: &mut [u8]) {
    let len = (buf.len() - FRAME_HEAD) as u32;
    let hash = xxh3_64(&buf[FRAME_HEAD..]);
    buf[..4].copy_from_slice(&len.to_le_bytes());
    buf[4..FRAME_HEAD].copy_from_slice(&hash.to_le_bytes());
}

/// One entry of a frame, borrowed from the segment's bytes.
pub struct Entry<'a> {
    /// Its table (the first byte) and identity.
    pub name: &'a [u8],
    pub value: &'a [u8],
}

/// What reading a segment found.
pub struct Read<'a> {
    pub entries: Vec<Entry<'a>>,
    /// Where the last whole frame ends (the header's end when there is none).
    pub end: usize,
    /// Bytes after the last whole frame (a torn or corrupt tail): 0 for a clean end, which is
    /// the end of the file or zeros up to it.
    pub dropped: usize,
    /// A segment of the first format ([`MAGIC_V1`]): its records are in their first form.
    pub v1: bool,
}

/// Reads the frames of a segment's bytes, in order, up to the first one cut short or failing
/// its checksum. A frame whose checksum holds but whose entries do not parse is an error (a bug,
/// not a crash), as is a file that is not a segment.
pub fn read(bytes: &[u8]) -> Result<Read<'_>, String> {
    if bytes.len() < MAGIC.len() {
        // Created but its header never reached the disk: nothing was ever committed to it.
        return Ok(Read { entries: Vec::new(), end: 0, dropped: bytes.len(), v1: false });
    }
    let v1 = match &bytes[..MAGIC.len()] {
        h if h == MAGIC => false,
        h if h == MAGIC_V1 => true,
        _ => return Err("not a turnstile ledger log (bad header)".into()),
    };
    let mut entries = Vec::new();
    let mut at = MAGIC.len();
    while let Some((len, Some(payload))) = frame_at(bytes, at) {
        parse_payload(payload, v1, &mut entries).map_err(|e| format!("frame at byte {at}: {e}"))?;
        at += FRAME_HEAD + len;
    }
    let tail = &bytes[at..];
    if let Some(next) = whole_frame_after(bytes, at) {
        // A crash tears only the frame being appended, the last: whole frames after a damaged
        // one were acknowledged, and dropping them with it would lose them silently.
        return Err(format!("the frame at byte {at} is damaged and a whole frame follows it at byte {next}"));
    }
    Ok(Read { entries, end: at, dropped: if tail.iter().all(|&b| b == 0) { 0 } else { tail.len() }, v1 })
}

/// The frame whose head starts at `at`: its payload's length, and its payload when all of it
/// is there and its checksum holds. `None` when no whole head is left there.
fn frame_at(bytes: &[u8], at: usize) -> Option<(usize, Option<&[u8]>)> {
    let head = bytes.get(at..at.checked_add(FRAME_HEAD)?)?;
    let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
    let hash = u64::from_le_bytes(head[4..].try_into().ok()?);
    let start = at + FRAME_HEAD;
    let payload = bytes.get(start..start.checked_add(len)?).filter(|p| xxh3_64(p) == hash);
    Some((len, payload))
}

/// Where a whole frame starts after the frame at `at` that did not read (following the length
/// fields from it while they stay inside `bytes`), if one does.
fn whole_frame_after(bytes: &[u8], mut at: usize) -> Option<usize> {
    let (mut len, _) = frame_at(bytes, at)?;
    loop {
        at = at.checked_add(FRAME_HEAD)?.checked_add(len)?;
        match frame_at(bytes, at)? {
            (_, Some(_)) => return Some(at),
            (next, None) => len = next,
        }
    }
}

fn parse_payload<'a>(mut p: &'a [u8], v1: bool, out: &mut Vec<Entry<'a>>) -> Result<(), &'static str> {
    fn take<'a>(p: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
        if p.len() < n {
            return Err("entry cut short");
        }
        let (head, rest) = p.split_at(n);
        *p = rest;
        Ok(head)
    }
    let len = |p: &mut &[u8]| -> Result<usize, &'static str> {
        if v1 {
            return Ok(u32::from_le_bytes(take(p, 4)?.try_into().map_err(|_| "entry cut short")?) as usize);
        }
        usize::try_from(super::codec::take_uint(p, 32)?).map_err(|_| "entry too long")
    };
    while !p.is_empty() {
        let n = len(&mut p)?;
        let name = take(&mut p, n)?;
        if name.is_empty() {
            return Err("entry without a table");
        }
        let n = len(&mut p)?;
        let value = take(&mut p, n)?;
        out.push(Entry { name, value });
    }
    Ok(())
}

/// The segment commits append to.
pub struct Segment {
    pub seq: u64,
    file: File,
    /// Bytes of whole, durable frames (and the header).
    len: u64,
    /// Bytes in the file: `len`, then zeros written ahead.
    written: u64,
    /// A failed append may have left bytes past `len`: cut them before the next append.
    torn: bool,
    pub created: Instant,
}

impl Segment {
    /// Creates segment `seq` with its header, durable together with its folder entry. A file
    /// of that number can only be an earlier failed attempt (numbers only grow): it is replaced,
    /// and one this attempt leaves half-made is removed.
    pub fn create(dir: &Path, seq: u64) -> io::Result<Segment> {
        let path = segment_path(dir, seq);
        let made = (|| {
            let file = File::options().read(true).write(true).create(true).truncate(true).open(&path)?;
            file.write_all_at(MAGIC, 0)?;
            file.sync_data()?;
            File::open(dir)?.sync_all()?;
            Ok(file)
        })();
        match made {
            Ok(file) => {
                let len = MAGIC.len() as u64;
                Ok(Segment { seq, file, len, written: len, torn: false, created: Instant::now() })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    /// Appends one frame and makes it durable. On failure nothing of it counts: the next append
    /// first cuts whatever part of it reached the file.
    ///
    /// A frame that would grow the file first writes zeros ahead of it (as much again as the
    /// segment holds, within [`AHEAD_MIN`]..[`AHEAD_MAX`]), durable with it: the appends
    /// after it then overwrite blocks the file already has, and their `fdatasync` writes their
    /// data alone, not the file's size and block map too (ext4: 30-35 instead of 60-65 µs of
    /// kernel time for a 25 KB commit, and half the wait: `loadtest/fdatasync.py`).
    pub fn append(&mut self, frame: &[u8]) -> io::Result<()> {
        if self.torn {
            self.file.set_len(self.len)?;
            (self.written, self.torn) = (self.len, false);
        }
        let end = self.len + frame.len() as u64;
        match self
            .write_ahead(end)
            .and_then(|()| self.file.write_all_at(frame, self.len))
            .and_then(|()| self.file.sync_data())
        {
            Ok(()) => {
                self.len += frame.len() as u64;
                Ok(())
            }
            Err(e) => {
                self.torn = true;
                Err(e)
            }
        }
    }

    /// Writes zeros past `end` when the file does not reach it.
    fn write_ahead(&mut self, end: u64) -> io::Result<()> {
        if end <= self.written {
            return Ok(());
        }
        let to = end + self.len.clamp(AHEAD_MIN, AHEAD_MAX);
        let mut at = end;
        while at < to {
            let n = (to - at).min(ZEROS.len() as u64);
            self.file.write_all_at(&ZEROS[..n as usize], at)?;
            at += n;
        }
        self.written = to;
        Ok(())
    }

    pub fn len(&self) -> u64 {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(entries: &[(u8, &str, &[u8])]) -> Vec<u8> {
        let mut buf = Vec::new();
        start_frame(&mut buf);
        for (t, k, v) in entries {
            let (name, value) =
                push_entry(&mut buf, *t, |b| b.extend_from_slice(k.as_bytes()), |b| b.extend_from_slice(v));
            assert_eq!((buf[name.start], &buf[name.start + 1..name.end], &buf[value]), (*t, k.as_bytes(), *v));
        }
        finish_frame(&mut buf);
        buf
    }

    #[test]
    fn a_log_cut_anywhere_reads_as_its_whole_frames() {
        let frames = [frame(&[(1, "a", b"1"), (0, "b", b"22")]), frame(&[]), frame(&[(2, "ü", b"{}")])];
        let mut log = MAGIC.to_vec();
        let mut ends = vec![log.len()];
        for f in &frames {
            log.extend_from_slice(f);
            ends.push(log.len());
        }
        for cut in 0..=log.len() {
            let r = read(&log[..cut]).expect("a cut log is not an error");
            let whole = ends.iter().filter(|&&e| e <= cut).count().saturating_sub(1);
            let expected: usize = [2, 0, 1][..whole].iter().sum();
            assert_eq!(r.entries.len(), expected, "cut at {cut}");
            let end = ends.iter().copied().filter(|&e| e <= cut).max().unwrap_or(0);
            // A cut inside the empty frame's length (zeros) reads like zeros written ahead.
            let zeros = log[end..cut].iter().all(|&b| b == 0);
            assert_eq!((r.end, r.dropped), (end, if zeros { 0 } else { cut - end }), "cut at {cut}");
        }
        let r = read(&log).unwrap();
        let got: Vec<_> = r.entries.iter().map(|e| (e.name, e.value)).collect();
        assert_eq!(got, vec![(&b"\x01a"[..], &b"1"[..]), (b"\x00b", b"22"), ("\u{2}ü".as_bytes(), b"{}")]);
    }

    #[test]
    fn a_flipped_byte_ends_the_log_before_its_frame() {
        let mut log = MAGIC.to_vec();
        log.extend_from_slice(&frame(&[(1, "a", b"1")]));
        let second = log.len();
        log.extend_from_slice(&frame(&[(1, "a", b"2")]));
        for i in second..log.len() {
            let mut bad = log.clone();
            bad[i] ^= 0x40;
            let r = read(&bad).unwrap();
            assert_eq!(r.entries.len(), 1, "byte {i}");
            assert_eq!(r.entries[0].value, b"1");
            assert_eq!(r.dropped, log.len() - second);
        }
    }

    #[test]
    fn a_file_that_is_not_a_log_is_an_error() {
        assert!(read(b"PK\x03\x04 something else").is_err());
    }

    #[test]
    fn appends_write_zeros_ahead_and_the_file_reads_as_their_frames() {
        let dir = tempfile::tempdir().unwrap();
        let path = segment_path(dir.path(), 3);
        let mut seg = Segment::create(dir.path(), 3).unwrap();
        let size = || std::fs::metadata(&path).unwrap().len();
        assert_eq!(size(), MAGIC.len() as u64, "a new segment is its header alone");
        let mut sizes = Vec::new();
        let mut values = Vec::new();
        for i in 0..300usize {
            let value = vec![(i % 251) as u8 + 1; i * 37 % 3000];
            seg.append(&frame(&[(1, "k", &value)])).unwrap();
            values.push(value);
            assert!((seg.len()..=seg.len() + AHEAD_MAX).contains(&size()), "append {i}: {} of {}", seg.len(), size());
            sizes.push(size());
            if i % 50 == 49 {
                let bytes = std::fs::read(&path).unwrap();
                let r = read(&bytes).unwrap();
                assert_eq!((r.end as u64, r.dropped), (seg.len(), 0), "append {i}");
                assert!(r.entries.iter().map(|e| e.value).eq(values.iter().map(|v| &v[..])), "append {i}");
            }
        }
        sizes.dedup();
        assert!(sizes.len() < 10, "the file grows in steps, not with each append: {sizes:?}");
        // A non-zero byte in the zeros is not a clean end.
        let bytes = std::fs::read(&path).unwrap();
        let mut bad = bytes.clone();
        *bad.last_mut().unwrap() = 1;
        let r = read(&bad).unwrap();
        assert_eq!((r.entries.len(), r.end, r.dropped), (300, seg.len() as usize, bytes.len() - seg.len() as usize));
    }

    #[test]
    fn a_failed_append_is_cut_before_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut seg = Segment::create(dir.path(), 7).unwrap();
        seg.append(&frame(&[(1, "a", b"1")])).unwrap();
        // As if a failed append had left part of a frame behind.
        let good = seg.len();
        seg.file.write_all_at(b"garbage", good).unwrap();
        seg.torn = true;
        seg.append(&frame(&[(1, "a", b"2")])).unwrap();
        let bytes = std::fs::read(segment_path(dir.path(), 7)).unwrap();
        let r = read(&bytes).unwrap();
        assert_eq!(r.dropped, 0);
        assert_eq!(r.entries.iter().map(|e| e.value).collect::<Vec<_>>(), vec![&b"1"[..], b"2"]);
        assert_eq!(segments(dir.path()).unwrap().iter().map(|s| s.0).collect::<Vec<_>>(), vec![7]);
    }
}
