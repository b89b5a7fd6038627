//! The tenant listener's own HTTP/1.1 path (issue 14), in the manner of pingora's HTTP/1
//! implementation: requests are parsed with `httparse` straight from the connection's buffer,
//! forwarded over a pooled upstream socket ([`crate::upstream::RawConn`]) in one write, and the
//! answer relayed in one write, all on the connection's own task. hyper's server and client
//! cost ~20k instructions a call (header maps, a task and two channels per upstream exchange);
//! this path costs a quarter of that, which is what lets a metered call cost no more CPU than
//! nginx's `limit_req` proxying it.
//!
//! It serves the common request only, and hands the connection to hyper, for the rest of its
//! life, on the first request it does not serve ([`Served::HandOff`], with the bytes read so
//! far), so every rare or tricky case keeps hyper's behaviour:
//! - HTTP/2 (the connection preface) and any HTTP version but 1.1;
//! - every request when the upstream speaks HTTP/2 (`upstream_protocol = "h2c"`);
//! - a head hyper would refuse or that this path does not parse (`httparse` errors, over
//!   [`MAX_HEAD`] bytes or [`MAX_HEADERS`] fields, a target not in origin form or with bytes
//!   outside [`target_byte`]);
//! - `Transfer-Encoding`, `Expect`, `Upgrade`, `TE`, `Trailer`, a `Connection` that names
//!   other fields, two `Content-Length`s, a gRPC `content-type`, `CONNECT`;
//! - a body not entirely read with its head, or over [`MAX_BODY`] bytes.
//!
//! What it does is what the hyper path does (SPEC §4): the same decision ([`proxy::decide`]),
//! settlement and refusal table, the same headers dropped and added on the way up and down,
//! `header_read_timeout_ms` while waiting for a head (keep-alive idle included) and
//! `upstream_timeout_ms` for the upstream's response head. Header names keep the client's and
//! upstream's spelling (hyper lowercases them). A response without `Date` gets one.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::HeaderValue;
use http::uri::Authority;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::config::gateway::UpstreamProtocol;
use crate::error::ApiError;
use crate::gateway::{Conn, Gateway};
use crate::http_util::USAGE_FIELDS;
use crate::metrics::Outcome;
use crate::proxy::{self, Decision, Forward, HeadView, RateFields};
use crate::upstream::{RawConn, UpstreamError, MAX_RESPONSE_HEAD};

/// The longest request head this path serves (hyper's limit is larger: longer heads go there).
pub const MAX_HEAD: usize = 16 * 1024;
/// The longest request body this path forwards (read with its head, sent in the same write).
pub const MAX_BODY: usize = 64 * 1024;
/// The most header fields a request may have here.
pub const MAX_HEADERS: usize = 64;
/// The most header fields an upstream response may have (hyper's client's limit: the same
/// answer reads the same on both paths).
const MAX_RESPONSE_HEADERS: usize = 100;
/// HTTP/2's connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The client buffer's first size; it grows to hold a head and its body.
const CLIENT_BUF: usize = 4096;

/// How [`serve`] let go of the connection.
pub enum Served {
    /// Closed, or to be closed: the client left, asked to close, or the gateway is draining.
    Closed,
    /// To be served by hyper from here on: HTTP/2 (`h2`) or HTTP/1.1, starting with `read`.
    HandOff { h2: bool, read: Vec<u8> },
}

/// A byte range of a buffer.
type Span = (u32, u32);

fn slice(buf: &[u8], (a, b): Span) -> &[u8] {
    &buf[a as usize..b as usize]
}

/// A request head this path serves, as ranges of the connection's buffer.
struct Head {
    method: Span,
    /// The request target; `path_end` is where its path ends (its `?`, or its end).
    target: Span,
    path_end: u32,
    fields: [(Span, Span); MAX_HEADERS],
    count: usize,
    head_len: usize,
    body_len: usize,
    /// `Connection: close`.
    close: bool,
    has_host: bool,
}

impl Head {
    const EMPTY: Head = Head {
        method: (0, 0),
        target: (0, 0),
        path_end: 0,
        fields: [((0, 0), (0, 0)); MAX_HEADERS],
        count: 0,
        head_len: 0,
        body_len: 0,
        close: false,
        has_host: false,
    };
}

/// A parsed head over its buffer: what the decision reads ([`HeadView`]).
struct Req<'a> {
    buf: &'a [u8],
    head: &'a Head,
}

impl Req<'_> {
    fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.head.fields[..self.head.count].iter().map(|(n, v)| (slice(self.buf, *n), slice(self.buf, *v)))
    }
    fn method(&self) -> &[u8] {
        slice(self.buf, self.head.method)
    }
    fn path(&self) -> &str {
        // Checked to be ASCII by `target_byte`.
        std::str::from_utf8(slice(self.buf, (self.head.target.0, self.head.path_end))).unwrap_or("")
    }
    fn query(&self) -> Option<&[u8]> {
        (self.head.path_end < self.head.target.1).then(|| slice(self.buf, (self.head.path_end, self.head.target.1)))
    }
}

impl HeadView for Req<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        self.fields().find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes())).map(|(_, v)| v)
    }
    fn any_value(&self, name: &str, f: &mut dyn FnMut(&[u8]) -> bool) -> bool {
        self.fields().any(|(n, v)| n.eq_ignore_ascii_case(name.as_bytes()) && f(v))
    }
}

enum Parsed {
    /// In the `Head` given to [`parse_request`].
    Complete,
    Partial,
    HandOff,
}

/// Bytes of a request target this path accepts: RFC 3986's unreserved, sub-delims, `:`, `@`,
/// `/`, `?` and `%` (a subset of what hyper accepts; a target with any other byte, `#`
/// included, goes to hyper).
fn target_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

fn offset(buf: &[u8], part: &[u8]) -> u32 {
    (part.as_ptr() as usize - buf.as_ptr() as usize) as u32
}

fn span(buf: &[u8], part: &[u8]) -> Span {
    let a = offset(buf, part);
    (a, a + part.len() as u32)
}

/// Parses a request head at the start of `buf`; see the module docs for what is handed off.
fn parse_request(buf: &[u8], head: &mut Head) -> Parsed {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::HandOff,
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return Parsed::HandOff;
    };
    if method == "CONNECT" || !target.starts_with('/') || !target.bytes().all(target_byte) {
        return Parsed::HandOff;
    }
    let target_span = span(buf, target.as_bytes());
    // Bytes, not `str::find(char)`'s searcher: ~60 instructions a call fewer for the short
    // targets requests have (`loadtest/instructions.sh`, hot).
    let path_end = target_span.0 + target.bytes().position(|b| b == b'?').unwrap_or(target.len()) as u32;
    // Field by field: the connection's `Head` is reused, and its field array beyond `count` is
    // never read.
    head.method = span(buf, method.as_bytes());
    head.target = target_span;
    head.path_end = path_end;
    head.count = 0;
    head.head_len = head_len;
    head.body_len = 0;
    head.close = false;
    head.has_host = false;
    let mut length = None;
    for (i, f) in req.headers.iter().enumerate() {
        let (name, value) = (f.name.as_bytes(), f.value);
        head.fields[i] = (span(buf, name), span(buf, value));
        head.count = i + 1;
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("content-length") {
            // Not a length this path frames (several, malformed, past `usize`): hyper's to refuse.
            match (length, crate::http_util::content_length(value).and_then(|n| usize::try_from(n).ok())) {
                (None, Some(n)) => length = Some(n),
                _ => return Parsed::HandOff,
            }
        } else if is("transfer-encoding") || is("expect") || is("upgrade") || is("te") || is("trailer") {
            return Parsed::HandOff;
        } else if is("connection") {
            for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                if token.eq_ignore_ascii_case(b"close") {
                    head.close = true;
                } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                    return Parsed::HandOff;
                }
            }
        } else if is("content-type") {
            if value.len() >= 16 && value[..16].eq_ignore_ascii_case(b"application/grpc") {
                return Parsed::HandOff;
            }
        } else if is("host") {
            if head.has_host {
                // RFC 9112 §3.2: a 400, which hyper's path answers.
                return Parsed::HandOff;
            }
            head.has_host = true;
        }
    }
    head.body_len = match length {
        Some(n) if n <= MAX_BODY => n,
        Some(_) => return Parsed::HandOff,
        None => 0,
    };
    Parsed::Complete
}

/// A deadline on one `Sleep` per connection, moved lazily: setting a later deadline costs a
/// field write, and the timer, when it fires early, is re-armed to the deadline then (a
/// connection's timer fires at most once per timeout, not once per request).
///
/// Polled by one task only (its connection's), so once the timer has been polled since it was
/// last armed, it holds that task's waker until it fires: until then, a poll only looks
/// whether it has fired.
struct Deadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
    /// The timer was polled (so holds the task's waker) since it was last armed.
    polled: bool,
}

impl Deadline {
    fn new(at: Instant) -> Deadline {
        Deadline { sleep: Box::pin(tokio::time::sleep_until(at)), at, polled: false }
    }

    fn set(&mut self, at: Instant) {
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
            self.polled = false;
        }
        self.at = at;
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if self.polled && !self.sleep.is_elapsed() {
                return Poll::Pending;
            }
            if self.sleep.as_mut().poll(cx).is_pending() {
                self.polled = true;
                return Poll::Pending;
            }
            if Instant::now() >= self.at {
                return Poll::Ready(());
            }
            self.sleep.as_mut().reset(self.at);
            self.polled = false;
        }
    }
}

use std::future::Future as _;

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_string())
}

/// Reads into `buf[*len..]` (growing it to at least `want` bytes first).
fn poll_read_into(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    len: &mut usize,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    if buf.len() < want {
        buf.resize(want, 0);
    }
    let mut rb = ReadBuf::new(&mut buf[*len..]);
    std::task::ready!(Pin::new(stream).poll_read(cx, &mut rb))?;
    let n = rb.filled().len();
    *len += n;
    Poll::Ready(Ok(n))
}

/// Reads what has already arrived, without waiting, so that `buf` may hold `want` bytes; true
/// when something was read. Costs no system call when the socket is not known readable.
fn read_now(stream: &TcpStream, buf: &mut Vec<u8>, len: &mut usize, want: usize) -> io::Result<bool> {
    if buf.len() < want {
        buf.resize(want, 0);
    }
    match stream.try_read(&mut buf[*len..]) {
        Ok(0) => Ok(false),
        Ok(n) => {
            *len += n;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// Writes what the socket takes of `data[*done..]` now, without waiting (nor, when the socket
/// is known writable, the readiness bookkeeping of a poll): true when all of it is written.
fn write_now(stream: &TcpStream, data: &[u8], done: &mut usize) -> io::Result<bool> {
    while *done < data.len() {
        match stream.try_write(&data[*done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Writes all of `data`: at once when the socket takes it (as it nearly always does), waiting
/// for room otherwise.
async fn write_all(stream: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    let mut done = 0;
    if write_now(stream, data, &mut done)? {
        return Ok(());
    }
    std::future::poll_fn(|cx| {
        while done < data.len() {
            let n = std::task::ready!(Pin::new(&mut *stream).poll_write(cx, &data[done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            done += n;
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// Serves HTTP/1.1 requests on a tenant connection until it closes, the gateway drains it
/// (`stop` resolves: the request in progress is finished, then the connection closed), or a
/// request goes to hyper ([`Served::HandOff`]).
pub async fn serve(
    conn: &Arc<Conn>,
    stream: &mut TcpStream,
    stop: &mut tokio::sync::watch::Receiver<crate::server::DrainState>,
) -> io::Result<Served> {
    let gw = &conn.gw;
    let mut buf = vec![0u8; CLIENT_BUF];
    let mut len = 0usize;
    let mut out: Vec<u8> = Vec::with_capacity(1024);
    // One parsed head per connection, reused by each request (boxed: the fields would make
    // the connection's future 1 KiB larger, moved on every poll that moves it).
    let mut head = Box::new(Head::EMPTY);
    let header_timeout = gw.snapshot.load().settings.header_read_timeout;
    let mut deadline = Deadline::new(Instant::now() + header_timeout);
    // The drain: `changed` is polled once, which leaves this task's waker with the channel
    // until a drain (or the sender's end) wakes it; after that, a clone of the receiver tells
    // whether it came, with one load instead of a poll of the channel's waiter list.
    let probe = stop.clone();
    let mut stop = std::pin::pin!(stop.changed());
    let mut stop_polled = false;
    let mut draining = false;
    let mut first = true;
    loop {
        // Phase 0: a request head and its body, whole, in `buf`.
        deadline.set(Instant::now() + header_timeout);
        loop {
            if first && len > 0 && PREFACE.starts_with(&buf[..len.min(PREFACE.len())]) {
                if len >= PREFACE.len() {
                    buf.truncate(len);
                    return Ok(Served::HandOff { h2: true, read: buf });
                }
            } else if len > 0 && gw.upstream.protocol == UpstreamProtocol::H2c {
                // This path speaks HTTP/1.1 to the upstream; an h2c one gets every request
                // through hyper's HTTP/2 client (SPEC §3.1, `upstream_protocol`).
                buf.truncate(len);
                return Ok(Served::HandOff { h2: false, read: buf });
            } else if len > 0 {
                match parse_request(&buf[..len], &mut head) {
                    Parsed::Complete if head.head_len + head.body_len <= len => break,
                    // The rest of the body, if it is here already (sent with the head, beyond
                    // what the first read took); otherwise it is still coming: hyper streams it.
                    Parsed::Complete if read_now(stream, &mut buf, &mut len, head.head_len + head.body_len)? => {
                        continue;
                    }
                    Parsed::Complete | Parsed::HandOff => {
                        buf.truncate(len);
                        return Ok(Served::HandOff { h2: false, read: buf });
                    }
                    Parsed::Partial if len >= MAX_HEAD => {
                        buf.truncate(len);
                        return Ok(Served::HandOff { h2: false, read: buf });
                    }
                    Parsed::Partial => {}
                }
            }
            if draining && len == 0 {
                return Ok(Served::Closed);
            }
            // A full buffer doubles (a head over MAX_HEAD was handed off above).
            let want = if len == buf.len() { buf.len() * 2 } else { buf.len() };
            let read = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = poll_read_into(stream, &mut buf, &mut len, want, cx) {
                    return Poll::Ready(r.map(Some));
                }
                if !draining {
                    let drained = if stop_polled {
                        probe.has_changed().unwrap_or(true)
                    } else {
                        stop_polled = true;
                        stop.as_mut().poll(cx).is_ready()
                    };
                    if drained {
                        draining = true;
                        return Poll::Ready(Ok(None));
                    }
                }
                if deadline.poll(cx).is_ready() {
                    return Poll::Ready(Err(timed_out("no request within server.header_read_timeout_ms")));
                }
                Poll::Pending
            })
            .await?;
            if read == Some(0) {
                // The end of the stream (a request cut short included: hyper closes likewise).
                return Ok(Served::Closed);
            }
        }
        first = false;
        let total = head.head_len + head.body_len;
        let keep = handle(conn, stream, &buf[..total], &head, &mut out, &mut deadline).await?;
        // Phase 4: the next request, if any, starts where this one ended; a buffer grown for
        // a body goes back to its first size.
        buf.copy_within(total..len, 0);
        len -= total;
        if buf.len() > 4 * CLIENT_BUF && len <= CLIENT_BUF {
            buf.truncate(CLIENT_BUF);
            buf.shrink_to_fit();
        }
        if !keep || draining || !gw.ready.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(Served::Closed);
        }
    }
}

/// The answer of one request, from the decision to its last byte. Returns whether the
/// connection may serve another.
async fn handle(
    conn: &Arc<Conn>,
    stream: &mut TcpStream,
    buf: &[u8],
    head: &Head,
    out: &mut Vec<u8>,
    deadline: &mut Deadline,
) -> io::Result<bool> {
    let gw = &conn.gw;
    // The TSC through quanta (~10 ns); std's `Instant::now` is a `clock_gettime` (~60 ns here).
    let start = quanta::Instant::now();
    let req = Req { buf, head };
    let decision = if gw.billing.decides_at_once() {
        proxy::decide_now(gw, &req, req.path())
    } else {
        Box::pin(proxy::decide(gw, &req, req.path())).await
    };
    let fwd = match decision {
        Decision::Reject(e, who, rate) => {
            proxy::count_refusal(gw, &e, who, start);
            return refuse(gw, stream, &req, &e, rate, None, out).await;
        }
        Decision::Forward(fwd) => fwd,
    };
    forward(conn, stream, &req, fwd, out, deadline, start).await
}

/// Writes a refusal in the one JSON error shape, with the fields
/// [`crate::http_util::error_response`] gives it on the hyper path: `content-type`, the
/// rate-limit fields, `x-turnstile-payer` (refusals after the decision), `retry-after` (a 429)
/// and `connection: close` where the refusal closes the connection. Written straight into
/// `out`: a 429 flood answers here, and nothing is allocated.
async fn refuse(
    gw: &Gateway,
    stream: &mut TcpStream,
    req: &Req<'_>,
    e: &ApiError,
    rate: Option<RateFields>,
    payer: Option<&HeaderValue>,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    thread_local! {
        static BODY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let close = req.head.close || e.closes_connection() || !gw.ready.load(std::sync::atomic::Ordering::Relaxed);
    let status = e.status();
    out.clear();
    status_line(out, status.as_u16(), status.canonical_reason().unwrap_or(""));
    field(out, b"content-type", crate::error::JSON.as_bytes());
    if let Some(rate) = rate {
        rate_fields(out, rate);
    }
    if let Some(payer) = payer {
        field(out, b"x-turnstile-payer", payer.as_bytes());
    }
    if let Some(secs) = e.retry_after() {
        out.extend_from_slice(b"retry-after: ");
        num(out, secs);
        out.extend_from_slice(b"\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    BODY.with(|body| {
        let mut body = body.borrow_mut();
        body.clear();
        crate::error::write_error_body(&mut body, e.code(), e);
        content_length(out, body.len() as u64);
        date(out);
        out.extend_from_slice(b"\r\n");
        if req.method() != b"HEAD" {
            out.extend_from_slice(&body);
        }
    });
    write_all(stream, out).await?;
    Ok(!close)
}

/// `ratelimit-policy` and `ratelimit`.
fn rate_fields(out: &mut Vec<u8>, rate: RateFields) {
    field(out, b"ratelimit-policy", rate.policy().as_bytes());
    field(out, b"ratelimit", rate.state().as_bytes());
}

fn status_line(out: &mut Vec<u8>, code: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    num(out, u64::from(code));
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

fn content_length(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(b"content-length: ");
    num(out, n);
    out.extend_from_slice(b"\r\n");
}

fn num(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// `date: <IMF-fixdate>`, formatted once a second per thread.
fn date(out: &mut Vec<u8>) {
    thread_local! {
        static DATE: std::cell::RefCell<(u64, [u8; 29])> = const { std::cell::RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = std::time::SystemTime::now();
    let secs = now.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == 29 {
                d.1.copy_from_slice(s.as_bytes());
                d.0 = secs;
            }
        }
        field(out, b"date", &d.1);
    });
}

/// The request as it goes upstream (SPEC §4), into `out`: the normalized path under the
/// upstream's base, hop-by-hop fields and the API key dropped, `x-turnstile-*` set by the
/// gateway alone, `X-Forwarded-For` appended, then the body.
fn upstream_request(conn: &Conn, req: &Req<'_>, fwd: &Forward, out: &mut Vec<u8>) {
    let s = &fwd.snap().settings;
    let base = s.upstream.path().trim_end_matches('/');
    out.clear();
    out.extend_from_slice(req.method());
    out.push(b' ');
    out.extend_from_slice(base.as_bytes());
    out.extend_from_slice(fwd.normalized_path().unwrap_or(req.path()).as_bytes());
    if let Some(q) = req.query() {
        out.extend_from_slice(q);
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let api_key = s.api_key_header.as_str().as_bytes();
    let mut xff: Option<usize> = None;
    for (name, value) in req.fields() {
        if crate::http_util::hop_by_hop(name)
            || name.eq_ignore_ascii_case(api_key)
            || (fwd.key_in_authorization() && name.eq_ignore_ascii_case(b"authorization"))
            || crate::http_util::turnstile_field(name)
        {
            continue;
        }
        if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            // Folded into one field below, with the peer's address last.
            xff.get_or_insert(0);
            continue;
        }
        field(out, name, value);
    }
    if !req.head.has_host {
        field(out, b"host", s.upstream.authority().map_or("", Authority::as_str).as_bytes());
    }
    field(out, b"x-turnstile-tenant", fwd.tenant().as_bytes());
    field(out, b"x-turnstile-feature", fwd.feature().as_bytes());
    out.extend_from_slice(b"x-forwarded-for: ");
    if xff.is_some() {
        for (name, value) in req.fields() {
            if name.eq_ignore_ascii_case(b"x-forwarded-for") {
                out.extend_from_slice(value);
                out.extend_from_slice(b", ");
            }
        }
    }
    out.extend_from_slice(conn.peer_ip.as_bytes());
    out.extend_from_slice(b"\r\n\r\n");
    out.extend_from_slice(&req.buf[req.head.head_len..req.head.head_len + req.head.body_len]);
}

/// How an upstream response's body ends (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body (a response to HEAD, 1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Read until the upstream closes.
    Close,
}

/// An upstream response head. Its fields that go on to the client are written out as it is
/// parsed; what the gateway still needs of it is kept here (the usage reports as ranges of the
/// upstream connection's buffer).
struct RespHead {
    code: u16,
    head_len: usize,
    framing: Framing,
    /// The upstream keeps the connection open (HTTP/1.1 without `Connection: close`).
    keep_alive: bool,
    has_date: bool,
    /// The first value of each usage report field ([`USAGE_FIELDS`])...
    usage: [Option<Span>; USAGE_FIELDS.len()],
    /// ... and, bit `i`, whether field `i` came again with another value: no report.
    conflicting: u8,
}

const _: () = assert!(USAGE_FIELDS.len() <= u8::BITS as usize, "a bit of `conflicting` per usage field");

enum RespParsed {
    Complete(RespHead),
    /// An interim (1xx) response of this many bytes: skipped.
    Interim(usize),
    Partial,
}

/// At most this many field names a response's `Connection` may list (they are dropped with it);
/// more make the answer a 502.
const MAX_LISTED: usize = 8;

/// Parses an upstream response head at the start of `buf`. When it is complete (and final),
/// `out` receives the client's status line and the fields that go on: all but the hop-by-hop
/// ones, those its `Connection` lists, a `Content-Length` beside a `Transfer-Encoding` (RFC 9112
/// §6.3), and the gateway's own ([`crate::http_util::gateway_field`]: the rate-limit fields and
/// `x-turnstile-*` in any spelling).
fn parse_response(buf: &[u8], head_request: bool, out: &mut Vec<u8>) -> Result<RespParsed, ApiError> {
    let mut fields = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_RESPONSE_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let head_len =
        match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut resp, buf, &mut fields) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Ok(RespParsed::Partial),
            Err(_) => return Err(ApiError::UpstreamUnavailable),
        };
    let code = resp.code.unwrap_or(0);
    if code < 100 {
        // Not a status code (RFC 9110 §15: 100 to 599; hyper's client refuses under 100).
        return Err(ApiError::UpstreamUnavailable);
    }
    if (100..200).contains(&code) {
        // 101 would switch protocols, which was not asked for.
        return if code == 101 { Err(ApiError::UpstreamUnavailable) } else { Ok(RespParsed::Interim(head_len)) };
    }
    let mut head = RespHead {
        code,
        head_len,
        framing: Framing::Close,
        keep_alive: resp.version == Some(1),
        has_date: false,
        usage: [None; USAGE_FIELDS.len()],
        conflicting: 0,
    };
    let (mut length, mut chunked, mut coded, mut other_coding) = (None, false, false, false);
    let mut listed: [&[u8]; MAX_LISTED] = [b""; MAX_LISTED];
    let mut n_listed = 0;
    for f in resp.headers.iter() {
        let (name, value) = (f.name.as_bytes(), f.value);
        if name.eq_ignore_ascii_case(b"content-length") {
            match (length, crate::http_util::content_length(value)) {
                (None, Some(n)) => length = Some(n),
                (Some(a), Some(b)) if a == b => {}
                _ => return Err(ApiError::UpstreamUnavailable),
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            coded = true;
            other_coding |= crate::http_util::other_transfer_coding(value);
            // Only the last field counts when there are several (their list, joined, ends there).
            chunked = value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .rfind(|t| !t.is_empty())
                .is_some_and(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name.eq_ignore_ascii_case(b"connection") {
            for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|t| !t.is_empty()) {
                if t.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if !t.eq_ignore_ascii_case(b"keep-alive") {
                    *listed.get_mut(n_listed).ok_or(ApiError::UpstreamUnavailable)? = t;
                    n_listed += 1;
                }
            }
        } else if name.eq_ignore_ascii_case(b"date") {
            head.has_date = true;
        } else if let Some(i) = USAGE_FIELDS.iter().position(|u| name.eq_ignore_ascii_case(u.as_bytes())) {
            // As the hyper path reads it (`HeadView::report`): the one value, the same when
            // repeated; another value makes the field no report.
            match head.usage[i] {
                None => head.usage[i] = Some(span(buf, value)),
                Some(first) if slice(buf, first).trim_ascii() != value.trim_ascii() => head.conflicting |= 1 << i,
                Some(_) => {}
            }
        }
    }
    head.framing = if head_request || code == 204 || code == 304 {
        Framing::Empty
    } else if coded && resp.version == Some(0) {
        // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing (hyper's
        // client refuses it too).
        return Err(ApiError::UpstreamUnavailable);
    } else if coded && other_coding {
        // A coding the gateway does not undo: relayed without its (hop-by-hop) field, the
        // client would read the coded bytes as the content.
        return Err(ApiError::UpstreamUnavailable);
    } else if coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        match length {
            Some(n) => Framing::Length(n),
            None => Framing::Close,
        }
    };
    if head.framing == Framing::Close {
        head.keep_alive = false;
    }
    out.clear();
    status_line(out, code, resp.reason.unwrap_or(""));
    let listed = &listed[..n_listed];
    for f in resp.headers.iter() {
        let name = f.name.as_bytes();
        if crate::http_util::hop_by_hop(name)
            || (coded && name.eq_ignore_ascii_case(b"content-length"))
            || crate::http_util::gateway_field(name)
            // The length the body is relayed by stays, listed or not (hyper's path sends one too).
            || (listed.iter().any(|l| name.eq_ignore_ascii_case(l)) && !name.eq_ignore_ascii_case(b"content-length"))
        {
            continue;
        }
        field(out, name, f.value);
    }
    Ok(RespParsed::Complete(head))
}

/// Where a chunked body's end is, read by passing its bytes through (RFC 9112 §7.1): the
/// bytes go to the client as they are; this only finds where the last chunk and the trailer
/// section end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunks {
    /// In a chunk-size line (hex digits, then extensions); `digits` seen so far.
    Size {
        size: u64,
        digits: u8,
        ext: bool,
    },
    /// The `\n` ending a size line.
    SizeLf {
        size: u64,
    },
    Data(u64),
    DataCr,
    DataLf,
    /// The trailer section's start, after the last chunk: its end (an empty line), or a field,
    /// where [`Chunks::advance`] stops in [`Chunks::Fields`].
    TrailerStart,
    /// Stopped at the trailer section's first field: the caller filters the section
    /// ([`filter_trailers`]); advancing goes on over it.
    Fields,
    /// The trailer section: at a line start, or in a line.
    TrailerLineStart,
    TrailerLine,
    TrailerLf {
        empty: bool,
    },
    Done,
}

impl Chunks {
    const START: Chunks = Chunks::Size { size: 0, digits: 0, ext: false };

    /// Advances over `data`; returns how many bytes belong to the body (all of them unless its
    /// end is in `data`, or its trailer fields: see [`Chunks::Fields`]), or an error for a
    /// malformed body.
    fn advance(&mut self, data: &[u8]) -> Result<usize, ()> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            *self = match *self {
                Chunks::Done => return Ok(i),
                Chunks::TrailerStart => match b {
                    b'\r' => Chunks::TrailerLf { empty: true },
                    b'\n' => Chunks::Done,
                    _ => {
                        *self = Chunks::Fields;
                        return Ok(i);
                    }
                },
                Chunks::Size { size, digits, ext } => match b {
                    b'\r' if digits > 0 => Chunks::SizeLf { size },
                    b'\n' if digits > 0 => Self::after_size(size),
                    _ if ext => Chunks::Size { size, digits, ext },
                    b';' | b' ' | b'\t' if digits > 0 => Chunks::Size { size, digits, ext: true },
                    _ => {
                        let d = (b as char).to_digit(16).ok_or(())?;
                        if digits >= 15 {
                            return Err(());
                        }
                        Chunks::Size { size: size * 16 + u64::from(d), digits: digits + 1, ext }
                    }
                },
                Chunks::SizeLf { size } if b == b'\n' => Self::after_size(size),
                Chunks::SizeLf { .. } => return Err(()),
                Chunks::Data(n) => {
                    let take = (n as usize).min(data.len() - i);
                    i += take;
                    let left = n - take as u64;
                    *self = if left == 0 { Chunks::DataCr } else { Chunks::Data(left) };
                    continue;
                }
                Chunks::DataCr if b == b'\r' => Chunks::DataLf,
                Chunks::DataCr | Chunks::DataLf if b == b'\n' => Self::START,
                Chunks::DataCr | Chunks::DataLf => return Err(()),
                Chunks::TrailerLineStart => match b {
                    b'\r' => Chunks::TrailerLf { empty: true },
                    b'\n' => Chunks::Done,
                    _ => Chunks::TrailerLine,
                },
                Chunks::Fields | Chunks::TrailerLine => match b {
                    b'\r' => Chunks::TrailerLf { empty: false },
                    b'\n' => Chunks::TrailerLineStart,
                    _ => Chunks::TrailerLine,
                },
                Chunks::TrailerLf { empty } if b == b'\n' => {
                    if empty {
                        Chunks::Done
                    } else {
                        Chunks::TrailerLineStart
                    }
                }
                Chunks::TrailerLf { .. } => return Err(()),
            };
            i += 1;
        }
        Ok(i)
    }

    fn after_size(size: u64) -> Chunks {
        if size == 0 {
            Chunks::TrailerStart
        } else {
            Chunks::Data(size)
        }
    }
}

/// The forward and settle phases on this path: one write of the request to a pooled upstream
/// connection, the response head within `upstream_timeout_ms`, the settlement of a 2xx, then
/// the answer relayed to the client.
async fn forward(
    conn: &Arc<Conn>,
    stream: &mut TcpStream,
    req: &Req<'_>,
    fwd: Forward,
    out: &mut Vec<u8>,
    deadline: &mut Deadline,
    start: quanta::Instant,
) -> io::Result<bool> {
    let gw = &conn.gw;
    let (pair, tenant, feature, shadow) = (fwd.pair(), fwd.tenant(), fwd.feature(), fwd.shadow());
    let rate = fwd.rate();
    let reserved_payer = fwd.reserved_payer();
    let head_request = req.method() == b"HEAD";
    // The snapshot through this thread's handle: the upstream's authority is borrowed from it
    // (a clone of its `Bytes` would write a reference count every core writes).
    let snap = fwd.snapshot_handle().clone();
    let authority = snap.settings.upstream.authority();
    let upstream_timeout = fwd.snap().settings.upstream_timeout;
    upstream_request(conn, req, &fwd, out);
    let sent = quanta::Instant::now();
    let exchanged = match authority {
        Some(a) => exchange(gw, a, out, head_request, idempotent(req.method()), deadline, upstream_timeout).await,
        None => Err(ApiError::UpstreamUnavailable),
    };
    gw.metrics.upstream_duration.observe(sent.elapsed().as_secs_f64());
    // Answers the gateway makes after the decision carry its rate-limit fields and payer too.
    let (mut up, resp) = match exchanged {
        Ok(x) => x,
        Err(e) => {
            let outcome = e.outcome();
            // A reserved package share goes back: nothing is charged.
            drop(fwd);
            // Counted before the answer is written: a client that left still counts.
            gw.metrics.request_pair(pair, tenant, feature, outcome);
            gw.metrics.observe_duration(outcome, start.elapsed().as_secs_f64());
            return refuse(gw, stream, req, &e, Some(rate), Some(&reserved_payer), out).await;
        }
    };
    let (payer, outcome) = if (200..300).contains(&resp.code) {
        let headers = UsageReports { buf: &up.buf[..up.len], head: &resp };
        let settled = if gw.billing.settles_at_once() {
            proxy::settle_at_once(gw, fwd, &headers)
        } else {
            Box::pin(proxy::settle(gw, fwd, &headers)).await
        };
        match settled {
            Ok(payer) => (payer, Outcome::Admitted),
            Err(e) => {
                // Strict ledger failing: the upstream's answer is dropped and the call not charged.
                let outcome = e.outcome();
                gw.metrics.request_pair(pair, tenant, feature, outcome);
                gw.metrics.observe_duration(outcome, start.elapsed().as_secs_f64());
                return refuse(gw, stream, req, &e, Some(rate), Some(&reserved_payer), out).await;
            }
        }
    } else {
        // Not charged: dropping `fwd` gives a reserved package share back. An Image Search
        // count it reports is taken all the same (SPEC §4: the count after the call).
        if fwd.is_image() {
            let headers = UsageReports { buf: &up.buf[..up.len], head: &resp };
            Box::pin(proxy::resync_images(gw, fwd, &headers)).await;
        } else {
            drop(fwd);
        }
        (reserved_payer, Outcome::Admitted)
    };
    let outcome = if outcome == Outcome::Admitted { shadow.unwrap_or(outcome) } else { outcome };
    let close =
        req.head.close || resp.framing == Framing::Close || !gw.ready.load(std::sync::atomic::Ordering::Relaxed);
    // The rest of the response head (its status line and the upstream's fields are in `out`).
    if resp.framing == Framing::Chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    if close {
        out.extend_from_slice(b"connection: close\r\n");
    }
    if !resp.has_date {
        date(out);
    }
    rate_fields(out, rate);
    field(out, b"x-turnstile-payer", payer.as_bytes());
    out.extend_from_slice(b"\r\n");
    gw.metrics.request_pair(pair, tenant, feature, outcome);
    gw.metrics.observe_duration(outcome, start.elapsed().as_secs_f64());
    let head_len = resp.head_len;
    let relayed = relay(stream, &mut up, head_len, resp.framing, out).await;
    match relayed {
        Ok(true) if resp.keep_alive => {
            if let Some(a) = authority {
                gw.upstream.put_raw(a, up);
            }
        }
        _ => {}
    }
    relayed.map(|_| !close)
}

/// Methods a request may be sent again for when a reused connection fails before any answer
/// (RFC 9110 §9.2.2; nginx's `proxy_next_upstream` does not resend the others either).
fn idempotent(method: &[u8]) -> bool {
    matches!(method, b"GET" | b"HEAD" | b"OPTIONS" | b"TRACE" | b"PUT" | b"DELETE")
}

/// The usage reports of an upstream answer, for the settlement.
struct UsageReports<'a> {
    buf: &'a [u8],
    head: &'a RespHead,
}

impl HeadView for UsageReports<'_> {
    fn header(&self, name: &str) -> Option<&[u8]> {
        let i = USAGE_FIELDS.iter().position(|u| *u == name)?;
        self.head.usage[i].map(|s| slice(self.buf, s))
    }
    fn report(&self, name: &str) -> Option<&[u8]> {
        let i = USAGE_FIELDS.iter().position(|u| *u == name)?;
        match self.head.conflicting & (1 << i) {
            0 => self.head.usage[i].map(|s| slice(self.buf, s)),
            _ => None,
        }
    }
}

/// Sends the request in `out` on a pooled (or new) upstream connection and reads the response
/// head (its client-bound part then in `out`).
/// A reused connection that fails before any byte of an answer is replaced by a new one, once,
/// for an idempotent request.
async fn exchange(
    gw: &Gateway,
    authority: &Authority,
    out: &mut Vec<u8>,
    head_request: bool,
    idempotent: bool,
    deadline: &mut Deadline,
    timeout: Duration,
) -> Result<(RawConn, RespHead), ApiError> {
    deadline.set(Instant::now() + timeout);
    let mut retried = false;
    loop {
        let up = match gw.upstream.take_raw(authority) {
            Some(c) => Ok(c),
            None => {
                let connecting = std::future::poll_fn(|cx| deadline.poll(cx));
                tokio::select! {
                    biased;
                    c = gw.upstream.connect_raw(authority) => c,
                    _ = connecting => return Err(ApiError::UpstreamTimeout { timeout_ms: timeout.as_millis() as u64 }),
                }
            }
        };
        let mut up = match up {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "upstream connection failed");
                return Err(match e {
                    UpstreamError::ConnectTimeout { .. } => {
                        ApiError::UpstreamTimeout { timeout_ms: timeout.as_millis() as u64 }
                    }
                    _ => ApiError::UpstreamUnavailable,
                });
            }
        };
        let reused = up.reused;
        match send_and_read_head(&mut up, out, head_request, deadline).await {
            Ok(head) => return Ok((up, head)),
            Err(Failure::Timeout) => return Err(ApiError::UpstreamTimeout { timeout_ms: timeout.as_millis() as u64 }),
            Err(Failure::Broken { answered }) if reused && !answered && idempotent && !retried => {
                retried = true;
                continue;
            }
            Err(Failure::Broken { .. }) | Err(Failure::Malformed) => return Err(ApiError::UpstreamUnavailable),
        }
    }
}

enum Failure {
    Timeout,
    /// The connection failed; `answered`: some bytes of a response had come.
    Broken {
        answered: bool,
    },
    Malformed,
}

/// Sends the request in `out` and reads the response head, whose client-bound part then
/// replaces the request in `out` ([`parse_response`]).
async fn send_and_read_head(
    up: &mut RawConn,
    out: &mut Vec<u8>,
    head_request: bool,
    deadline: &mut Deadline,
) -> Result<RespHead, Failure> {
    let broken = |_| Failure::Broken { answered: false };
    let mut done = 0;
    let request = &out[..];
    // Nearly always all of it at once; the rest, if any, as the socket makes room.
    write_now(&up.stream, request, &mut done).map_err(broken)?;
    std::future::poll_fn(|cx| {
        while done < request.len() {
            match Pin::new(&mut up.stream).poll_write(cx, &request[done..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(Failure::Broken { answered: false })),
                Poll::Ready(Ok(n)) => done += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(broken(e))),
                Poll::Pending => {
                    return if deadline.poll(cx).is_ready() {
                        Poll::Ready(Err(Failure::Timeout))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
        Poll::Ready(Ok(()))
    })
    .await?;
    loop {
        if up.len > 0 {
            match parse_response(&up.buf[..up.len], head_request, out) {
                Ok(RespParsed::Complete(head)) if head.head_len > MAX_RESPONSE_HEAD => return Err(Failure::Malformed),
                Ok(RespParsed::Complete(head)) => return Ok(head),
                Ok(RespParsed::Interim(n)) => {
                    up.buf.copy_within(n..up.len, 0);
                    up.len -= n;
                    continue;
                }
                Ok(RespParsed::Partial) if up.len >= MAX_RESPONSE_HEAD => return Err(Failure::Malformed),
                Ok(RespParsed::Partial) => {}
                Err(_) => return Err(Failure::Malformed),
            }
        }
        let answered = up.len > 0;
        // A full buffer doubles (a head over MAX_RESPONSE_HEAD was refused above).
        let want = if up.len == up.buf.len() { up.buf.len() * 2 } else { up.buf.len() };
        let n = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = poll_read_into(&mut up.stream, &mut up.buf, &mut up.len, want, cx) {
                return Poll::Ready(r.map_err(|_| Failure::Broken { answered }));
            }
            if deadline.poll(cx).is_ready() {
                return Poll::Ready(Err(Failure::Timeout));
            }
            Poll::Pending
        })
        .await?;
        if n == 0 {
            return Err(Failure::Broken { answered });
        }
    }
}

/// Relays the response: `out` (its head), then its body from the upstream connection's buffer
/// and socket, as it comes. True when the body was read to its end (the upstream connection
/// can serve another request); an error when the client could not be written to.
async fn relay(
    client: &mut TcpStream,
    up: &mut RawConn,
    head_len: usize,
    framing: Framing,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    // What of the body came with the head.
    let mut chunks = Chunks::START;
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    let mut pos = head_len;
    let mut finished = framing == Framing::Empty || left == 0;
    let take = |data: &[u8], chunks: &mut Chunks, left: &mut u64| -> Result<(usize, bool), ()> {
        match framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let n = (*left).min(data.len() as u64) as usize;
                *left -= n as u64;
                Ok((n, *left == 0))
            }
            Framing::Chunked => {
                let n = chunks.advance(data)?;
                Ok((n, *chunks == Chunks::Done))
            }
            Framing::Close => Ok((data.len(), false)),
        }
    };
    if !finished {
        let Ok((n, end)) = take(&up.buf[pos..up.len], &mut chunks, &mut left) else {
            // The head goes out (the answer has begun; no 502 can replace it) and the error
            // closes the client's connection, as it does for a body malformed later: kept open,
            // its next answer would be read as the rest of this body.
            write_all(client, out).await?;
            return Err(malformed_chunks());
        };
        out.extend_from_slice(&up.buf[pos..pos + n]);
        pos += n;
        finished = end;
    }
    // Bytes past the body (an upstream must not send them before the next request): not
    // reused. Or the trailer fields, which go with the rest of the answer.
    let extra = pos < up.len;
    up.buf.copy_within(pos..up.len, 0);
    up.len -= pos;
    if chunks == Chunks::Fields {
        return relay_trailers(client, up, chunks, out).await;
    }
    write_all(client, out).await?;
    while !finished {
        up.len = 0;
        let n = std::future::poll_fn(|cx| {
            let cap = up.buf.len();
            poll_read_into(&mut up.stream, &mut up.buf, &mut up.len, cap, cx)
        })
        .await;
        let n = match n {
            Ok(0) if framing == Framing::Close => return Ok(false),
            Ok(0) | Err(_) => {
                // The upstream broke mid-body: the client's answer is cut short too.
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the upstream closed mid-body"));
            }
            Ok(n) => n,
        };
        let Ok((used, end)) = take(&up.buf[..n], &mut chunks, &mut left) else {
            return Err(malformed_chunks());
        };
        if chunks == Chunks::Fields {
            out.clear();
            out.extend_from_slice(&up.buf[..used]);
            up.buf.copy_within(used..n, 0);
            up.len = n - used;
            return relay_trailers(client, up, chunks, out).await;
        }
        write_all(client, &up.buf[..used]).await?;
        finished = end;
        if used < n {
            up.buf.copy_within(used..n, 0);
            up.len = n - used;
            return Ok(false);
        }
        up.len = 0;
    }
    Ok(!extra && up.len == 0)
}

fn malformed_chunks() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "malformed chunked body from the upstream")
}

/// Relays the rest of a chunked answer from its trailer fields on (`chunks` stopped at them in
/// [`Chunks::Fields`]; they start `up.buf`, `out` holds what of the answer is still to be
/// written): the section is read whole, within [`MAX_RESPONSE_HEAD`] bytes as a head is, and
/// written after `out` with only the fields that go on ([`filter_trailers`]). Most answers
/// have no trailer fields and never come here. True when nothing followed the section.
async fn relay_trailers(
    client: &mut TcpStream,
    up: &mut RawConn,
    mut chunks: Chunks,
    out: &mut Vec<u8>,
) -> io::Result<bool> {
    let mut scanned = 0;
    loop {
        scanned += chunks.advance(&up.buf[scanned..up.len]).map_err(|()| malformed_chunks())?;
        if chunks == Chunks::Done {
            break;
        }
        if up.len >= MAX_RESPONSE_HEAD {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "upstream trailer section over 64 KiB"));
        }
        let want = if up.len == up.buf.len() { up.buf.len() * 2 } else { up.buf.len() };
        let n = std::future::poll_fn(|cx| poll_read_into(&mut up.stream, &mut up.buf, &mut up.len, want, cx)).await;
        if !matches!(n, Ok(1..)) {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the upstream closed mid-trailers"));
        }
    }
    filter_trailers(&up.buf[..scanned], out).map_err(|()| malformed_chunks())?;
    write_all(client, out).await?;
    let extra = scanned < up.len;
    up.len = 0;
    Ok(!extra)
}

/// Appends to `out` the fields of a trailer section (its field lines and the empty line that
/// ends it) that go on to the client, as the answer's head does: not the hop-by-hop ones nor
/// the gateway's own ([`crate::http_util::dropped_trailer`]); then the empty line.
fn filter_trailers(section: &[u8], out: &mut Vec<u8>) -> Result<(), ()> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let Ok(httparse::Status::Complete((_, fields))) = httparse::parse_headers(section, &mut fields) else {
        return Err(());
    };
    for f in fields {
        if !crate::http_util::dropped_trailer(f.name.as_bytes()) {
            field(out, f.name.as_bytes(), f.value);
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked_end(body: &[u8]) -> Result<Option<usize>, ()> {
        let mut c = Chunks::START;
        let mut n = c.advance(body)?;
        if c == Chunks::Fields {
            n += c.advance(&body[n..])?;
        }
        Ok((c == Chunks::Done).then_some(n))
    }

    #[test]
    fn chunked_bodies_end_where_their_last_chunk_and_trailers_end() {
        assert_eq!(chunked_end(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(chunked_end(b"3\r\nabc\r\n0\r\n\r\nNEXT"), Ok(Some(13)));
        assert_eq!(chunked_end(b"a;ext=1\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\n"), Ok(Some(34)));
        assert_eq!(chunked_end(b"3\r\nabc\r\n"), Ok(None), "no last chunk yet");
        assert_eq!(chunked_end(b"3\nabc\n0\n\n"), Ok(Some(9)), "bare LF line ends");
        assert!(chunked_end(b"x\r\n").is_err());
        assert!(chunked_end(b"3\r\nabcX").is_err(), "data not followed by CRLF");
        assert!(chunked_end(b"ffffffffffffffff0\r\n").is_err(), "size overflow");
        // Fed a byte at a time, the same end is found; the advance stops once, at the first
        // trailer field.
        let body = b"5\r\nhello\r\n0\r\nt: v\r\n\r\n";
        let mut c = Chunks::START;
        for (i, b) in body.iter().enumerate() {
            if i == 13 {
                assert_eq!((c.advance(std::slice::from_ref(b)), c), (Ok(0), Chunks::Fields), "byte {i}");
            }
            assert_eq!(c.advance(std::slice::from_ref(b)), Ok(1), "byte {i}");
        }
        assert_eq!(c, Chunks::Done);
        // No trailer fields: no stop.
        let mut c = Chunks::START;
        assert_eq!((c.advance(b"2\r\nok\r\n0\r\n\r\n"), c), (Ok(12), Chunks::Done));
    }

    /// The trailer section goes on as the head does: the gateway's own fields (any spelling)
    /// and hop-by-hop ones dropped, the rest, usage reports and gRPC's included, kept in order.
    #[test]
    fn trailers_are_relayed_without_the_gateway_fields_and_hop_by_hop_ones() {
        let section = b"x-turnstile-payer: upstream\r\nX-Turnstile_Payer: u\r\nGrpc-Status: 0\r\n\
            RateLimit: fake\r\nConnection: close\r\nx-usage-video-ms: 5\r\nX-Kept: yes\r\n\r\n";
        let mut out = b"0\r\n".to_vec();
        filter_trailers(section, &mut out).expect("well-formed");
        assert_eq!(String::from_utf8_lossy(&out), "0\r\nGrpc-Status: 0\r\nx-usage-video-ms: 5\r\nX-Kept: yes\r\n\r\n");
        let mut out = Vec::new();
        filter_trailers(b"\n", &mut out).expect("bare LF");
        assert!(filter_trailers(b"no colon\r\n\r\n", &mut out).is_err());
    }

    fn parsed(raw: &[u8]) -> Option<Box<Head>> {
        let mut head = Box::new(Head::EMPTY);
        match parse_request(raw, &mut head) {
            Parsed::Complete => Some(head),
            _ => None,
        }
    }

    #[test]
    fn the_fast_path_takes_plain_requests_and_hands_off_the_rest() {
        let h = parsed(b"GET /v1/infer?x=1 HTTP/1.1\r\nHost: a\r\nx-api-key: k\r\n\r\n").expect("plain GET");
        let raw: &[u8] = b"GET /v1/infer?x=1 HTTP/1.1\r\nHost: a\r\nx-api-key: k\r\n\r\n";
        let req = Req { buf: raw, head: &h };
        assert_eq!(req.path(), "/v1/infer");
        assert_eq!(req.query(), Some(&b"?x=1"[..]));
        assert_eq!(req.header("x-api-key"), Some(&b"k"[..]));
        assert!(h.has_host && !h.close);
        let post =
            parsed(b"POST /p HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc").expect("small POST");
        assert_eq!((post.body_len, post.close), (3, true));
        for handed_off in [
            &b"GET /p HTTP/1.0\r\n\r\n"[..],
            b"GET http://a/p HTTP/1.1\r\n\r\n",
            b"GET /p#f HTTP/1.1\r\n\r\n",
            b"GET /a\"b HTTP/1.1\r\n\r\n",
            b"POST /p HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\na",
            b"POST /p HTTP/1.1\r\nContent-Length: +1\r\n\r\na",
            b"POST /p HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            b"GET /p HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
            b"GET /p HTTP/1.1\r\nConnection: x-secret\r\n\r\n",
            b"POST /p HTTP/1.1\r\ncontent-type: application/grpc\r\n\r\n",
            b"POST /p HTTP/1.1\r\nContent-Length: 70000\r\n\r\n",
            b"GET /p HTTP/1.1\r\nbad header\r\n\r\n",
        ] {
            assert!(
                matches!(parse_request(handed_off, &mut Box::new(Head::EMPTY)), Parsed::HandOff),
                "{:?} is handed to hyper",
                String::from_utf8_lossy(handed_off)
            );
        }
        assert!(matches!(parse_request(b"GET /p HTTP/1.1\r\nHost", &mut Box::new(Head::EMPTY)), Parsed::Partial));
        // A connection's head is reused: nothing of the request before stays in it.
        let mut head =
            parsed(b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc").unwrap();
        let next: &[u8] = b"GET /q HTTP/1.1\r\nx: 1\r\n\r\n";
        assert!(matches!(parse_request(next, &mut head), Parsed::Complete));
        assert_eq!((head.count, head.body_len, head.close, head.has_host), (1, 0, false, false));
        assert_eq!((Req { buf: next, head: &head }.path(), head.head_len), ("/q", next.len()));
    }

    #[test]
    fn upstream_framing_follows_rfc_9112() {
        let framing = |raw: &[u8], head: bool| match parse_response(raw, head, &mut Vec::new()) {
            Ok(RespParsed::Complete(h)) => Some((h.framing, h.keep_alive)),
            _ => None,
        };
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false),
            Some((Framing::Length(3), true))
        );
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false),
            Some((Framing::Chunked, true))
        );
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false), None);
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", false), None);
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\n\r\n", false),
            Some((Framing::Close, false))
        );
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\n\r\n", false), Some((Framing::Close, false)));
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", true), Some((Framing::Empty, true)));
        assert_eq!(framing(b"HTTP/1.1 204 No Content\r\n\r\n", false), Some((Framing::Empty, true)));
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", false),
            Some((Framing::Length(0), false))
        );
        assert_eq!(framing(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false), Some((Framing::Length(0), false)));
        assert!(framing(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", false).is_none());
        // RFC 9110 §8.6: `Content-Length = 1*DIGIT`; Rust's `u64::from_str` also takes a `+`.
        for bad in ["+2", "-0", "0x2", "2 2", "", "18446744073709551616"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\nok");
            assert!(framing(raw.as_bytes(), false).is_none(), "Content-Length: {bad:?}");
        }
        assert_eq!(
            framing(b"HTTP/1.1 200 OK\r\nContent-Length:  007 \r\n\r\n", false),
            Some((Framing::Length(7), true))
        );
        assert!(matches!(
            parse_response(b"HTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n", false, &mut Vec::new()),
            Ok(RespParsed::Interim(37))
        ));
    }

    #[test]
    fn the_client_gets_the_upstream_fields_that_are_not_hop_by_hop() {
        let raw = b"HTTP/1.1 201 Made\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\nKeep-Alive: 5\r\n\
            Connection: x-private, keep-alive\r\nX-Private: 1\r\nRatelimit: fake\r\nX-Usage-Video-Ms: 1500\r\n\
            X-Kept: yes\r\n\r\n";
        let mut out = Vec::new();
        let Ok(RespParsed::Complete(head)) = parse_response(raw, false, &mut out) else { panic!("complete") };
        assert_eq!(
            String::from_utf8_lossy(&out),
            "HTTP/1.1 201 Made\r\nX-Usage-Video-Ms: 1500\r\nX-Kept: yes\r\n",
            "no length beside the coding, no hop-by-hop or listed field, no gateway field"
        );
        assert_eq!((head.framing, head.keep_alive, head.has_date), (Framing::Chunked, true, false));
        let reports = UsageReports { buf: raw, head: &head };
        assert_eq!(reports.header("x-usage-video-ms"), Some(&b"1500"[..]));
        assert_eq!(reports.header("x-usage-image-count"), None);
        let many = b"HTTP/1.1 200 OK\r\nConnection: a, b, c, d, e, f, g, h, i\r\nContent-Length: 0\r\n\r\n";
        assert!(parse_response(many, false, &mut out).is_err(), "over MAX_LISTED listed fields: a 502");
    }

    /// A status code is three digits, 100 to 599 (RFC 9110 §15; hyper's client refuses under
    /// 100): an upstream's `000` or `099` must be a 502, not relayed as `HTTP/1.1 0`.
    #[test]
    fn a_status_under_100_is_not_relayed() {
        for raw in
            [&b"HTTP/1.1 000 Zero\r\nContent-Length: 0\r\n\r\n"[..], b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n"]
        {
            let mut out = Vec::new();
            let r = parse_response(raw, false, &mut out);
            assert!(r.is_err(), "{:?} relayed as {:?}", String::from_utf8_lossy(raw), String::from_utf8_lossy(&out));
        }
    }

    /// The settlement reads the same usage report from an upstream answer on both paths (the
    /// hyper path reads a `HeaderMap`): a field repeated with different values is no report
    /// (SPEC §4: a malformed video report bills 0 minutes; an image count is not taken), one
    /// repeated with the same value is that value.
    #[test]
    fn repeated_usage_reports_read_as_on_the_hyper_path() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-usage-video-ms: 1000\r\n\
            x-usage-video-ms: 3600000\r\nx-usage-image-count: 5\r\nX-Usage-Image-Count: 999999\r\n\
            x-usage-video-fps: 30\r\nx-usage-video-fps:  30 \r\nx-usage-video-lines: 1080\r\n\r\n";
        let Ok(RespParsed::Complete(head)) = parse_response(raw, false, &mut Vec::new()) else { panic!("complete") };
        let fast = UsageReports { buf: raw, head: &head };
        let mut map = http::HeaderMap::new();
        for (n, v) in [
            ("x-usage-video-ms", "1000"),
            ("x-usage-video-ms", "3600000"),
            ("x-usage-image-count", "5"),
            ("x-usage-image-count", "999999"),
            ("x-usage-video-fps", "30"),
            ("x-usage-video-fps", "30"),
            ("x-usage-video-lines", "1080"),
        ] {
            map.append(n, http::HeaderValue::from_static(v));
        }
        for (name, expected) in [
            ("x-usage-video-ms", None),
            ("x-usage-image-count", None),
            ("x-usage-video-fps", Some(&b"30"[..])),
            ("x-usage-video-lines", Some(&b"1080"[..])),
        ] {
            assert_eq!(fast.report(name), expected, "{name} on the fast path");
            assert_eq!(HeadView::report(&map, name), expected, "{name} on the hyper path");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// Any bytes, or a valid request with bytes changed: the parsers never panic, and what
        /// they accept stays inside the buffer and is what hyper's path would route on.
        #[test]
        fn parsers_take_any_bytes(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            flips in proptest::collection::vec((0usize..120, proptest::prelude::any::<u8>()), 0..4),
        ) {
            let mut req = b"POST /v1/raw/a/../b?q=1 HTTP/1.1\r\nHost: h\r\nx-api-key: k\r\nContent-Length: 3\r\n\r\nabc".to_vec();
            for (at, b) in flips {
                if at < req.len() {
                    req[at] = b;
                }
            }
            // One head for both, as a connection reuses it: nothing of the first may remain.
            let mut head = Box::new(Head::EMPTY);
            for buf in [&raw[..], &req[..]] {
                if let Parsed::Complete = parse_request(buf, &mut head) {
                    proptest::prop_assert!(head.head_len <= buf.len() && head.body_len <= MAX_BODY);
                    let view = Req { buf, head: &head };
                    proptest::prop_assert!(view.path().starts_with('/'));
                    proptest::prop_assert!(!view.path().contains('?'));
                    let target = std::str::from_utf8(slice(buf, head.target)).expect("ASCII target");
                    let uri: http::Uri = target.parse().expect("hyper accepts what the fast path takes");
                    proptest::prop_assert_eq!(uri.path(), view.path());
                    proptest::prop_assert_eq!(uri.query().map(|q| format!("?{q}")), view.query().map(|q| String::from_utf8_lossy(q).into_owned()));
                    for (n, v) in view.fields() {
                        proptest::prop_assert!(!n.is_empty() && !v.contains(&b'\n'));
                    }
                }
                let mut out = Vec::new();
                if let Ok(RespParsed::Complete(head)) = parse_response(buf, false, &mut out) {
                    proptest::prop_assert!(head.head_len <= buf.len());
                    proptest::prop_assert!(out.starts_with(b"HTTP/1.1 "));
                }
                let mut c = Chunks::START;
                if let Ok(n) = c.advance(buf) {
                    proptest::prop_assert!(n <= buf.len());
                }
            }
        }
    }
}
