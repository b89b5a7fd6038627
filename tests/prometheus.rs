//! The metrics against real Prometheus tools: `promtool check metrics`, and a Prometheus server
//! scraping the gateway on loopback, queried through its HTTP API.
//!
//! Needs Debian's `prometheus` package (`.ci/run` installs it). Without it these tests print a
//! notice and pass, except under CI (`CI` set), where a missing tool is a failure.

mod common;

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;

fn tool(name: &str) -> Option<String> {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().ok()?;
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    if !path.is_empty() {
        return Some(path);
    }
    assert!(std::env::var_os("CI").is_none(), "{name} is not installed (apt-get install prometheus)");
    eprintln!("NOTICE: {name} not installed; skipping (apt-get install prometheus)");
    None
}

async fn traffic(gw: &Gateway) -> u64 {
    let c = client();
    let mut admitted = 0;
    for _ in 0..5 {
        if post(&c, &gw.url("/v1/face/compare"), &[("x-api-key", "key-acme")], b"{}").await.status == StatusCode::OK {
            admitted += 1;
        }
    }
    for h in [&[][..], &[("x-api-key", "bad")][..]] {
        post(&c, &gw.url("/v1/face/compare"), h, b"{}").await;
    }
    post(&c, &gw.url("/v1/nowhere"), &[("x-api-key", "key-acme")], b"{}").await;
    post(&c, &gw.url("/v1/face/compare"), &[("x-api-key", "key-globex")], b"{}").await;
    for _ in 0..4 {
        post(&c, &gw.url("/v1/ocr/license-plate"), &[("x-api-key", "key-globex")], b"{}").await;
    }
    admitted
}

async fn start() -> (Upstream, ConfigDir, Gateway) {
    let up = Upstream::start().await;
    let cfg = ConfigDir::new(&main_toml(&up.url(), "", ""), SHIPPED_CATALOG, &entitlements(40, None));
    let gw = Gateway::start(&cfg);
    (up, cfg, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_check() {
    let Some(promtool) = tool("promtool") else { return };
    let (_up, _cfg, gw) = start().await;
    traffic(&gw).await;
    let body = get(&client(), &gw.admin_url("/metrics"), &[]).await.body;
    let text = String::from_utf8_lossy(&body).into_owned();
    for name in [
        "turnstile_requests_total",
        "turnstile_billed_units_total",
        "turnstile_request_duration_seconds_bucket",
        "turnstile_upstream_duration_seconds_bucket",
        "turnstile_config_reloads_total",
        "turnstile_config_generation",
        "turnstile_ledger_flush_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from\n{text}");
    }
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child.stdin.take().expect("stdin").write_all(&body).expect("write");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool: {report}");
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_gateway() {
    let Some(prometheus) = tool("prometheus") else { return };
    let (_up, cfg, gw) = start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let prom_cfg = cfg.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: turnstile\n    static_configs:\n      - targets: ['{}']\n",
            gw.admin
        ),
    )
    .expect("write");
    let log = std::fs::File::create(cfg.path().join("prometheus.log")).expect("log");
    let _prom = Killed(
        Command::new(prometheus)
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!("--storage.tsdb.path={}", cfg.path().join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus"),
    );
    let admitted = traffic(&gw).await;
    assert_eq!(admitted, 5);
    let c = client();
    let query = "sum(turnstile_requests_total%7Btenant%3D%22acme%22%2Cfeature%3D%22face-comparison-1-1%22%2Coutcome%3D%22admitted%22%7D)";
    let url = format!("http://127.0.0.1:{port}/api/v1/query?query={query}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = match try_get(&c, &url).await {
            Some(r) if r.status == StatusCode::OK => {
                r.json()["data"]["result"][0]["value"][1].as_str().map(str::to_string)
            }
            _ => None,
        };
        if value.as_deref() == Some("5") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the 5 admitted requests (last: {value:?}); log:\n{}",
            std::fs::read_to_string(cfg.path().join("prometheus.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let up = format!("http://127.0.0.1:{port}/api/v1/query?query=up%7Bjob%3D%22turnstile%22%7D");
    assert_eq!(get(&c, &up, &[]).await.json()["data"]["result"][0]["value"][1], "1");
}
