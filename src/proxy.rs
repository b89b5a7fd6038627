//! Tenant traffic (SPEC §4), in named phases: identify → route → admit → pay → forward →
//! settle. Refusals are [`ApiError`]s; their status, code and outcome come from one table
//! ([`ApiError::refusal`]).
//!
//! The decision reads the snapshot once ([`crate::gateway::Gateway::request_snapshot`]: the
//! thread's handle, no lock) and yields a small owned [`Forward`] that keeps that handle; a reload
//! swaps the snapshot in and never waits on a request.

use quanta::Instant;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body::Body as _;
use http_body_util::Either;
use hyper::body::Incoming;

use crate::admission;
use crate::billing::{Admission, ImageSettle, ImageSlot, Reservation, VideoUsage};
use crate::body::{TenantBody, Upload, UploadError};
use crate::catalog::Feature;
use crate::catalog::Unit;
use crate::config::entitlements::Tenant;
use crate::config::gateway::{AdmissionMode, ImageOp, UpstreamProtocol};
use crate::error::ApiError;
use crate::gateway::{Conn, Gateway};
use crate::grpc::TrailerGate;
use crate::metrics::Outcome;
use crate::snapshot::Snapshot;
use crate::store::{BucketKey, Quota};

pub use crate::http_util::ProxyBody;
use crate::http_util::{error_response, remove_where};
pub type UpstreamBody = Upload;

static X_TURNSTILE_TENANT: HeaderName = HeaderName::from_static("x-turnstile-tenant");
static X_TURNSTILE_FEATURE: HeaderName = HeaderName::from_static("x-turnstile-feature");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_TURNSTILE_PAYER: HeaderName = HeaderName::from_static("x-turnstile-payer");

/// Everything needed after the decision, owned. It holds the snapshot the call was decided on
/// (the one load of the request), so the forward and settle phases read the same configuration
/// and never look the tenant or feature up again; a reload meanwhile publishes a new snapshot
/// for the calls that come next and waits for nobody.
pub struct Forward {
    snap: Arc<crate::gateway::SnapshotHandle>,
    /// Indexes of the tenant and feature in `snap`.
    ti: usize,
    fi: usize,
    pair: u64,
    tenant: &'static str,
    feature: &'static str,
    key_in_authorization: bool,
    /// The normalized path (SPEC §4) when it differs from the request's; `None` keeps the
    /// request's own path (nearly always: nothing allocated).
    path: Option<String>,
    /// The rate-limit fields' values, formatted when the answer goes out.
    rate: RateFields,
    /// The bucket's shape, to give the token back when the body turns out too large.
    quota: Quota,
    reservation: Reservation,
    /// Image search: the operation, and for an add its capacity slot.
    image: Option<(ImageOp, Option<ImageSlot>)>,
    /// Shadow mode (SPEC §5.5): the outcome counted instead of `admitted` when the upstream
    /// answers (`shadow_throttled`, `shadow_payment_required`); `None` for an admitted call.
    shadow: Option<Outcome>,
}

impl Forward {
    pub(crate) fn snap(&self) -> &Snapshot {
        &self.snap
    }
    pub(crate) fn snapshot_handle(&self) -> &Arc<crate::gateway::SnapshotHandle> {
        &self.snap
    }
    pub(crate) fn pair(&self) -> u64 {
        self.pair
    }
    pub(crate) fn tenant(&self) -> &'static str {
        self.tenant
    }
    pub(crate) fn feature(&self) -> &'static str {
        self.feature
    }
    pub(crate) fn key_in_authorization(&self) -> bool {
        self.key_in_authorization
    }
    /// The normalized path when it differs from the request's.
    pub(crate) fn normalized_path(&self) -> Option<&str> {
        self.path.as_deref()
    }
    /// Whether this is an Image Search call (its answers may report the image count).
    pub(crate) fn is_image(&self) -> bool {
        self.image.is_some()
    }
    pub(crate) fn shadow(&self) -> Option<Outcome> {
        self.shadow
    }
    pub(crate) fn rate(&self) -> RateFields {
        self.rate
    }
    /// The payer named at admission (`x-turnstile-payer` of an answer that is not charged).
    pub(crate) fn reserved_payer(&self) -> HeaderValue {
        self.reservation.header()
    }
}

/// The bucket's state as the rate-limit fields of draft-ietf-httpapi-ratelimit-headers show it
/// (structured-field syntax): `ratelimit-policy: "qps";q=<limit>;w=1` and
/// `ratelimit: "qps";r=<remaining>;t=<reset>`. Formatted by hand on the stack (no `fmt`
/// machinery and nothing allocated on every answer); the fast path writes the bytes into its
/// answer, the hyper path makes header values of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateFields {
    limit: u32,
    remaining: u32,
    reset_secs: u64,
}

static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

impl RateFields {
    fn new(limit: u32, remaining: u32, reset_secs: u64) -> RateFields {
        RateFields { limit, remaining, reset_secs }
    }

    /// `(q, r, t)`: the limit, the tokens that remain, the whole seconds until the bucket is full.
    pub fn values(self) -> (u32, u32, u64) {
        (self.limit, self.remaining, self.reset_secs)
    }

    /// The value of `ratelimit-policy`.
    pub(crate) fn policy(self) -> Digits {
        let mut b = Digits::new(b"\"qps\";q=");
        b.num(u64::from(self.limit));
        b.push(b";w=1");
        b
    }

    /// The value of `ratelimit`.
    pub(crate) fn state(self) -> Digits {
        let mut b = Digits::new(b"\"qps\";r=");
        b.num(u64::from(self.remaining));
        b.push(b";t=");
        b.num(self.reset_secs);
        b
    }

    /// Both fields as header values; the policy, which changes only with the limit, is kept
    /// per thread for the limit seen last.
    pub(crate) fn headers(self) -> [(HeaderName, HeaderValue); 2] {
        thread_local! {
            static POLICY: std::cell::RefCell<Option<(u32, HeaderValue)>> = const { std::cell::RefCell::new(None) };
        }
        let policy = POLICY.with(|p| {
            let mut p = p.borrow_mut();
            match p.as_ref() {
                Some((l, v)) if *l == self.limit => v.clone(),
                _ => {
                    let v = self.policy().value();
                    *p = Some((self.limit, v.clone()));
                    v
                }
            }
        });
        [(RATELIMIT_POLICY.clone(), policy), (RATELIMIT.clone(), self.state().value())]
    }
}

/// A short header value built on the stack: ASCII pieces and decimal numbers.
pub struct Digits {
    buf: [u8; 64],
    len: usize,
}

impl Digits {
    fn new(start: &[u8]) -> Digits {
        let mut d = Digits { buf: [0; 64], len: 0 };
        d.push(start);
        d
    }

    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn num(&mut self, n: u64) {
        self.push(itoa::Buffer::new().format(n).as_bytes());
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    fn value(&self) -> HeaderValue {
        // Digits and the fixed ASCII above: always a valid value.
        HeaderValue::from_bytes(self.as_bytes()).unwrap_or(HeaderValue::from_static("\"qps\""))
    }
}

/// The request head as the decision reads it: the first value of a header, by its lowercase
/// name. hyper's `HeaderMap` is one; the HTTP/1.1 fast path's parsed head ([`crate::h1`]) is
/// the other, so both paths decide with the same code.
pub trait HeadView {
    fn header(&self, name: &str) -> Option<&[u8]>;
    /// Whether some value of `name` satisfies `f` (the first alone, for a view that keeps one).
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.header(name).is_some_and(f)
    }
    /// A usage report field of an upstream answer (SPEC §4): `None` when absent, and when given
    /// more than once with different values, which is ambiguous as two different
    /// `Content-Length`s are (RFC 9112 §6.3); the same value repeated reads as that value.
    /// (The first, for a view that keeps one.)
    fn report(&self, name: &str) -> Option<&[u8]> {
        self.header(name)
    }
}

impl HeadView for HeaderMap {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.get(name).map(|v| v.as_bytes())
    }
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.get_all(name).iter().any(|v| f(v.as_bytes()))
    }
    fn report(&self, name: &str) -> Option<&[u8]> {
        let mut values = self.get_all(name).iter().map(HeaderValue::as_bytes);
        let first = values.next()?;
        values.all(|v| v.trim_ascii() == first.trim_ascii()).then_some(first)
    }
}

/// Returns the API key and whether `Authorization: Bearer` carries it (then that header is
/// removed upstream too: SPEC §4), also when the key header carries the same key, in any of
/// the `Authorization` fields.
fn api_key<'a, H: HeadView + ?Sized>(headers: &'a H, name: &HeaderName) -> Option<(&'a [u8], bool)> {
    if let Some(v) = headers.header(name.as_str()) {
        let k = v.trim_ascii();
        if !k.is_empty() {
            let in_authorization = headers.any_value("authorization", &mut |a| crate::http_util::bearer(a) == Some(k));
            return Some((k, in_authorization));
        }
    }
    headers.header("authorization").and_then(crate::http_util::bearer).map(|k| (k, true))
}

/// Who a refused request is counted against in `turnstile_requests_total`.
pub enum Who {
    /// No tenant identified.
    Nobody,
    /// A tenant, but no feature (unknown route).
    Tenant(&'static str),
    /// A (tenant, feature) pair: its bucket key and labels.
    Pair(u64, &'static str, &'static str),
}

/// The outcome of identify → route → admit → pay.
// A short-lived return value on the stack; boxing `Forward` would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
pub enum Decision {
    /// Refused: the error (its status, code and outcome come from [`ApiError::refusal`]), who
    /// it is counted against, and the rate-limit fields that go with it (none before a bucket
    /// is known).
    Reject(ApiError, Who, Option<RateFields>),
    Forward(Forward),
}

type Refused = (ApiError, Who, Option<RateFields>);

/// Phase 1, identify: the API key → the tenant's index, and whether the key came as a bearer.
fn identify<H: HeadView + ?Sized>(snap: &Snapshot, headers: &H) -> Result<(usize, bool), Refused> {
    let s = &snap.settings;
    let Some((key, key_in_authorization)) = api_key(headers, &s.api_key_header) else {
        return Err((ApiError::MissingApiKey { header: s.api_key_header.to_string() }, Who::Nobody, None));
    };
    match snap.identify(key) {
        Some(ti) => Ok((ti, key_in_authorization)),
        None => Err((ApiError::InvalidApiKey, Who::Nobody, None)),
    }
}

/// What routing found: the feature, its bucket, and its limit now.
struct Routed<'a> {
    route: &'a crate::config::gateway::Route,
    path: std::borrow::Cow<'a, str>,
    pair: u64,
    /// The bucket's name in the store (Redis keys it by name, not by `pair`).
    bucket: &'static str,
    quota: Quota,
}

/// Phase 2, route: the normalized path → the feature and its limit now. A refusal here (400,
/// 404) names no feature, so it carries no rate-limit fields.
#[inline]
fn route<'a>(snap: &'a Snapshot, tenant: &'a Tenant, path: &'a str, now: i64) -> Result<Routed<'a>, Refused> {
    let s = &snap.settings;
    // A refused path has no feature: it is counted like an unknown route.
    let path = crate::path::normalize(path).map_err(|why| (ApiError::BadPath(why), Who::Tenant(tenant.label), None))?;
    let Some(route) = snap.router.find(&path) else {
        return Err((ApiError::UnknownRoute { path: path.into_owned() }, Who::Tenant(tenant.label), None));
    };
    let catalog = &snap.catalog;
    let feature = &catalog.features[route.feature];
    // Image search deletions have their own limit, hence their own bucket.
    let (bucket_feature, bucket) = if route.op == Some(ImageOp::Delete) {
        (catalog.image_delete_intern, catalog.image_delete_label)
    } else {
        (feature.intern, feature.label)
    };
    let pair = crate::intern::pair(tenant.intern, bucket_feature);
    let limit = admission::limit_at(catalog, s, tenant, route.feature, route.op, now);
    let quota = Quota { limit: limit.qps, depth: admission::depth(limit.qps, s.burst_seconds) };
    Ok(Routed { route, path, pair, bucket, quota })
}

/// The checks of a routed request that need no state: service activated, Image Search instance
/// not expired, declared body length. A refusal here is decided before admission and takes no
/// token (SPEC §4).
fn check_before_admission<H: HeadView + ?Sized>(
    snap: &Snapshot,
    tenant: &Tenant,
    feature: &Feature,
    headers: &H,
    now: i64,
) -> Result<(), ApiError> {
    let (s, catalog) = (&snap.settings, &snap.catalog);
    if !tenant.activated(feature.family) {
        return Err(match feature.family {
            Some(m) => {
                ApiError::ServiceNotActivated { family: catalog.families[m].name.clone(), feature: feature.id.clone() }
            }
            None => ApiError::ImageSearchNotActivated { feature: feature.id.clone() },
        });
    }
    if let Some(inst) = tenant.image_search.as_ref().filter(|_| feature.family.is_none()) {
        if now >= inst.expires_at {
            let retention_days = catalog.image_search.retention_days;
            let released_at =
                inst.expires_at.saturating_add(i64::from(retention_days) * 86_400 * crate::time::NANOS_PER_SEC);
            let expires_at = crate::time::format_rfc3339(inst.expires_at, s.timezone);
            return Err(if now < released_at {
                ApiError::InstanceExpired { expires_at, retention_days }
            } else {
                ApiError::InstanceReleased { expires_at, retention_days }
            });
        }
    }
    let declared_len = headers.header("content-length").and_then(crate::http_util::content_length);
    if declared_len.is_some_and(|n| n > s.max_request_body_bytes) {
        return Err(ApiError::BodyTooLarge { limit: s.max_request_body_bytes });
    }
    Ok(())
}

/// Phase 3, admit: one token from the (tenant, feature) bucket in the store. A 429 holds
/// nothing (no package share, even for a moment: a racing call must not find the package spent
/// by calls that are refused anyway). A store that cannot answer refuses with 503
/// `store_unavailable`.
/// On Redis, a per-call feature that packages may pay gets its package hold in the same round
/// trip (`Some(payer)`; `Some(None)`: nothing can pay, the token is already back).
/// In shadow mode (`shadow`) a 429 lets the call through instead, with the 429's rate-limit
/// state (remaining 0, reset = Retry-After) and `true` last: no token was taken.
#[allow(clippy::too_many_arguments)]
async fn admit(
    gw: &Gateway,
    snap: &Snapshot,
    tenant: &Tenant,
    key: BucketKey<'static>,
    feature: &Feature,
    r: &mut Routed<'_>,
    now: i64,
    shadow: bool,
) -> Result<(u32, u64, Option<Option<Reservation>>, bool), Refused> {
    let who = || Who::Pair(r.pair, key.tenant, feature.label);
    match gw.billing.admit(snap, tenant, r.route.feature, key, r.quota, now).await {
        Ok(Admission::Throttled { retry_after, quota }) => {
            r.quota = quota;
            let secs = retry_after.as_nanos().div_ceil(1_000_000_000).max(1) as u64;
            if shadow {
                return Ok((0, secs, None, true));
            }
            Err((
                ApiError::QpsExceeded { feature: feature.label, limit: r.quota.limit, retry_after: secs },
                who(),
                Some(RateFields::new(r.quota.limit, 0, secs)),
            ))
        }
        Ok(Admission::Allowed { remaining, reset_secs, paid, quota }) => {
            // On the cluster fallback the replica enforces its share: the headers say so.
            r.quota = quota;
            Ok((remaining, reset_secs, paid, false))
        }
        Err(e) => Err((ApiError::StoreUnavailable { reason: e.to_string() }, who(), None)),
    }
}

/// What the pay phase holds for the call: its payer, and for Image Search its operation and,
/// for an add, its capacity slot.
type Paid = (Reservation, Option<(ImageOp, Option<ImageSlot>)>);

/// Phase 4, pay: the payer (SPEC §6) and, for an Image Search add, a capacity slot. A
/// refusal here (402, 409, 503 `store_unavailable`) comes after admission: the caller gives
/// the token back. In shadow mode (`shadow`) a call nothing can pay for goes on with an unpaid
/// reservation instead of the 402 (the caller gives its token back all the same).
#[allow(clippy::too_many_arguments)]
async fn pay(
    gw: &Gateway,
    snap: &Snapshot,
    tenant: &Tenant,
    feature: &Feature,
    r: &Routed<'_>,
    now: i64,
    paid: Option<Option<Reservation>>,
    shadow: bool,
) -> Result<Paid, ApiError> {
    let unavailable = |e: crate::store::StoreError| ApiError::StoreUnavailable { reason: e.to_string() };
    let reservation = match paid {
        Some(p) => p,
        None => gw.billing.reserve(snap, tenant, r.route.feature, now).await.map_err(unavailable)?,
    };
    let reservation = match reservation {
        Some(reservation) => reservation,
        None if shadow => gw.billing.unpaid(),
        None => return Err(ApiError::PaymentRequired { feature: feature.id.clone() }),
    };
    // Image search adds take a capacity slot, so concurrent adds never overshoot.
    let image = match (r.route.op, tenant.image_search.as_ref()) {
        (Some(ImageOp::Add), Some(inst)) => {
            match gw.billing.reserve_image_add_for(tenant, inst.capacity, &reservation).await.map_err(unavailable)? {
                Some(slot) => Some((ImageOp::Add, Some(slot))),
                // Dropping `reservation` gives the package share back.
                None => return Err(ApiError::CapacityExceeded { capacity: inst.capacity }),
            }
        }
        (Some(op), _) => Some((op, None)),
        (None, _) => None,
    };
    Ok((reservation, image))
}

/// Decides a request from its head alone, in the phases identify → route → admit → pay: one
/// snapshot load and no lock that a reload or another tenant can hold; the admit phase awaits
/// the store (the local store answers without suspending). `path` is the request's path as sent
/// ([`crate::path::origin_path`]); routing and the upstream see its normal form. Only an
/// admitted request takes a token: every check that needs no state comes first, and a request
/// refused after admission (402, 409) gives its token back.
pub async fn decide<H: HeadView + ?Sized>(gw: &Gateway, headers: &H, path: &str) -> Decision {
    decide_phases(gw, headers, path).await.into()
}

impl From<Result<Forward, Refused>> for Decision {
    fn from(phases: Result<Forward, Refused>) -> Decision {
        match phases {
            Ok(f) => Decision::Forward(f),
            Err((e, who, rate)) => Decision::Reject(e, who, rate),
        }
    }
}

/// [`decide`] for callers that need not suspend (the HTTP/1.1 path on a store that decides at
/// once, tests, benches): polls it once. Every phase of the local store answers without
/// suspending, so it is always ready then; a backend that would have to wait is answered 503
/// `store_unavailable` instead (nothing was taken: the future is dropped before it reached the
/// store).
pub fn decide_now<H: HeadView + ?Sized>(gw: &Gateway, headers: &H, path: &str) -> Decision {
    // The phases' future polled here, not inside `decide`'s: one future fewer to copy per call.
    match crate::store::ready(decide_phases(gw, headers, path)) {
        Some(phases) => phases.into(),
        None => Decision::Reject(
            ApiError::StoreUnavailable { reason: "the store did not answer at once".into() },
            Who::Nobody,
            None,
        ),
    }
}

async fn decide_phases<H: HeadView + ?Sized>(gw: &Gateway, headers: &H, path: &str) -> Result<Forward, Refused> {
    let snap = gw.request_snapshot();
    let s = &snap.settings;
    let (ti, key_in_authorization) = identify(&snap, headers)?;
    let tenant = &snap.tenants[ti];
    let now = gw.clock.unix_nanos();
    let mut routed = route(&snap, tenant, path, now)?;
    let feature = &snap.catalog.features[routed.route.feature];
    let key = BucketKey { tenant: tenant.label, bucket: routed.bucket, local: routed.pair };
    if let Err(e) = check_before_admission(&snap, tenant, feature, headers, now) {
        // SPEC §4: the fields of every answer to a tenant and feature tell its bucket; this
        // refusal took no token, so the bucket is read as it is (never claimed full). A store
        // that cannot say leaves the fields out rather than guess.
        // Boxed: a rare path should not size every request's future (the Redis read is large).
        let rate = match Box::pin(gw.billing.peek(key, routed.quota)).await {
            Ok((q, bucket)) => Some(RateFields::new(q.limit, bucket.remaining, bucket.reset_secs)),
            Err(err) => {
                tracing::debug!(error = %err, "rate-limit fields of a refusal: the bucket cannot be read");
                None
            }
        };
        return Err((e, Who::Pair(routed.pair, tenant.label, feature.label), rate));
    }
    // Shadow mode (SPEC §5.5): a 429 `qps_exceeded` or 402 `payment_required` is forwarded instead.
    let shadow = s.admission_mode == AdmissionMode::Shadow || tenant.shadow;
    let (mut remaining, mut reset_secs, paid, throttled) =
        admit(gw, &snap, tenant, key, feature, &mut routed, now, shadow).await?;
    // Redis gave the token back itself when nothing could pay (one round trip); a
    // shadow-throttled call took none.
    let token_back = matches!(paid, Some(None)) || throttled;
    let (reservation, image) = match pay(gw, &snap, tenant, feature, &routed, now, paid, shadow).await {
        Ok(paid) => paid,
        Err(e) => {
            // Only admitted requests use the quota (SPEC §4): the token goes back.
            if !token_back {
                let _ = gw.billing.refund(key, routed.quota).await;
            }
            // The bucket as it was before this request took (and gave back) its token; a
            // shadow-throttled one took none.
            let (limit, remaining, reset) = if throttled {
                (routed.quota.limit, remaining, reset_secs)
            } else {
                given_back(routed.quota, remaining)
            };
            return Err((
                e,
                Who::Pair(routed.pair, tenant.label, feature.label),
                Some(RateFields::new(limit, remaining, reset)),
            ));
        }
    };
    let shadowed = if throttled {
        Some(Outcome::ShadowThrottled)
    } else if reservation.is_unpaid() {
        // As for the 402 it stands for, the token goes back, and the fields show it back.
        if !token_back {
            let _ = gw.billing.refund(key, routed.quota).await;
        }
        (_, remaining, reset_secs) = given_back(routed.quota, remaining);
        Some(Outcome::ShadowPaymentRequired)
    } else {
        None
    };
    if let Some(outcome) = shadowed {
        SHADOW_LOG.log(gw.clock.mono_nanos(), tenant.label, feature.label, outcome);
    }
    let path = match routed.path {
        std::borrow::Cow::Borrowed(_) => None,
        std::borrow::Cow::Owned(p) => Some(p),
    };
    let (pair, quota, fi, tenant, feature) =
        (routed.pair, routed.quota, routed.route.feature, tenant.label, feature.label);
    Ok(Forward {
        ti,
        fi,
        pair,
        tenant,
        feature,
        key_in_authorization,
        path,
        rate: RateFields::new(quota.limit, remaining, reset_secs),
        quota,
        reservation,
        image,
        shadow: shadowed,
        snap,
    })
}

/// The rate-limit state (limit, remaining, reset) of a bucket after an admitted call gave its
/// token back: as it was before the call took it.
fn given_back(quota: Quota, remaining: u32) -> (u32, u32, u64) {
    let (limit, depth) = (quota.limit, quota.depth);
    let remaining = (remaining + 1).min(depth);
    (limit, remaining, u64::from(depth - remaining).div_ceil(u64::from(limit.max(1))))
}

/// At most one log line a second for the calls shadow mode forwards (SPEC §5.5): one line per
/// call would flood the log under the very traffic shadow mode is meant to observe. Lock-free:
/// the line goes to whoever swaps the timestamp; the others only count themselves, and the next
/// line says how many were left out.
struct ShadowLog {
    /// Monotonic nanoseconds of the last line (`i64::MIN`: none yet).
    last: AtomicI64,
    /// Shadowed calls not logged since the last line.
    suppressed: AtomicU64,
}

static SHADOW_LOG: ShadowLog = ShadowLog::new();

impl ShadowLog {
    const INTERVAL_NANOS: i64 = 1_000_000_000;

    const fn new() -> ShadowLog {
        ShadowLog { last: AtomicI64::new(i64::MIN), suppressed: AtomicU64::new(0) }
    }

    /// Whether a line may be written at `now` (monotonic nanoseconds), and if so how many calls
    /// were left out since the last one (the `suppressed` field of the line).
    fn allow(&self, now: i64) -> Option<u64> {
        let last = self.last.load(Ordering::Relaxed);
        if now.saturating_sub(last) < Self::INTERVAL_NANOS
            || self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }

    fn log(&self, now: u64, tenant: &str, feature: &str, outcome: Outcome) {
        if let Some(suppressed) = self.allow(i64::try_from(now).unwrap_or(i64::MAX)) {
            tracing::info!(
                tenant,
                feature,
                outcome = outcome.as_str(),
                suppressed,
                "shadow mode: forwarded a call that would have been refused"
            );
        }
    }
}

/// Handles one tenant request; never fails (errors become JSON responses). A request refused
/// before its body is read has its body drained after the answer (see [`crate::body`]).
///
/// In local mode every phase up to forwarding completes without suspending, so the decision
/// runs here, in place, and the future hyper keeps for the request ([`Handling`]) is only the
/// answer or the forwarding; with Redis it is the whole of [`handle_async`], boxed.
pub fn handle(
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Handling<impl std::future::Future<Output = Response<TenantBody>> + Send + 'static> {
    let start = Instant::now();
    let grpc = crate::grpc::is_grpc(req.headers());
    if crate::http_util::repeated(req.headers(), &header::HOST) {
        // RFC 9112 §3.2: more than one Host is a 400 (forwarded, the upstream may take either).
        let e = ApiError::BadRequest("the request has more than one Host field: send exactly one".into());
        let (resp, body) = (refuse(&e, &[], grpc), req.into_body());
        return Handling::Done(Some(resp.map(|r| TenantBody::refusal(r, body))));
    }
    if !transfer_coding_is_chunked_only(req.headers()) {
        // Not counted in turnstile_requests_total, like the 400s hyper answers itself.
        let (resp, body) = (refuse(&ApiError::UnsupportedTransferEncoding, &[], grpc), req.into_body());
        return Handling::Done(Some(resp.map(|r| TenantBody::refusal(r, body))));
    }
    if !conn.gw.billing.decides_at_once() {
        return Handling::Deciding(Box::pin(handle_async(conn, req, start, grpc)));
    }
    let decision = decide_now(&conn.gw, req.headers(), crate::path::origin_path(req.uri(), req.version()));
    match decision {
        Decision::Reject(e, who, rate) => Handling::Done(Some(refused(&conn.gw, req, e, who, rate, grpc, start))),
        Decision::Forward(fwd) => Handling::Forwarding(forwarding(conn, req, fwd, grpc, start)),
    }
}

/// [`handle`] where the decision may suspend (the Redis store).
async fn handle_async(conn: Arc<Conn>, req: Request<Incoming>, start: Instant, grpc: bool) -> Response<TenantBody> {
    let path = crate::path::origin_path(req.uri(), req.version());
    match decide(&conn.gw, req.headers(), path).await {
        Decision::Reject(e, who, rate) => refused(&conn.gw, req, e, who, rate, grpc, start),
        Decision::Forward(fwd) => forwarding(conn, req, fwd, grpc, start).await,
    }
}

/// A refusal's answer, counted.
#[allow(clippy::too_many_arguments)]
fn refused(
    gw: &Gateway,
    req: Request<Incoming>,
    e: ApiError,
    who: Who,
    rate: Option<RateFields>,
    grpc: bool,
    start: Instant,
) -> Response<TenantBody> {
    count_refusal(gw, &e, who, start);
    let extra = rate.map(RateFields::headers);
    let (resp, body) = (refuse(&e, extra.as_ref().map_or(&[], |h| &h[..]), grpc), req.into_body());
    resp.map(|r| TenantBody::refusal(r, body))
}

/// Counts a refusal of the decision in `turnstile_requests_total` and the duration histogram.
pub(crate) fn count_refusal(gw: &Gateway, e: &ApiError, who: Who, start: Instant) {
    let outcome = e.outcome();
    match who {
        Who::Pair(pair, t, f) => gw.metrics.request_pair(pair, t, f, outcome),
        Who::Tenant(t) => gw.metrics.request(t, "", outcome),
        Who::Nobody => gw.metrics.request("", "", outcome),
    }
    gw.metrics.observe_duration(outcome, start.elapsed().as_secs_f64());
}

/// Forward and settle in this connection's task (no task hop per request), but hyper drops the
/// request's future when the client goes away, and a call the upstream answers 2xx must be
/// charged all the same (units == upstream-served successes; nginx's
/// `proxy_ignore_client_abort on`): dropped unfinished, the rest runs on a task of its own.
fn forwarding(
    conn: Arc<Conn>,
    req: Request<Incoming>,
    fwd: Forward,
    grpc: bool,
    start: Instant,
) -> FinishOnDrop<impl std::future::Future<Output = Response<TenantBody>> + Send + 'static> {
    FinishOnDrop::new(forward(conn, req, fwd, grpc, start))
}

/// The future of one tenant request (see [`handle`]).
// A refusal's response inline: boxing it would cost every refusal (a 429 flood) an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Handling<F: std::future::Future + Send + 'static>
where
    F::Output: Send + 'static,
{
    /// Answered at once (a refusal); taken when polled.
    Done(Option<Response<TenantBody>>),
    Forwarding(FinishOnDrop<F>),
    Deciding(std::pin::Pin<Box<dyn std::future::Future<Output = Response<TenantBody>> + Send>>),
}

impl<F> std::future::Future for Handling<F>
where
    F: std::future::Future<Output = Response<TenantBody>> + Send + 'static,
{
    type Output = Response<TenantBody>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        // Every variant is Unpin: the forwarding and the decision are boxed.
        match self.get_mut() {
            Handling::Done(resp) => match resp.take() {
                Some(r) => std::task::Poll::Ready(r),
                None => std::task::Poll::Pending,
            },
            Handling::Forwarding(f) => std::pin::Pin::new(f).poll(cx),
            Handling::Deciding(f) => f.as_mut().poll(cx),
        }
    }
}

/// A future that, dropped before it finished, finishes on a task of its own (on the current
/// runtime; its output is dropped). Cheaper than spawning every request's forwarding and
/// awaiting it: one allocation, and no wake-up of another task when the answer comes.
pub struct FinishOnDrop<F: std::future::Future + Send + 'static>(Option<std::pin::Pin<Box<F>>>)
where
    F::Output: Send + 'static;

impl<F: std::future::Future + Send + 'static> FinishOnDrop<F>
where
    F::Output: Send + 'static,
{
    fn new(f: F) -> Self {
        FinishOnDrop(Some(Box::pin(f)))
    }
}

impl<F: std::future::Future + Send + 'static> std::future::Future for FinishOnDrop<F>
where
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let this = self.get_mut();
        let Some(f) = this.0.as_mut() else { return std::task::Poll::Pending };
        let out = std::task::ready!(f.as_mut().poll(cx));
        this.0 = None;
        std::task::Poll::Ready(out)
    }
}

impl<F: std::future::Future + Send + 'static> Drop for FinishOnDrop<F>
where
    F::Output: Send + 'static,
{
    fn drop(&mut self) {
        if let (Some(f), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(f);
        }
    }
}

/// A refusal in the one JSON error shape, or for a gRPC call as a trailers-only gRPC status
/// (SPEC §4).
fn refuse(e: &ApiError, extra: &[(HeaderName, HeaderValue)], grpc: bool) -> Response<ProxyBody> {
    if grpc {
        crate::grpc::refusal(e, extra)
    } else {
        error_response(e, extra)
    }
}

/// No `Transfer-Encoding`, or exactly `chunked`. hyper accepts any list that ends in `chunked`
/// and undoes only that; forwarded, the other codings (`gzip, chunked`) would be lost, since
/// `Transfer-Encoding` is hop-by-hop.
fn transfer_coding_is_chunked_only(h: &HeaderMap) -> bool {
    let mut codings = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(|c| c.trim_ascii())
        .filter(|c| !c.is_empty());
    match codings.next() {
        None => true,
        Some(c) => c.eq_ignore_ascii_case(b"chunked") && codings.next().is_none(),
    }
}

/// Drops the hop-by-hop fields, those `Connection` lists, and those `also` names (the gateway's
/// own, which the other side must not set).
fn strip_hop_by_hop(h: &mut HeaderMap, also: fn(&[u8]) -> bool) {
    // Runs twice per request: one pass over the few headers there are, and nothing allocated
    // unless `Connection` names headers beyond the usual `keep-alive` / `close`.
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    remove_where(h, |n| {
        let n = n.as_str().as_bytes();
        crate::http_util::hop_by_hop(n) || also(n)
    });
}

/// The upstream URI: the base's path, then the request's normalized path (`normalized`, or the
/// request's own path when that is already normal) and the request's query as sent.
fn upstream_uri(base: &Uri, original: &Uri, normalized: Option<&str>) -> Result<Uri, http::Error> {
    let base_path = base.path().trim_end_matches('/');
    let mut parts = http::uri::Parts::default();
    parts.scheme = base.scheme().cloned();
    parts.authority = base.authority().cloned();
    parts.path_and_query = Some(match (base_path.is_empty(), normalized, original.path_and_query()) {
        (true, None, Some(pq)) => pq.clone(),
        _ => {
            let path = normalized.unwrap_or(original.path());
            let query = original.query();
            let mut pq = String::with_capacity(base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1));
            pq.push_str(base_path);
            pq.push_str(path);
            if let Some(q) = query {
                pq.push('?');
                pq.push_str(q);
            }
            http::uri::PathAndQuery::try_from(pq)?
        }
    });
    Ok(Uri::from_parts(parts)?)
}

/// Reads the video usage report of SPEC §4; `None` when missing or malformed. Each number is
/// digits alone, as a `Content-Length` is (no sign: `+5` is malformed); the frame rate may have
/// a fraction (29.97, 59.94), rounded up to a whole frame rate so that it falls in the price
/// cell it fits (29.97 in "≤ 30"). A field repeated with different values is malformed
/// ([`HeadView::report`]).
fn video_usage<H: HeadView + ?Sized>(h: &H) -> Option<VideoUsage> {
    let num = |name: &str| h.report(name).and_then(crate::http_util::content_length);
    Some(VideoUsage {
        ms: num("x-usage-video-ms")?,
        fps: frame_rate(h.report("x-usage-video-fps")?)?,
        lines: u32::try_from(num("x-usage-video-lines")?).ok()?,
    })
}

/// The instance's image count an Image Search answer reports (SPEC §4): digits alone; `None`
/// when missing, malformed, or repeated with different values ([`HeadView::report`]): then the
/// count is not taken from the answer.
fn image_count<H: HeadView + ?Sized>(h: &H) -> Option<u64> {
    h.report("x-usage-image-count").and_then(crate::http_util::content_length)
}

/// `1*DIGIT [ "." 1*DIGIT ]`, rounded up to a whole number.
fn frame_rate(v: &[u8]) -> Option<u32> {
    let v = v.trim_ascii();
    let (whole, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    };
    let n = u32::try_from(crate::http_util::digits(whole)?).ok()?;
    match frac {
        None => Some(n),
        Some(f) if !f.is_empty() && f.iter().all(u8::is_ascii_digit) => {
            if f.iter().any(|&d| d != b'0') {
                n.checked_add(1)
            } else {
                Some(n)
            }
        }
        Some(_) => None,
    }
}

/// Charges a 2xx call (SPEC §6) and returns the payer header; in strict mode, waits until the
/// charge is on disk, at most `[ledger].strict_timeout_ms`: past it the charge is reverted and
/// the call answered 503 `ledger_unavailable` (SPEC §7).
pub(crate) async fn settle<H: HeadView + ?Sized>(
    gw: &Gateway,
    fwd: Forward,
    upstream_headers: &H,
) -> Result<HeaderValue, ApiError> {
    let settled = settle_now(gw, fwd, upstream_headers).await.map_err(store_unavailable)?;
    gw.billing.durable(settled).await.map_err(ledger_unavailable)
}

/// [`settle`] where the billing settles at once ([`crate::billing::Billing::settles_at_once`]:
/// the local store, batched): each of its two steps polled once here, in place, rather than one
/// more future around both, which each call would copy.
pub(crate) fn settle_at_once<H: HeadView + ?Sized>(
    gw: &Gateway,
    fwd: Forward,
    upstream_headers: &H,
) -> Result<HeaderValue, ApiError> {
    let waits = || ApiError::StoreUnavailable { reason: "the local store did not settle at once".into() };
    let settled = crate::store::ready(settle_now(gw, fwd, upstream_headers)).ok_or_else(waits)?;
    let durable = crate::store::ready(gw.billing.durable(settled.map_err(store_unavailable)?)).ok_or_else(waits)?;
    durable.map_err(ledger_unavailable)
}

fn store_unavailable(e: crate::store::StoreError) -> ApiError {
    ApiError::StoreUnavailable { reason: e.to_string() }
}

fn ledger_unavailable(e: crate::billing::NotDurable) -> ApiError {
    ApiError::LedgerUnavailable { timeout_ms: e.timeout_ms }
}

/// Settles a 2xx in the store: charge the payer, update image counts, under the configuration
/// the call was admitted with.
pub async fn settle_now<H: HeadView + ?Sized>(
    gw: &Gateway,
    fwd: Forward,
    upstream_headers: &H,
) -> Result<crate::billing::Settled, crate::store::StoreError> {
    let snap = &fwd.snap;
    let (tenant, fi) = (&snap.tenants[fwd.ti], fwd.fi);
    let now = gw.clock.unix_nanos();
    if snap.catalog.features[fi].unit == Unit::VideoMinute {
        let usage = video_usage(upstream_headers);
        if usage.is_none() {
            gw.metrics.usage_report_error(fwd.feature);
            tracing::warn!(
                tenant = fwd.tenant,
                feature = fwd.feature,
                "missing or malformed x-usage-video-* headers (or one repeated with different values): billed as 0 minutes"
            );
        }
        return gw.billing.settle_video(snap, tenant, fi, fwd.reservation, usage, now).await;
    }
    let image = fwd.image.map(|(op, slot)| ImageSettle { op, slot, reported: image_count(upstream_headers) });
    // Batched on Redis (SPEC §11.5): the settlement runs after the answer, bounded in number.
    // (Asked first: handing a reservation to `defer_call` and back copies it twice; a tuple of
    // it, to share the one call below, cost ~60 instructions per call: `loadtest/instructions.sh`.)
    if !gw.billing.may_defer() {
        return gw.billing.settle_call_with(snap, tenant, fi, fwd.reservation, now, image).await;
    }
    let (reservation, image) = match gw.billing.defer_call(snap.shared(), fwd.tenant, fi, fwd.reservation, now, image) {
        Ok(settled) => return Ok(settled),
        Err(back) => back,
    };
    gw.billing.settle_call_with(snap, tenant, fi, reservation, now, image).await
}

/// An answer that is not charged (a non-2xx, a gRPC error status) to an Image Search call: when
/// it carries `x-usage-image-count`, that is the instance's count after the call (SPEC §4,
/// whatever the status: an add the upstream refused as full, a delete of an image it does not
/// have), so the count takes it. `fwd` is dropped first: an add's slot and any reservation go
/// back, nothing is charged. Best effort: a store that fails leaves the count to the next
/// answer that reports one.
pub(crate) async fn resync_images<H: HeadView + ?Sized>(gw: &Gateway, fwd: Forward, upstream_headers: &H) {
    let reported = match fwd.image {
        Some(_) => image_count(upstream_headers),
        None => None,
    };
    let (snap, ti) = (fwd.snap.clone(), fwd.ti);
    drop(fwd);
    let Some(n) = reported else { return };
    if let Err(e) = gw.billing.resync_images(&snap.tenants[ti], n).await {
        tracing::warn!(tenant = snap.tenants[ti].label, error = %e, "image count reported on an uncharged answer not recorded");
    }
}

/// The forward and settle phases of an admitted request: sends it upstream, settles a success
/// and counts the outcome. A gRPC call (`grpc`) is charged only when its status is OK: a
/// trailers-only answer is judged by its headers here; a streamed one gets a [`TrailerGate`]
/// that charges it when its trailers say OK.
async fn forward(
    conn: Arc<Conn>,
    req: Request<Incoming>,
    fwd: Forward,
    grpc: bool,
    start: Instant,
) -> Response<TenantBody> {
    let gw = &conn.gw;
    let (pair, tenant, feature, shadow) = (fwd.pair, fwd.tenant, fwd.feature, fwd.shadow);
    let reserved_payer = fwd.reservation.header();
    let rate = fwd.rate;
    let mut gate = None;
    let (mut resp, payer, outcome) = match send(&conn, req, &fwd).await {
        Err(e) => {
            let outcome = e.outcome();
            // A shadowed call holds no token (none taken, or given back at the decision).
            if matches!(e, ApiError::BodyTooLarge { .. }) && shadow.is_none() {
                // Refused with 413: the quota stays as it was (SPEC §4), as for a declared length.
                // Image Search deletions have a bucket of their own (named apart on Redis).
                let bucket = match fwd.image {
                    Some((ImageOp::Delete, _)) => fwd.snap.catalog.image_delete_label,
                    _ => feature,
                };
                let key = BucketKey { tenant, bucket, local: pair };
                // Boxed, like the settlement: a rare path should not size every request's future.
                let _ = Box::pin(gw.billing.refund(key, fwd.quota)).await;
            }
            // Dropping `fwd` gives a reserved package share back: nothing is charged.
            (refuse(&e, &[], grpc), reserved_payer, outcome)
        }
        Ok((resp, listed)) if resp.status().is_success() => {
            match grpc.then(|| match crate::grpc::status_in(resp.headers()) {
                // An OK in a head that a body and trailers follow (not trailers-only) is not the
                // call's status: its trailers are (SPEC §4), so the gate judges them.
                Some(Some(crate::grpc::code::OK)) if !resp.body().is_end_stream() => None,
                status => status,
            }) {
                // Plain HTTP, or a trailers-only gRPC OK: charged now. In place when the settlement
                // completes without suspending (local store, batched ledger), else boxed: either way
                // its future is not kept in this one, which is moved into place on every request.
                None | Some(Some(Some(crate::grpc::code::OK))) => {
                    let reported = Reported { head: resp.headers(), listed: listed.as_ref() };
                    let settled = if gw.billing.settles_at_once() {
                        settle_at_once(gw, fwd, &reported)
                    } else {
                        Box::pin(settle(gw, fwd, &reported)).await
                    };
                    match settled {
                        Ok(payer) => (resp, payer, Outcome::Admitted),
                        // Strict ledger failing: the upstream's answer is dropped and the call not charged.
                        Err(e) => (refuse(&e, &[], grpc), reserved_payer, e.outcome()),
                    }
                }
                // A trailers-only gRPC error: not charged (dropping `fwd`).
                Some(Some(_)) => {
                    if fwd.image.is_some() {
                        Box::pin(resync_images(gw, fwd, resp.headers())).await;
                    }
                    (resp, reserved_payer, Outcome::Admitted)
                }
                // A streamed gRPC answer: charged when its trailers say OK.
                Some(None) => {
                    // The connection, not only the gateway: a settlement its client no longer
                    // waits for still holds the shutdown drain (see `Conn`).
                    let (conn, head) = (conn.clone(), resp.headers().clone());
                    gate = Some(TrailerGate::new(Box::new(move |trailers| {
                        tokio::spawn(async move {
                            // Usage reports may come in the headers or the trailers: a field
                            // in the trailers replaces the head's (`extend`); repeated with
                            // different values in either, it is no report (`HeadView::report`).
                            let mut reported = head;
                            reported.extend(listed.into_iter().flatten());
                            reported.extend(trailers);
                            settle(&conn.gw, fwd, &reported).await.map(drop)
                        })
                    })));
                    (resp, reserved_payer, Outcome::Admitted)
                }
            }
        }
        Ok((resp, listed)) => {
            // Not charged (dropping `fwd`); an Image Search count it reports is taken all the same.
            if fwd.image.is_some() {
                let reported = Reported { head: resp.headers(), listed: listed.as_ref() };
                Box::pin(resync_images(gw, fwd, &reported)).await;
            }
            (resp, reserved_payer, Outcome::Admitted)
        }
    };
    let outcome = if outcome == Outcome::Admitted { shadow.unwrap_or(outcome) } else { outcome };
    let h = resp.headers_mut();
    for (n, v) in rate.headers() {
        h.insert(n, v);
    }
    h.insert(X_TURNSTILE_PAYER.clone(), payer);
    gw.metrics.request_pair(pair, tenant, feature, outcome);
    gw.metrics.observe_duration(outcome, start.elapsed().as_secs_f64());
    resp.map(|b| TenantBody::gated(b, gate))
}

/// Sends an admitted request upstream, within `upstream_timeout_ms` for the response head.
async fn send(conn: &Conn, req: Request<Incoming>, fwd: &Forward) -> Result<(Response<ProxyBody>, Listed), ApiError> {
    let gw = &conn.gw;
    let s = &fwd.snap.settings;
    let head_request = req.method() == http::Method::HEAD;
    let (upstream_req, cut_off) = upstream_request(conn, req, fwd)?;
    let sent = Instant::now();
    let result = tokio::time::timeout(s.upstream_timeout, gw.upstream.send(upstream_req)).await;
    gw.metrics.upstream_duration.observe(sent.elapsed().as_secs_f64());
    let resp = match result {
        Err(_) => return Err(ApiError::UpstreamTimeout { timeout_ms: s.upstream_timeout.as_millis() as u64 }),
        Ok(Err(e)) => {
            match crate::body::upload_error(&e).or_else(|| cut_off.as_ref().and_then(|s| s.get())) {
                Some(UploadError::TooLarge(_)) => {
                    return Err(ApiError::BodyTooLarge { limit: s.max_request_body_bytes })
                }
                Some(UploadError::Stalled(_)) => {
                    return Err(ApiError::BodyTimeout { timeout_ms: s.body_read_timeout.as_millis() as u64 })
                }
                None => {}
            }
            tracing::debug!(error = %e, "upstream request failed");
            return Err(ApiError::UpstreamUnavailable);
        }
        Ok(Ok(r)) => r,
    };
    let (mut parts, body) = resp.into_parts();
    let bodiless = head_request || matches!(parts.status.as_u16(), 204 | 304);
    if !bodiless
        && parts
            .headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .any(|v| crate::http_util::other_transfer_coding(v.as_bytes()))
    {
        // A coding not undone here (hyper undoes `chunked` alone): relayed without its
        // hop-by-hop field, the client would read the coded bytes as the content.
        return Err(ApiError::UpstreamUnavailable);
    }
    // RFC 9112 §6.3: the coding framed the body, not the length (hyper's client keeps the field,
    // and hyper's server would frame the relayed body by it).
    if parts.headers.contains_key(header::TRANSFER_ENCODING) {
        parts.headers.remove(header::CONTENT_LENGTH);
    }
    let listed = listed_usage(&parts.headers);
    // The gateway's own fields are its to state (the rate-limit fields and the payer are set
    // below; no other `x-turnstile-*` of the upstream's, in any spelling, reaches the client).
    strip_hop_by_hop(&mut parts.headers, crate::http_util::gateway_field);
    Ok((Response::from_parts(parts, Either::Right(body)), listed))
}

/// Usage reports the upstream listed in its `Connection` field: addressed to the gateway (RFC
/// 9110 §7.6.1), so the settlement reads them while the client does not get them (as on the
/// fast path, which reads the head's usage fields before it drops the listed ones). `None`
/// (nothing allocated) unless some are listed.
type Listed = Option<HeaderMap>;

fn listed_usage(h: &HeaderMap) -> Listed {
    let mut listed: Listed = None;
    for token in h.get_all(header::CONNECTION).iter().flat_map(|v| v.as_bytes().split(|&b| b == b',')) {
        let token = token.trim_ascii();
        let Some(name) = crate::http_util::USAGE_FIELDS.iter().find(|u| token.eq_ignore_ascii_case(u.as_bytes()))
        else {
            continue;
        };
        // Every value, for the settlement to read as it reads an unlisted field (a repeat with
        // another value makes the report unusable: `HeadView::report`). Named twice in
        // `Connection`, taken once.
        if !listed.as_ref().is_some_and(|l| l.contains_key(*name)) {
            for v in h.get_all(*name) {
                listed.get_or_insert_with(HeaderMap::new).append(*name, v.clone());
            }
        }
    }
    listed
}

/// What the settlement reads of an upstream answer: its head, then the usage reports it
/// listed in `Connection` (dropped from the head).
struct Reported<'a> {
    head: &'a HeaderMap,
    listed: Option<&'a HeaderMap>,
}

impl HeadView for Reported<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.head.header(name).or_else(|| self.listed?.header(name))
    }
    /// A field is in one of the two (the listed ones were dropped from the head).
    fn report(&self, name: &str) -> Option<&[u8]> {
        match self.head.contains_key(name) {
            true => self.head.report(name),
            false => self.listed?.report(name),
        }
    }
}

/// The request as it goes upstream (SPEC §4): the normalized path under the upstream's base,
/// hop-by-hop headers and the API key dropped, `x-turnstile-*` set by the gateway alone,
/// `X-Forwarded-For` appended, the body cut off at the limits. With HTTP/2 upstream, also the
/// slot where a cut-off upload notes why.
#[allow(clippy::type_complexity)]
fn upstream_request(
    conn: &Conn,
    req: Request<Incoming>,
    fwd: &Forward,
) -> Result<(Request<Upload>, Option<std::sync::Arc<std::sync::OnceLock<UploadError>>>), ApiError> {
    let s = &fwd.snap.settings;
    let protocol = conn.gw.upstream.protocol;
    let (mut parts, body) = req.into_parts();
    let expect_continue = parts.headers.contains_key(header::EXPECT);
    let body = Upload::new(body, s.max_request_body_bytes, s.body_read_timeout, expect_continue);
    let (body, cut_off) = match protocol {
        UpstreamProtocol::Http1 => (body, None),
        UpstreamProtocol::H2c => {
            let (body, slot) = body.noting_failure();
            (body, Some(slot))
        }
    };
    let uri = upstream_uri(&s.upstream, &parts.uri, fwd.path.as_deref()).map_err(|_| ApiError::UpstreamUnavailable)?;
    let h = &mut parts.headers;
    // `TE: trailers` is the one TE value that goes on (gRPC requires it; RFC 9113 §8.2.2
    // allows it in HTTP/2), as Envoy does.
    let te_trailers = h
        .get_all(header::TE)
        .iter()
        .any(|v| v.as_bytes().split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers")));
    // Every incoming `x-turnstile-*` goes too (SPEC §4): the gateway sets its own below.
    strip_hop_by_hop(h, crate::http_util::turnstile_field);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    // The body is forwarded with one framing, the one it was read with: a body of unknown length
    // (chunked; hyper dropped any Content-Length that came with Transfer-Encoding) goes chunked,
    // whatever the method (hyper's client would send a GET's as an empty body).
    if !body.is_end_stream() && body.size_hint().exact().is_none() {
        h.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    h.remove(&s.api_key_header);
    if fwd.key_in_authorization {
        h.remove(header::AUTHORIZATION);
    }
    h.insert(X_TURNSTILE_TENANT.clone(), HeaderValue::from_static(fwd.tenant));
    h.insert(X_TURNSTILE_FEATURE.clone(), HeaderValue::from_static(fwd.feature));
    // The peer address, appended to what the client sent.
    // Byte for byte, obs-text included, as the fast path and nginx's `$proxy_add_x_forwarded_for` do.
    let mut prior = Vec::new();
    for v in h.get_all(&X_FORWARDED_FOR) {
        prior.extend_from_slice(v.as_bytes());
        prior.extend_from_slice(b", ");
    }
    let xff = if prior.is_empty() {
        Ok(conn.peer_ip.clone())
    } else {
        prior.extend_from_slice(conn.peer_ip.as_bytes());
        HeaderValue::from_bytes(&prior)
    };
    if let Ok(v) = xff {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
    // HTTP/2 carries the authority the client addressed as `:authority`: it goes on as `Host`,
    // as an HTTP/1.1 client's `Host` does, replacing any `host` field (RFC 9113 §8.3.1).
    if parts.version == http::Version::HTTP_2 {
        if let Some(a) = parts.uri.authority() {
            let host = a.as_str().rsplit('@').next().unwrap_or_default();
            if let Ok(v) = HeaderValue::from_str(host) {
                h.insert(header::HOST, v);
            }
        }
        // RFC 9113 §8.2.3: HTTP/2 may split a cookie into several `cookie` fields; on its way
        // to HTTP/1.1 it MUST be one again (a server there may read the first line alone).
        if protocol == UpstreamProtocol::Http1 && crate::http_util::repeated(h, &header::COOKIE) {
            join_cookie_crumbs(h);
        }
    }
    parts.uri = uri;
    parts.version = match protocol {
        UpstreamProtocol::Http1 => http::Version::HTTP_11,
        UpstreamProtocol::H2c => http::Version::HTTP_2,
    };
    Ok((Request::from_parts(parts, body), cut_off))
}

/// The `cookie` fields of `h` as one, joined with "; " (RFC 9113 §8.2.3).
fn join_cookie_crumbs(h: &mut HeaderMap) {
    let mut joined = Vec::new();
    for v in h.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    // Each crumb was a valid value, and so is "; ": always a valid value.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_from_header_or_bearer() {
        let name = HeaderName::from_static("x-api-key");
        let mut h = HeaderMap::new();
        assert!(api_key(&h, &name).is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer  k1 "));
        assert_eq!(api_key(&h, &name), Some((&b"k1"[..], true)));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert!(api_key(&h, &name).is_none());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bear"));
        assert!(api_key(&h, &name).is_none());
        h.insert(name.clone(), HeaderValue::from_static("k2"));
        assert_eq!(api_key(&h, &name), Some((&b"k2"[..], false)));
        // The key in both headers: `Authorization` carries it too, so it is removed upstream.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k2"));
        assert_eq!(api_key(&h, &name), Some((&b"k2"[..], true)));
        // Another token beside the key header is not the key: it stays the upstream's.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer upstream-token"));
        assert_eq!(api_key(&h, &name), Some((&b"k2"[..], false)));
    }

    /// The usage report's numbers are digits alone; the frame rate may have a fraction,
    /// rounded up (29.97 fps is priced in the "≤ 30" cell, not billed as a malformed report).
    #[test]
    fn video_usage_reads_digits_and_fractional_frame_rates() {
        let report = |ms: &'static str, fps: &'static str, lines: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-usage-video-ms", HeaderValue::from_static(ms));
            h.insert("x-usage-video-fps", HeaderValue::from_static(fps));
            h.insert("x-usage-video-lines", HeaderValue::from_static(lines));
            video_usage(&h).map(|u| (u.ms, u.fps, u.lines))
        };
        assert_eq!(report("140000", "60", "1080"), Some((140_000, 60, 1080)));
        assert_eq!(report(" 140000 ", "29.97", "1080"), Some((140_000, 30, 1080)));
        assert_eq!(report("1", "59.94", "720"), Some((1, 60, 720)));
        assert_eq!(report("1", "30.000", "720"), Some((1, 30, 720)));
        assert_eq!(report("1", "30.001", "720"), Some((1, 31, 720)));
        for (ms, fps, lines) in [
            ("+140000", "60", "1080"),
            ("140000", "+60", "1080"),
            ("140000", "60", "+1080"),
            ("140000", "60.", "1080"),
            ("140000", ".5", "1080"),
            ("140000", "6e1", "1080"),
            ("140000", "60 .5", "1080"),
            ("140000", "-60", "1080"),
            ("140000", "60", "4294967296"),
            ("140000", "4294967295.5", "1080"),
            ("1.5", "60", "1080"),
        ] {
            assert_eq!(report(ms, fps, lines), None, "{ms} {fps} {lines}");
        }
    }

    /// A usage report field given twice with different values is ambiguous (as two different
    /// `Content-Length`s are): the video report is malformed (billed 0 minutes, counted), the
    /// image count not taken; the same value twice is that value. In the head, among the
    /// fields listed in `Connection`, and with a field in the trailers replacing the head's.
    #[test]
    fn a_usage_field_repeated_with_another_value_is_no_report() {
        let head = |fields: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in fields {
                h.append(*n, HeaderValue::from_static(v));
            }
            h
        };
        let video = [("x-usage-video-fps", "30"), ("x-usage-video-lines", "1080")];
        let mut h = head(&video);
        h.append("x-usage-video-ms", HeaderValue::from_static("1000"));
        h.append("x-usage-video-ms", HeaderValue::from_static("3600000"));
        assert!(video_usage(&h).is_none(), "1000 or 3600000 ms: malformed");
        h.remove("x-usage-video-ms");
        h.append("x-usage-video-ms", HeaderValue::from_static("60000"));
        h.append("x-usage-video-ms", HeaderValue::from_static("60000"));
        assert_eq!(video_usage(&h).map(|u| u.ms), Some(60_000), "the same value twice");
        // The same fields listed in `Connection` (addressed to the gateway, dropped from the head).
        let mut listing = h.clone();
        listing.insert(header::CONNECTION, HeaderValue::from_static("x-usage-video-ms, X-Usage-Video-Ms"));
        listing.append("x-usage-video-ms", HeaderValue::from_static("1"));
        let listed = listed_usage(&listing);
        let mut stripped = listing.clone();
        strip_hop_by_hop(&mut stripped, |_| false);
        let reported = Reported { head: &stripped, listed: listed.as_ref() };
        assert_eq!(reported.report("x-usage-video-fps"), Some(&b"30"[..]));
        assert_eq!(reported.report("x-usage-video-ms"), None, "60000 or 1 ms, listed: malformed");
        assert!(video_usage(&reported).is_none());

        assert_eq!(image_count(&head(&[("x-usage-image-count", "5"), ("x-usage-image-count", "999999")])), None);
        assert_eq!(image_count(&head(&[("x-usage-image-count", "5"), ("x-usage-image-count", "5")])), Some(5));
        assert_eq!(image_count(&head(&[("x-usage-image-count", "5")])), Some(5));
        // A field in the trailers replaces the head's; repeated in the trailers, it is no report.
        let mut merged = head(&[("x-usage-image-count", "5")]);
        merged.extend(head(&[("x-usage-image-count", "7")]));
        assert_eq!(image_count(&merged), Some(7));
        merged.extend(head(&[("x-usage-image-count", "7"), ("x-usage-image-count", "8")]));
        assert_eq!(image_count(&merged), None);
    }

    /// Seed and SPEC boundaries at the exact instant, through the whole decision: a QPS plan is
    /// active while `effective_at ≤ t < expires_at` (SPEC §5.1), then "calls are billed at the
    /// standard pay-as-you-go rate" at the default 2 QPS (seed 000, SPEC §5.2, §6.3); a package
    /// pays while "not expired" (SPEC §6.2; seed: "If a resource package ... expires, subsequent
    /// API calls are charged at the pay-as-you-go rate"); an Image Search instance past its
    /// `expires_at` is "retain[ed] ... for one week, which indicates seven calendar days, and then
    /// release[d]" (seed 004): 402 `instance_expired` from `expires_at`, 410 `instance_released`
    /// from `expires_at` + 7 × 24 h (SPEC §4), for every operation.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plan_package_and_image_search_expiry_take_effect_at_the_exact_instant() {
        use crate::clock::ManualClock;
        use crate::config::{ConfigSource, Texts, EMBEDDED_CATALOG};
        let end = "2026-03-10T00:00:00Z";
        let ents = format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{}"], "services": ["text_recognition", "object_detection"],
            "image_search": {{"capacity": 10, "qps": 5, "expires_at": "{end}"}},
            "qps_plans": [{{"feature": "license-plate-recognition", "qps": 7, "effective_at": "2026-03-01T00:00:00Z", "expires_at": "{end}"}}],
            "packages": [{{"id": "od", "feature": "object-detection", "points": "100", "ordered_at": "2026-03-01T00:00:00Z", "expires_at": "{end}"}}]}}}}}}"#,
            crate::hash_key("acme")
        );
        // (path, its answer just before `end`, at `end`, just before `end` + 7 days, at it):
        // the payer and the limit of a forwarded call, or the code of a refusal.
        let cases: [(&str, [&str; 4]); 4] = [
            ("/lp", ["prepaid_qps q=7", "payg q=2", "payg q=2", "payg q=2"]),
            ("/od", ["single_package:od q=2", "payg q=2", "payg q=2", "payg q=2"]),
            ("/s", ["prepaid_qps q=5", "instance_expired", "instance_expired", "instance_released"]),
            ("/d", ["prepaid_qps q=20", "instance_expired", "instance_expired", "instance_released"]),
        ];
        let times = ["2026-03-09T23:59:59.999999999Z", end, "2026-03-16T23:59:59.999999999Z", "2026-03-17T00:00:00Z"];
        for (i, now) in times.iter().enumerate() {
            let dir = tempfile::tempdir().expect("tmp");
            let main = format!(
                "[server]\nupstream = \"http://127.0.0.1:1\"\n[ledger]\ndir = \"{}\"\n\
                 [[routes]]\npath = \"/s\"\nfeature = \"image-search\"\nop = \"search\"\n\
                 [[routes]]\npath = \"/d\"\nfeature = \"image-search\"\nop = \"delete\"\n\
                 [[routes]]\npath = \"/lp\"\nfeature = \"license-plate-recognition\"\n\
                 [[routes]]\npath = \"/od\"\nfeature = \"object-detection\"\n",
                dir.path().join("ledger").display()
            );
            let texts = Texts::in_memory(main, EMBEDDED_CATALOG, ents.clone());
            let snap = crate::snapshot::build(&texts, 1).unwrap_or_else(|e| panic!("{e}"));
            let gw = Gateway::new(texts, snap, ConfigSource::Embedded, None, ManualClock::at(now)).expect("gateway");
            let mut h = HeaderMap::new();
            h.insert("x-api-key", HeaderValue::from_static("acme"));
            for (path, want) in &cases {
                let got = match decide_now(&gw, &h, path) {
                    Decision::Forward(f) => {
                        let q = f.rate().policy();
                        let q = String::from_utf8_lossy(q.as_bytes()).replace("\"qps\";", "").replace(";w=1", "");
                        format!("{} {q}", f.reserved_payer().to_str().unwrap_or("?"))
                    }
                    Decision::Reject(e, ..) => e.code().to_string(),
                };
                assert_eq!(got, want[i], "{path} at {now}");
            }
            let _ = gw.billing.close(std::time::Duration::from_secs(5));
        }
    }

    #[test]
    fn upstream_uri_keeps_path_and_query_and_base_path() {
        let base: Uri = "http://127.0.0.1:18080".parse().unwrap();
        let orig: Uri = "/v1/face/compare?x=1".parse().unwrap();
        assert_eq!(upstream_uri(&base, &orig, None).unwrap().to_string(), "http://127.0.0.1:18080/v1/face/compare?x=1");
        let dotted: Uri = "/v1/x/../face/compare?x=/../1".parse().unwrap();
        let normal = Some("/v1/face/compare");
        assert_eq!(
            upstream_uri(&base, &dotted, normal).unwrap().to_string(),
            "http://127.0.0.1:18080/v1/face/compare?x=/../1",
            "the normalized path, the query as sent"
        );
        let base: Uri = "http://127.0.0.1:18080/infer/".parse().unwrap();
        assert_eq!(
            upstream_uri(&base, &orig, None).unwrap().to_string(),
            "http://127.0.0.1:18080/infer/v1/face/compare?x=1"
        );
        assert_eq!(
            upstream_uri(&base, &dotted, normal).unwrap().to_string(),
            "http://127.0.0.1:18080/infer/v1/face/compare?x=/../1"
        );
    }

    #[test]
    fn shadow_log_writes_at_most_one_line_a_second_and_counts_the_rest() {
        let sec = ShadowLog::INTERVAL_NANOS;
        let log = ShadowLog::new();
        assert_eq!(log.allow(0), Some(0), "the first line");
        assert_eq!(log.allow(1), None);
        assert_eq!(log.allow(sec - 1), None);
        assert_eq!(log.allow(sec), Some(2), "a second later, naming the two left out");
        assert_eq!(log.allow(sec + 1), None);
        assert_eq!(log.allow(10 * sec), Some(1));
        // Racing callers: one line per second in all, and every other call counted once, in
        // that line (those left out before it) or the next.
        let log = ShadowLog::new();
        let (lines, reported) = (AtomicU64::new(0), AtomicU64::new(0));
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for i in 0..1000 {
                        if let Some(n) = log.allow(5 * sec + i) {
                            lines.fetch_add(1, Ordering::Relaxed);
                            reported.fetch_add(n, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(lines.load(Ordering::Relaxed), 1);
        let next = log.allow(7 * sec).expect("a second later");
        assert_eq!(reported.load(Ordering::Relaxed) + next, 3999);
    }

    #[test]
    fn rate_headers_use_structured_field_syntax() {
        let rate = RateFields::new(40, 39, 1);
        assert_eq!(
            (rate.policy().as_bytes(), rate.state().as_bytes()),
            (&b"\"qps\";q=40;w=1"[..], &b"\"qps\";r=39;t=1"[..])
        );
        let [(p, pv), (r, rv)] = rate.headers();
        assert_eq!((p.as_str(), pv.to_str().unwrap()), ("ratelimit-policy", "\"qps\";q=40;w=1"));
        assert_eq!((r.as_str(), rv.to_str().unwrap()), ("ratelimit", "\"qps\";r=39;t=1"));
    }

    #[test]
    fn only_plain_chunked_transfer_coding_is_accepted() {
        let with = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            transfer_coding_is_chunked_only(&h)
        };
        assert!(with(&[]));
        assert!(with(&["chunked"]));
        assert!(with(&[" Chunked "]));
        assert!(with(&[", chunked"]), "empty list elements are allowed (RFC 9110 §5.6.1)");
        assert!(!with(&["gzip, chunked"]));
        assert!(!with(&["chunked, chunked"]));
        assert!(!with(&["gzip", "chunked"]));
        assert!(!with(&["identity"]));
    }

    #[test]
    fn connection_listed_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, |_| false);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn every_hop_by_hop_header_is_dropped_and_nothing_else() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        for n in ["transfer-encoding", "upgrade", "proxy-connection", "proxy-authorization", "trailer", "x-kept"] {
            h.append(n, HeaderValue::from_static("1"));
        }
        h.append("x-kept", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h, |_| false);
        assert_eq!(h.keys().map(|n| n.as_str()).collect::<Vec<_>>(), ["x-kept"]);
        assert_eq!(h.get_all("x-kept").iter().count(), 2);
    }
}
