//! Several gateway replicas on one Redis (cluster mode, SPEC §11), for black-box tests: each
//! replica is the real binary with its own config dir (own ledger, own log file) and the same
//! `[cluster]` section. Use with `common::redis::RedisServer` / `RedisCluster`.
//!
//! ```ignore
//! let Some(redis) = RedisServer::start("my_test", Opts::default()) else { return };
//! let up = Upstream::start().await;
//! let set = Replicas::start(2, &up.url(), &cluster_section(&[redis.url()], ""), "", &catalog, &ents, &[]);
//! set.gw[0].url("/v1/face/compare");
//! ```
#![allow(dead_code)]

use super::{main_toml, ConfigDir, Gateway};

/// The admin token every replica of [`Replicas::start`] is given (`TURNSTILE_ADMIN_TOKEN`).
pub const ADMIN_TOKEN: &str = "cluster-test-token";

/// A `[cluster]` section with `store = "redis"` on `urls` (one: a server; several: a Redis
/// Cluster), followed by `extra` lines inside the section (e.g. `on_store_error = "local"`,
/// `expected_replicas = 2`, `key_prefix = "t1"`, `hold_lease_ms = 40000`).
pub fn cluster_section(urls: &[String], extra: &str) -> String {
    let list = urls.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ");
    format!("[cluster]\nstore = \"redis\"\nredis = [{list}]\n{extra}\n")
}

/// N replicas of one configuration, each in its own config dir.
pub struct Replicas {
    /// Dropped after `gw` (fields drop in order): the processes stop before their dirs go.
    pub gw: Vec<Gateway>,
    pub cfg: Vec<ConfigDir>,
}

impl Replicas {
    /// Starts `n` replicas with `main_toml(upstream, server_extra, cluster + rest)`, the same
    /// catalog and entitlements, and `env` (plus `TURNSTILE_ADMIN_TOKEN` = [`ADMIN_TOKEN`]).
    pub fn start(
        n: usize,
        upstream: &str,
        cluster: &str,
        rest: &str,
        catalog: &str,
        entitlements: &str,
        env: &[(&str, &str)],
    ) -> Replicas {
        let mut cfg = Vec::with_capacity(n);
        let mut gw = Vec::with_capacity(n);
        for _ in 0..n {
            let main = main_toml(upstream, "", &format!("{cluster}\n{rest}"));
            let c = ConfigDir::new(&main, catalog, entitlements);
            let mut e: Vec<(&str, &str)> = vec![("TURNSTILE_ADMIN_TOKEN", ADMIN_TOKEN)];
            e.extend_from_slice(env);
            gw.push(Gateway::start_env(&c, &e));
            cfg.push(c);
        }
        Replicas { gw, cfg }
    }

    /// The `Authorization` header of the admin API.
    pub fn admin_auth() -> (&'static str, String) {
        ("authorization", format!("Bearer {ADMIN_TOKEN}"))
    }
}

/// The value of an unlabelled gauge or counter in a `/metrics` text (`None` when absent).
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}
