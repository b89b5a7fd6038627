//! Black-box tests of the tenant listener's own HTTP/1.1 path (`src/h1.rs`): pipelined
//! requests, every framing an upstream may answer with, pooled upstream connections the
//! upstream closed, what goes up and comes down, and the hand-off to hyper of what the path
//! does not serve. Raw sockets on both sides: a programmable upstream in this process.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::wire::Wire;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(5);
/// The feature every `/v1/raw/*` path is (the test configuration's routes).
const FEATURE: &str = "license-plate-recognition";

/// An upstream on raw sockets. It reads each request (head, then a `Content-Length` body),
/// records it, and answers by the path's last segment:
/// - `chunked`: a chunked body with a trailer; `close`: a body that ends with the connection;
/// - `both`: `Content-Length` and `Transfer-Encoding: chunked` at once;
/// - `interim`: a 103 before the 200; `once`: answers, then closes without saying so;
/// - `big`: 1 MiB; `hop`: hop-by-hop and gateway fields the gateway must drop or replace;
/// - `trailers`: a chunked body whose trailers carry fields the gateway must drop (in one write;
///   `trailers-late`: in pieces, the trailers apart from the body's first chunk);
/// - `gateway-fields`: `x-turnstile-*` fields in the head, spelt other ways;
/// - `usage-conflict`, `usage-repeated`: a video usage report with a field given twice;
/// - anything else: the request head back as the body.
struct RawUpstream {
    addr: SocketAddr,
    /// Request heads received, in order.
    seen: Arc<Mutex<Vec<String>>>,
    /// Connections accepted.
    accepted: Arc<AtomicUsize>,
}

const BIG: usize = 1 << 20;

impl RawUpstream {
    async fn start() -> RawUpstream {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (seen2, accepted2) = (seen.clone(), accepted.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                accepted2.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(s, seen2.clone()));
            }
        });
        RawUpstream { addr, seen, accepted }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn last(&self) -> String {
        self.seen.lock().expect("lock").last().cloned().unwrap_or_default()
    }
}

async fn serve(mut s: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..end + 4 + len);
        seen.lock().expect("lock").push(head.clone());
        let target = head.split(' ').nth(1).unwrap_or("").to_string();
        let last = target.split('?').next().unwrap_or("").rsplit('/').next().unwrap_or("").to_string();
        let head_request = head.starts_with("HEAD ");
        let reply: Vec<u8> = match last.as_str() {
            "chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
            "close" => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil the close").await;
                return;
            }
            "both" => b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
            "interim" => b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            "once" => {
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nonce").await;
                return;
            }
            "big" => {
                let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n").into_bytes();
                r.extend((0..BIG).map(|i| (i % 251) as u8));
                r
            }
            "signed" => b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok".to_vec(),
            // HTTP/1.0 has no transfer codings (RFC 9112 §6.1): faulty framing.
            "http10-chunked" => {
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n").await;
                return;
            }
            // 80 fields: under hyper's client's limit (100), over the fast path's (64).
            "many" => {
                let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n".to_vec();
                for i in 0..80 {
                    r.extend_from_slice(format!("X-H-{i}: {i}\r\n").as_bytes());
                }
                r.extend_from_slice(b"\r\nok");
                r
            }
            "status000" => b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            // A 100 KiB head: over both paths' 64 KiB.
            "bighead" => {
                let mut r = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Big: ".to_vec();
                r.extend(std::iter::repeat_n(b'a', 100 * 1024));
                r.extend_from_slice(b"\r\n\r\nok");
                r
            }
            // A coding the gateway does not undo, under chunked.
            "gzip-chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n4\r\n\x1f\x8b\x08\x00\r\n0\r\n\r\n".to_vec(),
            // Usage reports the upstream addresses to the gateway alone (listed in `Connection`).
            "usage-listed" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x-usage-video-ms, x-usage-video-fps, x-usage-video-lines\r\nx-usage-video-ms: 60000\r\nx-usage-video-fps: 30\r\nx-usage-video-lines: 1080\r\n\r\nok".to_vec(),
            // The length listed in `Connection`: the upstream's framing all the same.
            "length-listed" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: content-length\r\n\r\nok".to_vec(),
            // Trailers with the gateway's own fields (every spelling), hop-by-hop ones, a usage
            // report and one of the upstream's own.
            "trailers" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-turnstile-payer, x-trailer\r\n\r\n2\r\nok\r\n0\r\nx-turnstile-payer: upstream\r\nX-Turnstile_Payer: upstream\r\nX-TURNSTILE-ERROR: fake\r\nRateLimit: fake\r\nKeep-Alive: timeout=5\r\nx-usage-video-ms: 5\r\nX-Trailer: kept\r\n\r\n".to_vec(),
            // The same kind of trailers, coming in pieces after the body's first chunk.
            "trailers-late" => {
                for piece in [
                    &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n"[..],
                    b"0\r\nx-turnstile-payer: upstream\r\nX-Tra",
                    b"iler: kept\r\nRateLimit: fake\r",
                    b"\n\r\n",
                ] {
                    if s.write_all(piece).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(30)).await;
                }
                Vec::new()
            }
            // The gateway's own fields in the head, in other spellings than the one it replaces.
            "gateway-fields" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Turnstile_Payer: upstream\r\nX-Turnstile-Error: fake\r\nX-Kept: yes\r\n\r\nok".to_vec(),
            // A video report whose length is given twice: with different values, and the same twice.
            "usage-conflict" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-usage-video-ms: 1000\r\nx-usage-video-fps: 30\r\nx-usage-video-lines: 1080\r\nx-usage-video-ms: 3600000\r\n\r\nok".to_vec(),
            "usage-repeated" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-usage-video-ms: 60000\r\nx-usage-video-fps: 30\r\nx-usage-video-lines: 1080\r\nX-Usage-Video-Ms:  60000\r\n\r\nok".to_vec(),
            // A chunk's data not followed by CRLF: malformed, in the answer's first read.
            "bad-chunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".to_vec(),
            "hop" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: timeout=5\r\nConnection: x-private\r\nX-Private: 1\r\nratelimit: fake\r\nx-turnstile-payer: fake\r\nX-Kept: yes\r\n\r\nok".to_vec(),
            _ => {
                let body = head.as_bytes();
                let mut r = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                if !head_request {
                    r.extend_from_slice(body);
                }
                r
            }
        };
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// The test configuration in front of `upstream`, where every path under `/v1/raw/` is the
/// pay-as-you-go license-plate feature, which tenant globex (key `key-globex`) may call at
/// 1000 QPS.
fn config(upstream: &str, server_extra: &str) -> ConfigDir {
    let main = main_toml(upstream, server_extra, "[admission]\ndefault_qps = 1000\n").replace(
        "[[routes]]\npath = \"/v1/face/compare\"",
        "[[routes]]\npath = \"/v1/raw/*\"\nfeature = \"license-plate-recognition\"\n\n[[routes]]\npath = \"/v1/face/compare\"",
    );
    ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None))
}

fn gateway(up: &RawUpstream) -> (ConfigDir, Gateway) {
    let cfg = config(&up.url(), "");
    let gw = Gateway::start(&cfg);
    (cfg, gw)
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: tenant.example\r\nx-api-key: key-globex\r\n\r\n")
}

/// The same call through hyper's path: a `TE` field makes the fast path hand it over.
fn hyper_get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: h\r\nTE: trailers\r\nx-api-key: key-globex\r\n\r\n")
}

/// `GET path` for each path, labelled: the fast path's, then hyper's.
fn both_paths(path: &str) -> [(&'static str, String); 2] {
    [("fast path", get(path)), ("hyper", hyper_get(path))]
}

/// `request` on a connection of its own, and the gateway's reply.
async fn ask(gw: &Gateway, request: &str) -> Result<common::wire::RawReply, String> {
    let mut w = Wire::connect(gw.addr).await;
    w.s.write_all(request.as_bytes()).await.expect("write");
    w.reply(T).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_and_each_charged_once() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut w = Wire::connect(gw.addr).await;
    let three = format!("{}{}{}", get("/v1/raw/a?n=1"), get("/v1/raw/b?n=2"), get("/v1/raw/c?n=3"));
    w.s.write_all(three.as_bytes()).await.expect("write");
    for n in 1..=3 {
        let r = w.reply(T).await.expect("reply");
        assert_eq!(r.status, 200, "{}", r.head);
        let echoed = String::from_utf8_lossy(&r.body).into_owned();
        assert!(echoed.contains(&format!("?n={n} HTTP/1.1")), "answer {n} in order: {echoed}");
    }
    // The connection goes on.
    w.s.write_all(get("/v1/raw/d").as_bytes()).await.expect("write");
    assert_eq!(w.reply(T).await.expect("reply").status, 200);
    assert_eq!(gw.billed_units(FEATURE).await, 4.0, "each call charged exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_upstream_framing_reaches_the_client_whole() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut w = Wire::connect(gw.addr).await;

    w.s.write_all(get("/v1/raw/chunked").as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("chunked");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"hello world"[..]), "{}", r.head);
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));

    w.s.write_all(get("/v1/raw/both").as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("both");
    assert_eq!(r.body, b"ok");
    assert_eq!(r.header("content-length"), None, "never both framings: {}", r.head);

    w.s.write_all(get("/v1/raw/interim").as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("interim");
    assert_eq!((r.status, r.body.as_slice(), r.interim.as_str()), (200, &b"ok"[..], ""), "103 not relayed");

    w.s.write_all(get("/v1/raw/big").as_bytes()).await.expect("write");
    let r = w.reply(Duration::from_secs(20)).await.expect("big");
    assert_eq!(r.body.len(), BIG);
    assert!(r.body.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "1 MiB intact");

    let head = "HEAD /v1/raw/x HTTP/1.1\r\nHost: h\r\nx-api-key: key-globex\r\n\r\n";
    w.s.write_all(head.as_bytes()).await.expect("write");
    let r = w.reply_to(true, T).await.expect("head");
    assert!(r.header("content-length").is_some_and(|n| n != "0"), "HEAD keeps the length: {}", r.head);
    w.s.write_all(get("/v1/raw/after-head").as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("after HEAD");
    assert!(String::from_utf8_lossy(&r.body).starts_with("GET /v1/raw/after-head"), "no stray body after HEAD");

    // A body that ends with the upstream's close: the client's connection closes with it.
    w.s.write_all(get("/v1/raw/close").as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("close-delimited");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"until the close"[..]));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(gw.billed_units(FEATURE).await, 7.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_not_used() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut w = Wire::connect(gw.addr).await;
    for method in ["GET", "POST", "GET", "POST"] {
        let req = format!(
            "{method} /v1/raw/once HTTP/1.1\r\nHost: h\r\nx-api-key: key-globex\r\nContent-Length: 2\r\n\r\nhi"
        );
        w.s.write_all(req.as_bytes()).await.expect("write");
        let r = w.reply(T).await.expect("reply");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"once"[..]), "{method}: {}", r.head);
        // The upstream's close reaches the gateway before the next call.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 4, "one upstream connection per call");
    assert_eq!(gw.billed_units(FEATURE).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_on_the_way_up_and_down() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut w = Wire::connect(gw.addr).await;
    let req = "GET /v1/raw/./x/../echo?q=%2F HTTP/1.1\r\nHost: tenant.example\r\nX-Api-Key: key-globex\r\n\
               X-Turnstile-Tenant: spoofed\r\nKeep-Alive: timeout=9\r\nProxy-Authorization: x\r\n\
               X-Forwarded-For: 10.0.0.1\r\nX-Custom: kept\r\n\r\n";
    w.s.write_all(req.as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("reply");
    assert_eq!(r.status, 200, "{}", r.head);
    // Served by the fast path: field names keep the client's spelling (hyper lowercases them).
    assert!(up.last().contains("\r\nX-Custom: kept\r\n"), "{}", up.last());
    let seen = up.last().to_ascii_lowercase();
    assert!(seen.starts_with("get /v1/raw/echo?q=%2f http/1.1\r\n"), "normalized path, query as sent: {seen}");
    for gone in ["x-api-key", "spoofed", "keep-alive", "proxy-authorization"] {
        assert!(!seen.contains(gone), "{gone} not forwarded: {seen}");
    }
    for kept in [
        "host: tenant.example",
        "x-custom: kept",
        "x-turnstile-tenant: globex",
        "x-turnstile-feature: license-plate-recognition",
        "x-forwarded-for: 10.0.0.1, 127.0.0.1",
    ] {
        assert!(seen.contains(kept), "{kept}: {seen}");
    }
    w.s.write_all(get("/v1/raw/hop").as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("reply");
    assert_eq!(r.header("x-kept"), Some("yes"));
    for gone in ["keep-alive", "x-private"] {
        assert!(r.header(gone).is_none(), "{gone} dropped: {}", r.head);
    }
    assert_eq!(r.header("x-turnstile-payer"), Some("payg"), "the gateway's, not the upstream's");
    assert!(r.header("ratelimit").is_some_and(|v| v.starts_with("\"qps\";r=")), "{}", r.head);
    assert!(r.header("date").is_some(), "a date is added: {}", r.head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_fast_path_does_not_serve_goes_to_hyper_on_the_same_connection() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut w = Wire::connect(gw.addr).await;
    // A body that comes after its head: hyper streams it.
    let head = "POST /v1/raw/late HTTP/1.1\r\nHost: h\r\nx-api-key: key-globex\r\nContent-Length: 5\r\n\r\n";
    w.s.write_all(head.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.s.write_all(b"hello").await.expect("write body");
    let r = w.reply(T).await.expect("reply");
    assert_eq!(r.status, 200, "{}", r.head);
    assert!(String::from_utf8_lossy(&r.body).to_ascii_lowercase().starts_with("post /v1/raw/late http/1.1"));
    // The connection goes on (hyper's now), pipelined requests included.
    let two = format!("{}{}", get("/v1/raw/one"), get("/v1/raw/two"));
    w.s.write_all(two.as_bytes()).await.expect("write");
    for path in ["/v1/raw/one", "/v1/raw/two"] {
        let r = w.reply(T).await.expect("reply");
        assert!(String::from_utf8_lossy(&r.body).contains(path), "{path}");
    }
    // A request HTTP/1.0 client.
    let mut w10 = Wire::connect(gw.addr).await;
    w10.s.write_all(b"GET /v1/raw/old HTTP/1.0\r\nx-api-key: key-globex\r\n\r\n").await.expect("write");
    let r = w10.reply(T).await.expect("HTTP/1.0");
    assert_eq!(r.status, 200, "{}", r.head);
    assert_eq!(gw.billed_units(FEATURE).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_keeps_the_connection_and_an_unreachable_upstream_reads_502_with_the_rate_fields() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut w = Wire::connect(gw.addr).await;
    w.s.write_all(b"GET /v1/raw/x HTTP/1.1\r\nHost: h\r\nx-api-key: wrong\r\n\r\n").await.expect("write");
    let r = w.reply(T).await.expect("401");
    assert_eq!((r.status, r.error_code().as_str()), (401, "invalid_api_key"));
    w.s.write_all(get("/v1/raw/x").as_bytes()).await.expect("write");
    assert_eq!(w.reply(T).await.expect("200").status, 200, "the same connection serves on");

    let cfg = config(&format!("http://{}", dead_addr()), "upstream_timeout_ms = 2000");
    let gw2 = Gateway::start(&cfg);
    let mut w = Wire::connect(gw2.addr).await;
    w.s.write_all(get("/v1/raw/x").as_bytes()).await.expect("write");
    let r = w.reply(T).await.expect("502");
    assert_eq!((r.status, r.error_code().as_str()), (502, "upstream_unavailable"));
    assert!(r.header("ratelimit").is_some() && r.header("x-turnstile-payer").is_some(), "{}", r.head);
    assert_eq!(gw2.billed_units(FEATURE).await, 0.0, "not charged");
}

/// A gateway in front of `up` where every path under `/v1/raw/` is the video-minute feature
/// (pay-as-you-go for globex).
fn video_gateway(up: &RawUpstream) -> (ConfigDir, Gateway) {
    let main = main_toml(&up.url(), "", "[admission]\ndefault_qps = 1000\n").replace(
        "[[routes]]\npath = \"/v1/face/compare\"",
        "[[routes]]\npath = \"/v1/raw/*\"\nfeature = \"comprehensive-video-enhancement\"\n\n[[routes]]\npath = \"/v1/face/compare\"",
    );
    let ents = entitlements(40, None).replace(r#"["text_recognition"]"#, r#"["text_recognition", "video_production"]"#);
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &ents);
    let gw = Gateway::start(&cfg);
    (cfg, gw)
}

/// The video minutes billed, by every payer, in the metrics text `m`.
fn video_minutes(m: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with("turnstile_billed_units_total{") && l.contains("comprehensive-video-enhancement"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Usage reports listed in the upstream's `Connection` are addressed to the gateway (RFC 9110
/// §7.6.1): both paths bill them, and neither passes them on to the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_reports_listed_in_connection_are_billed_and_not_relayed_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = video_gateway(&up);
    for (path, request) in both_paths("/v1/raw/usage-listed") {
        let r = ask(&gw, &request).await.expect("reply");
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        for gone in ["x-usage-video-ms", "x-usage-video-fps", "x-usage-video-lines"] {
            assert!(r.header(gone).is_none(), "{path}: {gone} is hop-by-hop: {}", r.head);
        }
    }
    let m = gw.metrics(&client()).await;
    let minutes = video_minutes(&m);
    assert_eq!(minutes, 2.0, "one minute through each path: {m}");
    assert!(!m.contains("turnstile_usage_report_errors_total{"), "{m}");
}

/// A length the upstream signs (`+2`: `u64::from_str` takes it, RFC 9110's `1*DIGIT` does not)
/// is a broken answer, on either path: 502, not charged, and never relayed for the client to
/// frame some other way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_upstream_content_length_reads_502_and_is_not_charged() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, request) in both_paths("/v1/raw/signed") {
        let r = ask(&gw, &request).await.expect("reply");
        assert_eq!((r.status, r.error_code().as_str()), (502, "upstream_unavailable"), "{path}: {}", r.head);
    }
    assert_eq!(gw.billed_units(FEATURE).await, 0.0, "not charged");
}

/// Every refusal of the decision reads the same from the fast path (`src/h1.rs` writes it) as
/// from hyper's (`error_response`): status, fields and JSON body. A `TE` field sends the same
/// request to hyper.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reads_the_same_from_the_fast_path_and_from_hyper() {
    let up = RawUpstream::start().await;
    let main = main_toml(&up.url(), "", "[admission]\ndefault_qps = 1\nburst_seconds = 1.0\n").replace(
        "[[routes]]\npath = \"/v1/face/compare\"",
        "[[routes]]\npath = \"/v1/raw/*\"\nfeature = \"license-plate-recognition\"\n\n[[routes]]\npath = \"/v1/face/compare\"",
    );
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    let mut w = Wire::connect(gw.addr).await;
    w.s.write_all(get("/v1/raw/x").as_bytes()).await.expect("write");
    assert_eq!(w.reply(T).await.expect("200").status, 200, "the one token of the second");
    let key = "x-api-key: key-globex\r\n";
    let cases = [
        ("GET", "/v1/raw/x", "", 401, "missing_api_key"),
        ("GET", "/v1/raw/x", "x-api-key: wrong\r\n", 401, "invalid_api_key"),
        ("GET", "/v1/none", key, 404, "unknown_route"),
        ("GET", "/v1/raw/a%2Fb", key, 400, "bad_path"),
        ("POST", "/v1/face/compare", key, 403, "service_not_activated"),
        ("GET", "/v1/raw/x", key, 429, "qps_exceeded"),
        ("HEAD", "/v1/raw/x", key, 429, "qps_exceeded"),
    ];
    for (method, path, fields, status, code) in cases {
        let mut replies = Vec::new();
        for te in ["", "te: trailers\r\n"] {
            let mut w = Wire::connect(gw.addr).await;
            let req = format!("{method} {path} HTTP/1.1\r\nHost: h\r\n{fields}{te}Content-Length: 0\r\n\r\n");
            w.s.write_all(req.as_bytes()).await.expect("write");
            let r = w.reply_to(method == "HEAD", T).await.expect("reply");
            assert_eq!(r.status, status, "{method} {path} {te}: {}", r.head);
            if method != "HEAD" {
                assert_eq!(r.error_code(), code);
            }
            // The fields but `date`; the bucket's seconds to refill may tick between the two.
            let mut fields: Vec<(String, String)> = r
                .head
                .lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                .filter(|(n, _)| n != "date")
                .map(|(n, v)| if n == "retry-after" || n == "ratelimit" { (n, String::new()) } else { (n, v) })
                .collect();
            fields.sort();
            replies.push((r.head.lines().next().map(str::to_string), fields, r.body));
        }
        assert_eq!(replies[0], replies[1], "{method} {path}: fast path, then hyper");
        if status == 429 {
            assert!(replies[0].1.iter().any(|(n, _)| n == "retry-after"), "{:?}", replies[0].1);
        }
        if status == 403 || status == 429 {
            assert!(
                replies[0].1.iter().any(|(n, v)| n == "ratelimit-policy" && v == "\"qps\";q=1;w=1"),
                "{:?}",
                replies[0].1
            );
        }
    }
}

/// `(r, t)` of a `ratelimit: "qps";r=<r>;t=<t>` field.
fn rate_state(r: &common::wire::RawReply) -> (u32, u64) {
    let v = r.header("ratelimit").unwrap_or_else(|| panic!("a RateLimit field: {}", r.head));
    let num = |k: &str| v.split(';').find_map(|p| p.strip_prefix(k)).and_then(|n| n.parse::<u64>().ok());
    match (num("r="), num("t=")) {
        (Some(rem), Some(t)) => (u32::try_from(rem).expect("r fits"), t),
        _ => panic!("malformed RateLimit field {v:?}"),
    }
}

/// SPEC §4: every answer to an identified tenant and feature carries the rate-limit fields; a
/// refusal decided before admission (here 413, a declared body over the limit) takes no token,
/// and its fields tell the bucket as it is, not a full one. Both paths say the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_before_admission_shows_the_bucket_as_it_is_on_both_paths() {
    let up = RawUpstream::start().await;
    // 1 QPS with a depth of 10: a token comes back each second, so a second of slack is allowed.
    let main = main_toml(&up.url(), "max_request_body_bytes = 16", "[admission]\ndefault_qps = 1\nburst_seconds = 10.0\n")
        .replace(
            "[[routes]]\npath = \"/v1/face/compare\"",
            "[[routes]]\npath = \"/v1/raw/*\"\nfeature = \"license-plate-recognition\"\n\n[[routes]]\npath = \"/v1/face/compare\"",
        );
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    let mut drained = (10, 0);
    for _ in 0..3 {
        let r = ask(&gw, &get("/v1/raw/x")).await.expect("admitted");
        assert_eq!(r.status, 200, "{}", r.head);
        drained = rate_state(&r);
    }
    assert_eq!(drained, (7, 3), "three of ten tokens taken");
    for (path, te) in [("fast path", ""), ("hyper", "TE: trailers\r\n")] {
        let req =
            format!("POST /v1/raw/x HTTP/1.1\r\nHost: h\r\n{te}x-api-key: key-globex\r\nContent-Length: 17\r\n\r\n");
        let r = ask(&gw, &req).await.expect("reply");
        assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"), "{path}: {}", r.head);
        assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=1;w=1"), "{path}");
        let (remaining, reset) = rate_state(&r);
        assert!(
            (7..=8).contains(&remaining) && reset == u64::from(10 - remaining),
            "{path}: the 413 shows r={remaining};t={reset}, the bucket holds 7 (8 a second later) and refills in 3 s"
        );
    }
    // The 413s took nothing: the next call finds the bucket as the refusals showed it.
    let (remaining, _) = rate_state(&ask(&gw, &get("/v1/raw/x")).await.expect("admitted"));
    assert!((6..=7).contains(&remaining), "r={remaining} after a fourth token");
}

/// RFC 9112 §6.1: "A server or client that receives an HTTP/1.0 message containing a
/// Transfer-Encoding header field MUST treat the message as if the framing is faulty". hyper's
/// client does (a 502, not charged); the fast path must answer the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstream_answer_with_transfer_encoding_is_faulty_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut seen = Vec::new();
    for (path, request) in both_paths("/v1/raw/http10-chunked") {
        let r = ask(&gw, &request).await.expect("reply");
        seen.push((path, r.status));
    }
    assert_eq!(seen, [("fast path", 502), ("hyper", 502)], "the two paths answer the same");
    assert_eq!(gw.billed_units(FEATURE).await, 0.0, "not charged");
}

/// An upstream chunked body that turns out malformed after its head went to the client cuts
/// the client's answer short and closes its connection, on both paths (the head was relayed, so
/// no 502 can replace it). Kept open, the connection would have the client read the next
/// answer's bytes as the rest of this body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_upstream_body_closes_the_clients_connection_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, request) in both_paths("/v1/raw/bad-chunk") {
        let mut w = Wire::connect(gw.addr).await;
        w.s.write_all(request.as_bytes()).await.expect("write");
        // A second request right behind it: it must not be answered on this connection.
        let _ = w.s.write_all(get("/v1/raw/next").as_bytes()).await;
        let mut got = Vec::new();
        let closed = tokio::time::timeout(T, async {
            let mut chunk = [0u8; 4096];
            loop {
                match w.s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await;
        let got = String::from_utf8_lossy(&got);
        assert!(closed.is_ok(), "{path}: the connection stays open after {got:?}");
        assert!(!got.contains("/v1/raw/next"), "{path}: the next answer was read into this one: {got:?}");
    }
}

/// RFC 9112 §6.3 (3): an intermediary that forwards a message with both Transfer-Encoding and
/// Content-Length "MUST first remove the received Content-Length field". The fast path does
/// (`every_upstream_framing_reaches_the_client_whole`); the hyper path must too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hyper_path_drops_an_upstream_content_length_beside_chunked() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let r = ask(&gw, &hyper_get("/v1/raw/both")).await.expect("a whole answer (hyper path)");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "{}", r.head);
    assert_eq!(r.header("content-length"), None, "never the upstream's stale length: {}", r.head);
}

/// A transfer coding other than chunked (`gzip, chunked`) is a property of the message
/// (RFC 9112 §6.1) and `Transfer-Encoding` is hop-by-hop: relayed with the field dropped, the
/// client reads gzip bytes as the content. Neither path may relay (and charge) it as a plain 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_transfer_coding_other_than_chunked_is_not_silently_dropped() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut relayed = Vec::new();
    for (path, request) in both_paths("/v1/raw/gzip-chunked") {
        let r = ask(&gw, &request).await.expect("reply");
        let coding_kept = r.header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("gzip"));
        if !(r.status == 502 || coding_kept) {
            relayed.push(format!("{path}: gzip-coded bytes relayed as plain content: {} body {:?}", r.head, r.body));
        }
    }
    assert!(relayed.is_empty(), "{relayed:#?}");
    assert_eq!(gw.billed_units(FEATURE).await, 0.0, "not charged");
}

/// A status code is three digits from 100 (RFC 9110 §15); hyper's client refuses `000` (a
/// 502). The fast path must not relay it as `HTTP/1.1 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_status_under_100_reads_502_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut seen = Vec::new();
    for (path, request) in both_paths("/v1/raw/status000") {
        let r = ask(&gw, &request).await;
        seen.push((path, r.map(|r| r.status).map_err(|e| e.chars().take(80).collect::<String>())));
    }
    assert_eq!(seen, [("fast path", Ok(502)), ("hyper", Ok(502))]);
}

/// RFC 9112 §3.2: a server MUST answer 400 to a request "that contains more than one Host
/// header field line"; a gateway that forwards both lets the upstream pick another host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_fields_are_refused_not_forwarded() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, te) in [("fast path", ""), ("hyper", "TE: trailers\r\n")] {
        let mut w = Wire::connect(gw.addr).await;
        let req = format!(
            "GET /v1/raw/echo HTTP/1.1\r\nHost: tenant.example\r\nHost: internal.example\r\n{te}x-api-key: key-globex\r\n\r\n"
        );
        w.s.write_all(req.as_bytes()).await.expect("write");
        let r = w.reply(T).await.expect("reply");
        assert_eq!(r.status, 400, "{path}: upstream saw {:?}", up.last());
    }
}

/// The same upstream answer reads the same on both paths: 80 response fields are within
/// hyper's client's limit (100), so the hyper path relays and charges the 200; the fast path
/// must not turn it into a 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_answer_with_80_fields_reads_the_same_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut seen = Vec::new();
    for (path, request) in both_paths("/v1/raw/many") {
        let r = ask(&gw, &request).await.expect("reply");
        seen.push((path, r.status, gw.billed_units(FEATURE).await));
    }
    assert_eq!(seen, [("fast path", 200, 1.0), ("hyper", 200, 2.0)]);
}

/// An upstream head over 64 KiB reads the same on both paths: a 502, not charged (the fast
/// path and hyper's client, `max_header_size`, have the same bound; hyper's default, ~400
/// KiB, relayed and charged what the fast path refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_head_over_64_kib_reads_502_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let mut seen = Vec::new();
    for (path, request) in both_paths("/v1/raw/bighead") {
        let r = ask(&gw, &request).await.expect("reply");
        seen.push((path, r.status));
    }
    assert_eq!(seen, [("fast path", 502), ("hyper", 502)]);
    assert_eq!(gw.billed_units(FEATURE).await, 0.0, "not charged");
}

/// SPEC §4 "the API key (header or `Authorization`) is removed": also when the key header
/// carries it and `Authorization: Bearer <key>` is not the first `Authorization` field, on
/// both paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_in_a_second_authorization_field_is_not_forwarded() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, request) in both_paths("/v1/raw/echo") {
        let request = request.replacen(
            "x-api-key: key-globex\r\n",
            "x-api-key: key-globex\r\nAuthorization: Basic Zm9vOmJhcg==\r\nAuthorization: Bearer key-globex\r\n",
            1,
        );
        let r = ask(&gw, &request).await.expect("reply");
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        let seen = up.last();
        assert!(seen.to_ascii_lowercase().contains("x-turnstile-tenant: globex"), "{path}: {seen}");
        assert!(!seen.contains("key-globex"), "{path}: the API key reached the upstream: {seen}");
    }
}

/// An upstream `Connection` that lists `Content-Length` does not leave the client's answer
/// without a framing: on both paths it reads whole, and the connection serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_length_listed_in_connection_still_frames_the_answer() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, request) in both_paths("/v1/raw/length-listed") {
        let mut w = Wire::connect(gw.addr).await;
        w.s.write_all(request.as_bytes()).await.expect("write");
        let r = w.reply(T).await.expect("a framed reply");
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "{path}: {}", r.head);
        assert!(r.header("content-length").is_some() || r.header("transfer-encoding").is_some(), "{path}: {}", r.head);
        w.s.write_all(get("/v1/raw/echo").as_bytes()).await.expect("write");
        assert_eq!(w.reply(T).await.expect("the next reply").status, 200, "{path}");
    }
}

/// `X-Forwarded-For` is appended to as sent (nginx's `$proxy_add_x_forwarded_for`): a prior
/// value with obs-text (RFC 9110 §5.5 allows it) is kept on hyper's path as on the fast path,
/// not dropped from the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_for_chain_with_obs_text_is_kept_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, request) in both_paths("/v1/raw/echo") {
        let mut bytes = request.into_bytes();
        let at = bytes.len() - 2;
        bytes.splice(at..at, b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: caf\xe9\r\n".iter().copied());
        let mut w = Wire::connect(gw.addr).await;
        w.s.write_all(&bytes).await.expect("write");
        let r = w.reply(T).await.expect("reply");
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        let seen = up.last().to_ascii_lowercase();
        assert!(seen.contains("x-forwarded-for: 10.0.0.1, caf\u{fffd}, 127.0.0.1"), "{path}: {seen}");
    }
}

/// A request `Connection` that lists `Content-Length` (hyper's path: the fast path hands it
/// over) does not send its body upstream unframed, where it would read as a second request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_length_listed_in_connection_does_not_unframe_the_body_upstream() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let inner = "GET /v1/raw/smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let request = format!(
        "POST /v1/raw/echo HTTP/1.1\r\nHost: h\r\nx-api-key: key-globex\r\nConnection: content-length\r\n\
         Content-Length: {}\r\n\r\n{inner}",
        inner.len()
    );
    let r = ask(&gw, &request).await.expect("reply");
    assert_eq!(r.status, 200, "{}", r.head);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = up.seen.lock().expect("lock").clone();
    assert!(
        seen.len() == 1 && seen[0].to_ascii_lowercase().contains(&format!("content-length: {}", inner.len())),
        "{seen:?}"
    );
    assert!(seen.iter().all(|h| !h.contains("/smuggled")), "a second request reached the upstream: {seen:?}");
    assert_eq!(gw.billed_units(FEATURE).await, 1.0);
}

/// `X-Turnstile_Tenant` is `x-turnstile-tenant` to an upstream that maps field names to CGI
/// variables (`HTTP_X_TURNSTILE_TENANT`: WSGI, PHP, CGI), so it is removed like every incoming
/// `x-turnstile-*` field (SPEC §4), on both paths (nginx drops field names with `_` by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_underscore_spelling_of_x_turnstile_fields_is_not_forwarded() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, request) in both_paths("/v1/raw/echo") {
        let request = request.replacen(
            "x-api-key: key-globex\r\n",
            "x-api-key: key-globex\r\nX-Turnstile_Tenant: victim\r\nx_turnstile_feature: free\r\n",
            1,
        );
        let r = ask(&gw, &request).await.expect("reply");
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        let seen = up.last().to_ascii_lowercase();
        assert!(seen.contains("x-turnstile-tenant: globex"), "{path}: {seen}");
        assert!(
            !seen.contains("victim") && !seen.contains(": free"),
            "{path}: a spoofed field reached the upstream: {seen}"
        );
    }
}

/// An HTTP/2 (prior knowledge) client of the gateway: `GET url` with globex's key; the status,
/// the body and the trailers.
async fn h2_get(url: String) -> (http::StatusCode, bytes::Bytes, Option<http::HeaderMap>) {
    use http_body_util::BodyExt;
    let h2: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let req = http::Request::get(url).header("x-api-key", "key-globex").body(http_body_util::Empty::new());
    let resp = h2.request(req.expect("request")).await.expect("HTTP/2 response");
    let status = resp.status();
    let collected = resp.into_body().collect().await.expect("body and trailers");
    let trailers = collected.trailers().cloned();
    (status, collected.to_bytes(), trailers)
}

/// An upstream's trailers are relayed as its head is: without the gateway's own fields
/// (`x-turnstile-*` in any spelling, the rate-limit fields) and without hop-by-hop ones, so
/// that no client reads an upstream's `x-turnstile-payer` trailer as the gateway's statement
/// of who paid. Its own trailers, usage reports included, go on. On the fast path (the chunked
/// body relayed as it comes) and on hyper's (an HTTP/2 client: hyper's HTTP/1.1 server sends
/// no trailers that no `Trailer` field announced, and the gateway drops that hop-by-hop field).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_trailers_reach_the_client_without_gateway_or_hop_by_hop_fields() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    let gone = ["x-turnstile-payer", "x-turnstile_payer", "x-turnstile-error", "ratelimit", "keep-alive"];

    let r = ask(&gw, &get("/v1/raw/trailers")).await.expect("fast path reply");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"ok"[..]), "{}", r.head);
    let trailers = r.trailers.to_ascii_lowercase();
    for name in gone {
        assert!(!trailers.contains(&format!("{name}:")), "fast path relayed the trailer {name}: {trailers:?}");
    }
    for kept in ["x-trailer: kept", "x-usage-video-ms: 5"] {
        assert!(trailers.contains(kept), "fast path: {kept} in {trailers:?}");
    }
    assert_eq!(r.header("x-turnstile-payer"), Some("payg"), "{}", r.head);
    // The upstream connection went back to the pool at the trailers' end: the next call works.
    let r = ask(&gw, &get("/v1/raw/after")).await.expect("next reply");
    assert_eq!(r.status, 200, "{}", r.head);
    // Trailers that come in pieces, after the body's first read.
    let mut w = Wire::connect(gw.addr).await;
    for _ in 0..2 {
        w.s.write_all(get("/v1/raw/trailers-late").as_bytes()).await.expect("write");
        let r = w.reply(T).await.expect("fast path reply");
        assert_eq!((r.status, r.body.as_slice(), r.trailers.as_str()), (200, &b"ok"[..], "X-Trailer: kept\r\n"));
    }

    let (status, body, trailers) = h2_get(gw.url("/v1/raw/trailers")).await;
    assert_eq!((status, &body[..]), (http::StatusCode::OK, &b"ok"[..]));
    let trailers = trailers.expect("the upstream's trailers reach an HTTP/2 client");
    for name in gone {
        assert!(!trailers.contains_key(name), "hyper path relayed the trailer {name}: {trailers:?}");
    }
    assert_eq!(
        (trailers.get("x-trailer"), trailers.get("x-usage-video-ms")),
        (Some(&"kept".parse().unwrap()), Some(&"5".parse().unwrap()))
    );
    assert_eq!(gw.billed_units(FEATURE).await, 5.0);
}

/// The gateway's own fields in the upstream's head, in a spelling other than the one the
/// gateway sets (`X-Turnstile_Payer`, which a CGI-style reader takes for `x-turnstile-payer`)
/// or one it does not set on an answer (`x-turnstile-error`), do not reach the client either,
/// on either path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_fields_of_an_upstream_head_are_dropped_in_any_spelling_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = gateway(&up);
    for (path, request) in both_paths("/v1/raw/gateway-fields") {
        let r = ask(&gw, &request).await.expect("reply");
        assert_eq!(r.status, 200, "{path}: {}", r.head);
        assert_eq!(r.header("x-kept"), Some("yes"), "{path}: {}", r.head);
        for gone in ["x-turnstile_payer", "x-turnstile-error"] {
            assert!(r.header(gone).is_none(), "{path}: {gone} relayed: {}", r.head);
        }
        let payers = r.head.lines().filter(|l| l.to_ascii_lowercase().starts_with("x-turnstile-payer:")).count();
        assert_eq!((payers, r.header("x-turnstile-payer")), (1, Some("payg")), "{path}: {}", r.head);
    }
}

/// SPEC §4: a malformed video report is counted, logged and billed as 0 minutes. A field given
/// twice with different values (`x-usage-video-ms: 1000` and `3600000`) is ambiguous, as two
/// different `Content-Length`s are (RFC 9112 §6.3): malformed, on both paths, whichever value
/// comes first. The same value twice reads as that value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_report_repeated_with_different_values_is_malformed_on_both_paths() {
    let up = RawUpstream::start().await;
    let (_cfg, gw) = video_gateway(&up);
    for (path, request) in both_paths("/v1/raw/usage-conflict").into_iter().chain(both_paths("/v1/raw/usage-repeated"))
    {
        let r = ask(&gw, &request).await.expect("reply");
        assert_eq!(r.status, 200, "{path}: {}", r.head);
    }
    let m = gw.metrics(&client()).await;
    assert_eq!(video_minutes(&m), 2.0, "the agreeing repeats, one minute through each path; no conflicting one: {m}");
    assert!(
        m.contains(r#"turnstile_usage_report_errors_total{feature="comprehensive-video-enhancement"} 2"#),
        "the conflicting reports counted as malformed, one through each path: {m}"
    );
    assert!(gw.logs().contains("x-usage-video"), "logged");
}
