//! The upstream side of the forward phase: a connection pool per thread, on hyper's
//! connection-level client (`hyper::client::conn`), in the manner of pingora's per-thread pools.
//!
//! - HTTP/1.1 (`upstream_protocol = "http1"`): idle keep-alive connections are kept in a stack
//!   per thread (a per-core worker's requests never touch another core's pool, and no lock is
//!   taken). A connection goes back to the stack when its response body has been read to the
//!   end ([`Body`]); one whose body was not read to the end is closed, as HTTP/1.1 requires.
//!   A connection idle for [`IDLE_TIMEOUT`] is closed when the pool is next used; one the
//!   upstream closed is skipped. A request that a reused connection could not take (the
//!   upstream closed it just then: hyper gives the request back unsent) is sent once more on a
//!   new connection, as hyper-util's pooled client does.
//! - cleartext HTTP/2 (`"h2c"`, prior knowledge): one multiplexed connection per thread, with
//!   keep-alive pings; a new one is opened when it closes.
//!
//! Each connection is driven by a task of its own on the thread that opened it. `Host` is the
//! client's (its `Host`, or its `:authority` over HTTP/2), or the upstream's authority when the
//! client sent none; to an h2c upstream it goes as `:authority`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::Authority;
use http::{HeaderValue, Request, Response, Uri};
use http_body::{Body as _, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::body::Upload;
use crate::config::gateway::UpstreamProtocol;

/// The longest upstream answer head read, on both HTTP/1.1 paths (the fast path's, and hyper's
/// client's `max_header_size`, which is otherwise its ~400 KiB buffer): a longer one is a 502.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// How long an idle HTTP/1.1 connection is kept (hyper-util's and Envoy's default is 90 s / 1 h;
/// nginx `keepalive_timeout` for upstreams: 60 s).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// The most idle HTTP/1.1 connections a thread keeps; beyond, a finished one is closed.
pub const MAX_IDLE: usize = 1024;

/// Why a request did not get a response head from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to {authority}: {source}")]
    Connect { authority: String, source: std::io::Error },
    #[error("connecting to {authority}: no connection within {timeout:?}")]
    ConnectTimeout { authority: String, timeout: Duration },
    #[error("the upstream URL has no host")]
    NoHost,
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// The hyper error, when the request failed on the connection (the request body's own
    /// error, a cut-off upload, is found in its source chain).
    pub fn hyper(&self) -> Option<&hyper::Error> {
        match self {
            UpstreamError::Http(e) => Some(e),
            _ => None,
        }
    }
}

/// How the gateway reaches its upstream: the protocol and the connect timeout, fixed at start.
#[derive(Debug, Clone, Copy)]
pub struct Upstream {
    pub protocol: UpstreamProtocol,
    pub connect_timeout: Duration,
}

/// One thread's connections.
#[derive(Default)]
struct Pool {
    /// The upstream the connections below lead to (a reload may change it: then they go).
    authority: Option<Authority>,
    /// Idle HTTP/1.1 connections, the most recently used on top, with when they became idle.
    idle: Vec<(http1::SendRequest<Upload>, Instant)>,
    /// The HTTP/2 connection.
    h2: Option<http2::SendRequest<Upload>>,
}

impl Pool {
    /// Forgets the connections of another upstream than `authority`.
    fn for_authority(&mut self, authority: &Authority) {
        if !same(self.authority.as_ref(), authority) {
            self.idle.clear();
            self.h2 = None;
            self.authority = Some(authority.clone());
        }
    }

    /// The most recently used idle connection still open, dropping those that closed or idled
    /// too long.
    fn take(&mut self, authority: &Authority, now: Instant) -> Option<http1::SendRequest<Upload>> {
        self.for_authority(authority);
        self.expire(now);
        while let Some((tx, _)) = self.idle.pop() {
            if !tx.is_closed() {
                return Some(tx);
            }
        }
        None
    }

    /// Closes the connections idle since before `now - IDLE_TIMEOUT` (the oldest are at the
    /// bottom of the stack).
    fn expire(&mut self, now: Instant) {
        let stale = self.idle.iter().take_while(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT).count();
        if stale > 0 {
            self.idle.drain(..stale);
        }
    }

    fn put(&mut self, authority: &Authority, tx: http1::SendRequest<Upload>) {
        if same(self.authority.as_ref(), authority) && self.idle.len() < MAX_IDLE && !tx.is_closed() {
            let now = Instant::now();
            self.expire(now);
            self.idle.push((tx, now));
        }
    }
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

impl Upstream {
    /// Sends `req` (its URI: the upstream's absolute URI) and returns the response head. A
    /// ready pooled HTTP/1.1 connection is handed the request at once and the future is small
    /// ([`Sending::Pooled`]); a new connection, HTTP/2 and a retry go the boxed way.
    pub fn send(&self, mut req: Request<Upload>) -> Sending<'_, impl Future<Output = Sent> + Send> {
        let Some(authority) = req.uri().authority().cloned() else {
            return Sending::Slow { fut: Box::pin(std::future::ready(Err(UpstreamError::NoHost))) };
        };
        if !req.headers().contains_key(http::header::HOST) {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                req.headers_mut().insert(http::header::HOST, host);
            }
        }
        if self.protocol == UpstreamProtocol::H2c {
            // The request's authority goes as `:authority`, and no `host` field beside it that
            // could differ (RFC 9113 §8.3.1); the connection is still the upstream's.
            if let Some(host) = req.headers_mut().remove(http::header::HOST) {
                if let Ok(a) = Authority::try_from(host.as_bytes()) {
                    let mut parts = req.uri().clone().into_parts();
                    parts.authority = Some(a);
                    if let Ok(uri) = Uri::from_parts(parts) {
                        *req.uri_mut() = uri;
                    }
                }
            }
            return Sending::Slow { fut: Box::pin(self.send_h2(authority, req)) };
        }
        // HTTP/1.1 sends the request target in origin form.
        let origin = req.uri().path_and_query().cloned().unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(origin);
        match POOL.with(|p| p.borrow_mut().take(&authority, Instant::now())) {
            Some(mut tx) if tx.is_ready() => {
                let fut = tx.try_send_request(req);
                Sending::Pooled { fut, back: Some((tx, authority)), upstream: self }
            }
            // Not ready yet (its task has not seen the last response end): wait for it there.
            reused => Sending::Slow { fut: Box::pin(self.send_h1(authority, req, reused)) },
        }
    }

    /// Sends on `reused` once ready, else on idle connections of the pool, else on a new one. A
    /// request a reused connection gives back unsent (the upstream closed it just then) is sent
    /// once more on a new connection.
    async fn send_h1(
        &self,
        authority: Authority,
        mut req: Request<Upload>,
        mut reused: Option<http1::SendRequest<Upload>>,
    ) -> Result<Response<Body>, UpstreamError> {
        loop {
            let fresh = reused.is_none();
            let mut tx = match reused.take() {
                Some(tx) => tx,
                None => self.connect_h1(&authority).await?,
            };
            if let Err(e) = tx.ready().await {
                if fresh {
                    return Err(e.into());
                }
                reused = POOL.with(|p| p.borrow_mut().take(&authority, Instant::now()));
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok(resp.map(|body| Body { body, back: Some((tx, authority)) })),
                Err(mut e) => match e.take_message() {
                    // Not sent: the connection closed under it. Once more, on a new one.
                    Some(unsent) if !fresh => {
                        req = unsent;
                        reused = None;
                    }
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }

    async fn send_h2(&self, authority: Authority, req: Request<Upload>) -> Result<Response<Body>, UpstreamError> {
        let shared = POOL.with(|p| {
            let mut p = p.borrow_mut();
            p.for_authority(&authority);
            p.h2.as_ref().filter(|tx| !tx.is_closed()).cloned()
        });
        let mut tx = match shared {
            Some(tx) => tx,
            None => {
                let tx = self.connect_h2(&authority).await?;
                POOL.with(|p| {
                    let mut p = p.borrow_mut();
                    if same(p.authority.as_ref(), &authority) {
                        p.h2 = Some(tx.clone());
                    }
                });
                tx
            }
        };
        tx.ready().await?;
        let resp = tx.send_request(req).await?;
        Ok(resp.map(|body| Body { body, back: None }))
    }

    async fn tcp(&self, authority: &Authority) -> Result<tokio::net::TcpStream, UpstreamError> {
        let host = authority.host();
        // `Authority::host` keeps an IPv6 literal's brackets.
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let port = authority.port_u16().unwrap_or(80);
        let named = || authority.as_str().to_string();
        let stream = tokio::time::timeout(self.connect_timeout, tokio::net::TcpStream::connect((host, port)))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { authority: named(), timeout: self.connect_timeout })?
            .map_err(|source| UpstreamError::Connect { authority: named(), source })?;
        // Requests are small and answered one at a time: no Nagle delay.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h1(&self, authority: &Authority) -> Result<http1::SendRequest<Upload>, UpstreamError> {
        let io = TokioIo::new(self.tcp(authority).await?);
        let (tx, conn) = http1::Builder::new().max_header_size(MAX_RESPONSE_HEAD).handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }

    async fn connect_h2(&self, authority: &Authority) -> Result<http2::SendRequest<Upload>, UpstreamError> {
        let io = TokioIo::new(self.tcp(authority).await?);
        // Keep-alive pings find a dead connection before a call does (Envoy's
        // `connection_keepalive`); the timer drives them.
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(io)
            .await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended with an error");
            }
        });
        Ok(tx)
    }
}

/// What hyper's HTTP/1.1 `try_send_request` resolves to.
pub type Sent = Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Upload>>>;

type Boxed<'a> = Pin<Box<dyn Future<Output = Result<Response<Body>, UpstreamError>> + Send + 'a>>;

pin_project_lite::pin_project! {
    /// The response head of a request sent by [`Upstream::send`].
    #[project = SendingProj]
    pub enum Sending<'a, F> {
        /// Handed to a ready pooled connection; the connection goes back to the pool with the
        /// response body.
        Pooled {
            #[pin]
            fut: F,
            back: Option<(http1::SendRequest<Upload>, Authority)>,
            upstream: &'a Upstream,
        },
        /// A new connection, HTTP/2, or the retry of a request a pooled connection gave back.
        Slow { fut: Boxed<'a> },
    }
}

impl<F: Future<Output = Sent>> Future for Sending<'_, F> {
    type Output = Result<Response<Body>, UpstreamError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let retry = match self.as_mut().project() {
            SendingProj::Slow { fut } => return fut.as_mut().poll(cx),
            SendingProj::Pooled { fut, back, upstream } => match std::task::ready!(fut.poll(cx)) {
                Ok(resp) => {
                    let back = back.take();
                    return Poll::Ready(Ok(resp.map(|body| Body { body, back })));
                }
                Err(mut e) => match (e.take_message(), back.take()) {
                    // Not sent: the connection closed under it. Once more, on a new one.
                    (Some(req), Some((_, authority))) => (*upstream, authority, req),
                    _ => return Poll::Ready(Err(UpstreamError::Http(e.into_error()))),
                },
            },
        };
        let (upstream, authority, req) = retry;
        self.set(Sending::Slow { fut: Box::pin(upstream.send_h1(authority, req, None)) });
        self.poll(cx)
    }
}

/// The upstream's response body. Read to its end, it puts its HTTP/1.1 connection back in the
/// pool of the thread that reads it (where the next request on that thread finds it).
pub struct Body {
    body: Incoming,
    back: Option<(http1::SendRequest<Upload>, Authority)>,
}

impl Body {
    /// Puts the connection back once the body is at its end: its length all read, or (chunked)
    /// its last chunk seen (`ended`).
    fn release_if_done(&mut self, ended: bool) {
        if ended || self.body.is_end_stream() {
            if let Some((tx, authority)) = self.back.take() {
                POOL.with(|p| p.borrow_mut().put(&authority, tx));
            }
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // A body hyper never polls (a response to HEAD, a 204) is at its end already.
        self.release_if_done(false);
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        match &frame {
            Poll::Ready(None) => this.release_if_done(true),
            Poll::Ready(Some(Ok(_))) => this.release_if_done(false),
            // A broken body: its connection is not reused.
            Poll::Ready(Some(Err(_))) => this.back = None,
            Poll::Pending => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// An HTTP/1.1 connection to the upstream for the tenant listener's own HTTP/1.1 path
/// ([`crate::h1`]): the socket and what was read from it beyond the last response.
pub struct RawConn {
    pub stream: tokio::net::TcpStream,
    /// Bytes read from the upstream not yet consumed (`buf[..len]`).
    pub buf: Vec<u8>,
    pub len: usize,
    /// Whether it came from the pool (it may have been closed by the upstream while idle).
    pub reused: bool,
}

/// Idle [`RawConn`]s of one thread, the most recently used on top.
#[derive(Default)]
struct RawPool {
    authority: Option<Authority>,
    idle: Vec<(RawConn, quanta::Instant)>,
}

thread_local! {
    static RAW: RefCell<RawPool> = RefCell::new(RawPool::default());
}

/// The initial read buffer of a [`RawConn`] (it grows for longer response heads).
const RAW_BUF: usize = 4096;

impl Upstream {
    /// An idle connection to `authority` from this thread's pool. A pooled connection the
    /// upstream closed while it was idle is skipped: its socket polled readable (the end of
    /// stream, or bytes nobody asked for), which costs no system call when it did not.
    pub fn take_raw(&self, authority: &Authority) -> Option<RawConn> {
        RAW.with(|p| {
            let mut p = p.borrow_mut();
            if !same(p.authority.as_ref(), authority) {
                p.idle.clear();
                p.authority = Some(authority.clone());
            }
            let now = quanta::Instant::now();
            let stale = p.idle.iter().take_while(|(_, since)| now.duration_since(*since) >= IDLE_TIMEOUT).count();
            p.idle.drain(..stale);
            while let Some((mut c, _)) = p.idle.pop() {
                if c.still_open() {
                    c.reused = true;
                    return Some(c);
                }
            }
            None
        })
    }

    /// A new connection to `authority` (within the connect timeout).
    pub async fn connect_raw(&self, authority: &Authority) -> Result<RawConn, UpstreamError> {
        let stream = self.tcp(authority).await?;
        Ok(RawConn { stream, buf: vec![0; RAW_BUF], len: 0, reused: false })
    }

    /// Puts a connection whose last response was read to its end back in this thread's pool.
    pub fn put_raw(&self, authority: &Authority, mut c: RawConn) {
        RAW.with(|p| {
            let mut p = p.borrow_mut();
            if same(p.authority.as_ref(), authority) && p.idle.len() < MAX_IDLE && c.len == 0 {
                c.buf.truncate(RAW_BUF.max(c.buf.len().min(64 * 1024)));
                p.idle.push((c, quanta::Instant::now()));
            }
        });
    }
}

/// Whether a pool (the hyper one or the raw one) is `authority`'s: compared byte for byte
/// (http's `==` ignores letter case, at twice a request's cost); the same authority in another
/// case only starts a new pool.
fn same(pool: Option<&Authority>, authority: &Authority) -> bool {
    pool.is_some_and(|p| p.as_str() == authority.as_str())
}

impl RawConn {
    /// False when the upstream closed the connection (or sent something unasked) while idle.
    fn still_open(&mut self) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        match self.stream.poll_read_ready(&mut cx) {
            // Not known readable: nothing arrived (no system call was made).
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            }
        }
    }
}
