//! turnstile: a QPS admission gateway for vision-AI inference services.
//!
//! Per request: identify the tenant by API key, route the path to a feature, check the service
//! is activated, admit against the tenant's limit for the feature (GCRA token bucket), forward to
//! the upstream, and report it all to Prometheus. See `SPEC.md` for the interface.

pub mod admin;
pub mod admission;
pub mod alerts;
pub mod billing;
pub mod body;
pub mod catalog;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod diag;
pub mod error;
pub mod gateway;
pub mod grpc;
pub mod h1;
pub mod http_util;
pub mod intern;
pub mod ledger;
pub mod metrics;
pub mod path;
pub mod payer;
pub mod pricing;
pub mod proxy;
pub mod quote;
pub mod reload;
pub mod report;
pub mod server;
pub mod snapshot;
pub mod standin;
pub mod store;
pub mod time;
pub mod units;
pub mod upstream;

/// Keys of the demo tenants in `config/entitlements.json` (their sha256 is what the file stores).
pub const DEMO_KEYS: &[(&str, &str)] =
    &[("acme", "demo-acme-key"), ("globex", "demo-globex-key"), ("initech", "demo-initech-key")];

/// The hex sha256 that entitlements store for an API key.
pub fn hash_key(key: &str) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(key.trim().as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}
