//! Real Redis processes for tests (cluster mode, SPEC §11): one `redis-server` on a free loopback
//! port in a temp dir, or a 3-node Redis Cluster made with `redis-cli --cluster create`. Every
//! process started is killed (SIGKILL) and reaped on drop; `kill9` + `restart` reuse the same
//! port and directory, so an append-only file survives the crash.
//!
//! Shared by the black-box tests (`mod common;` → `common::redis`) and the library's unit tests
//! (`#[path]` include from `src/store/redis.rs`), so it uses only std and `tempfile`.
//!
//! Without `redis-server` on PATH the constructors return `None` after printing a notice, so a
//! developer machine without Redis still passes; under `CI=true` they panic instead (`.ci/run`
//! installs Debian's redis-server).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `redis-server` and `redis-cli` can be run. Under `CI=true` their absence panics.
pub fn available(test: &str) -> bool {
    let ok = ["redis-server", "redis-cli"]
        .iter()
        .all(|bin| Command::new(bin).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok());
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{test}: redis-server/redis-cli not found, and CI=true (.ci/run installs Debian's redis-server)");
        }
        eprintln!("NOTICE {test}: redis-server not on PATH, skipped (apt-get install redis-server redis-tools)");
    }
    ok
}

/// A loopback port nobody listens on right now (the OS's next ephemeral port).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind a free port")
}

/// Options of one server.
#[derive(Debug, Clone, Default)]
pub struct Opts {
    /// `appendonly yes` + `appendfsync always` (SPEC §11.5 strict mode).
    pub aof_always: bool,
    /// `cluster-enabled yes` (a node of [`RedisCluster`]).
    pub cluster: bool,
}

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    /// Cluster bus port (cluster nodes only).
    bus_port: u16,
    dir: PathBuf,
    opts: Opts,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// Starts a server in a fresh temp dir, or `None` when Redis is not installed (see [`available`]).
    pub fn start(test: &str, opts: Opts) -> Option<RedisServer> {
        if !available(test) {
            return None;
        }
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        // A port taken between `free_port` and the bind makes redis-server exit: try again.
        for _ in 0..5 {
            let mut s = RedisServer {
                port: free_port(),
                bus_port: free_port(),
                dir: dir.clone(),
                opts: opts.clone(),
                child: None,
                _tmp: None,
            };
            if s.spawn().is_ok() {
                s._tmp = Some(tmp);
                return Some(s);
            }
        }
        panic!("{test}: redis-server did not start (see {}/redis.log)", dir.display());
    }

    /// `redis://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn spawn(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("redis-server");
        // Everything on the command line: no config file, nothing shared with a system Redis.
        cmd.args(["--bind", "127.0.0.1", "--protected-mode", "no", "--daemonize", "no", "--save", ""])
            .args(["--port", &self.port.to_string()])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--logfile", "redis.log"]);
        if self.opts.aof_always {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        }
        if self.opts.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                .args(["--cluster-port", &self.bus_port.to_string()])
                .args(["--cluster-node-timeout", "2000"]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        let mut child = cmd.spawn().map_err(|e| format!("spawn redis-server: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("redis-server exited: {status}"));
            }
            if ping(self.port) {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("redis-server did not answer PING within 5 s".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9: no shutdown, no final fsync; the process is reaped.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same port and directory (after [`RedisServer::kill9`]).
    pub fn restart(&mut self) {
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match self.spawn() {
                Ok(()) => return,
                // The old socket may linger a moment.
                Err(e) if Instant::now() > deadline => panic!("restart redis-server on {}: {e}", self.port),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// One command through `redis-cli`, its trimmed stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        cli(self.port, args)
    }

    /// Whether the process runs (not killed by [`RedisServer::kill9`]).
    pub fn is_up(&self) -> bool {
        self.child.is_some()
    }

    /// The process id (for SIGSTOP/SIGCONT), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A 3-node Redis Cluster, no replicas: every slot served by one of three masters.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(test: &str) -> Option<RedisCluster> {
        Self::start_with(test, false)
    }

    /// Like [`RedisCluster::start`], every node with `appendfsync always` when asked.
    pub fn start_with(test: &str, aof_always: bool) -> Option<RedisCluster> {
        let nodes: Vec<RedisServer> =
            (0..3).map(|_| RedisServer::start(test, Opts { aof_always, cluster: true })).collect::<Option<_>>()?;
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| n.addr()));
        args.extend(["--cluster-replicas".into(), "0".into(), "--cluster-yes".into()]);
        let out = Command::new("redis-cli")
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{test}: redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok(test);
        Some(cluster)
    }

    /// Waits (≤ 10 s) until every node sees the whole cluster as ok (after a start or the
    /// restart of a node).
    pub fn wait_ok(&self, test: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.nodes.iter().all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "{test}: cluster did not reach cluster_state:ok in 10 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One URL per node, as `[cluster].redis` lists them.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

/// Raw RESP `PING` → `+PONG` (or `-LOADING`, not ready yet).
fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
