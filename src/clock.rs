//! Injected time. The server uses [`SystemClock`]; tests use [`ManualClock`] so that plan expiry,
//! temporary-upgrade windows and token-bucket refills are exact and instant.
//!
//! A clock gives two readings: wall time (Unix nanoseconds, for plan windows and months) and a
//! monotonic reading (for token buckets, which must never see time go backwards).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time in nanoseconds since the Unix epoch.
    fn unix_nanos(&self) -> i64;
    /// Monotonic nanoseconds since an arbitrary origin fixed for the clock's lifetime.
    fn mono_nanos(&self) -> u64;
}

pub type SharedClock = Arc<dyn Clock>;

/// The real clock. Monotonic time comes from the CPU's invariant TSC through `quanta` (a few
/// nanoseconds, against ~30 ns for `clock_gettime` here); wall time is that plus an offset to
/// the system clock, re-read at most once a second, so a stepped system clock is followed within
/// a second and a request pays for one clock read.
pub struct SystemClock {
    tsc: quanta::Clock,
    /// The counter's raw reading at the clock's creation: monotonic time is the nanoseconds
    /// since (`delta_as_nanos`: one multiply and shift, no `Duration` to split and join again).
    origin: u64,
    /// Unix nanoseconds minus monotonic nanoseconds, as of `synced_at`.
    offset: AtomicI64,
    synced_at: AtomicU64,
}

const RESYNC_NANOS: u64 = 1_000_000_000;

fn system_unix_nanos() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
    }
}

impl SystemClock {
    pub fn new() -> Self {
        let tsc = quanta::Clock::new();
        let origin = tsc.raw();
        let c = SystemClock { tsc, origin, offset: AtomicI64::new(0), synced_at: AtomicU64::new(0) };
        c.resync(c.mono_nanos());
        c
    }
    pub fn shared() -> SharedClock {
        Arc::new(Self::new())
    }
    fn resync(&self, mono: u64) {
        self.offset.store(system_unix_nanos() - mono as i64, Ordering::Relaxed);
        self.synced_at.store(mono, Ordering::Relaxed);
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn unix_nanos(&self) -> i64 {
        let mono = self.mono_nanos();
        if mono.saturating_sub(self.synced_at.load(Ordering::Relaxed)) > RESYNC_NANOS {
            self.resync(mono);
        }
        self.offset.load(Ordering::Relaxed).saturating_add(mono as i64)
    }
    fn mono_nanos(&self) -> u64 {
        self.tsc.delta_as_nanos(self.origin, self.tsc.raw())
    }
}

/// A clock that only moves when told to. Wall and monotonic readings advance together.
pub struct ManualClock {
    wall: AtomicI64,
    mono: AtomicU64,
}

impl ManualClock {
    pub fn new(unix_nanos: i64) -> Arc<Self> {
        Arc::new(ManualClock { wall: AtomicI64::new(unix_nanos), mono: AtomicU64::new(1_000_000_000) })
    }
    /// Starts at an RFC 3339 time; panics on a malformed literal (test helper).
    pub fn at(rfc3339: &str) -> Arc<Self> {
        Self::new(crate::time::parse_rfc3339(rfc3339).expect("valid RFC 3339 literal"))
    }
    pub fn advance(&self, by: Duration) {
        let n = by.as_nanos() as u64;
        self.mono.fetch_add(n, Ordering::SeqCst);
        self.wall.fetch_add(n as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn unix_nanos(&self) -> i64 {
        self.wall.load(Ordering::SeqCst)
    }
    fn mono_nanos(&self) -> u64 {
        self.mono.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_clock_tracks_the_system_time_and_never_goes_back() {
        let c = SystemClock::new();
        let a = c.mono_nanos();
        let wall = c.unix_nanos();
        assert!((wall - system_unix_nanos()).abs() < 50_000_000, "within 50 ms of the system clock");
        std::thread::sleep(Duration::from_millis(20));
        assert!(c.mono_nanos() >= a + 19_000_000);
        assert!(c.unix_nanos() > wall);
    }
}
