//! The one error shape tenants and admin clients see:
//! `{"error": {"code": "...", "message": "..."}}` with `content-type: application/json`.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

use crate::metrics::Outcome;

/// Everything the data plane and the admin API can refuse a request with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no API key: send it in the `{header}` header or as `Authorization: Bearer <key>`")]
    MissingApiKey { header: String },
    #[error("the API key is not known: check the key, or ask your administrator for one")]
    InvalidApiKey,
    #[error("no feature is served at {path}: check the path against the API documentation")]
    UnknownRoute { path: String },
    #[error("the request path is refused because {0}: send the path as documented, starting with /, with no \\ and no %2F or %5C, and % only before two hex digits")]
    BadPath(crate::path::BadPath),
    #[error(
        "the {family} service is not activated for this account: activate it in the console before calling {feature}"
    )]
    ServiceNotActivated { family: String, feature: String },
    #[error("image search is not activated for this account: buy an Image Search instance before calling {feature}")]
    ImageSearchNotActivated { feature: String },
    #[error("over the limit of {limit} requests per second for {feature}: retry after {retry_after} s, or buy or upgrade a QPS plan")]
    QpsExceeded { feature: &'static str, limit: u32, retry_after: u64 },
    #[error("nothing can pay for {feature}: no active QPS plan or package covers it and it is not sold pay-as-you-go; buy a package or QPS plan")]
    PaymentRequired { feature: String },
    #[error("the Image Search instance expired at {expires_at}: renew it within the {retention_days}-day retention period or it will be released")]
    InstanceExpired { expires_at: String, retention_days: u32 },
    #[error("the Image Search instance was released {retention_days} days after it expired at {expires_at}: buy a new instance")]
    InstanceReleased { expires_at: String, retention_days: u32 },
    #[error("the Image Search instance holds its maximum of {capacity} images: delete images or upgrade to a larger package")]
    CapacityExceeded { capacity: u64 },
    #[error("the request body is larger than {limit} bytes: send a smaller body")]
    BodyTooLarge { limit: u64 },
    #[error("no request body bytes arrived for {timeout_ms} ms: send the body without pausing, or retry over a faster connection")]
    BodyTimeout { timeout_ms: u64 },
    #[error(
        "only `Transfer-Encoding: chunked` is supported: send the body with a Content-Length or plain chunked (compress with Content-Encoding instead)"
    )]
    UnsupportedTransferEncoding,
    #[error("the inference service could not be reached: retry later")]
    UpstreamUnavailable,
    #[error("the inference service did not answer within {timeout_ms} ms: retry later, or send a smaller request")]
    UpstreamTimeout { timeout_ms: u64 },
    #[error("the gateway could not record the charge of this call durably within {timeout_ms} ms (ledger storage failing), so it was not charged: retry later; operators: check the ledger disk")]
    LedgerUnavailable { timeout_ms: u64 },
    #[error("the gateway's shared store failed this call ({reason}), so nothing was charged: retry later; operators: check the store")]
    StoreUnavailable { reason: String },
    #[error("the admin API is disabled: set TURNSTILE_ADMIN_TOKEN to enable it")]
    AdminDisabled,
    #[error("missing or wrong admin token: send `Authorization: Bearer $TURNSTILE_ADMIN_TOKEN`")]
    AdminUnauthorized,
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
}

/// How a refusal is answered and counted: the one table (status, code, outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub code: &'static str,
    /// The `outcome` label of `turnstile_requests_total`.
    pub outcome: Outcome,
}

const fn r(status: StatusCode, code: &'static str, outcome: Outcome) -> Refusal {
    Refusal { status, code, outcome }
}

impl ApiError {
    /// The one table from refusal to status, code and outcome. Client faults found before or
    /// while reading the body (413, 408) count as `forbidden`; failures of the upstream or of
    /// the gateway's own stores after admission count as `upstream_error`.
    pub fn refusal(&self) -> Refusal {
        use ApiError::*;
        use Outcome as O;
        use StatusCode as S;
        match self {
            MissingApiKey { .. } => r(S::UNAUTHORIZED, "missing_api_key", O::Unauthenticated),
            InvalidApiKey => r(S::UNAUTHORIZED, "invalid_api_key", O::Unauthenticated),
            UnknownRoute { .. } => r(S::NOT_FOUND, "unknown_route", O::UnknownRoute),
            BadPath(_) => r(S::BAD_REQUEST, "bad_path", O::UnknownRoute),
            ServiceNotActivated { .. } | ImageSearchNotActivated { .. } => {
                r(S::FORBIDDEN, "service_not_activated", O::Forbidden)
            }
            QpsExceeded { .. } => r(S::TOO_MANY_REQUESTS, "qps_exceeded", O::Throttled),
            PaymentRequired { .. } => r(S::PAYMENT_REQUIRED, "payment_required", O::PaymentRequired),
            InstanceExpired { .. } => r(S::PAYMENT_REQUIRED, "instance_expired", O::PaymentRequired),
            InstanceReleased { .. } => r(S::GONE, "instance_released", O::Forbidden),
            CapacityExceeded { .. } => r(S::CONFLICT, "capacity_exceeded", O::Forbidden),
            BodyTooLarge { .. } => r(S::PAYLOAD_TOO_LARGE, "body_too_large", O::Forbidden),
            BodyTimeout { .. } => r(S::REQUEST_TIMEOUT, "body_timeout", O::Forbidden),
            // Answered before any decision; not counted in turnstile_requests_total.
            UnsupportedTransferEncoding => r(S::NOT_IMPLEMENTED, "unsupported_transfer_encoding", O::Forbidden),
            UpstreamUnavailable => r(S::BAD_GATEWAY, "upstream_unavailable", O::UpstreamError),
            UpstreamTimeout { .. } => r(S::GATEWAY_TIMEOUT, "upstream_timeout", O::UpstreamError),
            LedgerUnavailable { .. } => r(S::SERVICE_UNAVAILABLE, "ledger_unavailable", O::UpstreamError),
            StoreUnavailable { .. } => r(S::SERVICE_UNAVAILABLE, "store_unavailable", O::UpstreamError),
            // The admin API (not counted as tenant traffic).
            AdminDisabled => r(S::SERVICE_UNAVAILABLE, "admin_disabled", O::Forbidden),
            AdminUnauthorized => r(S::UNAUTHORIZED, "unauthorized", O::Unauthenticated),
            NotFound(_) => r(S::NOT_FOUND, "not_found", O::UnknownRoute),
            BadRequest(_) => r(S::BAD_REQUEST, "bad_request", O::Forbidden),
            MethodNotAllowed(_) => r(S::METHOD_NOT_ALLOWED, "method_not_allowed", O::Forbidden),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.refusal().status
    }

    pub fn code(&self) -> &'static str {
        self.refusal().code
    }

    pub fn outcome(&self) -> Outcome {
        self.refusal().outcome
    }

    pub fn body(&self) -> Bytes {
        let mut out = Vec::with_capacity(192);
        write_error_body(&mut out, self.code(), self);
        Bytes::from(out)
    }

    /// The seconds of `Retry-After` that go with the refusal (a 429).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::QpsExceeded { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether the connection closes after this refusal. Like nginx: not reused after a body
    /// that was too large, too slow or in a coding it cannot read (the body is drained first).
    pub fn closes_connection(&self) -> bool {
        matches!(
            self,
            ApiError::BodyTooLarge { .. } | ApiError::BodyTimeout { .. } | ApiError::UnsupportedTransferEncoding
        )
    }
}

/// The error shape as bytes; used for codes outside [`ApiError`] too (admin 409/422).
pub fn error_body(code: &str, message: &str) -> Bytes {
    let mut out = Vec::with_capacity(40 + code.len() + message.len());
    write_error_body(&mut out, code, &message);
    Bytes::from(out)
}

/// Appends `{"error":{"code":"<code>","message":"<message>"}}` to `out`, the message written
/// straight from its `Display` into `out` (no `String` in between: a 429 flood answers with it)
/// and escaped there, in one pass over it, only from its first byte that needs it.
pub fn write_error_body(out: &mut Vec<u8>, code: &str, message: &dyn std::fmt::Display) {
    use std::io::Write;
    out.extend_from_slice(b"{\"error\":{\"code\":\"");
    escape_into(out, code.as_bytes());
    out.extend_from_slice(b"\",\"message\":\"");
    let start = out.len();
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{message}");
    if let Some(i) = first_to_escape(&out[start..]) {
        let raw = out.split_off(start + i);
        escape_into(out, &raw);
    }
    out.extend_from_slice(b"\"}}");
}

/// Appends `rest` as the inside of a JSON string (RFC 8259 §7): `"`, `\` and the control
/// characters escaped, everything else (UTF-8 included) as it is.
fn escape_into(out: &mut Vec<u8>, mut rest: &[u8]) {
    while let Some(i) = first_to_escape(rest) {
        out.extend_from_slice(&rest[..i]);
        match rest[i] {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            c => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.extend_from_slice(&[HEX[usize::from(c >> 4)], HEX[usize::from(c & 15)]]);
            }
        }
        rest = &rest[i + 1..];
    }
    out.extend_from_slice(rest);
}

/// Where the first byte JSON escapes (`"`, `\`, below 0x20) is: eight bytes at a time while
/// none is there (a word holds one iff one of three SWAR tests is non-zero), then byte by byte.
/// A byte-by-byte scan alone was ~15 instructions per byte, a fifth of a 429's cost.
fn first_to_escape(b: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES << 7;
    // Non-zero iff some byte of `v` is below `n` (n <= 0x80).
    let below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH;
    let mut clean = 0;
    for chunk in b.chunks_exact(8) {
        let Ok(w) = <[u8; 8]>::try_from(chunk).map(u64::from_le_bytes) else { break };
        if below(w, 0x20) | below(w ^ (ONES * u64::from(b'"')), 1) | below(w ^ (ONES * u64::from(b'\\')), 1) != 0 {
            break;
        }
        clean += 8;
    }
    b[clean..].iter().position(|&c| c < 0x20 || c == b'"' || c == b'\\').map(|i| clean + i)
}

pub static JSON: HeaderValue = HeaderValue::from_static("application/json");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_gives_status_code_and_outcome() {
        let rows: [(ApiError, u16, &str, Outcome); 8] = [
            (ApiError::InvalidApiKey, 401, "invalid_api_key", Outcome::Unauthenticated),
            (ApiError::BadPath(crate::path::BadPath::Backslash), 400, "bad_path", Outcome::UnknownRoute),
            (ApiError::QpsExceeded { feature: "f", limit: 1, retry_after: 1 }, 429, "qps_exceeded", Outcome::Throttled),
            (
                ApiError::InstanceExpired { expires_at: "x".into(), retention_days: 7 },
                402,
                "instance_expired",
                Outcome::PaymentRequired,
            ),
            (
                ApiError::InstanceReleased { expires_at: "x".into(), retention_days: 7 },
                410,
                "instance_released",
                Outcome::Forbidden,
            ),
            (ApiError::BodyTimeout { timeout_ms: 1 }, 408, "body_timeout", Outcome::Forbidden),
            (ApiError::LedgerUnavailable { timeout_ms: 1 }, 503, "ledger_unavailable", Outcome::UpstreamError),
            (ApiError::StoreUnavailable { reason: "down".into() }, 503, "store_unavailable", Outcome::UpstreamError),
        ];
        for (e, status, code, outcome) in rows {
            assert_eq!((e.status().as_u16(), e.code(), e.outcome()), (status, code, outcome), "{e}");
        }
    }

    #[test]
    fn the_error_body_is_json_with_the_code_and_message_as_given() {
        let e = ApiError::BadPath(crate::path::BadPath::Backslash);
        let v: serde_json::Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(v["error"]["code"], "bad_path");
        assert_eq!(v["error"]["message"], e.to_string());
        assert!(e.to_string().contains('\\'), "this message has a backslash to escape: {e}");
    }

    /// `first_to_escape` looks at eight bytes at a time: each byte JSON escapes, and its nearest
    /// neighbours that it does not, at every offset of strings across several words.
    #[test]
    fn each_byte_to_escape_is_found_at_every_offset_and_no_other() {
        for len in 1..=26 {
            for at in 0..len {
                for c in [0x00u8, 0x01, 0x09, 0x0a, 0x1f, b'"', b'\\', 0x20, 0x21, 0x23, 0x5b, 0x5d, 0x7f, 0xc3] {
                    let mut s = vec![b'a'; len];
                    s[at] = c;
                    let escaped = c < 0x20 || c == b'"' || c == b'\\';
                    assert_eq!(first_to_escape(&s), escaped.then_some(at), "{c:#04x} at {at} of {len}");
                    // And the message reads back (0xc3: as the first byte of an "é").
                    let message = match c {
                        0xc3 => format!("{}é{}", "a".repeat(at), "a".repeat(len - at - 1)),
                        _ => String::from_utf8(s).unwrap(),
                    };
                    let v: serde_json::Value = serde_json::from_slice(&error_body("c", &message)).unwrap();
                    assert_eq!(v["error"]["message"].as_str(), Some(message.as_str()));
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn any_message_reads_back_from_the_error_body(code in "[a-z_]{1,20}", message in "\\PC*|[\\x00-\\x7f]*") {
            let body = error_body(&code, &message);
            let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| {
                proptest::test_runner::TestCaseError::fail(format!("{e}: {}", String::from_utf8_lossy(&body)))
            })?;
            proptest::prop_assert_eq!(v["error"]["code"].as_str(), Some(code.as_str()));
            proptest::prop_assert_eq!(v["error"]["message"].as_str(), Some(message.as_str()));
            proptest::prop_assert_eq!(v.as_object().map(|o| o.len()), Some(1));
        }
    }
}
