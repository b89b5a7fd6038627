//! `turnstile quote`, run as a user would, against the shipped configuration.

use std::process::Command;

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_turnstile");
const CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnstile.toml");

struct Run {
    ok: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn quote(args: &[&str]) -> Run {
    quote_with(CONFIG, args)
}

fn quote_with(config: &str, args: &[&str]) -> Run {
    let out =
        Command::new(BIN).arg("quote").args(args).args(["--config", config]).output().expect("run turnstile quote");
    Run {
        ok: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs a `--json` quote that must succeed and returns its single JSON object.
/// `payg` arguments for a video feature: seconds of video at a frame rate and line count.
fn video<'a>(feature: &'a str, seconds: &'a str, fps: &'a str, lines: &'a str) -> [&'a str; 9] {
    ["payg", "--feature", feature, "--video-seconds", seconds, "--fps", fps, "--lines", lines]
}

fn json(args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let r = quote(&a);
    assert!(r.ok, "{args:?} failed: {}", r.stderr);
    let v: Value =
        serde_json::from_str(r.stdout.trim()).unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", r.stdout));
    assert!(v.is_object(), "{v}");
    assert_eq!(r.stdout.trim().lines().count(), 1, "exactly one JSON line: {}", r.stdout);
    v
}

/// Runs a quote that must fail with exit status 1 and returns its stderr.
fn fails(args: &[&str]) -> String {
    let r = quote(args);
    assert!(!r.ok, "{args:?} should fail, printed: {}", r.stdout);
    assert_eq!(r.code, Some(1), "{args:?}: {}", r.stderr);
    assert!(r.stdout.is_empty(), "nothing on stdout on error: {}", r.stdout);
    r.stderr
}

#[test]
fn payg_15000_license_plate_calls_cost_2000() {
    let v = json(&["payg", "--feature", "license-plate-recognition", "--calls", "15000"]);
    assert_eq!(v["total"], "2000.00");
    assert_eq!(v["currency"], "CNY");
    assert_eq!(
        v["lines"],
        serde_json::json!([
            { "from": "0", "to": "10000", "units": "10000", "price": "0.15", "amount": "1500.00" },
            { "from": "10000", "to": "100000", "units": "5000", "price": "0.10", "amount": "500.00" }
        ])
    );
}

#[test]
fn payg_tier_boundaries_and_open_ended_tier() {
    let v = json(&["payg", "--feature", "license-plate-recognition", "--calls", "10000"]);
    assert_eq!(v["total"], "1500.00");
    assert_eq!(v["lines"].as_array().map(Vec::len), Some(1));
    let v = json(&["payg", "--feature", "license-plate-recognition", "--calls", "10001"]);
    assert_eq!(v["total"], "1500.10");
    let v = json(&["payg", "--feature", "license-plate-recognition", "--calls", "1000001"]);
    // 1500 + 9000 + 54000 + 0.02
    assert_eq!(v["total"], "64500.02");
    assert_eq!(v["lines"][3]["to"], Value::Null);
    let v = json(&["payg", "--feature", "license-plate-recognition", "--calls", "0"]);
    assert_eq!(v["total"], "0.00");
}

#[test]
fn payg_video_2min20s_at_60fps_1080_lines_costs_37_33() {
    let v = json(&video("comprehensive-video-enhancement", "140", "60", "1080"));
    assert_eq!(v["total"], "37.33");
    assert_eq!(v["currency"], "CNY");
    let line = &v["lines"][0];
    assert_eq!(line["price"], "16.00");
    assert_eq!(line["fps"], 60);
    assert_eq!(line["lines"], 1080);
    assert_eq!(line["cell"], serde_json::json!({ "max_fps": 60, "max_lines": 1440 }));
    assert_eq!(line["amount"], "37.33");
    assert!(line["minutes"].as_str().is_some_and(|m| m.starts_with("2.333")), "{line}");
    assert_eq!(v["lines"].as_array().map(Vec::len), Some(1));
}

#[test]
fn payg_video_matrix_corners() {
    let price =
        |fps: &str, lines: &str| json(&video("comprehensive-video-enhancement", "60", fps, lines))["total"].clone();
    assert_eq!(price("30", "720"), "4.00");
    assert_eq!(price("120", "2160"), "96.00");
}

#[test]
fn qps_40_face_comparison_per_day_and_per_month() {
    let day = json(&["qps", "--feature", "face-comparison-1-1", "--qps", "40", "--period", "day"]);
    assert_eq!(day["total"], "452.00");
    assert_eq!(day["currency"], "CNY");
    assert_eq!(
        day["lines"],
        serde_json::json!([
            { "from": "0", "to": "10", "units": "10", "price": "12.8", "amount": "128.00" },
            { "from": "10", "to": "50", "units": "30", "price": "10.8", "amount": "324.00" }
        ])
    );
    let month = json(&["qps", "--feature", "face-comparison-1-1", "--qps", "40", "--period", "month"]);
    assert_eq!(month["total"], "7820.00");
    assert_eq!(month["lines"][0]["amount"], "2180.00");
    assert_eq!(month["lines"][1]["amount"], "5640.00");
}

#[test]
fn package_5000_object_detection_points_buy_25000_calls_for_50() {
    let v = json(&["package", "--feature", "object-detection", "--points", "5000"]);
    assert_eq!(v["calls"], 25000);
    assert!(v["calls"].is_u64(), "calls is a JSON number: {v}");
    assert_eq!(v["total"], "50.00");
    assert_eq!(v["currency"], "CNY");
    let v = json(&["package", "--feature", "object-detection", "--points", "20000000"]);
    assert_eq!(v["calls"], 100_000_000);
    assert_eq!(v["total"], "120000.00");
}

#[test]
fn image_search_upgrade_costs_the_difference() {
    let v = json(&["image-search", "--from", "2500000/5", "--to", "5000000/10"]);
    assert_eq!(v["total"], "2100.00");
    assert_eq!(v["currency"], "USD");
    assert_eq!(v["from"]["capacity"], 2_500_000);
    assert_eq!(v["from"]["qps"], 5);
    assert_eq!(v["to"]["capacity"], 5_000_000);
    assert_eq!(v["to"]["qps"], 10);
    assert!(v["lines"].is_array());
}

#[test]
fn image_search_downgrade_is_a_refund() {
    let v = json(&["image-search", "--from", "5000000/10", "--to", "2500000/5"]);
    assert_eq!(v["total"], "-2100.00");
    assert_eq!(v["currency"], "USD");
    let v = json(&["image-search", "--from", "5M/10", "--to", "2.5M/5"]);
    assert_eq!(v["total"], "-2100.00");
}

#[test]
fn text_output_ends_with_the_total() {
    let cases: [(&[&str], &str); 5] = [
        (&["payg", "--feature", "license-plate-recognition", "--calls", "15000"], "total: 2000.00 CNY"),
        (&video("comprehensive-video-enhancement", "140", "60", "1080"), "total: 37.33 CNY"),
        (&["qps", "--feature", "face-comparison-1-1", "--qps", "40", "--period", "day"], "total: 452.00 CNY"),
        (&["package", "--feature", "object-detection", "--points", "5000"], "total: 50.00 CNY"),
        (&["image-search", "--from", "2500000/5", "--to", "5000000/10"], "total: 2100.00 USD"),
    ];
    for (args, total) in cases {
        let r = quote(args);
        assert!(r.ok, "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout.trim_end().lines().last(), Some(total), "{args:?}:\n{}", r.stdout);
    }
    let r = quote(&["payg", "--feature", "license-plate-recognition", "--calls", "15000"]);
    assert!(r.stdout.contains("1500.00") && r.stdout.contains("500.00"), "{}", r.stdout);
    let r = quote(&["package", "--feature", "object-detection", "--points", "5000"]);
    assert!(r.stdout.contains("25000 calls"), "{}", r.stdout);
}

#[test]
fn unknown_feature_is_an_error() {
    let err = fails(&["payg", "--feature", "no-such-feature", "--calls", "1"]);
    assert!(err.contains("unknown feature") && err.contains("no-such-feature"), "{err}");
    let err = fails(&["qps", "--feature", "face-comparison", "--qps", "1", "--period", "day"]);
    assert!(err.contains("unknown feature") && err.contains("face-comparison-1-1"), "suggests the id: {err}");
}

#[test]
fn qps_for_a_feature_without_prepaid_qps_or_its_price_is_an_error() {
    // object-detection: billing has no prepaid_qps.
    let err = fails(&["qps", "--feature", "object-detection", "--qps", "10", "--period", "day"]);
    assert!(err.contains("object-detection") && err.contains("prepaid QPS"), "{err}");
    // license-plate-recognition: prepaid_qps is sold but the seed gives no QPS price.
    let err = fails(&["qps", "--feature", "license-plate-recognition", "--qps", "10", "--period", "month"]);
    assert!(err.contains("no QPS price configured for license-plate-recognition"), "{err}");
}

#[test]
fn payg_without_a_price_is_an_error() {
    // face-comparison-1-1 is pay-as-you-go but the seed gives it no tiers.
    let err = fails(&["payg", "--feature", "face-comparison-1-1", "--calls", "100"]);
    assert!(err.contains("no price configured for face-comparison-1-1"), "{err}");
    // video-ocr is billed per video minute but has no matrix.
    let err = fails(&video("video-ocr", "60", "30", "720"));
    assert!(err.contains("no price configured for video-ocr"), "{err}");
}

#[test]
fn unit_mismatches_are_errors() {
    let err = fails(&["payg", "--feature", "comprehensive-video-enhancement", "--calls", "10"]);
    assert!(err.contains("--video-seconds"), "{err}");
    let err = fails(&video("license-plate-recognition", "60", "30", "720"));
    assert!(err.contains("per call") && err.contains("--calls"), "{err}");
}

#[test]
fn video_outside_the_matrix_has_no_price() {
    let err = fails(&video("comprehensive-video-enhancement", "140", "240", "1080"));
    assert!(err.contains("no price for 240 fps at 1080 lines"), "{err}");
    let err = fails(&video("comprehensive-video-enhancement", "140", "30", "4320"));
    assert!(err.contains("no price for 30 fps at 4320 lines"), "{err}");
}

#[test]
fn package_size_not_sold_lists_the_sizes() {
    let err = fails(&["package", "--feature", "object-detection", "--points", "6000"]);
    assert!(err.contains("6000"), "{err}");
    assert!(err.contains("5000, 10000, 50000, 500000, 5000000, 20000000"), "{err}");
    // A feature with no package at all.
    let err = fails(&["package", "--feature", "license-plate-recognition", "--points", "5000"]);
    assert!(err.contains("license-plate-recognition") && err.contains("package"), "{err}");
}

#[test]
fn unknown_image_search_size_lists_the_sizes() {
    let err = fails(&["image-search", "--from", "3000000/5", "--to", "5000000/10"]);
    assert!(err.contains("3000000") && err.contains("2500000/5") && err.contains("50000000/10"), "{err}");
    let err = fails(&["image-search", "--from", "2500000/5", "--to", "5000000/7"]);
    assert!(err.contains("sizes"), "{err}");
    // A custom instance (valid in entitlements.json, SPEC §3.3) has no catalog price to quote.
    let err = fails(&["image-search", "--from", "5000000/8", "--to", "10000000/10"]);
    assert!(err.contains("5000000 images at 8 QPS") && err.contains("sizes"), "{err}");
}

#[test]
fn malformed_arguments_are_rejected() {
    for (args, needle) in [
        (&["image-search", "--from", "2500000", "--to", "5000000/10"][..], "CAPACITY/QPS"),
        (&["image-search", "--from", "lots/5", "--to", "5000000/10"][..], "CAPACITY/QPS"),
        (&["image-search", "--from", "2500000/5", "--to", "5000000/-1"][..], "CAPACITY/QPS"),
        (&["payg", "--feature", "license-plate-recognition", "--calls", "-5"][..], "--calls"),
        (&["payg", "--feature", "license-plate-recognition"][..], "--calls"),
        (&["payg", "--feature", "comprehensive-video-enhancement", "--video-seconds", "60"][..], "--fps"),
        (&["qps", "--feature", "face-comparison-1-1", "--qps", "40", "--period", "week"][..], "week"),
    ] {
        let r = quote(args);
        assert!(!r.ok, "{args:?} should fail");
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
    }
    let err = fails(&["qps", "--feature", "face-comparison-1-1", "--qps", "0", "--period", "day"]);
    assert!(err.contains("--qps"), "{err}");
    // Malformed values the quote itself checks exit with status 1 and say what is expected.
    for (args, needle) in [
        (&["image-search", "--from", "2500000", "--to", "5000000/10"][..], "--from"),
        (&["image-search", "--from", "2500000/5", "--to", "2.5/5"][..], "--to"),
        (&video("comprehensive-video-enhancement", "abc", "60", "1080")[..], "--video-seconds"),
    ] {
        let err = fails(args);
        assert!(err.contains(needle) && err.contains("e.g."), "{args:?}: {err}");
    }
}

#[test]
fn image_search_feature_points_to_the_image_search_quote() {
    let err = fails(&["payg", "--feature", "image-search", "--calls", "1"]);
    assert!(err.contains("quote image-search"), "{err}");
}

#[test]
fn missing_or_invalid_catalog_is_reported_with_file_and_field() {
    let err = {
        let r = quote_with(
            "/nonexistent/turnstile.toml",
            &["payg", "--feature", "license-plate-recognition", "--calls", "1"],
        );
        assert_eq!(r.code, Some(1));
        r.stderr
    };
    assert!(err.contains("/nonexistent/turnstile.toml") && err.contains("cannot read"), "{err}");

    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    for f in ["turnstile.toml", "entitlements.json"] {
        std::fs::copy(format!("{shipped}/{f}"), dir.path().join(f)).expect("copy config");
    }
    let catalog = std::fs::read_to_string(format!("{shipped}/catalog.toml")).expect("read catalog")
        + "\n[features.broken]\nfamily = \"no_such_family\"\nbilling = [\"payg\"]\n";
    std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write catalog");
    let main = dir.path().join("turnstile.toml");
    let r = quote_with(
        main.to_str().expect("utf-8 path"),
        &["payg", "--feature", "license-plate-recognition", "--calls", "1"],
    );
    assert_eq!(r.code, Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("catalog.toml: features.broken.family: unknown family"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

/// `quote` reads the catalog named in `--config` (SPEC §2), nothing else: without an
/// entitlements file it still quotes, instead of calling the catalog invalid.
#[test]
fn quote_needs_no_entitlements_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/config");
    for f in ["turnstile.toml", "catalog.toml"] {
        std::fs::copy(format!("{shipped}/{f}"), dir.path().join(f)).expect("copy config");
    }
    let main = dir.path().join("turnstile.toml");
    let r = quote_with(
        main.to_str().expect("utf-8"),
        &["qps", "--feature", "face-comparison-1-1", "--qps", "40", "--period", "day"],
    );
    assert!(r.ok, "{}", r.stderr);
    assert!(r.stdout.contains("total: 452.00 CNY"), "{}", r.stdout);
}
