//! `entitlements.json`: what each tenant bought (SPEC §3.3).

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::{Dec, Errs};
use crate::catalog::{Catalog, Method};
use crate::intern;
use crate::time::parse_rfc3339;

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawEntitlements {
    #[serde(deserialize_with = "unique_tenants")]
    pub tenants: BTreeMap<String, RawTenant>,
}

/// `tenants`, refusing an id given twice: JSON parsers keep the last of two equal keys, so the
/// earlier tenant (its keys, plans and packages) would silently vanish.
fn unique_tenants<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, RawTenant>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = BTreeMap<String, RawTenant>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of tenants by id")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(id) = m.next_key::<String>()? {
                if out.contains_key(&id) {
                    return Err(serde::de::Error::custom(format!(
                        "duplicate tenant {id:?}: a tenant id may appear once"
                    )));
                }
                let t = m.next_value::<RawTenant>()?;
                out.insert(id, t);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V)
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawTenant {
    pub api_keys: Vec<String>,
    pub services: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qps_plans: Vec<RawPlan>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packages: Vec<RawPackage>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_search: Option<RawImageSearch>,
    /// Shadow mode for this tenant alone (SPEC §5.5).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shadow: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawPlan {
    pub feature: String,
    pub qps: u32,
    pub effective_at: String,
    pub expires_at: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub temporary_upgrades: Vec<RawUpgrade>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawUpgrade {
    pub qps: u32,
    pub from: String,
    pub until: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawPackage {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    pub points: Dec,
    pub ordered_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_at: Option<String>,
    pub expires_at: String,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RawImageSearch {
    pub capacity: u64,
    pub qps: u32,
    pub expires_at: String,
}

#[derive(Debug, Clone)]
pub struct Upgrade {
    pub qps: u32,
    pub from: i64,
    pub until: i64,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub feature: usize,
    pub qps: u32,
    pub effective_at: i64,
    pub expires_at: i64,
    pub upgrades: Vec<Upgrade>,
}

impl Plan {
    pub fn active_at(&self, t: i64) -> bool {
        self.effective_at <= t && t < self.expires_at
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageTarget {
    /// Single-category: one feature (index into the catalog's features).
    Feature(usize),
    /// General-purpose: a package kind (index into the catalog's general packages).
    Scope(usize),
}

#[derive(Debug, Clone)]
pub struct Package {
    pub id: String,
    /// Interned id: with the tenant's, the key of the package's live state.
    pub intern: u32,
    pub label: &'static str,
    pub target: PackageTarget,
    pub points: Decimal,
    /// `points` in micro-points (the unit stores keep).
    pub points_micro: i64,
    pub ordered_at: i64,
    pub effective_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Clone)]
pub struct ImageInstance {
    pub capacity: u64,
    pub qps: u32,
    pub expires_at: i64,
}

#[derive(Debug, Clone)]
pub struct Tenant {
    pub name: String,
    /// Stable id across reloads (bucket keys).
    pub intern: u32,
    /// The name as a `'static` string (header values and metric labels without allocation).
    pub label: &'static str,
    pub api_keys: Vec<[u8; 32]>,
    /// Activated services, indexed like the catalog's families.
    pub services: Vec<bool>,
    pub plans: Vec<Plan>,
    pub packages: Vec<Package>,
    pub image_search: Option<ImageInstance>,
    /// Shadow mode for this tenant (SPEC §5.5), whatever `[admission].mode` says.
    pub shadow: bool,
}

impl Tenant {
    /// The QPS plan of `feature` active at `t` (plans of one feature never overlap).
    pub fn active_plan(&self, feature: usize, t: i64) -> Option<&Plan> {
        self.plans.iter().find(|p| p.feature == feature && p.active_at(t))
    }

    /// Whether the tenant may call a feature of `family`: its service is activated, or, for the
    /// Image Search features (no family), the tenant has an instance.
    pub fn activated(&self, family: Option<usize>) -> bool {
        match family {
            Some(m) => self.services[m],
            None => self.image_search.is_some(),
        }
    }
}

fn time(errs: &mut Errs<'_>, path: String, s: &str) -> i64 {
    parse_rfc3339(s).unwrap_or_else(|e| {
        errs.push(path, e);
        0
    })
}

fn parse_key_hash(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hex = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(hex, 16).ok()?;
    }
    Some(out)
}

fn valid_tenant_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

pub fn compile(raw: RawEntitlements, catalog: &Catalog, errs: &mut Errs<'_>) -> Vec<Tenant> {
    let mut tenants = Vec::with_capacity(raw.tenants.len());
    let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
    for (name, t) in &raw.tenants {
        let p = format!("tenants.{name}");
        if !valid_tenant_id(name) {
            errs.push(p.clone(), "tenant ids use only letters, digits, '.', '_' and '-' (at most 128)");
            continue;
        }
        if t.api_keys.is_empty() {
            errs.push(format!("{p}.api_keys"), "a tenant needs at least one key hash (see `turnstile hash-key`)");
        }
        let mut api_keys = Vec::new();
        for (i, k) in t.api_keys.iter().enumerate() {
            let kp = format!("{p}.api_keys[{i}]");
            match parse_key_hash(k) {
                None => {
                    errs.push(kp, "must be the 64-character lowercase sha256 hex of the key (see `turnstile hash-key`)")
                }
                Some(h) => match key_owner.get(&h) {
                    Some(other) => errs.push(kp, format!("duplicate key hash: already used by tenant {other:?}")),
                    None => {
                        key_owner.insert(h, name.clone());
                        api_keys.push(h);
                    }
                },
            }
        }
        let mut services = vec![false; catalog.families.len()];
        for (i, s) in t.services.iter().enumerate() {
            match catalog.family_index.get(s) {
                Some(&m) => services[m] = true,
                None => errs
                    .push(format!("{p}.services[{i}]"), format!("unknown service {s:?} (not a family in the catalog)")),
            }
        }

        let mut plans: Vec<Plan> = Vec::new();
        for (i, pl) in t.qps_plans.iter().enumerate() {
            let pp = format!("{p}.qps_plans[{i}]");
            let feature = match catalog.feature_index.get(&pl.feature) {
                Some(&f) if f != catalog.image_search_feature => f,
                Some(_) => {
                    errs.push(format!("{pp}.feature"), "image search limits come from the tenant's image_search entry");
                    continue;
                }
                None => {
                    errs.push(format!("{pp}.feature"), format!("unknown feature {:?}", pl.feature));
                    continue;
                }
            };
            let f = &catalog.features[feature];
            if !f.billing.has(Method::PrepaidQps) {
                errs.push(format!("{pp}.feature"), format!("{} is not sold with prepaid QPS", f.id));
            }
            let cap = catalog.family_cap(f);
            let fam = catalog.family_id(f);
            let check_qps = |errs: &mut Errs<'_>, path: String, q: u32| {
                if let Some(e) = crate::units::qps_out_of_range(q) {
                    errs.push(path, e);
                } else if let Some(c) = cap.filter(|&c| q > c) {
                    errs.push(path, format!("{q} exceeds the {fam} cap of {c}"));
                }
            };
            check_qps(errs, format!("{pp}.qps"), pl.qps);
            let effective_at = time(errs, format!("{pp}.effective_at"), &pl.effective_at);
            let expires_at = time(errs, format!("{pp}.expires_at"), &pl.expires_at);
            if expires_at <= effective_at {
                errs.push(format!("{pp}.expires_at"), "must be after effective_at");
            }
            let mut upgrades = Vec::new();
            for (j, u) in pl.temporary_upgrades.iter().enumerate() {
                let up = format!("{pp}.temporary_upgrades[{j}]");
                check_qps(errs, format!("{up}.qps"), u.qps);
                let from = time(errs, format!("{up}.from"), &u.from);
                let until = time(errs, format!("{up}.until"), &u.until);
                if until <= from {
                    errs.push(format!("{up}.until"), "must be after from");
                }
                upgrades.push(Upgrade { qps: u.qps, from, until });
            }
            if let Some(j) = plans
                .iter()
                .position(|o| o.feature == feature && o.effective_at < expires_at && effective_at < o.expires_at)
            {
                errs.push(format!("{pp}.effective_at"), format!("overlaps {p}.qps_plans[{j}] for the same feature"));
            }
            plans.push(Plan { feature, qps: pl.qps, effective_at, expires_at, upgrades });
        }

        let mut packages: Vec<Package> = Vec::new();
        for (i, pk) in t.packages.iter().enumerate() {
            let pp = format!("{p}.packages[{i}]");
            if pk.id.is_empty() {
                errs.push(format!("{pp}.id"), "must not be empty");
            } else if packages.iter().any(|o| o.id == pk.id) {
                errs.push(format!("{pp}.id"), format!("duplicate package id {:?}", pk.id));
            }
            let target = match (&pk.feature, &pk.scope) {
                (Some(_), Some(_)) => {
                    errs.push(
                        pp.clone(),
                        "has both feature and scope: a package is single-category or general-purpose",
                    );
                    None
                }
                (None, None) => {
                    errs.push(pp.clone(), "needs feature (single-category) or scope (general-purpose)");
                    None
                }
                (Some(fid), None) => match catalog.feature(fid) {
                    Some(f) if f.billing.has(Method::SinglePackage) => {
                        catalog.feature_index.get(fid).map(|&i| PackageTarget::Feature(i))
                    }
                    Some(_) => {
                        errs.push(format!("{pp}.feature"), format!("{fid} is not sold as a single-category package"));
                        None
                    }
                    None => {
                        errs.push(format!("{pp}.feature"), format!("unknown feature {fid:?}"));
                        None
                    }
                },
                (None, Some(scope)) => match catalog.general_index.get(scope) {
                    Some(&g) => Some(PackageTarget::Scope(g)),
                    None => {
                        errs.push(format!("{pp}.scope"), format!("unknown general package kind {scope:?}"));
                        None
                    }
                },
            };
            let points_micro = crate::units::micro_or_reason(pk.points.0);
            if pk.points.0 <= Decimal::ZERO {
                errs.push(format!("{pp}.points"), "must be above 0");
            } else if let Err(e) = &points_micro {
                errs.push(format!("{pp}.points"), e.clone());
            }
            let points_micro = points_micro.unwrap_or(0);
            let ordered_at = time(errs, format!("{pp}.ordered_at"), &pk.ordered_at);
            let effective_at = match &pk.effective_at {
                Some(e) => time(errs, format!("{pp}.effective_at"), e),
                None => ordered_at,
            };
            let expires_at = time(errs, format!("{pp}.expires_at"), &pk.expires_at);
            if expires_at <= effective_at {
                errs.push(format!("{pp}.expires_at"), "must be after effective_at (or ordered_at)");
            }
            if let Some(target) = target {
                let (intern, label) = intern::package(&pk.id);
                packages.push(Package {
                    id: pk.id.clone(),
                    intern,
                    label,
                    target,
                    points: pk.points.0,
                    points_micro,
                    ordered_at,
                    effective_at,
                    expires_at,
                });
            }
        }
        // Payer order (SPEC §6): single-category before general-purpose; within each, the soonest
        // expiry, then the earliest order, then the smallest id.
        packages.sort_by(|a, b| {
            let general = |p: &Package| matches!(p.target, PackageTarget::Scope(_));
            (general(a), a.expires_at, a.ordered_at, &a.id).cmp(&(general(b), b.expires_at, b.ordered_at, &b.id))
        });

        let image_search = t.image_search.as_ref().map(|is| {
            let ip = format!("{p}.image_search");
            // Any positive size: support quotes larger or custom packages (seed 004, SPEC §3.3);
            // only `quote image-search` needs a catalog package.
            if is.capacity == 0 {
                errs.push(format!("{ip}.capacity"), "must be at least 1");
            }
            if let Some(e) = crate::units::qps_out_of_range(is.qps) {
                errs.push(format!("{ip}.qps"), e);
            }
            ImageInstance {
                capacity: is.capacity,
                qps: is.qps,
                expires_at: time(errs, format!("{ip}.expires_at"), &is.expires_at),
            }
        });

        let (intern, label) = intern::tenant(name);
        tenants.push(Tenant {
            name: name.clone(),
            intern,
            label,
            api_keys,
            services,
            plans,
            packages,
            image_search,
            shadow: t.shadow,
        });
    }
    tenants
}

#[cfg(test)]
mod tests {
    use crate::config::{Texts, EMBEDDED_CATALOG};
    use crate::snapshot::build;

    const MAIN: &str = "[server]\nupstream = \"http://127.0.0.1:1\"\n";
    const KEY: &str = "0000000000000000000000000000000000000000000000000000000000000001";

    fn ents(capacity: u64, qps: u32) -> String {
        format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{KEY}"], "services": [],
                "image_search": {{"capacity": {capacity}, "qps": {qps}, "expires_at": "2036-01-01T00:00:00Z"}}}}}}}}"#
        )
    }

    #[test]
    fn image_search_instance_need_not_be_a_catalog_package() {
        // Seed 004: support quotes larger or custom packages; 5,000,000 / 8 is not on the list.
        let snap =
            build(&Texts::in_memory(MAIN, EMBEDDED_CATALOG, ents(5_000_000, 8)), 1).unwrap_or_else(|e| panic!("{e}"));
        let inst = snap.tenants[0].image_search.as_ref().expect("instance");
        assert_eq!((inst.capacity, inst.qps), (5_000_000, 8));
        let snap =
            build(&Texts::in_memory(MAIN, EMBEDDED_CATALOG, ents(80_000_000, 25)), 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(snap.tenants[0].image_search.as_ref().map(|i| i.qps), Some(25));
    }

    #[test]
    fn shadow_mode_is_off_by_default_and_set_by_the_mode_or_a_tenant_flag() {
        use crate::config::gateway::AdmissionMode;
        let snap = build(&Texts::in_memory(MAIN, EMBEDDED_CATALOG, ents(1, 1)), 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((snap.settings.admission_mode, snap.tenants[0].shadow), (AdmissionMode::Enforce, false));
        let main = format!("{MAIN}[admission]\nmode = \"shadow\"\n");
        let flagged = ents(1, 1).replace(r#""services": [],"#, r#""services": [], "shadow": true,"#);
        let snap = build(&Texts::in_memory(main, EMBEDDED_CATALOG, flagged), 1).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((snap.settings.admission_mode, snap.tenants[0].shadow), (AdmissionMode::Shadow, true));
    }

    #[test]
    fn image_search_zero_capacity_or_qps_is_an_error_naming_file_and_field() {
        let errs = build(&Texts::in_memory(MAIN, EMBEDDED_CATALOG, ents(0, 0)), 1).err().expect("rejected").to_string();
        assert!(errs.contains("entitlements.json: tenants.acme.image_search.capacity: must be at least 1"), "{errs}");
        assert!(errs.contains("entitlements.json: tenants.acme.image_search.qps: must be at least 1"), "{errs}");
    }

    #[test]
    fn points_with_more_than_six_decimals_are_errors_naming_file_and_field() {
        let ents = format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{KEY}"], "services": ["object_detection"], "packages": [
                {{"id": "od", "feature": "object-detection", "points": "1.0000001",
                  "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}},
                {{"id": "ok", "feature": "object-detection", "points": "1.0000010",
                  "ordered_at": "2026-01-01T00:00:00Z", "expires_at": "2027-01-01T00:00:00Z"}}]}}}}}}"#
        );
        let errs = build(&Texts::in_memory(MAIN, EMBEDDED_CATALOG, &ents), 1).err().expect("rejected").to_string();
        assert!(
            errs.contains("entitlements.json: tenants.acme.packages[0].points: 1.0000001 has more than 6 decimals"),
            "{errs}"
        );
        assert!(!errs.contains("packages[1]"), "trailing zeros are not decimals: {errs}");
        let catalog = EMBEDDED_CATALOG.replacen("points_per_unit = \"0.2\"", "points_per_unit = \"0.2000005\"", 1);
        assert_ne!(catalog, EMBEDDED_CATALOG);
        let errs = build(&Texts::in_memory(MAIN, &catalog, ents.replace("1.0000001", "1")), 1)
            .err()
            .expect("rejected")
            .to_string();
        assert!(
            errs.contains("catalog.toml: features.")
                && errs.contains(".points_per_unit: 0.2000005 has more than 6 decimals"),
            "{errs}"
        );
    }
}
