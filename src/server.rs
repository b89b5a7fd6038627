//! `turnstile serve`: the shared gateway state, the two listeners, and graceful shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::Uri;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::admission::{BucketStore, LocalBuckets};
use crate::billing::{Alert, Billing};
use crate::clock::SharedClock;
use crate::config::{self, ConfigErrors, ConfigSource, Texts};
use crate::ledger::{LedgerError, RedbLedger};
use crate::metrics::Metrics;
use crate::proxy::{self, UpstreamBody};
use crate::reload::Control;
use crate::snapshot::Snapshot;

/// Everything the listeners share.
pub struct Gateway {
    pub snapshot: ArcSwap<Snapshot>,
    pub buckets: Arc<dyn BucketStore>,
    pub metrics: Arc<Metrics>,
    pub billing: Arc<Billing>,
    pub clock: SharedClock,
    pub client: Client<HttpConnector, UpstreamBody>,
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
    let mut snap = config::build(texts, generation)?;
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
        let metrics = Arc::new(Metrics::new(snapshot.settings.tenant_label));
        let s = &snapshot.settings;
        let store = RedbLedger::open(&s.ledger_dir)?;
        let video =
            |id: &str| snapshot.catalog.feature(id).is_some_and(|f| f.unit == crate::catalog::Unit::VideoMinute);
        let (billing, alerts) = Billing::open_with(
            Box::new(store),
            s.durability,
            s.flush_interval,
            s.strict_timeout,
            metrics.clone(),
            clock.clone(),
            &video,
        )?;
        metrics.config_generation.set(snapshot.generation as i64);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(snapshot.settings.upstream_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .build(connector);
        let gw = Arc::new(Gateway {
            generation: AtomicU64::new(snapshot.generation),
            snapshot: ArcSwap::from_pointee(snapshot),
            buckets: Arc::new(LocalBuckets::new(clock.clone())),
            metrics,
            billing,
            clock,
            client,
            source,
            upstream_override,
            ready: AtomicBool::new(false),
            control: tokio::sync::Mutex::new(Control::new(texts)),
        });
        tokio::spawn(deliver_alerts(Arc::downgrade(&gw), alerts));
        crate::reload::show_packages(&gw.metrics, &gw.billing, &gw.snapshot.load());
        Ok(gw)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }
}

/// POSTs each low-balance alert to `[billing].alert_webhook` (read at send time), off the
/// request path, retrying with exponential backoff.
async fn deliver_alerts(gw: std::sync::Weak<Gateway>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Alert>) {
    use http_body_util::Full;
    let client: Client<HttpConnector, Full<bytes::Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    while let Some(alert) = rx.recv().await {
        let Some(url) = gw.upgrade().and_then(|g| g.snapshot.load().settings.alert_webhook.clone()) else { continue };
        let body = bytes::Bytes::from(serde_json::to_vec(&alert).unwrap_or_default());
        let mut delay = Duration::from_millis(200);
        for attempt in 1..=6 {
            let req = http::Request::post(url.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(Full::new(body.clone()));
            let ok = match req {
                Ok(req) => matches!(
                    tokio::time::timeout(Duration::from_secs(10), client.request(req)).await,
                    Ok(Ok(r)) if r.status().is_success()
                ),
                Err(_) => false,
            };
            if ok {
                break;
            }
            if attempt == 6 {
                tracing::error!(tenant = %alert.tenant, package = %alert.package, %url, "low-balance webhook failed 6 times; giving up");
                break;
            }
            tracing::warn!(tenant = %alert.tenant, package = %alert.package, attempt, "low-balance webhook failed; retrying");
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
}

/// Bound listeners, so callers (and tests) learn the real ports before serving starts.
pub struct Listeners {
    pub tenant: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(snap: &Snapshot) -> std::io::Result<Listeners> {
        let tenant = listen(snap.settings.listen)
            .map_err(|e| std::io::Error::new(e.kind(), format!("server.listen {}: {e}", snap.settings.listen)))?;
        let admin = TcpListener::bind(snap.settings.admin_listen).await.map_err(|e| {
            std::io::Error::new(e.kind(), format!("server.admin_listen {}: {e}", snap.settings.admin_listen))
        })?;
        Ok(Listeners { tenant, admin })
    }
}

/// The tenant listener's accept queue: connections beyond `[server].max_connections` wait here
/// (the kernel caps it at `net.core.somaxconn`). Tokio's `TcpListener::bind` uses 128.
pub const LISTEN_BACKLOG: u32 = 1024;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts and serves connections until `stop` changes. With `limit`, at most that many
/// connections are open at once: beyond it the loop stops accepting, and new connections wait in
/// the kernel's listen backlog until one closes (nginx `worker_connections` behaviour).
async fn accept_loop<F, Fut, B>(
    listener: TcpListener,
    gw: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
    graceful: &GracefulShutdown,
    limit: Option<Arc<Semaphore>>,
    handler: F,
) where
    F: Fn(Arc<Gateway>, http::Request<hyper::body::Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut warned_full: Option<Instant> = None;
    loop {
        let permit = match &limit {
            None => None,
            Some(sem) => {
                let permit = match sem.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        if warned_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                            warned_full = Some(Instant::now());
                            tracing::warn!(
                                max_connections = gw.snapshot.load().settings.max_connections,
                                "server.max_connections open connections: new ones wait in the listen backlog"
                            );
                        }
                        tokio::select! {
                            p = sem.clone().acquire_owned() => match p {
                                Ok(p) => p,
                                Err(_) => return,
                            },
                            _ = stop.changed() => return,
                        }
                    }
                };
                Some(permit)
            }
        };
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let header_timeout = gw.snapshot.load().settings.header_read_timeout;
        let gw2 = gw.clone();
        let h = handler.clone();
        let svc = service_fn(move |req| {
            // Boxed: the request future is large, and hyper moves it into place; a pointer moves cheaply.
            let fut = Box::pin(h(gw2.clone(), req, remote));
            async move { Ok::<_, Infallible>(fut.await) }
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), svc);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            // The connection's slot is free once hyper is done with it (a refused body's
            // drain included: hyper reads it on this connection).
            drop(permit);
        });
    }
}

/// Serves both listeners until `shutdown` resolves, then stops accepting and drains in-flight
/// requests for up to `drain` before returning.
pub async fn run(
    gw: Arc<Gateway>,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let graceful = GracefulShutdown::new();
    // Read at start: a reload that changes it warns that it takes effect at the next restart.
    let max_connections = Arc::new(Semaphore::new(gw.snapshot.load().settings.max_connections));
    gw.ready.store(true, Ordering::SeqCst);
    tokio::join!(
        accept_loop(listeners.tenant, gw.clone(), stop_rx.clone(), &graceful, Some(max_connections), proxy::handle),
        // The admin listener is not counted: /metrics and /healthz stay reachable under a flood.
        accept_loop(listeners.admin, gw.clone(), stop_rx, &graceful, None, crate::admin::handle),
        async {
            shutdown.await;
            tracing::info!("shutting down: no longer accepting, draining in-flight requests");
            gw.ready.store(false, Ordering::SeqCst);
            let _ = stop_tx.send(true);
        }
    );
    match tokio::time::timeout(drain, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(seconds = drain.as_secs(), "drain timeout: closing the remaining connections"),
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn termination() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
