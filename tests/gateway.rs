//! Black-box tests of the data plane (SPEC §4, §5) and the admin listener (§8 auth): the real
//! binary on 127.0.0.1 ephemeral ports, in front of a stand-in upstream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ACME: (&str, &str) = ("x-api-key", "key-acme");
const GLOBEX: (&str, &str) = ("x-api-key", "key-globex");

async fn gateway(plan_qps: u32, upgrade: Option<u32>, server_extra: &str) -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let cfg =
        ConfigDir::new(&main_toml(&up.url(), server_extra, ""), SHIPPED_CATALOG, &entitlements(plan_qps, upgrade));
    let gw = Gateway::start(&cfg);
    (up, cfg, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identification_routing_and_activation_errors() {
    let (_up, _cfg, gw) = gateway(40, None, "").await;
    let c = client();

    let r = post(&c, &gw.url("/v1/face/compare"), &[], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::UNAUTHORIZED, "missing_api_key"));
    assert!(r.header("ratelimit").is_none(), "no tenant identified: no rate-limit fields");

    let r = post(&c, &gw.url("/v1/face/compare"), &[("x-api-key", "nope")], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::UNAUTHORIZED, "invalid_api_key"));

    let r = post(&c, &gw.url("/v1/face/compare"), &[("authorization", "Bearer key-acme")], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "Authorization: Bearer is accepted");

    let r = post(&c, &gw.url("/v1/nothing-here"), &[ACME], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::NOT_FOUND, "unknown_route"));

    let r = post(&c, &gw.url("/v1/face/compare"), &[GLOBEX], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::FORBIDDEN, "service_not_activated"));
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=2;w=1"));

    let r = post(&c, &gw.url("/v1/image-search/search"), &[ACME], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::FORBIDDEN, "service_not_activated"));

    // Prefix routes match below their prefix only.
    let r = post(&c, &gw.url("/v1/detect/objects"), &[ACME], b"{}").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["headers"]["x-turnstile-feature"], "object-detection");
    let r = post(&c, &gw.url("/v1/detect"), &[ACME], b"{}").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let text = gw.metrics(&c).await;
    for line in [
        r#"turnstile_requests_total{feature="",outcome="unauthenticated",tenant=""} 2"#,
        r#"turnstile_requests_total{feature="face-comparison-1-1",outcome="admitted",tenant="acme"} 1"#,
        r#"turnstile_requests_total{feature="face-comparison-1-1",outcome="forbidden",tenant="globex"} 1"#,
        r#"turnstile_requests_total{feature="",outcome="unknown_route",tenant="acme"} 2"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_rules_of_section_4() {
    let (_up, _cfg, gw) = gateway(40, None, "").await;
    let c = client();
    let body = vec![b'x'; 100_000];
    let r = post(
        &c,
        &gw.url("/v1/face/compare?mode=fast"),
        &[
            ("authorization", "Bearer key-acme"),
            ("x-turnstile-tenant", "forged"),
            ("x-turnstile-anything", "forged"),
            ("x-forwarded-for", "203.0.113.7"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "drop me"),
            ("x-custom", "kept"),
        ],
        &body,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let echo = r.json();
    let h = &echo["headers"];
    assert_eq!(echo["path"], "/v1/face/compare");
    assert_eq!(echo["body_bytes"], 100_000, "the body is streamed through whole");
    assert!(h.get("authorization").is_none(), "the key is removed: {h}");
    assert!(h.get("x-api-key").is_none());
    assert_eq!(h["x-turnstile-tenant"], "acme", "incoming x-turnstile-* are replaced");
    assert_eq!(h["x-turnstile-feature"], "face-comparison-1-1");
    assert!(h.get("x-turnstile-anything").is_none());
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert!(h.get("x-hop").is_none(), "headers named in Connection are hop-by-hop");
    assert!(h.get("keep-alive").is_none());
    assert_eq!(h["x-custom"], "kept");

    // The x-api-key header is removed too, and the response carries the rate-limit fields.
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    assert!(r.json()["headers"].get("x-api-key").is_none());
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=40;w=1"));
    let rl = r.header("ratelimit").expect("RateLimit field").to_string();
    assert!(rl.starts_with("\"qps\";r=") && rl.contains(";t="), "{rl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_limit_gets_429_with_retry_after() {
    let (_up, _cfg, gw) = gateway(40, None, "").await;
    let c = client();
    // license-plate-recognition has no plan: the default 2 QPS applies, bucket depth 2.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..4 {
        let r = post(&c, &gw.url("/v1/ocr/license-plate"), &[GLOBEX], b"{}").await;
        statuses.push(r.status.as_u16());
        last = Some(r);
    }
    assert_eq!(&statuses[..2], &[200, 200]);
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    let r = last.expect("a reply");
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::TOO_MANY_REQUESTS, "qps_exceeded"));
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().expect("whole seconds");
    assert!(retry >= 1);
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=2;w=1"));
    assert_eq!(r.header("ratelimit"), Some(format!("\"qps\";r=0;t={retry}").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_temporary_upgrade_sets_the_quota() {
    let (_up, _cfg, gw) = gateway(40, Some(50), "").await;
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=50;w=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_limit_gives_413_for_declared_and_streamed_bodies() {
    let (_up, _cfg, gw) = gateway(40, None, "max_request_body_bytes = 1024").await;
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], &[b'a'; 1024]).await;
    assert_eq!(r.status, StatusCode::OK, "exactly the limit is fine");
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], &[b'a'; 1025]).await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));

    // A chunked body (no Content-Length) is cut off at the limit as it streams.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let chunk = "a".repeat(600);
    let req = format!(
        "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    assert!(text.contains("body_too_large"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_is_502_and_slow_is_504() {
    // A port with nothing listening: bind, note the port, close.
    let dead_addr = dead_addr();
    let cfg =
        ConfigDir::new(&main_toml(&format!("http://{dead_addr}"), "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::BAD_GATEWAY, "upstream_unavailable"));
    assert!(r.header("ratelimit").is_some());
    drop(gw);

    let (_up, _cfg, gw) = gateway(40, None, "upstream_timeout_ms = 300").await;
    let started = Instant::now();
    let r = post(&c, &gw.url("/v1/face/compare?sleep_ms=3000"), &[ACME], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream_timeout"));
    assert!(started.elapsed() < Duration::from_millis(2500), "answered at the timeout, not after the upstream");
    let text = gw.metrics(&c).await;
    assert!(
        text.contains(
            r#"turnstile_requests_total{feature="face-comparison-1-1",outcome="upstream_error",tenant="acme"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_head_is_cut_at_header_read_timeout() {
    let (_up, _cfg, gw) = gateway(40, None, "header_read_timeout_ms = 300").await;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    s.write_all(b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\n").await.expect("write");
    let started = Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the gateway closed the connection");
    assert!(started.elapsed() < Duration::from_secs(3));
    // The server still serves others.
    let c = client();
    assert_eq!(post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await.status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_heads_never_crash_the_gateway() {
    let (_up, _cfg, gw) = gateway(40, None, "").await;
    let long_path = format!("/{}", "a/".repeat(4000));
    let heads: Vec<Vec<u8>> = vec![
        b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: \xff\xfe\x80\r\n\r\n".to_vec(),
        b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nauthorization: Bearer\r\n\r\n".to_vec(),
        b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nauthorization: \xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\xe2\x82\xac\r\n\r\n".to_vec(),
        b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: 99999999999999999999999\r\n\r\n".to_vec(),
        b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\nconnection: \xff, ,,\r\nx-forwarded-for: \xff\r\n\r\n".to_vec(),
        format!("GET {long_path} HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\n\r\n").into_bytes(),
        b"GET http://evil.example/v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\n\r\n".to_vec(),
        b"GET * HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\n\r\n".to_vec(),
        b"\x00\x01\x02 garbage\r\n\r\n".to_vec(),
    ];
    for head in heads {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
        let _ = s.write_all(&head).await;
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    }
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "still serving after hostile input; logs:\n{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_accuracy_20_qps_flooded_for_3_seconds() {
    let (_up, _cfg, gw) = gateway(20, None, "").await;
    let c = client();
    let url = gw.url("/v1/face/compare");
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let c = c.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut throttled, mut other) = (0u32, 0u32, 0u32);
            while Instant::now() < deadline {
                match post(&c, &url, &[ACME], b"{}").await.status.as_u16() {
                    200 => ok += 1,
                    429 => throttled += 1,
                    _ => other += 1,
                }
            }
            (ok, throttled, other)
        }));
    }
    let (mut ok, mut throttled, mut other) = (0, 0, 0);
    for t in tasks {
        let (a, b, c) = t.await.expect("task");
        ok += a;
        throttled += b;
        other += c;
    }
    assert_eq!(other, 0);
    assert!(throttled > 100, "the flood must actually overload the limit ({throttled} throttled)");
    assert!((60..=81).contains(&ok), "20 QPS for 3 s must admit 60..=81, admitted {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_auth_rules() {
    let (_up, cfg, gw) = gateway(40, Some(50), "").await;
    let c = client();
    assert_eq!(get(&c, &gw.admin_url("/healthz"), &[]).await.status, StatusCode::OK);
    assert_eq!(get(&c, &gw.admin_url("/readyz"), &[]).await.status, StatusCode::OK);
    let r = get(&c, &gw.admin_url("/admin/v1/tenants/acme/limits"), &[("authorization", "Bearer x")]).await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::SERVICE_UNAVAILABLE, "admin_disabled"));
    drop(gw);

    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", "s3cret")]);
    for bad in [
        &[][..],
        &[("authorization", "Bearer s3cre")][..],
        &[("authorization", "Bearer s3cret2")][..],
        &[("authorization", "s3cret")][..],
    ] {
        let r = get(&c, &gw.admin_url("/admin/v1/tenants/acme/limits"), bad).await;
        assert_eq!((r.status, r.error_code().as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"), "{bad:?}");
    }
    let r = get(&c, &gw.admin_url("/admin/v1/tenants/acme/limits"), &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = r.json();
    let f = &v["features"]["face-comparison-1-1"];
    assert_eq!(f["limit"], 50);
    assert_eq!(f["source"], "temporary_upgrade");
    assert_eq!(f["plan"]["qps"], 40);
    assert_eq!(f["active_upgrades"][0]["qps"], 50);
    assert_eq!(v["features"]["object-detection"]["source"], "default_qps");
    let r = get(&c, &gw.admin_url("/admin/v1/tenants/nobody/limits"), &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

/// RFC 9110: HEAD is GET without the body (§9.3.2), and a 405 lists the methods the resource
/// takes in `Allow` (§15.5.6). Health checkers and curl -I use HEAD on the probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_probes_answer_head_and_a_405_says_what_is_allowed() {
    let (_up, cfg, gw) = gateway(40, None, "").await;
    drop(gw);
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", "s3cret")]);
    let c = client();
    let auth = [("authorization", "Bearer s3cret")];
    for path in ["/healthz", "/readyz", "/metrics", "/admin/v1/tenants/acme/limits"] {
        let r = send(&c, http::Method::HEAD, &gw.admin_url(path), &auth, b"").await;
        assert_eq!((r.status, r.body.len()), (StatusCode::OK, 0), "HEAD {path}");
    }
    for (method, path, allow) in [
        (http::Method::POST, "/healthz", "GET, HEAD"),
        (http::Method::DELETE, "/metrics", "GET, HEAD"),
        (http::Method::GET, "/admin/v1/reload", "POST"),
        (http::Method::PUT, "/admin/v1/tenants/acme/usage", "GET, HEAD"),
    ] {
        let r = send(&c, method.clone(), &gw.admin_url(path), &auth, b"").await;
        assert_eq!(
            (r.status, r.error_code().as_str(), r.header("allow")),
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", Some(allow)),
            "{method} {path}"
        );
    }
}

async fn stop_with(signal: &'static str) {
    let (_up, _cfg, gw) = gateway(40, None, "").await;
    let c = client();
    let url = gw.url("/v1/face/compare?sleep_ms=800");
    let inflight = tokio::spawn(async move { post(&c, &url, &[ACME], b"{}").await.status });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = gw.addr;
    let status = gw.stop(signal).await;
    assert_eq!(inflight.await.expect("join"), StatusCode::OK, "the in-flight request completed");
    assert!(status.is_some_and(|s| s.success()), "exit status {:?}", status);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err(), "no longer accepting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_and_exits_0() {
    stop_with("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_lets_in_flight_requests_finish_and_exits_0() {
    stop_with("INT").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_mode_prints_a_working_curl_line() {
    let cfg = ConfigDir::new(
        &main_toml("http://127.0.0.1:9", "", ""),
        SHIPPED_CATALOG,
        include_str!("../config/entitlements.json"),
    );
    let main = cfg.main();
    let gw = Gateway::start_with(&["--demo", "--config", main.to_str().expect("utf-8")], &[], cfg.path());
    let out = gw.stdout_lines.join("\n");
    let curl = gw.stdout_lines.iter().find(|l| l.contains("curl")).unwrap_or_else(|| panic!("no curl line in {out}"));
    let key = curl.split("x-api-key: ").nth(1).and_then(|r| r.split('\'').next()).expect("key in curl line");
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[("x-api-key", key)], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "{out}");
    assert_eq!(r.json()["ok"], true, "answered by the stand-in upstream");
}

/// Units == upstream-served successes: a call the upstream answers 2xx is charged even when its
/// client went away before the answer came (the settlement does not hang on the client's
/// connection), the reverse-proxy setting `proxy_ignore_client_abort on`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_call_is_charged_when_its_client_left_before_the_answer() {
    let (_up, _cfg, gw) = gateway(40, None, "").await;
    let c = client();
    let billed = |text: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with("turnstile_billed_units_total{") && l.contains("tenant=\"globex\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    for i in 0..3 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
        let head = "POST /v1/ocr/license-plate?sleep_ms=400 HTTP/1.1\r\nhost: x\r\nx-api-key: key-globex\r\ncontent-length: 2\r\n\r\n{}";
        s.write_all(head.as_bytes()).await.expect("write");
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s); // the client leaves while the upstream works on the call
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = gw.metrics(&c).await;
            if billed(&text) >= f64::from(i + 1) {
                break;
            }
            assert!(Instant::now() < deadline, "call {i}: the upstream served it, but it was not charged:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // And charged exactly once each.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(billed(&gw.metrics(&c).await), 3.0);
}

/// SPEC §10: `turnstile_requests_total` counts every request once, also one whose client reset
/// its connection while the upstream worked on it: the upstream then times out (504), the
/// gateway's answer cannot be written, and the call still counts as `upstream_error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_is_counted_when_its_client_reset_the_connection() {
    let (_up, _cfg, gw) = gateway(40, None, "upstream_timeout_ms = 300").await;
    let c = client();
    let series =
        r#"turnstile_requests_total{feature="license-plate-recognition",outcome="upstream_error",tenant="globex"} "#;
    let count =
        |text: &str| -> u64 { text.lines().find_map(|l| l.strip_prefix(series)?.trim().parse().ok()).unwrap_or(0) };
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let head = "POST /v1/ocr/license-plate?sleep_ms=2000 HTTP/1.1\r\nhost: x\r\nx-api-key: key-globex\r\ncontent-length: 2\r\n\r\n{}";
    s.write_all(head.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    s.set_zero_linger().expect("SO_LINGER 0");
    drop(s); // a reset: the 504 cannot be written
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = gw.metrics(&c).await;
        if count(&text) == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the timed-out call of a client that left was not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SPEC §4 "Forwarded requests: the API key (header or `Authorization`) is removed": also when
/// the client sends it both ways at once (`x-api-key` and `Authorization: Bearer`), on the
/// fast path and on hyper's (`te: trailers` makes the fast path hand the request to hyper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_api_key_sent_both_ways_reaches_the_upstream_in_neither() {
    let (_up, _cfg, gw) = gateway(40, None, "").await;
    for extra in ["", "te: trailers\r\n"] {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
        let req = format!(
            "POST /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\n\
             authorization: Bearer key-acme\r\n{extra}content-length: 2\r\nconnection: close\r\n\r\n{{}}"
        );
        s.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .expect("answer within 5 s")
            .expect("read");
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 200"), "{extra:?}: {text}");
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let echo: serde_json::Value = serde_json::from_str(body).expect("the upstream's echo");
        assert_eq!(echo["headers"]["x-turnstile-tenant"], "acme");
        assert!(
            !echo["headers"].to_string().contains("key-acme"),
            "{extra:?}: the API key reached the upstream: {}",
            echo["headers"]
        );
    }
}
