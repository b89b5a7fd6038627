//! The live control plane (SPEC §8): reload on file change, SIGHUP and the admin API; temporary
//! upgrades and upgrades written back to `entitlements.json` atomically.
//!
//! A new configuration is validated whole, off the async workers, then published with one
//! `ArcSwap` store: requests in flight keep the snapshot they loaded, new ones see the new one,
//! nobody waits. Buckets are keyed by interned (tenant, feature) ids and carry their limit, so a
//! bucket whose limit did not change keeps its state (one whose limit changed is re-shaped on its
//! next use). The buckets and metric handles of exactly the removed pairs are then dropped one
//! key at a time, off the async workers, so no request waits on more than a one-key operation.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::catalog::IMAGE_SEARCH;
use crate::config::{self, ConfigError, ConfigErrors, ConfigSource, Texts};
use crate::gateway::{hash, Control, Gateway};
use crate::snapshot::Snapshot;
use crate::store::Override;

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
    /// The files on disk (re-read for the change) are not valid: nothing is written.
    #[error("{first} (the files on disk are not valid, so nothing was written; fix them, then retry)")]
    OnDisk { code: &'static str, first: ConfigError },
    #[error("cannot write {path}: {reason}")]
    Io { path: String, reason: String },
    /// Cluster mode: Redis did not confirm the upgrade, so it is not applied: the file was put
    /// back as it was and this replica serves what it served.
    #[error(
        "Redis did not confirm the upgrade ({0}): this replica does not apply it and entitlements.json is as it was; retry the call"
    )]
    Store(String),
    /// Cluster mode: Redis did not confirm the upgrade, and the file, already written, could not
    /// be put back: it holds an upgrade the other replicas do not know.
    #[error(
        "Redis did not confirm the upgrade ({store}), and {path} could not be put back ({reason}): it holds the upgrade, which this replica applies at its next reload and no other replica knows; restore the file, then retry the call"
    )]
    StoreFileKept { store: String, path: String, reason: String },
}

impl WriteError {
    pub fn code(&self) -> &'static str {
        match self {
            WriteError::NotFound(_) => "not_found",
            WriteError::AboveCap(_) => "qps_above_cap",
            WriteError::Downgrade(_) => "downgrade_not_allowed",
            WriteError::Invalid(_) => "invalid_request",
            WriteError::Config(_) => "invalid_config",
            WriteError::OnDisk { code, .. } => code,
            WriteError::Io { .. } => "write_failed",
            WriteError::Store(_) | WriteError::StoreFileKept { .. } => "store_unavailable",
        }
    }
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            WriteError::NotFound(_) => S::NOT_FOUND,
            WriteError::Downgrade(_) | WriteError::OnDisk { .. } => S::CONFLICT,
            WriteError::AboveCap(_) | WriteError::Invalid(_) | WriteError::Config(_) => S::UNPROCESSABLE_ENTITY,
            WriteError::Io { .. } => S::INTERNAL_SERVER_ERROR,
            WriteError::Store(_) | WriteError::StoreFileKept { .. } => S::SERVICE_UNAVAILABLE,
        }
    }
}

/// Writes `text` to `path` atomically: a temporary file in the same folder, fsync, rename, fsync
/// of the folder. Readers see the old file or the new one, never a mix.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    // A link (to the billing system's export) stays a link: the file it names is replaced.
    let resolved = std::fs::canonicalize(path).ok();
    let path = resolved.as_deref().unwrap_or(path);
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entitlements.json");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        // The new file keeps the old one's permissions (not the umask's default).
        if let Ok(meta) = std::fs::metadata(path) {
            f.set_permissions(meta.permissions())?;
        }
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
    pub(crate) async fn publish(&self, ctl: &mut Control, texts: Texts, why: &str) -> Result<u64, ConfigErrors> {
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let upstream = self.upstream_override.clone();
        let (texts, built) = tokio::task::spawn_blocking(move || {
            let built = crate::gateway::build(&texts, upstream.as_ref(), generation);
            (texts, built)
        })
        .await
        .map_err(|e| {
            ConfigErrors(vec![ConfigError { file: "turnstile".into(), path: String::new(), message: e.to_string() }])
        })?;
        let mut snap = match built {
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
        // Cluster mode: the upgrades shared through Redis apply on top of the files.
        crate::cluster::overlay(&mut snap, &ctl.overrides);
        let old = self.snapshot.load_full();
        warn_restart_only(&old, &snap);
        let new = Arc::new(snap);
        self.snapshot.store(new.clone());
        self.generation.store(generation, Ordering::SeqCst);
        self.metrics.config_generation.set(generation as i64);
        self.metrics.config_reloads.with_label_values(&["ok"]).inc();
        ctl.hash = hash(&texts);
        ctl.texts = texts;
        (ctl.rejected, ctl.unreadable) = (None, None);
        tracing::info!(why, generation, "configuration reloaded");
        // Off the async workers, under the control lock (so a later reload that brings a pair
        // back cannot be undone by this one): drop the buckets of the removed pairs, one key at a
        // time (memory stays bounded by the configured pairs; their metric counts stay, as
        // counters that never go back), and show the packages now loaded.
        let (store, metrics, billing) = (self.billing.store().clone(), self.metrics.clone(), self.billing.clone());
        let cleanup = tokio::task::spawn_blocking(move || {
            for key in removed_keys(&old, &new) {
                store.remove_bucket(key);
            }
            billing.show_packages(&metrics, &new);
            old
        });
        match cleanup.await {
            // Requests hold a snapshot only for their synchronous decision; keep the old one a
            // moment so its (possibly large) deallocation happens here, not on a request's thread.
            Ok(old) => {
                tokio::task::spawn_blocking(move || {
                    std::thread::sleep(Duration::from_millis(200));
                    drop(old);
                });
            }
            Err(e) => tracing::error!(error = %e, "cleanup after the reload failed"),
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
    /// editors, ConfigMap swaps, and our own write-backs, which are already served) and from
    /// what it rejected last (reported once, not at every event in the folders).
    pub async fn reload_if_changed(&self) {
        let mut ctl = self.control.lock().await;
        match self.read_current(&ctl).await {
            Ok(t) => {
                ctl.unreadable = None;
                let h = hash(&t);
                // Served, or rejected already (and reported then).
                if h == ctl.hash || ctl.rejected == Some(h) {
                    return;
                }
                if self.publish(&mut ctl, t, "file change").await.is_err() {
                    ctl.rejected = Some(h);
                }
            }
            Err(e) => {
                let why = e.to_string();
                if ctl.unreadable.as_ref() == Some(&why) {
                    return;
                }
                self.metrics.config_reloads.with_label_values(&["error"]).inc();
                tracing::error!("configuration reload after a file change failed:\n{e}");
                ctl.unreadable = Some(why);
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

    /// Re-reads the files from disk (an operator's edit the watcher has not picked up yet is
    /// kept), applies `change` to the text of `entitlements.json` (one value replaced or one
    /// upgrade inserted; every other byte stays as it was), validates the result as a whole
    /// configuration, writes it back atomically (files) and publishes it. Serialized with
    /// reloads and other writes by the control lock.
    ///
    /// Cluster mode (SPEC §11.4): the upgrade `change` returns (of `tenant`'s `feature`) is
    /// stored in Redis after the file is written and before anything is published. When Redis
    /// does not confirm it, the file is put back as it was (still under the lock, so the watcher
    /// then finds the contents it serves) and nothing is applied: the call fails whole, and its
    /// retry makes the upgrade once, instead of leaving it applied on this replica alone.
    async fn write_entitlements(
        &self,
        why: &str,
        (tenant, feature): (&str, &str),
        change: impl FnOnce(&Snapshot, &str) -> Result<(String, serde_json::Value, Override), WriteError>,
    ) -> Result<serde_json::Value, WriteError> {
        let mut ctl = self.control.lock().await;
        let on_disk = |errors: ConfigErrors, ents: &str| {
            let first = errors.0.into_iter().next().unwrap_or_else(|| ConfigError {
                file: ents.to_string(),
                path: String::new(),
                message: "not valid".into(),
            });
            // An entitlements file that cannot be read is reported at the main file's
            // `files.entitlements`: still the entitlements' fault.
            let code = if first.file == ents || first.path == "files.entitlements" {
                "entitlements_invalid"
            } else {
                "config_invalid"
            };
            WriteError::OnDisk { code, first }
        };
        let mut texts = self.read_current(&ctl).await.map_err(|e| on_disk(e, &ctl.texts.entitlements_name))?;
        let generation = self.generation.load(Ordering::SeqCst) + 1;
        let current = texts.clone();
        let mut snap = tokio::task::spawn_blocking(move || crate::snapshot::build(&current, generation))
            .await
            .map_err(|e| WriteError::Invalid(e.to_string()))?
            .map_err(|e| on_disk(e, &texts.entitlements_name))?;
        // Cluster mode: the change is judged against the plans served, which include the upgrades
        // other replicas shared (this replica's file may not have them): below those is a
        // downgrade, as it is below the file's own.
        crate::cluster::overlay(&mut snap, &ctl.overrides);
        let (text, answer, upgrade) = change(&snap, &texts.entitlements)?;
        let previous = std::mem::replace(&mut texts.entitlements, text);
        // Validate before touching the file.
        let check = texts.clone();
        tokio::task::spawn_blocking(move || crate::snapshot::build(&check, generation).map(|_| ()))
            .await
            .map_err(|e| WriteError::Invalid(e.to_string()))?
            .map_err(WriteError::Config)?;
        let files = matches!(self.source, ConfigSource::Files { .. });
        let remote = self.billing.remote();
        if files {
            let io = |reason| WriteError::Io { path: texts.entitlements_name.clone(), reason };
            if remote.is_some() {
                // Cluster mode: written on this thread, with no await between the write and the
                // guard below that undoes it: a write handed to a blocking thread finishes even
                // when the call is dropped while it runs, and left the upgrade in the file, for
                // the watcher to apply on this replica alone.
                write_atomically(Path::new(&texts.entitlements_name), &texts.entitlements)
                    .map_err(|e| io(e.to_string()))?;
            } else {
                write_entitlements_file(&texts.entitlements_name, texts.entitlements.clone()).await.map_err(io)?;
            }
        }
        if let Some(remote) = remote {
            use crate::store::OverrideStore;
            // Dropped before Redis answers (the admin client went away), the call puts the file
            // back as it does for a refusal, still under the lock (declared after it, dropped
            // first).
            let mut put_back = PutBack(files.then(|| (PathBuf::from(&texts.entitlements_name), previous.clone())));
            let stored = remote.stores.put_override(tenant, feature, upgrade).await;
            put_back.0 = None;
            if let Err(e) = stored {
                let store = e.to_string();
                tracing::warn!(tenant, feature, error = %store, "{why} not stored in Redis: refused, not applied");
                if files {
                    if let Err(reason) = write_entitlements_file(&texts.entitlements_name, previous).await {
                        let path = texts.entitlements_name.clone();
                        tracing::error!(path, reason, "{why}: cannot put the entitlements file back");
                        return Err(WriteError::StoreFileKept { store, path, reason });
                    }
                }
                return Err(WriteError::Store(store));
            }
        }
        self.publish(&mut ctl, texts, why).await.map_err(WriteError::Config)?;
        drop(ctl);
        if remote.is_some() {
            // Served here already (from the file); the override list catches up now, or at the
            // next poll of the version.
            if let Err(e) = self.sync_overrides().await {
                tracing::warn!(error = %e, "{why} stored in Redis; cannot read the shared upgrades back yet (retried)");
            }
        }
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
        let (t, f) = (tenant.to_string(), feature.to_string());
        let until = until.to_string();
        self.write_entitlements("temporary upgrade", (tenant, feature), move |snap, text| {
            let ActivePlan { index, qps: plan_qps, cap, tz } = active_plan(snap, &t, &f, now)?;
            if let Some((fam, c)) = cap.filter(|(_, c)| qps > *c) {
                return Err(WriteError::AboveCap(format!("{qps} exceeds the {fam} cap of {c}")));
            }
            if qps <= plan_qps {
                return Err(WriteError::Invalid(format!("{qps} is not above the plan's {plan_qps} QPS")));
            }
            let from = crate::time::format_rfc3339(now, tz);
            let upgrade = serde_json::json!({"qps": qps, "from": from, "until": until});
            let text = splice::push_upgrade(text, &t, index, &upgrade.to_string())?;
            // The `from` as written to the file (read back from its text), so the overlay finds
            // the file's upgrade and the shared one identical.
            let from_ns = crate::time::parse_rfc3339(&from).unwrap_or(now);
            Ok((
                text,
                serde_json::json!({"tenant": t, "feature": f, "qps": qps, "from": from, "until": until}),
                Override { qps, from: from_ns, until: Some(until_ns) },
            ))
        })
        .await
    }

    /// `POST /admin/v1/tenants/{t}/qps-plans/{f}/upgrade` `{"qps": N}`: permanent, never lower.
    pub async fn upgrade(&self, tenant: &str, feature: &str, qps: u32) -> Result<serde_json::Value, WriteError> {
        let now = self.clock.unix_nanos();
        let (t, f) = (tenant.to_string(), feature.to_string());
        self.write_entitlements("upgrade", (tenant, feature), move |snap, text| {
            let ActivePlan { index, qps: previous, cap, .. } = active_plan(snap, &t, &f, now)?;
            if qps < previous {
                return Err(WriteError::Downgrade(format!(
                    "{qps} is below the plan's {previous} QPS: a plan can be upgraded, never downgraded"
                )));
            }
            if let Some((fam, c)) = cap.filter(|(_, c)| qps > *c) {
                return Err(WriteError::AboveCap(format!("{qps} exceeds the {fam} cap of {c}")));
            }
            let text = splice::set_plan_qps(text, &t, index, qps)?;
            Ok((
                text,
                serde_json::json!({"tenant": t, "feature": f, "qps": qps, "previous_qps": previous}),
                Override { qps, from: now, until: None },
            ))
        })
        .await
    }
}

/// While armed, writes the file back with its previous text when dropped: an admin write
/// dropped between writing the file and Redis's answer leaves the file as it was.
struct PutBack(Option<(PathBuf, String)>);

impl Drop for PutBack {
    fn drop(&mut self) {
        if let Some((path, text)) = self.0.take() {
            tracing::warn!(path = %path.display(), "admin upgrade dropped before Redis answered: the file is put back");
            if let Err(e) = write_atomically(&path, &text) {
                tracing::error!(path = %path.display(), error = %e, "cannot put the entitlements file back");
            }
        }
    }
}

/// Writes `text` to the entitlements file `name` atomically, off the async workers; the error
/// says why not.
async fn write_entitlements_file(name: &str, text: String) -> Result<(), String> {
    let path = PathBuf::from(name);
    match tokio::task::spawn_blocking(move || write_atomically(&path, &text)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// The tenant's plan for a feature active now, as the write API needs it.
struct ActivePlan {
    /// Index into the tenant's `qps_plans` in the file.
    index: usize,
    /// The plan's own QPS (without upgrades).
    qps: u32,
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
    let qps = t.plans[index].qps;
    let f = &snap.catalog.features[fi];
    let cap = snap.catalog.family_cap(f).map(|c| (snap.catalog.family_id(f).to_string(), c));
    Ok(ActivePlan { index, qps, cap, tz: snap.settings.timezone })
}

/// Edits of `entitlements.json` in place: the byte range of one value is found with serde_json's
/// `RawValue` (a slice of the text itself), and only that range changes, so the billing
/// system's key order, spacing and number and decimal spellings stay exactly as exported.
mod splice {
    use std::collections::BTreeMap;

    use serde_json::value::RawValue;

    use super::WriteError;

    type Object<'a> = BTreeMap<String, &'a RawValue>;

    fn parse<'a, T: serde::Deserialize<'a>>(text: &'a str, what: &str) -> Result<T, WriteError> {
        serde_json::from_str(text).map_err(|e| WriteError::Invalid(format!("entitlements.json: {what}: {e}")))
    }

    /// Byte range of `sub`, a slice of `text`, within `text`.
    fn span(text: &str, sub: &str) -> (usize, usize) {
        let start = sub.as_ptr() as usize - text.as_ptr() as usize;
        (start, start + sub.len())
    }

    /// The object `tenants.{tenant}.qps_plans[{index}]` (its text is a slice of `text`).
    fn plan<'a>(text: &'a str, tenant: &str, index: usize) -> Result<&'a str, WriteError> {
        let root: Object<'a> = parse(text, "the file")?;
        let tenants = root.get("tenants").ok_or_else(|| WriteError::Invalid("no tenants".into()))?;
        let tenants: Object<'a> = parse(tenants.get(), "tenants")?;
        let t = tenants.get(tenant).ok_or_else(|| WriteError::NotFound(format!("no tenant {tenant:?}")))?;
        let t: Object<'a> = parse(t.get(), tenant)?;
        let plans = t.get("qps_plans").ok_or_else(|| WriteError::NotFound(format!("{tenant} has no QPS plans")))?;
        let plans: Vec<&'a RawValue> = parse(plans.get(), "qps_plans")?;
        plans.get(index).map(|p| p.get()).ok_or_else(|| WriteError::NotFound(format!("{tenant} has no such plan")))
    }

    fn replace(text: &str, (start, end): (usize, usize), with: &str) -> String {
        let mut out = String::with_capacity(text.len() + with.len());
        out.push_str(&text[..start]);
        out.push_str(with);
        out.push_str(&text[end..]);
        out
    }

    /// Sets `tenants.{tenant}.qps_plans[{index}].qps`.
    pub fn set_plan_qps(text: &str, tenant: &str, index: usize, qps: u32) -> Result<String, WriteError> {
        let p = plan(text, tenant, index)?;
        let fields: Object<'_> = parse(p, "qps_plans")?;
        let old = fields.get("qps").ok_or_else(|| WriteError::Invalid("the plan has no qps".into()))?;
        Ok(replace(text, span(text, old.get()), &qps.to_string()))
    }

    /// Appends `upgrade` (a JSON object) to the plan's `temporary_upgrades`, creating the list.
    pub fn push_upgrade(text: &str, tenant: &str, index: usize, upgrade: &str) -> Result<String, WriteError> {
        let p = plan(text, tenant, index)?;
        let fields: Object<'_> = parse(p, "qps_plans")?;
        let (at, insert) = match fields.get("temporary_upgrades") {
            Some(list) => {
                let items: Vec<&RawValue> = parse(list.get(), "temporary_upgrades")?;
                let (_, end) = span(text, list.get());
                // Before the closing bracket (and the spacing in front of it).
                let close = end - 1;
                let at = match items.last() {
                    Some(last) => span(text, last.get()).1,
                    None => close,
                };
                (at, if items.is_empty() { upgrade.to_string() } else { format!(", {upgrade}") })
            }
            None => {
                // After the plan's last value, before its closing brace.
                let last = fields
                    .values()
                    .map(|v| span(text, v.get()).1)
                    .max()
                    .ok_or_else(|| WriteError::Invalid("the plan is empty".into()))?;
                (last, format!(", \"temporary_upgrades\": [{upgrade}]"))
            }
        };
        Ok(replace(text, (at, at), &insert))
    }
}

fn warn_restart_only(old: &Snapshot, new: &Snapshot) {
    let (a, b) = (&old.settings, &new.settings);
    for (name, changed) in [
        ("server.listen", a.listen != b.listen),
        ("server.admin_listen", a.admin_listen != b.admin_listen),
        ("server.max_connections", a.max_connections != b.max_connections),
        ("server.upstream_protocol", a.upstream_protocol != b.upstream_protocol),
        (
            "ledger",
            a.ledger_dir != b.ledger_dir
                || a.durability != b.durability
                || a.flush_interval != b.flush_interval
                || a.strict_timeout != b.strict_timeout,
        ),
        ("cluster", a.cluster != b.cluster),
        ("metrics.tenant_label", a.tenant_label != b.tenant_label),
        ("files.watch", a.watch != b.watch),
    ] {
        if changed {
            tracing::warn!(setting = name, "changed in the file; takes effect at the next restart");
        }
    }
}

/// The bucket and metric keys of the (tenant, feature) pairs `new` no longer has: every
/// feature of a removed tenant (and its Image Search delete bucket), and every removed feature of
/// the other tenants. Pairs of kept tenants and features are kept, whatever their limit.
fn removed_keys(old: &Snapshot, new: &Snapshot) -> Vec<u64> {
    use crate::intern::pair;
    let tenants: HashSet<u32> = new.tenants.iter().map(|t| t.intern).collect();
    let features: HashSet<u32> = new.catalog.features.iter().map(|f| f.intern).collect();
    let gone: Vec<u32> = old.catalog.features.iter().map(|f| f.intern).filter(|f| !features.contains(f)).collect();
    let mut keys = Vec::new();
    for t in &old.tenants {
        if tenants.contains(&t.intern) {
            keys.extend(gone.iter().map(|&f| pair(t.intern, f)));
        } else {
            keys.extend(old.catalog.features.iter().map(|f| pair(t.intern, f.intern)));
            keys.push(pair(t.intern, old.catalog.image_delete_intern));
        }
    }
    keys
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
    let mut dirs: Vec<PathBuf> = Vec::new();
    // A file that is a link (to the billing system's export) changes in the folder of the file
    // it names: that folder is watched too (as resolved at start), unless it is the link's own.
    let mut targets: Vec<PathBuf> = Vec::new();
    for p in &paths {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        if let (Ok(target), Ok(here)) = (std::fs::canonicalize(p), std::fs::canonicalize(&dir)) {
            if let Some(there) = target.parent().filter(|t| *t != here) {
                targets.push(there.to_path_buf());
            }
        }
        dirs.push(dir);
    }
    dirs.sort();
    dirs.dedup();
    targets.sort();
    targets.dedup();
    for d in &dirs {
        watcher.watch(d, RecursiveMode::NonRecursive)?;
    }
    for d in &targets {
        if let Err(e) = watcher.watch(d, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %d.display(), error = %e, "cannot watch the folder a linked configuration file is in; reload with SIGHUP or the admin API after it changes");
        }
    }
    let handle = tokio::runtime::Handle::current();
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Debounce: wait for a quiet moment so a burst of events gives one reload, at
                // most 5 debounces: other files in the folders that change all the time (a log)
                // must not hold an edit back for as long as they do.
                let until = std::time::Instant::now() + debounce * 5;
                loop {
                    let left = until.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() || rx.recv_timeout(debounce.min(left)).is_err() {
                        break;
                    }
                }
                let gw = gw.clone();
                handle.block_on(gw.reload_if_changed());
            }
        })
        .map_err(|e| notify::Error::generic(&e.to_string()))?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::EMBEDDED_CATALOG;
    use crate::metrics::Outcome;
    use crate::proxy::{decide_now as decide, Decision};
    use crate::snapshot::build;
    use http::{HeaderMap, HeaderValue};

    fn main_toml(ledger: &Path) -> String {
        format!(
            "[server]\nupstream = \"http://127.0.0.1:1\"\n[ledger]\ndir = \"{}\"\n\
             [[routes]]\npath = \"/v1/image-search/delete\"\nfeature = \"image-search\"\nop = \"delete\"\n\
             [[routes]]\npath = \"/v1/ocr/license-plate\"\nfeature = \"license-plate-recognition\"\n",
            ledger.display()
        )
    }

    fn tenant(name: &str, extra: &str) -> String {
        format!(r#""{name}": {{"api_keys": ["{}"], "services": ["text_recognition"]{extra}}}"#, crate::hash_key(name))
    }

    fn ents(tenants: &[String]) -> String {
        format!(r#"{{"tenants": {{{}}}}}"#, tenants.join(","))
    }

    /// [`main_toml`] with its ledger in `ledger`, `extra` lines, and `[cluster]` on the Redis at
    /// `url`.
    fn on_redis_toml(ledger: &Path, extra: &str, url: &str) -> String {
        format!("{}{extra}[cluster]\nstore = \"redis\"\nredis = [\"{url}\"]\n", main_toml(ledger))
    }

    /// A gateway in cluster mode on `texts` (read from `source`): its Redis store opened as
    /// `serve` opens it, for tenant `acme`.
    async fn on_redis(texts: Texts, source: ConfigSource, clock: crate::clock::SharedClock) -> Arc<Gateway> {
        let snap = build(&texts, 1).unwrap_or_else(|e| panic!("{e}"));
        let store = crate::store::redis::RedisStore::open(&snap.settings.cluster, None, ["acme"]).await.expect("redis");
        Gateway::with_redis(texts, snap, source, None, clock, Some(store)).expect("gateway")
    }

    /// Replica `i` on the Redis at `url`: its own ledger in `dir`, the embedded catalog and
    /// [`acme_at_20`] (files without any upgrade).
    async fn acme_replica(
        dir: &std::path::Path,
        url: &str,
        i: usize,
        clock: crate::clock::SharedClock,
    ) -> Arc<Gateway> {
        let main = on_redis_toml(&dir.join(format!("ledger-{i}")), "", url);
        on_redis(Texts::in_memory(main, EMBEDDED_CATALOG, ents(&[acme_at_20()])), ConfigSource::Embedded, clock).await
    }

    /// `acme` on face comparison with a plan of 20 QPS.
    fn acme_at_20() -> String {
        let plan = r#", "qps_plans": [{"feature": "face-comparison-1-1", "qps": 20, "effective_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}]"#;
        format!(r#""acme": {{"api_keys": ["{}"], "services": ["face_body"]{plan}}}"#, crate::hash_key("acme"))
    }

    fn call(gw: &Gateway, key: &str, path: &str) -> Option<Outcome> {
        let mut h = HeaderMap::new();
        h.insert("x-api-key", HeaderValue::from_str(key).expect("key"));
        match decide(gw, &h, path) {
            Decision::Forward(_) => None,
            Decision::Reject(e, ..) => Some(e.outcome()),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn reload_removing_another_tenant_keeps_the_delete_bucket_and_other_buckets() {
        let dir = tempfile::tempdir().expect("tmp");
        let main = main_toml(&dir.path().join("ledger"));
        let image = r#", "image_search": {"capacity": 100000, "qps": 1, "expires_at": "2036-01-01T00:00:00Z"}"#;
        let both = ents(&[tenant("acme", image), tenant("globex", "")]);
        let texts = Texts::in_memory(main.clone(), EMBEDDED_CATALOG, both);
        let snap = build(&texts, 1).unwrap_or_else(|e| panic!("{e}"));
        let clock = ManualClock::at("2026-11-10T00:00:00Z");
        let gw = Gateway::new(texts, snap, ConfigSource::Embedded, None, clock.clone()).expect("gateway");

        // The delete bucket (20 QPS, depth 20) is drained; the plate buckets are used once.
        for i in 0..20 {
            assert_eq!(call(&gw, "acme", "/v1/image-search/delete"), None, "delete {i}");
        }
        assert_eq!(call(&gw, "acme", "/v1/image-search/delete"), Some(Outcome::Throttled));
        assert_eq!(call(&gw, "acme", "/v1/ocr/license-plate"), None);
        assert_eq!(call(&gw, "globex", "/v1/ocr/license-plate"), None);
        assert_eq!(gw.billing.store().bucket_count(), 3);

        let only_acme = Texts::in_memory(main, EMBEDDED_CATALOG, ents(&[tenant("acme", image)]));
        {
            let mut ctl = gw.control.lock().await;
            gw.publish(&mut ctl, only_acme, "test").await.unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(gw.billing.store().bucket_count(), 2, "globex's bucket is gone, acme's two are kept");
        assert_eq!(
            call(&gw, "acme", "/v1/image-search/delete"),
            Some(Outcome::Throttled),
            "the delete bucket kept its (empty) state across a reload that removed another tenant"
        );
        assert_eq!(call(&gw, "globex", "/v1/ocr/license-plate"), Some(Outcome::Unauthenticated));
        let _ = gw.billing.close(std::time::Duration::from_secs(5));
    }

    /// SPEC §11.4: an upgrade whose call is dropped while Redis has not answered yet (the admin
    /// client disconnected, or gave up before `op_timeout`) must not leave entitlements.json
    /// holding an upgrade that was never stored in Redis nor published: the watcher would then
    /// apply it on this replica alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_upgrade_dropped_while_redis_stalls_leaves_the_file_as_it_was() {
        use crate::store::redis::harness;
        let Some(redis) = harness::RedisServer::start("upgrade_dropped", harness::Opts::default()) else { return };
        let dir = tempfile::tempdir().expect("tmp");
        let main = on_redis_toml(&dir.path().join("ledger"), "", &redis.url());
        std::fs::write(dir.path().join("turnstile.toml"), main).expect("main");
        std::fs::write(dir.path().join("catalog.toml"), EMBEDDED_CATALOG).expect("catalog");
        let file = dir.path().join("entitlements.json");
        let before = ents(&[acme_at_20()]);
        std::fs::write(&file, &before).expect("entitlements");
        let source = ConfigSource::Files { main: dir.path().join("turnstile.toml") };
        let texts = crate::config::read_texts(&source).expect("texts");
        let gw = on_redis(texts, source, ManualClock::at("2026-11-10T00:00:00Z")).await;
        // Redis stalls writes (as a failing master does until the op timeout).
        redis.cli(&["CLIENT", "PAUSE", "3000", "WRITE"]);
        let task = {
            let gw = gw.clone();
            tokio::spawn(async move { gw.upgrade("acme", "face-comparison-1-1", 25).await })
        };
        // The file is written before Redis is asked; the caller goes away meanwhile.
        let asked = std::time::Instant::now();
        while std::fs::read_to_string(&file).expect("read") == before {
            assert!(asked.elapsed() < std::time::Duration::from_secs(2), "the file was never written");
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        task.abort();
        let _ = task.await;
        gw.reload_if_changed().await;
        assert_eq!(gw.snapshot.load().tenants[0].plans[0].qps, 20, "applied on this replica alone");
        assert_eq!(std::fs::read_to_string(&file).expect("read"), before, "entitlements.json is left as it was");
        let _ = gw.billing.close(std::time::Duration::from_secs(5));
    }

    /// Two replicas on one Redis (SPEC §11.4). Upgrades posted concurrently to replica A change
    /// the file one at a time (the control lock) but store their shared override after the
    /// lock, so Redis may receive them in another order than the file; and an older override
    /// stored last (the slow one of a race) must not roll any replica back. It cannot: Redis
    /// keeps every override (a set) and a permanent one only ever raises a plan (the maximum
    /// wins), so the order in which they land does not matter.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_upgrades_leave_every_replica_at_the_newest_qps() {
        use crate::store::redis::harness;
        use crate::store::{Override, OverrideStore};
        let Some(redis) = harness::RedisServer::start("concurrent_upgrades", harness::Opts::default()) else { return };
        let clock = ManualClock::at("2026-11-10T00:00:00Z");
        let dirs = tempfile::tempdir().expect("tmp");
        // Replica `i`: its own ledger, the same files (without any upgrade), the one Redis.
        let url = redis.url();
        let replica = |i: usize| acme_replica(dirs.path(), &url, i, clock.clone());
        let gws = vec![replica(0).await, replica(1).await];
        let qps = |gw: &Gateway| gw.snapshot.load().tenants[0].plans[0].qps;
        // 20 upgrades at once on replica A: the lock orders them; a lower one than the file's
        // by then is refused (never a downgrade); 40 always gets through.
        let tasks: Vec<_> = (21..=40u32)
            .map(|q| {
                let gw = gws[0].clone();
                tokio::spawn(async move { gw.upgrade("acme", "face-comparison-1-1", q).await.ok().map(|_| q) })
            })
            .collect();
        let mut accepted = Vec::new();
        for t in tasks {
            accepted.extend(t.await.expect("join"));
        }
        assert_eq!(accepted.iter().max(), Some(&40), "{accepted:?}");
        assert_eq!(qps(&gws[0]), 40, "replica A serves the newest");
        gws[1].sync_overrides().await.expect("sync");
        assert_eq!(qps(&gws[1]), 40, "replica B serves the newest");
        // The slow upgrade of a race lands in Redis last, after a newer one: nothing goes back.
        let remote = gws[0].billing.remote().expect("cluster mode").clone();
        let older =
            Override { qps: 21, from: crate::time::parse_rfc3339("2026-11-09T23:59:59Z").expect("time"), until: None };
        remote.stores.put_override("acme", "face-comparison-1-1", older).await.expect("override");
        for gw in &gws {
            gw.sync_overrides().await.expect("sync");
            assert_eq!(qps(gw), 40, "an older override stored last rolls nothing back");
        }
        // A replica started afterwards (its files without any upgrade) starts at the newest too.
        let late = replica(2).await;
        late.sync_overrides().await.expect("sync");
        assert_eq!(qps(&late), 40);
        for gw in gws.iter().chain([&late]) {
            let _ = gw.billing.close(std::time::Duration::from_secs(5));
        }
    }

    /// SPEC §8: an upgrade "lower" than the plan gets 409 `downgrade_not_allowed`, and §11.4
    /// shares upgrades between replicas. Replica B serves the 30 QPS that A stored in Redis (its
    /// own files still say 20): 25 there is lower than the plan B serves and shows in its limits
    /// view, so it is a downgrade, not a 200 that changes nothing; and a temporary 28 is not
    /// above that plan either.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn below_a_shared_upgrade_is_a_downgrade_on_the_other_replica_too() {
        use crate::store::redis::harness;
        let Some(redis) = harness::RedisServer::start("shared_downgrade", harness::Opts::default()) else { return };
        let clock = ManualClock::at("2026-11-10T00:00:00Z");
        let dirs = tempfile::tempdir().expect("tmp");
        let url = redis.url();
        let replica = |i: usize| acme_replica(dirs.path(), &url, i, clock.clone());
        let (a, b) = (replica(0).await, replica(1).await);
        let qps = |gw: &Gateway| gw.snapshot.load().tenants[0].plans[0].qps;
        a.upgrade("acme", "face-comparison-1-1", 30).await.unwrap_or_else(|e| panic!("{e}"));
        b.sync_overrides().await.expect("sync");
        assert_eq!(qps(&b), 30, "B serves A's upgrade");
        let r = b.upgrade("acme", "face-comparison-1-1", 25).await;
        assert!(matches!(r, Err(WriteError::Downgrade(_))), "25 below the 30 B serves: {r:?}");
        let r = b.temporary_upgrade("acme", "face-comparison-1-1", 28, "2026-11-11T00:00:00Z").await;
        assert!(matches!(r, Err(WriteError::Invalid(_))), "a temporary 28 is not above the 30 B serves: {r:?}");
        let answer = b.upgrade("acme", "face-comparison-1-1", 35).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer["previous_qps"], 30, "the plan it raised is the one B served");
        assert_eq!(qps(&b), 35);
        for gw in [a, b] {
            let _ = gw.billing.close(std::time::Duration::from_secs(5));
        }
    }

    /// On Redis, Image Search deletions have their own bucket (SPEC §5: `delete` has its own
    /// `delete_qps`), as they do locally: named by the feature alone, a delete re-shaped the
    /// search bucket (another `limit:depth`: a fresh, full one), so searches alternated with
    /// deletes were never throttled. At 1 QPS (depth 1) a second search within the second is a
    /// 429, whatever deletions come between.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn on_redis_a_delete_does_not_refill_the_search_bucket() {
        use crate::store::redis::harness;
        let Some(redis) = harness::RedisServer::start("review_delete_bucket", harness::Opts::default()) else {
            return;
        };
        let dir = tempfile::tempdir().expect("tmp");
        let search = "[[routes]]\npath = \"/v1/image-search/search\"\nfeature = \"image-search\"\nop = \"search\"\n";
        let main = on_redis_toml(&dir.path().join("ledger"), search, &redis.url());
        let image = r#", "image_search": {"capacity": 100000, "qps": 1, "expires_at": "2036-01-01T00:00:00Z"}"#;
        let texts = Texts::in_memory(main, EMBEDDED_CATALOG, ents(&[tenant("acme", image)]));
        let gw = on_redis(texts, ConfigSource::Embedded, ManualClock::at("2026-11-10T00:00:00Z")).await;
        let call = |path: &'static str| {
            let gw = gw.clone();
            async move {
                let mut h = HeaderMap::new();
                h.insert("x-api-key", HeaderValue::from_static("acme"));
                match crate::proxy::decide(&gw, &h, path).await {
                    Decision::Forward(_) => None,
                    Decision::Reject(e, ..) => Some(e.outcome()),
                }
            }
        };
        let mut got = Vec::new();
        for path in ["/v1/image-search/search", "/v1/image-search/search"] {
            got.push(call(path).await);
        }
        assert_eq!(got, [None, Some(Outcome::Throttled)], "two searches within one second at 1 QPS");
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
        got.clear();
        for path in ["/v1/image-search/search", "/v1/image-search/delete", "/v1/image-search/search"] {
            got.push(call(path).await);
        }
        assert_eq!(got, [None, None, Some(Outcome::Throttled)], "search, delete, search within one second at 1 QPS");
        let _ = gw.billing.close(std::time::Duration::from_secs(5));
    }

    /// Each thread caches the snapshot it served last: two gateways served by one thread each
    /// answer from their own snapshot, and a reload reaches the next call.
    #[tokio::test(flavor = "current_thread")]
    async fn two_gateways_on_one_thread_answer_from_their_own_snapshots() {
        let dir = tempfile::tempdir().expect("tmp");
        let gateway = |name: &str, ents: String| {
            let texts = Texts::in_memory(main_toml(&dir.path().join(name)), EMBEDDED_CATALOG, ents);
            let snap = build(&texts, 1).unwrap_or_else(|e| panic!("{e}"));
            Gateway::new(texts, snap, ConfigSource::Embedded, None, ManualClock::at("2026-11-10T00:00:00Z"))
                .expect("gateway")
        };
        let a = gateway("a", ents(&[tenant("acme", "")]));
        let b = gateway("b", ents(&[tenant("globex", "")]));
        for _ in 0..2 {
            assert_eq!(call(&a, "acme", "/v1/ocr/license-plate"), None);
            assert_eq!(call(&b, "acme", "/v1/ocr/license-plate"), Some(Outcome::Unauthenticated));
            assert_eq!(call(&b, "globex", "/v1/ocr/license-plate"), None);
            assert_eq!(call(&a, "globex", "/v1/ocr/license-plate"), Some(Outcome::Unauthenticated));
        }
        let both = Texts::in_memory(
            main_toml(&dir.path().join("a")),
            EMBEDDED_CATALOG,
            ents(&[tenant("acme", ""), tenant("globex", "")]),
        );
        {
            let mut ctl = a.control.lock().await;
            a.publish(&mut ctl, both, "test").await.unwrap_or_else(|e| panic!("{e}"));
        }
        assert_eq!(call(&a, "globex", "/v1/ocr/license-plate"), None, "the reload, at the next call");
        assert_eq!(call(&b, "acme", "/v1/ocr/license-plate"), Some(Outcome::Unauthenticated));
        for gw in [a, b] {
            let _ = gw.billing.close(std::time::Duration::from_secs(5));
        }
    }

    const MAIN: &str = "[server]\nupstream = \"http://127.0.0.1:1\"\n";
    const SMALL_CATALOG: &str = r#"
currency = "CNY"
[families.text_recognition]
name = "Text"
[features.license-plate-recognition]
family = "text_recognition"
billing = ["payg"]
[features.vin-recognition]
family = "text_recognition"
billing = ["payg"]
"#;

    #[test]
    fn removed_keys_are_exactly_the_removed_pairs() {
        use crate::intern::pair;
        let snap = |catalog: &str, tenants: &[String]| {
            build(&Texts::in_memory(MAIN, catalog, ents(tenants)), 1).unwrap_or_else(|e| panic!("{e}"))
        };
        let old = snap(SMALL_CATALOG, &[tenant("rk-a", ""), tenant("rk-b", "")]);
        let t = |name: &str| crate::intern::tenant(name).0;
        let f = |name: &str| crate::intern::feature(name).0;
        let fewer_features = SMALL_CATALOG.replace("[features.vin-recognition]", "[features.other-recognition]");
        let new = snap(&fewer_features, &[tenant("rk-a", "")]);
        let mut got = removed_keys(&old, &new);
        got.sort_unstable();
        let mut want: Vec<u64> = old.catalog.features.iter().map(|x| pair(t("rk-b"), x.intern)).collect();
        want.push(pair(t("rk-b"), old.catalog.image_delete_intern));
        want.push(pair(t("rk-a"), f("vin-recognition")));
        want.sort_unstable();
        assert_eq!(got, want);
        // Nothing removed: nothing to drop, whatever changed otherwise.
        let same = snap(SMALL_CATALOG, &[tenant("rk-a", ""), tenant("rk-b", "")]);
        assert!(removed_keys(&old, &same).is_empty());
    }
}
