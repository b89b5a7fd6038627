//! Prometheus metrics of SPEC §10, served on the admin listener.

use dashmap::DashMap;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};
use rustc_hash::FxBuildHasher;
use std::sync::OnceLock;

/// Request outcomes (the `outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Outcome {
    Admitted,
    Throttled,
    Unauthenticated,
    Forbidden,
    PaymentRequired,
    UnknownRoute,
    UpstreamError,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Admitted,
        Outcome::Throttled,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::PaymentRequired,
        Outcome::UnknownRoute,
        Outcome::UpstreamError,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Admitted => "admitted",
            Outcome::Throttled => "throttled",
            Outcome::Unauthenticated => "unauthenticated",
            Outcome::Forbidden => "forbidden",
            Outcome::PaymentRequired => "payment_required",
            Outcome::UnknownRoute => "unknown_route",
            Outcome::UpstreamError => "upstream_error",
        }
    }
}

/// Buckets for gateway-side latency: the gateway's own work is tens of microseconds, the
/// upstream's is milliseconds to seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

pub struct Metrics {
    pub registry: Registry,
    pub tenant_label: bool,
    requests: IntCounterVec,
    durations_by_outcome: Vec<Histogram>,
    pub upstream_duration: Histogram,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    /// Counter handles per (tenant, feature) pair, so the hot path does one map lookup and
    /// atomic adds instead of hashing label strings.
    pairs: DashMap<u64, [OnceLock<IntCounter>; 7], FxBuildHasher>,
}

impl Metrics {
    pub fn new(tenant_label: bool) -> Self {
        let registry = Registry::new();
        let labels: &[&str] = if tenant_label { &["tenant", "feature", "outcome"] } else { &["feature", "outcome"] };
        let requests = IntCounterVec::new(
            Opts::new("turnstile_requests_total", "Tenant requests by outcome"),
            labels,
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let request_duration = HistogramVec::new(
            HistogramOpts::new("turnstile_request_duration_seconds", "Time from request head to response head, by outcome")
                .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let upstream_duration = Histogram::with_opts(
            HistogramOpts::new("turnstile_upstream_duration_seconds", "Time the upstream took to answer with a response head")
                .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let config_reloads = IntCounterVec::new(
            Opts::new("turnstile_config_reloads_total", "Configuration reloads by result"),
            &["result"],
        )
        .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        let config_generation = IntGauge::new("turnstile_config_generation", "Generation of the configuration being served")
            .unwrap_or_else(|e| unreachable!("static metric definition: {e}"));
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_generation.clone()),
        ] {
            registry.register(c).unwrap_or_else(|e| unreachable!("distinct metric names: {e}"));
        }
        let durations_by_outcome = Outcome::ALL.iter().map(|o| request_duration.with_label_values(&[o.as_str()])).collect();
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        Metrics {
            registry,
            tenant_label,
            requests,
            durations_by_outcome,
            upstream_duration,
            config_reloads,
            config_generation,
            pairs: DashMap::with_hasher(FxBuildHasher),
        }
    }

    fn labels<'a>(&self, tenant: &'a str, feature: &'a str, outcome: Outcome) -> Vec<&'a str> {
        if self.tenant_label {
            vec![tenant, feature, outcome.as_str()]
        } else {
            vec![feature, outcome.as_str()]
        }
    }

    /// Counts a request of an identified tenant and feature (cached handles).
    pub fn request_pair(&self, key: u64, tenant: &str, feature: &str, outcome: Outcome) {
        let init = || self.requests.with_label_values(&self.labels(tenant, feature, outcome));
        if let Some(h) = self.pairs.get(&key) {
            h[outcome as usize].get_or_init(init).inc();
            return;
        }
        self.pairs.entry(key).or_default()[outcome as usize].get_or_init(init).inc();
    }

    /// Counts a request without a known (tenant, feature) pair (unauthenticated, unknown route).
    pub fn request(&self, tenant: &str, feature: &str, outcome: Outcome) {
        self.requests.with_label_values(&self.labels(tenant, feature, outcome)).inc();
    }

    pub fn observe_duration(&self, outcome: Outcome, seconds: f64) {
        self.durations_by_outcome[outcome as usize].observe(seconds);
    }

    /// Drops cached handles (and their series) of pairs a reload removed.
    pub fn retain_pairs(&self, keep: &dyn Fn(u64) -> bool) {
        self.pairs.retain(|k, _| keep(*k));
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let families = self.registry.gather();
        if TextEncoder::new().encode(&families, &mut buf).is_err() {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
