//! Small HTTP helpers shared by the tenant and admin listeners (a leaf: no listener imports
//! another for these): the response body type, the JSON error response, the bearer token.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Response;
use http_body_util::{Either, Full};

use crate::error::{ApiError, JSON};

/// A response body: a small one the gateway made, or the upstream's streamed.
pub type ProxyBody = Either<Full<Bytes>, crate::upstream::Body>;

/// The usage reports of SPEC §4 an upstream answer may carry, which the settlement reads.
pub const USAGE_FIELDS: [&str; 4] =
    ["x-usage-video-ms", "x-usage-video-fps", "x-usage-video-lines", "x-usage-image-count"];

/// Is the field `name` hop-by-hop (RFC 9110 §7.6.1 plus the legacy ones proxies drop, and
/// `upgrade`: protocol upgrades are not proxied)? Dropped on the way through, by the fast path
/// and by the hyper path alike. Any letter case.
pub fn hop_by_hop(name: &[u8]) -> bool {
    const HOP: [&[u8]; 9] = [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    ];
    HOP.iter().any(|h| name.eq_ignore_ascii_case(h))
}

/// Is the field `name` one of the gateway's own `x-turnstile-*` (any letter case, and `_` for
/// `-`: an upstream that maps names to CGI variables, `HTTP_X_TURNSTILE_TENANT`, reads
/// `X-Turnstile_Tenant` as `x-turnstile-tenant`)? An incoming one is never forwarded.
#[inline]
pub fn turnstile_field(name: &[u8]) -> bool {
    name.len() >= 12
        && name[0] | 0x20 == b'x'
        && name[..12].iter().zip(b"x-turnstile-").all(|(&a, &b)| a.eq_ignore_ascii_case(&b) || (b == b'-' && a == b'_'))
}

/// Is the field `name` one the gateway states itself on an answer: `x-turnstile-*` (in any
/// spelling [`turnstile_field`] takes) and the rate-limit fields? An upstream's are never
/// relayed, in its head or its trailers: a client would read them as the gateway's (who paid,
/// why it refused, how much quota is left).
#[inline]
pub fn gateway_field(name: &[u8]) -> bool {
    turnstile_field(name) || name.eq_ignore_ascii_case(b"ratelimit") || name.eq_ignore_ascii_case(b"ratelimit-policy")
}

/// Is the upstream's trailer field `name` dropped on its way to the client? The rule of the
/// answer's head: hop-by-hop fields and the gateway's own ([`gateway_field`]); the rest,
/// `grpc-status` and the usage reports included, goes on.
pub fn dropped_trailer(name: &[u8]) -> bool {
    hop_by_hop(name) || gateway_field(name)
}

/// Drops from an upstream's trailers what does not reach the client ([`dropped_trailer`]).
pub fn strip_trailers(t: &mut HeaderMap) {
    remove_where(t, |n| dropped_trailer(n.as_str().as_bytes()));
}

/// Removes every field whose name matches; allocates nothing (heads have a few fields).
pub fn remove_where(h: &mut HeaderMap, matches: impl Fn(&HeaderName) -> bool) {
    while let Some(n) = h.keys().find(|n| matches(n)).cloned() {
        h.remove(n);
    }
}

/// Whether a `Transfer-Encoding` value lists a coding other than `chunked` (`identity`, a no-op,
/// aside): one the gateway would lose by dropping the hop-by-hop field while relaying the bytes
/// still coded (RFC 9112 §6.1).
pub fn other_transfer_coding(value: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .any(|t| !t.eq_ignore_ascii_case(b"chunked") && !t.eq_ignore_ascii_case(b"identity"))
}

/// A `Content-Length` value: `1*DIGIT` (RFC 9110 §8.6) within optional whitespace, and within
/// `u64`. Not `u64::from_str`, which also takes a leading `+` that a client or another proxy
/// would read differently.
pub fn content_length(value: &[u8]) -> Option<u64> {
    digits(value.trim_ascii())
}

/// `1*DIGIT` exactly (no sign, no whitespace), within `u64`.
pub fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &d| {
        if !d.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Whether `name` appears more than once in `h`.
pub fn repeated(h: &HeaderMap, name: &HeaderName) -> bool {
    h.get_all(name).iter().nth(1).is_some()
}

/// The one JSON error shape, with its status and the headers that go with the refusal.
pub fn error_response(e: &ApiError, extra: &[(HeaderName, HeaderValue)]) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Left(Full::new(e.body())));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, JSON.clone());
    for (n, v) in extra {
        h.insert(n.clone(), v.clone());
    }
    if let Some(secs) = e.retry_after() {
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if e.closes_connection() {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// The token of `Authorization: Bearer <token>`; `None` when absent, another scheme, or empty.
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    bearer(headers.get(header::AUTHORIZATION)?.as_bytes())
}

/// The token of an `Authorization` value `Bearer <token>`; `None` for another scheme or empty.
pub fn bearer(auth: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = auth.split_at_checked(7)?;
    if !scheme.eq_ignore_ascii_case(b"bearer ") {
        return None;
    }
    let k = rest.trim_ascii();
    (!k.is_empty()).then_some(k)
}

/// Formats into `buf` and returns what was written (cut at the buffer's end), so a header value
/// costs one allocation (its own bytes) instead of a `String` and then its conversion.
pub fn write_into<'a>(buf: &'a mut [u8], args: std::fmt::Arguments<'_>) -> &'a [u8] {
    use std::io::Write;
    let len = buf.len();
    let mut rest = &mut buf[..];
    let _ = rest.write_fmt(args);
    let written = len - rest.len();
    &buf[..written]
}

#[cfg(test)]
mod tests {
    use super::{content_length, dropped_trailer, gateway_field};

    #[test]
    fn the_gateway_fields_in_any_spelling_and_hop_by_hop_ones_are_dropped_from_trailers() {
        for name in ["x-turnstile-payer", "X-Turnstile_Payer", "x_turnstile_error", "RateLimit", "ratelimit-policy"] {
            assert!(gateway_field(name.as_bytes()) && dropped_trailer(name.as_bytes()), "{name}");
        }
        for name in ["connection", "Keep-Alive", "transfer-encoding", "trailer", "te"] {
            assert!(!gateway_field(name.as_bytes()) && dropped_trailer(name.as_bytes()), "{name}");
        }
        for name in ["grpc-status", "grpc-message", "x-usage-video-ms", "x-usage-image-count", "x-turnstile", "x-kept"]
        {
            assert!(!dropped_trailer(name.as_bytes()), "{name} goes on");
        }
    }

    #[test]
    fn a_content_length_is_digits_only() {
        assert_eq!(content_length(b"0"), Some(0));
        assert_eq!(content_length(b" \t007 "), Some(7));
        assert_eq!(content_length(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b" ",
            b"+1",
            b"-1",
            b"1 1",
            b"1,1",
            b"0x1",
            b"1e3",
            b"18446744073709551616",
            "\u{663}".as_bytes(),
        ] {
            assert_eq!(content_length(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    proptest::proptest! {
        /// Whatever the bytes: a number exactly when they are digits (after trimming) that fit.
        #[test]
        fn content_length_is_the_digits_value(value in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)) {
            let trimmed = value.trim_ascii();
            let expected = if !trimmed.is_empty() && trimmed.iter().all(u8::is_ascii_digit) {
                std::str::from_utf8(trimmed).ok().and_then(|t| t.parse::<u64>().ok())
            } else {
                None
            };
            proptest::prop_assert_eq!(content_length(&value), expected);
        }

        #[test]
        fn every_u64_reads_back(n in proptest::prelude::any::<u64>()) {
            proptest::prop_assert_eq!(content_length(n.to_string().as_bytes()), Some(n));
        }
    }
}
