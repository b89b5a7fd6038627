//! The live control plane (SPEC §8): reload on file change, SIGHUP and the admin API; temporary
//! upgrades and upgrades written back to `entitlements.json` atomically.
//!
//! A new configuration is validated whole, off the async workers, then published with one
//! `ArcSwap` store: requests in flight keep the snapshot they loaded, new ones see the new one,
//! nobody waits. Buckets are keyed by interned (tenant, feature) ids and carry their limit, so a
//! bucket whose limit did not change keeps its state; buckets of removed pairs are dropped.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::catalog::IMAGE_SEARCH;
use crate::config::entitlements::{RawEntitlements, RawUpgrade};
use crate::config::{self, ConfigError, ConfigErrors, ConfigSource, Texts};
use crate::server::Gateway;
use crate::snapshot::Snapshot;

/// What was loaded last (guarded by the gateway's control mutex).
pub struct Control {
    texts: Texts,
    hash: [u8; 32],
}

fn hash(t: &Texts) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [&t.main, &t.catalog, &t.entitlements] {
        h.update(part.as_bytes());
        h.update([0u8]);
    }
    h.finalize().into()
}

impl Control {
    pub fn new(texts: Texts) -> Self {
        Control { hash: hash(&texts), texts }
    }
}

/// Why an admin write was refused.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AboveCap(String),
    #[error("{0}")]
    Downgrade(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the configuration is not valid after the change")]
    Config(ConfigErrors),
    #[error("cannot write {path}: {reason}")]
    Io { path: String, reason: String },
}

impl WriteError {
    pub fn code(&self) -> &'static str {
        match self {
            WriteError::NotFound(_) => "not_found",
            WriteError::AboveCap(_) => "qps_above_cap",
            WriteError::Downgrade(_) => "downgrade_not_allowed",
            WriteError::Invalid(_) => "invalid_request",
            WriteError::Config(_) => "invalid_config",
            WriteError::Io { .. } => "write_failed",
        }
    }
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            WriteError::NotFound(_) => S::NOT_FOUND,
            WriteError::Downgrade(_) => S::CONFLICT,
            WriteError::AboveCap(_) | WriteError::Invalid(_) | WriteError::Config(_) => S::UNPROCESSABLE_ENTITY,
            WriteError::Io { .. } => S::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Writes `text` to `path` atomically: a temporary file in the same folder, fsync, rename, fsync
/// of the folder. Readers see the old file or the new one, never a mix.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entitlements.json");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

impl Gateway {
    /// Validates `texts` off the async workers and publishes them. Caller holds the control lock.
    async fn publish(&self, ctl: &mut Control, texts: Texts, why: &str) -> Result<u64, ConfigErrors> {
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let upstream = self.upstream_override.clone();
        let (texts, built) = tokio::task::spawn_blocking(move || {
            let built = crate::server::build(&texts, upstream.as_ref(), generation);
            (texts, built)
        })
        .await
        .map_err(|e| {
            ConfigErrors(vec![ConfigError { file: "turnstile".into(), path: String::new(), message: e.to_string() }])
        })?;
        let snap = match built {
            Ok(s) => s,
            Err(errors) => {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(
                    why,
                    errors = errors.0.len(),
                    "configuration rejected; still serving generation {}:\n{errors}",
                    generation - 1
                );
                return Err(errors);
            }
        };
        let old = self.snapshot.load_full();
        warn_restart_only(&old, &snap);
        let removed = removed_pairs(&old, &snap);
        self.snapshot.store(Arc::new(snap));
        // Requests hold a snapshot only for their synchronous decision; keep the old one a moment
        // so its (possibly large) deallocation happens here, not on a request's thread.
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(200));
            drop(old);
        });
        self.generation.store(generation, Ordering::SeqCst);
        self.metrics.config_generation.set(generation as i64);
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        ctl.hash = hash(&texts);
        ctl.texts = texts;
        tracing::info!(why, generation, "configuration reloaded");
        if let Some((tenants, features)) = removed {
            // Memory stays bounded by the configured pairs.
            let keep = move |k: u64| tenants.contains(&((k >> 32) as u32)) && features.contains(&(k as u32));
            self.buckets.retain(&keep);
            self.metrics.retain_pairs(&keep);
        }
        Ok(generation)
    }

    /// The files the watcher should follow.
    pub async fn watch_paths(&self) -> Vec<PathBuf> {
        self.control.lock().await.texts.watch_paths.clone()
    }

    /// Re-reads the files and publishes them (SIGHUP, `POST /admin/v1/reload`).
    pub async fn reload(&self, why: &str) -> Result<u64, ConfigErrors> {
        let mut ctl = self.control.lock().await;
        let texts = match self.read_current(&ctl).await {
            Ok(t) => t,
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!(why, "configuration reload failed:\n{e}");
                return Err(e);
            }
        };
        self.publish(&mut ctl, texts, why).await
    }

    /// Reloads only when the files' contents differ from what is being served (the watcher:
    /// editors, ConfigMap swaps, and our own write-backs, which are already served).
    pub async fn reload_if_changed(&self) {
        let mut ctl = self.control.lock().await;
        match self.read_current(&ctl).await {
            Ok(t) if hash(&t) == ctl.hash => {}
            Ok(t) => {
                let _ = self.publish(&mut ctl, t, "file change").await;
            }
            Err(e) => {
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!("configuration reload after a file change failed:\n{e}");
            }
        }
    }

    async fn read_current(&self, ctl: &Control) -> Result<Texts, ConfigErrors> {
        match &self.source {
            ConfigSource::Embedded => Ok(ctl.texts.clone()),
            source => {
                let source = source.clone();
                tokio::task::spawn_blocking(move || config::read_texts(&source)).await.map_err(|e| {
                    ConfigErrors(vec![ConfigError {
                        file: "turnstile".into(),
                        path: String::new(),
                        message: e.to_string(),
                    }])
                })?
            }
        }
    }

    /// Applies `change` to the served entitlements, validates the result, writes it back
    /// atomically (files) and publishes it. Serialized with reloads and other writes.
    async fn write_entitlements(
        &self,
        why: &str,
        change: impl FnOnce(&Snapshot, &mut RawEntitlements) -> Result<serde_json::Value, WriteError>,
    ) -> Result<serde_json::Value, WriteError> {
        let mut ctl = self.control.lock().await;
        let snap = self.snapshot.load_full();
        let mut raw: RawEntitlements = serde_json::from_str(&ctl.texts.entitlements)
            .map_err(|e| WriteError::Invalid(format!("the served entitlements cannot be re-read: {e}")))?;
        let answer = change(&snap, &mut raw)?;
        let text = serde_json::to_string_pretty(&raw).map_err(|e| WriteError::Invalid(e.to_string()))? + "\n";
        let mut texts = ctl.texts.clone();
        texts.entitlements = text;
        // Validate before touching the file.
        let check = texts.clone();
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        tokio::task::spawn_blocking(move || config::build(&check, generation).map(|_| ()))
            .await
            .map_err(|e| WriteError::Invalid(e.to_string()))?
            .map_err(WriteError::Config)?;
        if let ConfigSource::Files { .. } = self.source {
            let path = PathBuf::from(&texts.entitlements_name);
            let body = texts.entitlements.clone();
            tokio::task::spawn_blocking(move || write_atomically(&path, &body))
                .await
                .map_err(|e| WriteError::Io { path: texts.entitlements_name.clone(), reason: e.to_string() })?
                .map_err(|e| WriteError::Io { path: texts.entitlements_name.clone(), reason: e.to_string() })?;
        }
        self.publish(&mut ctl, texts, why).await.map_err(WriteError::Config)?;
        Ok(answer)
    }

    /// `POST /admin/v1/tenants/{t}/qps-plans/{f}/temporary-upgrade` `{"qps": N, "until": "..."}`.
    pub async fn temporary_upgrade(
        &self,
        tenant: &str,
        feature: &str,
        qps: u32,
        until: &str,
    ) -> Result<serde_json::Value, WriteError> {
        let now = self.clock.unix_nanos();
        let until_ns = crate::time::parse_rfc3339(until).map_err(WriteError::Invalid)?;
        if until_ns <= now {
            return Err(WriteError::Invalid(format!("until {until} must be in the future")));
        }
        let (tenant, feature) = (tenant.to_string(), feature.to_string());
        let until = until.to_string();
        self.write_entitlements("temporary upgrade", move |snap, raw| {
            let ActivePlan { index: plan_index, cap, tz } = active_plan(snap, &tenant, &feature, now)?;
            if let Some((fam, c)) = cap.filter(|(_, c)| qps > *c) {
                return Err(WriteError::AboveCap(format!("{qps} exceeds the {fam} cap of {c}")));
            }
            let plan = raw
                .tenants
                .get_mut(&tenant)
                .and_then(|t| t.qps_plans.get_mut(plan_index))
                .ok_or_else(|| WriteError::NotFound(format!("no active QPS plan for {feature}")))?;
            if qps <= plan.qps {
                return Err(WriteError::Invalid(format!("{qps} is not above the plan's {} QPS", plan.qps)));
            }
            let from = crate::time::format_rfc3339(now, tz);
            plan.temporary_upgrades.push(RawUpgrade { qps, from: from.clone(), until: until.clone() });
            Ok(serde_json::json!({"tenant": tenant, "feature": feature, "qps": qps, "from": from, "until": until}))
        })
        .await
    }

    /// `POST /admin/v1/tenants/{t}/qps-plans/{f}/upgrade` `{"qps": N}`: permanent, never lower.
    pub async fn upgrade(&self, tenant: &str, feature: &str, qps: u32) -> Result<serde_json::Value, WriteError> {
        let now = self.clock.unix_nanos();
        let (tenant, feature) = (tenant.to_string(), feature.to_string());
        self.write_entitlements("upgrade", move |snap, raw| {
            let ActivePlan { index: plan_index, cap, .. } = active_plan(snap, &tenant, &feature, now)?;
            let plan = raw
                .tenants
                .get_mut(&tenant)
                .and_then(|t| t.qps_plans.get_mut(plan_index))
                .ok_or_else(|| WriteError::NotFound(format!("no active QPS plan for {feature}")))?;
            if qps < plan.qps {
                return Err(WriteError::Downgrade(format!(
                    "{qps} is below the plan's {} QPS: a plan can be upgraded, never downgraded",
                    plan.qps
                )));
            }
            if let Some((fam, c)) = cap.filter(|(_, c)| qps > *c) {
                return Err(WriteError::AboveCap(format!("{qps} exceeds the {fam} cap of {c}")));
            }
            let previous = plan.qps;
            plan.qps = qps;
            Ok(serde_json::json!({"tenant": tenant, "feature": feature, "qps": qps, "previous_qps": previous}))
        })
        .await
    }
}

/// The tenant's plan for a feature active now, as the write API needs it.
struct ActivePlan {
    /// Index into the tenant's `qps_plans` in the file.
    index: usize,
    /// The family and its cap, if it has one.
    cap: Option<(String, u32)>,
    tz: chrono::FixedOffset,
}

fn active_plan(snap: &Snapshot, tenant: &str, feature: &str, now: i64) -> Result<ActivePlan, WriteError> {
    let t = snap.tenant(tenant).ok_or_else(|| WriteError::NotFound(format!("no tenant {tenant:?}")))?;
    let &fi = snap
        .catalog
        .feature_index
        .get(feature)
        .filter(|_| feature != IMAGE_SEARCH)
        .ok_or_else(|| WriteError::NotFound(format!("no feature {feature:?} with QPS plans")))?;
    // Compiled plans keep the file's order (invalid ones never compile), so the position among
    // the tenant's plans is the raw index.
    let index = t
        .plans
        .iter()
        .position(|p| p.feature == fi && p.active_at(now))
        .ok_or_else(|| WriteError::NotFound(format!("{tenant} has no active QPS plan for {feature}")))?;
    let f = &snap.catalog.features[fi];
    let cap = snap.catalog.family_cap(f).map(|c| (snap.catalog.family_id(f).to_string(), c));
    Ok(ActivePlan { index, cap, tz: snap.settings.timezone })
}

fn warn_restart_only(old: &Snapshot, new: &Snapshot) {
    let (a, b) = (&old.settings, &new.settings);
    for (name, changed) in [
        ("server.listen", a.listen != b.listen),
        ("server.admin_listen", a.admin_listen != b.admin_listen),
        ("server.max_connections", a.max_connections != b.max_connections),
        (
            "ledger",
            a.ledger_dir != b.ledger_dir || a.durability != b.durability || a.flush_interval != b.flush_interval,
        ),
        ("metrics.tenant_label", a.tenant_label != b.tenant_label),
        ("files.watch", a.watch != b.watch),
    ] {
        if changed {
            tracing::warn!(setting = name, "changed in the file; takes effect at the next restart");
        }
    }
}

/// Tenant and feature ids still configured, if the new snapshot dropped any.
fn removed_pairs(old: &Snapshot, new: &Snapshot) -> Option<(HashSet<u32>, HashSet<u32>)> {
    let tenants: HashSet<u32> = new.tenants.iter().map(|t| t.intern).collect();
    let features: HashSet<u32> = new.catalog.features.iter().map(|f| f.intern).collect();
    let dropped = old.tenants.iter().any(|t| !tenants.contains(&t.intern))
        || old.catalog.features.iter().any(|f| !features.contains(&f.intern));
    dropped.then_some((tenants, features))
}

/// Watches the folders of the three files (so editors' write-and-rename and Kubernetes ConfigMap
/// symlink swaps are seen) and reloads, debounced, when their contents change.
pub fn watch(
    gw: Arc<Gateway>,
    paths: Vec<PathBuf>,
    debounce: Duration,
) -> Result<notify::RecommendedWatcher, notify::Error> {
    use notify::{RecursiveMode, Watcher};
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if ev.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })?;
    let mut dirs: Vec<PathBuf> = paths
        .iter()
        .map(|p| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf())
        .collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Debounce: wait for a quiet moment so a burst of events gives one reload.
                while rx.recv_timeout(debounce).is_ok() {}
                let gw = gw.clone();
                handle.block_on(gw.reload_if_changed());
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(watcher)
}
