//! Request bodies at the connection edge (SPEC §4).
//!
//! - [`Upload`]: the body forwarded upstream, cut off at `max_request_body_bytes` (413) and when
//!   no byte arrives for `body_read_timeout_ms` (408, nginx `client_body_timeout` semantics).
//! - [`drain`]: a body the gateway refused is read and discarded in the background, within
//!   [`DRAIN_MAX_BYTES`] and [`DRAIN_MAX_TIME`] / [`DRAIN_IDLE`] (nginx's lingering close), so a
//!   client that writes its whole upload before reading still reads the answer instead of a
//!   connection reset. hyper 1's HTTP/1 server keeps reading a request body after the response
//!   is written for as long as the body's [`Incoming`] is alive and polled; when it is dropped
//!   unfinished, hyper closes the connection (with data unread, the kernel then sends a reset).
//! - [`TenantBody`]: the tenant listener's response body; a refusal carries the refused request
//!   body and starts draining it only once hyper has written the response head, so that a
//!   request with `Expect: 100-continue` is answered without `100 Continue` (hyper sends it
//!   when the body is first polled before a response head is written).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::grpc::TrailerGate;
use crate::http_util::ProxyBody;

/// The most bytes of a refused request body read and discarded before the connection is closed.
pub const DRAIN_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// The longest a refused request body is drained, in all.
pub const DRAIN_MAX_TIME: Duration = Duration::from_secs(10);
/// The longest wait for the next piece of a refused request body (nginx `lingering_timeout`).
pub const DRAIN_IDLE: Duration = Duration::from_secs(5);

/// Reads and discards `body` within the drain bounds, then drops it: hyper keeps the connection
/// alive when the body was read to its end, and closes it otherwise.
pub async fn drain(mut body: Incoming) {
    let deadline = Instant::now() + DRAIN_MAX_TIME;
    let mut read = 0u64;
    loop {
        let wait = deadline.min(Instant::now() + DRAIN_IDLE);
        match tokio::time::timeout_at(wait, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if read > DRAIN_MAX_BYTES {
                    tracing::debug!(read, "refused request body over the drain limit: closing the connection");
                    return;
                }
            }
            Ok(None) => return,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "refused request body ended with an error");
                return;
            }
            Err(_) => {
                tracing::debug!(read, "refused request body stalled or took too long: closing the connection");
                return;
            }
        }
    }
}

/// Drains `body` in the background if anything is left to read (and a runtime is there to run
/// it on: not while the runtime shuts down).
pub fn spawn_drain(body: Incoming) {
    if body.is_end_stream() {
        return;
    }
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(drain(body));
    }
}

/// The response body of the tenant listener. The upstream's trailers reach the client filtered
/// as its head is ([`crate::http_util::strip_trailers`]).
pub struct TenantBody {
    inner: ProxyBody,
    /// A refused request's body, drained once the response head is written.
    refused: Option<Incoming>,
    /// A gRPC call's charge, waiting for the upstream's trailers ([`TrailerGate`]).
    gate: Option<TrailerGate>,
}

impl TenantBody {
    pub fn new(inner: ProxyBody) -> TenantBody {
        TenantBody { inner, refused: None, gate: None }
    }

    /// A gRPC call's streamed answer, charged when its trailers say OK.
    pub fn gated(inner: ProxyBody, gate: Option<TrailerGate>) -> TenantBody {
        TenantBody { inner, refused: None, gate }
    }

    /// A response sent before the request body was read: the body is drained once hyper has
    /// written the response head (it polls a response body only after writing the head, and
    /// drops one that is empty right after writing the head).
    pub fn refusal(inner: ProxyBody, request_body: Incoming) -> TenantBody {
        TenantBody { inner, refused: (!request_body.is_end_stream()).then_some(request_body), gate: None }
    }
}

impl Drop for TenantBody {
    fn drop(&mut self) {
        if let Some(b) = self.refused.take() {
            spawn_drain(b);
        }
    }
}

impl Body for TenantBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(b) = this.refused.take() {
            spawn_drain(b);
        }
        let Some(gate) = this.gate.as_mut() else {
            return match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(mut frame))) => {
                    // The upstream's trailers go on as its head does (SPEC §4): without the
                    // gateway's own fields and hop-by-hop ones.
                    if let Some(t) = frame.trailers_mut() {
                        crate::http_util::strip_trailers(t);
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                other => other,
            };
        };
        if !gate.settling() {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_trailers() {
                    Ok(mut trailers) => {
                        crate::http_util::strip_trailers(&mut trailers);
                        if let Some(t) = gate.trailers(trailers) {
                            this.gate = None;
                            return Poll::Ready(Some(Ok(Frame::trailers(t))));
                        }
                    }
                    Err(data) => return Poll::Ready(Some(Ok(data))),
                },
                Poll::Pending => return Poll::Pending,
                // Ended without trailers, or broke: not a success; dropping the gate drops the charge.
                other => {
                    this.gate = None;
                    return other;
                }
            }
        }
        match gate.poll_settled(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(t) => {
                this.gate = None;
                Poll::Ready(t.map(|t| Ok(Frame::trailers(t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream() && self.gate.as_ref().is_none_or(|g| !g.settling())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Why an upload was cut off.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UploadError {
    #[error("the request body is over {0} bytes")]
    TooLarge(u64),
    #[error("no request body bytes arrived for {0:?}")]
    Stalled(Duration),
}

/// A request body on its way upstream: at most `limit` bytes, and never more than `idle` waiting
/// for the client's next bytes; its trailers, if any, are not passed on. The time the upstream
/// takes to accept bytes does not count: the clock runs only while this body waits on the client.
pub struct Upload {
    body: Option<Incoming>,
    limit: u64,
    read: u64,
    idle: Duration,
    /// Armed while waiting on the client; allocated the first time the body has to wait.
    timer: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    polled: bool,
    /// The client sent `Expect: 100-continue`.
    expect: bool,
    /// Where the cut-off is noted ([`Upload::noting_failure`]).
    failure: Option<std::sync::Arc<std::sync::OnceLock<UploadError>>>,
}

impl Upload {
    pub fn new(body: Incoming, limit: u64, idle: Duration, expect_continue: bool) -> Upload {
        Upload {
            body: Some(body),
            limit,
            read: 0,
            idle,
            timer: None,
            waiting: false,
            polled: false,
            expect: expect_continue,
            failure: None,
        }
    }

    /// Also notes why the upload was cut off in the returned slot. Needed with an HTTP/2
    /// upstream: hyper's HTTP/2 client sends the body from a task of its own and answers the
    /// request with a stream reset, not with this body's error (HTTP/1 returns the error itself).
    pub fn noting_failure(mut self) -> (Upload, std::sync::Arc<std::sync::OnceLock<UploadError>>) {
        let slot = std::sync::Arc::new(std::sync::OnceLock::new());
        self.failure = Some(slot.clone());
        (self, slot)
    }

    fn fail(&mut self, e: UploadError) -> Box<dyn std::error::Error + Send + Sync> {
        if let Some(slot) = &self.failure {
            let _ = slot.set(e.clone());
        }
        e.into()
    }
}

impl Drop for Upload {
    /// An upload given up before its end (upstream refused, timed out, answered early): drain
    /// what the client still sends, so it reads the answer. Not when the client asked for
    /// `100 Continue` and the body was never asked for: polling it now would send `100
    /// Continue`, so hyper is left to close the connection without it.
    fn drop(&mut self) {
        if let Some(b) = self.body.take() {
            if self.polled || !self.expect {
                spawn_drain(b);
            }
        }
    }
}

impl Body for Upload {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else { return Poll::Ready(None) };
        this.polled = true;
        match Pin::new(body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => {
                // Request trailers end the upload here: they could carry what the gateway
                // removes from the head (the API key, `x-turnstile-*`: SPEC §4), and an HTTP/1.1
                // upstream never gets them either.
                this.body = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.waiting = false;
                this.read += frame.data_ref().map_or(0, |d| d.len() as u64);
                if this.read > this.limit {
                    // The client is still sending: drain the rest so it reads the 413.
                    if let Some(b) = this.body.take() {
                        spawn_drain(b);
                    }
                    return Poll::Ready(Some(Err(this.fail(UploadError::TooLarge(this.limit)))));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.body = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.body = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                let timer = match (&mut this.timer, this.waiting) {
                    (Some(t), true) => t,
                    (timer, _) => {
                        this.waiting = true;
                        let deadline = Instant::now() + this.idle;
                        match timer {
                            Some(t) => {
                                t.as_mut().reset(deadline);
                                t
                            }
                            None => timer.insert(Box::pin(tokio::time::sleep_until(deadline))),
                        }
                    }
                };
                if timer.as_mut().poll(cx).is_ready() {
                    // The client stalled: nothing to drain; hyper closes the connection after the 408.
                    this.body = None;
                    return Poll::Ready(Some(Err(this.fail(UploadError::Stalled(this.idle)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.body.as_ref().map_or(SizeHint::with_exact(0), |b| b.size_hint())
    }
}

/// The [`UploadError`] somewhere in an error's source chain.
pub fn upload_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a UploadError> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(u) = err.downcast_ref::<UploadError>() {
            return Some(u);
        }
        cur = err.source();
    }
    None
}
