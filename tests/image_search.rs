//! Black-box tests of Image Search instances (seed 004, SPEC §3-§5).

mod common;

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;

const KEY: (&str, &str) = ("x-api-key", "key-acme");

const IMAGE_SEARCH: &str = r#"
[image_search]
currency = "USD"
delete_qps = 20
retention_days = 7
packages = [ { capacity = 3, qps = 50, month = "1.00" }, { capacity = 100, qps = 5, month = "2.00" } ]
"#;

fn routes() -> &'static str {
    r#"
[[routes]]
path = "/v1/image-search/add"
feature = "image-search"
op = "add"

[[routes]]
path = "/v1/image-search/delete"
feature = "image-search"
op = "delete"
"#
}

fn ents(capacity: u64, qps: u32, expires_in: i64) -> String {
    format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{}"], "services": ["face_body"],
            "image_search": {{"capacity": {capacity}, "qps": {qps}, "expires_at": "{}"}}}}}}}}"#,
        key_hash("key-acme"),
        at(expires_in)
    )
}

async fn start(capacity: u64, qps: u32, expires_in: i64) -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let payg = r#"["payg"]"#;
    let catalog = small_catalog(payg, payg, payg, IMAGE_SEARCH);
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", routes()), &catalog, &ents(capacity, qps, expires_in));
    let gw = Gateway::start(&cfg);
    (up, cfg, gw)
}

async fn op(c: &TestClient, gw: &Gateway, path: &str) -> Reply {
    post(c, &gw.url(path), &[KEY], b"{}").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn search_and_add_share_the_instance_qps_and_delete_has_its_own() {
    let (_up, _cfg, gw) = start(100, 5, 86400).await;
    let c = client();
    let mut statuses = Vec::new();
    for path in ["/v1/image-search/search", "/v1/image-search/add"].iter().cycle().take(8) {
        statuses.push(op(&c, &gw, path).await.status.as_u16());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5, "{statuses:?}");
    assert!(statuses.contains(&429));
    let r = op(&c, &gw, "/v1/image-search/delete").await;
    assert_eq!(r.status, StatusCode::OK, "deletions have their own bucket");
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=20;w=1"));
    assert_eq!(r.header("x-turnstile-payer"), Some("prepaid_qps"));
    let r = op(&c, &gw, "/v1/image-search/search").await;
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=5;w=1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_enforced_failed_adds_give_their_slot_back_and_the_upstream_count_wins() {
    let (_up, cfg, gw) = start(3, 50, 86400).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    }
    let r = op(&c, &gw, "/v1/image-search/add").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::CONFLICT, "capacity_exceeded"));
    assert_eq!(op(&c, &gw, "/v1/image-search/delete").await.status, StatusCode::OK);
    // A failed add does not keep its slot.
    assert_eq!(op(&c, &gw, "/v1/image-search/add?status=500").await.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::CONFLICT);
    let m = gw.metrics(&c).await;
    assert!(m.contains("turnstile_image_search_images{tenant=\"acme\"} 3"), "{m}");
    assert!(m.contains(r#"turnstile_requests_total{feature="image-search",outcome="admitted",tenant="acme"}"#), "{m}");

    // The count survives a restart.
    let code = gw.stop("TERM").await;
    assert!(code.is_some_and(|s| s.success()));
    let gw = Gateway::start(&cfg);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::CONFLICT, "still full after a restart");
    // The upstream's own count (x-usage-image-count) resyncs it.
    assert_eq!(op(&c, &gw, "/v1/image-search/search?image_count=1").await.status, StatusCode::OK);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::CONFLICT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_adds_never_exceed_capacity() {
    let (_up, _cfg, gw) = start(3, 50, 86400).await;
    let urls = (0..20).map(|_| gw.url("/v1/image-search/add?sleep_ms=300")).collect();
    assert_eq!(racing_adds(&client(), urls).await, 3);
}

/// Posts an add to each of `urls` at once; how many got 200 (any answer but 200 or 409 fails).
async fn racing_adds(c: &TestClient, urls: Vec<String>) -> usize {
    let tasks: Vec<_> = urls
        .into_iter()
        .map(|url| {
            let c = c.clone();
            tokio::spawn(async move { post(&c, &url, &[KEY], b"{}").await.status.as_u16() })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("join") {
            200 => ok += 1,
            409 => {}
            other => panic!("unexpected {other}"),
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_instance_is_402_within_retention_then_410() {
    let (_up, _cfg, gw) = start(100, 5, -3600).await;
    let c = client();
    let r = op(&c, &gw, "/v1/image-search/search").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::PAYMENT_REQUIRED, "instance_expired"));
    drop(gw);
    let (_up, _cfg, gw) = start(100, 5, -8 * 86400).await;
    let r = op(&c, &gw, "/v1/image-search/search").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::GONE, "instance_released"));
    tokio::time::sleep(Duration::from_millis(10)).await;
}

const TOKEN: &str = "image-token";
const AUTH: (&str, &str) = ("authorization", "Bearer image-token");

/// A gateway with the admin API on, `rest` in the main file (e.g. an `[admission]` section).
async fn start_admin(rest: &str, ents: &str) -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let payg = r#"["payg"]"#;
    let catalog = small_catalog(payg, payg, payg, IMAGE_SEARCH);
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", &format!("{rest}\n{}", routes())), &catalog, ents);
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    (up, cfg, gw)
}

/// The instance's image count as the limits view shows it.
async fn images(c: &TestClient, gw: &Gateway) -> u64 {
    let v = get(c, &gw.admin_url("/admin/v1/tenants/acme/limits"), &[AUTH]).await.json();
    v["features"]["image-search"]["images"].as_u64().unwrap_or_else(|| panic!("images: {v}"))
}

async fn reload_with(c: &TestClient, gw: &Gateway, cfg: &ConfigDir, ents: &str) {
    std::fs::write(cfg.path().join("entitlements.json"), ents).expect("write");
    let r = post(c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
}

/// Seed 004: upgrade and downgrade change the package in place ("the original resource package
/// becomes invalid at the same time when the new resource package takes effect"), renewal
/// restores an expired instance within the week it is retained. The images stay through all of
/// it: a downgrade below the count refuses adds (409 saying what to do) but not searches or
/// deletes; a renewal serves the same images again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_downgrade_and_renewal_keep_the_images() {
    let (_up, cfg, gw) = start_admin("", &ents(2, 50, 86400)).await;
    let c = client();
    for _ in 0..2 {
        assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    }
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::CONFLICT);
    reload_with(&c, &gw, &cfg, &ents(3, 50, 86400)).await;
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK, "upgraded: room for one more");
    assert_eq!(images(&c, &gw).await, 3);
    reload_with(&c, &gw, &cfg, &ents(1, 50, 86400)).await;
    let r = op(&c, &gw, "/v1/image-search/add").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::CONFLICT, "capacity_exceeded"));
    let msg = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("delete images") && msg.contains("upgrade"), "says what to do: {msg}");
    assert_eq!(op(&c, &gw, "/v1/image-search/search").await.status, StatusCode::OK, "searches go on");
    assert_eq!(op(&c, &gw, "/v1/image-search/delete").await.status, StatusCode::OK);
    assert_eq!(images(&c, &gw).await, 2);

    // Expired: 402 saying to renew and when the instance goes; renewed: the same images.
    reload_with(&c, &gw, &cfg, &ents(3, 50, -60)).await;
    let r = op(&c, &gw, "/v1/image-search/search").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::PAYMENT_REQUIRED, "instance_expired"));
    let msg = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(msg.contains("renew") && msg.contains("7-day"), "{msg}");
    let r = op(&c, &gw, "/v1/image-search/delete").await;
    assert_eq!(r.status, StatusCode::PAYMENT_REQUIRED, "every operation");
    reload_with(&c, &gw, &cfg, &ents(3, 50, 30 * 86400)).await;
    assert_eq!(images(&c, &gw).await, 2, "renewed: the instance kept its images");
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::CONFLICT);
}

/// SPEC §4: `x-usage-image-count` is "the instance's image count after the call", whatever the
/// call's status: an add the upstream refuses because its instance is full, or a delete of an
/// image it does not have, still tells the gateway how many images there are (README: replaced
/// "whenever a response carries it").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_count_wins_on_any_answer_that_carries_it() {
    let (_up, cfg, gw) = start_admin("", &ents(3, 50, 86400)).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    }
    // A delete of an image the upstream does not have: 404, and it has 1 image left.
    let r = op(&c, &gw, "/v1/image-search/delete?status=404&image_count=1").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(images(&c, &gw).await, 1, "the upstream's count after the call");
    // The same over HTTP/2 (hyper's path, not the HTTP/1.1 fast path).
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(gw.url("/v1/image-search/delete?status=404&image_count=2"))
        .header(KEY.0, KEY.1)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .expect("request");
    let r = tokio::time::timeout(Duration::from_secs(10), h2.request(req)).await.expect("in 10 s").expect("answer");
    assert_eq!((r.version(), r.status()), (http::Version::HTTP_2, StatusCode::NOT_FOUND));
    assert_eq!(images(&c, &gw).await, 2, "the upstream's count, over HTTP/2");
    // A delete of an image that does not exist, answered 2xx with no count: never below 0.
    assert_eq!(op(&c, &gw, "/v1/image-search/delete?image_count=0").await.status, StatusCode::OK);
    assert_eq!(op(&c, &gw, "/v1/image-search/delete").await.status, StatusCode::OK);
    assert_eq!(images(&c, &gw).await, 0);
    // An add the upstream refuses as full (its own count is 3): the slot goes back, the count is 3.
    let r = op(&c, &gw, "/v1/image-search/add?status=409&image_count=3").await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(images(&c, &gw).await, 3);
    let r = op(&c, &gw, "/v1/image-search/add").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::CONFLICT, "capacity_exceeded"));
    // A failed add with no count: the slot goes back, nothing else changes.
    assert_eq!(op(&c, &gw, "/v1/image-search/search?image_count=2").await.status, StatusCode::OK);
    assert_eq!(op(&c, &gw, "/v1/image-search/add?status=503").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(images(&c, &gw).await, 2);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    // The resynchronized count is the one a restart recovers.
    let code = gw.stop("TERM").await;
    assert!(code.is_some_and(|s| s.success()));
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    assert_eq!(images(&c, &gw).await, 3);
    assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::CONFLICT);
}

/// An answer that gives `x-usage-image-count` twice with different values says no count (as two
/// different `Content-Length`s say no length: RFC 9112 §6.3): the gateway keeps its own, on the
/// HTTP/1.1 fast path and over HTTP/2 (hyper's path) alike, whichever value comes first. The
/// same value twice is that count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_image_count_is_not_taken_on_either_path() {
    let (_up, _cfg, gw) = start_admin("", &ents(3, 50, 86400)).await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    }
    for query in ["image_count=1&image_count=2", "image_count=2&image_count=1"] {
        let r = op(&c, &gw, &format!("/v1/image-search/search?{query}")).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(images(&c, &gw).await, 3, "fast path, {query}: the gateway's count stays");
    }
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(gw.url("/v1/image-search/delete?status=404&image_count=0&image_count=1"))
        .header(KEY.0, KEY.1)
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .expect("request");
    let r = tokio::time::timeout(Duration::from_secs(10), h2.request(req)).await.expect("in 10 s").expect("answer");
    assert_eq!((r.version(), r.status()), (http::Version::HTTP_2, StatusCode::NOT_FOUND));
    assert_eq!(images(&c, &gw).await, 3, "over HTTP/2: the gateway's count stays");
    assert_eq!(op(&c, &gw, "/v1/image-search/search?image_count=1&image_count=1").await.status, StatusCode::OK);
    assert_eq!(images(&c, &gw).await, 1, "the same count twice is that count");
}

/// Shadow mode (SPEC §5.5) forwards an Image Search call over the instance's QPS and counts
/// its image as usual; the capacity (409), expiry (402 `instance_expired`) and release (410)
/// are not limits or payers, and are answered as in enforce mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_forwards_image_calls_over_the_qps_and_still_counts_capacity() {
    let shadow = "[admission]\nmode = \"shadow\"\n";
    // capacity 4, 1 QPS: the adds after the first are over the limit.
    let (_up, cfg, gw) = start_admin(shadow, &ents(4, 1, 86400)).await;
    let c = client();
    for i in 0..4 {
        let r = op(&c, &gw, "/v1/image-search/add").await;
        assert_eq!(r.status, StatusCode::OK, "add {i}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-turnstile-payer"), Some("prepaid_qps"), "add {i}");
    }
    assert_eq!(images(&c, &gw).await, 4, "every forwarded add is counted");
    let r = op(&c, &gw, "/v1/image-search/add").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::CONFLICT, "capacity_exceeded"));
    let m = gw.metrics(&c).await;
    let n = |outcome: &str| {
        let s = format!(r#"turnstile_requests_total{{feature="image-search",outcome="{outcome}",tenant="acme"}} "#);
        m.lines().find_map(|l| l.strip_prefix(s.as_str())).map_or(0, |v| v.trim().parse::<u32>().expect("number"))
    };
    assert_eq!((n("admitted") + n("shadow_throttled"), n("forbidden"), n("throttled")), (4, 1, 0), "{m}");
    assert!(n("shadow_throttled") >= 1, "{m}");

    reload_with(&c, &gw, &cfg, &ents(4, 1, -60)).await;
    let r = op(&c, &gw, "/v1/image-search/search").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::PAYMENT_REQUIRED, "instance_expired"));
    reload_with(&c, &gw, &cfg, &ents(4, 1, -8 * 86400)).await;
    let r = op(&c, &gw, "/v1/image-search/search").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::GONE, "instance_released"));
}

/// Cluster mode (SPEC §11) shares the image count: replicas on one Redis hold one count and one
/// capacity, whichever replica an add, a delete or a reported count goes through, also for
/// adds racing on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_redis_share_one_image_count_and_capacity() {
    use common::cluster::{cluster_section, Replicas};
    use common::redis::{Opts, RedisServer};
    let Some(redis) = RedisServer::start("image_search_on_redis", Opts::default()) else { return };
    let up = Upstream::start().await;
    let payg = r#"["payg"]"#;
    let catalog = small_catalog(payg, payg, payg, IMAGE_SEARCH);
    let cluster = cluster_section(&[redis.url()], "");
    let set = Replicas::start(2, &up.url(), &cluster, routes(), &catalog, &ents(3, 50, 86400), &[]);
    let c = client();
    let (n, v) = Replicas::admin_auth();
    let counts = || {
        let (c, urls) =
            (c.clone(), set.gw.iter().map(|g| g.admin_url("/admin/v1/tenants/acme/limits")).collect::<Vec<_>>());
        let auth = [(n, v.clone())];
        async move {
            let mut out = Vec::new();
            for u in urls {
                let r = get(&c, &u, &[(auth[0].0, auth[0].1.as_str())]).await.json();
                out.push(r["features"]["image-search"]["images"].as_u64().unwrap_or_else(|| panic!("{r}")));
            }
            out
        }
    };
    // Batched mode settles on Redis after the answer (SPEC §11.5): the count follows shortly.
    let settled = |want: u64| {
        let counts = &counts;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let got = counts().await;
                if got == [want, want] {
                    return;
                }
                assert!(std::time::Instant::now() < deadline, "{got:?}, not {want} on both");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    for i in 0..3 {
        assert_eq!(op(&c, &set.gw[i % 2], "/v1/image-search/add").await.status, StatusCode::OK, "add {i}");
    }
    for gw in &set.gw {
        let r = op(&c, gw, "/v1/image-search/add").await;
        assert_eq!((r.status, r.error_code().as_str()), (StatusCode::CONFLICT, "capacity_exceeded"));
    }
    settled(3).await;
    assert_eq!(op(&c, &set.gw[0], "/v1/image-search/delete").await.status, StatusCode::OK);
    settled(2).await;
    assert_eq!(op(&c, &set.gw[1], "/v1/image-search/add").await.status, StatusCode::OK);
    settled(3).await;
    // A count the upstream reports on an uncharged answer, through one replica, for both.
    let r = op(&c, &set.gw[1], "/v1/image-search/delete?status=404&image_count=0").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(counts().await, [0, 0], "set before the answer");
    // 20 adds racing over both replicas: exactly the capacity is admitted.
    let urls = (0..20).map(|i| set.gw[i % 2].url("/v1/image-search/add?sleep_ms=200")).collect();
    assert_eq!(racing_adds(&c, urls).await, 3);
    settled(3).await;
    drop(redis);
}

/// An Image Search upstream that keeps the instance's real image count: an add adds one, a
/// delete takes one (never below 0), each after `sleep_ms`; `status=NNN` fails a call and
/// changes nothing. `report=1` answers the count after the call in `x-usage-image-count`, and
/// `then_ms` delays the answer after the change (the answer's way back). Keeps the highest
/// count the instance ever held.
struct Instance {
    addr: std::net::SocketAddr,
    count: Arc<AtomicI64>,
    max: Arc<AtomicI64>,
}

impl Instance {
    async fn start(count: i64) -> Instance {
        use http_body_util::Full;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (count, max) = (Arc::new(AtomicI64::new(count)), Arc::new(AtomicI64::new(count)));
        let (c, m) = (count.clone(), max.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (c, m) = (c.clone(), m.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (c, m) = (c.clone(), m.clone());
                        async move {
                            let q = |k: &str| -> Option<u64> {
                                let query = req.uri().query().unwrap_or("");
                                query.split('&').find_map(|kv| kv.strip_prefix(k)?.strip_prefix('=')?.parse().ok())
                            };
                            tokio::time::sleep(Duration::from_millis(q("sleep_ms").unwrap_or(0))).await;
                            let status = q("status").unwrap_or(200) as u16;
                            let now = if status != 200 {
                                c.load(Ordering::SeqCst)
                            } else if req.uri().path().ends_with("/add") {
                                let n = c.fetch_add(1, Ordering::SeqCst) + 1;
                                m.fetch_max(n, Ordering::SeqCst);
                                n
                            } else if req.uri().path().ends_with("/delete") {
                                c.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| Some((n - 1).max(0)))
                                    .map_or(0, |n| (n - 1).max(0))
                            } else {
                                c.load(Ordering::SeqCst)
                            };
                            tokio::time::sleep(Duration::from_millis(q("then_ms").unwrap_or(0))).await;
                            let mut resp = http::Response::new(Full::new(bytes::Bytes::from_static(b"{}")));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                            if q("report") == Some(1) {
                                resp.headers_mut().insert("x-usage-image-count", now.into());
                            }
                            Ok::<_, std::convert::Infallible>(resp)
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
                });
            }
        });
        Instance { addr, count, max }
    }
}

/// Seed 004 with an upstream that keeps the real count: an instance at capacity takes adds
/// and deletes (some of which fail) all at once. An add is admitted only while the images
/// plus the adds in flight leave room, and a delete frees room only once the upstream answered
/// it 2xx, so the instance never holds more than its capacity, and the gateway's count ends
/// where the upstream's does (also after a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adds_racing_deletes_never_take_the_instance_over_its_capacity() {
    const CAPACITY: u64 = 5;
    let up = Instance::start(0).await;
    let payg = r#"["payg"]"#;
    let catalog = small_catalog(payg, payg, payg, IMAGE_SEARCH);
    let cfg =
        ConfigDir::new(&main_toml(&format!("http://{}", up.addr), "", routes()), &catalog, &ents(CAPACITY, 50, 86400));
    let gw = Gateway::start(&cfg);
    let c = client();
    for _ in 0..CAPACITY {
        assert_eq!(op(&c, &gw, "/v1/image-search/add").await.status, StatusCode::OK);
    }
    let gw = Arc::new(gw);
    let mut tasks = Vec::new();
    for i in 0..30u64 {
        let (c, gw) = (c.clone(), gw.clone());
        // Deletes every third call, one in three of them failing upstream; the rest adds.
        let path = match i % 6 {
            0 => format!("/v1/image-search/delete?sleep_ms={}", 20 + i * 3),
            3 => "/v1/image-search/delete?sleep_ms=30&status=500".to_string(),
            _ => format!("/v1/image-search/add?sleep_ms={}", 10 + (i * 7) % 40),
        };
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(i * 4)).await;
            let status = op(&c, &gw, &path).await.status.as_u16();
            (path, status)
        }));
    }
    let (mut added, mut deleted) = (0i64, 0i64);
    for t in tasks {
        match t.await.expect("join") {
            (p, 200) if p.contains("/add") => added += 1,
            (p, 200) if p.contains("/delete") => deleted += 1,
            (p, 409) if p.contains("/add") => {}
            (p, 500) if p.contains("status=500") => {}
            (p, s) => panic!("{p}: {s}"),
        }
    }
    let max = up.max.load(Ordering::SeqCst);
    assert!(max <= CAPACITY as i64, "the instance held {max} images, capacity {CAPACITY}");
    assert!(added > 0 && deleted > 0, "(added, deleted) = ({added}, {deleted})");
    let real = up.count.load(Ordering::SeqCst);
    assert_eq!(real, CAPACITY as i64 + added - deleted);
    let shown = format!("turnstile_image_search_images{{tenant=\"acme\"}} {real}");
    assert!(gw.metrics(&c).await.contains(&shown), "the gateway counts what the upstream holds: {shown}");
    let gw = Arc::into_inner(gw).expect("the tasks are done");
    assert!(gw.stop("TERM").await.is_some_and(|s| s.success()));
    let gw = Gateway::start(&cfg);
    assert_eq!(op(&c, &gw, "/v1/image-search/search").await.status, StatusCode::OK);
    assert!(gw.metrics(&c).await.contains(&shown), "after a restart: {shown}");
}
