//! Black-box tests of the live control plane (SPEC §8): reloads, temporary upgrades, upgrades.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

const TOKEN: &str = "reload-token";
const AUTH: (&str, &str) = ("authorization", "Bearer reload-token");
const ACME: (&str, &str) = ("x-api-key", "key-acme");
const GLOBEX: (&str, &str) = ("x-api-key", "key-globex");

async fn start(watch: bool, extra: &str) -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let main = main_toml(&up.url(), "", extra).replace("watch = false", &format!("watch = {watch}"));
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    (up, cfg, gw)
}

async fn quota(c: &TestClient, gw: &Gateway) -> String {
    let r = post(c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    r.header("ratelimit-policy").unwrap_or_default().to_string()
}

/// Replaces a file the way editors do: write a temporary file, rename it over the old one.
fn replace_file(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("swp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

async fn admin_post(c: &TestClient, gw: &Gateway, path: &str, body: &str) -> Reply {
    post(c, &gw.admin_url(path), &[AUTH, ("content-type", "application/json")], body.as_bytes()).await
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_upgrade_applies_at_once_and_reverts_by_itself() {
    let (_up, cfg, gw) = start(true, "").await;
    let c = client();
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1");
    let until = at(3);
    let r = admin_post(
        &c,
        &gw,
        "/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/temporary-upgrade",
        &format!(r#"{{"qps": 50, "until": "{until}"}}"#),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=50;w=1", "live at once");
    let file = std::fs::read_to_string(cfg.path().join("entitlements.json")).expect("read");
    assert!(file.contains("temporary_upgrades") && file.contains(&until), "written back: {file}");
    let limits = get(&c, &gw.admin_url("/admin/v1/tenants/acme/limits"), &[AUTH]).await.json();
    assert_eq!(limits["features"]["face-comparison-1-1"]["source"], "temporary_upgrade");

    let m = gw.metrics(&c).await;
    let generation = metric(&m, "turnstile_config_generation ");
    // After `until` the plan's 40 QPS is back, with no reload.
    let deadline = Instant::now() + Duration::from_secs(8);
    while quota(&c, &gw).await != "\"qps\";q=40;w=1" {
        assert!(Instant::now() < deadline, "the upgrade did not revert");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let m = gw.metrics(&c).await;
    assert_eq!(
        metric(&m, "turnstile_config_generation "),
        generation,
        "reverting needed no reload (and the watcher ignored our own write)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_write_rules() {
    let (_up, cfg, gw) = start(false, "").await;
    let c = client();
    let tu = "/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/temporary-upgrade";
    let r = admin_post(&c, &gw, tu, &format!(r#"{{"qps": 60, "until": "{}"}}"#, at(600))).await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "qps_above_cap"));
    let r = admin_post(&c, &gw, tu, &format!(r#"{{"qps": 45, "until": "{}"}}"#, at(-5))).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "until must be in the future");
    let r = admin_post(
        &c,
        &gw,
        "/admin/v1/tenants/globex/qps-plans/license-plate-recognition/temporary-upgrade",
        &format!(r#"{{"qps": 10, "until": "{}"}}"#, at(600)),
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND, "no active plan");
    let r = admin_post(&c, &gw, tu, "{not json").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    // Over the 64 KiB an admin body may have: 413, as on the tenant listener, not a 400.
    let r = admin_post(&c, &gw, tu, &format!(r#"{{"qps": 45, "until": "{}"}}"#, " ".repeat(70_000))).await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"));

    let up = "/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/upgrade";
    let r = admin_post(&c, &gw, up, r#"{"qps": 30}"#).await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::CONFLICT, "downgrade_not_allowed"));
    let r = admin_post(&c, &gw, up, r#"{"qps": 51}"#).await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "qps_above_cap"));
    let r = admin_post(&c, &gw, up, r#"{"qps": 45}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=45;w=1");
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.path().join("entitlements.json")).expect("read"))
            .expect("json");
    assert_eq!(file["tenants"]["acme"]["qps_plans"][0]["qps"], 45);
    let r = get(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[("authorization", "Bearer wrong")], b"").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_admin_writes_are_serialized_and_none_is_lost() {
    let (_up, cfg, gw) = start(true, "").await;
    let c = client();
    let url = gw.admin_url("/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/temporary-upgrade");
    let mut tasks = Vec::new();
    for i in 0..10u32 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let body = format!(r#"{{"qps": {}, "until": "{}"}}"#, 41 + i, at(600 + i64::from(i)));
            post(&c, &url, &[AUTH], body.as_bytes()).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("join"), StatusCode::OK);
    }
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cfg.path().join("entitlements.json")).expect("read"))
            .expect("json");
    let ups = file["tenants"]["acme"]["qps_plans"][0]["temporary_upgrades"].as_array().cloned().unwrap_or_default();
    assert_eq!(ups.len(), 10, "{ups:?}");
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=50;w=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_is_rejected_with_every_error_and_the_old_config_serves() {
    let (_up, cfg, gw) = start(false, "").await;
    let c = client();
    let bad = entitlements(40, None)
        .replace("\"qps\": 40", "\"qps\": 70")
        .replace("\"services\": [\"text_recognition\"]", "\"services\": [\"nope\"]");
    replace_file(&cfg.path().join("entitlements.json"), &bad);
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config"));
    let errors = r.json()["error"]["errors"].as_array().cloned().unwrap_or_default();
    let paths: Vec<String> = errors.iter().map(|e| e["path"].as_str().unwrap_or_default().to_string()).collect();
    assert!(paths.contains(&"tenants.acme.qps_plans[0].qps".to_string()), "{errors:?}");
    assert!(paths.contains(&"tenants.globex.services[0]".to_string()), "{errors:?}");
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1", "the old limits keep being served");
    let m = gw.metrics(&c).await;
    assert_eq!(metric(&m, "turnstile_config_reloads_total{result=\"error\"} "), 1.0);
    assert!(gw.logs().contains("configuration rejected"));

    replace_file(&cfg.path().join("entitlements.json"), &entitlements(35, None));
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["generation"], 2);
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=35;w=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_edit_is_live_within_2_seconds() {
    let (_up, cfg, gw) = start(true, "").await;
    let c = client();
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1");
    let edited = Instant::now();
    replace_file(&cfg.path().join("entitlements.json"), &entitlements(30, None));
    loop {
        if quota(&c, &gw).await == "\"qps\";q=30;w=1" {
            break;
        }
        assert!(edited.elapsed() < Duration::from_secs(2), "not live within 2 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken edit is refused and the last good configuration stays.
    replace_file(&cfg.path().join("entitlements.json"), "{\"tenants\": ");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=30;w=1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_and_unchanged_buckets_keep_their_state() {
    let (_up, cfg, gw) = start(false, "").await;
    let c = client();
    // globex: license plates at the default 2 QPS. Drain the bucket.
    for _ in 0..2 {
        assert_eq!(post(&c, &gw.url("/v1/ocr/license-plate"), &[GLOBEX], b"{}").await.status, StatusCode::OK);
    }
    replace_file(&cfg.path().join("entitlements.json"), &entitlements(25, None));
    let _ = std::process::Command::new("kill").args(["-HUP", &gw.pid().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(5);
    while quota(&c, &gw).await != "\"qps\";q=25;w=1" {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = post(&c, &gw.url("/v1/ocr/license-plate"), &[GLOBEX], b"{}").await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "globex's bucket kept its (empty) state across the reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_across_20_reloads_has_zero_failed_requests() {
    let (_up, _cfg, gw) = start(false, "[admission]\ndefault_qps = 100000\n").await;
    let c = client();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..6 {
        let (c, url, stop, ok, failed) =
            (c.clone(), gw.url("/v1/ocr/license-plate"), stop.clone(), ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                let status = post(&c, &url, &[GLOBEX], b"{}").await.status;
                if status == StatusCode::OK { &ok } else { &failed }.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for i in 0..20 {
        let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["generation"], i + 2);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.expect("join");
    }
    assert!(ok.load(Ordering::SeqCst) > 200, "the load ran");
    assert_eq!(failed.load(Ordering::SeqCst), 0);
}

fn package(id: &str, points: &str) -> String {
    format!(
        r#"{{"id": "{id}", "feature": "object-detection", "points": "{points}", "ordered_at": "{}", "expires_at": "{}"}}"#,
        at(-3600),
        at(86400)
    )
}

/// The standard tenants, with `packages` given to globex.
fn with_packages(packages: &[String]) -> String {
    entitlements(40, None).replace(
        r#""services": ["text_recognition"]"#,
        &format!(r#""services": ["text_recognition", "object_detection"], "packages": [{}]"#, packages.join(", ")),
    )
}

fn package_series(m: &str, id: &str) -> Option<f64> {
    m.lines()
        .filter(|l| l.starts_with("turnstile_package_remaining_points{"))
        .find(|l| l.contains(&format!("package=\"{id}\"")) && l.contains("tenant=\"globex\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_configured_package_has_its_remaining_points_series_from_load() {
    let up = Upstream::start().await;
    let cfg =
        ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &with_packages(&[package("od-1", "5000.5")]));
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    let m = gw.metrics(&c).await;
    assert_eq!(package_series(&m, "od-1"), Some(5000.5), "before any call:\n{m}");

    let ents = cfg.path().join("entitlements.json");
    replace_file(&ents, &with_packages(&[package("od-1", "5000.5"), package("od-2", "300")]));
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK);
    let m = gw.metrics(&c).await;
    assert_eq!(package_series(&m, "od-2"), Some(300.0), "a package added by a reload:\n{m}");
    assert_eq!(package_series(&m, "od-1"), Some(5000.5));

    replace_file(&ents, &with_packages(&[package("od-2", "300")]));
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK);
    let m = gw.metrics(&c).await;
    assert_eq!(package_series(&m, "od-1"), None, "a package removed by a reload has no series:\n{m}");
    assert_eq!(package_series(&m, "od-2"), Some(300.0));
}

/// A reload whose file holds a decimal with more digits than a Decimal keeps exactly is rejected
/// like any invalid file (file and field named, the old configuration kept), not rounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_with_a_decimal_that_would_be_rounded_is_rejected() {
    let up = Upstream::start().await;
    let cfg =
        ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &with_packages(&[package("od-1", "5000.5")]));
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    let ents = cfg.path().join("entitlements.json");
    replace_file(&ents, &with_packages(&[package("od-1", "5000.5000000000000000000000000001")]));
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::UNPROCESSABLE_ENTITY, "invalid_config"));
    let errors = r.json()["error"]["errors"].as_array().cloned().unwrap_or_default();
    let points = errors.iter().find(|e| e["path"] == "tenants.globex.packages[0].points");
    let message = points.and_then(|e| e["message"].as_str()).unwrap_or_default();
    assert!(message.contains("more digits than"), "{errors:?}");
    assert!(points.and_then(|e| e["file"].as_str()).is_some_and(|f| f.ends_with("entitlements.json")), "{errors:?}");
    let m = gw.metrics(&c).await;
    assert_eq!(metric(&m, "turnstile_config_reloads_total{result=\"error\"} "), 1.0);
    assert_eq!(package_series(&m, "od-1"), Some(5000.5), "the old configuration serves:\n{m}");

    // Trailing zeros past 28 places are the same number: accepted.
    replace_file(&ents, &with_packages(&[package("od-1", "5000.50000000000000000000000000000000")]));
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
}

const UPGRADE: &str = "/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/upgrade";
const TEMPORARY: &str = "/admin/v1/tenants/acme/qps-plans/face-comparison-1-1/temporary-upgrade";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_edit_inside_the_watch_debounce_survives_an_upgrade() {
    let (_up, cfg, gw) = start(true, "").await;
    let c = client();
    let ents = cfg.path().join("entitlements.json");
    // The operator gives globex a package; the upgrade call comes before the watcher's debounce ends.
    let edited = with_packages(&[package("edit-1", "700")]);
    replace_file(&ents, &edited);
    let r = admin_post(&c, &gw, UPGRADE, r#"{"qps": 45}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let file = std::fs::read_to_string(&ents).expect("read");
    assert_eq!(file, edited.replace("\"qps\": 40", "\"qps\": 45"), "the edit is kept, only the qps changed");
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=45;w=1");
    let m = gw.metrics(&c).await;
    assert_eq!(package_series(&m, "edit-1"), Some(700.0), "the edit is served too:\n{m}");
    assert_eq!(std::fs::read_to_string(&ents).expect("read"), file);
}

/// An export as a billing system might write it: its own key order, compact spacing, escapes,
/// decimals with trailing zeros.
fn unusual_export() -> String {
    format!(
        concat!(
            r#"{{"tenants":{{"zeta":{{"services":["text_recognition"],"api_keys":["{z}"],"#,
            r#""packages":[{{"points":"5000.50","id":"z-1","feature":"object-detection","expires_at":"{until}","ordered_at":"{from}"}}]}},"#,
            "\n  \"acme\" : {{ \"services\" : [\"face_\\u0062ody\"], \"api_keys\":[\"{a}\"],\n",
            r#"    "qps_plans":[{{"qps":40,"feature":"face-comparison-1-1","expires_at":"{until}","effective_at":"{from}"}}]}}"#,
            "\n}}}}\n"
        ),
        z = key_hash("key-zeta"),
        a = key_hash("key-acme"),
        from = at(-3600),
        until = at(86400),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_changes_only_the_changed_field() {
    let up = Upstream::start().await;
    let export = unusual_export();
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &export);
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    let ents = cfg.path().join("entitlements.json");
    let r = admin_post(&c, &gw, UPGRADE, r#"{"qps": 45}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let upgraded = export.replace(r#""qps":40"#, r#""qps":45"#);
    assert_eq!(std::fs::read_to_string(&ents).expect("read"), upgraded, "byte-identical but for the qps");

    let until = at(600);
    let r = admin_post(&c, &gw, TEMPORARY, &format!(r#"{{"qps": 50, "until": "{until}"}}"#)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let file = std::fs::read_to_string(&ents).expect("read");
    let start = file.find(r#", "temporary_upgrades": ["#).expect("inserted");
    let end = start + file[start..].find(']').expect("closed") + 1;
    assert!(file[start..end].contains(&until) && file[start..end].contains("\"qps\":50"), "{file}");
    assert_eq!(format!("{}{}", &file[..start], &file[end..]), upgraded, "nothing else changed");
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=50;w=1");

    // A second upgrade goes into the same list.
    let r = admin_post(&c, &gw, TEMPORARY, &format!(r#"{{"qps": 48, "until": "{}"}}"#, at(900))).await;
    assert_eq!(r.status, StatusCode::OK);
    let file: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&ents).expect("read")).expect("json");
    assert_eq!(file["tenants"]["acme"]["qps_plans"][0]["temporary_upgrades"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_over_an_invalid_file_is_refused_and_writes_nothing() {
    let (_up, cfg, gw) = start(false, "").await;
    let c = client();
    let ents = cfg.path().join("entitlements.json");
    let broken = entitlements(40, None).replace("\"services\": [\"text_recognition\"]", "\"services\": [\"nope\"]");
    replace_file(&ents, &broken);
    let r = admin_post(&c, &gw, UPGRADE, r#"{"qps": 45}"#).await;
    assert_eq!((r.status, r.error_code().as_str()), (StatusCode::CONFLICT, "entitlements_invalid"));
    let message = r.json()["error"]["message"].as_str().unwrap_or_default().to_string();
    assert!(message.contains("entitlements.json") && message.contains("tenants.globex.services[0]"), "{message}");
    assert_eq!(std::fs::read_to_string(&ents).expect("read"), broken, "nothing was written");
    let r = admin_post(&c, &gw, TEMPORARY, &format!(r#"{{"qps": 50, "until": "{}"}}"#, at(600))).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(std::fs::read_to_string(&ents).expect("read"), broken);
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1", "the served configuration is unchanged");
}

/// The token from the environment is trimmed like the caller's (a Secret file ends in `\n`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_from_a_secret_file_with_a_trailing_newline_still_works() {
    // A token read from a file (Kubernetes Secret, `--env-file`) often ends in a newline; the
    // caller's `Bearer` token is trimmed, so without trimming the expected side no call can pass.
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", "reload-token\n")]);
    let c = client();
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
}

/// Moves `cfg`'s entitlements.json to `export/tenants.json` (the billing system's export, in a
/// folder of its own) and leaves a link to it in its place. Returns (the export, the link).
fn link_entitlements_to_an_export(cfg: &ConfigDir) -> (std::path::PathBuf, std::path::PathBuf) {
    let export_dir = cfg.path().join("export");
    std::fs::create_dir(&export_dir).expect("mkdir");
    let export = export_dir.join("tenants.json");
    let link = cfg.path().join("entitlements.json");
    std::fs::rename(&link, &export).expect("move");
    std::os::unix::fs::symlink(&export, &link).expect("symlink");
    (export, link)
}

/// The write-back replaces the file a link names, not the link (the billing export keeps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_keeps_a_symlinked_entitlements_file_a_symlink() {
    // entitlements.json is a link to the billing system's export; an upgrade must change the
    // export, not replace the link with a copy that later exports never reach.
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    let (export, link) = link_entitlements_to_an_export(&cfg);
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    let r = admin_post(&c, &gw, UPGRADE, r#"{"qps": 45}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        std::fs::symlink_metadata(&link).expect("stat").file_type().is_symlink(),
        "the link was replaced by a file"
    );
    let exported: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&export).expect("read")).expect("json");
    assert_eq!(exported["tenants"]["acme"]["qps_plans"][0]["qps"], 45, "the upgrade reached the export");
}

/// The write-back keeps the file's permissions, not the umask's default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_keeps_the_file_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (_up, cfg, gw) = start(false, "").await;
    let ents = cfg.path().join("entitlements.json");
    std::fs::set_permissions(&ents, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let c = client();
    let r = admin_post(&c, &gw, UPGRADE, r#"{"qps": 45}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let mode = std::fs::metadata(&ents).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the write-back changed the file's mode to {mode:o}");
}

/// `[ledger].strict_timeout_ms` and `[cluster]` are read at start: a reload says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_changing_strict_timeout_warns_that_it_needs_a_restart() {
    // README §Live changes: `[ledger]` takes effect at the next restart, and a reload that
    // changes it logs a warning. strict_timeout_ms is read once, when the ledger opens.
    let (_up, cfg, gw) = start(false, "[ledger]\nstrict_timeout_ms = 2000\n").await;
    let c = client();
    let main = std::fs::read_to_string(cfg.main()).expect("read");
    replace_file(&cfg.main(), &main.replace("strict_timeout_ms = 2000", "strict_timeout_ms = 250"));
    let r = post(&c, &gw.admin_url("/admin/v1/reload"), &[AUTH], b"").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = gw.logs();
    assert!(logs.contains("takes effect at the next restart"), "no restart warning:\n{logs}");
}

/// SPEC §8: "Reload happens ... on SIGHUP". A SIGHUP that arrives as soon as the gateway says it
/// listens (a supervisor's `ExecReload`, a ConfigMap reloader) must reload it, not kill it: the
/// signal's default action ends the process, so the handler has to be in place by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_the_listening_line_reloads_instead_of_killing() {
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    let c = client();
    for attempt in 0..5 {
        let (mut child, banner) = serve_raw(&cfg, &[]);
        let _ = std::process::Command::new("kill").args(["-HUP", &child.id().to_string()]).status();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let exited = child.try_wait().expect("try_wait");
        let admin = banner
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin=http://"))
            .map(|a| a.trim_end_matches('/').to_string());
        let generation = match (exited, admin) {
            (None, Some(admin)) => {
                let deadline = Instant::now() + Duration::from_secs(5);
                loop {
                    let m = try_get(&c, &format!("http://{admin}/metrics")).await;
                    let g = m.map(|r| metric(&String::from_utf8_lossy(&r.body), "turnstile_config_generation "));
                    if g == Some(2.0) || Instant::now() > deadline {
                        break g;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            _ => None,
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(exited, None, "attempt {attempt}: a SIGHUP right after the listening line ended the gateway");
        assert_eq!(generation, Some(2.0), "attempt {attempt}: the SIGHUP reloaded the configuration");
    }
}

/// SPEC §8: "Reload happens on file change (watch)". An edit made while the gateway starts, or
/// just as it prints its listening line, is a change like any other: the gateway must end up
/// serving the file as it is, not the one it read at start until some later edit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_edit_right_after_the_listening_line_is_not_missed() {
    let up = Upstream::start().await;
    let main = main_toml(&up.url(), "", "").replace("watch = false", "watch = true");
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let ents = cfg.path().join("entitlements.json");
    let c = client();
    for attempt in 0..3 {
        replace_file(&ents, &entitlements(40, None));
        let (mut child, banner) = serve_raw(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
        replace_file(&ents, &entitlements(30, None));
        let admin = banner
            .split_whitespace()
            .find_map(|w| w.strip_prefix("admin=http://"))
            .map(|a| a.trim_end_matches('/').to_string())
            .expect("admin address in the banner");
        let url = format!("http://{admin}/admin/v1/tenants/acme/limits");
        let deadline = Instant::now() + Duration::from_secs(3);
        let served = loop {
            let plan = get(&c, &url, &[AUTH]).await.json()["features"]["face-comparison-1-1"]["plan"]["qps"].clone();
            if plan == 30 || Instant::now() > deadline {
                break plan;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(served, 30, "attempt {attempt}: the edit made as the gateway started was never applied");
    }
}

/// SPEC §3.1 `watch = true  # reload when either file changes`. entitlements.json may be a link to
/// the billing system's export in another folder (see the write-back test above): a new export,
/// written there the way exports are (temporary file, rename), is a change of the file, and must
/// be reloaded like an edit of a plain file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_export_behind_a_symlinked_entitlements_file_is_reloaded() {
    let up = Upstream::start().await;
    let main = main_toml(&up.url(), "", "").replace("watch = false", "watch = true");
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let (export, _) = link_entitlements_to_an_export(&cfg);
    let gw = Gateway::start_env(&cfg, &[("TURNSTILE_ADMIN_TOKEN", TOKEN)]);
    let c = client();
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1");
    // The gateway's log is written in the config folder (tests/common): let the events of its
    // start lines pass, so that only the export can cause a reload.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let exported = Instant::now();
    replace_file(&export, &entitlements(30, None));
    loop {
        if quota(&c, &gw).await == "\"qps\";q=30;w=1" {
            break;
        }
        assert!(exported.elapsed() < Duration::from_secs(3), "the new export was not reloaded: {}", gw.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SPEC §8: "Reload happens on file change (watch)". The watched folders may hold other files
/// that change all the time (a log written next to the configuration, as here and as
/// `2>> /etc/turnstile/turnstile.log` does): their steady events must not hold an edit back for
/// as long as they go on (a debounce that waits for a quiet moment that never comes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_edit_is_live_while_another_file_in_the_folder_keeps_changing() {
    let (_up, cfg, gw) = start(true, "").await;
    let c = client();
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1");
    let stop = Arc::new(AtomicBool::new(false));
    let noise = {
        let (stop, path) = (stop.clone(), cfg.path().join("noise.log"));
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::File::create(path).expect("noise file");
            while !stop.load(Ordering::SeqCst) {
                let _ = writeln!(f, "a line");
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let edited = Instant::now();
    replace_file(&cfg.path().join("entitlements.json"), &entitlements(30, None));
    let live = loop {
        if quota(&c, &gw).await == "\"qps\";q=30;w=1" {
            break true;
        }
        if edited.elapsed() > Duration::from_secs(3) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.store(true, Ordering::SeqCst);
    noise.join().expect("noise");
    assert!(live, "the edit was not live within 3 s while another file in the folder kept changing");
}

/// SPEC §8: a rejected configuration is reported (log, metric) — once per rejected edit. The
/// watcher re-reads the files at every event in their folders; an event that is not an edit of
/// them (here the gateway's own log, written next to the configuration, among which the very
/// line that reports the rejection) must not report the same rejected files again, or the
/// report feeds itself: an error line, hence an event, hence an error line, for as long as the
/// edit stays, and `turnstile_config_reloads_total{result="error"}` counts them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_edit_is_reported_once_not_at_every_event_in_the_folder() {
    let (_up, cfg, gw) = start(true, "").await;
    let c = client();
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1");
    tokio::time::sleep(Duration::from_millis(600)).await;
    replace_file(&cfg.path().join("entitlements.json"), "{\"tenants\": ");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let m = gw.metrics(&c).await;
    let errors = metric(&m, "turnstile_config_reloads_total{result=\"error\"} ");
    let logs = gw.logs();
    let lines =
        logs.matches("configuration rejected").count() + logs.matches("reload after a file change failed").count();
    assert_eq!((errors, lines), (1.0, 1), "one rejected edit, reported once: {}", gw.logs());
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=40;w=1", "the old configuration serves");
    // Fixed, it is applied; broken the same way again, it is reported again.
    replace_file(&cfg.path().join("entitlements.json"), &entitlements(30, None));
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(quota(&c, &gw).await, "\"qps\";q=30;w=1");
    replace_file(&cfg.path().join("entitlements.json"), "{\"tenants\": ");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let m = gw.metrics(&c).await;
    assert_eq!(metric(&m, "turnstile_config_reloads_total{result=\"error\"} "), 2.0, "{}", gw.logs());
    // A file that cannot be read: reported once too.
    std::fs::remove_file(cfg.path().join("entitlements.json")).expect("remove");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let m = gw.metrics(&c).await;
    assert_eq!(metric(&m, "turnstile_config_reloads_total{result=\"error\"} "), 3.0, "{}", gw.logs());
    assert_eq!(gw.logs().matches("reload after a file change failed").count(), 1, "{}", gw.logs());
}
