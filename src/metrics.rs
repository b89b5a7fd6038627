//! Prometheus metrics of SPEC §10, served on the admin listener.

use std::collections::HashSet;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use dashmap::DashMap;
use prometheus::core::Collector;
use prometheus::{
    Counter, CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use rustc_hash::FxBuildHasher;

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
    /// Shadow mode (SPEC §5.5): would have been 429 `qps_exceeded`, forwarded instead.
    ShadowThrottled,
    /// Shadow mode: would have been 402 `payment_required`, forwarded unpaid instead.
    ShadowPaymentRequired,
}

impl Outcome {
    pub const ALL: [Outcome; 9] = [
        Outcome::Admitted,
        Outcome::Throttled,
        Outcome::Unauthenticated,
        Outcome::Forbidden,
        Outcome::PaymentRequired,
        Outcome::UnknownRoute,
        Outcome::UpstreamError,
        Outcome::ShadowThrottled,
        Outcome::ShadowPaymentRequired,
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
            Outcome::ShadowThrottled => "shadow_throttled",
            Outcome::ShadowPaymentRequired => "shadow_payment_required",
        }
    }
}

/// Buckets for gateway-side latency: the gateway's own work is tens of microseconds, the
/// upstream's is milliseconds to seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
];

/// Cached handles of one (tenant, feature) pair.
#[derive(Default)]
struct PairHandles {
    requests: [OnceLock<IntCounter>; Outcome::ALL.len()],
    billed: [OnceLock<Counter>; 5],
    payg_amount: OnceLock<Counter>,
}

/// `turnstile_package_remaining_points`, showing the packages of the configuration being served
/// only. A package a reload removed is hidden, not deleted from the vec: billing caches each
/// package's gauge handle, and if a later reload brings the package back, that same handle must
/// be the one shown.
struct PackageGauges {
    vec: GaugeVec,
    /// `tenant\0package` (tenant empty without the tenant label) of every configured package.
    shown: Arc<RwLock<HashSet<String>>>,
}

fn package_key(tenant: &str, package: &str) -> String {
    format!("{tenant}\0{package}")
}

impl Collector for PackageGauges {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.vec.desc()
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let mut families = self.vec.collect();
        let shown = self.shown.read().unwrap_or_else(PoisonError::into_inner);
        for f in &mut families {
            f.mut_metric().retain(|m| {
                let label = |name: &str| m.get_label().iter().find(|l| l.name() == name).map_or("", |l| l.value());
                shown.contains(&package_key(label("tenant"), label("package")))
            });
        }
        families
    }
}

fn def<T>(r: Result<T, prometheus::Error>) -> T {
    r.unwrap_or_else(|e| unreachable!("static metric definition: {e}"))
}

pub struct Metrics {
    pub registry: Registry,
    pub tenant_label: bool,
    requests: IntCounterVec,
    billed_units: CounterVec,
    payg_amount: CounterVec,
    package_remaining: GaugeVec,
    packages_shown: Arc<RwLock<HashSet<String>>>,
    low_balance_alerts: IntCounterVec,
    durations_by_outcome: Vec<Histogram>,
    pub upstream_duration: Histogram,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub ledger_flush_duration: Histogram,
    usage_report_errors: IntCounterVec,
    /// Failed ledger commits (SPEC §7).
    pub ledger_errors: IntCounter,
    unpaid_units: CounterVec,
    image_count: IntGaugeVec,
    /// Handles per (tenant, feature) pair, so the request path does one map lookup and atomic
    /// adds instead of hashing label strings.
    pairs: DashMap<u64, PairHandles, FxBuildHasher>,
}

impl Metrics {
    pub fn new(tenant_label: bool) -> Self {
        let registry = Registry::new();
        let with_tenant = |rest: &'static [&'static str]| -> Vec<&'static str> {
            let mut v = if tenant_label { vec!["tenant"] } else { vec![] };
            v.extend_from_slice(rest);
            v
        };
        let requests = def(IntCounterVec::new(
            Opts::new("turnstile_requests_total", "Tenant requests by outcome"),
            &with_tenant(&["feature", "outcome"]),
        ));
        let billed_units = def(CounterVec::new(
            Opts::new("turnstile_billed_units_total", "Units (calls or video minutes) settled, by payer"),
            &with_tenant(&["feature", "payer"]),
        ));
        let payg_amount = def(CounterVec::new(
            Opts::new(
                "turnstile_payg_amount_total",
                "Pay-as-you-go amount charged (the ledger holds the exact figure)",
            ),
            &with_tenant(&["feature", "currency"]),
        ));
        let package_remaining = def(GaugeVec::new(
            Opts::new("turnstile_package_remaining_points", "Points left in a package"),
            &with_tenant(&["package"]),
        ));
        let low_balance_alerts = def(IntCounterVec::new(
            Opts::new("turnstile_package_low_balance_alerts_total", "Low-balance alerts fired"),
            &with_tenant(&["package"]),
        ));
        let request_duration = def(HistogramVec::new(
            HistogramOpts::new(
                "turnstile_request_duration_seconds",
                "Time from request head to response head, by outcome",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        ));
        let upstream_duration = def(Histogram::with_opts(
            HistogramOpts::new(
                "turnstile_upstream_duration_seconds",
                "Time the upstream took to answer with a response head",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        ));
        let config_reloads = def(IntCounterVec::new(
            Opts::new("turnstile_config_reloads_total", "Configuration reloads by result"),
            &["result"],
        ));
        let config_generation =
            def(IntGauge::new("turnstile_config_generation", "Generation of the configuration being served"));
        let ledger_flush_duration = def(Histogram::with_opts(
            HistogramOpts::new("turnstile_ledger_flush_duration_seconds", "Time of one ledger group commit")
                .buckets(LATENCY_BUCKETS.to_vec()),
        ));
        let usage_report_errors = def(IntCounterVec::new(
            Opts::new("turnstile_usage_report_errors_total", "Upstream usage reports missing or malformed"),
            &["feature"],
        ));
        let ledger_errors =
            def(IntCounter::new("turnstile_ledger_errors_total", "Ledger commits that failed (each is retried)"));
        let unpaid_units = def(CounterVec::new(
            Opts::new(
                "turnstile_unpaid_units_total",
                "Units nothing could pay for: video minutes beyond the packages, and units served in shadow mode",
            ),
            &with_tenant(&["feature"]),
        ));
        let image_count = def(IntGaugeVec::new(
            Opts::new("turnstile_image_search_images", "Images in a tenant's Image Search instance"),
            &with_tenant(&[]),
        ));
        let packages_shown = Arc::new(RwLock::new(HashSet::new()));
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(image_count.clone()),
            Box::new(requests.clone()),
            Box::new(billed_units.clone()),
            Box::new(payg_amount.clone()),
            Box::new(PackageGauges { vec: package_remaining.clone(), shown: packages_shown.clone() }),
            Box::new(low_balance_alerts.clone()),
            Box::new(request_duration.clone()),
            Box::new(upstream_duration.clone()),
            Box::new(config_reloads.clone()),
            Box::new(config_generation.clone()),
            Box::new(ledger_flush_duration.clone()),
            Box::new(usage_report_errors.clone()),
            Box::new(ledger_errors.clone()),
            Box::new(unpaid_units.clone()),
        ];
        for c in collectors {
            def(registry.register(c));
        }
        let durations_by_outcome =
            Outcome::ALL.iter().map(|o| request_duration.with_label_values(&[o.as_str()])).collect();
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        Metrics {
            registry,
            tenant_label,
            requests,
            billed_units,
            payg_amount,
            package_remaining,
            packages_shown,
            low_balance_alerts,
            durations_by_outcome,
            upstream_duration,
            config_reloads,
            config_generation,
            ledger_flush_duration,
            usage_report_errors,
            ledger_errors,
            unpaid_units,
            image_count,
            pairs: DashMap::with_hasher(FxBuildHasher),
        }
    }

    fn labels<'a>(&self, tenant: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
        let mut v = Vec::with_capacity(3);
        if self.tenant_label {
            v.push(tenant);
        }
        v.extend_from_slice(rest);
        v
    }

    fn with_pair<R>(&self, key: u64, f: impl FnOnce(&PairHandles) -> R) -> R {
        if let Some(h) = self.pairs.get(&key) {
            return f(&h);
        }
        f(&self.pairs.entry(key).or_default())
    }

    /// Counts a request of an identified tenant and feature (cached handles).
    pub fn request_pair(&self, key: u64, tenant: &str, feature: &str, outcome: Outcome) {
        self.with_pair(key, |h| {
            h.requests[outcome as usize]
                .get_or_init(|| self.requests.with_label_values(&self.labels(tenant, &[feature, outcome.as_str()])))
                .inc()
        });
    }

    /// Counts a request without a known (tenant, feature) pair (unauthenticated, unknown route).
    pub fn request(&self, tenant: &str, feature: &str, outcome: Outcome) {
        self.requests.with_label_values(&self.labels(tenant, &[feature, outcome.as_str()])).inc();
    }

    /// Units settled for a pair, by payer (index into [`crate::ledger::PAYERS`]).
    pub fn billed(&self, key: u64, tenant: &str, feature: &str, payer: usize, units: f64) {
        self.with_pair(key, |h| {
            h.billed[payer]
                .get_or_init(|| {
                    self.billed_units.with_label_values(&self.labels(tenant, &[feature, crate::ledger::PAYERS[payer]]))
                })
                .inc_by(units)
        });
    }

    pub fn payg_amount(&self, key: u64, tenant: &str, feature: &str, currency: &str, amount: f64) {
        self.with_pair(key, |h| {
            h.payg_amount
                .get_or_init(|| self.payg_amount.with_label_values(&self.labels(tenant, &[feature, currency])))
                .inc_by(amount)
        });
    }

    pub fn package_gauge(&self, tenant: &str, package: &str) -> Gauge {
        self.package_remaining.with_label_values(&self.labels(tenant, &[package]))
    }

    pub fn image_gauge(&self, tenant: &str) -> IntGauge {
        self.image_count.with_label_values(&self.labels(tenant, &[]))
    }

    pub fn low_balance_alert(&self, tenant: &str, package: &str) {
        self.low_balance_alerts.with_label_values(&self.labels(tenant, &[package])).inc();
    }

    pub fn unpaid(&self, tenant: &str, feature: &str, units: f64) {
        self.unpaid_units.with_label_values(&self.labels(tenant, &[feature])).inc_by(units);
    }

    pub fn usage_report_error(&self, feature: &str) {
        self.usage_report_errors.with_label_values(&[feature]).inc();
    }

    pub fn observe_duration(&self, outcome: Outcome, seconds: f64) {
        self.durations_by_outcome[outcome as usize].observe(seconds);
    }

    /// Drops the cached handles of a pair a reload removed (one key at a time: requests use the map).
    pub fn remove_pair(&self, key: u64) {
        self.pairs.remove(&key);
    }

    /// The packages whose `turnstile_package_remaining_points` series are shown: those of the
    /// configuration being served (a reload's removed packages disappear from the scrape).
    pub fn show_packages<'a>(&self, packages: impl Iterator<Item = (&'a str, &'a str)>) {
        let shown: HashSet<String> =
            packages.map(|(t, p)| package_key(if self.tenant_label { t } else { "" }, p)).collect();
        *self.packages_shown.write().unwrap_or_else(PoisonError::into_inner) = shown;
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
