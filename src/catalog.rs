//! What is sold, at what price (SPEC §3.2): families and their QPS caps, general-purpose package
//! kinds, features with their billing methods, prices and factors, and Image Search packages.

use std::collections::{BTreeMap, HashMap};

use rust_decimal::Decimal;
use serde::Deserialize;

use crate::diag::{Dec, Errs};
use crate::intern;

/// The built-in Image Search feature (SPEC §3.3): limits and prices come from `[image_search]`.
pub const IMAGE_SEARCH: &str = "image-search";

#[derive(Debug, Deserialize)]
pub struct RawCatalog {
    pub currency: String,
    #[serde(default)]
    pub families: BTreeMap<String, RawFamily>,
    #[serde(default)]
    pub general_packages: BTreeMap<String, RawGeneralPackage>,
    #[serde(default)]
    pub features: BTreeMap<String, RawFeature>,
    pub image_search: Option<RawImageSearch>,
}

#[derive(Debug, Deserialize)]
pub struct RawFamily {
    pub name: String,
    pub qps_cap: Option<u32>,
}

#[derive(Debug, Deserialize)]
pub struct RawGeneralPackage {
    pub name: String,
    pub families: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub struct RawFeature {
    pub name: Option<String>,
    pub family: String,
    pub billing: Vec<String>,
    #[serde(default)]
    pub unit: Option<String>,
    pub default_qps: Option<u32>,
    pub points_per_unit: Option<Dec>,
    #[serde(default)]
    pub payg_tiers: Vec<RawTier>,
    #[serde(default)]
    pub qps_prices: Vec<RawQpsPrice>,
    #[serde(default)]
    pub package_prices: Vec<RawPackagePrice>,
    #[serde(default)]
    pub video_prices: Vec<RawVideoPrice>,
}

#[derive(Debug, Deserialize)]
pub struct RawTier {
    pub up_to: Option<u64>,
    pub price: Dec,
}

#[derive(Debug, Deserialize)]
pub struct RawQpsPrice {
    pub up_to: Option<u32>,
    pub day: Dec,
    pub month: Dec,
}

#[derive(Debug, Deserialize)]
pub struct RawPackagePrice {
    pub points: u64,
    pub price: Dec,
}

#[derive(Debug, Deserialize)]
pub struct RawVideoPrice {
    pub max_fps: u32,
    pub max_lines: u32,
    pub price: Dec,
}

#[derive(Debug, Deserialize)]
pub struct RawImageSearch {
    pub currency: Option<String>,
    pub delete_qps: Option<u32>,
    pub retention_days: Option<u32>,
    #[serde(default)]
    pub packages: Vec<RawImagePackage>,
}

#[derive(Debug, Deserialize)]
pub struct RawImagePackage {
    pub capacity: u64,
    pub qps: u32,
    pub month: Dec,
}

/// A billing method a feature may support.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Payg,
    SinglePackage,
    GeneralPackage,
    PrepaidQps,
}

impl Method {
    fn parse(s: &str) -> Option<Method> {
        Some(match s {
            "payg" => Method::Payg,
            "single_package" => Method::SinglePackage,
            "general_package" => Method::GeneralPackage,
            "prepaid_qps" => Method::PrepaidQps,
            _ => return None,
        })
    }
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// The set of billing methods a feature supports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Billing(u8);

impl Billing {
    pub fn has(self, m: Method) -> bool {
        self.0 & m.bit() != 0
    }
    fn insert(&mut self, m: Method) -> bool {
        let new = !self.has(m);
        self.0 |= m.bit();
        new
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Call,
    VideoMinute,
}

#[derive(Debug, Clone)]
pub struct Family {
    pub id: String,
    pub name: String,
    pub qps_cap: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct GeneralPackage {
    pub id: String,
    pub name: String,
    pub families: Vec<usize>,
}

/// Serialized in the cluster journal ([`crate::cluster::Uncounted`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tier {
    pub up_to: Option<u64>,
    pub price: Decimal,
}

#[derive(Debug, Clone)]
pub struct QpsPrice {
    pub up_to: Option<u32>,
    pub day: Decimal,
    pub month: Decimal,
}

#[derive(Debug, Clone)]
pub struct PackagePrice {
    pub points: u64,
    pub price: Decimal,
}

#[derive(Debug, Clone)]
pub struct VideoPrice {
    pub max_fps: u32,
    pub max_lines: u32,
    pub price: Decimal,
}

impl VideoPrice {
    /// The cell's name in the ledger's pay-as-you-go minutes and the usage report.
    pub fn cell(&self) -> String {
        format!("fps<={},lines<={}", self.max_fps, self.max_lines)
    }
}

#[derive(Debug, Clone)]
pub struct Feature {
    pub id: String,
    pub name: String,
    /// Index into [`Catalog::families`]; `None` for the built-in image search feature.
    pub family: Option<usize>,
    pub billing: Billing,
    pub unit: Unit,
    pub default_qps: Option<u32>,
    pub points_per_unit: Decimal,
    /// `points_per_unit` in micro-points (the unit stores keep).
    pub factor_micro: i64,
    pub payg_tiers: Vec<Tier>,
    pub qps_prices: Vec<QpsPrice>,
    pub package_prices: Vec<PackagePrice>,
    pub video_prices: Vec<VideoPrice>,
    /// Stable id across reloads, used to key token buckets.
    pub intern: u32,
    /// The id as a `'static` string (header values and metric labels without allocation).
    pub label: &'static str,
}

#[derive(Debug, Clone)]
pub struct ImagePackage {
    pub capacity: u64,
    pub qps: u32,
    pub month: Decimal,
}

#[derive(Debug, Clone)]
pub struct ImageSearchCatalog {
    pub currency: String,
    pub delete_qps: u32,
    pub retention_days: u32,
    pub packages: Vec<ImagePackage>,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub currency: String,
    pub families: Vec<Family>,
    pub family_index: HashMap<String, usize>,
    pub general_packages: Vec<GeneralPackage>,
    pub general_index: HashMap<String, usize>,
    pub features: Vec<Feature>,
    pub feature_index: HashMap<String, usize>,
    pub image_search: ImageSearchCatalog,
    pub image_search_feature: usize,
    /// Image search deletions have their own limit (`delete_qps`), so their own bucket key:
    /// this pair id locally, and this bucket name on Redis (never the feature's own).
    pub image_delete_intern: u32,
    pub image_delete_label: &'static str,
}

impl Catalog {
    pub fn feature(&self, id: &str) -> Option<&Feature> {
        self.feature_index.get(id).map(|&i| &self.features[i])
    }
    pub fn family_cap(&self, f: &Feature) -> Option<u32> {
        f.family.and_then(|m| self.families[m].qps_cap)
    }
    pub fn family_id(&self, f: &Feature) -> &str {
        f.family.map(|m| self.families[m].id.as_str()).unwrap_or(IMAGE_SEARCH)
    }
    /// Whether some general-purpose package kind covers the feature's family.
    pub fn general_covers(&self, scope: usize, f: &Feature) -> bool {
        f.family.is_some_and(|m| self.general_packages[scope].families.contains(&m))
    }
}

fn check_ascending<T>(errs: &mut Errs<'_>, path: &str, items: &[T], up_to: impl Fn(&T) -> Option<u64>) {
    let mut prev: Option<u64> = None;
    for (i, item) in items.iter().enumerate() {
        let last = i + 1 == items.len();
        match (up_to(item), last) {
            (None, false) => errs.push(format!("{path}[{i}].up_to"), "only the last tier may leave out up_to"),
            (Some(_), true) => {
                errs.push(format!("{path}[{i}].up_to"), "the last tier must leave out up_to (it is open-ended)")
            }
            (Some(u), false) => {
                if u == 0 || prev.is_some_and(|p| u <= p) {
                    errs.push(format!("{path}[{i}].up_to"), format!("{u} must be above the previous tier's up_to"));
                }
                prev = Some(u);
            }
            (None, true) => {}
        }
    }
}

fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn non_negative(errs: &mut Errs<'_>, path: String, d: Dec) -> Decimal {
    if d.0.is_sign_negative() {
        errs.push(path, format!("{} must not be negative", d.0));
    }
    d.0
}

/// Validates the raw catalog; problems go to `errs`. Returns a catalog even with errors so that
/// the other files can still be checked against it.
pub fn compile(raw: RawCatalog, errs: &mut Errs<'_>) -> Catalog {
    if raw.currency.trim().is_empty() {
        errs.push("currency", "must not be empty");
    }
    let mut families = Vec::new();
    let mut family_index = HashMap::new();
    for (id, f) in raw.families {
        if f.qps_cap == Some(0) {
            errs.push(format!("families.{id}.qps_cap"), "must be at least 1 (leave it out for no cap)");
        }
        family_index.insert(id.clone(), families.len());
        families.push(Family { id, name: f.name, qps_cap: f.qps_cap });
    }
    let mut general_packages = Vec::new();
    let mut general_index = HashMap::new();
    for (id, g) in raw.general_packages {
        if g.families.is_empty() {
            errs.push(format!("general_packages.{id}.families"), "must name at least one family");
        }
        let mut fams = Vec::new();
        for (i, fam) in g.families.iter().enumerate() {
            match family_index.get(fam) {
                Some(&m) => fams.push(m),
                None => errs.push(format!("general_packages.{id}.families[{i}]"), format!("unknown family {fam:?}")),
            }
        }
        general_index.insert(id.clone(), general_packages.len());
        general_packages.push(GeneralPackage { id, name: g.name, families: fams });
    }

    let mut features = Vec::new();
    let mut feature_index = HashMap::new();
    for (id, f) in raw.features {
        let p = format!("features.{id}");
        if id == IMAGE_SEARCH {
            errs.push(p.clone(), "image-search is built in: configure it under [image_search]");
            continue;
        }
        let family = family_index.get(&f.family).copied();
        if family.is_none() {
            errs.push(format!("{p}.family"), format!("unknown family {:?}", f.family));
        }
        let cap = family.and_then(|m| families[m].qps_cap);
        let mut billing = Billing::default();
        if f.billing.is_empty() {
            errs.push(
                format!("{p}.billing"),
                "must list at least one of payg, single_package, general_package, prepaid_qps",
            );
        }
        for (i, b) in f.billing.iter().enumerate() {
            match Method::parse(b) {
                Some(m) => {
                    if !billing.insert(m) {
                        errs.push(format!("{p}.billing[{i}]"), format!("{b:?} is listed twice"));
                    }
                }
                None => errs.push(
                    format!("{p}.billing[{i}]"),
                    format!(
                        "unknown billing method {b:?} (expected payg, single_package, general_package or prepaid_qps)"
                    ),
                ),
            }
        }
        if billing.has(Method::GeneralPackage)
            && family.is_some_and(|m| !general_packages.iter().any(|g| g.families.contains(&m)))
        {
            errs.push(
                format!("{p}.billing"),
                format!("general_package is listed but no general package kind covers family {:?}", f.family),
            );
        }
        let unit = match f.unit.as_deref() {
            None | Some("call") => Unit::Call,
            Some("video-minute") => Unit::VideoMinute,
            Some(other) => {
                errs.push(
                    format!("{p}.unit"),
                    format!("unknown unit {other:?} (expected \"call\" or \"video-minute\")"),
                );
                Unit::Call
            }
        };
        if let Some(q) = f.default_qps {
            if let Some(e) = crate::units::qps_out_of_range(q) {
                errs.push(format!("{p}.default_qps"), e);
            }
            if let Some(c) = cap.filter(|&c| q > c) {
                errs.push(format!("{p}.default_qps"), format!("{q} exceeds the {} cap of {c}", f.family));
            }
        }
        let points_per_unit = f.points_per_unit.map(|d| d.0).unwrap_or(Decimal::ONE);
        let factor_micro = crate::units::micro_or_reason(points_per_unit);
        if points_per_unit <= Decimal::ZERO {
            errs.push(format!("{p}.points_per_unit"), "must be above 0");
        } else if let Err(e) = &factor_micro {
            errs.push(format!("{p}.points_per_unit"), e.clone());
        }
        let factor_micro = factor_micro.unwrap_or(0);
        check_ascending(errs, &format!("{p}.payg_tiers"), &f.payg_tiers, |t| t.up_to);
        if !f.payg_tiers.is_empty() && !billing.has(Method::Payg) {
            errs.push(format!("{p}.payg_tiers"), "given, but billing does not include payg");
        }
        let payg_tiers = f
            .payg_tiers
            .iter()
            .enumerate()
            .map(|(i, t)| Tier {
                up_to: t.up_to,
                price: non_negative(errs, format!("{p}.payg_tiers[{i}].price"), t.price),
            })
            .collect();
        check_ascending(errs, &format!("{p}.qps_prices"), &f.qps_prices, |t| t.up_to.map(u64::from));
        if !f.qps_prices.is_empty() && !billing.has(Method::PrepaidQps) {
            errs.push(format!("{p}.qps_prices"), "given, but billing does not include prepaid_qps");
        }
        let qps_prices = f
            .qps_prices
            .iter()
            .enumerate()
            .map(|(i, t)| QpsPrice {
                up_to: t.up_to,
                day: non_negative(errs, format!("{p}.qps_prices[{i}].day"), t.day),
                month: non_negative(errs, format!("{p}.qps_prices[{i}].month"), t.month),
            })
            .collect();
        if !f.package_prices.is_empty() && !billing.has(Method::SinglePackage) && !billing.has(Method::GeneralPackage) {
            errs.push(format!("{p}.package_prices"), "given, but billing includes no package method");
        }
        let mut package_prices = Vec::new();
        for (i, pp) in f.package_prices.iter().enumerate() {
            if pp.points == 0 {
                errs.push(format!("{p}.package_prices[{i}].points"), "must be at least 1");
            }
            if package_prices.iter().any(|x: &PackagePrice| x.points == pp.points) {
                errs.push(format!("{p}.package_prices[{i}].points"), format!("{} is listed twice", pp.points));
            }
            let price = non_negative(errs, format!("{p}.package_prices[{i}].price"), pp.price);
            package_prices.push(PackagePrice { points: pp.points, price });
        }
        if !f.video_prices.is_empty() && unit != Unit::VideoMinute {
            errs.push(format!("{p}.video_prices"), "only video-minute features have video prices");
        }
        let mut video_prices = Vec::new();
        for (i, v) in f.video_prices.iter().enumerate() {
            if v.max_fps == 0 || v.max_lines == 0 {
                errs.push(format!("{p}.video_prices[{i}]"), "max_fps and max_lines must be at least 1");
            }
            if video_prices.iter().any(|x: &VideoPrice| x.max_fps == v.max_fps && x.max_lines == v.max_lines) {
                errs.push(format!("{p}.video_prices[{i}]"), "the same (max_fps, max_lines) cell is listed twice");
            }
            let price = non_negative(errs, format!("{p}.video_prices[{i}].price"), v.price);
            video_prices.push(VideoPrice { max_fps: v.max_fps, max_lines: v.max_lines, price });
        }
        if !valid_id(&id) {
            errs.push(p.clone(), "feature ids use only lowercase letters, digits, '.', '_' and '-'");
        }
        let (intern, label) = intern::feature(&id);
        feature_index.insert(id.clone(), features.len());
        features.push(Feature {
            intern,
            label,
            name: f.name.unwrap_or_else(|| id.clone()),
            id,
            family,
            billing,
            unit,
            default_qps: f.default_qps,
            points_per_unit,
            factor_micro,
            payg_tiers,
            qps_prices,
            package_prices,
            video_prices,
        });
    }

    let image_search = match raw.image_search {
        None => ImageSearchCatalog {
            currency: raw.currency.clone(),
            delete_qps: 20,
            retention_days: 7,
            packages: Vec::new(),
        },
        Some(is) => {
            let delete_qps = is.delete_qps.unwrap_or(20);
            if let Some(e) = crate::units::qps_out_of_range(delete_qps) {
                errs.push("image_search.delete_qps", e);
            }
            let mut packages: Vec<ImagePackage> = Vec::new();
            for (i, pk) in is.packages.iter().enumerate() {
                if pk.capacity == 0 || pk.qps == 0 {
                    errs.push(format!("image_search.packages[{i}]"), "capacity and qps must be at least 1");
                }
                if packages.iter().any(|x| x.capacity == pk.capacity && x.qps == pk.qps) {
                    errs.push(
                        format!("image_search.packages[{i}]"),
                        format!("{}/{} is listed twice", pk.capacity, pk.qps),
                    );
                }
                let month = non_negative(errs, format!("image_search.packages[{i}].month"), pk.month);
                packages.push(ImagePackage { capacity: pk.capacity, qps: pk.qps, month });
            }
            ImageSearchCatalog {
                currency: is.currency.unwrap_or_else(|| raw.currency.clone()),
                delete_qps,
                retention_days: is.retention_days.unwrap_or(7),
                packages,
            }
        }
    };
    let image_search_feature = features.len();
    let (intern, label) = intern::feature(IMAGE_SEARCH);
    feature_index.insert(IMAGE_SEARCH.to_string(), image_search_feature);
    features.push(Feature {
        id: IMAGE_SEARCH.into(),
        name: "Image Search".into(),
        family: None,
        billing: Billing::default(),
        unit: Unit::Call,
        default_qps: None,
        points_per_unit: Decimal::ONE,
        factor_micro: crate::units::MICRO,
        payg_tiers: Vec::new(),
        qps_prices: Vec::new(),
        package_prices: Vec::new(),
        video_prices: Vec::new(),
        intern,
        label,
    });

    Catalog {
        image_delete_intern: intern::feature("image-search:delete").0,
        image_delete_label: intern::feature("image-search:delete").1,
        currency: raw.currency,
        families,
        family_index,
        general_packages,
        general_index,
        features,
        feature_index,
        image_search,
        image_search_feature,
    }
}
