//! Black-box tests of the connection edge (SPEC §3.1 `[server]`, §4 refusals before the body):
//! refused uploads are drained so the client reads the answer, slow uploads are cut off, the
//! connection cap holds excess connections back, and ambiguous framing is never forwarded.
//! Raw sockets throughout: these are about bytes on the wire, which an HTTP client hides.

mod common;

use std::time::{Duration, Instant};

use common::wire::{read_reply, RawReply};
use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MB: usize = 1024 * 1024;

async fn gateway(server_extra: &str) -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), server_extra, ""), SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    (up, cfg, gw)
}

/// Writes the whole request (head, then body) before reading anything, like a simple client,
/// then reads the response.
async fn write_all_then_read(s: &mut TcpStream, head: &str, body: &[u8]) -> Result<RawReply, String> {
    s.write_all(head.as_bytes()).await.map_err(|e| format!("writing the head: {e}"))?;
    s.write_all(body).await.map_err(|e| format!("writing the body: {e}"))?;
    read_reply(s, Duration::from_secs(5)).await
}

fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 10 + 16);
    for c in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_oversize_upload_reads_413_every_time() {
    let (_up, _cfg, gw) = gateway("max_request_body_bytes = 1048576").await;
    let body = vec![b'x'; 5 * MB];
    let head = format!(
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    // A race when the gateway closes with the upload unread: try it many times.
    for attempt in 0..20 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, &head, &body).await.unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"), "attempt {attempt}");
        assert_eq!(r.header("connection"), Some("close"), "413 closes the connection: {}", r.head);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_refusals_drain_the_upload_and_keep_the_connection() {
    let (_up, _cfg, gw) = gateway("").await;
    let body = vec![b'x'; 5 * MB];
    let refused = format!(
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: nope\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let unknown = format!(
        "POST /v1/no-such-route HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    for attempt in 0..5 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, &refused, &body).await.unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!((r.status, r.error_code().as_str()), (401, "invalid_api_key"), "attempt {attempt}");
        // The whole upload was read and discarded: the same connection serves the next request.
        let r = write_all_then_read(&mut s, &unknown, &body).await.unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!((r.status, r.error_code().as_str()), (404, "unknown_route"), "attempt {attempt}");
        let ok = "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: 2\r\n\r\n";
        let r = write_all_then_read(&mut s, ok, b"{}").await.unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!(r.status, 200, "attempt {attempt}: {}", String::from_utf8_lossy(&r.body));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_stops_at_64_mib_and_closes_the_connection() {
    let (_up, _cfg, gw) = gateway("").await;
    let total = 100 * MB;
    let s = TcpStream::connect(gw.addr).await.expect("connect");
    let (mut rd, mut wr) = s.into_split();
    let head =
        format!("POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: nope\r\ncontent-length: {total}\r\n\r\n");
    let writer = tokio::spawn(async move {
        wr.write_all(head.as_bytes()).await.expect("head");
        let chunk = vec![b'x'; 256 * 1024];
        let mut sent = 0;
        while sent < total {
            if wr.write_all(&chunk).await.is_err() {
                break;
            }
            sent += chunk.len();
        }
        sent
    });
    // The answer comes first; the connection is closed once 64 MiB have been discarded.
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(8), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = rd.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "the connection was closed");
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 401 "), "{:?}", String::from_utf8_lossy(&out));
    let sent = tokio::time::timeout(Duration::from_secs(8), writer).await.expect("writer stops").expect("join");
    assert!((64 * MB..total).contains(&sent), "wrote {sent} bytes before the gateway closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_over_the_limit_gets_413_without_100_continue() {
    let (_up, _cfg, gw) = gateway("max_request_body_bytes = 1048576").await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let head = format!(
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\nexpect: 100-continue\r\ncontent-length: {}\r\n\r\n",
        5 * MB
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let r = read_reply(&mut s, Duration::from_secs(5)).await.expect("a response");
    assert_eq!(r.interim, "", "no 100 Continue before the refusal");
    assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"));
    // Nothing else follows: no late 100 Continue while the gateway waits for the body it refused.
    let mut rest = [0u8; 64];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(500), s.read(&mut rest)).await {
        assert!(!String::from_utf8_lossy(&rest[..n]).contains("100"), "{:?}", &rest[..n]);
    }

    // Under the limit, the body is wanted: 100 Continue, then the upstream's answer.
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(
        b"POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
    )
    .await
    .expect("write");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("100 in time").expect("read");
    assert!(buf[..n].starts_with(b"HTTP/1.1 100 Continue\r\n"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    s.write_all(b"{}").await.expect("write");
    let r = read_reply(&mut s, Duration::from_secs(5)).await.expect("a response");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_upload_crossing_the_limit_mid_stream_reads_413() {
    let (_up, _cfg, gw) = gateway("max_request_body_bytes = 1048576").await;
    let body = chunked(&vec![b'y'; 5 * MB], 64 * 1024);
    let head = "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ntransfer-encoding: chunked\r\n\r\n";
    for attempt in 0..10 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, head, &body).await.unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"), "attempt {attempt}");
        assert_eq!(r.header("x-turnstile-payer"), Some("prepaid_qps"), "admitted, then refused: {}", r.head);
    }
}

/// SPEC §4: a request refused with 413 leaves the quota as it was, also when the body is found too
/// large only while it streams (after admission): its token is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_mid_stream_gives_its_token_back() {
    let (_up, _cfg, gw) = gateway("max_request_body_bytes = 65536").await;
    // globex: license plates at the default 2 QPS (depth 2), paid pay-as-you-go.
    let body = chunked(&vec![b'y'; 256 * 1024], 16 * 1024);
    let head =
        "POST /v1/ocr/license-plate HTTP/1.1\r\nhost: x\r\nx-api-key: key-globex\r\ntransfer-encoding: chunked\r\n\r\n";
    for attempt in 0..6 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, head, &body).await.unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"), "attempt {attempt}: {}", r.head);
    }
    let c = client();
    for i in 0..2 {
        let r = post(&c, &gw.url("/v1/ocr/license-plate"), &[("x-api-key", "key-globex")], b"{}").await;
        assert_eq!(r.status, http::StatusCode::OK, "call {i}: the whole burst is left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_to_an_unreachable_upstream_reads_502() {
    // A port with nothing listening: the upload is admitted, then never read by anyone.
    let dead_addr = dead_addr();
    let cfg =
        ConfigDir::new(&main_toml(&format!("http://{dead_addr}"), "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    let body = vec![b'z'; 5 * MB];
    let head = format!(
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    for attempt in 0..10 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, &head, &body).await.unwrap_or_else(|e| panic!("attempt {attempt}: {e}"));
        assert_eq!((r.status, r.error_code().as_str()), (502, "upstream_unavailable"), "attempt {attempt}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_upload_gets_408_and_is_not_charged() {
    // od-1 pays exactly one object-detection call (0.2 points).
    let ents = format!(
        r#"{{"tenants": {{
  "acme": {{"api_keys": ["{acme}"], "services": ["face_body", "object_detection"],
    "packages": [{{"id": "od-1", "feature": "object-detection", "points": "0.2", "ordered_at": "{from}", "expires_at": "{until}"}}]}}
}}}}"#,
        acme = key_hash("key-acme"),
        from = at(-3600),
        until = at(86400),
    );
    let up = Upstream::start().await;
    let main = main_toml(
        &up.url(),
        "body_read_timeout_ms = 300\nupstream_timeout_ms = 20000",
        "[admission]\ndefault_qps = 50",
    );
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &ents);
    let gw = Gateway::start(&cfg);
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(
        b"POST /v1/detect/objects HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: 1000\r\n\r\n0123456789",
    )
    .await
    .expect("write");
    let started = Instant::now();
    let r = read_reply(&mut s, Duration::from_secs(5)).await.expect("a response");
    assert_eq!((r.status, r.error_code().as_str()), (408, "body_timeout"));
    assert!(started.elapsed() < Duration::from_millis(1500), "cut off after ~300 ms, took {:?}", started.elapsed());
    assert_eq!(r.header("connection"), Some("close"));

    let c = client();
    let text = gw.metrics(&c).await;
    assert!(!text.contains("turnstile_billed_units_total{"), "nothing billed for the 408:\n{text}");
    // The package share it had reserved is back: the next call is paid by od-1, the one after by payg.
    let r = post(&c, &gw.url("/v1/detect/objects"), &[("x-api-key", "key-acme")], b"{}").await;
    assert_eq!((r.status, r.header("x-turnstile-payer")), (StatusCode::OK, Some("single_package:od-1")));
    let r = post(&c, &gw.url("/v1/detect/objects"), &[("x-api-key", "key-acme")], b"{}").await;
    assert_eq!((r.status, r.header("x-turnstile-payer")), (StatusCode::OK, Some("payg")));
    let text = gw.metrics(&c).await;
    assert!(
        text.contains(
            r#"turnstile_billed_units_total{feature="object-detection",payer="single_package",tenant="acme"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_but_steady_upload_is_not_cut_off() {
    let (_up, _cfg, gw) = gateway("body_read_timeout_ms = 300").await;
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: 10\r\n\r\n")
        .await
        .expect("write");
    // 10 bytes over ~1 s: each gap is under the timeout, the whole upload is well over it.
    for b in b"0123456789" {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s.write_all(&[*b]).await.expect("write");
    }
    let r = read_reply(&mut s, Duration::from_secs(5)).await.expect("a response");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["body_bytes"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_holds_excess_connections_back_until_one_closes() {
    let (_up, _cfg, gw) = gateway("max_connections = 2\nheader_read_timeout_ms = 20000").await;
    let req = "GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\n\r\n";
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, req, b"").await.expect("served");
        assert_eq!(r.status, 200);
        held.push(s); // idle keep-alive connection
    }
    // The third connection completes in the kernel's backlog, but is not served.
    let mut third = TcpStream::connect(gw.addr).await.expect("connect");
    third.write_all(req.as_bytes()).await.expect("write");
    let waited = read_reply(&mut third, Duration::from_millis(1000)).await;
    assert!(waited.is_err(), "a third connection was served: {waited:?}");
    // The admin listener is not counted.
    let c = client();
    assert_eq!(get(&c, &gw.admin_url("/healthz"), &[]).await.status, StatusCode::OK);
    // One closes: the waiting one is accepted and answered.
    drop(held.remove(0));
    let r = read_reply(&mut third, Duration::from_secs(5)).await.expect("served once a slot is free");
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_give_their_slot_back_after_header_read_timeout() {
    let (_up, _cfg, gw) = gateway("max_connections = 1\nheader_read_timeout_ms = 300").await;
    let req = "GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\n\r\n";
    let mut idle = TcpStream::connect(gw.addr).await.expect("connect");
    assert_eq!(write_all_then_read(&mut idle, req, b"").await.expect("served").status, 200);
    // The idle connection holds the only slot until the gateway closes it, ~300 ms from now.
    let started = Instant::now();
    let mut next = TcpStream::connect(gw.addr).await.expect("connect");
    let r = write_all_then_read(&mut next, req, b"").await.expect("served once the idle one is closed");
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(200), "served at once: the slot was not held");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(2), idle.read_to_end(&mut rest)).await;
    assert!(matches!(closed, Ok(Ok(0))), "the idle connection was closed: {closed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_is_forwarded_with_one_framing() {
    let (_up, _cfg, gw) = gateway("").await;
    let body = chunked(b"0123456789abcdef", 10);
    for head in [
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, head, &body).await.expect("a response");
        // The body is read as chunked (Transfer-Encoding wins, RFC 9112 §6.3) ...
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let echo = r.json();
        assert_eq!(echo["body_bytes"], 16, "{echo}");
        // ... and forwarded chunked only, without the conflicting Content-Length.
        assert_eq!(echo["headers"]["transfer-encoding"], "chunked", "{echo}");
        assert!(echo["headers"].get("content-length").is_none(), "{echo}");
        // Such a message is never followed on the same connection (no smuggled second request).
        assert_eq!(r.header("connection"), Some("close"), "{}", r.head);
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
        assert!(matches!(n, Ok(Ok(0))), "closed after the response: {n:?}");
    }
    // hyper refuses what it cannot frame: a Transfer-Encoding not ending in chunked, two lengths.
    for head in [
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ntransfer-encoding: gzip\r\ncontent-length: 5\r\n\r\n",
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(head.as_bytes()).await.expect("write");
        s.write_all(b"hello!").await.expect("write");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 400 "), "{head:?} -> {text:?}");
    }
    // A transfer coding besides chunked (which hyper would undo only the chunked part of, so the
    // upstream would get gzip bytes as the body) is refused, not forwarded: 501, as reverse proxies answer it.
    for te in ["gzip, chunked", "chunked, chunked", "gzip\r\ntransfer-encoding: chunked"] {
        let head = format!(
            "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ntransfer-encoding: {te}\r\n\r\n"
        );
        let mut s = TcpStream::connect(gw.addr).await.expect("connect");
        let r = write_all_then_read(&mut s, &head, &body).await.unwrap_or_else(|e| panic!("{te:?}: {e}"));
        assert_eq!((r.status, r.error_code().as_str()), (501, "unsupported_transfer_encoding"), "{te:?}");
    }
    // A chunked body on a GET reaches the upstream too (not sent as an empty body).
    let mut s = TcpStream::connect(gw.addr).await.expect("connect");
    let head = "GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ntransfer-encoding: chunked\r\n\r\n";
    let r = write_all_then_read(&mut s, head, &body).await.expect("a response");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["body_bytes"], 16, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn check_rejects_zero_max_connections_and_body_read_timeout() {
    let cfg = ConfigDir::new(
        &main_toml("http://127.0.0.1:1", "max_connections = 0\nbody_read_timeout_ms = 0", ""),
        SHIPPED_CATALOG,
        &entitlements(40, None),
    );
    let out = std::process::Command::new(BIN).arg("check").arg("--config").arg(cfg.main()).output().expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let file = cfg.main();
    let file = file.display();
    for line in [
        format!("{file}: server.max_connections: must be at least 1 and at most 1000000"),
        format!("{file}: server.body_read_timeout_ms: must be at least 1"),
    ] {
        assert!(stderr.contains(&line), "missing {line:?} in\n{stderr}");
    }
}
