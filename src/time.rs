//! RFC 3339 times as Unix nanoseconds, the representation the hot path compares.

use chrono::{DateTime, FixedOffset, TimeZone, Utc};

/// Parses an RFC 3339 time that carries an offset (`Z` or `±hh:mm`).
pub fn parse_rfc3339(s: &str) -> Result<i64, String> {
    let t = DateTime::parse_from_rfc3339(s).map_err(|e| format!("{s:?} is not an RFC 3339 time with offset ({e})"))?;
    // Times are kept as i64 nanoseconds (what the hot path compares): the range is theirs.
    t.timestamp_nanos_opt()
        .ok_or_else(|| format!("{s:?} is out of range: write a time from 1677-09-21T00:12:44Z to 2262-04-11T23:47:16Z"))
}

/// Formats Unix nanoseconds as RFC 3339 in the given offset.
pub fn format_rfc3339(unix_nanos: i64, offset: FixedOffset) -> String {
    offset.timestamp_nanos(unix_nanos).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, false)
}

/// Formats Unix nanoseconds as RFC 3339 in UTC.
pub fn format_utc(unix_nanos: i64) -> String {
    Utc.timestamp_nanos(unix_nanos).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Parses a fixed offset written `+08:00`, `-05:30` or `Z`.
pub fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    if s == "Z" || s == "+00:00" || s == "-00:00" {
        return FixedOffset::east_opt(0).ok_or_else(|| "bad offset".into());
    }
    let bad = || format!("{s:?} is not a fixed offset like \"+08:00\"");
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if b.len() != 6 || b[3] != b':' || !(b[0] == b'+' || b[0] == b'-') || !digits(1..3) || !digits(4..6) {
        return Err(bad());
    }
    let h: i32 = s[1..3].parse().map_err(|_| bad())?;
    let m: i32 = s[4..6].parse().map_err(|_| bad())?;
    if h > 23 || m > 59 {
        return Err(bad());
    }
    let secs = (h * 3600 + m * 60) * if b[0] == b'-' { -1 } else { 1 };
    FixedOffset::east_opt(secs).ok_or_else(bad)
}

pub const NANOS_PER_SEC: i64 = 1_000_000_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_offsets_and_times() {
        assert_eq!(parse_offset("+08:00").unwrap().local_minus_utc(), 8 * 3600);
        assert_eq!(parse_offset("-05:30").unwrap().local_minus_utc(), -(5 * 3600 + 1800));
        assert!(parse_offset("8").is_err());
        assert!(parse_offset("+24:00").is_err());
        let a = parse_rfc3339("2026-11-01T00:00:00+08:00").unwrap();
        let b = parse_rfc3339("2026-10-31T16:00:00Z").unwrap();
        assert_eq!(a, b);
        assert!(parse_rfc3339("2026-11-01T00:00:00").is_err(), "an offset is required");
        assert_eq!(format_utc(b), "2026-10-31T16:00:00Z");
    }
}
