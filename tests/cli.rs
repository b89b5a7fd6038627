//! `turnstile check` and `turnstile hash-key`, run as a user would.

mod common;

use std::process::Command;

use common::*;

fn check(cfg: &ConfigDir) -> (bool, String, String) {
    let out = Command::new(BIN).arg("check").arg("--config").arg(cfg.main()).output().expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_configuration_is_valid() {
    let out = Command::new(BIN)
        .args(["check", "--config", concat!(env!("CARGO_MANIFEST_DIR"), "/config/turnstile.toml")])
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("ok:"), "{stdout}");
}

#[test]
fn hash_key_prints_sha256_hex() {
    let out = Command::new(BIN).args(["hash-key", "demo-acme-key"]).output().expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "a2fb8545fcd457204e9fee11be92013aa3240b1b146fe262ba608fdfc159041c"
    );
}

#[test]
fn check_reports_every_error_with_file_and_field() {
    let main =
        main_toml("http://127.0.0.1:1", "upstream_timeout_ms = 0", "[admission]\ndefault_qps = 2\nburst_secs = 1.0\n")
            + "\n[[routes]]\npath = \"/v1/x\"\nfeature = \"no-such-feature\"\n";
    let catalog = SHIPPED_CATALOG.to_string()
        + "\n[features.extra-feature]\nfamily = \"face_body\"\nbilling = [\"payg\"]\ncolour = \"red\"\n";
    let k = key_hash("k1");
    let ents = format!(
        r#"{{"tenants": {{
  "acme": {{"api_keys": ["{k}"], "services": ["face_body", "made_up"], "extra": 1,
    "qps_plans": [{{"feature": "face-comparison-1-1", "qps": 60, "effective_at": "2026-11-01T00:00:00+08:00", "expires_at": "not a time",
       "temporary_upgrades": [{{"qps": 55, "from": "2026-11-02T00:00:00+08:00", "until": "2026-11-01T00:00:00+08:00"}}]}}],
    "packages": [
      {{"id": "p1", "feature": "object-detection", "points": "5000", "ordered_at": "2026-01-01T00:00:00+08:00", "expires_at": "2027-01-01T00:00:00+08:00"}},
      {{"id": "p1", "scope": "vision-image", "points": "100", "ordered_at": "2026-01-01T00:00:00+08:00", "expires_at": "2027-01-01T00:00:00+08:00"}},
      {{"id": "p2", "feature": "object-detection", "scope": "vision-image", "points": "1", "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}}
    ]}},
  "other": {{"api_keys": ["{k}", "ABC"], "services": []}}
}}}}"#
    );
    let cfg = ConfigDir::new(&main, &catalog, &ents);
    let (ok, _stdout, stderr) = check(&cfg);
    assert!(!ok, "check must fail");
    let dir = cfg.path().display().to_string();
    // Parse-level problems: every unknown key of a file is listed.
    for expected in [
        format!("{dir}/turnstile.toml: admission.burst_secs: unknown key"),
        format!("{dir}/catalog.toml: features.extra-feature.colour: unknown key"),
        format!("{dir}/entitlements.json: tenants.acme.extra: unknown key"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }

    // With the unknown keys fixed, the semantic checks run and report everything at once.
    let main = main.replace("burst_secs", "burst_seconds");
    let catalog = catalog.replace("colour = \"red\"\n", "");
    let ents = ents.replace(r#", "extra": 1"#, "");
    let cfg = ConfigDir::new(&main, &catalog, &ents);
    let (ok, _stdout, stderr) = check(&cfg);
    assert!(!ok);
    let dir = cfg.path().display().to_string();
    for expected in [
        format!("{dir}/turnstile.toml: server.upstream_timeout_ms: must be at least 1"),
        format!("{dir}/turnstile.toml: routes[4].feature: unknown feature \"no-such-feature\""),
        format!("{dir}/entitlements.json: tenants.acme.services[1]: unknown service \"made_up\""),
        format!("{dir}/entitlements.json: tenants.acme.qps_plans[0].qps: 60 exceeds the face_body cap of 50"),
        format!("{dir}/entitlements.json: tenants.acme.qps_plans[0].expires_at: \"not a time\" is not an RFC 3339 time"),
        format!("{dir}/entitlements.json: tenants.acme.qps_plans[0].temporary_upgrades[0].qps: 55 exceeds the face_body cap of 50"),
        format!("{dir}/entitlements.json: tenants.acme.qps_plans[0].temporary_upgrades[0].until: must be after from"),
        format!("{dir}/entitlements.json: tenants.acme.packages[1].id: duplicate package id \"p1\""),
        format!("{dir}/entitlements.json: tenants.acme.packages[2]: has both feature and scope"),
        format!("{dir}/entitlements.json: tenants.other.api_keys[0]: duplicate key hash: already used by tenant \"acme\""),
        format!("{dir}/entitlements.json: tenants.other.api_keys[1]: must be the 64-character lowercase sha256 hex"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
    assert!(stderr.contains("12 error(s)") || stderr.lines().count() >= 12, "{stderr}");
}

#[test]
fn floats_for_money_and_syntax_errors_are_located() {
    let main = main_toml("http://127.0.0.1:1", "", "");
    let catalog = "currency = \"CNY\"\n[families.f]\nname = \"F\"\n[features.a]\nfamily = \"f\"\nbilling = [\"payg\"]\npayg_tiers = [{ price = 0.15 }]\n";
    let cfg = ConfigDir::new(&main, catalog, "{\"tenants\": {}}");
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    assert!(stderr.contains("catalog.toml: features.a.payg_tiers[0].price: 0.15 is a float"), "{stderr}");

    let cfg = ConfigDir::new(&main, "currency = \"CNY\"\n[families.f]\nname = \"F\"\n", "{\"tenants\": {");
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    assert!(stderr.contains("entitlements.json:"), "{stderr}");

    let cfg = ConfigDir::new("[server\nupstream = 1", "currency = \"CNY\"\n", "{\"tenants\": {}}");
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    assert!(stderr.contains("turnstile.toml:"), "{stderr}");
}

/// A decimal with more digits than a Decimal keeps exactly (28) is refused, naming the file and
/// the field, in each of the three files: read loosely, it was rounded and the gateway billed by
/// a number the operator did not write. Trailing zeros change nothing and are still accepted.
#[test]
fn decimals_that_would_be_rounded_are_refused_with_file_and_field() {
    let ratio = "[billing]\nlow_balance_ratio = \"0.20000000000000000000000000001\"\n";
    let main = main_toml("http://127.0.0.1:1", "", ratio);
    let catalog = SHIPPED_CATALOG.replace("price = \"0.15\"", "price = \"0.15000000000000000000000000001\"");
    let day = "2026-01-01T00:00:00+08:00";
    let ents = format!(
        r#"{{"tenants": {{"acme": {{"api_keys": ["{}"], "services": ["object_detection"], "packages": [
  {{"id": "p1", "feature": "object-detection", "points": "5000.00000000000000000000000001", "ordered_at": "{day}", "expires_at": "{day}"}}]}}}}}}"#,
        key_hash("k1")
    );
    // Each file on its own (a file stops at its first type error), then all three together.
    let ok_ents = entitlements(40, None);
    let plain = main_toml("http://127.0.0.1:1", "", "");
    for (main, catalog, ents, expected) in [
        (main.as_str(), SHIPPED_CATALOG, ok_ents.as_str(), "turnstile.toml: billing.low_balance_ratio: "),
        (
            plain.as_str(),
            catalog.as_str(),
            ok_ents.as_str(),
            "catalog.toml: features.license-plate-recognition.payg_tiers[0].price: ",
        ),
        (plain.as_str(), SHIPPED_CATALOG, ents.as_str(), "entitlements.json: tenants.acme.packages[0].points: "),
    ] {
        let cfg = ConfigDir::new(main, catalog, ents);
        let (ok, _, stderr) = check(&cfg);
        assert!(!ok, "check must fail: {stderr}");
        let line =
            stderr.lines().find(|l| l.contains(expected)).unwrap_or_else(|| panic!("no {expected:?} in:\n{stderr}"));
        assert!(line.contains("more digits than"), "{line}");
    }

    // Trailing zeros beyond 28 places: the same number, accepted.
    let main =
        main_toml("http://127.0.0.1:1", "", "[billing]\nlow_balance_ratio = \"0.2000000000000000000000000000000\"\n");
    let catalog = SHIPPED_CATALOG.replace("price = \"0.15\"", "price = \"0.150000000000000000000000000000000\"");
    let cfg = ConfigDir::new(&main, &catalog, &entitlements(40, None));
    let (ok, stdout, stderr) = check(&cfg);
    assert!(ok && stdout.starts_with("ok:"), "{stdout}{stderr}");
}

/// `serve` refuses the same rounded decimal at start, naming the file and the field.
#[test]
fn serve_refuses_a_decimal_that_would_be_rounded() {
    let ratio = "[billing]\nlow_balance_ratio = \"0.20000000000000000000000000001\"\n";
    let cfg = ConfigDir::new(&main_toml("http://127.0.0.1:1", "", ratio), SHIPPED_CATALOG, &entitlements(40, None));
    let (exited, stderr) = serve_briefly(&cfg);
    assert_eq!(exited, Some(false), "serve must refuse to start: {stderr}");
    assert!(stderr.contains("turnstile.toml: billing.low_balance_ratio: "), "{stderr}");
    assert!(stderr.contains("more digits than"), "{stderr}");
}

#[test]
fn missing_file_is_named() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = Command::new(BIN).arg("check").arg("--config").arg(dir.path().join("nope.toml")).output().expect("run");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("nope.toml: cannot read"), "{stderr}");
}

#[test]
fn ledger_strict_timeout_must_be_positive() {
    let ents = entitlements(10, None);
    let main = main_toml("http://127.0.0.1:1", "", "[ledger]\ndurability = \"strict\"\nstrict_timeout_ms = 0\n");
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &ents);
    let (ok, _stdout, stderr) = check(&cfg);
    assert!(!ok);
    let expected = format!("{}/turnstile.toml: ledger.strict_timeout_ms: must be at least 1", cfg.path().display());
    assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    let cfg = ConfigDir::new(&main.replace("strict_timeout_ms = 0", "strict_timeout_ms = 250"), SHIPPED_CATALOG, &ents);
    let (ok, _stdout, stderr) = check(&cfg);
    assert!(ok, "250 ms is fine: {stderr}");
}

#[test]
fn custom_image_search_instance_is_valid_and_zero_sizes_are_named() {
    // Support quotes packages outside the price list (seed 004): 5,000,000 images at 8 QPS.
    let main = main_toml("http://127.0.0.1:1", "", "");
    let custom = entitlements(40, None).replace(
        r#""services": ["text_recognition"]"#,
        r#""services": ["text_recognition"], "image_search": {"capacity": 5000000, "qps": 8, "expires_at": "2036-01-01T00:00:00Z"}"#,
    );
    assert!(custom.contains("5000000"), "{custom}");
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &custom);
    let (ok, stdout, stderr) = check(&cfg);
    assert!(ok, "a custom instance is valid:\n{stderr}");
    assert!(stdout.starts_with("ok:"), "{stdout}");

    let zero = custom.replace(r#""capacity": 5000000, "qps": 8"#, r#""capacity": 0, "qps": 0"#);
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &zero);
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    let dir = cfg.path().display().to_string();
    for expected in [
        format!("{dir}/entitlements.json: tenants.globex.image_search.capacity: must be at least 1"),
        format!("{dir}/entitlements.json: tenants.globex.image_search.qps: must be at least 1"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn admission_mode_is_enforce_or_shadow_and_a_tenant_flag_is_a_boolean() {
    let ents = entitlements(40, None);
    let main = |mode: &str| main_toml("http://127.0.0.1:1", "", &format!("[admission]\nmode = \"{mode}\"\n"));
    for mode in ["enforce", "shadow"] {
        let (ok, stdout, stderr) = check(&ConfigDir::new(&main(mode), SHIPPED_CATALOG, &ents));
        assert!(ok && stdout.starts_with("ok:"), "{mode} is valid:\n{stderr}");
    }
    let cfg = ConfigDir::new(&main("dry-run"), SHIPPED_CATALOG, &ents);
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    let expected = format!(
        "{}/turnstile.toml: admission.mode: \"dry-run\" must be \"enforce\" or \"shadow\"",
        cfg.path().display()
    );
    assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");

    let flagged =
        ents.replace(r#""services": ["text_recognition"]"#, r#""services": ["text_recognition"], "shadow": true"#);
    assert_ne!(flagged, ents);
    let (ok, _, stderr) = check(&ConfigDir::new(&main("enforce"), SHIPPED_CATALOG, &flagged));
    assert!(ok, "a tenant's shadow flag is valid:\n{stderr}");
    let cfg =
        ConfigDir::new(&main("enforce"), SHIPPED_CATALOG, &flagged.replace("\"shadow\": true", "\"shadow\": \"yes\""));
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    let expected = format!("{}/entitlements.json: tenants.globex.shadow: invalid type", cfg.path().display());
    assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
}

/// A tenant id given twice in entitlements.json is refused: JSON parsers keep the last of two
/// equal keys, so the first tenant would vanish silently (SPEC §3).
#[test]
fn duplicate_tenant_in_entitlements_is_an_error() {
    // The same tenant id twice in `tenants`: JSON allows it syntactically, but one definition
    // would silently replace the other (its keys, plans and packages vanish).
    let ents = format!(
        r#"{{"tenants": {{
  "acme": {{"api_keys": ["{a}"], "services": ["face_body"],
    "qps_plans": [{{"feature": "face-comparison-1-1", "qps": 40, "effective_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}}]}},
  "acme": {{"api_keys": ["{b}"], "services": ["text_recognition"]}}
}}}}"#,
        a = key_hash("key-a"),
        b = key_hash("key-b"),
    );
    let cfg = ConfigDir::new(&main_toml("http://127.0.0.1:1", "", ""), SHIPPED_CATALOG, &ents);
    let (ok, stdout, stderr) = check(&cfg);
    assert!(!ok, "a duplicate tenant was accepted: {stdout}");
    assert!(stderr.contains("entitlements.json") && stderr.contains("acme"), "{stderr}");
}

/// `+-8:00` and the like: `i32::from_str` takes a sign, so a typo moved the month boundaries.
#[test]
fn timezone_with_two_signs_is_refused() {
    for tz in ["+-8:00", "++8:00", "-+5:30", "+08:-1"] {
        let main = main_toml("http://127.0.0.1:1", "", &format!("[billing]\ntimezone = \"{tz}\"\n"));
        let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
        let (ok, stdout, stderr) = check(&cfg);
        assert!(!ok, "timezone {tz:?} was accepted: {stdout}");
        assert!(stderr.contains("billing.timezone"), "{stderr}");
    }
}

/// `check` and `serve` agree: a wildcard listener covers a specific one on the same port.
#[test]
fn check_refuses_listeners_that_serve_cannot_bind_together() {
    // The same port on the wildcard address and on loopback: serve cannot bind both.
    let port = dead_addr().port();
    let main = main_toml("http://127.0.0.1:1", "", "")
        .replace("listen = \"127.0.0.1:0\"\nadmin_listen", &format!("listen = \"0.0.0.0:{port}\"\nadmin_listen"))
        .replace("admin_listen = \"127.0.0.1:0\"", &format!("admin_listen = \"127.0.0.1:{port}\""));
    assert!(main.contains(&format!("0.0.0.0:{port}")) && main.contains(&format!("127.0.0.1:{port}")), "{main}");
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let (exited, serve_err) = serve_briefly(&cfg);
    assert_eq!(exited, Some(false), "serve started; this test assumes it cannot: {serve_err}");
    let (ok, stdout, stderr) = check(&cfg);
    assert!(!ok, "check accepted what serve refuses ({serve_err}): {stdout}");
    assert!(stderr.contains("server.admin_listen"), "{stderr}");
}

/// No limit may be above 1,000,000 QPS: a cluster-mode bucket counts whole microseconds, and a
/// higher limit would make an unlimited one. 1,000,000 itself is valid.
#[test]
fn a_limit_above_a_million_qps_is_refused() {
    let at = |qps: u32| {
        ConfigDir::new(
            &main_toml("http://127.0.0.1:1", "", &format!("[admission]\ndefault_qps = {qps}\n")),
            SHIPPED_CATALOG,
            &entitlements(40, None),
        )
    };
    let (ok, stdout, stderr) = check(&at(1_000_000));
    assert!(ok, "{stdout}{stderr}");
    let (ok, _, stderr) = check(&at(1_000_001));
    assert!(!ok);
    assert!(
        stderr.contains("admission.default_qps: 1000001 is above the most a limit may be, 1000000 QPS"),
        "{stderr}"
    );
}

/// Logs go to stderr; when its reader is gone (a log shipper that died, `serve 2>&1 | head`),
/// a failed log write must not break the gateway: SIGTERM still stops it and flushes the
/// ledger (SPEC §7). tracing-subscriber reported such a failure with `eprintln!`, which panics on
/// a closed stderr: the panic ended the signal task, and SIGTERM was ignored from then on.
#[test]
fn sigterm_stops_serve_whose_stderr_reader_is_gone() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let cfg = ConfigDir::new(&main_toml("http://127.0.0.1:1", "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(cfg.main())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut banner = String::new();
    stdout.read_line(&mut banner).expect("listening line");
    assert!(banner.starts_with("turnstile listening:"), "{banner}");
    // The reader of stderr goes away: every log line from now on fails with EPIPE.
    drop(child.stderr.take());
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let mut status = None;
    for _ in 0..400 {
        if let Ok(Some(s)) = child.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    let status = status.expect("serve ignored SIGTERM once its stderr was closed");
    assert!(status.success(), "{status:?}");
}

/// The catalog and entitlements are found through the main file's `[files]` (SPEC §3). When the
/// main file does not parse, its `[files]` is unknown: check reports the main file's error, and
/// no error about `catalog.toml` or `entitlements.json`, which it never named.
#[test]
fn a_main_file_that_does_not_parse_is_reported_not_the_default_file_names() {
    let main = main_toml("http://127.0.0.1:1", "", "")
        .replace("catalog = \"catalog.toml\"", "catalog = \"prices.toml\"")
        .replace("entitlements = \"entitlements.json\"", "entitlements = \"tenants.json\"")
        + "\n[metrics\ntenant_label = true\n";
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("turnstile.toml"), &main).expect("write");
    std::fs::write(dir.path().join("prices.toml"), SHIPPED_CATALOG).expect("write");
    std::fs::write(dir.path().join("tenants.json"), entitlements(40, None)).expect("write");
    let out =
        Command::new(BIN).arg("check").arg("--config").arg(dir.path().join("turnstile.toml")).output().expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let file = format!("{}/turnstile.toml: ", dir.path().display());
    assert!(stderr.contains(&file) && stderr.contains("(line "), "the syntax error is located:\n{stderr}");
    assert!(!stderr.contains("catalog.toml") && !stderr.contains("entitlements.json"), "{stderr}");
}

/// A catalog or entitlements file that cannot be read is named with the field that names it
/// (SPEC §2: errors name the file and the field path), and the main file's own errors are
/// still reported (check prints every error).
#[test]
fn an_unreadable_catalog_names_files_catalog_and_the_main_files_errors_still_show() {
    let main = main_toml("http://127.0.0.1:1", "", "[admission]\nburst_secs = 1.0\n")
        .replace("catalog = \"catalog.toml\"", "catalog = \"catalgo.toml\"");
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(40, None));
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    let dir = cfg.path().display().to_string();
    for expected in [
        format!("{dir}/turnstile.toml: files.catalog: cannot read {dir}/catalgo.toml: "),
        format!("{dir}/turnstile.toml: admission.burst_secs: unknown key"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
}

/// `turnstile hash-key "$KEY"` with `KEY` unset hashed the empty key: a hash that entitlements
/// accept but no request can match (a request without a key is 401 `missing_api_key`). An
/// empty or blank KEY is refused.
#[test]
fn hash_key_refuses_an_empty_key() {
    for key in ["", "  "] {
        let out = Command::new(BIN).args(["hash-key", key]).output().expect("run");
        assert!(!out.status.success(), "{key:?} was hashed: {}", String::from_utf8_lossy(&out.stdout));
        assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
        assert!(String::from_utf8_lossy(&out.stderr).contains("KEY"), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A TOML syntax error is one line that names its file (as every other error), and its column
/// counts characters, as editors do, not bytes.
#[test]
fn toml_syntax_errors_are_one_line_with_the_column_in_characters() {
    let main = main_toml("http://127.0.0.1:1", "", "");
    let cfg = ConfigDir::new(&main, "currency = \"CNY\"\n[families\nname = \"F\"\n", "{\"tenants\": {}}");
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    let file = format!("{}/catalog.toml: ", cfg.path().display());
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.ends_with("error(s)")).collect();
    assert!(!lines.is_empty() && lines.iter().all(|l| l.starts_with(&file)), "{stderr}");
    assert!(stderr.contains("(line 2, column "), "{stderr}");

    // `é` is two bytes; the stray one is the 12th character of its line.
    let cfg = ConfigDir::new(&main, "currency = \"CNY\"\nname = \"é\" é\n", "{\"tenants\": {}}");
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    assert!(stderr.contains("(line 2, column 12)"), "{stderr}");
}

/// Check prints every error (SPEC §2): a typo in turnstile.toml does not hide what is wrong in
/// entitlements.json, whose checks need only the catalog.
#[test]
fn a_typo_in_the_main_file_does_not_hide_the_entitlements_errors() {
    let main = main_toml("http://127.0.0.1:1", "", "[admission]\nburst_secs = 1.0\n");
    let cfg = ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(60, None));
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    let dir = cfg.path().display().to_string();
    for expected in [
        format!("{dir}/turnstile.toml: admission.burst_secs: unknown key"),
        format!("{dir}/entitlements.json: tenants.acme.qps_plans[0].qps: 60 exceeds the face_body cap of 50"),
    ] {
        assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
    }
}

/// "Never expires" is often written 9999-12-31: times are kept in nanoseconds, which end in
/// 2262, and the error says so, naming the latest time that can be written.
#[test]
fn a_time_past_2262_names_the_latest_time_allowed() {
    let ents = entitlements(40, None).replacen(
        r#""services": ["text_recognition"]"#,
        r#""services": ["text_recognition"], "image_search": {"capacity": 1, "qps": 1, "expires_at": "9999-12-31T23:59:59Z"}"#,
        1,
    );
    let cfg = ConfigDir::new(&main_toml("http://127.0.0.1:1", "", ""), SHIPPED_CATALOG, &ents);
    let (ok, _, stderr) = check(&cfg);
    assert!(!ok);
    let expected = format!(
        "{}/entitlements.json: tenants.globex.image_search.expires_at: \"9999-12-31T23:59:59Z\" is out of range: write a time from 1677-09-21T00:12:44Z to 2262-04-11T23:47:16Z",
        cfg.path().display()
    );
    assert!(stderr.contains(&expected), "missing {expected:?} in:\n{stderr}");
}

/// Runs `serve` on `cfg` for at most 5 s: whether it exited by then (and with success), and
/// what it wrote to stderr (it is killed if still running).
fn serve_briefly(cfg: &ConfigDir) -> (Option<bool>, String) {
    let mut serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(cfg.main())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let mut exited = None;
    for _ in 0..100 {
        if let Ok(Some(s)) = serve.try_wait() {
            exited = Some(s.success());
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = serve.kill();
    let out = serve.wait_with_output().expect("wait");
    (exited, String::from_utf8_lossy(&out.stderr).into_owned())
}
