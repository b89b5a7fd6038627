//! Who pays (SPEC §6), as pure functions: no I/O, no locks.

/// Payers, in the order of the usage report's `units` object.
pub const PAYERS: [&str; 5] = ["prepaid_qps", "single_package", "general_package", "payg", "free_default"];

/// The payers of SPEC §6, indexed like [`PAYERS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[repr(usize)]
pub enum PayerKind {
    PrepaidQps = 0,
    SinglePackage = 1,
    GeneralPackage = 2,
    Payg = 3,
    FreeDefault = 4,
}

impl PayerKind {
    pub const ALL: [PayerKind; 5] = [
        PayerKind::PrepaidQps,
        PayerKind::SinglePackage,
        PayerKind::GeneralPackage,
        PayerKind::Payg,
        PayerKind::FreeDefault,
    ];

    pub fn as_str(self) -> &'static str {
        PAYERS[self as usize]
    }
}

use crate::catalog::{Catalog, Feature, Method};
use crate::config::entitlements::{Package, PackageTarget, Tenant};
use crate::units::MS_PER_MINUTE;

/// SPEC §6.1: an active QPS plan for the feature (or an Image Search instance, a prepaid
/// subscription) pays; nothing is charged.
pub fn prepaid(catalog: &Catalog, tenant: &Tenant, feature: usize, now: i64) -> bool {
    feature == catalog.image_search_feature || tenant.active_plan(feature, now).is_some()
}

/// SPEC §6.2: whether package `p` can pay for feature `feature` at `now`, ignoring its balance:
/// effective and not expired, and either single-category for the feature, or general-purpose
/// covering the feature's family while the feature's billing includes `general_package`.
pub fn applies(catalog: &Catalog, f: &Feature, feature: usize, p: &Package, now: i64) -> Option<PayerKind> {
    if !(p.effective_at <= now && now < p.expires_at) {
        return None;
    }
    match p.target {
        PackageTarget::Feature(i) if i == feature => Some(PayerKind::SinglePackage),
        PackageTarget::Scope(g) if f.billing.has(Method::GeneralPackage) && catalog.general_covers(g, f) => {
            Some(PayerKind::GeneralPackage)
        }
        _ => None,
    }
}

/// The packages that may pay, in SPEC §6 order: single-category before general-purpose, then the
/// soonest `expires_at`, the earliest `ordered_at`, the smallest id (the order
/// [`crate::config::entitlements`] sorts a tenant's packages in), each with the payer it is.
pub fn candidates<'a>(
    catalog: &'a Catalog,
    tenant: &'a Tenant,
    feature: usize,
    now: i64,
) -> impl Iterator<Item = (&'a Package, PayerKind)> + 'a {
    let f = &catalog.features[feature];
    tenant.packages.iter().filter_map(move |p| applies(catalog, f, feature, p, now).map(|k| (p, k)))
}

/// The whole-factor rule: a package pays a call only if what it still holds (points, minus
/// consumed, minus held by calls in flight) covers the whole factor.
pub fn pays_whole(available_micro: i64, factor_micro: i64) -> bool {
    available_micro >= factor_micro
}

/// SPEC §6.3–4 for a per-call feature no package pays: `payg` if its billing includes it, else
/// `free_default` if it includes `prepaid_qps`, else `None` (402).
pub fn call_fallback(f: &Feature) -> Option<PayerKind> {
    if f.billing.has(Method::Payg) {
        Some(PayerKind::Payg)
    } else if f.billing.has(Method::PrepaidQps) {
        Some(PayerKind::FreeDefault)
    } else {
        None
    }
}

/// Where video ms beyond the packages go (issue 11): `payg` when the reported cell has a price
/// or the billing includes payg, else `free_default` when it includes `prepaid_qps`, else
/// `None`: recorded unpaid (never silently free).
pub fn video_fallback(f: &Feature, priced_cell: bool) -> Option<PayerKind> {
    if priced_cell || f.billing.has(Method::Payg) {
        Some(PayerKind::Payg)
    } else if f.billing.has(Method::PrepaidQps) {
        Some(PayerKind::FreeDefault)
    } else {
        None
    }
}

/// Micro-points that pay `ms` of video at `factor_micro` points per minute:
/// `ceil(ms × factor / 60000)` (u128, saturating at `i64::MAX`).
pub fn video_want(ms: i64, factor_micro: i64) -> i64 {
    if ms <= 0 || factor_micro <= 0 {
        return 0;
    }
    let n = (ms as u128) * (factor_micro as u128);
    i64::try_from(n.div_ceil(MS_PER_MINUTE as u128)).unwrap_or(i64::MAX)
}

/// The ms that `taken` micro-points pay at `factor_micro` per minute: `floor(taken × 60000 /
/// factor)` — a package never pays a millisecond it did not hold the points for.
pub fn video_ms_for(taken: i64, factor_micro: i64) -> i64 {
    if taken <= 0 || factor_micro <= 0 {
        return 0;
    }
    i64::try_from((taken as u128) * (MS_PER_MINUTE as u128) / (factor_micro as u128)).unwrap_or(i64::MAX)
}

/// Splits `ms` of video over what the candidates gave, in order, for a take of
/// `want = video_want(ms, factor)` micro-points in total (the store takes greedily: each
/// candidate up to what the total still lacks). Returns the ms each candidate pays and the ms
/// left for the fallback. Exact: the parts and the rest sum to `ms`. Cumulative: once the takes
/// reach `want` everything is paid; before that, the candidates together pay
/// `floor(Σtaken × 60000 / factor)` ms (so a split over several packages loses less than one ms
/// to rounding, and that goes to the fallback, never free).
pub fn split_video(ms: i64, factor_micro: i64, taken: &[i64]) -> (Vec<i64>, i64) {
    let want = video_want(ms, factor_micro);
    let (mut cum, mut paid_before) = (0i64, 0i64);
    let mut parts = Vec::with_capacity(taken.len());
    for &t in taken {
        cum = cum.saturating_add(t.max(0));
        let paid = if cum >= want { ms.max(0) } else { video_ms_for(cum, factor_micro).min(ms.max(0)) };
        parts.push(paid - paid_before);
        paid_before = paid;
    }
    (parts, ms.max(0) - paid_before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::Snapshot;

    const MAIN: &str = "[server]\nupstream = \"http://127.0.0.1:1\"\n";
    const SHIPPED: &str = include_str!("../config/catalog.toml");
    const KEY: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

    fn snapshot(catalog: &str, packages: &str, services: &str, plans: &str) -> Snapshot {
        let ents = format!(
            r#"{{"tenants": {{"acme": {{"api_keys": ["{KEY}"], "services": [{services}], "packages": [{packages}], "qps_plans": [{plans}]}}}}}}"#
        );
        let texts = crate::config::Texts::in_memory(MAIN, catalog, &ents);
        crate::snapshot::build(&texts, 1).unwrap_or_else(|e| panic!("{e}"))
    }

    fn t(s: &str) -> i64 {
        crate::time::parse_rfc3339(s).unwrap()
    }

    fn order(s: &Snapshot, feature: &str, now: i64) -> Vec<(String, PayerKind)> {
        let f = s.catalog.feature_index[feature];
        candidates(&s.catalog, &s.tenants[0], f, now).map(|(p, k)| (p.id.clone(), k)).collect()
    }

    #[test]
    fn candidates_single_then_general_soonest_expiry_then_ordered_then_id_and_expired_skipped() {
        let pk = |id: &str, ordered: &str, expires: &str| {
            format!(
                r#"{{"id": "{id}", "feature": "object-detection", "points": "1", "ordered_at": "{ordered}", "expires_at": "{expires}"}}"#
            )
        };
        let packages = [
            r#"{"id": "gen", "scope": "vision-image", "points": "1", "ordered_at": "2025-01-01T00:00:00Z", "expires_at": "2026-06-01T00:00:00Z"}"#.to_string(),
            pk("z-late", "2026-01-01T00:00:00Z", "2027-06-01T00:00:00Z"),
            pk("b-same", "2026-01-02T00:00:00Z", "2027-01-01T00:00:00Z"),
            pk("a-same-later-order", "2026-01-03T00:00:00Z", "2027-01-01T00:00:00Z"),
            pk("c-same", "2026-01-02T00:00:00Z", "2027-01-01T00:00:00Z"),
            pk("expired", "2025-01-01T00:00:00Z", "2026-01-01T00:00:00Z"),
            pk("not-yet", "2026-01-01T00:00:00Z", "2028-01-01T00:00:00Z")
                .replace("\"ordered_at\"", "\"effective_at\": \"2026-06-01T00:00:00Z\", \"ordered_at\""),
        ]
        .join(",");
        let s = snapshot(SHIPPED, &packages, "\"object_detection\"", "");
        let now = t("2026-03-01T00:00:00Z");
        let got = order(&s, "object-detection", now);
        let want = [
            ("b-same", PayerKind::SinglePackage),
            ("c-same", PayerKind::SinglePackage),
            ("a-same-later-order", PayerKind::SinglePackage),
            ("z-late", PayerKind::SinglePackage),
            ("gen", PayerKind::GeneralPackage),
        ];
        assert_eq!(got, want.map(|(i, k)| (i.to_string(), k)));
        // effective_at inclusive, expires_at exclusive.
        let later = order(&s, "object-detection", t("2026-06-01T00:00:00Z"));
        assert!(later.iter().any(|(i, _)| i == "not-yet"), "{later:?}");
        assert!(!later.iter().any(|(i, _)| i == "gen"), "expired at its expires_at: {later:?}");
    }

    #[test]
    fn general_packages_pay_only_features_whose_billing_includes_them_and_whose_family_they_cover() {
        let gen = r#"{"id": "gen", "scope": "vision-image", "points": "1", "ordered_at": "2025-01-01T00:00:00Z", "expires_at": "2027-06-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, gen, "\"object_detection\", \"text_recognition\"", "");
        let now = t("2026-03-01T00:00:00Z");
        assert_eq!(order(&s, "object-detection", now).len(), 1);
        assert!(order(&s, "license-plate-recognition", now).is_empty(), "text recognition is not covered");
    }

    #[test]
    fn an_active_plan_or_image_search_is_prepaid() {
        let plan = r#"{"feature": "license-plate-recognition", "qps": 5, "effective_at": "2026-01-01T00:00:00Z", "expires_at": "2026-02-01T00:00:00Z"}"#;
        let s = snapshot(SHIPPED, "", "\"text_recognition\"", plan);
        let f = s.catalog.feature_index["license-plate-recognition"];
        assert!(prepaid(&s.catalog, &s.tenants[0], f, t("2026-01-15T00:00:00Z")));
        assert!(!prepaid(&s.catalog, &s.tenants[0], f, t("2026-02-01T00:00:00Z")), "expired plan");
        assert!(prepaid(&s.catalog, &s.tenants[0], s.catalog.image_search_feature, t("2026-02-01T00:00:00Z")));
    }

    #[test]
    fn fallbacks_payg_then_free_default_then_402_or_unpaid() {
        let s = snapshot(SHIPPED, "", "", "");
        let f = |id: &str| &s.catalog.features[s.catalog.feature_index[id]];
        assert_eq!(call_fallback(f("license-plate-recognition")), Some(PayerKind::Payg));
        let mut free = f("license-plate-recognition").clone();
        free.billing = crate::catalog::Billing::default();
        assert_eq!(call_fallback(&free), None, "nothing pays: 402");
        assert_eq!(video_fallback(&free, true), Some(PayerKind::Payg), "a priced cell is payg");
        assert_eq!(video_fallback(&free, false), None, "unpaid");
    }

    #[test]
    fn whole_factor_rule() {
        assert!(pays_whole(200_000, 200_000));
        assert!(!pays_whole(199_999, 200_000));
    }

    #[test]
    fn video_want_rounds_up_and_paid_ms_rounds_down() {
        // 1 point per minute: 140 s want 2.333334 points.
        assert_eq!(video_want(140_000, 1_000_000), 2_333_334);
        assert_eq!(video_ms_for(1_000_000, 1_000_000), 60_000);
        assert_eq!(video_ms_for(1, 1_000_000), 0, "a micro-point is 0.06 ms: pays nothing");
        assert_eq!(video_want(0, 1_000_000), 0);
        assert_eq!(video_want(i64::MAX, i64::MAX), i64::MAX, "saturates");
    }

    #[test]
    fn split_is_exact_and_falls_through_in_order() {
        // 140 s at 1 point/min; a 1-point package then nothing: 60 s paid, 80 s left (seed).
        assert_eq!(split_video(140_000, 1_000_000, &[1_000_000, 0]), (vec![60_000, 0], 80_000));
        // Two packages that together cover everything: the second pays the rest exactly.
        assert_eq!(split_video(140_000, 1_000_000, &[1_000_000, 1_333_334]), (vec![60_000, 80_000], 0));
        // Fully paid by the first.
        assert_eq!(split_video(30_000, 1_000_000, &[500_000]), (vec![30_000], 0));
        // Partial takes with fractions of a ms: cumulative floor, the rest to the fallback.
        let (parts, rest) = split_video(60_000, 3_000_000, &[1, 1, 1]);
        assert_eq!(parts.iter().sum::<i64>() + rest, 60_000);
        assert_eq!(parts, vec![0, 0, 0], "3 micro-points at 3 points/min pay 0.06 ms: nothing whole");
        // Any split conserves the ms.
        for taken in [[7, 999_993, 5], [0, 0, 0], [3_000_000, 0, 0], [123_457, 876_543, 2_000_000]] {
            let (parts, rest) = split_video(60_000, 3_000_000, &taken);
            assert_eq!(parts.iter().sum::<i64>() + rest, 60_000, "{taken:?}");
            assert!(parts.iter().all(|&p| p >= 0));
        }
    }
}
