//! Black-box tests of shadow mode (SPEC §5.5): `[admission].mode = "shadow"`, or `"shadow": true`
//! on a tenant, forwards what would have been 429 `qps_exceeded` or 402 `payment_required`,
//! meters it as usual and counts it as `shadow_throttled` / `shadow_payment_required`.
//!
//! The limits are 1 QPS with a bucket 1 deep, so a burst of sequential calls that takes less
//! than a second is admitted exactly once; a slower burst (a loaded machine) is checked
//! against the bucket arithmetic instead.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "shadow-token";
const AUTH: (&str, &str) = ("authorization", "Bearer shadow-token");
const ACME: (&str, &str) = ("x-api-key", "key-acme");
const GLOBEX: (&str, &str) = ("x-api-key", "key-globex");
const PLATE: &str = "/v1/ocr/license-plate";

/// `[admission]` at 1 QPS, 1 deep, in `mode` (`None`: the key left out, the default).
fn admission(mode: Option<&str>) -> String {
    let mode = mode.map(|m| format!("mode = \"{m}\"\n")).unwrap_or_default();
    format!("[admission]\ndefault_qps = 1\nburst_seconds = 1.0\n{mode}")
}

fn start(up: &Upstream, server_extra: &str, rest: &str, catalog: &str, ents: &str) -> (ConfigDir, Gateway) {
    let cfg = ConfigDir::new(&main_toml(&up.url(), server_extra, rest), catalog, ents);
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    (cfg, gw)
}

/// `name{labels} value` of the scrape; 0 when the series is absent.
fn series(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.strip_prefix(' ')))
        .map_or(0.0, |v| v.trim().parse().unwrap_or_else(|_| panic!("not a number: {v}")))
}

fn requests(text: &str, tenant: &str, feature: &str, outcome: &str) -> u32 {
    let s = format!(r#"turnstile_requests_total{{feature="{feature}",outcome="{outcome}",tenant="{tenant}"}}"#);
    series(text, &s) as u32
}

/// `n` sequential calls: their answers and how long the burst took.
async fn burst(c: &TestClient, gw: &Gateway, path: &str, key: (&str, &str), n: u32) -> (Vec<Reply>, Duration) {
    let start = Instant::now();
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(post(c, &gw.url(path), &[key], b"{}").await);
    }
    (out, start.elapsed())
}

fn count(replies: &[Reply], status: StatusCode) -> u32 {
    replies.iter().filter(|r| r.status == status).count() as u32
}

/// The calls of an `n`-call burst that a 1 QPS bucket, 1 deep and full at the start, refuses
/// when the burst took `elapsed`: `n - 1` under a second, at least `n - 1 - ceil(elapsed)`.
fn refused_range(n: u32, elapsed: Duration) -> std::ops::RangeInclusive<u32> {
    (n - 1).saturating_sub(elapsed.as_secs_f64().ceil() as u32)..=n - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_shadow_mode_forwards_what_enforce_mode_throttles_and_meters_it() {
    const N: u32 = 8;
    let up = Upstream::start().await;
    let c = client();
    // globex calls license plates at the default limit, paid pay-as-you-go.
    let (_e_cfg, enforce) = start(&up, "", &admission(None), SHIPPED_CATALOG, &entitlements(40, None));
    let (_s_cfg, shadow) = start(&up, "", &admission(Some("shadow")), SHIPPED_CATALOG, &entitlements(40, None));

    let (enforced, e_took) = burst(&c, &enforce, PLATE, GLOBEX, N).await;
    let throttled = count(&enforced, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled + count(&enforced, StatusCode::OK), N, "enforce: only 200s and 429s");
    assert!(refused_range(N, e_took).contains(&throttled), "enforce: {throttled} 429s in {e_took:?}");

    let (shadowed, s_took) = burst(&c, &shadow, PLATE, GLOBEX, N).await;
    for (i, r) in shadowed.iter().enumerate() {
        assert_eq!(r.status, StatusCode::OK, "call {i} reaches the upstream: {}", String::from_utf8_lossy(&r.body));
        assert!(String::from_utf8_lossy(&r.body).contains("license-plate-recognition"), "the upstream's echo");
        assert_eq!(r.header("x-turnstile-payer"), Some("payg"), "call {i}: metered as usual");
    }
    // A shadow-throttled call shows what its 429 would have: nothing remaining.
    let last = shadowed.last().expect("calls");
    assert!(last.header("ratelimit").is_some_and(|v| v.contains(";r=0;")), "{:?}", last.header("ratelimit"));

    let m = shadow.metrics(&c).await;
    let shadow_throttled = requests(&m, "globex", "license-plate-recognition", "shadow_throttled");
    let admitted = requests(&m, "globex", "license-plate-recognition", "admitted");
    assert_eq!(requests(&m, "globex", "license-plate-recognition", "throttled"), 0, "{m}");
    assert_eq!(shadow_throttled + admitted, N, "{m}");
    assert!(refused_range(N, s_took).contains(&shadow_throttled), "shadow: {shadow_throttled} in {s_took:?}");
    if e_took < Duration::from_secs(1) && s_took < Duration::from_secs(1) {
        assert_eq!(shadow_throttled, throttled, "the calls enforce mode refuses, shadow mode counts");
    }
    let billed = r#"turnstile_billed_units_total{feature="license-plate-recognition",payer="payg",tenant="globex"}"#;
    assert_eq!(series(&m, billed), f64::from(N), "every 2xx is billed: {m}");
    assert_eq!(series(&enforce.metrics(&c).await, billed), f64::from(N - throttled), "enforce bills the admitted");
    let logs = shadow.logs();
    let lines = logs.lines().filter(|l| l.contains("shadow mode: forwarded")).count();
    assert!(lines >= 1 && lines <= 1 + s_took.as_secs() as usize, "rate-limited log lines: {logs}");
    assert!(logs.contains("shadow_throttled"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_in_shadow_mode_is_forwarded_while_another_is_throttled() {
    const N: u32 = 6;
    let up = Upstream::start().await;
    let c = client();
    // Two tenants with the same limit; only `initech` is in shadow mode.
    let ents = format!(
        r#"{{"tenants": {{
  "globex": {{"api_keys": ["{}"], "services": ["text_recognition"]}},
  "initech": {{"api_keys": ["{}"], "services": ["text_recognition"], "shadow": true}}
}}}}"#,
        key_hash("key-globex"),
        key_hash("key-initech")
    );
    let (_cfg, gw) = start(&up, "", &admission(Some("enforce")), SHIPPED_CATALOG, &ents);
    let (shadowed, s_took) = burst(&c, &gw, PLATE, ("x-api-key", "key-initech"), N).await;
    let (enforced, e_took) = burst(&c, &gw, PLATE, GLOBEX, N).await;
    assert_eq!(count(&shadowed, StatusCode::OK), N, "initech is forwarded");
    let throttled = count(&enforced, StatusCode::TOO_MANY_REQUESTS);
    assert!(refused_range(N, e_took).contains(&throttled), "globex still gets 429s: {throttled} in {e_took:?}");
    assert!(throttled >= 1, "globex still gets 429s");
    let m = gw.metrics(&c).await;
    let f = "license-plate-recognition";
    let shadow_throttled = requests(&m, "initech", f, "shadow_throttled");
    assert!(refused_range(N, s_took).contains(&shadow_throttled), "initech: {shadow_throttled} in {s_took:?}: {m}");
    assert_eq!(requests(&m, "initech", f, "throttled"), 0, "{m}");
    assert_eq!(requests(&m, "globex", f, "throttled"), throttled, "{m}");
    assert_eq!(requests(&m, "globex", f, "shadow_throttled"), 0, "{m}");
}

/// A catalog where nothing pays for license plates (single-category packages only, and acme has
/// none) and object detection is paid only by acme's 1-point package.
fn unpayable() -> (String, String) {
    let catalog = small_catalog(r#"["prepaid_qps"]"#, r#"["single_package"]"#, r#"["single_package"]"#, "");
    let ents = format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{}"], "services": ["face_body"], "packages": [
            {{"id": "od-1", "feature": "object-detection", "points": "1", "ordered_at": "{}", "expires_at": "{}"}}]}}}}}}"#,
        key_hash("key-acme"),
        at(-3600),
        at(86400),
    );
    (catalog, ents)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_forwards_what_nothing_can_pay_for_and_charges_nobody() {
    let up = Upstream::start().await;
    let c = client();
    let (catalog, ents) = unpayable();
    // 1 deep: each answer shows whether the token went back. The strict ledger: a shadow call's
    // unpaid units are made durable before its answer, like any charge.
    let rest = admission(None);
    let (_e_cfg, enforce) = start(&up, "", &rest, &catalog, &ents);
    let strict = format!("{rest}mode = \"shadow\"\n\n[ledger]\ndurability = \"strict\"\n");
    let (_s_cfg, shadow) = start(&up, "", &strict, &catalog, &ents);

    let refused = post(&c, &enforce.url(PLATE), &[ACME], b"{}").await;
    assert_eq!((refused.status, refused.error_code().as_str()), (StatusCode::PAYMENT_REQUIRED, "payment_required"));
    const N: u32 = 3;
    for i in 0..N {
        let r = post(&c, &shadow.url(PLATE), &[ACME], b"{}").await;
        assert_eq!(r.status, StatusCode::OK, "call {i}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-turnstile-payer"), Some("unpaid"), "call {i}");
        // As for the 402, the token went back: the fields show the bucket full.
        assert_eq!(r.header("ratelimit"), refused.header("ratelimit"), "call {i}");
        assert_eq!(r.header("ratelimit"), Some("\"qps\";r=1;t=0"), "call {i}");
    }
    let m = shadow.metrics(&c).await;
    let f = "license-plate-recognition";
    assert_eq!(requests(&m, "acme", f, "shadow_payment_required"), N, "{m}");
    assert_eq!(requests(&m, "acme", f, "payment_required") + requests(&m, "acme", f, "admitted"), 0, "{m}");
    assert!(!m.contains(&format!(r#"turnstile_billed_units_total{{feature="{f}""#)), "nothing charged: {m}");
    let unpaid = format!(r#"turnstile_unpaid_units_total{{feature="{f}",tenant="acme"}}"#);
    assert_eq!(series(&m, &unpaid), f64::from(N), "{m}");
    let u = get(&c, &shadow.admin_url("/admin/v1/tenants/acme/usage"), &[AUTH]).await.json();
    assert_eq!(u["features"][f]["unpaid"], N.to_string(), "{u}");
    assert!(u["features"][f]["units"].as_object().expect("units").values().all(|v| v == "0"), "{u}");
    assert_eq!(u["total"], "0.00", "{u}");

    // Both at once: the package pays the first call, which takes the bucket's token; the next
    // ones are over the limit and unpayable. Throttled wins (admit comes before pay); unpaid.
    let start = Instant::now();
    let first = post(&c, &shadow.url("/v1/detect/x"), &[ACME], b"{}").await;
    let second = post(&c, &shadow.url("/v1/detect/x"), &[ACME], b"{}").await;
    let third = post(&c, &shadow.url("/v1/detect/x"), &[ACME], b"{}").await;
    let took = start.elapsed();
    assert_eq!(first.header("x-turnstile-payer"), Some("single_package:od-1"));
    assert_eq!((second.status, second.header("x-turnstile-payer")), (StatusCode::OK, Some("unpaid")));
    assert_eq!((third.status, third.header("x-turnstile-payer")), (StatusCode::OK, Some("unpaid")));
    let m = shadow.metrics(&c).await;
    let f = "object-detection";
    if took < Duration::from_secs(1) {
        assert_eq!(requests(&m, "acme", f, "shadow_throttled"), 2, "{m}");
    }
    assert_eq!(requests(&m, "acme", f, "shadow_throttled") + requests(&m, "acme", f, "shadow_payment_required"), 2);
    assert_eq!(series(&m, &format!(r#"turnstile_unpaid_units_total{{feature="{f}",tenant="acme"}}"#)), 2.0, "{m}");
}

async fn reload(c: &TestClient, gw: &Gateway) {
    let r = post(c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
}

/// Waits until a new second of the bucket: each burst then starts with a full bucket.
async fn refill() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_switches_shadow_mode_live_both_ways() {
    const N: u32 = 4;
    let up = Upstream::start().await;
    let c = client();
    let ents = entitlements(40, None);
    let (cfg, gw) = start(&up, "", &admission(None), SHIPPED_CATALOG, &ents);
    let main = std::fs::read_to_string(cfg.main()).expect("read");
    let f = "license-plate-recognition";

    let (r, _) = burst(&c, &gw, PLATE, GLOBEX, N).await;
    assert!(count(&r, StatusCode::TOO_MANY_REQUESTS) >= 1, "enforce: 429s");

    std::fs::write(cfg.main(), main.replace("burst_seconds = 1.0\n", "burst_seconds = 1.0\nmode = \"shadow\"\n"))
        .expect("write");
    reload(&c, &gw).await;
    refill().await;
    let before = requests(&gw.metrics(&c).await, "globex", f, "shadow_throttled");
    let (r, took) = burst(&c, &gw, PLATE, GLOBEX, N).await;
    assert_eq!(count(&r, StatusCode::OK), N, "shadow after the reload: all forwarded");
    let shadowed = requests(&gw.metrics(&c).await, "globex", f, "shadow_throttled") - before;
    assert!(shadowed >= 1 && refused_range(N, took).contains(&shadowed), "{shadowed} in {took:?}");

    std::fs::write(cfg.main(), &main).expect("write");
    reload(&c, &gw).await;
    refill().await;
    let (r, _) = burst(&c, &gw, PLATE, GLOBEX, N).await;
    assert!(count(&r, StatusCode::TOO_MANY_REQUESTS) >= 1, "enforce again: 429s");

    // The tenant's own flag, in entitlements.json, switches just as live.
    let flagged =
        ents.replace(r#""services": ["text_recognition"]"#, r#""services": ["text_recognition"], "shadow": true"#);
    assert_ne!(flagged, ents);
    std::fs::write(cfg.path().join("entitlements.json"), &flagged).expect("write");
    reload(&c, &gw).await;
    let (r, _) = burst(&c, &gw, PLATE, GLOBEX, N).await;
    assert_eq!(count(&r, StatusCode::OK), N, "globex in shadow mode: all forwarded");
    std::fs::write(cfg.path().join("entitlements.json"), &ents).expect("write");
    reload(&c, &gw).await;
    let (r, _) = burst(&c, &gw, PLATE, GLOBEX, N).await;
    assert!(count(&r, StatusCode::TOO_MANY_REQUESTS) >= 1, "the flag removed: 429s");
}

/// A shadow-throttled call took no token, so a 413 for its body while it streams must not give
/// one back (that would hand the next call a token it never had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shadow_throttled_body_too_large_gives_back_no_token() {
    let up = Upstream::start().await;
    let c = client();
    let (_cfg, gw) = start(
        &up,
        "max_request_body_bytes = 4096",
        &admission(Some("shadow")),
        SHIPPED_CATALOG,
        &entitlements(40, None),
    );
    let start = Instant::now();
    let first = post(&c, &gw.url(PLATE), &[GLOBEX], b"{}").await;
    assert_eq!(first.status, StatusCode::OK);
    // Chunked, so the size is found only while the body streams to the upstream.
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let head = format!(
        "POST {PLATE} HTTP/1.1\r\nhost: x\r\nx-api-key: key-globex\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("head");
    let chunk = vec![b'y'; 1024];
    let mut body = Vec::new();
    for _ in 0..16 {
        body.extend_from_slice(b"400\r\n");
        body.extend_from_slice(&chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    let _ = s.write_all(&body).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await.expect("answer in 5 s");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let third = post(&c, &gw.url(PLATE), &[GLOBEX], b"{}").await;
    assert_eq!(third.status, StatusCode::OK);
    let took = start.elapsed();
    let m = gw.metrics(&c).await;
    let f = "license-plate-recognition";
    assert_eq!(requests(&m, "globex", f, "forbidden"), 1, "the 413: {m}");
    if took < Duration::from_secs(1) {
        assert_eq!(requests(&m, "globex", f, "admitted"), 1, "no token came back for the third call: {m}");
        assert_eq!(requests(&m, "globex", f, "shadow_throttled"), 1, "{m}");
    }
}

/// Cluster mode (SPEC §11) gives the same answers: on Redis the admit script itself gives the
/// token back when a package could have paid but none holds enough, and the unpaid units are
/// recorded in Redis's month (settled after the answer in batched mode).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadow_mode_on_redis_gives_the_same_answers() {
    use common::cluster::{cluster_section, Replicas};
    use common::redis::{Opts, RedisServer};
    let Some(redis) = RedisServer::start("shadow_mode_on_redis", Opts::default()) else { return };
    let up = Upstream::start().await;
    let c = client();
    let (catalog, ents) = unpayable();
    let cluster = cluster_section(&[redis.url()], "");
    let set = Replicas::start(1, &up.url(), &cluster, &admission(Some("shadow")), &catalog, &ents, &[]);
    let gw = &set.gw[0];
    let call = |path: &'static str| {
        let (c, url) = (c.clone(), gw.url(path));
        async move { post(&c, &url, &[ACME], b"{}").await }
    };
    let unpaid_and_full = |r: &Reply, what: &str| {
        assert_eq!(r.status, StatusCode::OK, "{what}: {}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-turnstile-payer"), Some("unpaid"), "{what}");
        assert_eq!(r.header("ratelimit"), Some("\"qps\";r=1;t=0"), "{what}: the token went back");
    };
    for i in 0..3 {
        unpaid_and_full(&call(PLATE).await, &format!("license plate {i}"));
    }
    let start = Instant::now();
    let first = call("/v1/detect/x").await;
    let second = call("/v1/detect/x").await;
    let took = start.elapsed();
    assert_eq!(first.header("x-turnstile-payer"), Some("single_package:od-1"));
    assert_eq!((second.status, second.header("x-turnstile-payer")), (StatusCode::OK, Some("unpaid")));
    refill().await;
    // The package is spent: the script takes the token, finds no package and gives it back.
    unpaid_and_full(&call("/v1/detect/x").await, "detect 3");
    unpaid_and_full(&call("/v1/detect/x").await, "detect 4");

    let (plate, detect) = ("license-plate-recognition", "object-detection");
    let unpaid = |f: &str| format!(r#"turnstile_unpaid_units_total{{feature="{f}",tenant="acme"}}"#);
    let deadline = Instant::now() + Duration::from_secs(5);
    let m = loop {
        let m = gw.metrics(&c).await;
        if series(&m, &unpaid(plate)) == 3.0 && series(&m, &unpaid(detect)) == 3.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "unpaid units settled after the answers: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(requests(&m, "acme", plate, "shadow_payment_required"), 3, "{m}");
    let (shadow_throttled, shadow_unpaid) =
        (requests(&m, "acme", detect, "shadow_throttled"), requests(&m, "acme", detect, "shadow_payment_required"));
    assert_eq!((shadow_throttled + shadow_unpaid, requests(&m, "acme", detect, "admitted")), (3, 1), "{m}");
    if took < Duration::from_secs(1) {
        assert_eq!(shadow_throttled, 1, "{m}");
    }
    let (n, v) = Replicas::admin_auth();
    let u = get(&c, &gw.admin_url("/admin/v1/tenants/acme/usage"), &[(n, &v)]).await.json();
    assert_eq!((&u["features"][plate]["unpaid"], &u["features"][detect]["unpaid"]), (&"3".into(), &"3".into()), "{u}");
    assert_eq!(u["features"][detect]["units"]["single_package"], "1", "{u}");
}
