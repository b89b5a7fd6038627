//! `turnstile serve`: the two listeners and graceful shutdown, over the shared [`Gateway`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

pub use crate::gateway::{build, load, Gateway};
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
