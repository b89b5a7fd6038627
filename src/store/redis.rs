//! The Redis backend of the store (SPEC §11, `STORE.md`): one Redis server or a Redis Cluster
//! shared by every replica.
//!
//! Every key is `{prefix}:{<tenant>}:…`: the hash tag puts one tenant's keys in one slot, so each
//! Lua script (`src/store/lua/*.lua`, run by EVALSHA through [`redis::Script`]) touches one slot
//! and is atomic on the node that serves it. Quantities are integers (micro-points, calls, ms);
//! the scripts format every number they write with `%.0f`, so nothing passes through Lua's
//! 14-digit number printing.
//!
//! Keys of tenant `t` (`P` = `{prefix}:{t}:`):
//! - `Pb:<bucket>` hash `tat` (µs, Redis `TIME`), `shape` (`limit:depth`); expires once full.
//! - `Pp:<package>` hash `consumed`, `held` (micro-points).
//! - `Ph:<id>` hash `pkg` (package key), `pid`, `pts`, `idx`: a hold; `Pholds` zset id → lease end.
//! - `Pm:<YYYY-MM>:<feature>` hash field → units; `Pmi:<YYYY-MM>` set of features of the month.
//! - `Pdone:<id>[:<part>]` the first answer of a settlement, with a TTL (idempotency marker).
//! - `Palerted` hash package → 1 (HSETNX: an alert fires once in the cluster).
//! - `Pimg` hash `count`, `held`; `Pimgslots` zset id → lease end.
//! - `Pov` hash feature → JSON list of overrides; `{prefix}:ov:tenants` set (global) and
//!   PUBLISH on `{prefix}:overrides`.
//!
//! GCRA is governor's (`t` = 1 s / limit, `tau` = t × (depth − 1); admitted when
//! `now ≥ tat − tau`, then `tat = max(tat, now) + t`), kept in whole microseconds: `t` is
//! `floor(1e6 / limit)` µs where governor has `floor(1e9 / limit)` ns, under 1 µs apart per token.
//!
//! Every call is bounded by `op_timeout` (SPEC §11.6: never hang a request on a dead
//! connection); the connection manager and the cluster client reconnect by themselves.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashSet;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};

/// Holds and slots swept per script call: bounded work, repeated while there is more.
const SWEEP_BATCH: usize = 256;

/// Errors of the Redis backend (mapped onto the store's error by the trait impls).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisStoreError {
    #[error("redis unavailable during {op}: {reason}")]
    Unavailable { op: &'static str, reason: String },
    #[error("redis did not answer {op} within {ms} ms")]
    Timeout { op: &'static str, ms: u64 },
    #[error("redis answered {op} with an unexpected value: {reason}")]
    Corrupt { op: &'static str, reason: String },
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct RedisOpts {
    /// Every key starts with it.
    pub key_prefix: String,
    /// Bound on every store call, connection included.
    pub op_timeout: Duration,
    /// How long a settlement's first answer is kept for replays of the same request id.
    pub done_ttl: Duration,
}

impl Default for RedisOpts {
    fn default() -> Self {
        RedisOpts {
            key_prefix: "turnstile".into(),
            op_timeout: Duration::from_millis(500),
            done_ttl: Duration::from_secs(3600),
        }
    }
}

/// A single server (reconnecting manager) or a Redis Cluster (slot-routing client).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(&'a mut self, p: &'a Pipeline, offset: usize, count: usize) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(p, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(p, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

struct Scripts {
    admit: Script,
    refund: Script,
    settle: Script,
    take: Script,
    sweep: Script,
    image_slot: Script,
    month: Script,
}

impl Scripts {
    fn new() -> Self {
        Scripts {
            admit: Script::new(include_str!("lua/admit.lua")),
            refund: Script::new(include_str!("lua/refund.lua")),
            settle: Script::new(include_str!("lua/settle.lua")),
            take: Script::new(include_str!("lua/take.lua")),
            sweep: Script::new(include_str!("lua/sweep.lua")),
            image_slot: Script::new(include_str!("lua/image_slot.lua")),
            month: Script::new(include_str!("lua/month.lua")),
        }
    }
}

/// The answer of an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// `Ok((remaining, reset_secs))` or `Err(retry_after)`, as the rate store answers.
    pub admit: Result<(u32, u64), Duration>,
    /// The index of the candidate that holds the call's points (admitted calls only).
    pub hold: Option<usize>,
}

/// What a settlement did (see `lua/settle.lua`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    /// A replay: the first answer of this request id, nothing applied again.
    pub replay: bool,
    /// The hold was committed or released by this settlement (false: none was there).
    pub hold: bool,
    /// The package's consumption after a commit.
    pub consumed: Option<i64>,
    /// The usage cell's total after the add.
    pub cell_total: Option<i64>,
    /// The low-balance alert fired now (first time in the cluster).
    pub alert_fired: bool,
    /// The image count after the image part.
    pub images: Option<u64>,
}

/// Hold action of a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldAction {
    None,
    Commit,
    Release,
}

/// Image part of a settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImagePart {
    None,
    /// An add answered 2xx: its slot becomes an image.
    Add,
    /// A delete answered 2xx: one image fewer (never below 0).
    Delete,
    /// The upstream reported the count: it wins.
    Set(u64),
    /// Only give the slot back.
    Release,
}

/// One settlement's parts (every one optional).
#[derive(Debug, Clone, Copy)]
pub struct Settle<'a> {
    pub hold: HoldAction,
    /// Fire the held package's alert when its consumption reaches this (micro-points).
    pub alert_at: Option<i64>,
    /// (feature, month `YYYY-MM`, field, units) added to the month.
    pub usage: Option<(&'a str, &'a str, &'a str, i64)>,
    pub image: ImagePart,
    /// Distinguishes several settlements of one request id (the marker is per part).
    pub part: &'a str,
}

/// One candidate of a take (video minutes).
#[derive(Debug, Clone, Copy)]
pub struct TakeFrom<'a> {
    pub package: &'a str,
    pub points: i64,
    pub want: i64,
    pub alert_at: Option<i64>,
}

/// What a take took from one candidate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Took {
    pub taken: i64,
    pub consumed: i64,
    pub alert_fired: bool,
}

/// The Redis store. Cheap to clone (connections are multiplexed).
#[derive(Clone)]
pub struct RedisStore {
    conn: Conn,
    opts: Arc<RedisOpts>,
    scripts: Arc<Scripts>,
    /// Tenants whose holds this replica sweeps: those it reserved for, plus
    /// [`RedisStore::set_tenants`] (every configured tenant, so a survivor gives back a dead
    /// replica's holds).
    tenants: Arc<DashSet<String>>,
    metrics: Option<StoreMetrics>,
}

/// The store metrics of SPEC §10 (`op`: admit, settle, sweep, sync), to register on the
/// gateway's registry.
#[derive(Clone)]
pub struct StoreMetrics {
    pub errors: IntCounterVec,
    pub duration: HistogramVec,
}

impl StoreMetrics {
    pub fn new() -> prometheus::Result<StoreMetrics> {
        let errors = IntCounterVec::new(
            Opts::new("turnstile_store_errors_total", "Store calls that failed or timed out (cluster mode)"),
            &["op"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new("turnstile_store_duration_seconds", "Store call duration, round trip included (cluster mode)")
                .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]),
            &["op"],
        )?;
        Ok(StoreMetrics { errors, duration })
    }

    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.errors.clone()))?;
        registry.register(Box::new(self.duration.clone()))
    }
}

fn redis_err(op: &'static str, e: redis::RedisError) -> RedisStoreError {
    RedisStoreError::Unavailable { op, reason: e.to_string() }
}

fn as_i64(op: &'static str, v: &Value) -> Result<i64, RedisStoreError> {
    match v {
        Value::Int(n) => Ok(*n),
        Value::BulkString(b) => std::str::from_utf8(b)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| RedisStoreError::Corrupt { op, reason: format!("not an integer: {:?}", String::from_utf8_lossy(b)) }),
        Value::Nil => Ok(0),
        other => Err(RedisStoreError::Corrupt { op, reason: format!("not an integer: {other:?}") }),
    }
}

fn ints(op: &'static str, v: Value, at_least: usize) -> Result<Vec<i64>, RedisStoreError> {
    let Value::Array(items) = v else {
        return Err(RedisStoreError::Corrupt { op, reason: format!("not an array: {v:?}") });
    };
    let out = items.iter().map(|i| as_i64(op, i)).collect::<Result<Vec<_>, _>>()?;
    if out.len() < at_least {
        return Err(RedisStoreError::Corrupt { op, reason: format!("{} values, wanted {at_least}", out.len()) });
    }
    Ok(out)
}

impl RedisStore {
    /// Connects to one server (one URL) or a Redis Cluster (several), within `op_timeout`.
    pub async fn connect(urls: &[String], opts: RedisOpts) -> Result<RedisStore, RedisStoreError> {
        let op = "connect";
        let timeout = opts.op_timeout;
        let conn = match urls {
            [] => return Err(RedisStoreError::Unavailable { op, reason: "no Redis URL configured".into() }),
            [one] => {
                let client = redis::Client::open(one.as_str()).map_err(|e| redis_err(op, e))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_millis(500));
                let fut = ConnectionManager::new_with_config(client, config);
                Conn::Single(bounded(op, timeout, fut).await?)
            }
            several => {
                let client = ClusterClientBuilder::new(several.iter().map(String::as_str))
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(2)
                    .build()
                    .map_err(|e| redis_err(op, e))?;
                Conn::Cluster(bounded(op, timeout, client.get_async_connection()).await?)
            }
        };
        Ok(RedisStore { conn, opts: Arc::new(opts), scripts: Arc::new(Scripts::new()), tenants: Arc::new(DashSet::new()), metrics: None })
    }

    /// Counts and times every call in `m`.
    pub fn with_metrics(mut self, m: StoreMetrics) -> Self {
        self.metrics = Some(m);
        self
    }

    /// `{prefix}:{tenant}:`: the hash tag makes every key of a tenant one slot.
    pub fn tenant_prefix(&self, tenant: &str) -> String {
        format!("{}:{{{}}}:", self.opts.key_prefix, tenant)
    }

    fn key(&self, tenant: &str, rest: &str) -> String {
        let mut k = self.tenant_prefix(tenant);
        k.push_str(rest);
        k
    }

    fn done_ttl_ms(&self) -> u64 {
        u64::try_from(self.opts.done_ttl.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// Tenants to sweep besides those this replica reserved for.
    pub fn set_tenants<'a>(&self, tenants: impl IntoIterator<Item = &'a str>) {
        for t in tenants {
            if !self.tenants.contains(t) {
                self.tenants.insert(t.to_string());
            }
        }
    }

    fn note_tenant(&self, tenant: &str) {
        if !self.tenants.contains(tenant) {
            self.tenants.insert(tenant.to_string());
        }
    }

    /// One GCRA admission and, when `hold` is given, the call's package hold, in one round trip.
    /// `hold`: (candidates as (package id, points), want, id, lease, give the token back when no
    /// candidate can hold `want`).
    pub async fn admit_and_hold(
        &self,
        tenant: &str,
        bucket: Option<(&str, u32, u32)>,
        hold: Option<(&[(&str, i64)], i64, u128, Duration, bool)>,
    ) -> Result<Admission, RedisStoreError> {
        let op = "admit";
        let mut inv = self.scripts.admit.prepare_invoke();
        let (t, tau, shape, limit, depth) = match bucket {
            Some((_, limit, depth)) => {
                let t = 1_000_000 / u64::from(limit.max(1));
                (t, t * u64::from(depth.max(1) - 1), format!("{limit}:{depth}"), limit.max(1), depth.max(1))
            }
            None => (0, 0, String::new(), 1, 1),
        };
        inv.key(self.key(tenant, &format!("b:{}", bucket.map_or("", |b| b.0))));
        let id = hold.map_or(0, |h| h.2);
        inv.key(self.key(tenant, "holds")).key(self.key(tenant, &format!("h:{id:032x}")));
        inv.arg(t).arg(tau).arg(&shape);
        match hold {
            Some((candidates, want, id, lease, undo)) => {
                self.note_tenant(tenant);
                for (pid, _) in candidates {
                    inv.key(self.key(tenant, &format!("p:{pid}")));
                }
                inv.arg(want).arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX)).arg(format!("{id:032x}"));
                inv.arg(if undo { "1" } else { "0" });
                for (pid, points) in candidates {
                    inv.arg(*points).arg(*pid);
                }
            }
            None => {
                inv.arg(0).arg(0).arg("").arg("0");
            }
        }
        let mut conn = self.conn.clone();
        let v: Value = self.timed(op, inv.invoke_async(&mut conn)).await?;
        let r = ints(op, v, 4)?;
        let admit = if r[0] == 1 {
            if bucket.is_some() {
                // governor's remaining_burst_capacity: min(now + tau + t − tat, tau + t) / t.
                let (tat, now) = (r[1], r[2]);
                let span = (now + tau as i64 + t as i64 - tat).clamp(0, (tau + t) as i64) as u64;
                let remaining = (span / t.max(1)).min(u64::from(depth)) as u32;
                let used = u64::from(depth - remaining);
                Ok((remaining, used.div_ceil(u64::from(limit))))
            } else {
                Ok((0, 0))
            }
        } else {
            Err(Duration::from_micros(u64::try_from(r[1]).unwrap_or(0)))
        };
        let hold = usize::try_from(r[3]).ok();
        Ok(Admission { admit, hold })
    }

    /// Takes one token of the (tenant, bucket) GCRA bucket.
    pub async fn admit(&self, tenant: &str, bucket: &str, limit: u32, depth: u32) -> Result<Result<(u32, u64), Duration>, RedisStoreError> {
        Ok(self.admit_and_hold(tenant, Some((bucket, limit, depth)), None).await?.admit)
    }

    /// Gives back one token of the same shape.
    pub async fn refund(&self, tenant: &str, bucket: &str, limit: u32, depth: u32) -> Result<(), RedisStoreError> {
        let op = "admit";
        let t = 1_000_000 / u64::from(limit.max(1));
        let mut inv = self.scripts.refund.prepare_invoke();
        inv.key(self.key(tenant, &format!("b:{bucket}"))).arg(t).arg(format!("{}:{}", limit.max(1), depth.max(1)));
        let mut conn = self.conn.clone();
        let _: i64 = self.timed(op, inv.invoke_async(&mut conn)).await?;
        Ok(())
    }

    /// Holds `want` micro-points on the first candidate that can pay them whole.
    pub async fn reserve(
        &self,
        tenant: &str,
        candidates: &[(&str, i64)],
        want: i64,
        id: u128,
        lease: Duration,
    ) -> Result<Option<usize>, RedisStoreError> {
        Ok(self.admit_and_hold(tenant, None, Some((candidates, want, id, lease, false))).await?.hold)
    }

    /// Commits, releases, adds usage, fires the alert and counts images: exactly once per
    /// (request id, part).
    pub async fn settle(&self, tenant: &str, id: u128, s: Settle<'_>) -> Result<Settled, RedisStoreError> {
        let op = "settle";
        let idh = format!("{id:032x}");
        let (feature, month, field, units) = s.usage.unwrap_or(("", "", "", 0));
        let mut inv = self.scripts.settle.prepare_invoke();
        inv.key(self.key(tenant, &format!("done:{idh}:{}", s.part)))
            .key(self.key(tenant, &format!("h:{idh}")))
            .key(self.key(tenant, "holds"))
            .key(self.key(tenant, &format!("m:{month}:{feature}")))
            .key(self.key(tenant, &format!("mi:{month}")))
            .key(self.key(tenant, "alerted"))
            .key(self.key(tenant, "img"))
            .key(self.key(tenant, "imgslots"));
        inv.arg(match s.hold {
            HoldAction::None => "",
            HoldAction::Commit => "commit",
            HoldAction::Release => "release",
        });
        inv.arg(self.done_ttl_ms()).arg(&idh);
        inv.arg(if s.usage.is_some() { field } else { "" }).arg(units).arg(feature);
        inv.arg(s.alert_at.unwrap_or(-1));
        let (img_op, reported) = match s.image {
            ImagePart::None => ("", 0),
            ImagePart::Add => ("add", 0),
            ImagePart::Delete => ("delete", 0),
            ImagePart::Set(n) => ("set", n),
            ImagePart::Release => ("release", 0),
        };
        inv.arg(img_op).arg(reported);
        let mut conn = self.conn.clone();
        let v: Value = self.timed(op, inv.invoke_async(&mut conn)).await?;
        let r = ints(op, v, 6)?;
        Ok(Settled {
            replay: r[0] == 1,
            hold: r[1] == 1,
            consumed: (r[2] >= 0 && s.hold == HoldAction::Commit && r[1] == 1).then_some(r[2]),
            cell_total: (r[3] >= 0 && s.usage.is_some()).then_some(r[3]),
            alert_fired: r[4] == 1,
            images: u64::try_from(r[5]).ok().filter(|_| s.image != ImagePart::None),
        })
    }

    /// Turns the hold of `id` into consumption; `None` when there is none (settled or swept).
    pub async fn commit(&self, tenant: &str, id: u128) -> Result<Option<i64>, RedisStoreError> {
        let s = Settle { hold: HoldAction::Commit, alert_at: None, usage: None, image: ImagePart::None, part: "c" };
        Ok(self.settle(tenant, id, s).await?.consumed)
    }

    /// Gives the hold of `id` back; a no-op when there is none.
    pub async fn release(&self, tenant: &str, id: u128) -> Result<(), RedisStoreError> {
        let s = Settle { hold: HoldAction::Release, alert_at: None, usage: None, image: ImagePart::None, part: "c" };
        self.settle(tenant, id, s).await.map(|_| ())
    }

    /// The release of a guard dropped without a commit: spawned (the lease sweep is the
    /// backstop when Redis cannot be reached).
    pub fn release_in_background(&self, tenant: &str, id: u128) {
        let (store, tenant) = (self.clone(), tenant.to_string());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release(&tenant, id).await {
                    tracing::warn!(tenant, error = %e, "hold release failed; the lease sweep gives it back");
                }
            });
        }
    }

    /// Adds `units` to a month's usage field, once per (id, part). Returns the field's total.
    pub async fn add_usage(
        &self,
        tenant: &str,
        feature: &str,
        month: &str,
        field: &str,
        units: i64,
        id: u128,
        part: &str,
    ) -> Result<i64, RedisStoreError> {
        let s = Settle { hold: HoldAction::None, alert_at: None, usage: Some((feature, month, field, units)), image: ImagePart::None, part };
        let r = self.settle(tenant, id, s).await?;
        r.cell_total.ok_or(RedisStoreError::Corrupt { op: "settle", reason: "no usage total".into() })
    }

    /// Video: from each candidate in order, up to its `want`, never past what it holds.
    pub async fn take_up_to(&self, tenant: &str, from: &[TakeFrom<'_>], id: u128) -> Result<Vec<Took>, RedisStoreError> {
        let op = "settle";
        let mut inv = self.scripts.take.prepare_invoke();
        inv.key(self.key(tenant, &format!("done:{id:032x}:take"))).key(self.key(tenant, "alerted"));
        inv.arg(self.done_ttl_ms());
        for c in from {
            inv.key(self.key(tenant, &format!("p:{}", c.package)));
            inv.arg(c.points).arg(c.want.max(0)).arg(c.alert_at.unwrap_or(-1)).arg(c.package);
        }
        let mut conn = self.conn.clone();
        let v: Value = self.timed(op, inv.invoke_async(&mut conn)).await?;
        let r = ints(op, v, 1 + 3 * from.len())?;
        Ok(r[1..].chunks(3).map(|c| Took { taken: c[0], consumed: c[1], alert_fired: c[2] == 1 }).collect())
    }

    /// Micro-points a package has consumed.
    pub async fn consumed(&self, tenant: &str, package: &str) -> Result<i64, RedisStoreError> {
        let op = "sync";
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("HGET").arg(self.key(tenant, &format!("p:{package}"))).arg("consumed").clone();
        let v: Value = self.timed(op, cmd.query_async(&mut conn)).await?;
        as_i64(op, &v)
    }

    /// Micro-points held by calls in flight on a package.
    pub async fn held(&self, tenant: &str, package: &str) -> Result<i64, RedisStoreError> {
        let op = "sync";
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("HGET").arg(self.key(tenant, &format!("p:{package}"))).arg("held").clone();
        let v: Value = self.timed(op, cmd.query_async(&mut conn)).await?;
        as_i64(op, &v)
    }

    /// Marks a package's alert fired; true only the first time, cluster-wide.
    pub async fn mark_alerted(&self, tenant: &str, package: &str) -> Result<bool, RedisStoreError> {
        let op = "settle";
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("HSETNX").arg(self.key(tenant, "alerted")).arg(package).arg(1).clone();
        let n: i64 = self.timed(op, cmd.query_async(&mut conn)).await?;
        Ok(n == 1)
    }

    /// Gives back one tenant's holds and image slots whose lease ended (Redis's clock).
    /// Returns (holds, slots) given back.
    pub async fn sweep_tenant(&self, tenant: &str) -> Result<(u64, u64), RedisStoreError> {
        let op = "sweep";
        let (mut holds, mut slots) = (0, 0);
        loop {
            let mut inv = self.scripts.sweep.prepare_invoke();
            inv.key(self.key(tenant, "holds")).key(self.key(tenant, "imgslots")).key(self.key(tenant, "img"));
            inv.arg(SWEEP_BATCH).arg(self.tenant_prefix(tenant));
            let mut conn = self.conn.clone();
            let v: Value = self.timed(op, inv.invoke_async(&mut conn)).await?;
            let r = ints(op, v, 2)?;
            holds += r[0] as u64;
            slots += r[1] as u64;
            if r[0] < SWEEP_BATCH as i64 && r[1] < SWEEP_BATCH as i64 {
                return Ok((holds, slots));
            }
        }
    }

    /// Sweeps every known tenant; returns the holds given back.
    pub async fn sweep(&self) -> Result<u64, RedisStoreError> {
        let tenants: Vec<String> = self.tenants.iter().map(|t| t.clone()).collect();
        let mut n = 0;
        for t in tenants {
            n += self.sweep_tenant(&t).await?.0;
        }
        Ok(n)
    }

    /// A month's usage: (feature, [(field, units)]) sorted by feature and field.
    pub async fn month(&self, tenant: &str, month: &str) -> Result<Vec<(String, Vec<(String, i64)>)>, RedisStoreError> {
        let op = "sync";
        let mut inv = self.scripts.month.prepare_invoke();
        inv.key(self.key(tenant, &format!("mi:{month}"))).arg(self.key(tenant, &format!("m:{month}:")));
        let mut conn = self.conn.clone();
        let v: Vec<Value> = self.timed(op, inv.invoke_async(&mut conn)).await?;
        let mut out = Vec::new();
        for pair in v.chunks(2) {
            let [f, cells] = pair else { break };
            let feature: String = redis::from_redis_value(f.clone()).map_err(|e| RedisStoreError::Corrupt { op, reason: e.to_string() })?;
            let flat: Vec<String> = redis::from_redis_value(cells.clone()).map_err(|e| RedisStoreError::Corrupt { op, reason: e.to_string() })?;
            let mut cells = Vec::new();
            for kv in flat.chunks(2) {
                let [k, n] = kv else { break };
                let n = n.parse().map_err(|_| RedisStoreError::Corrupt { op, reason: format!("{feature}.{k} = {n:?}") })?;
                cells.push((k.clone(), n));
            }
            cells.sort();
            out.push((feature, cells));
        }
        out.sort();
        Ok(out)
    }

    /// Holds one image slot when `count + held < capacity`. Idempotent on `id`.
    pub async fn reserve_image_slot(&self, tenant: &str, capacity: u64, id: u128, lease: Duration) -> Result<bool, RedisStoreError> {
        let op = "admit";
        self.note_tenant(tenant);
        let mut inv = self.scripts.image_slot.prepare_invoke();
        inv.key(self.key(tenant, "img")).key(self.key(tenant, "imgslots"));
        inv.arg(capacity).arg(format!("{id:032x}")).arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let mut conn = self.conn.clone();
        let n: i64 = self.timed(op, inv.invoke_async(&mut conn)).await?;
        Ok(n == 1)
    }

    /// The image part of a settlement alone. Returns the count after.
    pub async fn settle_images(&self, tenant: &str, id: u128, image: ImagePart) -> Result<u64, RedisStoreError> {
        let s = Settle { hold: HoldAction::None, alert_at: None, usage: None, image, part: "img" };
        Ok(self.settle(tenant, id, s).await?.images.unwrap_or(0))
    }

    /// The tenant's image count.
    pub async fn image_count(&self, tenant: &str) -> Result<u64, RedisStoreError> {
        let op = "sync";
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("HGET").arg(self.key(tenant, "img")).arg("count").clone();
        let v: Value = self.timed(op, cmd.query_async(&mut conn)).await?;
        Ok(u64::try_from(as_i64(op, &v)?).unwrap_or(0))
    }

    /// Stores an override (JSON) for (tenant, feature) in a set of them, indexes the tenant and
    /// publishes on `{prefix}:overrides` so every replica reloads them.
    pub async fn put_override(&self, tenant: &str, feature: &str, json: &str) -> Result<(), RedisStoreError> {
        let op = "sync";
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("SADD").arg(self.key(tenant, &format!("ov:{feature}"))).arg(json).clone();
        let _: i64 = self.timed(op, cmd.query_async(&mut conn)).await?;
        let idx = format!("{}:ov:index", self.opts.key_prefix);
        let cmd = redis::cmd("SADD").arg(&idx).arg(format!("{tenant}\n{feature}")).clone();
        let _: i64 = self.timed(op, cmd.query_async(&mut conn)).await?;
        let cmd = redis::cmd("PUBLISH").arg(format!("{}:overrides", self.opts.key_prefix)).arg(format!("{tenant}\n{feature}")).clone();
        let _: i64 = self.timed(op, cmd.query_async(&mut conn)).await?;
        Ok(())
    }

    /// Every stored override as (tenant, feature, JSON), sorted.
    pub async fn overrides(&self) -> Result<Vec<(String, String, String)>, RedisStoreError> {
        let op = "sync";
        let mut conn = self.conn.clone();
        let idx = format!("{}:ov:index", self.opts.key_prefix);
        let pairs: Vec<String> = self.timed(op, redis::cmd("SMEMBERS").arg(&idx).clone().query_async(&mut conn)).await?;
        let mut out = Vec::new();
        for p in pairs {
            let Some((tenant, feature)) = p.split_once('\n') else { continue };
            let cmd = redis::cmd("SMEMBERS").arg(self.key(tenant, &format!("ov:{feature}"))).clone();
            let jsons: Vec<String> = self.timed(op, cmd.query_async(&mut conn)).await?;
            out.extend(jsons.into_iter().map(|j| (tenant.to_string(), feature.to_string(), j)));
        }
        out.sort();
        Ok(out)
    }

    /// `CONFIG GET appendonly appendfsync` of the server (or of one cluster node):
    /// for `turnstile check` (SPEC §11.5).
    pub async fn aof_policy(&self) -> Result<(String, String), RedisStoreError> {
        let op = "sync";
        let mut conn = self.conn.clone();
        let v: Vec<String> =
            self.timed(op, redis::cmd("CONFIG").arg("GET").arg("append*").clone().query_async(&mut conn)).await?;
        let get = |name: &str| v.chunks(2).find(|kv| kv[0] == name).and_then(|kv| kv.get(1)).cloned().unwrap_or_default();
        Ok((get("appendonly"), get("appendfsync")))
    }

    /// Every call: bounded by `op_timeout`, timed and counted per SPEC §10 `op`.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, RedisStoreError> {
        let start = Instant::now();
        let r = bounded(op, self.opts.op_timeout, fut).await;
        if let Some(m) = &self.metrics {
            m.duration.with_label_values(&[op]).observe(start.elapsed().as_secs_f64());
            if r.is_err() {
                m.errors.with_label_values(&[op]).inc();
            }
        }
        r
    }
}

async fn bounded<T>(
    op: &'static str,
    timeout: Duration,
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, RedisStoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r.map_err(|e| redis_err(op, e)),
        Err(_) => Err(RedisStoreError::Timeout { op, ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX) }),
    }
}

#[cfg(test)]
#[path = "../../tests/common/redis.rs"]
pub(crate) mod harness;

#[cfg(test)]
mod tests;
