//! Prometheus metrics of SPEC §10, served on the admin listener.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

use dashmap::DashMap;
use prometheus::core::Collector;
use prometheus::core::Desc;
use prometheus::proto::{self, LabelPair, MetricFamily, MetricType};
use prometheus::{
    CounterVec, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
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

/// Adds `v` to an `f64` kept as its bits.
fn add_f64(a: &AtomicU64, v: f64) {
    let _ = a.fetch_update(Relaxed, Relaxed, |bits| Some((f64::from_bits(bits) + v).to_bits()));
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut l = LabelPair::default();
    l.set_name(name.to_string());
    l.set_value(value.to_string());
    l
}

/// What one (tenant, feature) pair counts, in one block of its own: a call adds to it with
/// plain atomic adds, no map of label strings, and an admitted, metered call touches its first
/// 64 bytes only (its units, its amount, its outcome). Summed into the families of
/// `turnstile_requests_total`, `turnstile_billed_units_total` and `turnstile_payg_amount_total`
/// when scraped ([`PairFamilies`]). Made once per pair and kept for the process's life (a
/// counter never goes back, and a pair a reload brings back counts on).
#[repr(C, align(64))]
struct PairCounts {
    /// Units by payer, `f64` bits (video minutes are fractions).
    billed: [AtomicU64; 5],
    /// Pay-as-you-go amount, `f64` bits.
    payg_amount: AtomicU64,
    /// Requests by outcome ([`Outcome`] as index): admitted and throttled share the first line.
    requests: [AtomicU64; Outcome::ALL.len()],
    tenant: &'static str,
    feature: &'static str,
    /// The currency of its first pay-as-you-go amount (the catalog's).
    currency: OnceLock<Box<str>>,
}

impl PairCounts {
    fn new(tenant: &'static str, feature: &'static str) -> Self {
        PairCounts {
            billed: Default::default(),
            payg_amount: AtomicU64::new(0f64.to_bits()),
            requests: Default::default(),
            tenant,
            feature,
            currency: OnceLock::new(),
        }
    }
}

/// The pairs' counts, for the scrape.
type Pairs = DashMap<u64, &'static PairCounts, FxBuildHasher>;

/// The three per-pair families: the series a [`CounterVec`] holds (requests without a pair:
/// unauthenticated, unknown route, whose feature label is empty) and those of the pairs, summed
/// by their labels (without the tenant label, a feature's pairs add up into one series).
struct PairFamilies {
    requests: IntCounterVec,
    billed: CounterVec,
    payg: CounterVec,
    pairs: Arc<Pairs>,
    tenant_label: bool,
}

impl PairFamilies {
    /// `family` (if the vec gave one) with the pairs' series added: `series` gives each pair's
    /// labels and value, for the series it has (one that was never counted has none).
    fn add<'p>(
        &self,
        family: Option<&mut MetricFamily>,
        pairs: &[&'p PairCounts],
        series: impl Fn(&'p PairCounts, &mut dyn FnMut(&[(&'static str, &'p str)], f64)),
    ) {
        let Some(family) = family else { return };
        let mut sums: BTreeMap<Vec<(&'static str, &'p str)>, f64> = BTreeMap::new();
        for p in pairs {
            series(p, &mut |labels, v| {
                let mut key: Vec<(&'static str, &'p str)> = labels.to_vec();
                if self.tenant_label {
                    key.push(("tenant", p.tenant));
                }
                key.sort_unstable();
                *sums.entry(key).or_insert(0.0) += v;
            });
        }
        for (labels, v) in sums {
            let mut m = proto::Metric::from_label(labels.iter().map(|(n, v)| label(n, v)).collect());
            let mut c = proto::Counter::default();
            c.set_value(v);
            m.set_counter(c);
            family.mut_metric().push(m);
        }
    }
}

impl Collector for PairFamilies {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.requests.desc();
        d.extend(self.billed.desc());
        d.extend(self.payg.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let pairs: Vec<&PairCounts> = self.pairs.iter().map(|e| *e.value()).collect();
        let (mut requests, mut billed, mut payg) =
            (self.requests.collect(), self.billed.collect(), self.payg.collect());
        self.add(requests.first_mut(), &pairs, |p, emit| {
            for o in Outcome::ALL {
                let n = p.requests[o as usize].load(Relaxed);
                if n > 0 {
                    emit(&[("feature", p.feature), ("outcome", o.as_str())], n as f64);
                }
            }
        });
        self.add(billed.first_mut(), &pairs, |p, emit| {
            for (i, payer) in crate::ledger::PAYERS.iter().enumerate() {
                let units = f64::from_bits(p.billed[i].load(Relaxed));
                if units != 0.0 {
                    emit(&[("feature", p.feature), ("payer", payer)], units);
                }
            }
        });
        // Shown from its first amount on, 0 included (a free first tier).
        self.add(payg.first_mut(), &pairs, |p, emit| {
            if let Some(currency) = p.currency.get() {
                emit(&[("currency", currency), ("feature", p.feature)], f64::from_bits(p.payg_amount.load(Relaxed)));
            }
        });
        requests.into_iter().chain(billed).chain(payg).collect()
    }
}

/// How many shards a [`ShardedHistogram`] has: threads take them in turn (more threads than
/// shards share one, still exactly).
const SHARDS: usize = 32;
const BUCKETS: usize = LATENCY_BUCKETS.len();

/// The calling thread's shard, taken in turn at its first observation.
fn shard_index() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    SHARD.with(|s| {
        if s.get() == usize::MAX {
            s.set(NEXT.fetch_add(1, Relaxed) % SHARDS);
        }
        s.get()
    })
}

/// One thread's observations: counts per bucket (the last past every bound), and their sum.
#[repr(align(128))]
#[derive(Default)]
struct HistogramShard {
    counts: [AtomicU64; BUCKETS + 1],
    /// `f64` bits.
    sum: AtomicU64,
}

/// A histogram over [`LATENCY_BUCKETS`] that each thread observes into a shard of its own (its
/// own cache lines: a prometheus `Histogram` is one set of atomics that every core's every call
/// writes), summed when scraped. The count is the sum of the buckets, so buckets and count always
/// agree; the sum can miss an observation in flight.
pub struct ShardedHistogram {
    shards: Box<[HistogramShard]>,
}

impl Default for ShardedHistogram {
    fn default() -> Self {
        ShardedHistogram { shards: (0..SHARDS).map(|_| HistogramShard::default()).collect() }
    }
}

impl ShardedHistogram {
    pub fn observe(&self, v: f64) {
        let s = &self.shards[shard_index()];
        let i = LATENCY_BUCKETS.iter().position(|&b| v <= b).unwrap_or(BUCKETS);
        s.counts[i].fetch_add(1, Relaxed);
        add_f64(&s.sum, v);
    }

    fn proto(&self) -> proto::Histogram {
        let mut counts = [0u64; BUCKETS + 1];
        let mut sum = 0.0;
        for s in self.shards.iter() {
            for (c, n) in counts.iter_mut().zip(&s.counts) {
                *c += n.load(Relaxed);
            }
            sum += f64::from_bits(s.sum.load(Relaxed));
        }
        let mut h = proto::Histogram::default();
        let mut cumulative = 0;
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(counts)
            .map(|(bound, n)| {
                cumulative += n;
                let mut b = proto::Bucket::default();
                b.set_cumulative_count(cumulative);
                b.set_upper_bound(*bound);
                b
            })
            .collect();
        h.set_bucket(buckets);
        h.set_sample_count(cumulative + counts[BUCKETS]);
        h.set_sample_sum(sum);
        h
    }
}

/// One histogram family of [`ShardedHistogram`]s: one per value of its label, or one alone.
struct HistogramFamily {
    desc: Desc,
    label: Option<&'static str>,
    /// Each histogram with its value of the label (unused without one).
    series: Vec<(&'static str, Arc<ShardedHistogram>)>,
}

impl HistogramFamily {
    fn new(name: &str, help: &str, label: Option<&'static str>) -> Self {
        let labels = label.map(|l| vec![l.to_string()]).unwrap_or_default();
        let desc = def(Desc::new(name.into(), help.into(), labels, Default::default()));
        HistogramFamily { desc, label, series: Vec::new() }
    }
}

impl Collector for HistogramFamily {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut f = MetricFamily::default();
        f.set_name(self.desc.fq_name.clone());
        f.set_help(self.desc.help.clone());
        f.set_field_type(MetricType::HISTOGRAM);
        for (value, h) in &self.series {
            let mut m = proto::Metric::from_label(self.label.iter().map(|n| label(n, value)).collect());
            m.set_histogram(h.proto());
            f.mut_metric().push(m);
        }
        vec![f]
    }
}

/// A gauge family kept per tenant: each tenant's series its own gauge in `vec` (labelled
/// `tenant` first, whatever the tenant label), scraped as it is with the tenant label or, without
/// it, the series that differ only by tenant added up into one (SPEC §10: the tenant label is
/// left out everywhere; the counters add up the same way).
///
/// `turnstile_package_remaining_points` also shows the packages of the configuration being
/// served only (`shown`). A package a reload removed is hidden, not deleted from the vec: billing
/// caches each package's gauge handle, and if a later reload brings the package back, that same
/// handle must be the one shown. A package id several tenants have is the sum of theirs.
struct TenantGauges<V> {
    vec: V,
    /// The family as scraped: the vec's labels, less `tenant` without the tenant label.
    desc: Desc,
    tenant_label: bool,
    /// `tenant\0package` of every configured package (packages only).
    shown: Option<Arc<RwLock<HashSet<String>>>>,
}

impl<V> TenantGauges<V> {
    /// `vec`, with `opts` and `rest` (its labels after `tenant`) for the family as scraped.
    fn new(vec: V, opts: &Opts, rest: &[&str], tenant_label: bool) -> Self {
        let labels = tenant_label.then_some("tenant").into_iter().chain(rest.iter().copied());
        let desc = def(Desc::new(
            opts.name.clone(),
            opts.help.clone(),
            labels.map(String::from).collect(),
            Default::default(),
        ));
        TenantGauges { vec, desc, tenant_label, shown: None }
    }
}

fn package_key(tenant: &str, package: &str) -> String {
    format!("{tenant}\0{package}")
}

/// The value of `m`'s label `name` ("" when it has none).
fn label_of<'m>(m: &'m proto::Metric, name: &str) -> &'m str {
    m.get_label().iter().find(|l| l.name() == name).map_or("", |l| l.value())
}

impl<V: Collector> Collector for TenantGauges<V> {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = self.vec.collect();
        for f in &mut families {
            if let Some(shown) = &self.shown {
                let shown = shown.read().unwrap_or_else(PoisonError::into_inner);
                f.mut_metric().retain(|m| shown.contains(&package_key(label_of(m, "tenant"), label_of(m, "package"))));
            }
            if self.tenant_label {
                continue;
            }
            let mut sums: BTreeMap<Vec<(&str, &str)>, f64> = BTreeMap::new();
            for m in f.get_metric() {
                let key =
                    m.get_label().iter().filter(|l| l.name() != "tenant").map(|l| (l.name(), l.value())).collect();
                *sums.entry(key).or_insert(0.0) += m.get_gauge().get_value();
            }
            let summed = sums
                .into_iter()
                .map(|(labels, v)| {
                    let mut m = proto::Metric::from_label(labels.iter().map(|(n, v)| label(n, v)).collect());
                    let mut g = proto::Gauge::default();
                    g.set_value(v);
                    m.set_gauge(g);
                    m
                })
                .collect();
            f.set_metric(summed);
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
    package_remaining: GaugeVec,
    packages_shown: Arc<RwLock<HashSet<String>>>,
    low_balance_alerts: IntCounterVec,
    /// `turnstile_request_duration_seconds` by outcome ([`Outcome`] as index).
    durations_by_outcome: Vec<Arc<ShardedHistogram>>,
    pub upstream_duration: Arc<ShardedHistogram>,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub ledger_flush_duration: Histogram,
    usage_report_errors: IntCounterVec,
    /// Failed ledger commits (SPEC §7).
    pub ledger_errors: IntCounter,
    unpaid_units: CounterVec,
    image_count: IntGaugeVec,
    /// The counts of each (tenant, feature) pair, by its key.
    pairs: Arc<Pairs>,
    /// Tells this instance's pairs from another's in a thread's memo ([`Metrics::pair`]).
    id: u64,
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
        let package_opts = Opts::new("turnstile_package_remaining_points", "Points left in a package");
        let package_remaining = def(GaugeVec::new(package_opts.clone(), &["tenant", "package"]));
        let low_balance_alerts = def(IntCounterVec::new(
            Opts::new("turnstile_package_low_balance_alerts_total", "Low-balance alerts fired"),
            &with_tenant(&["package"]),
        ));
        let mut request_duration = HistogramFamily::new(
            "turnstile_request_duration_seconds",
            "Time from request head to response head, by outcome",
            Some("outcome"),
        );
        let durations_by_outcome: Vec<Arc<ShardedHistogram>> =
            Outcome::ALL.iter().map(|_| Arc::new(ShardedHistogram::default())).collect();
        request_duration.series =
            Outcome::ALL.iter().map(|o| o.as_str()).zip(durations_by_outcome.iter().cloned()).collect();
        let mut upstream = HistogramFamily::new(
            "turnstile_upstream_duration_seconds",
            "Time the upstream took to answer with a response head",
            None,
        );
        let upstream_duration = Arc::new(ShardedHistogram::default());
        upstream.series.push(("", upstream_duration.clone()));
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
        let image_opts = Opts::new("turnstile_image_search_images", "Images in a tenant's Image Search instance");
        let image_count = def(IntGaugeVec::new(image_opts.clone(), &["tenant"]));
        let packages_shown = Arc::new(RwLock::new(HashSet::new()));
        let pairs: Arc<Pairs> = Arc::new(DashMap::with_hasher(FxBuildHasher));
        let collectors: Vec<Box<dyn Collector>> = vec![
            Box::new(TenantGauges::new(image_count.clone(), &image_opts, &[], tenant_label)),
            Box::new(PairFamilies {
                requests: requests.clone(),
                billed: billed_units,
                payg: payg_amount,
                pairs: pairs.clone(),
                tenant_label,
            }),
            Box::new(TenantGauges {
                shown: Some(packages_shown.clone()),
                ..TenantGauges::new(package_remaining.clone(), &package_opts, &["package"], tenant_label)
            }),
            Box::new(low_balance_alerts.clone()),
            Box::new(request_duration),
            Box::new(upstream),
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
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        Metrics {
            registry,
            tenant_label,
            requests,
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
            pairs,
            id: crate::intern::instance_id(),
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

    /// The counts of a pair: the thread's last pair again without a map lookup (a call counts
    /// its request, units and amount one after another), made at its first call.
    fn pair(&self, key: u64, tenant: &'static str, feature: &'static str) -> &'static PairCounts {
        thread_local! {
            static LAST: Cell<Option<(u64, u64, &'static PairCounts)>> = const { Cell::new(None) };
        }
        LAST.with(|last| {
            if let Some((id, k, p)) = last.get() {
                if (id, k) == (self.id, key) {
                    return p;
                }
            }
            let p = match self.pairs.get(&key) {
                Some(p) => *p,
                // Leaked: kept for the process's life like the series it is.
                None => *self.pairs.entry(key).or_insert_with(|| Box::leak(Box::new(PairCounts::new(tenant, feature)))),
            };
            last.set(Some((self.id, key, p)));
            p
        })
    }

    /// Counts a request of an identified tenant and feature.
    pub fn request_pair(&self, key: u64, tenant: &'static str, feature: &'static str, outcome: Outcome) {
        self.pair(key, tenant, feature).requests[outcome as usize].fetch_add(1, Relaxed);
    }

    /// Counts a request without a known (tenant, feature) pair (unauthenticated, unknown route).
    pub fn request(&self, tenant: &str, feature: &str, outcome: Outcome) {
        self.requests.with_label_values(&self.labels(tenant, &[feature, outcome.as_str()])).inc();
    }

    /// Units settled for a pair, by payer (index into [`crate::ledger::PAYERS`]).
    pub fn billed(&self, key: u64, tenant: &'static str, feature: &'static str, payer: usize, units: f64) {
        add_f64(&self.pair(key, tenant, feature).billed[payer], units);
    }

    pub fn payg_amount(&self, key: u64, tenant: &'static str, feature: &'static str, currency: &str, amount: f64) {
        let p = self.pair(key, tenant, feature);
        p.currency.get_or_init(|| currency.into());
        add_f64(&p.payg_amount, amount);
    }

    /// The gauge of `tenant`'s `package` (its own, also without the tenant label: the scrape
    /// sums the tenants' gauges of one package id then).
    pub fn package_gauge(&self, tenant: &str, package: &str) -> Gauge {
        self.package_remaining.with_label_values(&[tenant, package])
    }

    /// The gauge of `tenant`'s image count (its own, also without the tenant label: the scrape
    /// sums the tenants' gauges then).
    pub fn image_gauge(&self, tenant: &str) -> IntGauge {
        self.image_count.with_label_values(&[tenant])
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

    /// The packages whose `turnstile_package_remaining_points` series are shown: those of the
    /// configuration being served (a reload's removed packages disappear from the scrape).
    pub fn show_packages<'a>(&self, packages: impl Iterator<Item = (&'a str, &'a str)>) {
        let shown: HashSet<String> = packages.map(|(t, p)| package_key(t, p)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines of `name`'s family in the rendered text.
    fn lines(text: &str, name: &str) -> Vec<String> {
        text.lines().filter(|l| l.starts_with(name)).map(str::to_string).collect()
    }

    #[test]
    fn pair_counts_render_as_the_counter_vecs_would() {
        for tenant_label in [true, false] {
            let m = Metrics::new(tenant_label);
            let reference = Registry::new();
            let with = |rest: &[&'static str]| {
                let mut v = if tenant_label { vec!["tenant"] } else { vec![] };
                v.extend_from_slice(rest);
                v
            };
            let requests =
                IntCounterVec::new(Opts::new("turnstile_requests_total", "x"), &with(&["feature", "outcome"])).unwrap();
            let billed =
                CounterVec::new(Opts::new("turnstile_billed_units_total", "x"), &with(&["feature", "payer"])).unwrap();
            let payg = CounterVec::new(Opts::new("turnstile_payg_amount_total", "x"), &with(&["feature", "currency"]))
                .unwrap();
            for c in
                [Box::new(requests.clone()) as Box<dyn Collector>, Box::new(billed.clone()), Box::new(payg.clone())]
            {
                reference.register(c).unwrap();
            }
            let labels = |t: &'static str, rest: &[&'static str]| -> Vec<&'static str> {
                let mut v = if tenant_label { vec![t] } else { vec![] };
                v.extend_from_slice(rest);
                v
            };
            // Two tenants of one feature (one series each, or one summed without the tenant label),
            // a second feature, a request without a pair, fractional units.
            for (pair, t, f) in [(1, "acme", "ocr"), (2, "beta", "ocr"), (3, "acme", "face")] {
                for n in 0..pair {
                    m.request_pair(pair, t, f, Outcome::Admitted);
                    requests.with_label_values(&labels(t, &[f, "admitted"])).inc();
                    m.billed(pair, t, f, 3, 1.0);
                    billed.with_label_values(&labels(t, &[f, "payg"])).inc_by(1.0);
                    m.payg_amount(pair, t, f, "CNY", 0.0025);
                    payg.with_label_values(&labels(t, &[f, "CNY"])).inc_by(0.0025);
                    if n == 0 {
                        m.request_pair(pair, t, f, Outcome::Throttled);
                        requests.with_label_values(&labels(t, &[f, "throttled"])).inc();
                        m.billed(pair, t, f, 1, 0.25);
                        billed.with_label_values(&labels(t, &[f, "single_package"])).inc_by(0.25);
                    }
                }
            }
            m.request("", "", Outcome::Unauthenticated);
            requests.with_label_values(&labels("", &["", "unauthenticated"])).inc();
            // A free first tier: an amount of 0 is a series all the same.
            m.payg_amount(4, "gamma", "ocr", "CNY", 0.0);
            payg.with_label_values(&labels("gamma", &["ocr", "CNY"])).inc_by(0.0);
            let mut want = Vec::new();
            TextEncoder::new().encode(&reference.gather(), &mut want).unwrap();
            let (want, got) = (String::from_utf8(want).unwrap(), m.render());
            for name in ["turnstile_requests_total", "turnstile_billed_units_total", "turnstile_payg_amount_total"] {
                assert_eq!(lines(&got, name), lines(&want, name), "{name}, tenant label {tenant_label}");
                assert!(!lines(&got, name).is_empty());
            }
        }
    }

    /// SPEC §10: without the tenant label every package still has its
    /// `turnstile_package_remaining_points` series; two tenants' packages of one id share it, and
    /// it shows their sum (as the counters add up), over the configured packages only.
    #[test]
    fn without_the_tenant_label_one_package_id_of_two_tenants_shows_their_sum() {
        for tenant_label in [true, false] {
            let m = Metrics::new(tenant_label);
            m.show_packages([("acme", "od"), ("beta", "od"), ("beta", "ocr")].into_iter());
            m.package_gauge("acme", "od").set(3.0);
            m.package_gauge("beta", "od").set(4.5);
            m.package_gauge("beta", "ocr").set(2.0);
            let got = lines(&m.render(), "turnstile_package_remaining_points{");
            let want: &[&str] = if tenant_label {
                &[
                    r#"turnstile_package_remaining_points{package="ocr",tenant="beta"} 2"#,
                    r#"turnstile_package_remaining_points{package="od",tenant="acme"} 3"#,
                    r#"turnstile_package_remaining_points{package="od",tenant="beta"} 4.5"#,
                ]
            } else {
                &[
                    r#"turnstile_package_remaining_points{package="ocr"} 2"#,
                    r#"turnstile_package_remaining_points{package="od"} 7.5"#,
                ]
            };
            assert_eq!(got, want, "tenant label {tenant_label}");
            // A reload removed beta's od: the sum is acme's alone.
            m.show_packages([("acme", "od"), ("beta", "ocr")].into_iter());
            let got = lines(&m.render(), "turnstile_package_remaining_points{");
            let want: &[&str] = if tenant_label {
                &[
                    r#"turnstile_package_remaining_points{package="ocr",tenant="beta"} 2"#,
                    r#"turnstile_package_remaining_points{package="od",tenant="acme"} 3"#,
                ]
            } else {
                &[
                    r#"turnstile_package_remaining_points{package="ocr"} 2"#,
                    r#"turnstile_package_remaining_points{package="od"} 3"#,
                ]
            };
            assert_eq!(got, want, "after the reload, tenant label {tenant_label}");
        }
    }

    /// `turnstile_image_search_images` without the tenant label: one series, every tenant's
    /// count added (not the count of whichever tenant's instance changed last).
    #[test]
    fn without_the_tenant_label_the_image_count_is_the_sum_over_tenants() {
        for tenant_label in [true, false] {
            let m = Metrics::new(tenant_label);
            m.image_gauge("acme").set(3);
            m.image_gauge("beta").set(4);
            m.image_gauge("acme").set(5);
            let got = lines(&m.render(), "turnstile_image_search_images");
            let want: &[&str] = if tenant_label {
                &[
                    r#"turnstile_image_search_images{tenant="acme"} 5"#,
                    r#"turnstile_image_search_images{tenant="beta"} 4"#,
                ]
            } else {
                &["turnstile_image_search_images 9"]
            };
            assert_eq!(got, want, "tenant label {tenant_label}");
        }
    }

    #[test]
    fn a_pair_counted_from_many_threads_counts_every_call_and_instances_stay_apart() {
        let (a, b) = (Arc::new(Metrics::new(true)), Metrics::new(true));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let a = a.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        a.request_pair(7, "acme", "ocr", Outcome::Admitted);
                        a.billed(7, "acme", "ocr", 3, 1.0);
                    }
                })
            })
            .collect();
        // The same key in another instance, on this thread between its calls: its own counts.
        for _ in 0..3 {
            b.request_pair(7, "acme", "ocr", Outcome::Admitted);
            a.request_pair(7, "acme", "ocr", Outcome::Admitted);
        }
        for t in threads {
            t.join().unwrap();
        }
        let got = |m: &Metrics, series: &str| lines(&m.render(), series);
        assert_eq!(
            got(&a, "turnstile_requests_total{"),
            ["turnstile_requests_total{feature=\"ocr\",outcome=\"admitted\",tenant=\"acme\"} 80003"]
        );
        assert_eq!(
            got(&a, "turnstile_billed_units_total{"),
            ["turnstile_billed_units_total{feature=\"ocr\",payer=\"payg\",tenant=\"acme\"} 80000"]
        );
        assert_eq!(
            got(&b, "turnstile_requests_total{"),
            ["turnstile_requests_total{feature=\"ocr\",outcome=\"admitted\",tenant=\"acme\"} 3"]
        );
    }

    #[test]
    fn sharded_histograms_render_as_a_prometheus_histogram_of_the_same_observations() {
        let m = Arc::new(Metrics::new(true));
        let reference = Histogram::with_opts(
            HistogramOpts::new(
                "turnstile_upstream_duration_seconds",
                "Time the upstream took to answer with a response head",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .unwrap();
        let values: Vec<f64> = (0..2_000).map(|i| f64::from(i % 97) * 0.000_37 + f64::from(i % 5) * 0.9).collect();
        // From more threads than there are shards: some share one.
        let threads: Vec<_> = (0..SHARDS + 3)
            .map(|t| {
                let (m, reference, values) = (m.clone(), reference.clone(), values.clone());
                std::thread::spawn(move || {
                    for v in values.iter().skip(t % 7) {
                        m.upstream_duration.observe(*v);
                        m.observe_duration(Outcome::Throttled, *v);
                        reference.observe(*v);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let registry = Registry::new();
        registry.register(Box::new(reference.clone())).unwrap();
        let mut want = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut want).unwrap();
        let want = String::from_utf8(want).unwrap();
        let got = m.render();
        let name = "turnstile_upstream_duration_seconds";
        // The sums were added in another order: equal to within rounding.
        let (sum, rest): (Vec<String>, Vec<String>) = lines(&got, name).into_iter().partition(|l| l.contains("_sum"));
        let (want_sum, want_rest): (Vec<String>, Vec<String>) =
            lines(&want, name).into_iter().partition(|l| l.contains("_sum"));
        assert_eq!(rest, want_rest);
        let value = |l: &[String]| l[0].rsplit(' ').next().unwrap().parse::<f64>().unwrap();
        assert!((value(&sum) - value(&want_sum)).abs() < 1e-6, "{sum:?} {want_sum:?}");
        assert!(got.contains("# TYPE turnstile_upstream_duration_seconds histogram"));
        // The outcome's histogram: the same buckets, under its label; the others are empty.
        let count = reference.get_sample_count();
        assert!(
            got.contains(&format!("turnstile_request_duration_seconds_count{{outcome=\"throttled\"}} {count}")),
            "{got}"
        );
        assert!(got.contains("turnstile_request_duration_seconds_count{outcome=\"admitted\"} 0"), "{got}");
    }
}
