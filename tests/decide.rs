//! The decision of SPEC §4: which path a request is routed and forwarded on (normalization,
//! 400 `bad_path`).
//!
//! The path corpus runs against the real binary (raw request lines over TCP, so that the bytes
//! sent are exactly the bytes written here) in front of the stand-in upstream, which echoes the
//! path it received and the `x-turnstile-feature` header.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// Paths (black-box)
// ---------------------------------------------------------------------------------------------

/// `acme` has face_body and object_detection; `det` has object_detection only. Limits high
/// enough that the corpus never meets a 429.
fn path_entitlements() -> String {
    format!(
        r#"{{"tenants": {{
  "acme": {{"api_keys": ["{}"], "services": ["face_body", "object_detection"]}},
  "det": {{"api_keys": ["{}"], "services": ["object_detection"]}}
}}}}"#,
        key_hash("key-acme"),
        key_hash("key-det")
    )
}

async fn path_gateway() -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let rest = "[admission]\ndefault_qps = 50\nburst_seconds = 20.0\n";
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", rest), SHIPPED_CATALOG, &path_entitlements());
    let gw = Gateway::start(&cfg);
    (up, cfg, gw)
}

/// What a request line got: the status, the error code (gateway refusals), and for a forwarded
/// request the feature and the path the upstream saw.
#[derive(Debug, PartialEq, Eq, Clone)]
struct Seen {
    status: u16,
    code: Option<String>,
    feature: Option<String>,
    upstream_path: Option<String>,
}

/// Sends `GET <target> HTTP/1.1` byte for byte and reads the whole answer (`connection: close`).
async fn raw(gw: &Gateway, target: &[u8], key: &str) -> Seen {
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(format!(" HTTP/1.1\r\nhost: x\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n").as_bytes());
    s.write_all(&req).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("answer within 5 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status: u16 = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line for {:?}: {text:?}", String::from_utf8_lossy(target)));
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
    let str_at = |ptr: &str| json.as_ref().and_then(|j| j.pointer(ptr)).and_then(|v| v.as_str()).map(String::from);
    Seen {
        status,
        code: str_at("/error/code"),
        feature: str_at("/headers/x-turnstile-feature"),
        upstream_path: str_at("/path"),
    }
}

fn dot_free(p: &str) -> bool {
    p.starts_with('/')
        && !p.contains("//")
        && !p.split('/').any(|s| s == "." || s == "..")
        && !p.to_ascii_lowercase().contains("%2e")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_path_reaches_what_its_plain_spelling_reaches() {
    let (_up, _cfg, gw) = path_gateway().await;
    // (spelling, its plain spelling)
    let corpus: &[(&str, &str)] = &[
        ("/v1/detect/../face/compare", "/v1/face/compare"),
        ("/v1/detect/%2e%2e/face/compare", "/v1/face/compare"),
        ("/v1/detect/%2E%2E/face/compare", "/v1/face/compare"),
        ("/v1/detect/%2E./face/compare", "/v1/face/compare"),
        ("/v1/detect/.%2e/face/compare", "/v1/face/compare"),
        ("/v1/detect/x/../../face/compare", "/v1/face/compare"),
        ("/v1/detect/../../../v1/face/compare", "/v1/face/compare"),
        ("/../v1/face/compare", "/v1/face/compare"),
        ("/v1/detect/./x", "/v1/detect/x"),
        ("/v1/./detect/x", "/v1/detect/x"),
        ("/v1/detect//x", "/v1/detect/x"),
        ("//v1//detect//x", "/v1/detect/x"),
        ("/v1/detect/%2e/x", "/v1/detect/x"),
        ("/v1/detect/..", "/v1/"),
        ("/v1/detect/%2e%2e", "/v1/"),
        ("/v1/detect/x/..", "/v1/detect/"),
        ("/v1/detect/x/.", "/v1/detect/x/"),
        ("/v1/face/compare/.", "/v1/face/compare/"),
        ("/v1/face/compare/x/..", "/v1/face/compare/"),
        ("/v1/face/compare/..", "/v1/face/"),
        ("/v1/face/compare//", "/v1/face/compare/"),
        ("/v1/%66ace/compare", "/v1/face/compare"),
        ("/v1/%66%41ce/compare", "/v1/fAce/compare"),
        ("/%76%31/face/%63ompare", "/v1/face/compare"),
        ("/v1/face%2dx", "/v1/face-x"),
        ("/v1/detect/%7e%5f%2D", "/v1/detect/~_-"),
        ("/v1/detect/%3a%40", "/v1/detect/%3A%40"),
        ("/v1/detect/a%20b", "/v1/detect/a%20b"),
        ("/v1/detect/%252e%252e", "/v1/detect/%252e%252e"),
        ("/v1/face/compare?x=/../detect", "/v1/face/compare"),
    ];
    for key in ["key-acme", "key-det"] {
        for (spelling, plain) in corpus {
            let got = raw(&gw, spelling.as_bytes(), key).await;
            let want = raw(&gw, plain.as_bytes(), key).await;
            assert_eq!(got, want, "{key}: {spelling} vs its plain spelling {plain}");
            assert!(matches!(got.status, 200 | 403 | 404), "{key}: {spelling}: {got:?}");
            if got.status == 200 {
                let p = got.upstream_path.as_deref().expect("the upstream echoes its path");
                let plain_path = plain.split('?').next().unwrap_or(plain);
                assert_eq!(p, plain_path, "{key}: {spelling} reached the upstream as {p}");
                assert!(dot_free(p), "{p}");
            }
        }
    }
    // The bypass of issue 11: `det` has no face_body, so no spelling reaches face comparison.
    let r = raw(&gw, b"/v1/detect/../face/compare", "key-det").await;
    assert_eq!((r.status, r.code.as_deref()), (403, Some("service_not_activated")));
    // And for `acme` the call is face comparison, not object detection.
    let r = raw(&gw, b"/v1/detect/%2e%2e/face/compare", "key-acme").await;
    assert_eq!(r.feature.as_deref(), Some("face-comparison-1-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_separators_and_non_origin_form_targets_get_400_bad_path() {
    let (_up, _cfg, gw) = path_gateway().await;
    let bad: &[&[u8]] = &[
        b"/v1/detect/%2Fx",
        b"/v1/detect/%2fx",
        b"/v1/detect/..%2f..%2fface/compare",
        b"/v1/detect/%5Cx",
        b"/v1/detect/%5cx",
        b"/v1/detect/..%5c..%5cface/compare",
        b"/v1/detect/\\x",
        b"/v1/detect\\..\\face/compare",
        b"/v1/detect/%zz",
        b"/v1/detect/%4",
        b"/v1/detect/%",
        b"/v1/detect/%%32%65",
        // Bytes outside RFC 3986 that hyper passes on (valid UTF-8, and a few ASCII ones).
        b"/v1/detect/\xc3\xa9",
        b"/v1/detect/a\"b",
        b"/v1/detect/a{b}",
        b"/v1/detect/a|b",
        b"/v1/detect/a^b",
        b"/v1/detect/a[b]",
        b"http://evil.example/v1/face/compare",
        b"http://x/v1/detect/x",
        b"*",
    ];
    for key in ["key-acme", "key-det"] {
        for target in bad {
            let r = raw(&gw, target, key).await;
            assert_eq!(
                (r.status, r.code.as_deref()),
                (400, Some("bad_path")),
                "{key}: {:?} -> {r:?}",
                String::from_utf8_lossy(target)
            );
        }
    }
    // Bytes hyper refuses itself, before the gateway sees the request: a plain 400 without our
    // JSON body (pinned here so that a hyper upgrade that starts passing them on is noticed).
    let hyper_refuses: &[&[u8]] = &[
        b"/v1/detect/a\x7fb",
        b"/v1/detect/a\x01b",
        b"/v1/detect/\xc0\xaf",
        b"/v1/detect/\xff",
        b"/v1/detect/a`b",
        b"/v1/detect/a<b>",
    ];
    for target in hyper_refuses {
        let r = raw(&gw, target, "key-acme").await;
        assert_eq!(r.status, 400, "{:?} -> {r:?}", String::from_utf8_lossy(target));
        assert!(r.feature.is_none());
    }
    // Unauthenticated requests are still 401 first: the path is judged at the route step.
    let r = raw(&gw, b"/v1/detect/%2fx", "nope").await;
    assert_eq!((r.status, r.code.as_deref()), (401, Some("invalid_api_key")));

    let c = client();
    let text = gw.metrics(&c).await;
    let want = 2 * bad.len();
    let acme = r#"turnstile_requests_total{feature="",outcome="unknown_route",tenant="acme"} "#;
    let line = text.lines().find(|l| l.starts_with(acme)).unwrap_or_else(|| panic!("no {acme} in\n{text}"));
    assert_eq!(line, format!("{acme}{}", want / 2), "400 bad_path is counted as unknown_route");
}
