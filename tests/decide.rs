//! The decision of SPEC §4: which path a request is routed and forwarded on (normalization,
//! 400 `bad_path`), and that only admitted requests take from a bucket.
//!
//! The path corpus runs against the real binary (raw request lines over TCP, so that the bytes
//! sent are exactly the bytes written here) in front of the stand-in upstream, which echoes the
//! path it received and the `x-turnstile-feature` header. The token tests run `decide()`
//! in-process on a `ManualClock`, so bucket refills cannot blur the count.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{HeaderMap, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turnstile::clock::{ManualClock, SharedClock};
use turnstile::config::{ConfigSource, Texts};
use turnstile::proxy::{decide_now as decide, Decision};
use turnstile::server::Gateway as InProcess;
use turnstile::snapshot::build;

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
        // Dot-segments with `;` parameters, which Tomcat-like upstreams read as `..`: routed as
        // object detection, they would be served as face comparison.
        b"/v1/detect/..;/face/compare",
        b"/v1/detect/..;a=b/face/compare",
        b"/v1/detect/%2e%2e;/face/compare",
        b"/v1/detect/.;/x",
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

// ---------------------------------------------------------------------------------------------
// Tokens (in-process, frozen clock)
// ---------------------------------------------------------------------------------------------

const TOKEN_CATALOG: &str = r#"currency = "CNY"
[families.face_body]
name = "Face and Body"
[families.text_recognition]
name = "Text Recognition"
[features.face-comparison-1-1]
family = "face_body"
billing = ["single_package"]
[features.object-detection]
family = "face_body"
billing = ["payg"]
[features.license-plate-recognition]
family = "text_recognition"
billing = ["payg"]
[image_search]
currency = "USD"
delete_qps = 20
retention_days = 7
packages = [ { capacity = 3, qps = 2, month = "1.00" } ]
"#;

fn token_main(ledger: &std::path::Path) -> String {
    format!(
        r#"[server]
upstream = "http://127.0.0.1:1"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
max_request_body_bytes = 1000
[admission]
default_qps = 2
burst_seconds = 1.0
[ledger]
dir = "{}"
[[routes]]
path = "/v1/face/compare"
feature = "face-comparison-1-1"
[[routes]]
path = "/v1/detect/*"
feature = "object-detection"
[[routes]]
path = "/v1/ocr/license-plate"
feature = "license-plate-recognition"
[[routes]]
path = "/v1/image-search/add"
feature = "image-search"
op = "add"
"#,
        ledger.display()
    )
}

/// `acme`: face_body (and text_recognition when `ocr`), an image-search instance holding at most
/// 3 images at 2 QPS, and when `package` a face comparison package (face comparison is sold by
/// package only, and a package leaves the limit, hence the bucket, as it was).
fn token_entitlements(package: bool, ocr: bool) -> String {
    let packages = if package {
        r#"[{"id": "fc-1", "feature": "face-comparison-1-1", "points": "3", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}]"#
    } else {
        "[]"
    };
    let services = if ocr { r#"["face_body", "text_recognition"]"# } else { r#"["face_body"]"# };
    format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{}"], "services": {services}, "packages": {packages},
            "image_search": {{"capacity": 3, "qps": 2, "expires_at": "2027-01-01T00:00:00Z"}}}}}}}}"#,
        key_hash("key-acme")
    )
}

struct Fixture {
    _dir: tempfile::TempDir,
    gw: Arc<InProcess>,
    clock: Arc<ManualClock>,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().expect("tmp");
        let texts = Texts::in_memory(token_main(dir.path()), TOKEN_CATALOG, token_entitlements(false, false));
        let snap = build(&texts, 1).unwrap_or_else(|e| panic!("{e}"));
        let clock = ManualClock::at("2026-03-01T00:00:00Z");
        let shared: SharedClock = clock.clone();
        let gw = InProcess::new(texts, snap, ConfigSource::Embedded, None, shared).expect("gateway");
        Fixture { _dir: dir, gw, clock }
    }

    /// Swaps in entitlements (what a reload does), keeping the buckets.
    fn entitle(&self, package: bool, ocr: bool) {
        self.swap(&token_entitlements(package, ocr));
    }

    /// Swaps in these entitlements, keeping the buckets.
    fn swap(&self, entitlements: &str) {
        let texts = Texts::in_memory(token_main(self._dir.path()), TOKEN_CATALOG, entitlements);
        let snap = build(&texts, 2).unwrap_or_else(|e| panic!("{e}"));
        self.gw.snapshot.store(Arc::new(snap));
    }

    /// The status and rate-limit fields `(q, r, t)` of a call by acme that is refused.
    fn refusal(&self, path: &str, headers: &[(&'static str, &'static str)]) -> (u16, Option<(u32, u32, u64)>) {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-acme"));
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        match decide(&self.gw, &h, path) {
            Decision::Forward(_) => panic!("{path}: forwarded, not refused"),
            Decision::Reject(e, _, rate) => (e.status().as_u16(), rate.map(|r| r.values())),
        }
    }

    /// The status `decide()` answers with (200 for a forward, which is dropped at once).
    fn status(&self, path: &str, headers: &[(&'static str, &'static str)]) -> u16 {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, HeaderValue::from_static(v));
        }
        match decide(&self.gw, &h, path) {
            Decision::Forward(_) => 200,
            Decision::Reject(e, ..) => e.status().as_u16(),
        }
    }

    /// `n` calls by acme that must all be forwarded, held in flight (their shares and slots kept).
    fn admitted(&self, n: usize, path: &str) -> Vec<turnstile::proxy::Forward> {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-acme"));
        (0..n)
            .map(|_| match decide(&self.gw, &h, path) {
                Decision::Forward(fwd) => fwd,
                Decision::Reject(e, ..) => panic!("the whole quota should remain: {e}"),
            })
            .collect()
    }

    fn acme(&self, path: &str) -> u16 {
        self.status(path, &[("x-api-key", "key-acme")])
    }

    /// The full burst (depth 2 at 2 QPS) is admitted, and not one request more.
    fn assert_full_burst(&self, path: &str) {
        let got: Vec<u16> = (0..3).map(|_| self.acme(path)).collect();
        assert_eq!(got, [200, 200, 429], "{path}: the whole quota should remain");
    }
}

const FLOOD: usize = 10;

#[tokio::test]
async fn payment_required_leaves_the_quota_intact() {
    let f = Fixture::new().await;
    for _ in 0..FLOOD {
        assert_eq!(f.acme("/v1/face/compare"), 402, "sold by package only, and no package: nothing pays");
    }
    f.entitle(true, false);
    // The full burst: two calls admitted (each holding a package point while in flight), the
    // third throttled.
    let in_flight = f.admitted(2, "/v1/face/compare");
    assert_eq!(f.acme("/v1/face/compare"), 429);
    // The throttled call gave its reserved point back: one of the three is still free.
    let snap = f.gw.snapshot.load();
    let fc = snap.catalog.feature_index["face-comparison-1-1"];
    let now = f.gw.clock.unix_nanos();
    assert!(
        turnstile::store::ready(f.gw.billing.reserve(&snap, &snap.tenants[0], fc, now))
            .expect("local: ready")
            .expect("local: no store error")
            .is_some(),
        "a throttled call keeps no share"
    );
    drop(in_flight);
}

#[tokio::test]
async fn capacity_exceeded_leaves_the_quota_intact_and_a_throttled_add_gives_its_slot_back() {
    let f = Fixture::new().await;
    let snap = f.gw.snapshot.load();
    let acme = &snap.tenants[0];
    let held: Vec<_> = (0..3)
        .map(|_| {
            turnstile::store::ready(f.gw.billing.reserve_image_add(acme, 3))
                .expect("local: ready")
                .expect("local: no store error")
                .expect("a slot")
        })
        .collect();
    for _ in 0..FLOOD {
        assert_eq!(f.acme("/v1/image-search/add"), 409);
    }
    drop(held);
    // The full burst: two adds admitted (each holding a slot while in flight), the third throttled.
    let in_flight = f.admitted(2, "/v1/image-search/add");
    assert_eq!(f.acme("/v1/image-search/add"), 429);
    // The throttled add gave its slot back: one of the three is still free.
    assert!(
        turnstile::store::ready(f.gw.billing.reserve_image_add(acme, 3))
            .expect("local: ready")
            .expect("local: no store error")
            .is_some(),
        "a throttled add keeps no slot"
    );
    drop(in_flight);
}

/// Many threads flood one package-paid pair: exactly the burst is admitted, and every throttled
/// call gives its reserved share back (after the admitted ones end, the whole package is there).
/// While the flood runs, a call may see 402 instead of 429 when the throttled calls in flight hold
/// the package's last points (README: order of checks); never is anything else answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_flood_leaks_no_package_share() {
    let f = Fixture::new().await;
    f.entitle(true, false);
    let gw = f.gw.clone();
    let (admitted, statuses) = tokio::task::spawn_blocking(move || {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-acme"));
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        let (mut admitted, mut statuses) = (Vec::new(), Vec::new());
                        for _ in 0..500 {
                            match decide(&gw, &h, "/v1/face/compare") {
                                Decision::Forward(fwd) => admitted.push(fwd),
                                Decision::Reject(e, ..) => statuses.push(e.status().as_u16()),
                            }
                        }
                        (admitted, statuses)
                    })
                })
                .collect();
            let mut all = (Vec::new(), Vec::new());
            for t in threads {
                let (a, s) = t.join().expect("thread");
                all.0.extend(a);
                all.1.extend(s);
            }
            all
        })
    })
    .await
    .expect("join");
    assert_eq!(admitted.len(), 2, "the burst, and not one call more");
    assert!(statuses.iter().all(|s| *s == 429 || *s == 402), "{statuses:?}");
    drop(admitted);
    let snap = f.gw.snapshot.load();
    let fc = snap.catalog.feature_index["face-comparison-1-1"];
    let now = f.gw.clock.unix_nanos();
    let shares: Vec<_> = (0..4)
        .map(|_| {
            turnstile::store::ready(f.gw.billing.reserve(&snap, &snap.tenants[0], fc, now))
                .expect("local: ready")
                .expect("local: no store error")
        })
        .collect();
    assert_eq!(shares.iter().filter(|r| r.is_some()).count(), 3, "the package's 3 points, all back");
}

/// A throttled request must be told 429, never 402: refusals by the bucket hold no package share,
/// even for a moment, so a racing request never finds the package spent by calls that were
/// refused anyway (nor falls through to a payer after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_requests_never_hold_a_package_share() {
    let f = Fixture::new().await;
    f.entitle(true, false);
    // The burst (2) is admitted and dropped (its shares go back): the bucket is empty and the
    // manual clock never refills it.
    assert_eq!([f.acme("/v1/face/compare"), f.acme("/v1/face/compare")], [200, 200]);
    let gw = f.gw.clone();
    let statuses = tokio::task::spawn_blocking(move || {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_static("key-acme"));
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..2000)
                            .map(|_| match decide(&gw, &h, "/v1/face/compare") {
                                Decision::Forward(_) => 200,
                                Decision::Reject(e, ..) => e.status().as_u16(),
                            })
                            .collect::<Vec<u16>>()
                    })
                })
                .collect();
            threads.into_iter().flat_map(|t| t.join().expect("thread")).collect::<Vec<u16>>()
        })
    })
    .await
    .expect("join");
    let not_429: Vec<_> = statuses.iter().filter(|s| **s != 429).collect();
    assert!(not_429.is_empty(), "{} of {} refusals were not 429, e.g. {:?}", not_429.len(), statuses.len(), not_429[0]);
}

#[tokio::test]
async fn refusals_before_admission_leave_the_quota_intact() {
    let f = Fixture::new().await;
    for _ in 0..FLOOD {
        assert_eq!(f.status("/v1/detect/x", &[]), 401);
        assert_eq!(f.status("/v1/detect/x", &[("x-api-key", "nope")]), 401);
        assert_eq!(f.acme("/v1/nothing"), 404);
        assert_eq!(f.acme("/v1/detect/%2fx"), 400);
        assert_eq!(f.acme("/v1/ocr/license-plate"), 403, "text_recognition not activated");
        assert_eq!(f.status("/v1/detect/x", &[("x-api-key", "key-acme"), ("content-length", "1001")]), 413);
    }
    f.assert_full_burst("/v1/detect/x");
    f.entitle(false, true);
    f.assert_full_burst("/v1/ocr/license-plate");
}

/// SPEC §4: every answer to an identified tenant and feature carries the rate-limit fields, and
/// a refusal decided before admission takes no token; so its fields show the bucket as it is
/// (2 QPS, depth 2 here), never a full one it does not have, and asking again changes nothing.
#[tokio::test]
async fn refusals_before_admission_show_the_bucket_as_it_is() {
    let f = Fixture::new().await;
    let too_large = [("content-length", "1001")];
    assert_eq!(f.refusal("/v1/detect/x", &too_large), (413, Some((2, 2, 0))), "an untouched bucket is full");
    let _first = f.admitted(1, "/v1/detect/x");
    for _ in 0..FLOOD {
        assert_eq!(f.refusal("/v1/detect/x", &too_large), (413, Some((2, 1, 1))), "one token of two left");
    }
    let _second = f.admitted(1, "/v1/detect/x");
    assert_eq!(f.refusal("/v1/detect/x", &too_large), (413, Some((2, 0, 1))), "empty");
    f.clock.advance(Duration::from_millis(500));
    assert_eq!(f.refusal("/v1/detect/x", &too_large), (413, Some((2, 1, 1))), "one token back after 1/2 s");
    f.clock.advance(Duration::from_millis(500));
    assert_eq!(f.refusal("/v1/detect/x", &too_large), (413, Some((2, 2, 0))), "full after 1 s");
    f.assert_full_burst("/v1/detect/x");
    assert_eq!(f.refusal("/v1/detect/x", &too_large), (413, Some((2, 0, 1))), "after the burst");

    // 403: a service the tenant used, then lost in a reload.
    f.entitle(false, true);
    let _ocr = f.admitted(1, "/v1/ocr/license-plate");
    f.entitle(false, false);
    assert_eq!(f.refusal("/v1/ocr/license-plate", &[]), (403, Some((2, 1, 1))));

    // 402 `instance_expired`: an Image Search instance used, then expired.
    let _add = f.admitted(1, "/v1/image-search/add");
    let expired = token_entitlements(false, false).replace("2027-01-01T00:00:00Z\"}}", "2026-03-01T00:00:00Z\"}}");
    assert_ne!(expired, token_entitlements(false, false));
    f.swap(&expired);
    assert_eq!(f.refusal("/v1/image-search/add", &[]), (402, Some((2, 1, 1))));
    // None of these refusals took a token: the one left is there.
    f.entitle(false, true);
    let got: Vec<u16> = (0..2).map(|_| f.acme("/v1/ocr/license-plate")).collect();
    assert_eq!(got, [200, 429]);
}

// ---------------------------------------------------------------------------------------------
// decide() over arbitrary request heads (property)
// ---------------------------------------------------------------------------------------------

mod heads {
    use super::*;
    use proptest::prelude::*;

    /// Paths as hyper hands them over: whatever `http::Uri` accepts, in any form, seen through
    /// `origin_path` as HTTP/1.1 and as HTTP/2.
    fn target() -> impl Strategy<Value = (String, bool)> {
        let raw = prop_oneof![
            proptest::string::string_regex(r"[!-~]{0,40}").unwrap(),
            proptest::string::string_regex(
                r"/(v1/|detect/|face/|compare|\.\./|\./|//|%2[eEfF]|%5[cC]|%[0-9a-fA-F]{2}|%|\\|é|\?|[a-z])*"
            )
            .unwrap(),
            proptest::string::string_regex(r"(http://x|x:80|\*)/?[!-~]{0,10}").unwrap(),
        ];
        (raw, any::<bool>()).prop_filter_map("hyper would refuse it", |(t, h2)| {
            let uri = http::Uri::try_from(t.as_str()).ok()?;
            let v = if h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 };
            Some((turnstile::path::origin_path(&uri, v).to_string(), h2))
        })
    }

    fn value() -> impl Strategy<Value = Option<HeaderValue>> {
        prop_oneof![
            Just(None),
            Just(Some(HeaderValue::from_static("key-acme"))),
            Just(Some(HeaderValue::from_static("Bearer key-acme"))),
            Just(Some(HeaderValue::from_static("bearer   "))),
            Just(Some(HeaderValue::from_static("Bear"))),
            proptest::string::string_regex(r"[0-9]{0,25}|-[0-9]{1,3}|\+1|0x10| 5 ")
                .unwrap()
                .prop_map(|v| HeaderValue::try_from(v).ok()),
            proptest::collection::vec(any::<u8>(), 0..24).prop_map(|b| HeaderValue::from_bytes(&b).ok()),
        ]
    }

    #[test]
    fn decide_never_panics_on_any_head() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let f = rt.block_on(Fixture::new());
        let _entered = rt.enter();
        let config = ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() };
        proptest!(config, |((path, _h2) in target(), key in value(), auth in value(), len in value())| {
            let mut h = HeaderMap::new();
            for (name, v) in [("x-api-key", key), ("authorization", auth), ("content-length", len)] {
                if let Some(v) = v {
                    h.insert(name, v);
                }
            }
            match decide(&f.gw, &h, &path) {
                Decision::Forward(_) => {
                    // Only a normal origin-form path is ever forwarded.
                    let n = turnstile::path::normalize(&path);
                    prop_assert!(n.is_ok(), "{:?}", path);
                }
                Decision::Reject(e, ..) => prop_assert!(!e.to_string().is_empty()),
            }
        });
    }
}
