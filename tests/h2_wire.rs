//! What a tenant can do over HTTP/2 (prior knowledge) at the frame level, against an HTTP/1.1
//! upstream that records the bytes it receives: connection-specific and malformed fields, pseudo
//! headers an HTTP/2 client library would never send, `content-length` that disagrees with the
//! DATA frames, the API key sent several ways, streams reset mid-body and mid-answer. The client
//! writes frames by hand (HPACK literals, no Huffman), so every byte the gateway gets is chosen.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::wire::Wire;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(5);
/// The feature every `/v1/raw/*` path is (the test configuration's routes).
const FEATURE: &str = "license-plate-recognition";

/// One upstream connection as the upstream saw it: every byte, and whether the gateway closed it.
#[derive(Default, Clone)]
struct Seen {
    bytes: Vec<u8>,
    closed: bool,
}

/// An HTTP/1.1 upstream on raw sockets that records every byte of every connection. It answers
/// each request once its head and its body (`Content-Length`, or chunked) have arrived: 200 with
/// the request line as the body; a path ending in `/slow` gets a 100-byte answer whose first 10
/// bytes come at once and the rest after 2 s.
struct RawUpstream {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Seen>>>,
    /// The request line of each complete request, in the order they arrived.
    lines: Arc<Mutex<Vec<String>>>,
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let conns = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (c, l2) = (conns.clone(), lines.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let i = {
                    let mut v = c.lock().expect("lock");
                    v.push(Seen::default());
                    v.len() - 1
                };
                tokio::spawn(serve_raw_upstream(s, c.clone(), l2.clone(), i));
            }
        });
        RawUpstream { addr, conns, lines }
    }

    fn conns(&self) -> Vec<Seen> {
        self.conns.lock().expect("lock").clone()
    }

    /// Every byte received, all connections.
    fn all(&self) -> String {
        self.conns().iter().map(|c| String::from_utf8_lossy(&c.bytes).into_owned()).collect()
    }

    /// The request lines of the complete requests received, in order.
    fn request_lines(&self) -> Vec<String> {
        self.lines.lock().expect("lock").clone()
    }
}

/// The end of the first complete request in `buf` (head and body), if it is all there.
fn request_end(buf: &[u8]) -> Option<usize> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.contains("\r\ntransfer-encoding: chunked") {
        return buf[head_end..].windows(5).position(|w| w == b"0\r\n\r\n").map(|p| head_end + p + 5);
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (buf.len() >= head_end + len).then_some(head_end + len)
}

async fn serve_raw_upstream(mut s: TcpStream, conns: Arc<Mutex<Vec<Seen>>>, lines: Arc<Mutex<Vec<String>>>, i: usize) {
    let mut buf = Vec::new();
    loop {
        while let Some(end) = request_end(&buf) {
            let request: Vec<u8> = buf.drain(..end).collect();
            let line = String::from_utf8_lossy(&request).lines().next().unwrap_or("").to_string();
            lines.lock().expect("lock").push(line.clone());
            let path = line.split(' ').nth(1).unwrap_or("").split('?').next().unwrap_or("").to_string();
            if path.ends_with("/slow") {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789").await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                let _ = s.write_all(&[b'x'; 90]).await;
            } else {
                let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{line}", line.len());
                if s.write_all(answer.as_bytes()).await.is_err() {
                    break;
                }
            }
        }
        let mut chunk = [0u8; 8192];
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                conns.lock().expect("lock")[i].bytes.extend_from_slice(&chunk[..n]);
            }
        }
    }
    conns.lock().expect("lock")[i].closed = true;
}

/// Every path under `/v1/raw/` is the pay-as-you-go license-plate feature, which tenant globex
/// (key `key-globex`, or `key-acme` for acme) may call at `default_qps`.
fn gateway(up: &RawUpstream, default_qps: u32) -> (ConfigDir, Gateway) {
    let main = main_toml(&format!("http://{}", up.addr), "", &format!("[admission]\ndefault_qps = {default_qps}\n"))
        .replace(
            "[[routes]]\npath = \"/v1/face/compare\"",
            "[[routes]]\npath = \"/v1/raw/*\"\nfeature = \"license-plate-recognition\"\n\n[[routes]]\npath = \"/v1/face/compare\"",
        );
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    (cfg, gw)
}

// ---- A hand-written HTTP/2 client ----

const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const END_STREAM: u8 = 1;
const END_HEADERS: u8 = 4;

/// A header field as sent: name and value bytes.
type Field<'a> = (&'a [u8], &'a [u8]);

/// What came back on one stream.
#[derive(Debug, Default, Clone)]
struct Answer {
    /// The first byte of the response's header block: 0x88 is `:status 200`, 0x8c 400, 0x8d
    /// 404 (HPACK static table; the gateway's h2 encoder indexes them); other statuses start
    /// with a literal.
    status_byte: Option<u8>,
    body: Vec<u8>,
    ended: bool,
    reset: Option<u32>,
}

impl Answer {
    fn ok(&self) -> bool {
        self.status_byte == Some(0x88) && self.reset.is_none()
    }
    /// The JSON error code of a refusal, or "" for an answer that is not one.
    fn code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

struct H2 {
    s: TcpStream,
    buf: Vec<u8>,
    streams: HashMap<u32, Answer>,
    goaway: bool,
    eof: bool,
    /// Whether received DATA is acknowledged with WINDOW_UPDATE (off: the client reads no more
    /// than its initial window).
    give_window: bool,
}

fn hpack_int(out: &mut Vec<u8>, mut n: usize) {
    // 7-bit prefix, no Huffman.
    if n < 127 {
        out.push(n as u8);
        return;
    }
    out.push(127);
    n -= 127;
    while n >= 128 {
        out.push((n % 128 + 128) as u8);
        n /= 128;
    }
    out.push(n as u8);
}

/// A header block of literal fields without indexing, names and values as given (pseudo
/// headers included, in the order given).
fn block(fields: &[Field]) -> Vec<u8> {
    let mut b = Vec::new();
    for (n, v) in fields {
        b.push(0);
        hpack_int(&mut b, n.len());
        b.extend_from_slice(n);
        hpack_int(&mut b, v.len());
        b.extend_from_slice(v);
    }
    b
}

impl H2 {
    async fn connect(addr: SocketAddr) -> H2 {
        H2::connect_with_window(addr, None).await
    }

    /// With `window`, the streams' initial window (SETTINGS_INITIAL_WINDOW_SIZE), never given back.
    async fn connect_with_window(addr: SocketAddr, window: Option<u32>) -> H2 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.expect("preface");
        let give_window = window.is_none();
        let mut h = H2 { s, buf: Vec::new(), streams: HashMap::new(), goaway: false, eof: false, give_window };
        let settings: Vec<u8> = window.map_or(Vec::new(), |w| [&4u16.to_be_bytes()[..], &w.to_be_bytes()].concat());
        h.frame(SETTINGS, 0, 0, &settings).await;
        h
    }

    async fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        // The gateway may have closed the connection (GOAWAY): the reads tell.
        let _ = self.s.write_all(&f).await;
    }

    async fn headers(&mut self, stream: u32, fields: &[Field<'_>], end_stream: bool) {
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.frame(HEADERS, flags, stream, &block(fields)).await;
    }

    async fn data(&mut self, stream: u32, bytes: &[u8], end_stream: bool) {
        self.frame(DATA, if end_stream { END_STREAM } else { 0 }, stream, bytes).await;
    }

    async fn rst(&mut self, stream: u32) {
        self.frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()).await; // CANCEL
    }

    /// A request with globex's key and the usual pseudo headers, with `extra` fields after them.
    async fn request(&mut self, stream: u32, path: &str, extra: &[Field<'_>], body: Option<&[u8]>) {
        let mut fields: Vec<Field> = vec![
            (b":method", if body.is_some() { b"POST" } else { b"GET" }),
            (b":scheme", b"http"),
            (b":authority", b"tenant.example"),
            (b":path", path.as_bytes()),
        ];
        if !extra.iter().any(|(n, _)| n.eq_ignore_ascii_case(b"x-api-key") || *n == b"authorization") {
            fields.push((b"x-api-key", b"key-globex"));
        }
        fields.extend_from_slice(extra);
        self.headers(stream, &fields, body.is_none()).await;
        if let Some(b) = body {
            self.data(stream, b, true).await;
        }
    }

    /// Reads frames until `stream` ended (END_STREAM or RST_STREAM), the connection went away,
    /// or `limit` passed; returns what came on it.
    async fn wait(&mut self, stream: u32, limit: Duration) -> Answer {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let a = self.streams.get(&stream).cloned().unwrap_or_default();
            if a.ended || a.reset.is_some() || self.goaway || self.eof {
                return a;
            }
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    self.on_frame(f[3], f[4], u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff, &f[9..])
                        .await;
                    continue;
                }
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.s.read(&mut chunk)).await {
                Err(_) => return a,
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    async fn on_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        match kind {
            SETTINGS if flags & 1 == 0 => self.frame(SETTINGS, 1, 0, &[]).await,
            PING if flags & 1 == 0 => self.frame(PING, 1, 0, payload).await,
            GOAWAY => self.goaway = true,
            HEADERS => {
                let a = self.streams.entry(stream).or_default();
                // No PADDED or PRIORITY flags from the gateway's encoder.
                if a.status_byte.is_none() {
                    a.status_byte = payload.first().copied();
                }
                a.ended |= flags & END_STREAM != 0;
            }
            DATA => {
                let a = self.streams.entry(stream).or_default();
                a.body.extend_from_slice(payload);
                a.ended |= flags & END_STREAM != 0;
                // Give the window back, so long answers keep coming.
                if self.give_window && !payload.is_empty() {
                    let inc = (payload.len() as u32).to_be_bytes();
                    self.frame(8, 0, 0, &inc).await;
                    self.frame(8, 0, stream, &inc).await;
                }
            }
            RST_STREAM => {
                let code = payload.get(..4).map_or(0, |c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                self.streams.entry(stream).or_default().reset = Some(code);
            }
            _ => {}
        }
    }
}

/// The same path asked over HTTP/1.1 (through hyper's path, as HTTP/2 is): the error code, or
/// "" for a 200, and the request line the upstream got.
async fn over_h1(gw: &Gateway, up: &RawUpstream, path: &str) -> (String, Option<String>) {
    let before = up.request_lines().len();
    let mut w = Wire::connect(gw.addr).await;
    let req = format!("GET {path} HTTP/1.1\r\nHost: tenant.example\r\nTE: trailers\r\nx-api-key: key-globex\r\n\r\n");
    w.s.write_all(req.as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("an HTTP/1.1 answer");
    let code = if r.status == 200 { String::new() } else { r.error_code() };
    (code, up.request_lines().get(before).cloned())
}

/// SPEC §4: "No spelling of a path reaches a feature that its plain spelling would not": a
/// `:path` is judged exactly as the same target over HTTP/1.1 (routed, or refused with the same
/// code), reaches the upstream in the same normal form, and a refused one never resets the
/// connection's other streams.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_path_spelling_over_http2_is_judged_as_over_http1() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 1000);
    let paths = [
        "/v1/raw/x",
        "/v1/detect/%2e%2e/%2E%2E/raw/x",
        "/v1/detect/../../v1/raw/x",
        "//v1//raw///x",
        "/v1/%72aw/x",
        "/v1/raw/x?q=/../../v1/detect/y",
        "/v1/raw%2Fx",
        "/v1/raw%2fx",
        "/v1/detect%2F..%2F..%2Fraw/x",
        "/v1/raw%5Cx",
        "/v1/detect/..;/raw/x",
        "/v1/raw/x;v=1",
        "/v1/ocr/license-plate;v=1",
        "/v1/raw/x#/../../detect/y",
        "*",
        "http://evil.example/v1/raw/x",
        "/v1/face/compare/../../detect/x",
    ];
    let mut h2 = H2::connect(gw.addr).await;
    let mut stream = 1;
    for path in paths {
        let before = up.request_lines().len();
        h2.request(stream, path, &[], None).await;
        let a = h2.wait(stream, T).await;
        assert!(!h2.goaway && !h2.eof, "{path}: the connection went away");
        let h2_line = up.request_lines().get(before).cloned();
        let (h1_code, h1_line) = over_h1(&gw, &up, path).await;
        if a.reset.is_some() {
            // A `:path` that HTTP/2 itself calls malformed (RFC 9113 §8.3.1: an absolute URI)
            // is reset by the HTTP/2 layer (PROTOCOL_ERROR) before the gateway sees it; over
            // HTTP/1.1 the same target is a 400.
            assert_eq!((a.reset, h1_code.as_str()), (Some(1), "bad_path"), "{path}: {a:?}");
        } else {
            assert!(a.ended, "{path}: answered: {a:?}");
            assert_eq!(a.code(), h1_code, "{path}: the same decision over HTTP/2 and HTTP/1.1");
            assert_eq!(a.ok(), h1_code.is_empty(), "{path}: {a:?}");
        }
        let target = |l: Option<String>| l.map(|l| l.replace(" HTTP/1.1", ""));
        assert_eq!(target(h2_line), target(h1_line), "{path}: the upstream got the same target");
        stream += 2;
    }
    // Nothing outside /v1/raw/ reached the upstream under any spelling.
    for line in up.request_lines() {
        assert!(line.starts_with("GET /v1/raw/x"), "{line}");
    }
    for line in up.all().split("\r\n").filter(|l| l.ends_with(" HTTP/1.1")) {
        assert!(line.starts_with("GET /v1/raw/x"), "{line}");
    }
}

/// `:method CONNECT`, a `:path` that is empty, an unknown pseudo header, a pseudo header after a
/// regular field: each is a malformed request (RFC 9113 §8.3, §8.5) or a refusal; none reaches
/// the upstream or another feature, and the connection serves its next stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_pseudo_headers_are_refused_per_stream() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 1000);
    let key: Field = (b"x-api-key", b"key-globex");
    let cases: Vec<(&str, Vec<Field>)> = vec![
        ("CONNECT", vec![(b":method", b"CONNECT"), (b":authority", b"tenant.example:443"), key]),
        (
            "CONNECT with a path",
            vec![(b":method", b"CONNECT"), (b":authority", b"tenant.example:443"), (b":path", b"/v1/raw/x"), key],
        ),
        (
            "extended CONNECT",
            vec![
                (b":method", b"CONNECT"),
                (b":protocol", b"websocket"),
                (b":scheme", b"http"),
                (b":authority", b"tenant.example"),
                (b":path", b"/v1/raw/x"),
                key,
            ],
        ),
        ("empty :path", vec![(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b""), key]),
        ("no :path", vec![(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), key]),
        ("pseudo after a field", vec![(b":method", b"GET"), (b":scheme", b"http"), key, (b":path", b"/v1/raw/x")]),
        (
            "two :path",
            vec![
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/v1/raw/x"),
                (b":path", b"/v1/detect/x"),
                key,
            ],
        ),
        (
            ":status in a request",
            vec![(b":status", b"200"), (b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/v1/raw/x"), key],
        ),
    ];
    let mut h2 = H2::connect(gw.addr).await;
    let mut stream = 1;
    for (what, fields) in &cases {
        h2.headers(stream, fields, true).await;
        let a = h2.wait(stream, T).await;
        assert!(!h2.goaway && !h2.eof, "{what}: the connection went away");
        assert!(a.reset.is_some() || (a.ended && !a.ok()), "{what}: refused: {a:?}");
        // Only a CONNECT of an authority alone is well-formed HTTP/2: the gateway refuses it as
        // over HTTP/1.1 (not an origin-form target); the rest are reset by the HTTP/2 layer.
        if *what == "CONNECT" {
            assert_eq!(a.code(), "bad_path", "{what}: {a:?}");
        } else {
            assert_eq!(a.reset, Some(1), "{what}: PROTOCOL_ERROR: {a:?}");
        }
        assert!(up.request_lines().is_empty(), "{what}: reached the upstream: {:?}", up.request_lines());
        stream += 2;
    }
    // `:scheme` other than http and no `:authority` (a `host` field instead) are ordinary
    // requests: routed by `:path` alone, the `host` going on as the authority.
    h2.headers(
        stream,
        &[(b":method", b"GET"), (b":scheme", b"gopher"), (b":path", b"/v1/raw/y"), (b"host", b"h.example"), key],
        true,
    )
    .await;
    let a = h2.wait(stream, T).await;
    assert!(a.ok(), "{a:?}");
    let all = up.all();
    assert!(all.starts_with("GET /v1/raw/y HTTP/1.1\r\n") && all.contains("\r\nhost: h.example\r\n"), "{all}");
}

/// RFC 9113 §8.2.2: fields that are connection-specific in HTTP/1.1 make an HTTP/2 request
/// malformed; with a `content-length` other than the DATA frames', or two that disagree, too.
/// None of them reaches the HTTP/1.1 upstream (where they would frame a second request), the
/// connection serves its next stream, and what the upstream then gets is that one request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_specific_fields_and_wrong_lengths_never_reach_an_http1_upstream() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 1000);
    let smuggled = b"5\r\nhello\r\n0\r\n\r\nGET /v1/detect/x HTTP/1.1\r\nHost: a\r\n\r\n";
    let cases: Vec<(&str, Vec<Field>, &[u8])> = vec![
        ("transfer-encoding", vec![(b"transfer-encoding", b"chunked")], smuggled),
        ("connection", vec![(b"connection", b"keep-alive")], b"{}"),
        ("keep-alive", vec![(b"keep-alive", b"timeout=5")], b"{}"),
        ("proxy-connection", vec![(b"proxy-connection", b"keep-alive")], b"{}"),
        ("upgrade", vec![(b"upgrade", b"websocket")], b"{}"),
        ("te: gzip", vec![(b"te", b"gzip")], b"{}"),
        ("te: trailers, gzip", vec![(b"te", b"trailers, gzip")], b"{}"),
        ("content-length under the data", vec![(b"content-length", b"2")], smuggled),
        ("content-length over the data", vec![(b"content-length", b"99")], b"{}"),
        ("signed content-length", vec![(b"content-length", b"+2")], b"{}"),
        ("two content-lengths", vec![(b"content-length", b"2"), (b"content-length", b"50")], smuggled),
    ];
    let mut h2 = H2::connect(gw.addr).await;
    let mut stream = 1;
    for (what, extra, body) in &cases {
        h2.request(stream, "/v1/raw/x", extra, Some(body)).await;
        let a = h2.wait(stream, T).await;
        assert!(!h2.goaway && !h2.eof, "{what}: the connection went away");
        assert!(!a.ok(), "{what}: must not be served: {a:?}");
        stream += 2;
    }
    // Whatever bytes reached the upstream, none is a second request, nor the detect path.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = up.all();
    assert!(!before.contains("/v1/detect"), "smuggled upstream: {before}");
    assert!(up.conns().iter().all(|c| c.closed || c.bytes.is_empty()), "a connection left open after an odd request");
    // The connection still serves, and the upstream gets exactly that request.
    h2.request(stream, "/v1/raw/after", &[(b"content-length", b"2")], Some(b"{}")).await;
    let a = h2.wait(stream, T).await;
    assert!(a.ok(), "{a:?}");
    let lines = up.request_lines();
    assert_eq!(lines.last().map(String::as_str), Some("POST /v1/raw/after HTTP/1.1"), "{lines:?}");
    assert_eq!(lines.iter().filter(|l| l.contains("/v1/raw/after")).count(), 1);
}

/// Field names and values that HTTP/1.1 cannot carry (CR, LF, NUL in a value, upper case or a
/// space in a name), and an unknown pseudo header, are an HPACK decoding error for the gateway's HTTP/2 server: the connection
/// is closed with GOAWAY. None reaches the upstream (where a CR LF would start a field or a
/// request of its own), and the gateway serves the next connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_http1_cannot_carry_never_reach_the_upstream() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 1000);
    let cases: Vec<(&str, Field)> = vec![
        ("CR LF in a value", (b"x-a", b"1\r\nx-turnstile-tenant: acme")),
        ("CR LF CR LF in a value", (b"x-a", b"1\r\n\r\nGET /v1/detect/x HTTP/1.1\r\nHost: a\r\n\r\n")),
        ("LF in a value", (b"x-a", b"1\nx-api-key: key-acme")),
        ("CR in a value", (b"x-a", b"1\rx")),
        ("NUL in a value", (b"x-a", b"1\0x")),
        ("upper case name", (b"X-Turnstile-Tenant", b"acme")),
        ("space in a name", (b"x-turnstile-tenant ", b"acme")),
        ("colon in a name", (b"x-a:b", b"c")),
        ("unknown pseudo header", (b":x", b"1")),
        ("CR LF in the key", (b"x-api-key", b"key-globex\r\nx-turnstile-feature: object-detection")),
    ];
    for (what, field) in &cases {
        let mut h2 = H2::connect(gw.addr).await;
        h2.request(1, "/v1/raw/x", &[*field], Some(b"{}")).await;
        let a = h2.wait(1, T).await;
        assert!(!a.ok(), "{what}: must not be served: {a:?}");
        // A CR LF pair in the key or a value must never split into fields upstream.
        let all = up.all();
        assert!(
            !all.contains("/v1/detect") && !all.contains("acme") && !all.contains("object-detection"),
            "{what}: {all}"
        );
    }
    assert!(up.request_lines().is_empty(), "{:?}", up.request_lines());
    let mut h2 = H2::connect(gw.addr).await;
    h2.request(1, "/v1/raw/x", &[], None).await;
    assert!(h2.wait(1, T).await.ok(), "the gateway still serves");
}

/// The API key sent several ways on one HTTP/2 stream is removed from the forwarded request
/// every way it came, and the client's `x-turnstile-*` fields (any spelling) go too; a key in a
/// cookie identifies no one. (HPACK header compression of the key: the client here sends it
/// as a literal; the gateway's HPACK decoder hands the same field to the same code.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_key_and_client_gateway_fields_never_reach_the_upstream_over_http2() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 1000);
    let cases: Vec<(&str, Vec<Field>)> = vec![
        ("key twice", vec![(b"x-api-key", b"key-globex"), (b"x-api-key", b"key-globex")]),
        ("key header and bearer", vec![(b"x-api-key", b"key-globex"), (b"authorization", b"Bearer key-globex")]),
        ("bearer twice", vec![(b"authorization", b"Bearer key-globex"), (b"authorization", b"bearer  key-globex ")]),
        (
            "gateway fields",
            vec![
                (b"x-api-key", b"key-globex"),
                (b"x-turnstile-tenant", b"acme"),
                (b"x_turnstile_feature", b"object-detection"),
                (b"x-turnstile-payer", b"prepaid_qps"),
            ],
        ),
    ];
    let mut h2 = H2::connect(gw.addr).await;
    let mut stream = 1;
    for (what, extra) in &cases {
        let before = up.all().len();
        h2.request(stream, "/v1/raw/x", extra, Some(b"{}")).await;
        let a = h2.wait(stream, T).await;
        assert!(a.ok(), "{what}: {a:?}");
        let got = up.all()[before..].to_ascii_lowercase();
        assert!(!got.contains("key-globex"), "{what}: the key reached the upstream: {got}");
        assert!(!got.contains("authorization"), "{what}: {got}");
        assert!(!got.contains("x_turnstile"), "{what}: {got}");
        assert!(got.contains("x-turnstile-tenant: globex\r\n") && !got.contains("acme"), "{what}: {got}");
        assert!(got.contains("x-turnstile-feature: license-plate-recognition\r\n"), "{what}: {got}");
        assert_eq!(got.matches("x-turnstile-").count(), 2, "{what}: {got}");
        stream += 2;
    }
    // A key in a cookie is no key: 401, and nothing goes upstream.
    let before = up.all().len();
    h2.headers(
        stream,
        &[
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/v1/raw/x"),
            (b"cookie", b"x-api-key=key-globex"),
        ],
        true,
    )
    .await;
    let a = h2.wait(stream, T).await;
    assert_eq!(a.code(), "missing_api_key", "{a:?}");
    assert_eq!(up.all().len(), before);
}

/// SPEC §4: a call is charged when the upstream answered 2xx, never twice. A client that resets
/// its stream mid-body is not charged (the upstream never answered) and the upstream connection
/// that carried the cut body is closed, not reused; one that resets after the 2xx head arrived
/// is charged once, and that connection is not reused either (its answer was not read to its
/// end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_mid_body_or_mid_answer_is_charged_as_the_upstream_answered() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 1000);
    let mut h2 = H2::connect(gw.addr).await;
    let base = gw.billed_units(FEATURE).await;
    // Mid-body: 5 of 10 bytes, then RST_STREAM.
    h2.headers(
        3,
        &[
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/v1/raw/cut"),
            (b"x-api-key", b"key-globex"),
            (b"content-length", b"10"),
        ],
        false,
    )
    .await;
    h2.data(3, b"12345", false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    h2.rst(3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = up.conns().into_iter().find(|c| String::from_utf8_lossy(&c.bytes).contains("POST /v1/raw/cut"));
    let cut = cut.expect("the cut request reached the upstream");
    assert!(cut.closed, "the upstream connection with a cut body must be closed");
    assert!(String::from_utf8_lossy(&cut.bytes).ends_with("\r\n\r\n12345"), "{}", String::from_utf8_lossy(&cut.bytes));
    assert_eq!(gw.billed_units(FEATURE).await, base, "a cut upload is not charged");

    // Mid-answer: the 2xx head arrives, the client resets: charged once.
    h2.request(5, "/v1/raw/slow", &[], None).await;
    let a = h2.wait(5, Duration::from_millis(700)).await;
    assert_eq!(a.status_byte, Some(0x88), "{a:?}");
    h2.rst(5).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(gw.billed_units(FEATURE).await, base + 1.0, "a 2xx whose client reset is charged once");
    let slow = up.conns().into_iter().find(|c| String::from_utf8_lossy(&c.bytes).contains("/v1/raw/slow"));
    // The next request does not go down the connection that was mid-answer.
    h2.request(7, "/v1/raw/next", &[], None).await;
    assert!(h2.wait(7, T).await.ok());
    let slow_now = up.conns().into_iter().find(|c| String::from_utf8_lossy(&c.bytes).contains("/v1/raw/slow"));
    assert_eq!(
        slow.map(|c| c.bytes.len()),
        slow_now.map(|c| c.bytes.len()),
        "a request went down the connection whose answer was cut"
    );
    assert_eq!(gw.billed_units(FEATURE).await, base + 2.0);
}

/// SPEC §5.4 over one HTTP/2 connection: many concurrent streams of one tenant and feature
/// are admitted as many separate requests would be, between limit × T and limit × T + depth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_on_one_connection_are_admitted_exactly() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 2);
    let mut h2 = H2::connect(gw.addr).await;
    let started = std::time::Instant::now();
    let n = 40u32;
    for i in 0..n {
        h2.request(1 + 2 * i, "/v1/raw/x", &[], None).await;
    }
    let mut ok = 0u32;
    for i in 0..n {
        let a = h2.wait(1 + 2 * i, T).await;
        assert!(a.ended, "stream {}: {a:?}", 1 + 2 * i);
        if a.ok() {
            ok += 1;
        } else {
            assert_eq!(a.code(), "qps_exceeded", "{a:?}");
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    // limit 2, depth 2.
    assert!(ok >= 2 && f64::from(ok) <= 2.0 * elapsed + 2.0 + 1e-9, "{ok} admitted in {elapsed} s");
    assert_eq!(up.request_lines().len(), ok as usize);
    assert_eq!(gw.billed_units(FEATURE).await, f64::from(ok));
}

/// An h2c gRPC upstream that answers every call with one 5-byte message and `grpc-status: 0`.
async fn grpc_ok_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|_req: http::Request<hyper::body::Incoming>| async {
                let mut trailers = http::HeaderMap::new();
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                let frames: Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>> = vec![
                    Ok(http_body::Frame::data(bytes::Bytes::from_static(&[
                        0, 0, 0, 0, 5, b'r', b'e', b'p', b'l', b'y',
                    ]))),
                    Ok(http_body::Frame::trailers(trailers)),
                ];
                let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                let resp = http::Response::builder().header("content-type", "application/grpc").body(body);
                Ok::<_, std::convert::Infallible>(resp.expect("response"))
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// SPEC §4: "A gRPC call is charged only when its trailers carry `grpc-status: 0`". A client
/// that opens a stream window exactly as large as the reply (so that it could take the message
/// and leave before the trailers) still gets the OK trailers, which are not flow-controlled, so
/// the call is charged; a reset after them neither takes the charge back nor makes a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_client_that_resets_after_the_ok_trailers_is_charged_once() {
    let up = grpc_ok_upstream().await;
    let main = main_toml(&format!("http://{up}"), "upstream_protocol = \"h2c\"\n", "[admission]\ndefault_qps = 100\n")
        .replace(
            "[[routes]]\npath = \"/v1/face/compare\"",
            "[[routes]]\npath = \"/v1/raw/*\"\nfeature = \"license-plate-recognition\"\n\n[[routes]]\npath = \"/v1/face/compare\"",
        );
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    let grpc: [Field; 2] = [(b"content-type", b"application/grpc"), (b"te", b"trailers")];
    // A client that reads everything: charged once, the trailers reach it.
    let mut h2 = H2::connect(gw.addr).await;
    h2.request(1, "/v1/raw/Infer", &grpc, Some(&[0, 0, 0, 0, 0])).await;
    let a = h2.wait(1, T).await;
    assert!(a.ok() && a.ended && a.body.ends_with(b"reply"), "{a:?}");
    assert_eq!(gw.billed_units(FEATURE).await, 1.0);
    // A window of exactly the reply: the message and the trailers arrive; then a reset.
    let mut h2 = H2::connect_with_window(gw.addr, Some(10)).await;
    h2.request(1, "/v1/raw/Infer", &grpc, Some(&[0, 0, 0, 0, 0])).await;
    let deadline = tokio::time::Instant::now() + T;
    let mut a = h2.wait(1, Duration::from_millis(100)).await;
    while !a.ended && tokio::time::Instant::now() < deadline {
        a = h2.wait(1, Duration::from_millis(100)).await;
    }
    assert!(a.ok() && a.ended && a.body.ends_with(b"reply"), "the reply and its trailers: {a:?}");
    h2.rst(1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.billed_units(FEATURE).await, 2.0, "charged once: the upstream said OK");
}

/// RFC 9113 §8.2.3: an HTTP/2 client may send the cookie crumbs as separate `cookie` fields;
/// going on over HTTP/1.1 they MUST be one field, joined with "; " (an HTTP/1.1 server may read
/// only the first `Cookie` line, RFC 6265 §5.4 allows one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_crumbs_reach_an_http1_upstream_as_one_field() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up, 1000);
    let mut h2 = H2::connect(gw.addr).await;
    h2.request(1, "/v1/raw/x", &[(b"cookie", b"a=1"), (b"x-other", b"o"), (b"cookie", b"b=2")], None).await;
    assert!(h2.wait(1, T).await.ok());
    let got = up.all().to_ascii_lowercase();
    assert_eq!(got.matches("\r\ncookie:").count(), 1, "{got}");
    assert!(got.contains("\r\ncookie: a=1; b=2\r\n"), "{got}");
}
