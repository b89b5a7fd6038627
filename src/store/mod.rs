//! The store interfaces (issue 12, `STORE.md`): everything the request path keeps between
//! requests — token buckets, package balances and holds, monthly usage, image counts, alerts
//! fired, upgrade overrides — behind async, delta-based operations that are idempotent on a
//! [`RequestId`], so that a local backend (DashMap + redb) and a shared one (Redis) are
//! interchangeable and agree to the unit.
//!
//! Every quantity a store keeps is an integer (Lua numbers are doubles): package points in
//! micro-points ([`MICRO`] per point), per-call units in whole calls, video usage in milliseconds.
//! Money is computed by the caller with `rust_decimal` from these integers and never stored.
//!
//! Dispatch is static: the traits use `impl Future + Send` returns (implementations write plain
//! `async fn`), and the gateway holds an enum of the backends that implements every trait by
//! `match` — no `Box<dyn Future>`, no allocation per request. A backend that answers from memory
//! (the local one) completes without suspending.
//!
//! Keys carry the names a shared store needs (`tenant`, `bucket`, package id) and, in `local`,
//! the process-local interned id of the same thing ([`crate::intern`]), which the local backend
//! keys its maps by so the hot path hashes one integer. A remote backend ignores `local`.

/// The Redis backend (SPEC §11).
pub mod redis;

use std::future::Future;
use std::time::Duration;

use crate::config::gateway::ImageOp;
pub use crate::payer::PayerKind;

pub mod local;
#[cfg(test)]
pub mod tests;

/// Micro-points per point: package points are kept as `i64` micro-points.
pub use crate::units::MICRO;

/// A GCRA bucket's shape (governor's maths): `limit` per second, `depth` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Quota {
    pub limit: u32,
    pub depth: u32,
}

/// Unique per request across replicas: the idempotency key of every delta a request applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct RequestId(pub u128);

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Makes [`RequestId`]s: a 64-bit process nonce (start time, pid, address entropy) in the high
/// half, a counter in the low half. Unique within the process by construction and across
/// replicas with overwhelming probability.
pub struct RequestIds {
    nonce: u64,
    next: std::sync::atomic::AtomicU64,
}

impl RequestIds {
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
        RequestIds { nonce: h.finish(), next: std::sync::atomic::AtomicU64::new(1) }
    }

    /// The next id. Each thread takes its counters from the shared one in blocks of
    /// [`RequestIds::BLOCK`], so the per-core workers do not all write one cache line per request
    /// (ids stay unique; their order across threads is not the order of the calls).
    pub fn next(&self) -> RequestId {
        thread_local! {
            /// (the generator's nonce, next counter, end of the block)
            static BLOCK: std::cell::Cell<(u64, u64, u64)> = const { std::cell::Cell::new((0, 0, 0)) };
        }
        let n = BLOCK.with(|b| {
            let (nonce, mut next, mut end) = b.get();
            if nonce != self.nonce || next == end {
                next = self.next.fetch_add(Self::BLOCK, std::sync::atomic::Ordering::Relaxed);
                end = next + Self::BLOCK;
            }
            b.set((self.nonce, next + 1, end));
            next
        });
        RequestId((u128::from(self.nonce) << 64) | u128::from(n))
    }

    /// Ids a thread takes from the shared counter at once.
    pub const BLOCK: u64 = 256;
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

/// The answer of the rate store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Admitted; `remaining` more fit right now; the bucket is full again in `reset_secs`.
    Allowed { remaining: u32, reset_secs: u64 },
    /// Refused; a request can be admitted again after `retry_after`.
    Throttled { retry_after: Duration },
}

/// A bucket as it is, read without taking a token ([`RateStore::peek`]): `remaining` tokens fit
/// right now, and the bucket is full again in `reset_secs` (whole seconds, 0 when full).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub remaining: u32,
    pub reset_secs: u64,
}

impl RateState {
    /// A bucket holding `remaining` of `q.depth` tokens: full again once the missing ones have
    /// come back at `q.limit` a second (the reset the rate-limit fields of an admission show).
    pub fn of(q: Quota, remaining: u32) -> RateState {
        let remaining = remaining.min(q.depth);
        RateState { remaining, reset_secs: u64::from(q.depth - remaining).div_ceil(u64::from(q.limit.max(1))) }
    }
}

/// A (tenant, bucket) key: `bucket` is the feature id (or the image-search delete bucket).
#[derive(Debug, Clone, Copy)]
pub struct BucketKey<'a> {
    pub tenant: &'a str,
    pub bucket: &'a str,
    /// [`crate::intern::pair`] of the two (local backend only).
    pub local: u64,
}

/// A tenant, by name and interned id.
#[derive(Debug, Clone, Copy)]
pub struct TenantKey<'a> {
    pub name: &'a str,
    /// [`crate::intern::tenant`] (local backend only).
    pub local: u32,
}

/// A package that may pay, in SPEC §6 order ([`crate::payer`] makes the list).
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub id: &'a str,
    /// The package's configured points, in micro-points.
    pub points: i64,
    /// [`crate::intern::pair`] of (tenant, package) (local backend only).
    pub local: u64,
}

/// Where units of usage go: a payer of SPEC §6, or nowhere (video minutes nothing could pay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum UsageTo {
    Payer(PayerKind),
    Unpaid,
}

/// Pay-as-you-go cell of tiered per-call features (SPEC §9 `payg` key `""`).
pub const CALL_CELL: &str = "";
/// The pay-as-you-go cell of video minutes outside the price matrix (metered, no amount).
pub const UNPRICED: &str = "unpriced";

/// The usage of one (tenant, feature, month), in store units (calls or ms).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonthUsage {
    pub feature: String,
    /// Units per payer, indexed like [`PayerKind`] (`PAYERS` order).
    pub units: [i64; 5],
    /// Pay-as-you-go units per price cell ([`CALL_CELL`], a video cell, or [`UNPRICED`]).
    pub payg: std::collections::BTreeMap<String, i64>,
    /// Units nothing could pay for.
    pub unpaid: i64,
}

/// What [`BalanceStore::take_up_to`] took from one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Taken {
    /// Micro-points taken (0 ≤ taken ≤ want).
    pub taken: i64,
    /// The package's consumption after the take (for the gauge and the low-balance alert).
    pub consumed: i64,
}

/// An upgrade posted through the admin API (SPEC §8): permanent (`until = None`) or temporary.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Override {
    pub qps: u32,
    /// Unix nanoseconds.
    pub from: i64,
    pub until: Option<i64>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached, or refused the operation for a reason that may pass (SPEC
    /// §11.6).
    #[error("store {backend} unavailable: {reason}")]
    Unavailable { backend: String, reason: String },
    /// The store answered the operation with an error that sending it again cannot change
    /// (Redis: `WRONGTYPE`, a script's runtime error). A request answers it exactly like
    /// [`StoreError::Unavailable`]; the fallback's replay sets its entry aside instead of
    /// retrying it ([`StoreError::is_rejection`]).
    #[error("store {backend} rejected the operation: {reason}")]
    Rejected { backend: String, reason: String },
    /// The store did not answer within its bounded timeout.
    #[error("store {backend} did not answer {op} within {ms} ms")]
    Timeout { backend: String, op: &'static str, ms: u64 },
    /// Strict mode: the request's deltas were not durable within `strict_timeout_ms`; they were
    /// reverted exactly (SPEC §7), so the request is not charged.
    #[error("the charge was not durable within {timeout_ms} ms; it was reverted")]
    NotDurable { timeout_ms: u64 },
    /// A stored value does not decode: never silently reset.
    #[error("store {backend}: corrupt value at {key}: {reason}")]
    Corrupt { backend: String, key: String, reason: String },
}

impl StoreError {
    /// The same operation sent again gets the same error: the store rejected it, or answered
    /// something that does not decode. Any other error (unreachable, timed out, a store busy or
    /// loading) may pass.
    pub fn is_rejection(&self) -> bool {
        matches!(self, StoreError::Rejected { .. } | StoreError::Corrupt { .. })
    }
}

/// One GCRA bucket per (tenant, bucket). The local backend uses governor's maths on the injected clock;
/// Redis runs the same maths on Redis `TIME`.
pub trait RateStore: Send + Sync {
    /// Takes one token; a bucket whose shape changed starts afresh (full).
    fn admit(&self, key: BucketKey<'_>, q: Quota) -> impl Future<Output = Result<Admit, StoreError>> + Send;
    /// Gives back the token an [`Admit::Allowed`] of the same shape took (402, 409, 413): moves
    /// the theoretical arrival time back one emission interval, never past a full bucket; a
    /// bucket re-shaped since is left alone. Once per `id` (a refund sent again after its answer
    /// was lost gives nothing more back).
    fn refund(
        &self,
        key: BucketKey<'_>,
        q: Quota,
        id: RequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The bucket as it is now, for the rate-limit fields of a refusal decided before admission
    /// (SPEC §4: it takes no token, and its fields must not claim a full bucket): nothing is
    /// written and no token is taken. A bucket of another shape, or none, reads full (the
    /// admission that comes next starts it afresh). Never called on the admitted path.
    fn peek(&self, key: BucketKey<'_>, q: Quota) -> impl Future<Output = Result<RateState, StoreError>> + Send;
}

/// Package balances: holds with a lease, committed or released exactly once per request id.
pub trait BalanceStore: Send + Sync {
    /// Holds `want` micro-points on the first candidate (in the given order) whose
    /// `points - consumed - held >= want` (the whole-factor rule), for `lease`. Returns the
    /// candidate's index, or `None` when none can pay. Idempotent on `id`: a second call with a
    /// live hold returns the same index and holds nothing more.
    fn reserve(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<usize>, StoreError>> + Send;
    /// Turns the hold of `id` into consumption. Returns the package's consumption after the
    /// commit, or `None` when `id` holds nothing (already committed, released, swept): a no-op.
    fn commit(
        &self,
        tenant: TenantKey<'_>,
        id: RequestId,
    ) -> impl Future<Output = Result<Option<i64>, StoreError>> + Send;
    /// Gives the hold of `id` back; a no-op when there is none.
    fn release(&self, tenant: TenantKey<'_>, id: RequestId) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The release of a reservation guard dropped without a commit (client gone, upstream error):
    /// cannot await. Local: synchronous. Remote: spawned, with the lease sweep as the backstop.
    fn release_in_background(&self, tenant: TenantKey<'_>, id: RequestId);
    /// Video settlement, one step: takes greedily, in the given order, up to `want` micro-points
    /// in total — from each candidate `min(what it holds beyond the holds of calls in flight,
    /// what the total still lacks)` — and returns what each candidate gave (one entry per
    /// candidate). Never takes more than a package holds, whatever the concurrency. The ms split
    /// is the caller's ([`crate::payer::split_video`]). Idempotent on `id` (a repeat returns the
    /// first answer and takes nothing).
    fn take_up_to(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
    ) -> impl Future<Output = Result<Vec<Taken>, StoreError>> + Send;
    /// Micro-points a package has consumed (committed), holds not included.
    fn consumed(
        &self,
        tenant: TenantKey<'_>,
        package: Candidate<'_>,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// Marks a package's low-balance alert fired; true only the first time (cluster-wide).
    fn mark_alerted(
        &self,
        tenant: TenantKey<'_>,
        package: Candidate<'_>,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Gives back every hold whose lease has passed; returns how many.
    fn sweep(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Monthly usage counters per (tenant, feature, month `YYYY-MM`).
pub trait UsageStore: Send + Sync {
    /// Adds `units` (calls or ms) to `to`, and for `UsageTo::Payer(Payg)` also to the price
    /// `cell`. Idempotent on (`id`, `to`, `cell`): a repeat adds nothing. Returns the total after
    /// the add of the cell (payg) or of the payer's units (others), for the payg tier maths.
    #[allow(clippy::too_many_arguments)]
    fn add_usage(
        &self,
        key: BucketKey<'_>,
        month: &str,
        to: UsageTo,
        units: i64,
        cell: &str,
        id: RequestId,
    ) -> impl Future<Output = Result<i64, StoreError>> + Send;
    /// A tenant's usage of a month, per feature, sorted by feature id.
    fn month(
        &self,
        tenant: TenantKey<'_>,
        month: &str,
    ) -> impl Future<Output = Result<Vec<MonthUsage>, StoreError>> + Send;
}

/// Image Search image counts: a slot held by an add in flight, then the count.
pub trait ImageStore: Send + Sync {
    /// Holds one slot when `count + held < capacity`; false means 409. Idempotent on `id`.
    fn reserve_image_slot(
        &self,
        tenant: TenantKey<'_>,
        capacity: u64,
        id: RequestId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// After a 2xx: an add turns its slot into an image (+1), a delete is -1 (never below 0), and
    /// `reported` (the upstream's `x-usage-image-count`), when given, wins. Returns the count.
    fn settle_images(
        &self,
        tenant: TenantKey<'_>,
        op: ImageOp,
        id: RequestId,
        reported: Option<u64>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Gives the slot of `id` back; a no-op when there is none.
    fn release_image_slot(
        &self,
        tenant: TenantKey<'_>,
        id: RequestId,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// The same, from a guard's `Drop` (see [`BalanceStore::release_in_background`]).
    fn release_image_slot_in_background(&self, tenant: TenantKey<'_>, id: RequestId);
    /// The tenant's image count.
    fn image_count(&self, tenant: TenantKey<'_>) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Upgrade overrides posted through any replica's admin API.
pub trait OverrideStore: Send + Sync {
    /// Stores an override for (tenant, feature); storing the same one twice keeps one.
    fn put_override(
        &self,
        tenant: &str,
        feature: &str,
        ov: Override,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Every stored override, sorted by (tenant, feature, from).
    fn overrides(&self) -> impl Future<Output = Result<Vec<(String, String, Override)>, StoreError>> + Send;
}

/// Durability of a request's deltas (SPEC §7, §11.5).
pub trait Durable: Send + Sync {
    /// Returns once every delta applied for `id` is durable. Batched mode: at once. Strict mode:
    /// within `strict_timeout`, else every delta of `id` is reverted exactly and the answer is
    /// [`StoreError::NotDurable`] (the call is not charged). A backend whose settlement already
    /// waited for durability (Redis strict) answers at once.
    fn durable(&self, id: RequestId) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The backends, dispatched statically: the gateway holds one of these. The Redis arm's future
/// is boxed: inline, a Redis round trip's state (several KB) would size every request's future,
/// which the local path moves on every call; next to a round trip, one allocation is nothing.
#[derive(Clone)]
pub enum Stores {
    Local(std::sync::Arc<local::LocalStore>),
    Redis(redis::RedisStore),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Stores::Local($s) => $e,
            Stores::Redis($s) => $e,
        }
    };
}

/// [`each!`] for an `async` method: `$f` is the call without its `.await`.
macro_rules! each_await {
    ($self:ident, $s:ident => $f:expr) => {
        match $self {
            Stores::Local($s) => $f.await,
            Stores::Redis($s) => Box::pin($f).await,
        }
    };
}

impl RateStore for Stores {
    async fn admit(&self, key: BucketKey<'_>, q: Quota) -> Result<Admit, StoreError> {
        each_await!(self, s => s.admit(key, q))
    }
    async fn refund(&self, key: BucketKey<'_>, q: Quota, id: RequestId) -> Result<(), StoreError> {
        each_await!(self, s => s.refund(key, q, id))
    }
    async fn peek(&self, key: BucketKey<'_>, q: Quota) -> Result<RateState, StoreError> {
        each_await!(self, s => s.peek(key, q))
    }
}

impl BalanceStore for Stores {
    async fn reserve(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
        lease: Duration,
    ) -> Result<Option<usize>, StoreError> {
        each_await!(self, s => s.reserve(tenant, candidates, want, id, lease))
    }
    async fn commit(&self, tenant: TenantKey<'_>, id: RequestId) -> Result<Option<i64>, StoreError> {
        each_await!(self, s => s.commit(tenant, id))
    }
    async fn release(&self, tenant: TenantKey<'_>, id: RequestId) -> Result<(), StoreError> {
        each_await!(self, s => s.release(tenant, id))
    }
    fn release_in_background(&self, tenant: TenantKey<'_>, id: RequestId) {
        each!(self, s => s.release_in_background(tenant, id))
    }
    async fn take_up_to(
        &self,
        tenant: TenantKey<'_>,
        candidates: &[Candidate<'_>],
        want: i64,
        id: RequestId,
    ) -> Result<Vec<Taken>, StoreError> {
        each_await!(self, s => s.take_up_to(tenant, candidates, want, id))
    }
    async fn consumed(&self, tenant: TenantKey<'_>, package: Candidate<'_>) -> Result<i64, StoreError> {
        each_await!(self, s => s.consumed(tenant, package))
    }
    async fn mark_alerted(&self, tenant: TenantKey<'_>, package: Candidate<'_>) -> Result<bool, StoreError> {
        each_await!(self, s => s.mark_alerted(tenant, package))
    }
    async fn sweep(&self) -> Result<u64, StoreError> {
        each_await!(self, s => s.sweep())
    }
}

impl UsageStore for Stores {
    async fn add_usage(
        &self,
        key: BucketKey<'_>,
        month: &str,
        to: UsageTo,
        units: i64,
        cell: &str,
        id: RequestId,
    ) -> Result<i64, StoreError> {
        each_await!(self, s => s.add_usage(key, month, to, units, cell, id))
    }
    async fn month(&self, tenant: TenantKey<'_>, month: &str) -> Result<Vec<MonthUsage>, StoreError> {
        each_await!(self, s => s.month(tenant, month))
    }
}

impl ImageStore for Stores {
    async fn reserve_image_slot(
        &self,
        tenant: TenantKey<'_>,
        capacity: u64,
        id: RequestId,
    ) -> Result<bool, StoreError> {
        each_await!(self, s => s.reserve_image_slot(tenant, capacity, id))
    }
    async fn settle_images(
        &self,
        tenant: TenantKey<'_>,
        op: ImageOp,
        id: RequestId,
        reported: Option<u64>,
    ) -> Result<u64, StoreError> {
        each_await!(self, s => s.settle_images(tenant, op, id, reported))
    }
    async fn release_image_slot(&self, tenant: TenantKey<'_>, id: RequestId) -> Result<(), StoreError> {
        each_await!(self, s => s.release_image_slot(tenant, id))
    }
    fn release_image_slot_in_background(&self, tenant: TenantKey<'_>, id: RequestId) {
        each!(self, s => s.release_image_slot_in_background(tenant, id))
    }
    async fn image_count(&self, tenant: TenantKey<'_>) -> Result<u64, StoreError> {
        each_await!(self, s => s.image_count(tenant))
    }
}

impl OverrideStore for Stores {
    async fn put_override(&self, tenant: &str, feature: &str, ov: Override) -> Result<(), StoreError> {
        each_await!(self, s => s.put_override(tenant, feature, ov))
    }
    async fn overrides(&self) -> Result<Vec<(String, String, Override)>, StoreError> {
        each_await!(self, s => s.overrides())
    }
}

impl Durable for Stores {
    async fn durable(&self, id: RequestId) -> Result<(), StoreError> {
        each_await!(self, s => s.durable(id))
    }
}

/// Runs a future that completes without suspending (every local-store operation) to its output
/// by polling it once; `None` if it would have to wait. For synchronous callers (tests, benches).
pub fn ready<F: Future>(f: F) -> Option<F::Output> {
    let f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// Every store interface at once: what the gateway holds.
pub trait Store: RateStore + BalanceStore + UsageStore + ImageStore + OverrideStore + Durable {}

impl<T: RateStore + BalanceStore + UsageStore + ImageStore + OverrideStore + Durable> Store for T {}
