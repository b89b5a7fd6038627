//! Injected time. The server uses [`SystemClock`]; tests use [`ManualClock`] so that plan expiry,
//! temporary-upgrade windows and token-bucket refills are exact and instant.
//!
//! A clock gives two readings: wall time (Unix nanoseconds, for plan windows and months) and a
//! monotonic reading (for token buckets, which must never see time go backwards).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time in nanoseconds since the Unix epoch.
    fn unix_nanos(&self) -> i64;
    /// Monotonic nanoseconds since an arbitrary origin fixed for the clock's lifetime.
    fn mono_nanos(&self) -> u64;
}

pub type SharedClock = Arc<dyn Clock>;

/// The real clock.
pub struct SystemClock {
    origin: Instant,
}

impl SystemClock {
    pub fn new() -> Self {
        SystemClock { origin: Instant::now() }
    }
    pub fn shared() -> SharedClock {
        Arc::new(Self::new())
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for SystemClock {
    fn unix_nanos(&self) -> i64 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_nanos()).unwrap_or(i64::MAX),
            Err(e) => -i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX),
        }
    }
    fn mono_nanos(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
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
    /// Moves wall time to `unix_nanos` (forward only); monotonic time advances by the same amount.
    pub fn set(&self, unix_nanos: i64) {
        let now = self.wall.load(Ordering::SeqCst);
        assert!(unix_nanos >= now, "ManualClock only moves forward");
        self.advance(Duration::from_nanos((unix_nanos - now) as u64));
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

/// Adapter so governor's GCRA reads the injected monotonic clock.
#[derive(Clone)]
pub struct GovernorClock(pub SharedClock);

impl governor::clock::Clock for GovernorClock {
    type Instant = governor::nanos::Nanos;
    fn now(&self) -> Self::Instant {
        governor::nanos::Nanos::from(self.0.mono_nanos())
    }
}
