//! Shutdown the way load balancers expect (issue 13): on SIGTERM the gateway first says it is not
//! ready while it keeps serving for `[server].shutdown_grace_ms`, so a Kubernetes Service or a
//! load balancer removes it from its endpoints; only then does it stop accepting, drain in-flight
//! requests, flush the ledger and exit 0.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::io::AsyncWriteExt;

const ACME: (&str, &str) = ("x-api-key", "key-acme");

async fn start(server_extra: &str) -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), server_extra, ""), SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    (up, cfg, gw)
}

fn kill(gw: &Gateway, signal: &str) {
    let status = Command::new("kill").args([&format!("-{signal}"), &gw.pid().to_string()]).status().expect("kill");
    assert!(status.success());
}

/// A fresh connection for every call, so a refused connection shows as `None`, never as a
/// reused keep-alive connection that was accepted earlier.
async fn fresh_get(url: &str) -> Option<Reply> {
    try_get(&client(), url).await
}

/// Waits (off the runtime) for the process to exit, at most `within`.
async fn exit_status(mut gw: Gateway, within: Duration) -> (Option<std::process::ExitStatus>, Gateway) {
    tokio::task::spawn_blocking(move || {
        let status = gw.wait_exit(within);
        (status, gw)
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_serving_with_readyz_503_during_the_grace_then_exits_0() {
    let (_up, _cfg, gw) = start("shutdown_grace_ms = 3000").await;
    let ready = fresh_get(&gw.admin_url("/readyz")).await.expect("admin answers");
    assert_eq!(ready.status, StatusCode::OK);

    let signalled = Instant::now();
    kill(&gw, "TERM");
    // Within the grace: /readyz answers 503 (not a refused connection), /healthz stays 200 (a
    // liveness probe must not restart a pod that is draining), and tenant requests, on new
    // connections, are still admitted and forwarded.
    let deadline = signalled + Duration::from_millis(2000);
    let mut saw_503 = false;
    while Instant::now() < deadline {
        let r = fresh_get(&gw.admin_url("/readyz")).await.expect("the admin listener answers during the grace");
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saw_503, "/readyz turned 503 after SIGTERM:\n{}", gw.logs());
    let health = fresh_get(&gw.admin_url("/healthz")).await.expect("healthz answers during the grace");
    assert_eq!(health.status, StatusCode::OK);
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[ACME], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "a tenant request during the grace is served");
    assert_eq!(r.header("connection"), Some("close"), "keep-alive clients are told to reconnect elsewhere");
    let metrics = fresh_get(&gw.admin_url("/metrics")).await.expect("metrics during the grace");
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(signalled.elapsed() < Duration::from_millis(3000), "these checks ran inside the grace");

    let (status, gw) = exit_status(gw, Duration::from_secs(6)).await;
    assert!(status.is_some_and(|s| s.success()), "exit status {status:?}:\n{}", gw.logs());
    assert!(signalled.elapsed() >= Duration::from_millis(3000), "the grace was held before exiting");
    assert!(gw.logs().contains("ledger flushed"), "{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_grace_at_once() {
    let (_up, _cfg, gw) = start("shutdown_grace_ms = 60000").await;
    kill(&gw, "TERM");
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let r = fresh_get(&gw.admin_url("/readyz")).await.expect("admin answers during the grace");
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            break;
        }
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    kill(&gw, "TERM");
    let (status, gw) = exit_status(gw, Duration::from_secs(4)).await;
    assert!(status.is_some_and(|s| s.success()), "exit status {status:?} (grace not cut short?):\n{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_skips_the_grace() {
    // Ctrl-C in a terminal: nobody's endpoints to update, so no grace (in-flight requests still drain).
    let (_up, _cfg, gw) = start("shutdown_grace_ms = 60000").await;
    kill(&gw, "INT");
    let (status, gw) = exit_status(gw, Duration::from_secs(4)).await;
    assert!(status.is_some_and(|s| s.success()), "exit status {status:?}:\n{}", gw.logs());
}

#[test]
fn check_refuses_a_bad_shutdown_grace() {
    for (value, expect) in [
        ("700000", "server.shutdown_grace_ms: must be at most 600000"),
        ("\"5s\"", "server.shutdown_grace_ms"),
        ("-1", "server.shutdown_grace_ms"),
    ] {
        let cfg = ConfigDir::new(
            &main_toml("http://127.0.0.1:1", &format!("shutdown_grace_ms = {value}"), ""),
            SHIPPED_CATALOG,
            &entitlements(40, None),
        );
        let out = Command::new(BIN).arg("check").arg("--config").arg(cfg.main()).output().expect("run check");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{value} accepted");
        assert!(stderr.contains("turnstile.toml") && stderr.contains(expect), "{value}: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_the_tenant_listener_is_closed_while_the_admin_listener_answers_through_the_drain() {
    let (_up, _cfg, gw) = start("shutdown_grace_ms = 300").await;
    let c = client();
    let url = gw.url("/v1/face/compare?sleep_ms=2500");
    let inflight = tokio::spawn(async move { post(&c, &url, &[ACME], b"{}").await.status });
    tokio::time::sleep(Duration::from_millis(200)).await;
    kill(&gw, "TERM");
    // Past the grace, with the slow request still in flight (the drain).
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err(), "the tenant listener no longer accepts");
    let ready = fresh_get(&gw.admin_url("/readyz")).await.expect("the admin listener answers during the drain");
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    let health = fresh_get(&gw.admin_url("/healthz")).await.expect("healthz during the drain");
    assert_eq!(health.status, StatusCode::OK);
    assert!(!inflight.is_finished(), "the checks ran while the request was in flight");
    assert_eq!(inflight.await.expect("join"), StatusCode::OK, "the in-flight request completed");
    let (status, gw) = exit_status(gw, Duration::from_secs(5)).await;
    assert!(status.is_some_and(|s| s.success()), "exit status {status:?}:\n{}", gw.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_closes_idle_keep_alive_connections_at_once() {
    // One idle connection that has served a request (its wait for the next one looks for the
    // drain without polling the channel again) and one that never sent a byte (its first wait).
    let (_up, _cfg, gw) = start("shutdown_grace_ms = 0").await;
    let mut served = common::wire::Wire::connect(gw.addr).await;
    served
        .s
        .write_all(b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nx-api-key: key-acme\r\n\r\n")
        .await
        .expect("write");
    let r = served.reply(Duration::from_secs(5)).await.expect("served");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), None, "kept alive: {}", r.head);
    let mut silent = common::wire::Wire::connect(gw.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    kill(&gw, "TERM");
    // Without the drain noticed, both would hold the exit until the drain timeout
    // (upstream_timeout_ms + 1 s = 31 s).
    assert!(served.closed_within(Duration::from_secs(2)).await, "the served connection was closed:\n{}", gw.logs());
    assert!(silent.closed_within(Duration::from_secs(2)).await, "the silent connection was closed:\n{}", gw.logs());
    let (status, gw) = exit_status(gw, Duration::from_secs(3)).await;
    assert!(status.is_some_and(|s| s.success()), "exit status {status:?}:\n{}", gw.logs());
    assert!(signalled.elapsed() < Duration::from_secs(4), "exited promptly");
}

/// A SIGTERM that arrives as soon as the gateway says it listens (a rollout that stops a pod
/// it has just started) stops it the clean way, exit 0, not by the signal's default action.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_right_after_the_listening_line_stops_it_cleanly() {
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    for attempt in 0..5 {
        let (mut child, _) = serve_raw(&cfg, &[]);
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                break Some(s);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(status.and_then(|s| s.code()), Some(0), "attempt {attempt}: {status:?}");
    }
}
