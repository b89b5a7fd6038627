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

/// Context switches (voluntary + involuntary) of the thread named `ledger-writer`.
fn writer_switches(pid: u32) -> u64 {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("proc") {
        let dir = task.expect("task").path();
        if std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() != "ledger-writer" {
            continue;
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        return status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
            .sum();
    }
    panic!("no ledger-writer thread in /proc/{pid}/task");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ledger_writer_does_not_wake_for_every_tenant_it_has_to_commit() {
    // 300 pay-as-you-go tenants, one call each: every settlement dirties a new monthly record and
    // queues its key for the writer. With a 2 s batch the writer must gather them asleep (woken
    // once for the first key, once when the window ends), not once per key.
    const TENANTS: usize = 300;
    let up = Upstream::start().await;
    let tenants: Vec<String> = (0..TENANTS)
        .map(|i| {
            format!(
                r#""t{i}": {{"api_keys": ["{}"], "services": ["text_recognition"]}}"#,
                key_hash(&format!("key-{i}"))
            )
        })
        .collect();
    let ents = format!(r#"{{"tenants": {{{}}}}}"#, tenants.join(","));
    let rest = "[ledger]\ndurability = \"batched\"\nflush_interval_ms = 2000\n";
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", rest), SHIPPED_CATALOG, &ents);
    let gw = Gateway::start(&cfg);
    let before = writer_switches(gw.pid());
    let c = client();
    let url = gw.url("/v1/ocr/license-plate");
    let mut tasks = Vec::new();
    for part in 0..6 {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            for i in (part..TENANTS).step_by(6) {
                let key = format!("key-{i}");
                let r = post(&c, &url, &[("x-api-key", key.as_str())], b"{}").await;
                assert_eq!(r.status.as_u16(), 200, "tenant t{i}");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let woke = writer_switches(gw.pid()) - before;
    assert!(woke < 60, "the ledger writer switched {woke} times for {TENANTS} settlements of distinct tenants");
    let metrics = gw.metrics(&c).await;
    let billed: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("turnstile_billed_units_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(billed as usize, TENANTS, "every call billed once");
}
