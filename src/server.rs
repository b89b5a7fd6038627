//! `turnstile serve`: the two listeners and graceful shutdown, over the shared [`Gateway`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use crate::gateway::{build, load, worker_count, Conn, Gateway};
use crate::proxy;
use crate::snapshot::Snapshot;

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
    // Each per-core worker accepts on its own socket bound to the same address; the kernel
    // spreads new connections over them (like nginx's `listen ... reuseport`).
    #[cfg(unix)]
    if worker_count() > 1 {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// A connection slot under `[server].max_connections` (None: no limit), waiting for one while at
/// the cap; `None` when `stop` changes first.
async fn slot(
    limit: &Option<Arc<Semaphore>>,
    stop: &mut watch::Receiver<bool>,
    gw: &Gateway,
    warned_full: &mut Option<Instant>,
) -> Option<Option<tokio::sync::OwnedSemaphorePermit>> {
    let Some(sem) = limit else { return Some(None) };
    if let Ok(p) = sem.clone().try_acquire_owned() {
        return Some(Some(p));
    }
    if warned_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
        *warned_full = Some(Instant::now());
        tracing::warn!(
            max_connections = gw.snapshot.load().settings.max_connections,
            "server.max_connections open connections: new ones wait in the listen backlog"
        );
    }
    tokio::select! {
        p = sem.clone().acquire_owned() => p.ok().map(Some),
        _ = stop.changed() => None,
    }
}

/// Connection draining at shutdown (hyper-util's `GracefulShutdown`, for the fast path's
/// connections and hyper's alike): every connection holds a watcher of the [`DrainState`];
/// [`Drain::shutdown`] tells them all and waits until the last one is gone. A connection
/// finishes the request in progress and closes (HTTP/1.1), or sends GOAWAY and finishes its
/// streams (HTTP/2). At the drain deadline, hyper's connections still open are closed.
struct Drain {
    tx: watch::Sender<DrainState>,
}

/// What a connection's watcher reads: serving, draining, or past the drain deadline.
pub type DrainState = u8;
pub const SERVING: DrainState = 0;
pub const DRAINING: DrainState = 1;
pub const CUT: DrainState = 2;

/// At the drain deadline, the longest wait for the connections' tasks to end once told to.
const CUT_WAIT: Duration = Duration::from_secs(1);

impl Drain {
    fn new() -> Drain {
        Drain { tx: watch::channel(SERVING).0 }
    }

    fn watcher(&self) -> watch::Receiver<DrainState> {
        self.tx.subscribe()
    }

    /// Drains every connection, waiting at most `within`; true when the last one was gone in
    /// time. Past it, the connections still open are closed and their tasks have ended before
    /// this returns (at most [`CUT_WAIT`]): a call on them (a gRPC stream the upstream has not
    /// ended) is cut off, its client sees the connection lost, and it is not charged. Left
    /// open, one could still end OK after the ledger's last flush, its OK reaching the client
    /// and its charge lost. (A fast-path HTTP/1.1 call is charged when its answer's head
    /// comes, so before the flush: its connection closes when the process exits.)
    async fn shutdown(self, within: Duration) -> bool {
        let _ = self.tx.send(DRAINING);
        if tokio::time::timeout(within, self.tx.closed()).await.is_ok() {
            return true;
        }
        let _ = self.tx.send(CUT);
        let _ = tokio::time::timeout(CUT_WAIT, self.tx.closed()).await;
        false
    }
}

/// Which listener a loop serves: the tenant one starts each connection on the HTTP/1.1 fast
/// path ([`crate::h1`]); the admin one is hyper's alone.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Tenant,
    Admin,
}

/// Accepts and serves connections until `stop` changes. With `limit`, at most that many
/// connections are open at once: beyond it the loop stops accepting, and new connections wait in
/// the kernel's listen backlog until one closes (nginx `worker_connections` behaviour). With
/// `drain`, connections are drained by it at shutdown, and responses sent while the gateway is
/// not ready (the shutdown grace) carry `Connection: close`, so keep-alive clients reconnect and
/// reach another replica once the endpoints are updated.
#[allow(clippy::too_many_arguments)]
async fn accept_loop<F, Fut, B>(
    listener: TcpListener,
    kind: Listener,
    gw: Arc<Gateway>,
    mut stop: watch::Receiver<bool>,
    drain: Option<&Drain>,
    limit: Option<Arc<Semaphore>>,
    accept_first: bool,
    handler: F,
) where
    F: Fn(Arc<Conn>, http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut warned_full: Option<Instant> = None;
    loop {
        let mut permit = None;
        if !accept_first {
            match slot(&limit, &mut stop, &gw, &mut warned_full).await {
                Some(p) => permit = p,
                None => return,
            }
        }
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
        if accept_first {
            match slot(&limit, &mut stop, &gw, &mut warned_full).await {
                Some(p) => permit = p,
                None => return,
            }
        }
        let _ = stream.set_nodelay(true);
        let conn = Arc::new(Conn::new(gw.clone(), remote, drain.map(Drain::watcher)));
        let watcher = drain.map(Drain::watcher);
        let h = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(kind, conn, stream, watcher, h).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            // The connection's slot is free once it is served (a refused body's drain
            // included: hyper reads it on this connection).
            drop(permit);
        });
    }
}

/// Serves one connection: the tenant listener's on the HTTP/1.1 fast path until it hands the
/// connection to hyper (HTTP/2, or a request it does not serve); the admin listener's on hyper.
async fn serve_connection<F, Fut, B>(
    kind: Listener,
    conn: Arc<Conn>,
    mut stream: tokio::net::TcpStream,
    watcher: Option<watch::Receiver<DrainState>>,
    handler: F,
) -> Result<(), BoxError>
where
    F: Fn(Arc<Conn>, http::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = http::Response<B>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let header_timeout = conn.gw.snapshot.load().settings.header_read_timeout;
    // A drain that never comes, for the admin listener.
    let (_never, idle) = watch::channel(SERVING);
    let mut stop = watcher.unwrap_or(idle);
    let (h2, read) = match kind {
        Listener::Tenant => match crate::h1::serve(&conn, &mut stream, &mut stop).await? {
            crate::h1::Served::Closed => return Ok(()),
            crate::h1::Served::HandOff { h2, read } => (h2, read),
        },
        // The first bytes of a connection must come within `header_read_timeout_ms` (a
        // connection that sends nothing is closed). After them, hyper's HTTP/1 header timeout,
        // or HTTP/2's keep-alive, takes over.
        Listener::Admin => match tokio::time::timeout(header_timeout, opens_with_h2_preface(&stream)).await {
            Err(_) => return Err("no request within server.header_read_timeout_ms".into()),
            Ok(r) => (r?, Vec::new()),
        },
    };
    let close_when_draining = kind == Listener::Tenant;
    let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
        // HTTP/2 has no `Connection` header: a draining HTTP/2 connection gets GOAWAY instead.
        let h1 = req.version() < http::Version::HTTP_2;
        let conn = conn.clone();
        let fut = handler(conn.clone(), req);
        // Not boxed: hyper keeps one slot per connection for the request future.
        async move {
            let mut resp = fut.await;
            if h1 && close_when_draining && !conn.gw.ready.load(Ordering::Relaxed) {
                resp.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let io = TokioIo::new(Prefixed { stream, read, at: 0 });
    if h2 {
        // Each stream runs as a task on this runtime (a per-core worker keeps its streams).
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_concurrent_streams(H2_MAX_CONCURRENT_STREAMS)
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(10));
        let c = b.serve_connection(io, svc);
        Ok(until_drained(c, stop, |c| c.graceful_shutdown()).await??)
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new()).header_read_timeout(header_timeout).keep_alive(true);
        let c = b.serve_connection(io, svc);
        Ok(until_drained(c, stop, |c| c.graceful_shutdown()).await??)
    }
}

/// Runs a hyper connection; once `stop` says the drain began, shuts it down gracefully and
/// runs it to its end, or until the drain deadline ([`CUT`]): then it is dropped (its socket
/// closes, its streams are reset) and this is an error. Only `stop`'s changes wake it for that,
/// not each request.
async fn until_drained<C: std::future::Future>(
    conn: C,
    mut stop: watch::Receiver<DrainState>,
    shutdown: impl FnOnce(std::pin::Pin<&mut C>),
) -> Result<C::Output, BoxError> {
    let mut conn = std::pin::pin!(conn);
    // The fast path may have seen the drain begin before it handed the connection over.
    if *stop.borrow_and_update() == SERVING {
        tokio::select! {
            r = conn.as_mut() => return Ok(r),
            _ = stop.changed() => {}
        }
    }
    shutdown(conn.as_mut());
    while *stop.borrow_and_update() < CUT {
        tokio::select! {
            r = conn.as_mut() => return Ok(r),
            // The sender gone: the drain is over.
            changed = stop.changed() => if changed.is_err() { break },
        }
    }
    Err("closed at the drain deadline".into())
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Streams one HTTP/2 connection may have open at once (Envoy's and Go's default is 100 to
/// 250; hyper's own is 200). [`Semaphore`] `max_connections` counts connections, not streams.
pub const H2_MAX_CONCURRENT_STREAMS: u32 = 200;

/// Whether the connection opens with HTTP/2's preface. Peeks (reads nothing), so hyper then
/// reads the connection from its first byte; an end of stream or any other first bytes mean
/// HTTP/1.1. Returns once the first bytes arrived (the caller bounds the wait).
async fn opens_with_h2_preface(stream: &tokio::net::TcpStream) -> std::io::Result<bool> {
    let preface = crate::h1::PREFACE;
    let mut buf = [0u8; 24];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 || buf[..n] != preface[..n] {
            return Ok(false);
        }
        if n == preface.len() {
            return Ok(true);
        }
        // The preface's start so far: peek answers at once while bytes wait unread, so wait a
        // moment for the rest (HTTP/2 clients send the preface in one segment).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A connection whose first bytes were already read (by the fast path): they are read again
/// first, then the socket.
struct Prefixed {
    stream: tokio::net::TcpStream,
    read: Vec<u8>,
    at: usize,
}

impl tokio::io::AsyncRead for Prefixed {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.read.len() {
            let n = (this.read.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            if this.at == this.read.len() {
                this.read = Vec::new();
                this.at = 0;
            }
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut this.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Prefixed {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Why serving stops: a SIGTERM (from Kubernetes, docker, systemd) gets the shutdown grace; a
/// SIGINT (Ctrl-C in a terminal) does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    Term,
    Int,
}

/// Serves both listeners until the first value arrives on `signals`, then shuts down the way
/// load balancers expect:
/// 1. `/readyz` answers 503 at once; for `[server].shutdown_grace_ms` (read from the snapshot
///    then, so a reload changes it; 0 after SIGINT) the tenant listener goes on accepting and
///    serving, its responses with `Connection: close`, while Kubernetes takes the pod out of
///    its endpoints. A second signal ends the grace at once.
/// 2. The tenant listener stops accepting, and in-flight requests drain for up to `drain`.
///
/// The admin listener keeps answering (`/healthz` 200, `/readyz` 503, `/metrics`) through both
/// steps and after this returns, until the process exits, so probes see "not ready" rather than
/// a refused connection while the ledger is flushed.
pub async fn run(
    gw: Arc<Gateway>,
    listeners: Listeners,
    mut signals: tokio::sync::mpsc::UnboundedReceiver<StopSignal>,
    drain: Duration,
) -> Workers {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (workers_live, live) = watch::channel(());
    let drain_all = Drain::new();
    // Read at start: a reload that changes it warns that it takes effect at the next restart.
    let max_connections = Arc::new(Semaphore::new(gw.snapshot.load().settings.max_connections));
    // The admin listener is not counted (/metrics and /healthz stay reachable under a flood) and
    // not drained: it serves until the runtime ends, its stop sender living in its own task.
    let admin_gw = gw.clone();
    tokio::spawn(async move {
        let (_never, stop) = watch::channel(false);
        accept_loop(listeners.admin, Listener::Admin, admin_gw, stop, None, None, false, crate::admin::handle).await;
    });
    let workers = worker_count();
    // One listener per worker: the bound one, then more on the same address (SO_REUSEPORT).
    let mut sockets = Vec::new();
    if workers > 1 {
        match listeners.tenant.local_addr().and_then(|addr| {
            let mut v = Vec::with_capacity(workers - 1);
            for _ in 1..workers {
                v.push(listen(addr)?.into_std()?);
            }
            Ok(v)
        }) {
            Ok(v) => sockets = v,
            Err(e) => tracing::warn!(error = %e, "cannot open per-core listeners; serving on one runtime"),
        }
    }
    gw.ready.store(true, Ordering::SeqCst);
    let stopper = async {
        // A closed channel (no signal can come) means serve on.
        let Some(signal) = signals.recv().await else { return std::future::pending().await };
        gw.ready.store(false, Ordering::SeqCst);
        let grace = match signal {
            StopSignal::Term => gw.snapshot.load().settings.shutdown_grace,
            StopSignal::Int => Duration::ZERO,
        };
        if !grace.is_zero() {
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "shutting down: /readyz answers 503; still serving during the grace so endpoints are removed first"
            );
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                Some(_) = signals.recv() => tracing::info!("second signal: ending the grace now"),
            }
        }
        tracing::info!("shutting down: no longer accepting, draining in-flight requests");
        let _ = stop_tx.send(true);
    };
    if sockets.is_empty() {
        tokio::join!(
            accept_loop(
                listeners.tenant,
                Listener::Tenant,
                gw.clone(),
                stop_rx,
                Some(&drain_all),
                Some(max_connections),
                false,
                proxy::handle
            ),
            stopper
        );
        if drain_all.shutdown(drain).await {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!(seconds = drain.as_secs(), "drain timeout: closed the remaining connections");
        }
        return Workers(workers_live);
    }
    // Per-core workers, nginx's model: each thread runs a current-thread runtime with its own
    // listener and upstream pool, so a request stays on one core from accept to answer (no
    // work-stealing, no shared pool lock). Buckets, billing and metrics stay shared, so limits and
    // balances are exact whichever core serves a tenant.
    sockets.insert(
        0,
        match listeners.tenant.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot hand the tenant listener to the workers");
                return Workers(workers_live);
            }
        },
    );
    let mut done = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::oneshot::channel::<bool>();
        let (gw, stop, limit, mut live) = (gw.clone(), stop_rx.clone(), max_connections.clone(), live.clone());
        let spawned = std::thread::Builder::new().name(format!("turnstile-worker-{i}")).spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => return tracing::error!(error = %e, worker = i, "cannot start a worker runtime"),
            };
            rt.block_on(async move {
                let listener = match TcpListener::from_std(socket) {
                    Ok(l) => l,
                    Err(e) => return tracing::error!(error = %e, worker = i, "worker cannot use its listener"),
                };
                let drain_all = Drain::new();
                accept_loop(listener, Listener::Tenant, gw, stop, Some(&drain_all), Some(limit), true, proxy::handle)
                    .await;
                let drained = drain_all.shutdown(drain).await;
                let _ = tx.send(drained);
                // The runtime lives on (its timers too) until the returned `Workers` is dropped.
                let _ = live.changed().await;
            });
        });
        match spawned {
            Ok(_) => done.push(rx),
            Err(e) => tracing::error!(error = %e, worker = i, "cannot start a worker thread"),
        }
    }
    tracing::info!(workers = done.len(), "serving the tenant listener on per-core workers");
    stopper.await;
    let mut all = true;
    for rx in done {
        all &= rx.await.unwrap_or(false);
    }
    if all {
        tracing::info!("all connections drained");
    } else {
        tracing::warn!(seconds = drain.as_secs(), "drain timeout: closed the remaining connections");
    }
    Workers(workers_live)
}

/// Keeps the per-core workers' runtimes alive after [`run`] has drained them, until dropped. A
/// Redis connection's reconnect started on a worker runs on that worker's timers: another
/// runtime that awaits it after the worker's runtime ended would panic. So hold this until the
/// last call to Redis (the shutdown's replay of the fallback's journal).
pub struct Workers(#[allow(dead_code)] watch::Sender<()>);

/// Forwards every SIGTERM and SIGINT to the returned channel (for [`run`]). The handlers are
/// installed before this returns, so no signal from then on is missed.
pub fn stop_signals() -> tokio::sync::mpsc::UnboundedReceiver<StopSignal> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::spawn(async move {
                    loop {
                        let s = tokio::select! {
                            Some(()) = term.recv() => StopSignal::Term,
                            Some(()) = int.recv() => StopSignal::Int,
                            else => break,
                        };
                        let name = if s == StopSignal::Term { "SIGTERM" } else { "SIGINT" };
                        tracing::info!(signal = name, "signal received");
                        if tx.send(s).is_err() {
                            break;
                        }
                    }
                });
                return rx;
            }
            (Err(e), _) | (_, Err(e)) => tracing::warn!(error = %e, "cannot handle SIGTERM; stopping on Ctrl-C only"),
        }
    }
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            if tx.send(StopSignal::Int).is_err() {
                break;
            }
        }
        // No signal can arrive any more: keep the channel open, so `run` serves on.
        std::future::pending::<()>().await;
    });
    rx
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
