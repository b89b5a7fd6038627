//! `turnstile.toml`: listeners, upstream, identity, admission defaults, billing, ledger, metrics,
//! files and routes (SPEC §3.1).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use chrono::FixedOffset;
use http::header::HeaderName;
use http::Uri;
use rust_decimal::Decimal;
use serde::Deserialize;

use super::{Dec, Errs};
use crate::catalog::{Catalog, IMAGE_SEARCH};

#[derive(Debug, Deserialize)]
pub struct RawGateway {
    pub server: RawServer,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub admission: RawAdmission,
    #[serde(default)]
    pub billing: RawBilling,
    #[serde(default)]
    pub ledger: RawLedger,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub files: RawFiles,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub cluster: RawCluster,
}

#[derive(Debug, Deserialize)]
pub struct RawServer {
    #[serde(default = "d_listen")]
    pub listen: String,
    #[serde(default = "d_admin_listen")]
    pub admin_listen: String,
    pub upstream: String,
    #[serde(default = "d_upstream_timeout")]
    pub upstream_timeout_ms: u64,
    #[serde(default = "d_header_timeout")]
    pub header_read_timeout_ms: u64,
    #[serde(default = "d_max_body")]
    pub max_request_body_bytes: u64,
    #[serde(default = "d_max_connections")]
    pub max_connections: u64,
    #[serde(default = "d_body_read_timeout")]
    pub body_read_timeout_ms: u64,
    #[serde(default = "d_shutdown_grace")]
    pub shutdown_grace_ms: u64,
    #[serde(default = "d_upstream_protocol")]
    pub upstream_protocol: String,
}
fn d_upstream_protocol() -> String {
    "http1".into()
}
fn d_listen() -> String {
    "127.0.0.1:8080".into()
}
fn d_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn d_upstream_timeout() -> u64 {
    30_000
}
fn d_header_timeout() -> u64 {
    5_000
}
fn d_max_body() -> u64 {
    33_554_432
}
fn d_max_connections() -> u64 {
    10_000
}
fn d_body_read_timeout() -> u64 {
    30_000
}
/// After SIGTERM, how long the gateway keeps serving with `/readyz` at 503 before it stops
/// accepting: time for Kubernetes (or a load balancer) to take it out of its endpoints. 5 s is
/// Istio's `terminationDrainDuration` default and covers the usual endpoint propagation.
fn d_shutdown_grace() -> u64 {
    5_000
}
/// The most `server.shutdown_grace_ms` may be (10 minutes): beyond it, a typo.
pub const SHUTDOWN_GRACE_CAP_MS: u64 = 600_000;
/// The most `server.max_connections` may be: beyond any file-descriptor limit a process gets.
pub const MAX_CONNECTIONS_CAP: u64 = 1_000_000;

#[derive(Debug, Deserialize)]
pub struct RawIdentity {
    #[serde(default = "d_key_header")]
    pub api_key_header: String,
}
impl Default for RawIdentity {
    fn default() -> Self {
        RawIdentity { api_key_header: d_key_header() }
    }
}
fn d_key_header() -> String {
    "x-api-key".into()
}

#[derive(Debug, Deserialize)]
pub struct RawAdmission {
    #[serde(default = "d_default_qps")]
    pub default_qps: u32,
    #[serde(default = "d_burst")]
    pub burst_seconds: f64,
    #[serde(default = "d_mode")]
    pub mode: String,
}
impl Default for RawAdmission {
    fn default() -> Self {
        RawAdmission { default_qps: d_default_qps(), burst_seconds: d_burst(), mode: d_mode() }
    }
}
fn d_default_qps() -> u32 {
    2
}
fn d_burst() -> f64 {
    1.0
}
fn d_mode() -> String {
    "enforce".into()
}

#[derive(Debug, Deserialize)]
pub struct RawBilling {
    #[serde(default = "d_tz")]
    pub timezone: String,
    #[serde(default = "d_ratio")]
    pub low_balance_ratio: Dec,
    #[serde(default)]
    pub alert_webhook: String,
}
impl Default for RawBilling {
    fn default() -> Self {
        RawBilling { timezone: d_tz(), low_balance_ratio: d_ratio(), alert_webhook: String::new() }
    }
}
fn d_tz() -> String {
    "+08:00".into()
}
fn d_ratio() -> Dec {
    Dec(Decimal::new(2, 1))
}

#[derive(Debug, Deserialize)]
pub struct RawLedger {
    #[serde(default = "d_ledger_dir")]
    pub dir: String,
    #[serde(default = "d_durability")]
    pub durability: String,
    #[serde(default = "d_flush")]
    pub flush_interval_ms: u64,
    #[serde(default = "d_strict_timeout")]
    pub strict_timeout_ms: u64,
}
impl Default for RawLedger {
    fn default() -> Self {
        RawLedger {
            dir: d_ledger_dir(),
            durability: d_durability(),
            flush_interval_ms: d_flush(),
            strict_timeout_ms: d_strict_timeout(),
        }
    }
}
fn d_ledger_dir() -> String {
    "data/ledger".into()
}
fn d_durability() -> String {
    "batched".into()
}
fn d_flush() -> u64 {
    5
}
fn d_strict_timeout() -> u64 {
    2000
}

/// `[cluster]` (SPEC §11).
#[derive(Debug, Deserialize)]
pub struct RawCluster {
    #[serde(default = "d_store")]
    pub store: String,
    #[serde(default)]
    pub redis: Vec<String>,
    #[serde(default = "d_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "d_hold_lease")]
    pub hold_lease_ms: u64,
    #[serde(default = "d_on_store_error")]
    pub on_store_error: String,
    #[serde(default = "d_expected_replicas")]
    pub expected_replicas: u32,
}
impl Default for RawCluster {
    fn default() -> Self {
        RawCluster {
            store: d_store(),
            redis: Vec::new(),
            key_prefix: d_key_prefix(),
            hold_lease_ms: d_hold_lease(),
            on_store_error: d_on_store_error(),
            expected_replicas: d_expected_replicas(),
        }
    }
}
fn d_store() -> String {
    "local".into()
}
fn d_key_prefix() -> String {
    "turnstile".into()
}
fn d_hold_lease() -> u64 {
    60_000
}
fn d_on_store_error() -> String {
    "deny".into()
}
fn d_expected_replicas() -> u32 {
    1
}

#[derive(Debug, Deserialize)]
pub struct RawMetrics {
    #[serde(default = "d_true")]
    pub tenant_label: bool,
}
impl Default for RawMetrics {
    fn default() -> Self {
        RawMetrics { tenant_label: true }
    }
}
fn d_true() -> bool {
    true
}

#[derive(Debug, Deserialize)]
pub struct RawFiles {
    #[serde(default = "d_catalog")]
    pub catalog: String,
    #[serde(default = "d_entitlements")]
    pub entitlements: String,
    #[serde(default = "d_true")]
    pub watch: bool,
}
impl Default for RawFiles {
    fn default() -> Self {
        RawFiles { catalog: d_catalog(), entitlements: d_entitlements(), watch: true }
    }
}
fn d_catalog() -> String {
    "catalog.toml".into()
}
fn d_entitlements() -> String {
    "entitlements.json".into()
}

#[derive(Debug, Deserialize)]
pub struct RawRoute {
    pub path: String,
    pub feature: String,
    pub op: Option<String>,
}

/// Reads only `[files]`, leniently, to find the other two files before full validation.
pub fn peek_files(text: &str) -> Option<RawFiles> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(default)]
        files: RawFilesLenient,
    }
    #[derive(Deserialize, Default)]
    struct RawFilesLenient {
        catalog: Option<String>,
        entitlements: Option<String>,
    }
    let p: Peek = toml::from_str(text).ok()?;
    Some(RawFiles {
        catalog: p.files.catalog.unwrap_or_else(d_catalog),
        entitlements: p.files.entitlements.unwrap_or_else(d_entitlements),
        watch: true,
    })
}

/// `[admission].mode` (SPEC §5.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionMode {
    /// 429 and 402 are answered.
    Enforce,
    /// A request that would get 429 `qps_exceeded` or 402 `payment_required` is forwarded
    /// instead, and counted as `shadow_throttled` / `shadow_payment_required`.
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    Batched,
    Strict,
}

/// How the gateway talks to the upstream (`[server].upstream_protocol`, SPEC §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with a keep-alive pool (the default).
    Http1,
    /// Cleartext HTTP/2 with prior knowledge: one multiplexed connection; what gRPC needs.
    H2c,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ImageOp {
    Search,
    Add,
    Delete,
}

#[derive(Debug, Clone)]
pub struct Route {
    /// The exact path, or for a prefix route the prefix including its trailing `/`.
    pub path: String,
    pub prefix: bool,
    pub feature: usize,
    pub op: Option<ImageOp>,
}

/// Where limits and balances live (SPEC §11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// In this process (DashMap + redb): the embedded default.
    Local,
    /// Shared by every replica through Redis or a Redis Cluster.
    Redis,
}

/// What a replica does while Redis cannot be reached (SPEC §11.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 `store_unavailable`, nothing charged.
    Deny,
    /// Admit at `limit / expected_replicas`, charge locally, replay later.
    Local,
}

/// Validated `[cluster]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    pub store: StoreKind,
    /// One URL: a single server; several: Redis Cluster seed nodes.
    pub redis: Vec<String>,
    pub key_prefix: String,
    pub hold_lease: Duration,
    pub on_store_error: OnStoreError,
    pub expected_replicas: u32,
}

/// Validated gateway settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub upstream: Uri,
    pub upstream_timeout: Duration,
    pub upstream_protocol: UpstreamProtocol,
    pub header_read_timeout: Duration,
    pub max_request_body_bytes: u64,
    /// Open tenant connections at most; read at start (a reload warns that it needs a restart).
    pub max_connections: usize,
    /// Longest wait for the next piece of a request body (nginx `client_body_timeout`).
    pub body_read_timeout: Duration,
    /// After SIGTERM: serve on with `/readyz` at 503 this long before the listener closes.
    pub shutdown_grace: Duration,
    pub api_key_header: HeaderName,
    pub default_qps: u32,
    pub burst_seconds: f64,
    /// Shadow mode for every tenant (a tenant's own `shadow` flag turns it on for that tenant).
    pub admission_mode: AdmissionMode,
    pub timezone: FixedOffset,
    pub low_balance_ratio: Decimal,
    pub alert_webhook: Option<Uri>,
    pub ledger_dir: PathBuf,
    pub durability: Durability,
    pub flush_interval: Duration,
    /// Strict mode: the longest a 2xx waits for its charge to be durable (SPEC §7).
    pub strict_timeout: Duration,
    pub tenant_label: bool,
    pub watch: bool,
    pub cluster: ClusterSettings,
}

fn parse_addr(errs: &mut Errs<'_>, path: &str, s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|e| {
        errs.push(path, format!("{s:?} is not an address like \"127.0.0.1:8080\" ({e})"));
        SocketAddr::from(([127, 0, 0, 1], 0))
    })
}

fn parse_http_uri(errs: &mut Errs<'_>, path: &str, s: &str) -> Option<Uri> {
    match s.parse::<Uri>() {
        Ok(u) if u.scheme_str() == Some("http") && u.authority().is_some() && u.query().is_none() => Some(u),
        Ok(_) => {
            errs.push(path, format!("{s:?} must be an http:// URL with a host and port and no query"));
            None
        }
        Err(e) => {
            errs.push(path, format!("{s:?} is not a URL ({e})"));
            None
        }
    }
}

fn positive_ms(errs: &mut Errs<'_>, path: &str, ms: u64) -> Duration {
    if ms == 0 {
        errs.push(path, "must be at least 1");
    }
    Duration::from_millis(ms)
}

fn compile_cluster(c: &RawCluster, upstream_timeout_ms: u64, errs: &mut Errs<'_>) -> ClusterSettings {
    let store = match c.store.as_str() {
        "local" => StoreKind::Local,
        "redis" => StoreKind::Redis,
        other => {
            errs.push("cluster.store", format!("{other:?} must be \"local\" or \"redis\""));
            StoreKind::Local
        }
    };
    for (i, url) in c.redis.iter().enumerate() {
        // redis-rs parses it as it will connect; TLS (rediss://) is not built in.
        let parsed = if url.starts_with("redis://") {
            redis::IntoConnectionInfo::into_connection_info(url.as_str()).map(|_| ()).map_err(|e| e.to_string())
        } else {
            Err("only redis:// URLs are supported".to_string())
        };
        if let Err(e) = parsed {
            errs.push(
                format!("cluster.redis[{i}]"),
                format!("{url:?} is not a Redis URL like \"redis://127.0.0.1:6379\" ({e})"),
            );
        }
    }
    if store == StoreKind::Redis && c.redis.is_empty() {
        errs.push("cluster.redis", "store = \"redis\" needs at least one URL, like [\"redis://127.0.0.1:6379\"]");
    }
    // `{` and `}` would change the hash tag that keeps a tenant's keys in one slot.
    if c.key_prefix.is_empty() || c.key_prefix.contains(['{', '}']) || c.key_prefix.contains(char::is_whitespace) {
        errs.push("cluster.key_prefix", format!("{:?} must be non-empty, without braces or spaces", c.key_prefix));
    }
    let hold_lease = positive_ms(errs, "cluster.hold_lease_ms", c.hold_lease_ms);
    if store == StoreKind::Redis && c.hold_lease_ms != 0 && c.hold_lease_ms <= upstream_timeout_ms {
        errs.push(
            "cluster.hold_lease_ms",
            format!(
                "{} must exceed server.upstream_timeout_ms ({upstream_timeout_ms}): a hold would be given back while its call is still upstream",
                c.hold_lease_ms
            ),
        );
    }
    let on_store_error = match c.on_store_error.as_str() {
        "deny" => OnStoreError::Deny,
        "local" => OnStoreError::Local,
        other => {
            errs.push("cluster.on_store_error", format!("{other:?} must be \"deny\" or \"local\""));
            OnStoreError::Deny
        }
    };
    if c.expected_replicas == 0 {
        errs.push("cluster.expected_replicas", "must be at least 1");
    }
    ClusterSettings {
        store,
        redis: c.redis.clone(),
        key_prefix: c.key_prefix.clone(),
        hold_lease,
        on_store_error,
        expected_replicas: c.expected_replicas.max(1),
    }
}

pub fn compile(raw: RawGateway, catalog: &Catalog, errs: &mut Errs<'_>) -> Option<(Settings, Vec<Route>)> {
    let s = &raw.server;
    let listen = parse_addr(errs, "server.listen", &s.listen);
    let admin_listen = parse_addr(errs, "server.admin_listen", &s.admin_listen);
    // The same port on the same address, or on a wildcard address that covers the other (a
    // `[::]` wildcard covers IPv4 too): the second listener cannot bind.
    let covers = |w: std::net::IpAddr, o: std::net::IpAddr| w.is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    let (a, b) = (listen.ip(), admin_listen.ip());
    if listen.port() == admin_listen.port() && listen.port() != 0 && (a == b || covers(a, b) || covers(b, a)) {
        errs.push("server.admin_listen", "must differ from server.listen (same port on an overlapping address)");
    }
    let upstream = parse_http_uri(errs, "server.upstream", &s.upstream);
    let upstream_timeout = positive_ms(errs, "server.upstream_timeout_ms", s.upstream_timeout_ms);
    let header_read_timeout = positive_ms(errs, "server.header_read_timeout_ms", s.header_read_timeout_ms);
    let upstream_protocol = match s.upstream_protocol.as_str() {
        "http1" => UpstreamProtocol::Http1,
        "h2c" => UpstreamProtocol::H2c,
        other => {
            errs.push("server.upstream_protocol", format!("{other:?} must be \"http1\" or \"h2c\""));
            UpstreamProtocol::Http1
        }
    };
    if s.max_request_body_bytes == 0 {
        errs.push("server.max_request_body_bytes", "must be at least 1");
    }
    if !(1..=MAX_CONNECTIONS_CAP).contains(&s.max_connections) {
        errs.push("server.max_connections", format!("must be at least 1 and at most {MAX_CONNECTIONS_CAP}"));
    }
    let body_read_timeout = positive_ms(errs, "server.body_read_timeout_ms", s.body_read_timeout_ms);
    if s.shutdown_grace_ms > SHUTDOWN_GRACE_CAP_MS {
        errs.push(
            "server.shutdown_grace_ms",
            format!("must be at most {SHUTDOWN_GRACE_CAP_MS} (10 minutes; 0 turns the grace off)"),
        );
    }
    let shutdown_grace = Duration::from_millis(s.shutdown_grace_ms.min(SHUTDOWN_GRACE_CAP_MS));
    let api_key_header = HeaderName::from_bytes(raw.identity.api_key_header.as_bytes()).unwrap_or_else(|_| {
        errs.push("identity.api_key_header", format!("{:?} is not a valid header name", raw.identity.api_key_header));
        HeaderName::from_static("x-api-key")
    });
    if api_key_header == http::header::AUTHORIZATION || api_key_header.as_str().starts_with("x-turnstile-") {
        errs.push("identity.api_key_header", "must not be Authorization (always accepted) or an x-turnstile-* header");
    }
    let a = &raw.admission;
    if let Some(e) = crate::units::qps_out_of_range(a.default_qps) {
        errs.push("admission.default_qps", e);
    }
    if !(a.burst_seconds.is_finite() && a.burst_seconds > 0.0 && a.burst_seconds <= 3600.0) {
        errs.push("admission.burst_seconds", format!("{} must be above 0 and at most 3600", a.burst_seconds));
    }
    let admission_mode = match a.mode.as_str() {
        "enforce" => AdmissionMode::Enforce,
        "shadow" => AdmissionMode::Shadow,
        other => {
            errs.push("admission.mode", format!("{other:?} must be \"enforce\" or \"shadow\""));
            AdmissionMode::Enforce
        }
    };
    let b = &raw.billing;
    let timezone = crate::time::parse_offset(&b.timezone).unwrap_or_else(|e| {
        errs.push("billing.timezone", e);
        FixedOffset::east_opt(0).unwrap_or_else(|| unreachable!())
    });
    let ratio = b.low_balance_ratio.0;
    if ratio <= Decimal::ZERO || ratio >= Decimal::ONE {
        errs.push("billing.low_balance_ratio", format!("{ratio} must be above 0 and below 1"));
    }
    let alert_webhook =
        if b.alert_webhook.is_empty() { None } else { parse_http_uri(errs, "billing.alert_webhook", &b.alert_webhook) };
    let l = &raw.ledger;
    let durability = match l.durability.as_str() {
        "batched" => Durability::Batched,
        "strict" => Durability::Strict,
        other => {
            errs.push("ledger.durability", format!("{other:?} must be \"batched\" or \"strict\""));
            Durability::Batched
        }
    };
    if l.dir.trim().is_empty() {
        errs.push("ledger.dir", "must not be empty");
    }
    let flush_interval = positive_ms(errs, "ledger.flush_interval_ms", l.flush_interval_ms);
    let strict_timeout = positive_ms(errs, "ledger.strict_timeout_ms", l.strict_timeout_ms);
    let cluster = compile_cluster(&raw.cluster, s.upstream_timeout_ms, errs);

    let mut routes: Vec<Route> = Vec::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        if !r.path.starts_with('/') {
            errs.push(format!("{p}.path"), format!("{:?} must start with /", r.path));
            continue;
        }
        let (path, prefix) = match r.path.strip_suffix('*') {
            Some(pre) if pre.ends_with('/') => (pre.to_string(), true),
            Some(_) => {
                errs.push(format!("{p}.path"), format!("{:?}: a prefix must end in \"/*\"", r.path));
                continue;
            }
            None => (r.path.clone(), false),
        };
        if r.path[..r.path.len() - usize::from(prefix)].contains('*') {
            errs.push(format!("{p}.path"), format!("{:?}: * is allowed only as the final \"/*\"", r.path));
        }
        // Requests are routed on their normal form (SPEC §4), so a route must be written in it.
        match crate::path::normalize(&path) {
            Ok(n) if n == path => {}
            Ok(n) => {
                let star = if prefix { "*" } else { "" };
                let msg = format!(
                    "{:?} could never match (requests are routed on their normalized path): write {:?}",
                    r.path,
                    format!("{n}{star}")
                );
                errs.push(format!("{p}.path"), msg)
            }
            Err(why) => errs.push(format!("{p}.path"), format!("{:?} could never match: {why}", r.path)),
        }
        if let Some(j) = routes.iter().position(|x| x.path == path && x.prefix == prefix) {
            errs.push(format!("{p}.path"), format!("{:?} repeats routes[{j}] and could never match", r.path));
        }
        let Some(&feature) = catalog.feature_index.get(&r.feature) else {
            errs.push(format!("{p}.feature"), format!("unknown feature {:?} (not in the catalog)", r.feature));
            continue;
        };
        let op = match (r.feature == IMAGE_SEARCH, r.op.as_deref()) {
            (true, Some("search")) => Some(ImageOp::Search),
            (true, Some("add")) => Some(ImageOp::Add),
            (true, Some("delete")) => Some(ImageOp::Delete),
            (true, Some(o)) => {
                errs.push(format!("{p}.op"), format!("{o:?} must be \"search\", \"add\" or \"delete\""));
                None
            }
            (true, None) => {
                errs.push(format!("{p}.op"), "image-search routes need op = \"search\", \"add\" or \"delete\"");
                None
            }
            (false, Some(_)) => {
                errs.push(format!("{p}.op"), "only image-search routes take an op");
                None
            }
            (false, None) => None,
        };
        routes.push(Route { path, prefix, feature, op });
    }

    Some((
        Settings {
            listen,
            admin_listen,
            upstream: upstream?,
            upstream_timeout,
            upstream_protocol,
            header_read_timeout,
            max_request_body_bytes: s.max_request_body_bytes,
            max_connections: usize::try_from(s.max_connections.clamp(1, MAX_CONNECTIONS_CAP)).unwrap_or(10_000),
            body_read_timeout,
            shutdown_grace,
            api_key_header,
            default_qps: a.default_qps,
            burst_seconds: a.burst_seconds,
            admission_mode,
            timezone,
            low_balance_ratio: ratio,
            alert_webhook,
            ledger_dir: PathBuf::from(&l.dir),
            durability,
            flush_interval,
            strict_timeout,
            tenant_label: raw.metrics.tenant_label,
            watch: raw.files.watch,
            cluster,
        },
        routes,
    ))
}
