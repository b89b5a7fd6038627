//! `deploy/compose/cluster.yml` (cluster mode on one machine) agrees with what it runs: Redis
//! with `appendonly yes` + `appendfsync always`; three replicas that publish their container
//! ports (the listen ports of the `turnstile.toml` they mount) on distinct host ports, mount the
//! catalog and entitlements that file names, keep their ledgers apart, and reach Redis and the
//! stand-in upstream at the service names and ports the file gives; `expected_replicas` is the
//! number of replicas; Prometheus scrapes every replica's admin port. There is no container
//! engine where this was written (`docker compose config` cannot run), so the YAML is checked
//! here; the same `turnstile.toml`, with the hosts moved to loopback, then passes `turnstile check`
//! against a real `redis-server` with the compose file's flags and serves a tenant call.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::redis::{Opts, RedisServer};
use common::*;
use http::StatusCode;
use serde_norway::Value;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/compose");
const REPLICAS: [&str; 3] = ["turnstile-1", "turnstile-2", "turnstile-3"];

fn compose() -> Value {
    let text = std::fs::read_to_string(Path::new(DIR).join("cluster.yml")).expect("read cluster.yml");
    serde_norway::from_str(&text).expect("cluster.yml parses")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("a string: {s:?}")).to_string())
        .collect()
}

fn gateway_toml() -> toml::Value {
    toml::from_str(&std::fs::read_to_string(Path::new(DIR).join("turnstile.toml")).expect("read")).expect("toml")
}

/// (host, port) of `scheme://host:port` or `host:port`.
fn host_port(s: &str) -> (String, u16) {
    let s = s.split("://").last().unwrap_or(s);
    let (h, p) = s.trim_end_matches('/').rsplit_once(':').unwrap_or_else(|| panic!("no port in {s}"));
    (h.to_string(), p.parse().unwrap_or_else(|_| panic!("port of {s}")))
}

/// A `- host:container[:ro]` volume: (source resolved against the compose folder, target, ro).
fn volumes(svc: &Value) -> Vec<(String, String, bool)> {
    strs(&svc["volumes"])
        .into_iter()
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            assert!(parts.len() >= 2, "volume {v}");
            (parts[0].to_string(), parts[1].to_string(), parts.get(2) == Some(&"ro"))
        })
        .collect()
}

#[test]
fn compose_cluster_file_matches_its_configuration() {
    let c = compose();
    let services = c["services"].as_mapping().expect("services");
    let names: BTreeSet<String> = services.keys().map(|k| k.as_str().expect("name").to_string()).collect();
    let want: BTreeSet<String> =
        ["redis", "upstream", "prometheus"].iter().chain(REPLICAS.iter()).map(|s| s.to_string()).collect();
    assert_eq!(names, want);
    let cfg = gateway_toml();

    // Redis: AOF on every write, nothing evicted, data on a named volume.
    let redis = &c["services"]["redis"];
    let cmd = strs(&redis["command"]);
    for (flag, value) in [("--appendonly", "yes"), ("--appendfsync", "always"), ("--maxmemory-policy", "noeviction")] {
        let at = cmd.iter().position(|a| a == flag).unwrap_or_else(|| panic!("redis command lacks {flag}: {cmd:?}"));
        assert_eq!(cmd.get(at + 1).map(String::as_str), Some(value), "{flag}");
    }
    let data = volumes(redis);
    assert!(data.iter().any(|(src, dst, _)| dst == "/data" && c["volumes"].get(src).is_some()), "redis /data volume");

    // The [cluster] section all replicas mount.
    let cl = &cfg["cluster"];
    assert_eq!(cl["store"].as_str(), Some("redis"));
    let urls: Vec<&str> = cl["redis"].as_array().expect("redis URLs").iter().map(|u| u.as_str().unwrap()).collect();
    assert_eq!(urls.len(), 1, "one Redis server");
    assert_eq!(host_port(urls[0]), ("redis".to_string(), 6379), "the `redis` service's default port");
    assert_eq!(cl["expected_replicas"].as_integer(), Some(REPLICAS.len() as i64));
    assert_eq!(cl["on_store_error"].as_str(), Some("deny"));
    assert_eq!(cfg["ledger"]["durability"].as_str(), Some("strict"), "strict: what the fsynced AOF is for");
    let lease = cl["hold_lease_ms"].as_integer().expect("hold_lease_ms");
    assert!(lease > cfg["server"]["upstream_timeout_ms"].as_integer().expect("upstream_timeout_ms"));

    // The upstream service listens where the gateway forwards.
    let (up_host, up_port) = host_port(cfg["server"]["upstream"].as_str().expect("upstream"));
    assert_eq!(up_host, "upstream");
    let up_cmd = strs(&c["services"]["upstream"]["command"]);
    assert_eq!(up_cmd[0], "stand-in");
    let listen = up_cmd.iter().position(|a| a == "--listen").map(|i| up_cmd[i + 1].clone()).expect("--listen");
    assert_eq!(host_port(&listen).1, up_port);

    let (_, listen_port) = host_port(cfg["server"]["listen"].as_str().expect("listen"));
    let (_, admin_port) = host_port(cfg["server"]["admin_listen"].as_str().expect("admin_listen"));
    let ledger_dir = cfg["ledger"]["dir"].as_str().expect("ledger dir").to_string();
    let mut host_ports = BTreeSet::new();
    let mut ledgers = BTreeSet::new();
    for name in REPLICAS {
        let svc = &c["services"][name];
        assert_eq!(strs(&svc["command"]), ["serve", "--config", "/etc/turnstile/turnstile.toml"], "{name}");
        // Built from the repository's Dockerfile (compose builds the tag once, so no service
        // tries to pull a `turnstile:local` that no registry has).
        let build = svc["build"].as_str().unwrap_or_else(|| panic!("{name}: build"));
        assert!(Path::new(DIR).join(build).join("Dockerfile").is_file(), "{name}: {build}/Dockerfile");
        assert_eq!(svc["image"], c["services"]["upstream"]["image"], "{name}: the upstream's image");
        assert!(svc["environment"]["TURNSTILE_ADMIN_TOKEN"].as_str().is_some(), "{name}: admin token");
        let deps = &svc["depends_on"];
        assert_eq!(deps["redis"]["condition"].as_str(), Some("service_healthy"), "{name} waits for Redis");
        assert!(deps.get("upstream").is_some(), "{name} depends on upstream");
        // Ports: host:container, container ports = the file's listen ports, host ports distinct.
        let mut container = BTreeSet::new();
        for p in strs(&svc["ports"]) {
            let (h, cport) = p.split_once(':').unwrap_or_else(|| panic!("{name}: port {p}"));
            assert!(host_ports.insert(h.to_string()), "{name}: host port {h} published twice");
            container.insert(cport.parse::<u16>().expect("container port"));
        }
        assert_eq!(container, BTreeSet::from([listen_port, admin_port]), "{name}: container ports");
        // Mounts: the config, the catalog and entitlements it names (files that exist), a ledger.
        let vols = volumes(svc);
        let mount = |target: &str| {
            vols.iter().find(|(_, dst, _)| dst == target).unwrap_or_else(|| panic!("{name}: nothing at {target}"))
        };
        let (src, _, ro) = mount("/etc/turnstile/turnstile.toml");
        assert!(
            *ro && Path::new(DIR).join(src).canonicalize().ok()
                == Path::new(DIR).join("turnstile.toml").canonicalize().ok()
        );
        for key in ["catalog", "entitlements"] {
            let file = cfg["files"][key].as_str().expect("files entry");
            let (src, _, ro) = mount(&format!("/etc/turnstile/{file}"));
            assert!(*ro, "{name}: {file} read-only");
            assert!(Path::new(DIR).join(src).is_file(), "{name}: {src} exists");
        }
        let (vol, dst, ro) = vols
            .iter()
            .find(|(_, dst, _)| ledger_dir.starts_with(dst.as_str()))
            .unwrap_or_else(|| panic!("{name}: no volume holds {ledger_dir}"));
        assert!(!ro && c["volumes"].get(vol.as_str()).is_some(), "{name}: {vol} at {dst} is a writable named volume");
        assert!(ledgers.insert(vol.clone()), "{name} shares ledger volume {vol}");
    }

    // Prometheus scrapes every replica's admin port.
    let prom: Value =
        serde_norway::from_str(&std::fs::read_to_string(Path::new(DIR).join("prometheus.yml")).expect("read"))
            .expect("yaml");
    let vols = volumes(&c["services"]["prometheus"]);
    assert!(vols.iter().any(|(s, d, _)| s == "./prometheus.yml" && d == "/etc/prometheus/prometheus.yml"));
    let job = &prom["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let targets: BTreeSet<String> = strs(&job["static_configs"][0]["targets"]).into_iter().collect();
    let want: BTreeSet<String> = REPLICAS.iter().map(|r| format!("{r}:{admin_port}")).collect();
    assert_eq!(targets, want);
}

/// The compose `turnstile.toml` with its hosts moved to loopback: `turnstile check` passes
/// against a Redis with the compose file's AOF flags (strict mode needs them), and the binary
/// serves a demo tenant's call through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_cluster_configuration_checks_and_serves() {
    let Some(redis) = RedisServer::start(
        "compose_cluster_configuration_checks_and_serves",
        Opts { aof_always: true, cluster: false },
    ) else {
        return;
    };
    let up = Upstream::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let text = std::fs::read_to_string(Path::new(DIR).join("turnstile.toml")).expect("read");
    let text = text
        .replace("\"0.0.0.0:8080\"", "\"127.0.0.1:0\"")
        .replace("\"0.0.0.0:9090\"", "\"127.0.0.1:0\"")
        .replace("\"http://upstream:18080\"", &format!("{:?}", up.url()))
        .replace("\"redis://redis:6379\"", &format!("{:?}", redis.url()))
        .replace("\"/var/lib/turnstile/ledger\"", "\"ledger\"")
        .replace("watch = true", "watch = false");
    assert!(!text.contains("0.0.0.0") && !text.contains("redis:6379") && !text.contains("upstream:"), "{text}");
    std::fs::write(dir.path().join("turnstile.toml"), &text).expect("write");
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    for f in ["catalog.toml", "entitlements.json"] {
        std::fs::copy(config.join(f), dir.path().join(f)).expect("copy");
    }
    let main = dir.path().join("turnstile.toml");
    let out = Command::new(BIN).arg("check").arg("--config").arg(&main).output().expect("run check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check: {err}");
    assert!(!err.contains("appendonly"), "the compose Redis flags satisfy strict mode: {err}");

    let gw = Gateway::start_with(&["--config", main.to_str().expect("utf-8")], &[], dir.path());
    let c = client();
    let r = post(&c, &gw.url("/v1/face/compare"), &[("x-api-key", "demo-acme-key")], b"{}").await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    // The call went through Redis: the tenant's bucket is there.
    let keys = redis.cli(&["--scan", "--pattern", "turnstile:{acme}:*"]);
    assert!(!keys.is_empty(), "no acme key in Redis: the replica did not use the Redis store\n{}", gw.logs());
}
