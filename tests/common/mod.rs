//! Black-box test harness: writes a configuration into a temp dir, starts the real `turnstile`
//! binary on 127.0.0.1 ephemeral ports, and talks HTTP to it. Every process started is killed
//! and reaped on drop.
#![allow(dead_code)]

pub mod cluster;
pub mod redis;
pub mod wire;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub const BIN: &str = env!("CARGO_BIN_EXE_turnstile");
pub const SHIPPED_CATALOG: &str = include_str!("../../config/catalog.toml");

/// RFC 3339 time `secs` from now (negative: in the past).
pub fn at(secs: i64) -> String {
    (Utc::now() + chrono::Duration::seconds(secs)).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A loopback address with nothing listening (bound, noted, closed): connecting is refused.
pub fn dead_addr() -> SocketAddr {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    dead.local_addr().expect("addr")
}

pub fn key_hash(key: &str) -> String {
    turnstile::hash_key(key)
}

/// A stand-in upstream running in the test process.
pub struct Upstream {
    pub addr: SocketAddr,
    _stop: tokio::sync::watch::Sender<bool>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let (addr, stop) = turnstile::standin::spawn(([127, 0, 0, 1], 0).into()).await.expect("bind stand-in");
        Upstream { addr, _stop: stop }
    }
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Main-file text with ephemeral ports; `extra` is appended inside the matching sections via
/// overrides of whole sections (pass complete `[section]` blocks for anything else).
/// Unless `server_extra` sets `shutdown_grace_ms`, it is 0: tests that stop the gateway do not
/// wait for a load balancer (tests/shutdown.rs tests the grace).
pub fn main_toml(upstream: &str, server_extra: &str, rest: &str) -> String {
    let grace = if server_extra.contains("shutdown_grace_ms") { "" } else { "shutdown_grace_ms = 0" };
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
upstream = "{upstream}"
{grace}
{server_extra}

[files]
catalog = "catalog.toml"
entitlements = "entitlements.json"
watch = false

{rest}

[[routes]]
path = "/v1/face/compare"
feature = "face-comparison-1-1"

[[routes]]
path = "/v1/ocr/license-plate"
feature = "license-plate-recognition"

[[routes]]
path = "/v1/detect/*"
feature = "object-detection"

[[routes]]
path = "/v1/image-search/search"
feature = "image-search"
op = "search"
"#
    )
}

/// A catalog with one family (`face_body`, no cap) holding the three features `main_toml` routes
/// to, each with the given billing list (e.g. `r#"["payg"]"#`), followed by `extra` TOML.
pub fn small_catalog(face_comparison: &str, license_plate: &str, object_detection: &str, extra: &str) -> String {
    format!(
        r#"currency = "CNY"
[families.face_body]
name = "Face and Body"
[features.face-comparison-1-1]
family = "face_body"
billing = {face_comparison}
[features.license-plate-recognition]
family = "face_body"
billing = {license_plate}
[features.object-detection]
family = "face_body"
billing = {object_detection}
{extra}"#
    )
}

/// The standard test tenants: `acme` (face comparison plan at `plan_qps`, with an optional
/// active temporary upgrade), `globex` (text recognition only, no plan).
pub fn entitlements(plan_qps: u32, upgrade_qps: Option<u32>) -> String {
    let upgrades = match upgrade_qps {
        Some(q) => {
            format!(r#", "temporary_upgrades": [{{"qps": {q}, "from": "{}", "until": "{}"}}]"#, at(-60), at(3600))
        }
        None => String::new(),
    };
    format!(
        r#"{{"tenants": {{
  "acme": {{"api_keys": ["{acme}"], "services": ["face_body", "object_detection"],
    "qps_plans": [{{"feature": "face-comparison-1-1", "qps": {plan_qps}, "effective_at": "{from}", "expires_at": "{until}"{upgrades}}}]}},
  "globex": {{"api_keys": ["{globex}"], "services": ["text_recognition"]}}
}}}}"#,
        acme = key_hash("key-acme"),
        globex = key_hash("key-globex"),
        from = at(-3600),
        until = at(86400),
    )
}

pub struct ConfigDir {
    pub dir: tempfile::TempDir,
}

impl ConfigDir {
    pub fn new(main: &str, catalog: &str, entitlements: &str) -> ConfigDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("turnstile.toml"), main).expect("write");
        std::fs::write(dir.path().join("catalog.toml"), catalog).expect("write");
        std::fs::write(dir.path().join("entitlements.json"), entitlements).expect("write");
        ConfigDir { dir }
    }
    pub fn main(&self) -> PathBuf {
        self.dir.path().join("turnstile.toml")
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub stdout_lines: Vec<String>,
    pub stderr_path: PathBuf,
}

fn parse_addr(line: &str, key: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("{key}=http://"))? + key.len() + "=http://".len();
    let rest = &line[start..];
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].trim_end_matches('/').parse().ok()
}

/// `turnstile serve --config <cfg>` with `env`, its stdout read up to the listening line:
/// the child (stderr discarded) and that line. For tests that act at the very moment the
/// gateway says it listens; [`Gateway::start`] waits a little longer.
pub fn serve_raw(cfg: &ConfigDir, env: &[(&str, &str)]) -> (Child, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config", cfg.main().to_str().expect("utf-8 path")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start turnstile");
    let mut banner = String::new();
    BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut banner).expect("banner");
    (child, banner)
}

impl Gateway {
    /// Starts `turnstile serve` with `args` (after `serve`) and waits for its listening line.
    pub fn start_with(args: &[&str], env: &[(&str, &str)], log_dir: &Path) -> Gateway {
        let stderr_path = log_dir.join(format!("turnstile-{}.log", std::process::id()));
        let stderr = std::fs::File::create(&stderr_path).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").args(args).stdout(Stdio::piped()).stderr(stderr).env_remove("TURNSTILE_ADMIN_TOKEN");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start turnstile");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let first = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("turnstile did not start: {}", std::fs::read_to_string(&stderr_path).unwrap_or_default());
            }
        };
        let addr = parse_addr(&first, "tenant").expect("tenant address in the banner");
        let admin = parse_addr(&first, "admin").expect("admin address in the banner");
        lines.push(first);
        while let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            lines.push(l);
        }
        Gateway { child, addr, admin, stdout_lines: lines, stderr_path }
    }

    pub fn start(cfg: &ConfigDir) -> Gateway {
        Self::start_env(cfg, &[])
    }

    pub fn start_env(cfg: &ConfigDir, env: &[(&str, &str)]) -> Gateway {
        let main = cfg.main();
        Self::start_with(&["--config", main.to_str().expect("utf-8 path")], env, cfg.path())
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`TERM`, `INT`) and waits up to 5 s for the exit status.
    pub fn signal_and_wait(&mut self, signal: &str) -> Option<std::process::ExitStatus> {
        let _ = Command::new("kill").args([&format!("-{signal}"), &self.child.id().to_string()]).status();
        for _ in 0..200 {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }

    /// Waits up to `within` for the process to exit by itself; its status, or None.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }

    /// Signals the gateway (`TERM`, `INT`) off the async runtime, waits for it to exit and
    /// reaps it; returns the exit status (None if it did not exit within 5 s).
    pub async fn stop(mut self, signal: &'static str) -> Option<std::process::ExitStatus> {
        tokio::task::spawn_blocking(move || self.signal_and_wait(signal)).await.expect("join")
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self, c: &TestClient) -> String {
        String::from_utf8_lossy(&get(c, &self.admin_url("/metrics"), &[]).await.body).into_owned()
    }

    /// Units billed for `feature` in a scrape of the metrics, every tenant and payer together.
    pub async fn billed_units(&self, feature: &str) -> f64 {
        self.feature_total("turnstile_billed_units_total", feature).await
    }

    /// The pay-as-you-go amount of `feature` in a scrape of the metrics, every tenant and
    /// currency together.
    pub async fn payg_amount(&self, feature: &str) -> f64 {
        self.feature_total("turnstile_payg_amount_total", feature).await
    }

    /// The sum of the labelled series of counter `name` for `feature` in a scrape.
    async fn feature_total(&self, name: &str, feature: &str) -> f64 {
        let (series, label) = (format!("{name}{{"), format!("feature=\"{feature}\""));
        self.metrics(&client())
            .await
            .lines()
            .filter(|l| l.starts_with(&series) && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn error_code(&self) -> String {
        assert_eq!(self.header("content-type"), Some("application/json"));
        let v = self.json();
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error message: {v}");
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

pub async fn send(c: &TestClient, method: Method, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(Full::new(Bytes::copy_from_slice(body))).expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(20), c.request(req))
        .await
        .expect("response within 20 s")
        .expect("response");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body").to_bytes();
    Reply { status: parts.status, headers: parts.headers, body }
}

/// Like [`get`], but `None` instead of a panic when nothing answers (a server still starting).
pub async fn try_get(c: &TestClient, url: &str) -> Option<Reply> {
    let req = Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req)).await.ok()?.ok()?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.ok()?.to_bytes();
    Some(Reply { status: parts.status, headers: parts.headers, body })
}

pub async fn get(c: &TestClient, url: &str, headers: &[(&str, &str)]) -> Reply {
    send(c, Method::GET, url, headers, b"").await
}

pub async fn post(c: &TestClient, url: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    send(c, Method::POST, url, headers, body).await
}
