//! The `[cluster]` section of turnstile.toml (SPEC §11) and what `turnstile check` says about the
//! Redis it names (§11.5: AOF policy), against real redis-server processes.

mod common;

use std::process::Command;

use common::redis::{Opts, RedisServer};
use common::*;

fn check(cfg: &ConfigDir) -> (bool, String, String) {
    let out = Command::new(BIN).arg("check").arg("--config").arg(cfg.main()).output().expect("run check");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn config(cluster: &str, ledger: &str) -> ConfigDir {
    let main = main_toml("http://127.0.0.1:1", "", &format!("{ledger}\n[cluster]\n{cluster}\n"));
    ConfigDir::new(&main, SHIPPED_CATALOG, &entitlements(10, None))
}

#[test]
fn cluster_section_errors_name_file_and_field() {
    let cfg = config(
        "store = \"memcached\"\nredis = [\"http://127.0.0.1:6379\", \"redis://\"]\nkey_prefix = \"a{b\"\n\
         hold_lease_ms = 0\non_store_error = \"retry\"\nexpected_replicas = 0\n",
        "",
    );
    let (ok, _out, err) = check(&cfg);
    assert!(!ok);
    let file = format!("{}/turnstile.toml", cfg.path().display());
    for field in [
        "cluster.store",
        "cluster.redis[0]",
        "cluster.redis[1]",
        "cluster.key_prefix",
        "cluster.hold_lease_ms",
        "cluster.on_store_error",
        "cluster.expected_replicas",
    ] {
        assert!(err.contains(&format!("{file}: {field}: ")), "no error for {field} in:\n{err}");
    }

    // A misspelt key is named (the loader reports unknown keys before it validates values).
    let cfg = config("replicas = 3\n", "");
    let (ok, _out, err) = check(&cfg);
    assert!(!ok);
    assert!(err.contains(&format!("{}/turnstile.toml: cluster.replicas: unknown key", cfg.path().display())), "{err}");

    // store = "redis" needs at least one URL; a lease shorter than the upstream timeout would
    // give a call's points back while the upstream still works on it.
    let cfg = config("store = \"redis\"\nredis = []\nhold_lease_ms = 1000\n", "");
    let (ok, _out, err) = check(&cfg);
    assert!(!ok);
    assert!(err.contains("cluster.redis: "), "{err}");
    assert!(err.contains("cluster.hold_lease_ms: "), "{err}");

    // The embedded default needs no section at all, and `store = "local"` connects nowhere.
    let cfg = config("store = \"local\"\nredis = [\"redis://127.0.0.1:1\"]\n", "");
    let (ok, _out, err) = check(&cfg);
    assert!(ok, "{err}");
}

#[test]
fn check_reports_a_redis_without_appendfsync_always() {
    let Some(plain) = RedisServer::start("check_reports_a_redis_without_appendfsync_always", Opts::default()) else {
        return;
    };
    let Some(aof) = RedisServer::start(
        "check_reports_a_redis_without_appendfsync_always",
        Opts { aof_always: true, cluster: false },
    ) else {
        return;
    };
    let redis = |url: String| format!("store = \"redis\"\nredis = [\"{url}\"]\n");

    // Strict mode: an error, and check fails.
    let cfg = config(&redis(plain.url()), "[ledger]\ndurability = \"strict\"\n");
    let (ok, _out, err) = check(&cfg);
    assert!(!ok, "strict mode on a Redis without AOF must fail");
    assert!(err.contains("error") && err.contains("appendonly"), "{err}");
    assert!(err.contains(&plain.url()), "the node is named: {err}");

    // Batched mode: a warning, and check passes.
    let cfg = config(&redis(plain.url()), "[ledger]\ndurability = \"batched\"\n");
    let (ok, out, err) = check(&cfg);
    assert!(ok, "{err}");
    assert!(err.contains("warning") && err.contains("appendonly"), "{err}");
    assert!(out.starts_with("ok:"), "{out}");

    // appendonly yes + appendfsync always: nothing to say in either mode.
    let cfg = config(&redis(aof.url()), "[ledger]\ndurability = \"strict\"\n");
    let (ok, _out, err) = check(&cfg);
    assert!(ok, "{err}");
    assert!(!err.contains("appendonly"), "{err}");

    // A Redis that does not answer is an error (check cannot vouch for it).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = config(&redis(format!("redis://127.0.0.1:{port}")), "");
    let (ok, _out, err) = check(&cfg);
    assert!(!ok);
    assert!(err.contains(&format!("redis://127.0.0.1:{port}")), "{err}");
}

/// SPEC §11.5: `turnstile check` reports a Redis without `appendonly yes` + `appendfsync always`
/// as an error in strict mode. In a Redis Cluster the client reaches every master (the URLs are
/// only seeds), so a master not listed must be checked too.
#[test]
fn check_reports_an_unlisted_cluster_master_without_appendfsync_always() {
    let Some(cluster) = common::redis::RedisCluster::start_with("check_unlisted_master", true) else {
        return;
    };
    // The third master writes its AOF once a second: a crash may lose an acknowledged charge.
    assert_eq!(cluster.nodes[2].cli(&["CONFIG", "SET", "appendfsync", "everysec"]), "OK");
    let urls = cluster.urls();
    let listed = format!("store = \"redis\"\nredis = [\"{}\", \"{}\"]\n", urls[0], urls[1]);
    let cfg = config(&listed, "[ledger]\ndurability = \"strict\"\n");
    let (ok, out, err) = check(&cfg);
    assert!(
        !ok,
        "strict mode on a cluster whose master {} runs appendfsync everysec passed check:\n{out}{err}",
        urls[2]
    );
    assert!(err.contains(&urls[2]) && err.contains("everysec"), "the unlisted master is named: {err}");
}

/// `serve` never starts on what `check` refuses: strict mode on a Redis without `appendonly yes`
/// and `appendfsync always` breaks SPEC §11.5's promise (a 2xx only once the charge is in
/// Redis's fsynced AOF), so serve refuses it with check's message; in batched mode, which check
/// passes with a warning, it starts.
#[test]
fn serve_refuses_strict_mode_on_a_redis_that_check_refuses() {
    let Some(plain) = RedisServer::start("serve_refuses_strict_mode_on_a_redis", Opts::default()) else {
        return;
    };
    let redis = format!("store = \"redis\"\nredis = [\"{}\"]\n", plain.url());
    let cfg = config(&redis, "[ledger]\ndurability = \"strict\"\n");
    let (ok, _out, check_err) = check(&cfg);
    assert!(!ok, "{check_err}");
    let message = check_err.lines().next().unwrap_or_default().to_string();
    assert!(message.contains("appendonly"), "{check_err}");

    let mut serve = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(cfg.main())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("serve");
    let mut status = None;
    for _ in 0..200 {
        if let Ok(Some(s)) = serve.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = serve.kill();
    let out = serve.wait_with_output().expect("wait");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(status.map(|s| s.success()), Some(false), "serve started where check refuses:\n{stdout}{stderr}");
    assert!(stderr.contains(&message), "serve says what check says ({message:?}):\n{stderr}");
    assert!(!stdout.contains("listening"), "{stdout}");

    // Batched: check warns and passes; serve starts.
    let cfg = config(&redis, "[ledger]\ndurability = \"batched\"\n");
    let (ok, _out, check_err) = check(&cfg);
    assert!(ok, "{check_err}");
    let gw = Gateway::start(&cfg);
    assert!(gw.stdout_lines[0].starts_with("turnstile listening:"), "{:?}", gw.stdout_lines);
}
