//! Black-box tests of who pays (SPEC §6), the ledger (§7) and the usage report (§9).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::{BodyExt, Full};

const TOKEN: &str = "test-admin-token";
const AUTH: (&str, &str) = ("authorization", "Bearer test-admin-token");
const ACME: (&str, &str) = ("x-api-key", "key-acme");

fn routes() -> &'static str {
    r#"
[[routes]]
path = "/v1/video/enhance"
feature = "comprehensive-video-enhancement"
"#
}

fn tenants() -> String {
    format!(
        r#"{{"tenants": {{
  "acme": {{"api_keys": ["{acme}"], "services": ["face_body", "object_detection", "text_recognition", "video_production"],
    "qps_plans": [{{"feature": "face-comparison-1-1", "qps": 40, "effective_at": "{from}", "expires_at": "{until}"}}],
    "packages": [
      {{"id": "od-1", "feature": "object-detection", "points": "1", "ordered_at": "{from}", "expires_at": "{until}"}},
      {{"id": "expired", "feature": "object-detection", "points": "100", "ordered_at": "{old}", "expires_at": "{from}"}}
    ]}}
}}}}"#,
        acme = key_hash("key-acme"),
        from = at(-3600),
        until = at(86400 * 30),
        old = at(-86400 * 400),
    )
}

fn config(upstream: &str, ledger: &str, extra: &str, ents: &str) -> ConfigDir {
    let rest = format!("[admission]\ndefault_qps = 100000\n\n[ledger]\n{ledger}\n\n{extra}\n{}", routes());
    ConfigDir::new(&main_toml(upstream, "", &rest), SHIPPED_CATALOG, ents)
}

async fn usage(c: &TestClient, gw: &Gateway) -> serde_json::Value {
    let r = get(c, &gw.admin_url("/admin/v1/tenants/acme/usage"), &[AUTH]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payer_order_header_and_usage_report() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "durability = \"strict\"", "", &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();

    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    assert_eq!(r.header("x-turnstile-payer"), Some("prepaid_qps"));
    // od-1 holds 1 point = 5 calls at 0.2; the expired package is skipped; then pay-as-you-go.
    let mut payers = Vec::new();
    for _ in 0..6 {
        let r = post(&c, &gw.url("/v1/detect/objects"), &[ACME], b"{}").await;
        assert_eq!(r.status, StatusCode::OK);
        payers.push(r.header("x-turnstile-payer").unwrap_or_default().to_string());
    }
    assert_eq!(
        payers,
        ["single_package:od-1"; 5].iter().map(|s| s.to_string()).chain(["payg".to_string()]).collect::<Vec<_>>()
    );
    // A call the upstream fails is not charged.
    let r = post(&c, &gw.url("/v1/ocr/license-plate?status=500"), &[ACME], b"{}").await;
    assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
    for _ in 0..3 {
        let r = post(&c, &gw.url("/v1/ocr/license-plate"), &[ACME], b"{}").await;
        assert_eq!(r.header("x-turnstile-payer"), Some("payg"));
    }
    // Video: 2 min 20 s at 60 fps 1080p is the seed's 37.33.
    let r = post(&c, &gw.url("/v1/video/enhance?video_ms=140000&video_fps=60&video_lines=1080"), &[ACME], b"{}").await;
    assert_eq!(r.header("x-turnstile-payer"), Some("payg"));

    let u = usage(&c, &gw).await;
    assert_eq!(u["tenant"], "acme");
    assert_eq!(u["currency"], "CNY");
    let lp = &u["features"]["license-plate-recognition"];
    assert_eq!(lp["units"]["payg"], "3");
    assert_eq!(lp["payg"]["amount"], "0.45");
    assert_eq!(lp["payg"]["tiers"][0]["price"], "0.15");
    let od = &u["features"]["object-detection"];
    assert_eq!(od["units"]["single_package"], "5");
    assert_eq!(od["units"]["payg"], "1");
    assert_eq!(
        od["payg"]["amount"],
        serde_json::Value::Null,
        "object detection has no pay-as-you-go price in the seeds"
    );
    assert_eq!(od["payg"]["note"], "no price configured");
    assert_eq!(u["features"]["face-comparison-1-1"]["units"]["prepaid_qps"], "1");
    let video = &u["features"]["comprehensive-video-enhancement"]["payg"];
    assert_eq!(video["amount"], "37.33");
    assert_eq!(u["total"], "37.78", "0.45 + 37.33");
    let od1 = u["packages"].as_array().and_then(|p| p.iter().find(|p| p["id"] == "od-1")).expect("od-1 listed");
    assert_eq!(od1["remaining"], "0");
    assert_eq!(od1["low_balance_alerted"], true);

    let text = gw.metrics(&c).await;
    for line in [
        r#"turnstile_billed_units_total{feature="license-plate-recognition",payer="payg",tenant="acme"} 3"#,
        r#"turnstile_billed_units_total{feature="object-detection",payer="single_package",tenant="acme"} 5"#,
        r#"turnstile_package_low_balance_alerts_total{package="od-1",tenant="acme"} 1"#,
        r#"turnstile_package_remaining_points{package="od-1",tenant="acme"} 0"#,
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    // Prometheus counters are floats: the ledger has the exact figure, the metric a close one.
    let payg = text
        .lines()
        .find_map(|l| {
            l.strip_prefix(
                r#"turnstile_payg_amount_total{currency="CNY",feature="license-plate-recognition",tenant="acme"} "#,
            )
        })
        .and_then(|v| v.parse::<f64>().ok())
        .expect("payg amount series");
    assert!((payg - 0.45).abs() < 1e-9, "{payg}");
    let bad = get(&c, &gw.admin_url("/admin/v1/tenants/acme/usage?month=2026-13"), &[AUTH]).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let empty = get(&c, &gw.admin_url("/admin/v1/tenants/acme/usage?month=2020-01"), &[AUTH]).await.json();
    assert_eq!(empty["total"], "0.00");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_garbled_video_usage_is_billed_as_zero_and_counted() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "", "", &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    for q in ["", "?video_ms=abc&video_fps=60&video_lines=1080", "?video_ms=1000&video_fps=60"] {
        let r = post(&c, &gw.url(&format!("/v1/video/enhance{q}")), &[ACME], b"{}").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let text = gw.metrics(&c).await;
    assert!(
        text.contains(r#"turnstile_usage_report_errors_total{feature="comprehensive-video-enhancement"} 3"#),
        "{text}"
    );
    assert!(gw.logs().contains("x-usage-video"), "logged");
    let u = usage(&c, &gw).await;
    assert_eq!(u["features"]["comprehensive-video-enhancement"]["units"]["payg"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_to_pay_is_402_and_capacity_billed_features_fall_back_to_free_default() {
    let up = Upstream::start().await;
    let catalog = small_catalog(r#"["prepaid_qps"]"#, r#"["single_package"]"#, r#"["payg"]"#, "");
    let ents = format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{}"], "services": ["face_body"]}}}}}}"#,
        key_hash("key-acme")
    );
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), &catalog, &ents);
    let gw = Gateway::start(&cfg);
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    assert_eq!((r.status, r.header("x-turnstile-payer")), (StatusCode::OK, Some("free_default")));
    let r = post(&c, &gw.url("/v1/ocr/license-plate"), &[ACME], b"{}").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::PAYMENT_REQUIRED, "payment_required"));
    assert!(r.header("ratelimit").is_some());
}

/// A loopback webhook receiver that fails its first `fail_first` calls (500).
async fn webhook(fail_first: u64) -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>, Arc<AtomicU64>) {
    webhook_failing_with(fail_first, StatusCode::INTERNAL_SERVER_ERROR).await
}

/// A loopback webhook receiver that answers its first `fail_first` calls with `failure`.
async fn webhook_failing_with(
    fail_first: u64,
    failure: StatusCode,
) -> (String, Arc<std::sync::Mutex<Vec<serde_json::Value>>>, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let calls = Arc::new(AtomicU64::new(0));
    let (g, n) = (got.clone(), calls.clone());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (g, n) = (g.clone(), n.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (g, n) = (g.clone(), n.clone());
                    async move {
                        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let k = n.fetch_add(1, Ordering::SeqCst);
                        let status = if k < fail_first {
                            failure
                        } else {
                            if let Ok(v) = serde_json::from_slice(&body) {
                                g.lock().expect("lock").push(v);
                            }
                            StatusCode::OK
                        };
                        let mut resp = http::Response::new(Full::new(Bytes::new()));
                        *resp.status_mut() = status;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (format!("http://{addr}/alerts"), got, calls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_balance_alert_fires_once_with_webhook_retries() {
    let up = Upstream::start().await;
    let (url, got, calls) = webhook(2).await;
    let billing = format!("[billing]\nlow_balance_ratio = \"0.2\"\nalert_webhook = \"{url}\"\n");
    let cfg = config(&up.url(), "", &billing, &tenants());
    let gw = Gateway::start(&cfg);
    let c = client();
    // od-1: 1 point, 0.2 per call. After 4 calls 0.2 remain (= 20%): the alert fires, once.
    for _ in 0..5 {
        post(&c, &gw.url("/v1/detect/objects"), &[ACME], b"{}").await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().expect("lock").is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = got.lock().expect("lock").clone();
    assert_eq!(got.len(), 1, "exactly one alert: {got:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two failures, then delivered");
    assert_eq!(got[0]["tenant"], "acme");
    assert_eq!(got[0]["package"], "od-1");
    assert_eq!(got[0]["remaining"], "0.2");
    assert_eq!(got[0]["points"], "1");
    assert!(gw.logs().contains("package balance low"));
}

/// An alert fires once and is marked in the ledger: a SIGTERM right after it must not drop its
/// webhook POST (here retried twice, ~600 ms), or it is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_fired_just_before_sigterm_reaches_the_webhook_before_the_exit() {
    let up = Upstream::start().await;
    let (url, got, calls) = webhook(2).await;
    let billing = format!("[billing]\nlow_balance_ratio = \"0.2\"\nalert_webhook = \"{url}\"\n");
    let cfg = config(&up.url(), "", &billing, &tenants());
    let mut gw = Gateway::start(&cfg);
    let c = client();
    fire_the_alert(&c, &gw).await;
    let status = tokio::task::block_in_place(|| gw.signal_and_wait("TERM")).expect("exits");
    assert_eq!(status.code(), Some(0), "{}", gw.logs());
    assert_eq!(got.lock().expect("lock").len(), 1, "delivered before the exit: {}", gw.logs());
    assert_eq!(calls.load(Ordering::SeqCst), 3, "two failures, then delivered");
}

/// A webhook that never answers 2xx: SIGTERM waits for it a bounded time, then says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_webhook_never_takes_is_reported_at_shutdown() {
    let up = Upstream::start().await;
    let (url, got, _) = webhook(u64::MAX).await;
    let billing = format!("[billing]\nlow_balance_ratio = \"0.2\"\nalert_webhook = \"{url}\"\n");
    let cfg = config(&up.url(), "", &billing, &tenants());
    let mut gw = Gateway::start(&cfg);
    let c = client();
    fire_the_alert(&c, &gw).await;
    let status = tokio::task::block_in_place(|| gw.signal_and_wait("TERM")).expect("exits within 5 s");
    assert_eq!(status.code(), Some(0), "no charge is lost: {}", gw.logs());
    assert!(got.lock().expect("lock").is_empty());
    assert!(gw.logs().contains("alerts=1") && gw.logs().contains("not delivered to the webhook"), "{}", gw.logs());
}

/// A 4xx (other than 408/429) says the request itself is wrong: tried once, logged as an error
/// with its status, not retried 6 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_the_webhook_refuses_with_a_4xx_is_tried_once_and_logged() {
    let up = Upstream::start().await;
    let (url, got, calls) = webhook_failing_with(u64::MAX, StatusCode::BAD_REQUEST).await;
    let billing = format!("[billing]\nlow_balance_ratio = \"0.2\"\nalert_webhook = \"{url}\"\n");
    let cfg = config(&up.url(), "", &billing, &tenants());
    let gw = Gateway::start(&cfg);
    let c = client();
    fire_the_alert(&c, &gw).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.logs().contains("webhook refused the alert") {
        assert!(Instant::now() < deadline, "no refusal logged: {}", gw.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Past the first retry's backoff (200 ms): still the one call.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1, "{}", gw.logs());
    assert!(got.lock().expect("lock").is_empty());
    let logs = gw.logs();
    let line = logs.lines().find(|l| l.contains("webhook refused the alert")).unwrap_or_default();
    assert!(line.contains("ERROR") && line.contains("status=400") && line.contains("package=od-1"), "{line}");
    assert_eq!(logs.matches("webhook refused the alert").count(), 1, "{logs}");
    assert!(!logs.contains("retrying"), "{logs}");
}

/// od-1 (1 point, 0.2 a call) down to 0.2: its low-balance alert fires (the metric says so).
async fn fire_the_alert(c: &TestClient, gw: &Gateway) {
    for _ in 0..4 {
        assert_eq!(post(c, &gw.url("/v1/detect/objects"), &[ACME], b"{}").await.status, StatusCode::OK);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw
        .metrics(c)
        .await
        .contains("turnstile_package_low_balance_alerts_total{package=\"od-1\",tenant=\"acme\"} 1")
    {
        assert!(Instant::now() < deadline, "the alert did not fire: {}", gw.metrics(c).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Floods payg calls from 8 tasks until `stop`; returns the 2xx completion times.
async fn flood(gw_url: String, stop: Arc<AtomicBool>) -> Vec<Instant> {
    let c = client();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url, stop) = (c.clone(), gw_url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::post(&url)
                    .header("x-api-key", "key-acme")
                    .body(Full::new(Bytes::new()))
                    .expect("req");
                match tokio::time::timeout(Duration::from_secs(5), c.request(req)).await {
                    Ok(Ok(r)) if r.status() == StatusCode::OK => ok.push(Instant::now()),
                    Ok(Ok(_)) => {}
                    _ => break, // the gateway is gone
                }
            }
            ok
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    all
}

async fn crash_and_count(durability: &str, flush_ms: u64) -> (usize, u64, usize) {
    let up = Upstream::start().await;
    let cfg =
        config(&up.url(), &format!("durability = \"{durability}\"\nflush_interval_ms = {flush_ms}"), "", &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(flood(gw.url("/v1/ocr/license-plate"), stop.clone()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    let _ = std::process::Command::new("kill").args(["-KILL", &gw.pid().to_string()]).status();
    stop.store(true, Ordering::SeqCst);
    let seen = load.await.expect("load");
    drop(gw);
    let window = Duration::from_millis(flush_ms + 100);
    let recent = seen.iter().filter(|t| **t + window >= killed_at).count();

    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    let u = usage(&c, &gw).await;
    let units: u64 =
        u["features"]["license-plate-recognition"]["units"]["payg"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
    (seen.len(), units, recent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_strict_mode_loses_no_charge_a_client_saw() {
    let (seen, recorded, _) = crash_and_count("strict", 5).await;
    assert!(seen > 100, "the load ran ({seen} ok)");
    assert!(recorded >= seen as u64, "strict: every 2xx is on disk: saw {seen}, ledger has {recorded}");
    assert!(
        recorded <= seen as u64 + 8,
        "at most the in-flight calls are charged unseen: saw {seen}, ledger has {recorded}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_in_batched_mode_loses_at_most_the_flush_window() {
    let (seen, recorded, recent) = crash_and_count("batched", 50).await;
    assert!(seen > 100, "the load ran ({seen} ok)");
    assert!(
        recorded + recent as u64 >= seen as u64,
        "lost {} > the {recent} calls answered within the last flush window",
        seen as u64 - recorded
    );
    assert!(recorded <= seen as u64 + 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_everything_in_batched_mode() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "durability = \"batched\"\nflush_interval_ms = 60000", "", &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    for _ in 0..25 {
        assert_eq!(post(&c, &gw.url("/v1/ocr/license-plate"), &[ACME], b"{}").await.status, StatusCode::OK);
    }
    let status = gw.stop("TERM").await;
    assert!(status.is_some_and(|s| s.success()));
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let u = usage(&c, &gw).await;
    assert_eq!(
        u["features"]["license-plate-recognition"]["units"]["payg"], "25",
        "a 60 s flush window, yet nothing lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_cuts_off_nothing_and_loses_no_charge() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "durability = \"batched\"\nflush_interval_ms = 1000", "", &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let stop = Arc::new(AtomicBool::new(false));
    let load = tokio::spawn(flood(gw.url("/v1/ocr/license-plate?sleep_ms=5"), stop.clone()));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let status = gw.stop("TERM").await;
    stop.store(true, Ordering::SeqCst);
    let seen = load.await.expect("load").len() as u64;
    assert!(status.is_some_and(|s| s.success()), "exit 0");
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let u = usage(&client(), &gw).await;
    let charged: u64 =
        u["features"]["license-plate-recognition"]["units"]["payg"].as_str().and_then(|s| s.parse().ok()).unwrap_or(0);
    assert!(seen > 50, "the load ran ({seen})");
    // Every charge was answered (nothing cut off after settling) and every answer was charged.
    assert_eq!(charged, seen);
}

#[test]
fn unwritable_or_corrupt_ledger_refuses_to_start_naming_the_path() {
    let blocker = tempfile::NamedTempFile::new().expect("tmp");
    let dir = blocker.path().join("ledger");
    let cfg = config("http://127.0.0.1:1", &format!("dir = \"{}\"", dir.display()), "", &tenants());
    let out = std::process::Command::new(BIN).arg("serve").arg("--config").arg(cfg.main()).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&dir.display().to_string()), "{err}");

    let cfg = config("http://127.0.0.1:1", "", "", &tenants());
    let ledger = cfg.path().join("data/ledger");
    std::fs::create_dir_all(&ledger).expect("mkdir");
    std::fs::write(ledger.join("ledger.redb"), vec![0x5a; 16384]).expect("write");
    let out = std::process::Command::new(BIN).arg("serve").arg("--config").arg(cfg.main()).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ledger.redb"), "{err}");
    assert!(err.contains("balances are never reset"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bad_or_unpriced_video_report_does_not_hide_the_priced_amount() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "", "", &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    for q in [
        "?video_ms=140000&video_fps=60&video_lines=1080", // the seed's 37.33
        "?video_ms=abc&video_fps=60&video_lines=1080",    // malformed: 0 minutes
        "",                                               // missing: 0 minutes
        "?video_ms=60000&video_fps=240&video_lines=1080", // outside the matrix: metered, no price
    ] {
        let r = post(&c, &gw.url(&format!("/v1/video/enhance{q}")), &[ACME], b"{}").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    let u = usage(&c, &gw).await;
    let video = &u["features"]["comprehensive-video-enhancement"];
    assert_eq!(video["payg"]["amount"], "37.33", "{video}");
    assert_eq!(u["total"], "37.33");
    let lines = video["payg"]["lines"].as_array().expect("lines");
    assert_eq!(lines.len(), 2, "one priced and one unpriced line: {video}");
    let unpriced = lines.iter().find(|l| l["cell"] == "unpriced").expect("unpriced line");
    assert_eq!(unpriced["minutes"], "1");
    assert_eq!(unpriced["amount"], serde_json::Value::Null);
    assert_eq!(unpriced["note"], "no price configured");
    assert!(video["payg"]["note"].as_str().is_some_and(|n| n.contains("1 minutes")), "{video}");
    assert_eq!(video["unpaid"], "0");
}

/// SPEC §1: amounts are "rounded half-up to 2 decimals only when shown or totalled per line;
/// intermediate sums are exact". 350 ms at 6.00 a minute is exactly 0.035, shown 0.04; dividing
/// the milliseconds into minutes first (0.00583333…, cut at 28 digits) and then multiplying lands
/// just below the half and showed 0.03.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_video_line_is_rounded_half_up_from_its_exact_amount() {
    let up = Upstream::start().await;
    let cheap = r#"{ max_fps = 30, max_lines = 720, price = "4.00" }"#;
    assert!(SHIPPED_CATALOG.contains(cheap), "the shipped catalog's first video cell");
    let catalog = SHIPPED_CATALOG.replace(cheap, r#"{ max_fps = 30, max_lines = 720, price = "6.00" }"#);
    let rest = format!("[admission]\ndefault_qps = 100000\n{}", routes());
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", &rest), &catalog, &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    let r = post(&c, &gw.url("/v1/video/enhance?video_ms=350&video_fps=30&video_lines=720"), &[ACME], b"{}").await;
    assert_eq!(r.status, StatusCode::OK);
    let u = usage(&c, &gw).await;
    let video = &u["features"]["comprehensive-video-enhancement"];
    assert_eq!(video["payg"]["lines"][0]["amount"], "0.04", "{video}");
    assert_eq!(video["payg"]["amount"], "0.04", "{video}");
    assert_eq!(u["total"], "0.04");
}

/// `turnstile serve` with stderr on a pipe: a file-size limit put on the process then hits the
/// ledger's writes only, not its log.
struct PipedGateway {
    child: std::process::Child,
    admin: std::net::SocketAddr,
    tenant: std::net::SocketAddr,
    log: Arc<std::sync::Mutex<String>>,
}

impl PipedGateway {
    fn start(cfg: &ConfigDir) -> PipedGateway {
        use std::io::{BufRead, BufReader};
        use std::process::{Command, Stdio};
        let mut child = Command::new(BIN)
            .args(["serve", "--config", cfg.main().to_str().expect("utf-8")])
            .env("TURNSTILE_ADMIN_TOKEN", TOKEN)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().expect("stderr"), log.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut banner = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut banner).expect("banner");
        let addr = |key: &str| -> std::net::SocketAddr {
            let at = banner.find(&format!("{key}=http://")).expect("address") + key.len() + 8;
            banner[at..].split_whitespace().next().expect("address").parse().expect("address")
        };
        PipedGateway { tenant: addr("tenant"), admin: addr("admin"), child, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.tenant)
    }

    fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (at most 5 s) until the log holds `needle`: it reaches the test through a pipe and
    /// a reader thread, a moment after the gateway wrote it.
    fn wait_for_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.log().contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in the log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sets the process's file-size limit (soft; the hard limit stays unlimited).
    fn limit_file_size(&self, soft: &str) {
        let pid = self.child.id().to_string();
        let status = std::process::Command::new("prlimit")
            .args(["--pid", &pid, &format!("--fsize={soft}:unlimited")])
            .status()
            .expect("prlimit");
        assert!(status.success(), "prlimit failed");
    }
}

impl Drop for PipedGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn status_of(c: &TestClient, url: &str) -> StatusCode {
    get(c, url, &[]).await.status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_ledger_writes_make_it_unready_refuse_strict_charges_then_recover_losing_nothing() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "durability = \"strict\"\nstrict_timeout_ms = 1000", "", &tenants());
    let mut gw = PipedGateway::start(&cfg);
    let c = client();
    let lp = gw.url("/v1/ocr/license-plate");
    assert_eq!(post(&c, &lp, &[ACME], b"{}").await.status, StatusCode::OK);
    assert_eq!(status_of(&c, &gw.admin_url("/readyz")).await, StatusCode::OK);

    // Every write past byte 1 of any file now fails (EFBIG), like a full disk.
    gw.limit_file_size("1");
    for _ in 0..2 {
        let r = post(&c, &lp, &[ACME], b"{}").await;
        assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.error_code(), "ledger_unavailable");
    }
    assert_eq!(status_of(&c, &gw.admin_url("/readyz")).await, StatusCode::SERVICE_UNAVAILABLE);
    let text = String::from_utf8_lossy(&get(&c, &gw.admin_url("/metrics"), &[]).await.body).into_owned();
    let errors: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("turnstile_ledger_errors_total "))
        .and_then(|v| v.parse().ok())
        .expect("ledger error counter");
    assert!(errors >= 2, "{errors}");
    gw.wait_for_log("ledger commit failed");
    assert_eq!(gw.log().matches("ledger commit failed").count(), 1, "one error line per spell:\n{}", gw.log());

    // Writable again: ready again, charges succeed.
    gw.limit_file_size("unlimited");
    let deadline = Instant::now() + Duration::from_secs(3);
    while status_of(&c, &gw.admin_url("/readyz")).await != StatusCode::OK {
        assert!(Instant::now() < deadline, "not ready again after recovery:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.wait_for_log("ledger commits succeed again");
    assert_eq!(post(&c, &lp, &[ACME], b"{}").await.status, StatusCode::OK);

    // Failing again at SIGTERM: exit status 1 and a line naming what was not flushed.
    gw.limit_file_size("1");
    assert_eq!(post(&c, &lp, &[ACME], b"{}").await.status, StatusCode::SERVICE_UNAVAILABLE);
    let _ = std::process::Command::new("kill").args(["-TERM", &gw.child.id().to_string()]).status();
    let (status, gw) = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(8);
        while Instant::now() < deadline {
            if let Ok(Some(s)) = gw.child.try_wait() {
                return (Some(s), gw);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        (None, gw)
    })
    .await
    .expect("join");
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", gw.log());
    gw.wait_for_log("could not be flushed");
    drop(gw);

    // Two calls were answered 2xx; the three refused ones were not charged.
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let u = usage(&c, &gw).await;
    assert_eq!(u["features"]["license-plate-recognition"]["units"]["payg"], "2", "{u}");
}

/// A tenant whose two packages a burst spends: `od-b` (6 points: 30 object-detection calls at
/// 0.2) and `vid-b` (3 points: 3 video minutes); both features fall through to payg.
fn burst_tenant() -> String {
    format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{acme}"], "services": ["object_detection", "video_production"],
    "packages": [
      {{"id": "od-b", "feature": "object-detection", "points": "6", "ordered_at": "{from}", "expires_at": "{until}"}},
      {{"id": "vid-b", "scope": "video-duration", "points": "3", "ordered_at": "{from}", "expires_at": "{until}"}}
    ]}}
}}}}"#,
        acme = key_hash("key-acme"),
        from = at(-3600),
        until = at(86400 * 30),
    )
}

/// Sends a call on a connection of its own and leaves before the answer (the upstream takes
/// 300 ms): the upstream still serves it.
async fn call_and_leave(gw: &Gateway, path: &str) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let req = format!("POST {path} HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\ncontent-length: 2\r\n\r\n{{}}");
    s.write_all(req.as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The figures a burst is checked on: (object detection by the package, at payg; video minutes
/// by the package, at payg; remaining of od-b, of vid-b), from the usage report.
async fn burst_figures(c: &TestClient, gw: &Gateway) -> [String; 6] {
    let u = usage(c, gw).await;
    let (od, vid) =
        (&u["features"]["object-detection"]["units"], &u["features"]["comprehensive-video-enhancement"]["units"]);
    let remaining = |id: &str| {
        u["packages"].as_array().and_then(|p| p.iter().find(|p| p["id"] == id)).map(|p| p["remaining"].to_string())
    };
    [
        od["single_package"].to_string(),
        od["payg"].to_string(),
        vid["general_package"].to_string(),
        vid["payg"].to_string(),
        remaining("od-b").unwrap_or_default(),
        remaining("vid-b").unwrap_or_default(),
    ]
}

fn decimal(v: &str) -> rust_decimal::Decimal {
    v.trim_matches('"').parse().unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// SPEC §4 and §6 end to end ("units == upstream-served successes, each charge exactly once"):
/// 128 calls at once, object detection and video, that the upstream answers 2xx, or fails
/// (500: not charged), or serves after its client left (charged); both packages run dry on
/// the way and payg takes the rest. The usage report (§9) counts exactly what the upstream
/// served, the packages paid no more than they held, `/metrics` (§10) says the same, and so
/// does the ledger after a restart. In batched and in strict mode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_burst_is_charged_exactly_what_the_upstream_served() {
    use rust_decimal::Decimal;
    for durability in ["batched", "strict"] {
        let up = Upstream::start().await;
        let cfg = config(&up.url(), &format!("durability = \"{durability}\""), "", &burst_tenant());
        let gw = Arc::new(Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]));
        let c = client();
        // (object-detection calls served, video ms served)
        let served = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for k in 0..32u64 {
            let (c, gw, served) = (c.clone(), gw.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..4u64 {
                    let ms = 6_000 * (1 + (k + i) % 5);
                    let video = format!("/v1/video/enhance?video_ms={ms}&video_fps=60&video_lines=1080");
                    match (k * 4 + i) % 8 {
                        v @ 0..=2 => {
                            let r =
                                post(&c, &gw.url(&format!("/v1/detect/objects?sleep_ms={}", v * 5)), &[ACME], b"{}")
                                    .await;
                            assert_eq!(r.status, StatusCode::OK);
                            served.0.fetch_add(1, Ordering::SeqCst);
                        }
                        3 => {
                            let r = post(&c, &gw.url("/v1/detect/objects?status=500"), &[ACME], b"{}").await;
                            assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
                        }
                        4 => {
                            call_and_leave(&gw, "/v1/detect/objects?sleep_ms=300").await;
                            served.0.fetch_add(1, Ordering::SeqCst);
                        }
                        5 => {
                            assert_eq!(post(&c, &gw.url(&video), &[ACME], b"{}").await.status, StatusCode::OK);
                            served.1.fetch_add(ms, Ordering::SeqCst);
                        }
                        6 => {
                            let r = post(&c, &gw.url(&format!("{video}&status=500")), &[ACME], b"{}").await;
                            assert_eq!(r.status, StatusCode::INTERNAL_SERVER_ERROR);
                        }
                        _ => {
                            call_and_leave(&gw, &format!("{video}&sleep_ms=300")).await;
                            served.1.fetch_add(ms, Ordering::SeqCst);
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let (calls, minutes) = (
            Decimal::from(served.0.load(Ordering::SeqCst)),
            Decimal::from(served.1.load(Ordering::SeqCst)) / Decimal::from(60_000),
        );
        // The calls whose clients left are settled when the upstream answers them.
        let deadline = Instant::now() + Duration::from_secs(10);
        let figures = loop {
            let f = burst_figures(&c, &gw).await;
            if decimal(&f[0]) + decimal(&f[1]) == calls && decimal(&f[2]) + decimal(&f[3]) == minutes {
                break f;
            }
            assert!(Instant::now() < deadline, "{durability}: served {calls} calls, {minutes} min; report: {f:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        // Both packages paid what they held, no more: od-b 0.2 a call, vid-b a point a minute.
        let (od_paid, vid_paid) = (decimal(&figures[0]), decimal(&figures[2]));
        assert_eq!(decimal(&figures[4]), Decimal::from(6) - od_paid * Decimal::new(2, 1), "{durability}: {figures:?}");
        assert_eq!(decimal(&figures[5]), Decimal::from(3) - vid_paid, "{durability}: {figures:?}");
        assert!(od_paid * Decimal::new(2, 1) <= Decimal::from(6) && vid_paid <= Decimal::from(3), "{figures:?}");
        assert!(
            decimal(&figures[1]) > Decimal::ZERO && decimal(&figures[3]) > Decimal::ZERO,
            "both ran dry: {figures:?}"
        );
        // Charged once: nothing more comes.
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(burst_figures(&c, &gw).await, figures, "{durability}: charged again");
        // The metrics agree with the report.
        let text = gw.metrics(&c).await;
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("{durability}: no {series} in\n{text}"))
        };
        let f64_of = |v: &str| decimal(v).to_string().parse::<f64>().expect("a number");
        for (series, want) in [
            (
                r#"turnstile_billed_units_total{feature="object-detection",payer="single_package",tenant="acme"}"#,
                &figures[0],
            ),
            (r#"turnstile_billed_units_total{feature="object-detection",payer="payg",tenant="acme"}"#, &figures[1]),
            (
                r#"turnstile_billed_units_total{feature="comprehensive-video-enhancement",payer="general_package",tenant="acme"}"#,
                &figures[2],
            ),
            (
                r#"turnstile_billed_units_total{feature="comprehensive-video-enhancement",payer="payg",tenant="acme"}"#,
                &figures[3],
            ),
            (r#"turnstile_package_remaining_points{package="od-b",tenant="acme"}"#, &figures[4]),
            (r#"turnstile_package_remaining_points{package="vid-b",tenant="acme"}"#, &figures[5]),
        ] {
            assert!((value(series) - f64_of(want)).abs() < 1e-9, "{durability}: {series} {} != {want}", value(series));
        }
        // And the ledger, after a restart.
        let gw = Arc::into_inner(gw).expect("the tasks are done");
        assert!(gw.stop("TERM").await.is_some_and(|s| s.success()), "{durability}: exit 0");
        let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
        assert_eq!(burst_figures(&c, &gw).await, figures, "{durability}: after a restart");
    }
}

/// SPEC §7 ("SIGTERM drains in-flight requests and flushes, losing nothing") and §4 (units ==
/// upstream-served successes): an HTTP/2 call whose client reset its stream goes on upstream
/// on a task of its own, and is charged when the upstream answers 2xx. A SIGTERM in between
/// must wait for it as for any call in flight: the gateway exited at once, and the call the
/// upstream served was never charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_waits_for_a_call_whose_http2_client_left_and_charges_it() {
    let up = Upstream::start().await;
    let cfg = config(&up.url(), "durability = \"batched\"\nflush_interval_ms = 60000", "", &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let h2: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).http2_only(true).build_http();
    let req = http::Request::post(gw.url("/v1/ocr/license-plate?sleep_ms=600"))
        .header("x-api-key", "key-acme")
        .body(Full::new(Bytes::from_static(b"{}")))
        .expect("request");
    let sent = Instant::now();
    // The client gives up (its stream is reset) while the upstream works on the call.
    assert!(tokio::time::timeout(Duration::from_millis(150), h2.request(req)).await.is_err());
    drop(h2);
    let status = gw.stop("TERM").await;
    assert!(status.is_some_and(|s| s.success()), "exit 0: {status:?}");
    assert!(sent.elapsed() >= Duration::from_millis(600), "exited before the upstream answered");
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let u = usage(&client(), &gw).await;
    assert_eq!(u["features"]["license-plate-recognition"]["units"]["payg"], "1", "{}", u["features"]);
}

/// SPEC §7 ("SIGTERM drains in-flight requests and flushes, losing nothing") over HTTP/2, as an
/// Envoy or a gRPC client multiplexes: several streams of one connection in flight at SIGTERM
/// are each answered with their upstream's answer and charged once, durably (a 60 s flush
/// window: only the flush at exit puts them in the ledger). A stream opened on that connection
/// during the grace is served; one opened after it meets the GOAWAY and is never forwarded
/// (the client retries on a new connection, which the closed listener refuses): no 2xx that is
/// not charged, no charge without a 2xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_in_flight_at_sigterm_are_answered_and_charged_once() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let up = Upstream::start().await;
    let rest = format!(
        "[admission]\ndefault_qps = 100000\n\n[ledger]\ndurability = \"batched\"\nflush_interval_ms = 60000\n{}",
        routes()
    );
    let cfg = ConfigDir::new(&main_toml(&up.url(), "shutdown_grace_ms = 500", &rest), SHIPPED_CATALOG, &tenants());
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
    let (send, conn) =
        hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("HTTP/2 handshake");
    let connection = tokio::spawn(conn);
    let call = |sleep_ms: u64, n: usize| {
        let mut send = send.clone();
        let req = http::Request::post(format!("http://{}/v1/ocr/license-plate?sleep_ms={sleep_ms}", gw.addr))
            .header("x-api-key", "key-acme")
            .header("x-stream", n)
            .body(Full::new(Bytes::from_static(b"{}")))
            .expect("request");
        async move {
            send.ready().await?;
            let resp = send.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>((status, body))
        }
    };
    // Four streams the upstream answers 1.2 s after they came: the answers come after the
    // grace (500 ms), during the drain.
    let inflight: Vec<_> = (0..4).map(|n| tokio::spawn(call(1200, n))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    let status = std::process::Command::new("kill").args(["-TERM", &gw.pid().to_string()]).status().expect("kill");
    assert!(status.success());
    // A new stream on the same connection during the grace: served (nothing is refused while
    // endpoints may still point here).
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (during, body) = call(0, 10).await.expect("a stream opened during the grace is served");
    assert_eq!(during, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    // Past the grace, while the four are still in flight: the connection got GOAWAY, so a new
    // stream on it is refused before it is sent, and a new connection is refused.
    tokio::time::sleep((signalled + Duration::from_millis(900)).saturating_duration_since(Instant::now())).await;
    let after = call(0, 11).await;
    assert!(after.is_err(), "a stream opened after the GOAWAY: {after:?}");
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err(), "the tenant listener no longer accepts");
    let mut ok = 1;
    for (n, t) in inflight.into_iter().enumerate() {
        let (status, body) = t.await.expect("join").unwrap_or_else(|e| panic!("stream {n} in flight: {e}"));
        assert_eq!(status, StatusCode::OK, "stream {n}: {}", String::from_utf8_lossy(&body));
        let echo: serde_json::Value = serde_json::from_slice(&body).expect("the upstream's answer");
        assert_eq!(echo["headers"]["x-stream"], n.to_string(), "stream {n}: its own answer");
        ok += 1;
    }
    assert!(signalled.elapsed() >= Duration::from_millis(1000), "the four were answered during the drain");
    let _ = tokio::time::timeout(Duration::from_secs(2), connection).await;
    let mut gw = gw;
    let exit = tokio::task::spawn_blocking(move || (gw.wait_exit(Duration::from_secs(5)), gw)).await.expect("join");
    assert!(exit.0.is_some_and(|s| s.success()), "exit 0: {:?}\n{}", exit.0, exit.1.logs());
    drop(exit);
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let u = usage(&client(), &gw).await;
    assert_eq!(
        u["features"]["license-plate-recognition"]["units"]["payg"],
        ok.to_string(),
        "every 2xx charged once: {}",
        u["features"]
    );
}
