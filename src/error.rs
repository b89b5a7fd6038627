//! The one error shape tenants and admin clients see:
//! `{"error": {"code": "...", "message": "..."}}` with `content-type: application/json`.

use bytes::Bytes;
use http::{HeaderValue, StatusCode};

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
    QpsExceeded { feature: String, limit: u32, retry_after: u64 },
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

impl ApiError {
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingApiKey { .. } | InvalidApiKey | AdminUnauthorized => StatusCode::UNAUTHORIZED,
            UnknownRoute { .. } | NotFound(_) => StatusCode::NOT_FOUND,
            BadRequest(_) | BadPath(_) => StatusCode::BAD_REQUEST,
            ServiceNotActivated { .. } | ImageSearchNotActivated { .. } => StatusCode::FORBIDDEN,
            QpsExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            PaymentRequired { .. } | InstanceExpired { .. } => StatusCode::PAYMENT_REQUIRED,
            InstanceReleased { .. } => StatusCode::GONE,
            CapacityExceeded { .. } => StatusCode::CONFLICT,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            UnsupportedTransferEncoding => StatusCode::NOT_IMPLEMENTED,
            UpstreamUnavailable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            AdminDisabled | LedgerUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
        }
    }

    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingApiKey { .. } => "missing_api_key",
            InvalidApiKey => "invalid_api_key",
            UnknownRoute { .. } => "unknown_route",
            BadPath(_) => "bad_path",
            ServiceNotActivated { .. } | ImageSearchNotActivated { .. } => "service_not_activated",
            QpsExceeded { .. } => "qps_exceeded",
            PaymentRequired { .. } => "payment_required",
            InstanceExpired { .. } => "instance_expired",
            InstanceReleased { .. } => "instance_released",
            CapacityExceeded { .. } => "capacity_exceeded",
            BodyTooLarge { .. } => "body_too_large",
            BodyTimeout { .. } => "body_timeout",
            UnsupportedTransferEncoding => "unsupported_transfer_encoding",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamTimeout { .. } => "upstream_timeout",
            LedgerUnavailable { .. } => "ledger_unavailable",
            AdminDisabled => "admin_disabled",
            AdminUnauthorized => "unauthorized",
            NotFound(_) => "not_found",
            BadRequest(_) => "bad_request",
            MethodNotAllowed(_) => "method_not_allowed",
        }
    }

    pub fn body(&self) -> Bytes {
        error_body(self.code(), &self.to_string())
    }
}

/// Serializes the error shape; used for codes outside [`ApiError`] too (admin 409/422).
pub fn error_body(code: &str, message: &str) -> Bytes {
    let v = serde_json::json!({ "error": { "code": code, "message": message } });
    Bytes::from(v.to_string())
}

pub static JSON: HeaderValue = HeaderValue::from_static("application/json");
