//! gRPC over the tenant listener (SPEC §4): how a gRPC call is recognised, refused and judged.
//!
//! - A request whose `content-type` starts with `application/grpc` is a gRPC call.
//! - The gateway refuses one the gRPC way: HTTP 200, trailers-only (`grpc-status`,
//!   `grpc-message`, no body), the rate-limit fields and `x-turnstile-payer` kept as headers;
//!   the code comes from the refusal's HTTP status ([`code_for`]).
//! - A gRPC call succeeded only when its trailers say `grpc-status: 0`: HTTP 200 alone is not
//!   success, and a stream that breaks (reset, connection lost, no trailers) did not succeed.
//!   [`TrailerGate`] holds the call's charge until the upstream's trailers arrive, runs it (on
//!   a task of its own, so a client that leaves cannot cancel a charge half made) when they say
//!   OK, and only then passes the trailers on: the OK reaches the client after the charge, as a
//!   2xx does in strict mode (SPEC §7).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{Either, Full};

use crate::error::ApiError;
use crate::http_util::ProxyBody;

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
static APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");

/// gRPC status codes used here (grpc/doc/statuscodes.md).
pub mod code {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const DEADLINE_EXCEEDED: u32 = 4;
    pub const PERMISSION_DENIED: u32 = 7;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const FAILED_PRECONDITION: u32 = 9;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
    pub const UNAUTHENTICATED: u32 = 16;
}

/// True for a gRPC call: `content-type: application/grpc`, `application/grpc+proto`, ...
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 16
            && v[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(v.get(16), None | Some(b'+' | b';'))
    })
}

/// The gRPC status for a refusal's HTTP status: SPEC §4's table, and for the statuses it does
/// not list, the nearest code (410 instance released: FAILED_PRECONDITION, like 402; 408 body
/// timeout: DEADLINE_EXCEEDED; 501: UNIMPLEMENTED).
pub fn code_for(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => code::INVALID_ARGUMENT,
        401 => code::UNAUTHENTICATED,
        402 | 410 => code::FAILED_PRECONDITION,
        403 => code::PERMISSION_DENIED,
        404 | 501 => code::UNIMPLEMENTED,
        408 | 504 => code::DEADLINE_EXCEEDED,
        409 | 413 | 429 => code::RESOURCE_EXHAUSTED,
        502 | 503 => code::UNAVAILABLE,
        _ => code::INTERNAL,
    }
}

/// `grpc-message` is percent-encoded: every byte outside printable ASCII, and `%` itself.
fn encode_message(m: &str) -> HeaderValue {
    let mut out = String::with_capacity(m.len());
    for &b in m.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::try_from(out).unwrap_or(HeaderValue::from_static("refused by the gateway"))
}

/// The refusal `e` as a trailers-only gRPC response, with `extra` (rate-limit fields, payer)
/// and `Retry-After` for a 429 kept as headers. The JSON body's `code` travels as
/// `x-turnstile-error`, so a client can tell `qps_exceeded` from `capacity_exceeded`.
pub fn refusal(e: &ApiError, extra: &[(HeaderName, HeaderValue)]) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::new())));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, APPLICATION_GRPC.clone());
    h.insert(GRPC_STATUS.clone(), HeaderValue::from(code_for(e.status())));
    h.insert(GRPC_MESSAGE.clone(), encode_message(&e.to_string()));
    h.insert(HeaderName::from_static("x-turnstile-error"), HeaderValue::from_static(e.code()));
    for (n, v) in extra {
        h.insert(n.clone(), v.clone());
    }
    if let Some(secs) = e.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// The `grpc-status` in `h`, if there is one (`Some(None)`: there, but not a number). The
/// value is one to nine digits alone (gRPC's HTTP/2 protocol: `1*DIGIT`): no sign, no
/// whitespace (RFC 9113 §8.2.1 makes a value that ends in one malformed), as the clients read
/// it (tonic, grpc-go and grpc-java all take `"0 "` and `"+0"` for an error, so the gateway must
/// not charge them).
/// Given twice it is no status either: clients differ on which one counts (grpc-go the last).
pub fn status_in(h: &HeaderMap) -> Option<Option<u32>> {
    if crate::http_util::repeated(h, &GRPC_STATUS) {
        return Some(None);
    }
    h.get(&GRPC_STATUS).map(|v| {
        let b = Some(v.as_bytes()).filter(|b| b.len() <= 9)?;
        crate::http_util::digits(b).and_then(|n| u32::try_from(n).ok())
    })
}

/// Runs the charge of an OK call, given its trailers; the error (strict ledger failing, store
/// unreachable) means it was not charged.
pub type Charge = Box<dyn FnOnce(HeaderMap) -> tokio::task::JoinHandle<Result<(), ApiError>> + Send>;

/// Between the upstream's response body and the client: holds the charge of a gRPC call until
/// the trailers come (see the module docs). Dropped before them (the stream broke or the client
/// left), it drops the charge: nothing is charged and a reserved package share goes back.
pub struct TrailerGate {
    charge: Option<Charge>,
    /// The OK trailers, waiting for their charge to be made.
    settling: Option<(tokio::task::JoinHandle<Result<(), ApiError>>, HeaderMap)>,
}

impl TrailerGate {
    pub fn new(charge: Charge) -> TrailerGate {
        TrailerGate { charge: Some(charge), settling: None }
    }

    /// A frame from the upstream: trailers that say OK start the charge (the caller then
    /// polls [`TrailerGate::poll_settled`]); any other trailers end the gate uncharged.
    /// Returns the trailers when they can go on at once.
    pub fn trailers(&mut self, trailers: HeaderMap) -> Option<HeaderMap> {
        let Some(charge) = self.charge.take() else { return Some(trailers) };
        if status_in(&trailers) == Some(Some(code::OK)) {
            let handle = charge(trailers.clone());
            self.settling = Some((handle, trailers));
            None
        } else {
            let mut trailers = trailers;
            if crate::http_util::repeated(&trailers, &GRPC_STATUS) {
                // Given twice: not charged, and one error status, so that no client reads the
                // first (tonic) as an OK that was not charged.
                trailers.insert(GRPC_STATUS.clone(), HeaderValue::from(code::INTERNAL));
                trailers.insert(GRPC_MESSAGE.clone(), encode_message("the upstream sent grpc-status more than once"));
            }
            Some(trailers)
        }
    }

    /// The trailers once their charge is made; rewritten to UNAVAILABLE when it failed (the
    /// call was not charged, and the client must not take it for a success).
    pub fn poll_settled(&mut self, cx: &mut Context<'_>) -> Poll<Option<HeaderMap>> {
        let Some((handle, _)) = self.settling.as_mut() else { return Poll::Ready(None) };
        let result = match Pin::new(handle).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(_)) => Err(ApiError::UpstreamUnavailable),
        };
        let Some((_, mut trailers)) = self.settling.take() else { return Poll::Ready(None) };
        if let Err(e) = result {
            trailers.insert(GRPC_STATUS.clone(), HeaderValue::from(code_for(e.status())));
            trailers.insert(GRPC_MESSAGE.clone(), encode_message(&e.to_string()));
        }
        Poll::Ready(Some(trailers))
    }

    /// True while OK trailers wait for their charge.
    pub fn settling(&self) -> bool {
        self.settling.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        let with = |ct: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            is_grpc(&h)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("Application/GRPC+json"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpc-web"), "grpc-web is HTTP/1 framing the gateway does not speak");
        assert!(!with("application/json"));
        assert!(!with("application/grp"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn spec_status_table() {
        for (http, grpc) in [
            (401, 16),
            (403, 7),
            (404, 12),
            (429, 8),
            (402, 9),
            (409, 8),
            (413, 8),
            (400, 3),
            (502, 14),
            (503, 14),
            (504, 4),
        ] {
            assert_eq!(code_for(StatusCode::from_u16(http).unwrap()), grpc, "{http}");
        }
    }

    #[test]
    fn message_is_percent_encoded() {
        assert_eq!(encode_message("100% done: é").to_str().unwrap(), "100%25 done: %C3%A9");
    }

    #[test]
    fn refusal_is_trailers_only_with_headers_kept() {
        let e = ApiError::QpsExceeded { feature: "f", limit: 2, retry_after: 1 };
        let extra = [(HeaderName::from_static("ratelimit"), HeaderValue::from_static("\"qps\";r=0;t=1"))];
        let r = refusal(&e, &extra);
        assert_eq!(r.status(), StatusCode::OK);
        let h = r.headers();
        assert_eq!(h["grpc-status"], "8");
        assert_eq!(h["content-type"], "application/grpc");
        assert_eq!(h["ratelimit"], "\"qps\";r=0;t=1");
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["x-turnstile-error"], "qps_exceeded");
        assert!(http_body::Body::is_end_stream(r.body()), "no body: trailers-only");
    }

    #[tokio::test]
    async fn the_gate_charges_only_ok_trailers_and_passes_a_failed_charge_on_as_unavailable() {
        use std::sync::atomic::{AtomicU32, Ordering};
        use std::sync::Arc;
        let charged = Arc::new(AtomicU32::new(0));
        let gate = |fail: bool| {
            let c = charged.clone();
            TrailerGate::new(Box::new(move |_t| {
                tokio::spawn(async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    if fail {
                        Err(ApiError::LedgerUnavailable { timeout_ms: 1 })
                    } else {
                        Ok(())
                    }
                })
            }))
        };
        let trailers = |status: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(GRPC_STATUS.clone(), HeaderValue::from_static(status));
            h
        };
        // An error status goes on at once, uncharged.
        let mut g = gate(false);
        assert_eq!(g.trailers(trailers("13")).unwrap()["grpc-status"], "13");
        // No trailers (a broken stream, a client gone): the gate is dropped, uncharged.
        drop(gate(false));
        assert_eq!(charged.load(Ordering::SeqCst), 0);
        // OK: held until charged.
        let mut g = gate(false);
        assert!(g.trailers(trailers("0")).is_none());
        let t = std::future::poll_fn(|cx| g.poll_settled(cx)).await.unwrap();
        assert_eq!((t["grpc-status"].to_str().unwrap(), charged.load(Ordering::SeqCst)), ("0", 1));
        // OK whose charge fails: the client sees UNAVAILABLE.
        let mut g = gate(true);
        assert!(g.trailers(trailers("0")).is_none());
        let t = std::future::poll_fn(|cx| g.poll_settled(cx)).await.unwrap();
        assert_eq!(t["grpc-status"], "14");
        assert!(t["grpc-message"].to_str().unwrap().contains("could not record the charge"));
    }
}
