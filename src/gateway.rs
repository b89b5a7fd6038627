//! The gateway state every listener shares ([`Gateway`]): the configuration snapshot, the
//! billing engine and its store, metrics, the upstream client, and the control state of
//! reloads. It depends on no listener: `proxy`, `admin`, `reload` and `server` depend on it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::Uri;
use sha2::{Digest, Sha256};

use crate::billing::Billing;
use crate::clock::SharedClock;
use crate::config::{self, ConfigErrors, ConfigSource, Texts};
use crate::ledger::{LedgerError, RedbLedger};
use crate::metrics::Metrics;
use crate::snapshot::Snapshot;

/// What was loaded last (guarded by the gateway's control mutex).
pub struct Control {
    pub(crate) texts: Texts,
    pub(crate) hash: [u8; 32],
    /// Cluster mode: the upgrade overrides shared through Redis, overlaid on every snapshot
    /// published (SPEC §11.4).
    pub(crate) overrides: Vec<(String, String, crate::store::Override)>,
    /// The watcher's last rejection since the last publish: the hash of the files it rejected,
    /// or the error it could not read them with. The same again is not reported again: an event
    /// in their folders that is no edit of them (a log written there, the rejection's own line
    /// included) would otherwise report it at every event, for as long as the edit stays.
    pub(crate) rejected: Option<[u8; 32]>,
    pub(crate) unreadable: Option<String>,
}

/// The hash of the three configuration texts (a reload with the same hash changes nothing).
pub(crate) fn hash(t: &Texts) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [&t.main, &t.catalog, &t.entitlements] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

impl Control {
    pub fn new(texts: Texts) -> Self {
        Control { hash: hash(&texts), texts, overrides: Vec::new(), rejected: None, unreadable: None }
    }
}

/// Everything the listeners share.
pub struct Gateway {
    /// In an `Arc` so that each thread's [`arc_swap::Cache`] of it can hold it (see
    /// [`Gateway::request_snapshot`]).
    pub snapshot: Arc<ArcSwap<Snapshot>>,
    pub metrics: Arc<Metrics>,
    pub billing: Arc<Billing>,
    /// The store backend the request path awaits (the billing engine's local store).
    pub stores: crate::store::Stores,
    pub clock: SharedClock,
    /// How the upstream is reached (protocol, connect timeout; fixed at start). Each thread
    /// keeps its own connections ([`crate::upstream`]).
    pub upstream: crate::upstream::Upstream,
    pub source: ConfigSource,
    /// `serve --demo` points the gateway at its stand-in upstream, whatever the file says.
    pub upstream_override: Option<Uri>,
    pub ready: AtomicBool,
    pub(crate) generation: AtomicU64,
    /// Serializes reloads and admin writes; holds what was loaded last.
    pub(crate) control: tokio::sync::Mutex<Control>,
}

/// Validates configuration texts into a snapshot of the given generation.
pub fn build(texts: &Texts, upstream_override: Option<&Uri>, generation: u64) -> Result<Snapshot, ConfigErrors> {
    let mut snap = crate::snapshot::build(texts, generation)?;
    if let Some(u) = upstream_override {
        snap.settings.upstream = u.clone();
    }
    Ok(snap)
}

/// Reads and validates the configuration.
pub fn load(
    source: &ConfigSource,
    upstream_override: Option<&Uri>,
    generation: u64,
) -> Result<(Texts, Snapshot), ConfigErrors> {
    let texts = config::read_texts(source)?;
    let snap = build(&texts, upstream_override, generation)?;
    Ok((texts, snap))
}

impl Gateway {
    /// Opens the ledger (restoring balances and monthly usage) and builds the gateway state.
    /// Must run inside a Tokio runtime (the alert sender is spawned on it).
    pub fn new(
        texts: Texts,
        snapshot: Snapshot,
        source: ConfigSource,
        upstream_override: Option<Uri>,
        clock: SharedClock,
    ) -> Result<Arc<Self>, LedgerError> {
        Self::with_redis(texts, snapshot, source, upstream_override, clock, None)
    }

    /// [`Gateway::new`] in cluster mode (SPEC §11): `redis` (connected with
    /// [`crate::store::redis::RedisStore::open`]) becomes the store every request awaits; the
    /// store metrics, `turnstile_store_fallback` and the journal's metrics go on the gateway's
    /// registry; a sweeper gives back expired holds, a probe replays fallback charges, and a
    /// poller applies the shared upgrade overrides.
    pub fn with_redis(
        texts: Texts,
        snapshot: Snapshot,
        source: ConfigSource,
        upstream_override: Option<Uri>,
        clock: SharedClock,
        redis: Option<crate::store::redis::RedisStore>,
    ) -> Result<Arc<Self>, LedgerError> {
        let metrics = Arc::new(Metrics::new(snapshot.settings.tenant_label));
        let s = &snapshot.settings;
        let store = RedbLedger::open(&s.ledger_dir)?;
        let remote = match redis {
            Some(r) => {
                let m = crate::store::redis::StoreMetrics::new()
                    .and_then(|m| m.register(&metrics.registry).map(|()| m))
                    .map_err(|e| LedgerError::Open { path: "metrics".into(), reason: e.to_string() })?;
                let fallback = crate::cluster::FallbackMetrics::new()
                    .and_then(|f| f.register(&metrics.registry).map(|()| f))
                    .map_err(|e| LedgerError::Open { path: "metrics".into(), reason: e.to_string() })?;
                let remote = crate::cluster::Remote::new(r.with_metrics(m), &s.cluster, fallback, clock.clone());
                remote
                    .open_journal(&s.ledger_dir)
                    .map_err(|reason| LedgerError::Open { path: s.ledger_dir.clone(), reason })?;
                Some(remote)
            }
            None => None,
        };
        let video =
            |id: &str| snapshot.catalog.feature(id).is_some_and(|f| f.unit == crate::catalog::Unit::VideoMinute);
        let (billing, alerts) = Billing::open_cluster(
            Box::new(store),
            s.durability,
            s.flush_interval,
            s.strict_timeout,
            metrics.clone(),
            clock.clone(),
            &video,
            remote,
        )?;
        metrics.config_generation.set(snapshot.generation as i64);
        let upstream = crate::upstream::Upstream {
            protocol: snapshot.settings.upstream_protocol,
            connect_timeout: snapshot.settings.upstream_timeout,
        };
        let gw = Arc::new(Gateway {
            generation: AtomicU64::new(snapshot.generation),
            snapshot: Arc::new(ArcSwap::from_pointee(snapshot)),
            metrics,
            stores: billing.stores().clone(),
            billing,
            clock,
            upstream,
            source,
            upstream_override,
            ready: AtomicBool::new(false),
            control: tokio::sync::Mutex::new(Control::new(texts)),
        });
        let weak = Arc::downgrade(&gw);
        let webhook = move || weak.upgrade().and_then(|g| g.snapshot.load().settings.alert_webhook.clone());
        tokio::spawn(crate::alerts::deliver(webhook, alerts));
        tokio::spawn(sweep_store(Arc::downgrade(&gw.billing)));
        if let Some(remote) = gw.billing.remote() {
            // Expired holds of any replica (one that died included) come back after the lease.
            // A quarter of the lease (between 250 ms and 5 s): a hold is back within 1.25 leases.
            let every = (remote.redis_lease() / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
            let sweeper = remote.redis.spawn_sweeper(every);
            let weak = Arc::downgrade(&gw.billing);
            tokio::spawn(async move {
                crate::cluster::probe_loop(weak).await;
                sweeper.abort();
            });
            tokio::spawn(crate::cluster::journal_sync_loop(
                Arc::downgrade(&gw.billing),
                gw.snapshot.load().settings.flush_interval,
            ));
        }
        if gw.billing.remote().is_some() {
            tokio::spawn(crate::cluster::poll_overrides(Arc::downgrade(&gw)));
        }
        gw.billing.show_packages(&gw.metrics, &gw.snapshot.load_full());
        Ok(gw)
    }

    /// Cluster mode: reads the shared upgrade overrides and, when they changed, republishes
    /// the configuration being served with them. True when something changed.
    pub async fn sync_overrides(&self) -> Result<bool, crate::store::StoreError> {
        use crate::store::OverrideStore;
        let Some(remote) = self.billing.remote() else { return Ok(false) };
        let overrides = remote.stores.overrides().await?;
        let mut ctl = self.control.lock().await;
        if ctl.overrides == overrides {
            return Ok(false);
        }
        ctl.overrides = overrides;
        let texts = ctl.texts.clone();
        // The texts being served were valid: only an override could make them fail (never).
        if let Err(e) = self.publish(&mut ctl, texts, "shared upgrade").await {
            tracing::error!("the shared upgrades could not be applied:\n{e}");
        }
        Ok(true)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// One accepted connection, shared by the requests on it. Its reference count is touched by
/// its own worker thread only, where a per-request clone of the gateway's `Arc` would be one
/// cache line written by every core on every request.
pub struct Conn {
    pub gw: Arc<Gateway>,
    pub remote: SocketAddr,
    /// The peer's address as a header value (for `X-Forwarded-For`), formatted once.
    pub peer_ip: http::HeaderValue,
    /// The shutdown drain's watcher, held as long as anything of the connection runs: a call
    /// whose client left goes on on a task of its own (holding this `Conn`), and is charged if
    /// the upstream answers 2xx, so the drain at SIGTERM waits for it as for the connection.
    _drain: Option<tokio::sync::watch::Receiver<crate::server::DrainState>>,
}

impl Conn {
    pub fn new(
        gw: Arc<Gateway>,
        remote: SocketAddr,
        drain: Option<tokio::sync::watch::Receiver<crate::server::DrainState>>,
    ) -> Conn {
        let mut buf = [0u8; 48];
        let ip = crate::http_util::write_into(&mut buf, format_args!("{}", remote.ip()));
        let peer_ip = http::HeaderValue::from_bytes(ip).unwrap_or(http::HeaderValue::from_static("unknown"));
        Conn { gw, remote, peer_ip, _drain: drain }
    }
}

/// The snapshot a request was decided on, held through a handle of its thread's: requests
/// clone the handle's `Arc`, whose count lives in an allocation of that thread, not the
/// snapshot's own, which every core would otherwise write twice per request.
pub struct SnapshotHandle(Arc<Snapshot>);

impl std::ops::Deref for SnapshotHandle {
    type Target = Snapshot;
    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

impl SnapshotHandle {
    /// The snapshot itself (for work that outlives the request on another task).
    pub fn shared(&self) -> &Arc<Snapshot> {
        &self.0
    }
}

/// A thread's cache of one gateway's snapshot (the admission bench reads through one too).
pub type SnapshotCache = arc_swap::Cache<Arc<ArcSwap<Snapshot>>, Arc<Snapshot>>;

thread_local! {
    /// This thread's cache of the gateway's `ArcSwap` and its handle to the snapshot it served
    /// last. An idle thread keeps an older snapshot alive until its next request.
    static SNAPSHOT: std::cell::RefCell<Option<(SnapshotCache, Arc<SnapshotHandle>)>> =
        const { std::cell::RefCell::new(None) };
}

impl Gateway {
    /// The snapshot being served, for one request (the one `ArcSwap` load of the request),
    /// through the thread's `arc_swap::Cache`: it reads one pointer to see that no reload
    /// came, where a plain load writes a debt slot and takes it back (two atomic
    /// read-modify-writes).
    pub fn request_snapshot(&self) -> Arc<SnapshotHandle> {
        SNAPSHOT.with(|h| {
            let mut h = h.borrow_mut();
            match &mut *h {
                Some((cache, handle)) if std::ptr::eq(cache.arc_swap(), &*self.snapshot) => {
                    let current = cache.load();
                    if !Arc::ptr_eq(&handle.0, current) {
                        *handle = Arc::new(SnapshotHandle(Arc::clone(current)));
                    }
                    handle.clone()
                }
                other => {
                    let mut cache = arc_swap::Cache::new(Arc::clone(&self.snapshot));
                    let handle = Arc::new(SnapshotHandle(Arc::clone(cache.load())));
                    *other = Some((cache, handle.clone()));
                    handle
                }
            }
        })
    }
}

/// How many per-core workers serve the tenant listener: one per CPU this process may run on
/// (its affinity, e.g. `taskset`). With one, the tenant listener is served on the main runtime.
pub fn worker_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Every few seconds, off the async workers: gives back holds whose lease passed (a leaked
/// guard) and forgets the idempotency markers of settled requests, so memory stays bounded by
/// the traffic of the last [`crate::store::local::DONE_TTL`].
async fn sweep_store(billing: std::sync::Weak<Billing>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(store) = billing.upgrade().map(|b| b.store().clone()) else { return };
        let swept = tokio::task::spawn_blocking(move || store.sweep_now()).await.unwrap_or(0);
        if swept > 0 {
            tracing::warn!(holds = swept, "gave back holds whose lease passed");
        }
    }
}
