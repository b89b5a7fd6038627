//! Cluster mode black-box tests (SPEC §11): real gateway replicas sharing one real
//! `redis-server` (each test starts its own on a free loopback port and stops it). Without Redis
//! installed they are skipped with a notice, unless `CI=true`.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{cluster_section, metric, Replicas};
use common::redis::{Opts, RedisServer};
use common::*;
use http::StatusCode;

const FACE: &str = "/v1/face/compare";
const OCR: &str = "/v1/ocr/license-plate";
const DETECT: &str = "/v1/detect/objects";

fn catalog() -> String {
    small_catalog(r#"["prepaid_qps"]"#, r#"["payg"]"#, r#"["single_package"]"#, "").replace(
        "[features.license-plate-recognition]\nfamily = \"face_body\"\nbilling = [\"payg\"]",
        &format!("[features.license-plate-recognition]\nfamily = \"face_body\"\nbilling = [\"payg\"]\n{PAYG_TIERS}"),
    )
}

/// License plate's pay-as-you-go tiers: 0.10 for the month's first 50 calls, 0.05 after.
const PAYG_TIERS: &str = r#"payg_tiers = [{ up_to = 50, price = "0.10" }, { price = "0.05" }]"#;

/// What [`PAYG_TIERS`] charge for a month of `calls` license-plate calls.
fn payg_price(calls: u64) -> rust_decimal::Decimal {
    use rust_decimal::Decimal;
    Decimal::from(calls.min(50)) * Decimal::new(10, 2) + Decimal::from(calls.saturating_sub(50)) * Decimal::new(5, 2)
}

/// `acme`: a face comparison plan at `plan_qps`, an object-detection package of `points`.
fn ents(plan_qps: u32, points: u32) -> String {
    format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{key}"], "services": ["face_body"],
    "qps_plans": [{{"feature": "face-comparison-1-1", "qps": {plan_qps}, "effective_at": "{from}", "expires_at": "{until}"}}],
    "packages": [{{"id": "od-1", "feature": "object-detection", "points": "{points}", "ordered_at": "{from}", "expires_at": "{until}"}}]}}}}}}"#,
        key = key_hash("key-acme"),
        from = at(-3600),
        until = at(86400),
    )
}

const HIGH_DEFAULT: &str = "[admission]\ndefault_qps = 1000\n";

/// `n` replicas on one Redis (kept on disk at every write, so a restart keeps it) with
/// `on_store_error = "local"` and `expected_replicas`, `rest` in their turnstile.toml, and acme's
/// od-1 of `points`; with the Redis server and the upstream to keep. `None`: no redis-server.
async fn on_fallback_policy(
    test: &str,
    n: usize,
    expected_replicas: u32,
    rest: &str,
    points: u32,
) -> Option<(RedisServer, Upstream, Replicas)> {
    let redis = RedisServer::start(test, Opts { aof_always: true, cluster: false })?;
    let up = Upstream::start().await;
    let policy = format!("on_store_error = \"local\"\nexpected_replicas = {expected_replicas}");
    let set = Replicas::start(
        n,
        &up.url(),
        &cluster_section(&[redis.url()], &policy),
        rest,
        &catalog(),
        &ents(40, points),
        &[],
    );
    Some((redis, up, set))
}

fn key() -> [(&'static str, &'static str); 1] {
    [("x-api-key", "key-acme")]
}

async fn admin_get(c: &TestClient, gw: &Gateway, path: &str) -> Reply {
    let (n, v) = Replicas::admin_auth();
    get(c, &gw.admin_url(path), &[(n, &v)]).await
}

/// acme's face-comparison limit in `gw`'s admin limits view.
async fn face_limit(c: &TestClient, gw: &Gateway) -> u64 {
    let r = admin_get(c, gw, "/admin/v1/tenants/acme/limits").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    r.json()["features"]["face-comparison-1-1"]["limit"].as_u64().expect("limit")
}

/// Floods `url`s round-robin with `conns` concurrent clients for `secs`; returns the 2xx count,
/// the 429 count and the elapsed time.
async fn flood(urls: Vec<String>, conns: usize, secs: f64) -> (u64, u64, f64) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let url = urls[i % urls.len()].clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let (mut ok, mut throttled) = (0u64, 0u64);
            while Instant::now() < deadline {
                let r = post(&c, &url, &key(), b"{}").await;
                match r.status {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => throttled += 1,
                    s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
                }
            }
            (ok, throttled)
        }));
    }
    let (mut ok, mut throttled) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.expect("join");
        ok += a;
        throttled += b;
    }
    (ok, throttled, start.elapsed().as_secs_f64())
}

/// SPEC §11.1: two replicas flooding one 40 QPS plan admit, together, what one bucket admits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_limit() {
    let Some(redis) = RedisServer::start("two_replicas_share_one_limit", Opts::default()) else { return };
    let up = Upstream::start().await;
    let set = Replicas::start(2, &up.url(), &cluster_section(&[redis.url()], ""), "", &catalog(), &ents(40, 1), &[]);
    let urls: Vec<String> = set.gw.iter().map(|g| g.url(FACE)).collect();
    let (ok, throttled, t) = flood(urls, 16, 3.0).await;
    let (limit, depth) = (40.0, 40.0);
    let (low, high) = (limit * t * 0.97, (limit * t + depth) * 1.03);
    assert!(throttled > 0, "the flood must exceed the limit");
    assert!(
        (ok as f64) >= low && (ok as f64) <= high,
        "admitted {ok} in {t:.2} s across 2 replicas; one shared bucket admits within [{low:.0}, {high:.0}]"
    );
}

/// SPEC §4 and §11.1: a refusal decided before admission (413, a declared body over the limit)
/// takes no token, and its rate-limit fields show the one shared bucket as it is, on every
/// replica: not a full bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refusal_before_admission_shows_the_shared_bucket_on_every_replica() {
    use tokio::io::AsyncWriteExt;
    let Some(redis) = RedisServer::start("refusal_shows_the_shared_bucket", Opts::default()) else { return };
    let up = Upstream::start().await;
    // A 1 QPS plan with a depth of 5: a token comes back each second.
    let rest = "[admission]\nburst_seconds = 5.0\n";
    let set = Replicas::start(2, &up.url(), &cluster_section(&[redis.url()], ""), rest, &catalog(), &ents(1, 1), &[]);
    let c = client();
    for _ in 0..3 {
        assert_eq!(post(&c, &set.gw[0].url(FACE), &key(), b"{}").await.status, StatusCode::OK);
    }
    let remaining = |r: &common::wire::RawReply| -> u32 {
        let v = r.header("ratelimit").unwrap_or_else(|| panic!("a RateLimit field: {}", r.head));
        v.split(';').find_map(|p| p.strip_prefix("r=")).and_then(|n| n.parse().ok()).expect("r=<remaining>")
    };
    for (i, gw) in set.gw.iter().enumerate() {
        let mut w = common::wire::Wire::connect(gw.addr).await;
        let head =
            "POST /v1/face/compare HTTP/1.1\r\nHost: h\r\nx-api-key: key-acme\r\nContent-Length: 99999999999\r\n\r\n";
        w.s.write_all(head.as_bytes()).await.expect("write");
        let r = w.reply(Duration::from_secs(5)).await.expect("reply");
        assert_eq!((r.status, r.error_code().as_str()), (413, "body_too_large"), "replica {i}: {}", r.head);
        assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=1;w=1"), "replica {i}");
        assert!((2..=3).contains(&remaining(&r)), "replica {i}: 2 of 5 left (3 a second later): {}", r.head);
    }
    // The refusals took nothing: the two tokens left (or three) are admitted, and no more.
    let mut admitted = 0;
    for gw in set.gw.iter().cycle().take(6) {
        if post(&c, &gw.url(FACE), &key(), b"{}").await.status == StatusCode::OK {
            admitted += 1;
        }
    }
    assert!((2..=4).contains(&admitted), "admitted {admitted}");
}

/// SPEC §11.2–3: a package drained through two replicas pays exactly the calls it holds, and
/// both replicas' usage reports show the same figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_package_drained_by_two_replicas_pays_exactly_its_points() {
    let Some(redis) = RedisServer::start("a_package_drained_by_two_replicas", Opts::default()) else { return };
    let up = Upstream::start().await;
    let set = Replicas::start(
        2,
        &up.url(),
        &cluster_section(&[redis.url()], ""),
        HIGH_DEFAULT,
        &catalog(),
        &ents(40, 30),
        &[],
    );
    let mut tasks = Vec::new();
    for i in 0..12 {
        let url = set.gw[i % 2].url(DETECT);
        tasks.push(tokio::spawn(async move {
            let c = client();
            let (mut paid, mut refused) = (0u32, 0u32);
            for _ in 0..5 {
                let r = post(&c, &url, &key(), b"{}").await;
                match r.status {
                    StatusCode::OK => {
                        assert_eq!(r.header("x-turnstile-payer"), Some("single_package:od-1"));
                        paid += 1
                    }
                    StatusCode::PAYMENT_REQUIRED => refused += 1,
                    s => panic!("unexpected {s}: {}", String::from_utf8_lossy(&r.body)),
                }
            }
            (paid, refused)
        }));
    }
    let (mut paid, mut refused) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.expect("join");
        paid += a;
        refused += b;
    }
    assert_eq!((paid, refused), (30, 30), "30 points at 1 per call pay exactly 30 of 60 calls");
    let c = client();
    let reports: Vec<serde_json::Value> = {
        let mut v = Vec::new();
        for g in &set.gw {
            let r = admin_get(&c, g, "/admin/v1/tenants/acme/usage").await;
            assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
            v.push(r.json());
        }
        v
    };
    assert_eq!(reports[0], reports[1], "every replica answers the same usage report");
    assert_eq!(reports[0]["packages"][0]["remaining"], "0");
    assert_eq!(reports[0]["features"]["object-detection"]["units"]["single_package"], "30");
}

/// SPEC §11.4: an upgrade posted to replica A is in replica B's limits view within 1 s, and
/// B's bucket follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_posted_to_one_replica_is_applied_by_the_other_within_a_second() {
    let Some(redis) = RedisServer::start("an_upgrade_posted_to_one_replica", Opts::default()) else { return };
    let up = Upstream::start().await;
    let set = Replicas::start(2, &up.url(), &cluster_section(&[redis.url()], ""), "", &catalog(), &ents(20, 1), &[]);
    let c = client();
    let limit_on = |i: usize| face_limit(&c, &set.gw[i]);
    assert_eq!(limit_on(1).await, 20);
    let (n, v) = Replicas::admin_auth();
    let body = format!(r#"{{"qps": 35, "until": "{}"}}"#, at(3600));
    let r = post(
        &c,
        &set.gw[0].admin_url("/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/temporary-upgrade"),
        &[(n, &v)],
        body.as_bytes(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let posted = Instant::now();
    assert_eq!(limit_on(0).await, 35, "the replica that took the upgrade applies it at once");
    while limit_on(1).await != 35 {
        assert!(posted.elapsed() < Duration::from_secs(1), "replica B did not apply the upgrade within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = post(&c, &set.gw[1].url(FACE), &key(), b"{}").await;
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=35;w=1"), "B's bucket follows the upgrade");
    // A reload of B's files (which do not have the upgrade) keeps it.
    let r = post(&c, &set.gw[1].admin_url("/admin/v1/reload"), &[(n, &v)], b"").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(limit_on(1).await, 35, "a reload keeps the shared upgrade");
    // A permanent upgrade too, and a replica started afterwards applies both at start.
    let r = post(
        &c,
        &set.gw[1].admin_url("/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/upgrade"),
        &[(n, &v)],
        br#"{"qps": 25}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let late = Replicas::start(1, &up.url(), &cluster_section(&[redis.url()], ""), "", &catalog(), &ents(20, 1), &[]);
    let r = admin_get(&c, &late.gw[0], "/admin/v1/tenants/acme/limits").await;
    let f = &r.json()["features"]["face-comparison-1-1"];
    assert_eq!(f["limit"], 35, "the temporary upgrade still wins: {f}");
    assert_eq!(f["plan"]["qps"], 25, "the permanent upgrade is applied at start: {f}");
}

/// SPEC §8 / §11.4: an upgrade posted while Redis is down cannot be shared, so it is refused
/// whole — 503 `store_unavailable`, `entitlements.json` byte for byte as it was, the limit
/// unchanged on the replica that took the call as on the other — instead of being applied on
/// that replica alone (and kept in its file) behind an error the operator then retries, which
/// wrote a second temporary upgrade. The retry once Redis is back applies it once, everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_redis_cannot_store_changes_nothing_and_its_retry_applies_once() {
    let Some(mut redis) =
        RedisServer::start("an_upgrade_redis_cannot_store", Opts { aof_always: true, cluster: false })
    else {
        return;
    };
    let up = Upstream::start().await;
    let set = Replicas::start(2, &up.url(), &cluster_section(&[redis.url()], ""), "", &catalog(), &ents(20, 1), &[]);
    let c = client();
    let limit_on = |i: usize| face_limit(&c, &set.gw[i]);
    let file = set.cfg[0].path().join("entitlements.json");
    let before = std::fs::read(&file).expect("read entitlements.json");
    let (n, v) = Replicas::admin_auth();
    let temporary =
        |gw: &Gateway| gw.admin_url("/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/temporary-upgrade");
    let permanent = |gw: &Gateway| gw.admin_url("/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/upgrade");
    let body = format!(r#"{{"qps": 35, "until": "{}"}}"#, at(3600));
    redis.kill9();
    for (url, body) in [(temporary(&set.gw[0]), body.as_bytes()), (permanent(&set.gw[0]), br#"{"qps": 25}"#.as_slice())]
    {
        let r = post(&c, &url, &[(n, &v)], body).await;
        assert_eq!(
            (r.status, r.error_code().as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
            "{url}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(
            String::from_utf8_lossy(&std::fs::read(&file).expect("read")),
            String::from_utf8_lossy(&before),
            "{url}: entitlements.json is left as it was"
        );
    }
    assert_eq!((limit_on(0).await, limit_on(1).await), (20, 20), "applied nowhere");
    // The watcher sees the file it already serves: still nothing applied.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(limit_on(0).await, 20, "the file was never the upgraded one");
    redis.restart();
    let r = post(&c, &temporary(&set.gw[0]), &[(n, &v)], body.as_bytes()).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let posted = Instant::now();
    assert_eq!(limit_on(0).await, 35, "the retry applies at once");
    while limit_on(1).await != 35 {
        assert!(posted.elapsed() < Duration::from_secs(1), "replica B did not apply the retry within 1 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = std::fs::read_to_string(&file).expect("read");
    assert_eq!(after.matches("\"until\"").count(), 1, "one temporary upgrade in the file: {after}");
}

/// SPEC §11.6 `deny`: Redis stopped → 503 `store_unavailable` within the store timeout, nothing
/// charged; Redis back → served again without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deny_answers_503_within_the_store_timeout_while_redis_is_down() {
    let Some(mut redis) = RedisServer::start("deny_answers_503", Opts { aof_always: true, cluster: false }) else {
        return;
    };
    let up = Upstream::start().await;
    let cluster = cluster_section(&[redis.url()], "on_store_error = \"deny\"");
    let set = Replicas::start(1, &up.url(), &cluster, HIGH_DEFAULT, &catalog(), &ents(40, 1), &[]);
    let c = client();
    let gw = &set.gw[0];
    assert_eq!(post(&c, &gw.url(OCR), &key(), b"{}").await.status, StatusCode::OK);
    // Batched mode settles after the answer: let it reach Redis before it dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill9();
    for _ in 0..3 {
        let sent = Instant::now();
        let r = post(&c, &gw.url(OCR), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.error_code(), "store_unavailable");
        assert!(sent.elapsed() < Duration::from_millis(1500), "answered in {:?}", sent.elapsed());
    }
    let m = gw.metrics(&c).await;
    assert!(m.contains("turnstile_store_errors_total{op=\"admit\"}"), "store errors are counted");
    redis.restart();
    let back = Instant::now();
    loop {
        let r = post(&c, &gw.url(OCR), &key(), b"{}").await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(5), "not serving again 5 s after Redis came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = admin_get(&c, gw, "/admin/v1/tenants/acme/usage").await;
    assert_eq!(r.json()["features"]["license-plate-recognition"]["units"]["payg"], "2", "the 503s charged nothing");
}

/// SPEC §11.6 `local`: Redis stopped → served on the local fallback (limit / expected_replicas,
/// `turnstile_store_fallback` 1); Redis back → the fallback's charges replayed exactly once and
/// the gauge back to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn local_fallback_serves_and_replays_its_charges_exactly_once() {
    let Some((mut redis, _up, set)) = on_fallback_policy("local_fallback_replays", 1, 2, HIGH_DEFAULT, 10).await else {
        return;
    };
    let c = client();
    let gw = &set.gw[0];
    for _ in 0..3 {
        assert_eq!(post(&c, &gw.url(OCR), &key(), b"{}").await.status, StatusCode::OK);
    }
    assert_eq!(post(&c, &gw.url(DETECT), &key(), b"{}").await.status, StatusCode::OK);
    assert_eq!(metric(&gw.metrics(&c).await, "turnstile_store_fallback"), Some(0.0));
    // Batched mode settles after the answer: let it reach Redis before it dies.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill9();
    for _ in 0..4 {
        let r = post(&c, &gw.url(OCR), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "served on the fallback: {}", String::from_utf8_lossy(&r.body));
    }
    for _ in 0..2 {
        let r = post(&c, &gw.url(DETECT), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "the package pays on the fallback: {}", String::from_utf8_lossy(&r.body));
    }
    // The plan's 40 QPS is 20 per replica on the fallback.
    let r = post(&c, &gw.url(FACE), &key(), b"{}").await;
    assert_eq!(r.header("ratelimit-policy"), Some("\"qps\";q=20;w=1"), "limit / expected_replicas");
    assert_eq!(metric(&gw.metrics(&c).await, "turnstile_store_fallback"), Some(1.0));
    redis.restart();
    fallback_becomes(&c, gw, 0.0).await;
    let check = |v: serde_json::Value| {
        assert_eq!(v["features"]["license-plate-recognition"]["units"]["payg"], "7", "3 + 4 payg calls: {v}");
        assert_eq!(v["features"]["object-detection"]["units"]["single_package"], "3", "1 + 2 package calls: {v}");
        assert_eq!(v["packages"][0]["remaining"], "7", "10 points less 3: {v}");
    };
    check(admin_get(&c, gw, "/admin/v1/tenants/acme/usage").await.json());
    // Exactly once: later probes replay nothing again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    check(admin_get(&c, gw, "/admin/v1/tenants/acme/usage").await.json());
}

/// SPEC §11.5 strict: the 2xx goes out only after Redis acknowledged the charge, so the other
/// replica's usage report shows every answered call at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn strict_mode_answers_only_after_redis_has_the_charge() {
    let Some(redis) = RedisServer::start("strict_mode_answers_only_after", Opts { aof_always: true, cluster: false })
    else {
        return;
    };
    let up = Upstream::start().await;
    let rest = format!("{HIGH_DEFAULT}\n[ledger]\ndurability = \"strict\"\n");
    let set = Replicas::start(2, &up.url(), &cluster_section(&[redis.url()], ""), &rest, &catalog(), &ents(40, 5), &[]);
    let c = client();
    for i in 1..=8u32 {
        let (path, field) = if i % 2 == 0 { (DETECT, "object-detection") } else { (OCR, "license-plate-recognition") };
        let r = post(&c, &set.gw[0].url(path), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
        let v = admin_get(&c, &set.gw[1], "/admin/v1/tenants/acme/usage").await.json();
        let payer = if i % 2 == 0 { "single_package" } else { "payg" };
        let want = i.div_ceil(2).to_string();
        let want = if i % 2 == 0 { (i / 2).to_string() } else { want };
        assert_eq!(v["features"][field]["units"][payer], want.as_str(), "call {i} not yet in Redis when answered: {v}");
    }
    let v = admin_get(&c, &set.gw[1], "/admin/v1/tenants/acme/usage").await.json();
    assert_eq!(v["packages"][0]["remaining"], "1", "5 points less 4 calls: {v}");
    // One store round trip before forwarding (admission + package hold) and one after
    // (settlement) per call, on the replica that served them.
    let m = set.gw[0].metrics(&c).await;
    for op in ["admit", "settle"] {
        let series = format!("turnstile_store_duration_seconds_count{{op=\"{op}\"}}");
        assert_eq!(metric(&m, &series), Some(8.0), "{op} round trips for 8 calls:\n{m}");
    }
}

/// A replica that cannot reach Redis at start does not start (it has no shared state to serve
/// from): exit status 1 and a message naming `cluster.redis`, within the store timeout.
#[test]
fn a_replica_without_redis_at_start_exits_1() {
    let dead = format!("redis://{}", dead_addr());
    let main = main_toml("http://127.0.0.1:1", "", &cluster_section(&[dead], ""));
    let cfg = ConfigDir::new(&main, &catalog(), &ents(40, 1));
    let started = Instant::now();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--config", cfg.main().to_str().expect("utf-8 path")])
        .output()
        .expect("run turnstile");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cluster.redis") && err.contains("not starting"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
}

/// Waits (≤ 5 s) for the replica's `turnstile_store_fallback` to read `v` (0: back on Redis).
async fn fallback_becomes(c: &TestClient, gw: &Gateway, v: f64) {
    metric_becomes(c, gw, "turnstile_store_fallback", v).await;
}

/// Waits (≤ 5 s) for the replica's metric `name` to read `v`.
async fn metric_becomes(c: &TestClient, gw: &Gateway, name: &str, v: f64) {
    let since = Instant::now();
    while metric(&gw.metrics(c).await, name) != Some(v) {
        assert!(since.elapsed() < Duration::from_secs(5), "{name} not {v} within 5 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The fallback's journal in the metrics (an extension of SPEC §10):
/// `turnstile_store_journal_entries` counts the charges waiting for Redis, also right after a
/// start that finds them on disk (a replica killed on the fallback). An entry that fails at
/// every replay while Redis answers (here an ACL refuses `HINCRBY`, which its script runs) used
/// to hold the replica on the fallback with a warning at every probe naming nothing: it is
/// named in one error log (its sequence number, tenant, kind and request id) and
/// `turnstile_store_journal_blocked` reads 1, until it passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_journal_shows_in_the_metrics_and_an_entry_that_blocks_it_is_named_once() {
    let Some((mut redis, _up, mut set)) = on_fallback_policy("journal_metrics", 1, 1, HIGH_DEFAULT, 10).await else {
        return;
    };
    let c = client();
    let journal = |m: &str| {
        [
            "turnstile_store_journal_entries",
            "turnstile_store_journal_blocked",
            "turnstile_store_journal_set_aside_total",
        ]
        .map(|name| metric(m, name))
    };
    assert_eq!(journal(&set.gw[0].metrics(&c).await), [Some(0.0); 3], "registered in cluster mode");
    redis.kill9();
    for _ in 0..3 {
        let r = post(&c, &set.gw[0].url(OCR), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "served on the fallback: {}", String::from_utf8_lossy(&r.body));
    }
    // Batched: journaled when settled, after the answers.
    metric_becomes(&c, &set.gw[0], "turnstile_store_journal_entries", 3.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    set.gw[0].signal_and_wait("KILL").expect("killed");
    redis.restart();
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "-hincrby"]), "OK");
    let gw = restart_replica(&set, 0);
    let m = gw.metrics(&c).await;
    assert_eq!(metric(&m, "turnstile_store_journal_entries"), Some(3.0), "found on disk at the start:\n{m}");
    metric_becomes(&c, &gw, "turnstile_store_journal_blocked", 1.0).await;
    // More probes fail meanwhile: still one line.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let logs = gw.logs();
    let named: Vec<&str> = logs.lines().filter(|l| l.contains("journal blocked")).collect();
    assert_eq!(named.len(), 1, "{logs}");
    for field in ["seq=1 ", "tenant=\"acme\"", "kind=\"settle\"", "request_id=\"", "can't run this command"] {
        assert!(named[0].contains(field), "{field} in {}", named[0]);
    }
    let m = gw.metrics(&c).await;
    assert_eq!(journal(&m), [Some(3.0), Some(1.0), Some(0.0)], "nothing set aside:\n{m}");
    assert_eq!(metric(&m, "turnstile_store_fallback"), Some(1.0));
    assert_eq!(redis.cli(&["ACL", "SETUSER", "default", "+hincrby"]), "OK");
    fallback_becomes(&c, &gw, 0.0).await;
    assert_eq!(journal(&gw.metrics(&c).await), [Some(0.0); 3]);
    let v = admin_get(&c, &gw, "/admin/v1/tenants/acme/usage").await.json();
    assert_eq!(v["features"]["license-plate-recognition"]["units"]["payg"], "3", "{v}");
}

/// SPEC §7 ("SIGTERM reports (log, exit status 1) charges it could not flush") for the `local`
/// fallback of §11.6: a replica stopped while Redis is still down says how many charges Redis
/// has not got yet, and exits 1; one stopped after the replay exits 0. The first one's charges
/// are in its journal file: started again with the same ledger folder, it replays them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_on_the_fallback_reports_the_charges_redis_never_got() {
    let Some((mut redis, _up, mut set)) = on_fallback_policy("fallback_stop", 2, 1, HIGH_DEFAULT, 10).await else {
        return;
    };
    let c = client();
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill9();
    for gw in &set.gw {
        for _ in 0..4 {
            let r = post(&c, &gw.url(OCR), &key(), b"{}").await;
            assert_eq!(r.status, StatusCode::OK, "served on the fallback: {}", String::from_utf8_lossy(&r.body));
        }
    }
    // Stopped while Redis is down: 4 charges not replayed.
    let status = set.gw[0].signal_and_wait("TERM").expect("exits");
    assert_eq!(status.code(), Some(1), "{}", set.gw[0].logs());
    let logs = set.gw[0].logs();
    assert!(logs.contains("entries=4") && logs.contains("not replayed to Redis"), "{logs}");
    assert!(!logs.contains("panicked"), "{logs}");
    // Stopped after Redis came back: replayed, nothing lost, exit 0.
    redis.restart();
    fallback_becomes(&c, &set.gw[1], 0.0).await;
    let status = set.gw[1].signal_and_wait("TERM").expect("exits");
    assert_eq!(status.code(), Some(0), "{}", set.gw[1].logs());
    assert!(!set.gw[1].logs().contains("panicked"), "{}", set.gw[1].logs());
    // The first replica again, on its own ledger folder: its 4 reach Redis, once.
    let gw = restart_replica(&set, 0);
    fallback_becomes(&c, &gw, 0.0).await;
    let payg = |v: serde_json::Value| v["features"]["license-plate-recognition"]["units"]["payg"].clone();
    assert_eq!(payg(admin_get(&c, &gw, "/admin/v1/tenants/acme/usage").await.json()), "8", "4 + 4 payg calls");
    let status = gw.stop("TERM").await.expect("exits");
    assert_eq!(status.code(), Some(0), "nothing left to replay");
}

/// Starts replica `i` of `set` again on its config and ledger folder.
fn restart_replica(set: &Replicas, i: usize) -> Gateway {
    Gateway::start_env(&set.cfg[i], &[("TURNSTILE_ADMIN_TOKEN", common::cluster::ADMIN_TOKEN)])
}

/// SPEC §11.6 "replays those charges to Redis exactly once when it is back", for a replica
/// killed (-9) on the fallback: its journal is on disk, so started again once Redis is back it
/// replays every call it answered 2xx, and only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn charges_of_a_replica_killed_on_the_fallback_reach_redis_when_it_starts_again() {
    killed_on_the_fallback("fallback_kill9", "batched").await;
}

/// [`charges_of_a_replica_killed_on_the_fallback_reach_redis_when_it_starts_again`] with a
/// strict ledger, killed right after the last 2xx: each 2xx went out with its entry on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_strict_replica_killed_right_after_its_answers_on_the_fallback_replays_them_all() {
    killed_on_the_fallback("fallback_kill9_strict", "strict").await;
}

async fn killed_on_the_fallback(name: &str, durability: &str) {
    let rest = format!("{HIGH_DEFAULT}\n[ledger]\ndurability = \"{durability}\"\n");
    let Some((mut redis, _up, mut set)) = on_fallback_policy(name, 1, 1, &rest, 10).await else {
        return;
    };
    let c = client();
    redis.kill9();
    for path in [OCR, OCR, OCR, DETECT, DETECT] {
        let r = post(&c, &set.gw[0].url(path), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "served on the fallback: {}", String::from_utf8_lossy(&r.body));
    }
    if durability == "batched" {
        // Settled after the answers, on disk within flush_interval_ms.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    set.gw[0].signal_and_wait("KILL").expect("killed");
    redis.restart();
    let gw = restart_replica(&set, 0);
    fallback_becomes(&c, &gw, 0.0).await;
    let check = |v: serde_json::Value| {
        assert_eq!(v["features"]["license-plate-recognition"]["units"]["payg"], "3", "{v}");
        assert_eq!(v["features"]["object-detection"]["units"]["single_package"], "2", "{v}");
        assert_eq!(v["packages"][0]["remaining"], "8", "10 points less 2: {v}");
    };
    check(admin_get(&c, &gw, "/admin/v1/tenants/acme/usage").await.json());
    // Once: a later start finds nothing left to replay.
    gw.stop("TERM").await.expect("exits");
    let gw = restart_replica(&set, 0);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(metric(&gw.metrics(&c).await, "turnstile_store_fallback"), Some(0.0));
    assert!(!gw.logs().contains("before the last stop"), "the journal was emptied: {}", gw.logs());
    check(admin_get(&c, &gw, "/admin/v1/tenants/acme/usage").await.json());
}

/// SPEC §6 / §11.3: a package's low-balance alert fires exactly once in the whole cluster. An
/// alert fired on the `local` fallback must not fire again once Redis is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alert_fired_on_the_fallback_does_not_fire_again_on_redis() {
    alert_fired_on_the_fallback_fires_once("alert_fallback", "batched").await;
}

/// [`an_alert_fired_on_the_fallback_does_not_fire_again_on_redis`] with a strict ledger: the
/// fallback marks and fires the alert when the crossing charge is durable, and journals it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_strict_alert_fired_on_the_fallback_does_not_fire_again_on_redis() {
    alert_fired_on_the_fallback_fires_once("alert_fallback_strict", "strict").await;
}

async fn alert_fired_on_the_fallback_fires_once(name: &str, durability: &str) {
    let rest = format!("{HIGH_DEFAULT}\n[ledger]\ndurability = \"{durability}\"\n");
    // od-1: 10 points, 1 a call; default ratio 0.2: the alert fires at the 8th call.
    let Some((mut redis, _up, set)) = on_fallback_policy(name, 1, 1, &rest, 10).await else {
        return;
    };
    let c = client();
    let gw = &set.gw[0];
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill9();
    for _ in 0..8 {
        let r = post(&c, &gw.url(DETECT), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    }
    let alerts = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("turnstile_package_low_balance_alerts_total{") && l.contains("od-1"))
            .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
            .sum::<f64>()
    };
    assert_eq!(alerts(&gw.metrics(&c).await), 1.0, "fired on the fallback at remaining 2");
    redis.restart();
    fallback_becomes(&c, gw, 0.0).await;
    let u = admin_get(&c, gw, "/admin/v1/tenants/acme/usage").await.json();
    eprintln!("after the replay: {}", u["packages"]);
    let r = post(&c, &gw.url(DETECT), &key(), b"{}").await;
    assert_eq!(r.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let u = admin_get(&c, gw, "/admin/v1/tenants/acme/usage").await.json();
    assert_eq!(u["packages"][0]["remaining"], "1", "{u}");
    assert_eq!(u["packages"][0]["low_balance_alerted"], true, "the alert fired: {u}");
    assert_eq!(alerts(&gw.metrics(&c).await), 1.0, "the alert fired a second time once Redis was back");
}

/// The sum of `turnstile_package_low_balance_alerts_total` for `package` in a `/metrics` text.
fn alerts_of(m: &str, package: &str) -> f64 {
    m.lines()
        .filter(|l| l.starts_with("turnstile_package_low_balance_alerts_total{") && l.contains(package))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum::<f64>()
}

/// SPEC §6 / §11.3: a crossing only Redis can see. Replica B spends 6 of od-1's 10 points on
/// Redis (A does not learn it); Redis goes down and A spends 2 more on its fallback, where its
/// own view (10 − 2 = 8 left) is not low. Replayed, those 2 points leave 2 of 10 in Redis (20%):
/// the replay marks the alert there, and it must fire — log, metric, webhook — exactly once in
/// the cluster, not be marked and lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_alert_that_crosses_only_when_the_fallback_charges_are_replayed_fires_once() {
    // od-1: 10 points, 1 a call; default ratio 0.2: low at 2 left.
    let Some((mut redis, _up, set)) = on_fallback_policy("alert_crossed_in_replay", 2, 1, HIGH_DEFAULT, 10).await
    else {
        return;
    };
    let c = client();
    let (a, b) = (&set.gw[0], &set.gw[1]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..6 {
        let r = post(&c, &b.url(DETECT), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill9();
    for _ in 0..2 {
        let r = post(&c, &a.url(DETECT), &key(), b"{}").await;
        assert_eq!(
            (r.status, r.header("x-turnstile-payer")),
            (StatusCode::OK, Some("single_package:od-1")),
            "served on A's fallback: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    fallback_becomes(&c, a, 1.0).await;
    let both = |c: &TestClient| {
        let c = c.clone();
        async move { alerts_of(&a.metrics(&c).await, "od-1") + alerts_of(&b.metrics(&c).await, "od-1") }
    };
    assert_eq!(both(&c).await, 0.0, "8 of 10 left in A's view: not low there");
    redis.restart();
    fallback_becomes(&c, a, 0.0).await;
    let v = admin_get(&c, b, "/admin/v1/tenants/acme/usage").await.json();
    assert_eq!(v["packages"][0]["remaining"], "2", "both replicas' charges in Redis: {v}");
    assert_eq!(v["packages"][0]["low_balance_alerted"], true, "the replay marked the alert: {v}");
    let since = Instant::now();
    while both(&c).await < 1.0 && since.elapsed() < Duration::from_secs(2) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(both(&c).await, 1.0, "the alert the replay marked fired once in the cluster");
    assert!(a.logs().contains("package balance low"), "{}", a.logs());
    // The next charge, on either replica, does not fire it again.
    for gw in [a, b] {
        let r = post(&c, &gw.url(DETECT), &key(), b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(both(&c).await, 1.0, "fired once, whatever follows");
}

/// A second fallback spell offers a package what it still holds. The local ledger keeps
/// counting what the first spell charged (replayed into Redis's count since, which the replica
/// then learns): that part was subtracted twice, and a package with 1 point left answered 402.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_fallback_spell_does_not_count_the_first_spells_charges_twice() {
    // od-1: 4 points, 1 point a call, single-category only (no payg: 402 once it is spent).
    let Some((mut redis, _up, set)) = on_fallback_policy("second_fallback_spell", 1, 1, HIGH_DEFAULT, 4).await else {
        return;
    };
    let c = client();
    let gw = &set.gw[0];
    let detect = |want: &'static str| {
        let (c, url) = (c.clone(), gw.url(DETECT));
        async move {
            let r = post(&c, &url, &key(), b"{}").await;
            assert_eq!(
                (r.status, r.header("x-turnstile-payer")),
                (StatusCode::OK, Some("single_package:od-1")),
                "{want}: {}",
                String::from_utf8_lossy(&r.body)
            );
        }
    };
    detect("1st point, on Redis").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill9();
    detect("2nd point, first fallback spell").await;
    fallback_becomes(&c, gw, 1.0).await;
    redis.restart();
    fallback_becomes(&c, gw, 0.0).await;
    detect("3rd point, on Redis again").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v = admin_get(&c, gw, "/admin/v1/tenants/acme/usage").await.json();
    assert_eq!(v["packages"][0]["remaining"], "1", "one point left: {v}");
    redis.kill9();
    detect("4th point, second fallback spell: the package still holds it").await;
}

/// `n` payg calls on `gw` whose upstream answers after 400 ms, all admitted at once; `meanwhile`
/// runs 150 ms in (after their admission, before their answers). Each must be a 2xx.
async fn answered_after(gw: &Gateway, n: usize, meanwhile: impl FnOnce()) {
    let c = client();
    let url = gw.url(&format!("{OCR}?sleep_ms=400"));
    let calls: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), url.clone());
            tokio::spawn(async move { post(&c, &url, &key(), b"{}").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    meanwhile();
    for t in calls {
        let r = t.await.expect("join");
        assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    }
}

/// SPEC §7 ("`batched`: ... SIGTERM drains in-flight requests and flushes, losing nothing") with
/// §11.5's batched settlements, spawned after the answer: a SIGTERM right after the 2xx, while
/// Redis is slow to acknowledge them (`CLIENT PAUSE`, shorter than the store timeout), waits
/// for every one (`drain_deferred`): Redis has them all after the exit, which is 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_waits_for_the_batched_settlements_a_slow_redis_has_not_acknowledged() {
    let Some(redis) = RedisServer::start("deferred_sigterm", Opts::default()) else { return };
    let up = Upstream::start().await;
    let rest = format!("{HIGH_DEFAULT}\n[ledger]\ndurability = \"batched\"\n");
    let mut set =
        Replicas::start(1, &up.url(), &cluster_section(&[redis.url()], ""), &rest, &catalog(), &ents(40, 10), &[]);
    // Paused from 150 ms to 550 ms: the answers (400 ms) go out while their settlements wait.
    answered_after(&set.gw[0], 8, || assert_eq!(redis.cli(&["CLIENT", "PAUSE", "400"]), "OK")).await;
    let status = tokio::task::block_in_place(|| set.gw[0].signal_and_wait("TERM")).expect("exits");
    let logs = set.gw[0].logs();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(!logs.contains("not acknowledged by Redis") && !logs.contains("not charged"), "{logs}");
    let gw = restart_replica(&set, 0);
    let v = admin_get(&client(), &gw, "/admin/v1/tenants/acme/usage").await.json();
    assert_eq!(v["features"]["license-plate-recognition"]["units"]["payg"], "8", "every 2xx on Redis: {v}");
}

/// The same with Redis hung (SIGSTOP) past the store timeout and `on_store_error = "local"`:
/// the settlements spawned after the answers fail over to the fallback and its journal; the
/// SIGTERM waits for them, cannot replay them (exit 1, naming the journal), and the next start
/// on that ledger folder, Redis back, replays every one, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_settlements_redis_hangs_under_at_sigterm_are_journaled_and_replayed_at_the_next_start() {
    let rest = format!("{HIGH_DEFAULT}\n[ledger]\ndurability = \"batched\"\n");
    let Some((redis, _up, mut set)) = on_fallback_policy("deferred_sigterm_hung", 1, 1, &rest, 10).await else {
        return;
    };
    let pid = redis.pid().expect("running");
    answered_after(&set.gw[0], 8, || signal(pid, "-STOP")).await;
    let status = tokio::task::block_in_place(|| set.gw[0].signal_and_wait("TERM"));
    signal(pid, "-CONT");
    let logs = set.gw[0].logs();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{logs}");
    assert!(logs.contains("not replayed to Redis") && !logs.contains("not acknowledged by Redis"), "{logs}");
    let gw = restart_replica(&set, 0);
    let c = client();
    fallback_becomes(&c, &gw, 0.0).await;
    let v = admin_get(&c, &gw, "/admin/v1/tenants/acme/usage").await.json();
    assert_eq!(v["features"]["license-plate-recognition"]["units"]["payg"], "8", "every 2xx on Redis, once: {v}");
}

/// `kill <sig> <pid>` (e.g. `-STOP`, `-CONT` to a Redis server).
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}

/// Redis hung (SIGSTOP) from 250 ms into a run for `for_ms`, then resumed (SIGCONT): the calls in
/// flight then (admitted, their settlements not yet acknowledged) meet a store that does not
/// answer, and the scripts it queued meanwhile run once it is back.
fn hang(redis: RedisServer, for_ms: u64) -> impl FnOnce() -> RedisServer + Send + 'static {
    move || {
        let pid = redis.pid().expect("running");
        std::thread::sleep(Duration::from_millis(250));
        signal(pid, "-STOP");
        std::thread::sleep(Duration::from_millis(for_ms));
        signal(pid, "-CONT");
        redis
    }
}

/// Redis killed (-9) 250 ms into a run, started again `for_ms` later on its append-only file.
fn crash(mut redis: RedisServer, for_ms: u64) -> impl FnOnce() -> RedisServer + Send + 'static {
    move || {
        std::thread::sleep(Duration::from_millis(250));
        redis.kill9();
        std::thread::sleep(Duration::from_millis(for_ms));
        redis.restart();
        redis
    }
}

/// What the clients of [`calls_across_an_outage`] got, counted client-side.
#[derive(Debug, Default)]
struct Got {
    /// 2xx of license-plate calls (pay-as-you-go).
    ocr: u64,
    /// 2xx of object-detection calls (paid by od-1, nothing else can pay them).
    detect: u64,
    /// Every other answer: (route, status) → how many.
    refused: std::collections::BTreeMap<(&'static str, u16), u64>,
}

/// `clients` concurrent clients (a connection each), spread over `gws`, each making `calls`
/// calls that alternate license plate and object detection, which the upstream answers after
/// 50 ms; `outage` runs meanwhile on a thread of its own. Every object-detection 2xx must name
/// od-1 as its payer.
async fn calls_across_an_outage<T: Send + 'static>(
    gws: &[&Gateway],
    clients: usize,
    calls: usize,
    outage: impl FnOnce() -> T + Send + 'static,
) -> (Got, T) {
    let outage = tokio::task::spawn_blocking(outage);
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let gw = gws[i % gws.len()];
            let urls =
                [(OCR, gw.url(&format!("{OCR}?sleep_ms=50"))), (DETECT, gw.url(&format!("{DETECT}?sleep_ms=50")))];
            tokio::spawn(async move {
                let c = client();
                let mut got = Got::default();
                for k in 0..calls {
                    let (route, url) = &urls[(i + k) % 2];
                    let r = post(&c, url, &key(), b"{}").await;
                    match (*route, r.status) {
                        (OCR, StatusCode::OK) => got.ocr += 1,
                        (_, StatusCode::OK) => {
                            assert_eq!(r.header("x-turnstile-payer"), Some("single_package:od-1"));
                            got.detect += 1;
                        }
                        (_, s) => *got.refused.entry((*route, s.as_u16())).or_default() += 1,
                    }
                }
                got
            })
        })
        .collect();
    let mut all = Got::default();
    for t in tasks {
        let got = t.await.expect("client");
        all.ocr += got.ocr;
        all.detect += got.detect;
        for (k, n) in got.refused {
            *all.refused.entry(k).or_default() += n;
        }
    }
    (all, outage.await.expect("outage"))
}

/// The money invariants after [`calls_across_an_outage`], once every replica's journal is
/// empty and it is back on Redis: the usage report (the same from every replica) counts
/// exactly the 2xx the clients got — license plate as pay-as-you-go at the tier prices of that
/// many calls, object detection paid by od-1 — nothing unpaid; od-1's consumed in Redis is what
/// the report says it paid, never more than its `points`, and its remaining the rest; the
/// metrics of all the replicas together count the same units; and nothing more is counted
/// later. The pay-as-you-go amount in the metrics is exact too, except `on_fallback`: there
/// (README, "What it cannot promise") a call charged on the fallback is priced by the
/// replica's local month, which leaves out what Redis counted before, so it lies between the
/// exact amount and every call at the first tier's price. Holds left in Redis: none after the
/// fallback (an admission Redis did not answer is given back by the replay); under `deny` at
/// most one per 503 (an admission Redis ran late: given back at the lease's end).
async fn charged_exactly_what_was_served(
    redis: &RedisServer,
    gws: &[&Gateway],
    got: &Got,
    points: u64,
    on_fallback: bool,
) {
    let c = client();
    let (lp, od) = ("license-plate-recognition", "object-detection");
    let want_amount = payg_price(got.ocr);
    // (report, (license-plate units, its payg amount, object-detection units) in the metrics of
    // all replicas, od-1's consumed in Redis, journal entries and fallback gauges of all).
    let figures = || async {
        let (mut m, mut waiting) = ((0.0, 0.0, 0.0), 0.0);
        for gw in gws {
            m = (m.0 + gw.billed_units(lp).await, m.1 + gw.payg_amount(lp).await, m.2 + gw.billed_units(od).await);
            let text = gw.metrics(&c).await;
            for name in ["turnstile_store_journal_entries", "turnstile_store_fallback"] {
                waiting += metric(&text, name).unwrap_or(0.0);
            }
        }
        let v = admin_get(&c, gws[0], "/admin/v1/tenants/acme/usage").await.json();
        let consumed = redis.cli(&["HGET", "turnstile:{acme}:p:od-1", "consumed"]);
        (v, m, consumed, waiting)
    };
    // Batched settlements reach Redis (and the metrics) a little after the last answer, and a
    // settlement that timed out reaches the journal (then Redis) a little later still: wait
    // until every journal is empty, every replica back on Redis and the units all there.
    let since = Instant::now();
    let (v, m, consumed) = loop {
        let (v, m, consumed, waiting) = figures().await;
        let report = &v["features"];
        if (waiting == 0.0
            && report[lp]["units"]["payg"].as_str() == Some(got.ocr.to_string().as_str())
            && report[od]["units"]["single_package"].as_str() == Some(got.detect.to_string().as_str())
            && (m.0, m.2) == (got.ocr as f64, got.detect as f64))
            || since.elapsed() > Duration::from_secs(5)
        {
            assert_eq!(waiting, 0.0, "journal entries and fallback gauges of all replicas after 5 s");
            break (v, m, consumed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let report = &v["features"];
    let whole = |x: &serde_json::Value| x.as_str().map(str::to_string);
    assert_eq!(whole(&report[lp]["units"]["payg"]), Some(got.ocr.to_string()), "license-plate 2xx {got:?}: {v}");
    assert_eq!(whole(&report[lp]["payg"]["amount"]), Some(format!("{want_amount:.2}")), "{got:?}: {v}");
    assert_eq!(whole(&report[od]["units"]["single_package"]), Some(got.detect.to_string()), "od 2xx {got:?}: {v}");
    for f in [lp, od] {
        let units = report[f]["units"].as_object().expect("units");
        let other: Vec<_> =
            units.iter().filter(|(k, n)| !["payg", "single_package"].contains(&k.as_str()) && *n != "0").collect();
        assert!(other.is_empty(), "{f}: units under no payer the clients saw: {other:?}");
        assert!(report[f]["unpaid"].as_str().is_none_or(decimal_is_zero), "{f} unpaid: {v}");
    }
    let paid = got.detect;
    assert!(paid <= points, "od-1 paid {paid} calls of its {points} points; Redis consumed {consumed}: {v}");
    assert_eq!(v["packages"][0]["remaining"], (points - paid).to_string(), "{got:?}: {v}");
    assert_eq!(consumed, (paid * 1_000_000).to_string(), "od-1's consumed micro-points in Redis");
    assert_eq!(m.0, got.ocr as f64, "turnstile_billed_units_total of license plate, all replicas");
    let amount: f64 = want_amount.to_string().parse().expect("a number");
    if on_fallback {
        let first_tier = got.ocr as f64 * 0.10;
        assert!(
            m.1 > amount - 1e-9 && m.1 < first_tier + 1e-9,
            "turnstile_payg_amount_total {} not in [{amount}, {first_tier}]",
            m.1
        );
    } else {
        assert!((m.1 - amount).abs() < 1e-9, "turnstile_payg_amount_total {} != {amount} ({got:?})", m.1);
    }
    let held: u64 = redis.cli(&["HGET", "turnstile:{acme}:p:od-1", "held"]).parse().unwrap_or(0);
    let refused: u64 = got.refused.iter().filter(|((_, s), _)| *s == 503).map(|(_, n)| n).sum();
    let most = if on_fallback { 0 } else { refused * 1_000_000 };
    assert!(held <= most, "od-1 holds {held} micro-points in Redis after the run, at most {most} ({got:?})");
    for gw in &gws[1..] {
        let other = admin_get(&c, gw, "/admin/v1/tenants/acme/usage").await.json();
        assert_eq!(
            (&other["features"], &other["packages"]),
            (&v["features"], &v["packages"]),
            "replicas' reports differ"
        );
    }
    assert_eq!(m.2, got.detect as f64, "turnstile_billed_units_total of object detection, all replicas");
    // Exactly once: later probes replay nothing, nothing is counted again.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (v2, m2, consumed2, _) = figures().await;
    assert_eq!((&v2["features"], &v2["packages"], m2, consumed2), (&v["features"], &v["packages"], m, consumed));
}

fn decimal_is_zero(v: &str) -> bool {
    v.parse::<rust_decimal::Decimal>().is_ok_and(|d| d.is_zero())
}

/// Store calls of `ops` (`admit`, `settle`) that failed, summed over `gws`: at least one proves
/// the run met the outage with calls in flight.
async fn store_errors(gws: &[&Gateway], ops: &[&str]) -> f64 {
    let c = client();
    let mut n = 0.0;
    for gw in gws {
        let m = gw.metrics(&c).await;
        for op in ops {
            n += metric(&m, &format!("turnstile_store_errors_total{{op=\"{op}\"}}")).unwrap_or(0.0);
        }
    }
    n
}

/// SPEC §11.6 `local` and §10, with 12 clients at once (384 calls): Redis hangs for a second
/// while calls are in flight. Their settlements time out and are journaled uncounted (counted
/// when their replay succeeds, 7b797c0), their admissions time out (the scripts, queued, run
/// when Redis resumes), the calls after them are charged on the fallback, od-1 (60 points,
/// nothing else pays object detection) runs out on the way, and license plate crosses its
/// pay-as-you-go tier. Once the journal is empty the report, Redis and the metrics count
/// exactly the 2xx the clients got, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_across_a_hung_redis_on_the_fallback_are_charged_once() {
    calls_on_the_fallback_across("concurrent_fallback_hung", |redis| hang(redis, 1000)).await;
}

/// [`concurrent_calls_across_a_hung_redis_on_the_fallback_are_charged_once`] with Redis killed
/// (-9) for a second and started again on its append-only file: the calls in flight fail at
/// once, refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_calls_across_a_redis_crash_on_the_fallback_are_charged_once() {
    calls_on_the_fallback_across("concurrent_fallback_crash", |redis| crash(redis, 1000)).await;
}

async fn calls_on_the_fallback_across<F>(test: &str, outage: impl FnOnce(RedisServer) -> F)
where
    F: FnOnce() -> RedisServer + Send + 'static,
{
    let rest = format!("{HIGH_DEFAULT}\n[ledger]\ndurability = \"batched\"\n");
    let Some((redis, _up, set)) = on_fallback_policy(test, 1, 1, &rest, 60).await else {
        return;
    };
    let gws = [&set.gw[0]];
    let (got, redis) = calls_across_an_outage(&gws, 12, 32, outage(redis)).await;
    let other: Vec<_> = got.refused.keys().filter(|k| **k != (DETECT, 402)).collect();
    assert!(other.is_empty(), "served on the fallback, object detection 402 once od-1 is spent: {got:?}");
    assert!(got.refused.contains_key(&(DETECT, 402)), "od-1 ran out part way: {got:?}");
    assert!(got.ocr > 50, "license plate crossed its tier: {got:?}");
    assert!(store_errors(&gws, &["admit", "settle"]).await > 0.0, "the outage met no call");
    charged_exactly_what_was_served(&redis, &gws, &got, 60, true).await;
}

/// SPEC §11.6 `deny` with batched settlements (633e18e, 42cdbf1), two replicas and 16 clients at
/// once (384 calls): Redis hangs for a second. Calls admitted before it hung are answered 2xx and
/// their settlements, spawned after the answer, time out: journaled and replayed once Redis
/// answers; calls arriving meanwhile get 503 and are not charged. od-1 (80 points) runs out
/// on the way, license plate crosses its tier. The report, Redis and both replicas' metrics
/// count exactly the 2xx the clients got, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_deferred_settlements_a_hung_redis_failed_under_deny_are_charged_once() {
    let test = "concurrent_deferred_deny";
    let Some(redis) = RedisServer::start(test, Opts { aof_always: true, cluster: false }) else {
        return;
    };
    let up = Upstream::start().await;
    let rest = format!("{HIGH_DEFAULT}\n[ledger]\ndurability = \"batched\"\n");
    let cluster = cluster_section(&[redis.url()], "on_store_error = \"deny\"");
    let set = Replicas::start(2, &up.url(), &cluster, &rest, &catalog(), &ents(40, 80), &[]);
    let gws = [&set.gw[0], &set.gw[1]];
    let (got, redis) = calls_across_an_outage(&gws, 16, 24, hang(redis, 1000)).await;
    let allowed = [(OCR, 503), (DETECT, 503), (DETECT, 402)];
    let other: Vec<_> = got.refused.keys().filter(|k| !allowed.contains(k)).collect();
    assert!(other.is_empty(), "503 while Redis hangs, object detection 402 once od-1 is spent: {got:?}");
    assert!(got.refused.contains_key(&(OCR, 503)), "calls met the hung Redis at admission: {got:?}");
    assert!(got.refused.contains_key(&(DETECT, 402)), "od-1 ran out part way: {got:?}");
    assert!(got.ocr > 50, "license plate crossed its tier: {got:?}");
    assert!(store_errors(&gws, &["settle"]).await > 0.0, "no deferred settlement met the hung Redis");
    for gw in gws {
        assert_eq!(
            metric(&gw.metrics(&client()).await, "turnstile_store_fallback"),
            Some(0.0),
            "deny never falls back"
        );
    }
    charged_exactly_what_was_served(&redis, &gws, &got, 80, false).await;
}
