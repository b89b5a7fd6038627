use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use turnstile::clock::SystemClock;
use turnstile::config::ConfigSource;
use turnstile::server::{self, Gateway, Listeners};

#[derive(Parser)]
#[command(name = "turnstile", version, about = "QPS admission gateway for vision-AI inference services")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

const DEFAULT_CONFIG: &str = "config/turnstile.toml";

/// At shutdown, the longest wait for the ledger's last commit.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway.
    Serve {
        /// Main configuration file [default: config/turnstile.toml; with --demo: the embedded demo]
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start an in-process stand-in upstream and point the gateway at it.
        #[arg(long)]
        demo: bool,
    },
    /// Validate all configuration files; print every error.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Print the sha256 hex that entitlements store for KEY.
    HashKey {
        #[arg(value_parser = non_blank_key)]
        key: String,
    },
    /// Run only the stand-in inference upstream (for load tests and docker-compose).
    StandIn {
        #[arg(long, default_value = "127.0.0.1:18080")]
        listen: std::net::SocketAddr,
    },
    /// Price a purchase or usage from the catalog.
    #[command(subcommand)]
    Quote(turnstile::quote::QuoteCmd),
}

/// An API key for `hash-key`. A blank one is refused: requests carry no empty key (one
/// without a key is 401 `missing_api_key`), so its hash could never match; it is what
/// `turnstile hash-key "$KEY"` gets with `KEY` unset.
fn non_blank_key(s: &str) -> Result<String, String> {
    if s.trim().is_empty() {
        Err("KEY is empty: give the API key to hash (no request can carry an empty key)".into())
    } else {
        Ok(s.to_string())
    }
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TURNSTILE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A failed log write (stderr's reader gone: a dead log shipper, `serve 2>&1 | head`) is
        // dropped. Reported, it is an `eprintln!` to that same stderr, which panics: the task
        // that logged dies (the signal handler's, and SIGTERM is ignored from then on).
        .log_internal_errors(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// The async runtime: one thread per CPU this process may run on. On a single CPU (e.g. pinned
/// with taskset) a current-thread runtime avoids the work-stealing scheduler's overhead.
/// `serve` always uses a current-thread one: its tenant listener runs on per-core workers
/// (`server::run`), the main runtime only has the admin listener, reloads and signals.
fn runtime(one_thread: bool) -> Option<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let built = if cpus == 1 || one_thread {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cpus).enable_all().build()
    };
    built.map_err(|e| eprintln!("turnstile: cannot start the runtime: {e}")).ok()
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Quote(q) => turnstile::quote::run(q),
        Cmd::StandIn { listen } => {
            init_logs(cli.log_format);
            let Some(rt) = runtime(false) else { return ExitCode::FAILURE };
            rt.block_on(async {
                match turnstile::standin::spawn(listen).await {
                    Ok((addr, stop)) => {
                        println!("stand-in upstream listening: http://{addr}");
                        server::termination().await;
                        let _ = stop.send(true);
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("turnstile: cannot listen on {listen}: {e}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Cmd::HashKey { key } => {
            println!("{}", turnstile::hash_key(&key));
            ExitCode::SUCCESS
        }
        Cmd::Check { config } => {
            let source = ConfigSource::Files { main: config };
            match server::load(&source, None, 0) {
                Ok((texts, snap)) => {
                    if !check_cluster_store(&texts.main_name, &snap.settings) {
                        return ExitCode::FAILURE;
                    }
                    println!(
                        "ok: {} ({} routes), {} ({} features), {} ({} tenants)",
                        texts.main_name,
                        snap.router.routes().len(),
                        texts.catalog_name,
                        snap.catalog.features.len() - 1,
                        texts.entitlements_name,
                        snap.tenants.len()
                    );
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    eprintln!("{} error(s)", errors.0.len());
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Serve { config, demo } => {
            init_logs(cli.log_format);
            let source = match (config, demo) {
                (Some(main), _) => ConfigSource::Files { main },
                (None, true) => ConfigSource::Embedded,
                (None, false) => ConfigSource::Files { main: DEFAULT_CONFIG.into() },
            };
            let Some(rt) = runtime(true) else { return ExitCode::FAILURE };
            rt.block_on(serve(source, demo))
        }
    }
}

async fn serve(source: ConfigSource, demo: bool) -> ExitCode {
    // SIGHUP's default action ends the process: the handler is in place before anything else,
    // so a SIGHUP while starting (or right after the listening line) is a reload, not an exit.
    // One that arrives before serving is kept and reloads once serving starts.
    let hangups = hangup_signals();
    // Likewise SIGTERM and SIGINT: one that arrives while starting stops the gateway cleanly
    // once it serves (the grace, an empty drain, the flush), instead of killing it.
    let stops = server::stop_signals();
    let mut standin = None;
    let upstream_override = if demo {
        match turnstile::standin::spawn(([127, 0, 0, 1], 0).into()).await {
            Ok((addr, stop)) => {
                standin = Some(stop);
                format!("http://{addr}").parse().ok()
            }
            Err(e) => {
                eprintln!("turnstile: cannot start the demo upstream: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let (texts, snap) = match server::load(&source, upstream_override.as_ref(), 1) {
        Ok(x) => x,
        Err(errors) => {
            eprintln!("{errors}");
            eprintln!("turnstile: {} configuration error(s); not starting", errors.0.len());
            return ExitCode::FAILURE;
        }
    };
    let listeners = match Listeners::bind(&snap).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("turnstile: cannot listen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (tenant_addr, admin_addr) = match (listeners.tenant.local_addr(), listeners.admin.local_addr()) {
        (Ok(a), Ok(b)) => (a, b),
        _ => {
            eprintln!("turnstile: cannot read the listen addresses");
            return ExitCode::FAILURE;
        }
    };
    let drain = snap.settings.upstream_timeout + Duration::from_secs(1);
    let upstream = snap.settings.upstream.clone();
    survive_file_size_limit();
    // Cluster mode (SPEC §11): connect to Redis before serving; a replica that cannot reach it
    // at start does not start (it has no shared state to serve from yet).
    let redis = if snap.settings.cluster.store == turnstile::config::gateway::StoreKind::Redis {
        let tenants: Vec<&str> = snap.tenants.iter().map(|t| t.label).collect();
        match turnstile::store::redis::RedisStore::open(&snap.settings.cluster, None, tenants).await {
            Ok(r) => {
                // Strict mode: what check refuses in this Redis (SPEC §11.5: no fsynced AOF, a
                // node that cannot be read), serve refuses too, with the same lines; the promise
                // of a 2xx only once the charge is on Redis's disk could not hold. Batched mode
                // starts as before (check only warns of the AOF; the extra connections and a
                // Redis Cluster node that is down must not delay or stop a replica's start).
                if snap.settings.durability == turnstile::config::gateway::Durability::Strict {
                    let found = cluster_store_findings(&texts.main_name, &snap.settings).await;
                    if !found.errors.is_empty() {
                        for e in &found.errors {
                            eprintln!("{e}");
                        }
                        eprintln!(
                            "turnstile: {} error(s) in the cluster store; not starting (or set [ledger].durability = \"batched\")",
                            found.errors.len()
                        );
                        return ExitCode::FAILURE;
                    }
                }
                Some(r)
            }
            Err(e) => {
                eprintln!(
                    "turnstile: cluster.redis: {e}; not starting (start Redis, or set [cluster].store = \"local\")"
                );
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let gw = match Gateway::with_redis(texts, snap, source, upstream_override, SystemClock::shared(), redis) {
        Ok(gw) => gw,
        Err(e) => {
            eprintln!("turnstile: {e}; not starting (fix or move the ledger; balances are never reset silently)");
            return ExitCode::FAILURE;
        }
    };
    // Cluster mode: the upgrades other replicas stored apply from the first request (SPEC §11.4).
    if let Err(e) = gw.sync_overrides().await {
        tracing::warn!(error = %e, "cannot read the shared upgrades yet; applying them once Redis answers");
    }
    // The file watch (SPEC §8) is in place before the listening line, and then the files are
    // compared once with what is served: an edit made since they were read at start (ledger
    // recovery, Redis) came before the watch and would otherwise stay unapplied until the next.
    let watch_paths = gw.watch_paths().await;
    let _watcher = if gw.snapshot.load().settings.watch && !watch_paths.is_empty() {
        match turnstile::reload::watch(gw.clone(), watch_paths, Duration::from_millis(200)) {
            Ok(w) => {
                gw.reload_if_changed().await;
                Some(w)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the configuration files; reload with SIGHUP or the admin API");
                None
            }
        }
    } else {
        None
    };
    println!("turnstile listening: tenant=http://{tenant_addr} admin=http://{admin_addr} upstream={upstream}");
    if demo {
        let (tenant, key) = turnstile::DEMO_KEYS[0];
        println!("demo: stand-in upstream at {upstream}; demo API key for tenant {tenant}: {key}");
        println!(
            "try:  curl -i -H 'x-api-key: {key}' -d '{{\"image_a\":\"a.jpg\",\"image_b\":\"b.jpg\"}}' http://{tenant_addr}/v1/face/compare"
        );
    }
    tracing::info!(%tenant_addr, %admin_addr, %upstream, generation = gw.generation(), "serving");
    tokio::spawn(reload_on_sighup(gw.clone(), hangups));
    let workers = server::run(gw.clone(), listeners, stops, drain).await;
    // Cluster batched mode: the settlements spawned after their answers reach Redis first.
    let unsettled = gw.billing.drain_deferred(CLOSE_WAIT).await;
    if unsettled > 0 {
        tracing::error!(
            calls = unsettled,
            "settlements not acknowledged by Redis at shutdown; those calls are not charged"
        );
    }
    // Cluster mode, the journal (charges made on the `local` fallback, settlements Redis failed
    // after their answers went out, under either policy): they reach Redis now if it answers;
    // what is left stays in the journal file, replayed at the next start with this ledger
    // folder, and is reported (SPEC §7: log, exit status 1): until then Redis lacks it.
    let unreplayed = match gw.billing.remote() {
        Some(r) => {
            let left = r.replay_at_exit(CLOSE_WAIT).await;
            // Bounded, as the ledger's last flush: a failing disk must not hold the exit.
            if tokio::time::timeout(CLOSE_WAIT, r.sync_journal_async()).await.is_err() {
                tracing::error!("the fallback's journal file was not synced within 3 s");
            }
            left
        }
        None => 0,
    };
    if unreplayed > 0 {
        tracing::error!(
            entries = unreplayed,
            journal = gw.billing.remote().and_then(|r| r.journal_path()).unwrap_or_default(),
            "charges made on the local fallback were not replayed to Redis (unreachable); they are kept in the journal and replayed when this replica starts again with this ledger folder"
        );
    }
    // Bounded: a failing disk must not keep SIGTERM from finishing.
    let flushed = gw.billing.close(CLOSE_WAIT);
    match &flushed {
        Ok(()) => tracing::info!(ledger = gw.billing.ledger_name(), "ledger flushed"),
        Err(e) => tracing::error!(
            ledger = gw.billing.ledger_name(),
            records = e.records,
            "ledger not flushed: {e}; the charges in them are lost"
        ),
    }
    // The low-balance alerts fired until now (the last durable strict charges included) are
    // marked in the ledger: they never fire again, so their webhook POSTs go out first.
    let undelivered = alerts_delivered(&gw, CLOSE_WAIT).await;
    if undelivered > 0 {
        tracing::error!(
            alerts = undelivered,
            "low-balance alerts not delivered to the webhook at shutdown; each was logged when it fired (package balance low)"
        );
    }
    if let Some(stop) = standin {
        let _ = stop.send(true);
    }
    tracing::info!("stopped");
    // The workers' runtimes end last: a Redis reconnect started on one runs on its timers.
    drop(workers);
    if flushed.is_ok() && unreplayed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Waits at most `wait` for the webhook deliveries of the alerts fired; returns how many are
/// still not through theirs.
async fn alerts_delivered(gw: &turnstile::gateway::Gateway, wait: Duration) -> usize {
    let until = tokio::time::Instant::now() + wait;
    while gw.billing.alerts_pending() > 0 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.billing.alerts_pending()
}

/// A file-size limit (RLIMIT_FSIZE) reached by the ledger is a failed write like a full disk:
/// the commit fails with EFBIG and is retried (SPEC §7). The SIGXFSZ that comes with it would
/// otherwise kill the process; a registered handler replaces that default for good.
fn survive_file_size_limit() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::from_raw(libc::SIGXFSZ)) {
            Ok(mut s) => {
                tokio::spawn(async move { while s.recv().await.is_some() {} });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGXFSZ; a file-size limit on the ledger would stop the process")
            }
        }
    }
}

/// The SIGHUP stream, registered at once (the signal's default action would end the process).
#[cfg(unix)]
type Hangups = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangups = ();

fn hangup_signals() -> Hangups {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP; reload with the admin API or the file watch");
                None
            }
        }
    }
}

/// SIGHUP reloads the configuration, like nginx.
async fn reload_on_sighup(gw: std::sync::Arc<Gateway>, hangups: Hangups) {
    #[cfg(unix)]
    {
        let Some(mut hup) = hangups else { return };
        while hup.recv().await.is_some() {
            let _ = gw.reload("SIGHUP").await;
        }
    }
    #[cfg(not(unix))]
    let _ = (gw, hangups);
}

/// What `check` and `serve` find in the Redis that `[cluster]` names (SPEC §11.5).
#[derive(Default)]
struct StoreFindings {
    /// Each a line naming the file and field: check fails on any.
    errors: Vec<String>,
    /// Lines check prints as warnings and passes.
    warnings: Vec<String>,
}

/// With `[cluster].store = "redis"` (SPEC §11.5): connects to every listed node (and, for a
/// Redis Cluster, every node it names) and reads its AOF policy. Without `appendonly yes` +
/// `appendfsync always`: an error in strict mode (a 2xx must not go out before its charge is on
/// Redis's disk), a warning in batched mode. A node that cannot be reached or read is an error.
async fn cluster_store_findings(file: &str, settings: &turnstile::config::gateway::Settings) -> StoreFindings {
    use turnstile::config::gateway::{Durability, StoreKind};
    let c = &settings.cluster;
    let mut found = StoreFindings::default();
    if c.store != StoreKind::Redis {
        return found;
    }
    let report = turnstile::store::redis::aof_policies(&c.redis, std::time::Duration::from_secs(2)).await;
    let strict = settings.durability == Durability::Strict;
    for (url, r) in report {
        match r {
            Ok((ao, af)) if ao == "yes" && af == "always" => {}
            Ok((ao, af)) => {
                let msg = format!(
                    "{file}: cluster.redis: {url} runs appendonly {ao:?}, appendfsync {af:?}; strict mode needs appendonly yes and appendfsync always (SPEC §11.5)"
                );
                if strict {
                    found.errors.push(msg);
                } else {
                    found.warnings.push(format!("{msg}: in batched mode a Redis crash may lose recent charges"));
                }
            }
            Err(e) => found.errors.push(format!("{file}: cluster.redis: {url}: {e}")),
        }
    }
    found
}

/// `turnstile check`'s part of [`cluster_store_findings`]: prints them; false on an error.
fn check_cluster_store(file: &str, settings: &turnstile::config::gateway::Settings) -> bool {
    if settings.cluster.store != turnstile::config::gateway::StoreKind::Redis {
        return true;
    }
    let Some(rt) = runtime(true) else { return false };
    let found = rt.block_on(cluster_store_findings(file, settings));
    for w in &found.warnings {
        eprintln!("warning: {w}");
    }
    for e in &found.errors {
        eprintln!("{e}");
    }
    if !found.errors.is_empty() {
        eprintln!("{} error(s)", found.errors.len());
    }
    found.errors.is_empty()
}
