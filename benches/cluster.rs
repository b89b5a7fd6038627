//! Cluster mode in numbers (issue 12): the same gateway binary in local mode and in Redis mode,
//! side by side in one run, over loopback.
//!
//! - **Store round trips per call**: the commands replicas send to Redis (a `MONITOR` connection
//!   tells them from the commands the Lua scripts run) over N sequential calls of one kind,
//!   divided by N: a pay-as-you-go call, a package call, a call the upstream fails (what happens
//!   before forwarding: the upstream's 500 settles nothing) and a 429 answered from the replica's
//!   cache. The background (the replica's hold sweeper and override polling) is measured
//!   over an idle second and shown.
//! - **Added latency**: one keep-alive connection, sequential pay-as-you-go calls, rounds
//!   alternating local / redis / redis+AOF; p50 and p99 of each mode and the difference.
//! - **Requests/s of one replica**: 64 keep-alive connections for `SECS` seconds per mode,
//!   rounds alternating.
//!
//! Modes: `local` (embedded store, batched ledger), `redis` (one redis-server without
//! persistence, batched), `redis-aof` (a second redis-server with `appendonly yes` +
//! `appendfsync always`, strict ledger: a 2xx only after the fsync).
//!
//! Run: `cargo bench --bench cluster` (needs redis-server and redis-cli on PATH). Environment:
//! `ROUNDS` (default 3), `CALLS` (latency calls per mode per round, default 2000), `SECS`
//! (throughput seconds per mode per round, default 5). The load generator, the gateway, Redis
//! and the upstream share the machine's cores: ratios carry over, absolute figures do not.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::redis::{Opts, RedisServer};
use common::{client, ConfigDir, Gateway, TestClient, BIN};
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

const KEY: &str = "bench-key";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

const CATALOG: &str = r#"currency = "CNY"
[families.face_body]
name = "Face and Body"
[features.face-comparison-1-1]
family = "face_body"
billing = ["payg", "prepaid_qps"]
payg_tiers = [{ price = "0.10" }]
[features.license-plate-recognition]
family = "face_body"
billing = ["payg"]
payg_tiers = [{ price = "0.10" }]
[features.object-detection]
family = "face_body"
billing = ["single_package", "payg"]
payg_tiers = [{ price = "0.10" }]
"#;

fn tenants() -> String {
    let from = common::at(-3600);
    let until = common::at(86400);
    format!(
        r#"{{"tenants": {{"bench": {{"api_keys": ["{}"], "services": ["face_body"],
  "qps_plans": [{{"feature": "face-comparison-1-1", "qps": 1, "effective_at": "{from}", "expires_at": "{until}"}}],
  "packages": [{{"id": "od-1", "feature": "object-detection", "points": "100000000", "ordered_at": "{from}", "expires_at": "{until}"}}]
}}}}}}"#,
        turnstile::hash_key(KEY)
    )
}

fn config(upstream: &str, cluster: &str, ledger: &str) -> ConfigDir {
    let rest = format!(
        "[admission]\ndefault_qps = 1000000\n\n[ledger]\n{ledger}\n\n[metrics]\ntenant_label = true\n\n{cluster}\n\
         [[routes]]\npath = \"/v1/payg\"\nfeature = \"license-plate-recognition\"\n\n\
         [[routes]]\npath = \"/v1/plan\"\nfeature = \"face-comparison-1-1\"\n\n\
         [[routes]]\npath = \"/v1/package\"\nfeature = \"object-detection\"\n"
    );
    // main_toml's routes are for the tests; ours come first (first match wins) and differ.
    ConfigDir::new(&common::main_toml(upstream, "upstream_timeout_ms = 5000", &rest), CATALOG, &tenants())
}

async fn call(c: &TestClient, url: &str) -> StatusCode {
    let req = Request::post(url).header("x-api-key", KEY).body(Full::new(Bytes::from_static(b"{}"))).expect("request");
    let resp = c.request(req).await.expect("answer");
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    status
}

/// Counts of a MONITOR connection: commands clients sent, by name, and commands scripts ran.
#[derive(Default, Clone)]
struct Counts {
    sent: u64,
    scripted: u64,
    by_name: BTreeMap<String, u64>,
}

impl Counts {
    fn names_since(&self, before: &Counts) -> String {
        self.by_name
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.by_name.get(k).copied().unwrap_or(0);
                (d > 0).then(|| format!("{k} {d}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

struct Monitor {
    counts: Arc<std::sync::Mutex<Counts>>,
    stream: std::net::TcpStream,
}

impl Monitor {
    fn start(port: u16) -> Monitor {
        use std::io::{BufRead, BufReader, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect for MONITOR");
        stream.write_all(b"MONITOR\r\n").expect("MONITOR");
        let counts = Arc::new(std::sync::Mutex::new(Counts::default()));
        let (reader, c) = (stream.try_clone().expect("clone"), counts.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                // +1700000000.123456 [0 127.0.0.1:5555] "evalsha" "..." / [0 lua] "hmget" ...
                let Some((_, rest)) = line.split_once(" [") else { continue };
                let Some((who, cmd)) = rest.split_once("] ") else { continue };
                let name = cmd.split('"').nth(1).unwrap_or("").to_ascii_lowercase();
                let mut c = c.lock().unwrap();
                if who.ends_with(" lua") {
                    c.scripted += 1;
                } else {
                    c.sent += 1;
                    *c.by_name.entry(name).or_default() += 1;
                }
            }
        });
        Monitor { counts, stream }
    }

    async fn snapshot(&self) -> Counts {
        self.counts.lock().unwrap().clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

struct Upstream(Child, String);

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn upstream() -> Upstream {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(BIN)
        .args(["stand-in", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the stand-in");
    // Killed and reaped on drop, whatever happens next.
    let up = Upstream(child, format!("http://127.0.0.1:{port}"));
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return up;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("stand-in did not listen");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("cluster: bench");
        return;
    }
    let rounds = env_u64("ROUNDS", 3);
    let calls = env_u64("CALLS", 2000) as usize;
    let secs = env_u64("SECS", 5);
    let Some(plain) = RedisServer::start("bench cluster", Opts::default()) else { return };
    let Some(aof) = RedisServer::start("bench cluster", Opts { aof_always: true, cluster: false }) else { return };
    let up = upstream();
    let cluster = |url: String| format!("[cluster]\nstore = \"redis\"\nredis = [{url:?}]\n");
    let cfgs = [
        ("local", config(&up.1, "", "durability = \"batched\"")),
        ("redis", config(&up.1, &cluster(plain.url()), "durability = \"batched\"")),
        ("redis-aof", config(&up.1, &cluster(aof.url()), "durability = \"strict\"")),
    ];
    let gws: Vec<(&str, Gateway)> = cfgs.iter().map(|(name, cfg)| (*name, Gateway::start(cfg))).collect();
    let c = client();
    for (name, g) in &gws {
        for path in ["/v1/payg", "/v1/plan", "/v1/package"] {
            assert_eq!(call(&c, &g.url(path)).await, StatusCode::OK, "{name} {path}: {}", g.logs());
        }
    }
    println!("# turnstile cluster bench: {rounds} rounds, {calls} latency calls and {secs} s of throughput per mode and round");

    // --- Round trips per call (redis mode) ---------------------------------------------------
    // MONITOR shows every command a client sent (`[0 127.0.0.1:port]`) and every command a
    // script ran (`[0 lua]`): the first are the round trips.
    let g = &gws[1].1;
    let mon = Monitor::start(plain.port);
    let idle0 = mon.snapshot().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = mon.snapshot().await;
    println!(
        "\n## Redis round trips per call (MONITOR; background over an idle second, the replica's override poller and hold sweeper: {} — {})",
        idle.sent - idle0.sent,
        idle.names_since(&idle0)
    );
    println!(
        "| call | round trips per call | commands run by scripts per call | round trips over {n} calls |",
        n = 1000
    );
    println!("| --- | ---: | ---: | --- |");
    let n = 1000u64;
    // The plan's bucket (1 QPS): drained first, so Redis answers one 429 and the replica the rest.
    for (what, path, want) in [
        ("pay-as-you-go, 2xx", "/v1/payg", StatusCode::OK),
        ("package, 2xx", "/v1/package", StatusCode::OK),
        ("upstream 500 (what happens before forwarding)", "/v1/payg?status=500", StatusCode::INTERNAL_SERVER_ERROR),
        ("429 (plan of 1 QPS, answered from the replica's cache)", "/v1/plan", StatusCode::TOO_MANY_REQUESTS),
    ] {
        if want == StatusCode::TOO_MANY_REQUESTS {
            while call(&c, &g.url(path)).await != StatusCode::TOO_MANY_REQUESTS {}
        }
        // Batched settlements of the previous kind may still be on their way.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = mon.snapshot().await;
        let t = Instant::now();
        let mut other = 0;
        for _ in 0..n {
            if call(&c, &g.url(path)).await != want {
                other += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = mon.snapshot().await;
        let note = if other > 0 { format!("; {other} of {n} answered otherwise") } else { String::new() };
        println!(
            "| {what} | {:.3} | {:.3} | {} in {secs:.2} s (+0.6 s of waiting){note} |",
            (after.sent - before.sent) as f64 / n as f64,
            (after.scripted - before.scripted) as f64 / n as f64,
            after.names_since(&before),
        );
    }
    drop(mon);

    // --- Latency, one connection, sequential --------------------------------------------------
    let mut lat: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    for _ in 0..rounds {
        for (name, g) in &gws {
            let c = client();
            let url = g.url("/v1/payg");
            let v = lat.entry(name).or_default();
            for _ in 0..calls {
                let t = Instant::now();
                let s = call(&c, &url).await;
                v.push(t.elapsed());
                assert_eq!(s, StatusCode::OK);
            }
        }
    }
    println!(
        "\n## Latency, one keep-alive connection, sequential pay-as-you-go calls ({} per mode)",
        rounds as usize * calls
    );
    println!("| mode | p50 µs | p99 µs | p50 added µs | p99 added µs |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    let mut base = None;
    for name in ["local", "redis", "redis-aof"] {
        let v = lat.get_mut(name).expect("mode");
        v.sort();
        let (p50, p99) = (pct(v, 0.50).as_micros() as i64, pct(v, 0.99).as_micros() as i64);
        let (b50, b99) = *base.get_or_insert((p50, p99));
        println!("| {name} | {p50} | {p99} | {} | {} |", p50 - b50, p99 - b99);
    }

    // --- Throughput, 64 connections -----------------------------------------------------------
    let mut rps: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        for (name, g) in &gws {
            let c = client();
            let url = g.url("/v1/payg");
            let done = Arc::new(AtomicU64::new(0));
            let start = Instant::now();
            let deadline = start + Duration::from_secs(secs);
            let tasks: Vec<_> = (0..64)
                .map(|_| {
                    let (c, url, done) = (c.clone(), url.clone(), done.clone());
                    tokio::spawn(async move {
                        while Instant::now() < deadline {
                            if call(&c, &url).await == StatusCode::OK {
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("task");
            }
            rps.entry(name).or_default().push(done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64());
        }
    }
    println!("\n## Requests/s of one replica, 64 keep-alive connections, pay-as-you-go calls (median of {rounds} × {secs} s)");
    println!("| mode | rps (median) | rounds | vs local |");
    println!("| --- | ---: | --- | ---: |");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let local = med(rps.get_mut("local").expect("local"));
    for name in ["local", "redis", "redis-aof"] {
        let v = rps.get_mut(name).expect("mode");
        let m = med(v);
        let all: Vec<String> = v.iter().map(|x| format!("{x:.0}")).collect();
        println!("| {name} | {m:.0} | {} | {:.2}x |", all.join(" / "), m / local);
    }
    drop(gws);
}
