//! Black-box tests of the per-core workers (issue 14): the tenant listener is served by one
//! current-thread runtime per CPU the process may use, each with its own SO_REUSEPORT listener,
//! while buckets stay shared, so a tenant's limit is exact whichever worker serves its calls.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Voluntary context switches of each thread named `turnstile-worker-N` (the kernel keeps the
/// first 15 bytes of a thread name), by thread id.
fn workers(pid: u32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("proc") {
        let dir = task.expect("task").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("turnstile-worke") {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let switches = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        out.push((dir.display().to_string(), switches));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_per_cpu_each_accepting_and_the_limit_exact_across_them() {
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &entitlements(20, None));
    let gw = Gateway::start(&cfg);
    // The gateway inherits this process's CPU affinity.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let before = workers(gw.pid());
    let expected = if cpus > 1 { cpus } else { 0 };
    assert_eq!(before.len(), expected, "{cpus} CPUs: expected {expected} worker threads, found {before:?}");

    // 32 fresh connections, one keyless request each (401: the bucket is not touched):
    // SO_REUSEPORT spreads them over the workers' sockets (all 32 on one socket of two: 2^-31),
    // so every worker wakes up to accept and serve.
    for _ in 0..32 {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.expect("connect");
        s.write_all(b"GET /v1/face/compare HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("write");
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.expect("answer").expect("read");
        assert!(buf.starts_with(b"HTTP/1.1 401"), "{}", String::from_utf8_lossy(&buf));
    }
    let after = workers(gw.pid());
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        assert!(a > b, "worker {name} never woke up to serve a connection ({b} -> {a} switches)");
    }

    // Flood from 8 connections (spread over the workers) for 2 s: one bucket for the pair
    // whatever the worker serves a call, so 20 QPS admits 40 + depth 20 + 1 at most.
    let c = client();
    let url = gw.url("/v1/face/compare");
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut throttled, mut other) = (0u32, 0u32, 0u32);
            while Instant::now() < deadline {
                match post(&c, &url, &[("x-api-key", "key-acme")], b"{}").await.status.as_u16() {
                    200 => ok += 1,
                    429 => throttled += 1,
                    _ => other += 1,
                }
            }
            (ok, throttled, other)
        }));
    }
    let (mut ok, mut throttled, mut other) = (0, 0, 0);
    for t in tasks {
        let (a, b, c) = t.await.expect("task");
        (ok, throttled, other) = (ok + a, throttled + b, other + c);
    }
    assert_eq!(other, 0);
    assert!(throttled > 100, "the flood must overload the limit ({throttled} throttled)");
    assert!((40..=61).contains(&ok), "20 QPS for 2 s across workers must admit 40..=61, admitted {ok}");
}
