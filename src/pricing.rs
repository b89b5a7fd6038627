//! Pure price arithmetic over the catalog (SPEC §1, §3.2, §9): graduated tiers, the video
//! per-minute matrix, prepaid QPS, package sizes and Image Search package differences.
//!
//! Everything is exact decimal arithmetic (`rust_decimal`), never floats. Amounts are rounded
//! half-up to 2 decimals only per shown line ([`round2`]); intermediate values are exact.

use rust_decimal::{Decimal, RoundingStrategy};

use crate::catalog::{ImagePackage, ImageSearchCatalog, QpsPrice, Tier, VideoPrice};

/// Rounds half-up (midpoint away from zero) to 2 decimals: used only when an amount is shown or
/// totalled per line.
pub fn round2(d: Decimal) -> Decimal {
    d.round_dp_with_strategy(2, RoundingStrategy::MidpointAwayFromZero)
}

/// `a * b`, saturating instead of panicking on overflow (only reachable with absurd inputs).
fn mul(a: Decimal, b: Decimal) -> Decimal {
    a.checked_mul(b).unwrap_or(if a.is_sign_negative() != b.is_sign_negative() { Decimal::MIN } else { Decimal::MAX })
}

/// `a + b`, saturating instead of panicking on overflow.
fn add(a: Decimal, b: Decimal) -> Decimal {
    a.checked_add(b).unwrap_or(if b.is_sign_negative() { Decimal::MIN } else { Decimal::MAX })
}

/// Serde helpers: decimals are written as JSON strings (SPEC §1).
pub mod ser {
    use rust_decimal::Decimal;
    use serde::Serializer;

    /// The amount as shown: rounded half-up, always with 2 decimals ("1500.00"), never "-0.00".
    pub fn money_string(d: Decimal) -> String {
        let mut r = super::round2(d);
        if r.is_zero() {
            r = Decimal::ZERO;
        }
        r.rescale(2);
        r.to_string()
    }

    /// Normalized form: "10000", "0.15", "2.5".
    pub fn plain_string(d: Decimal) -> String {
        let n = d.normalize();
        if n.is_zero() {
            Decimal::ZERO.to_string()
        } else {
            n.to_string()
        }
    }

    pub fn money<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&money_string(*d))
    }

    pub fn plain<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&plain_string(*d))
    }

    /// A unit price as the catalog writes it ("0.10" stays "0.10", as in SPEC §9).
    pub fn price<S: Serializer>(d: &Decimal, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&d.to_string())
    }

    pub fn opt_plain<S: Serializer>(d: &Option<Decimal>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&plain_string(*d)),
            None => s.serialize_none(),
        }
    }
}

/// One tier's share of a graduated charge (SPEC §9 `tiers`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TierLine {
    /// Lower bound of the tier (exclusive), e.g. 0, 10000.
    #[serde(serialize_with = "ser::plain")]
    pub from: Decimal,
    /// Upper bound (inclusive), `None` for the open-ended last tier.
    #[serde(serialize_with = "ser::opt_plain")]
    pub to: Option<Decimal>,
    /// Units charged in this tier.
    #[serde(serialize_with = "ser::plain")]
    pub units: Decimal,
    /// Unit price of the tier.
    #[serde(serialize_with = "ser::price")]
    pub price: Decimal,
    /// `round2(units * price)`.
    #[serde(serialize_with = "ser::money")]
    pub amount: Decimal,
}

/// Graduated charge over `(lower, upper, price)` bands (lower exclusive, upper inclusive).
fn graduated_bands(
    bands: impl Iterator<Item = (Option<Decimal>, Decimal)>,
    start: Decimal,
    units: Decimal,
) -> Vec<TierLine> {
    let mut lines = Vec::new();
    if units <= Decimal::ZERO {
        return lines;
    }
    let start = start.max(Decimal::ZERO);
    let end = add(start, units);
    let mut lo = Decimal::ZERO;
    for (up_to, price) in bands {
        let hi = up_to;
        let from = start.max(lo);
        let to = match hi {
            Some(h) => end.min(h),
            None => end,
        };
        if to > from {
            let n = to - from;
            lines.push(TierLine { from: lo, to: hi, units: n, price, amount: round2(mul(n, price)) });
        }
        match hi {
            Some(h) if h < end => lo = lo.max(h),
            _ => break,
        }
    }
    lines
}

/// Graduated (tiered) charge for the units numbered `(start, start + units]` within one month.
/// Tiers ascend by `up_to` (inclusive upper bound; the last has `up_to = None`). Returns one line
/// per tier touched (units > 0).
pub fn graduated(tiers: &[Tier], start: Decimal, units: Decimal) -> Vec<TierLine> {
    graduated_bands(tiers.iter().map(|t| (t.up_to.map(Decimal::from), t.price)), start, units)
}

/// Unit price of the next unit when `before` units were already used this month (the tier
/// containing unit `before + 1`); `None` when `tiers` is empty.
pub fn marginal_price(tiers: &[Tier], before: Decimal) -> Option<Decimal> {
    tiers.iter().find(|t| t.up_to.is_none_or(|u| before < Decimal::from(u))).or(tiers.last()).map(|t| t.price)
}

/// The price cell for a video of `fps` frames/s whose shorter side is `lines`: among cells with
/// `max_fps >= fps` and `max_lines >= lines`, the smallest fitting one (smallest `max_lines`, then
/// smallest `max_fps`). `None` when nothing fits (outside the matrix: no price).
pub fn video_cell(prices: &[VideoPrice], fps: u32, lines: u32) -> Option<&VideoPrice> {
    prices.iter().filter(|c| c.max_fps >= fps && c.max_lines >= lines).min_by_key(|c| (c.max_lines, c.max_fps))
}

/// Exact (unrounded) charge for `ms` milliseconds of video at `per_minute`: `per_minute * ms / 60000`.
pub fn video_amount(per_minute: Decimal, ms: u64) -> Decimal {
    let ms = Decimal::from(ms);
    let per_ms_minute = Decimal::from(60_000u32);
    match per_minute.checked_mul(ms) {
        Some(p) => p / per_ms_minute,
        // Too large to multiply first: divide first (loses only digits beyond 28 significant).
        None => mul(per_minute / per_ms_minute, ms),
    }
}

/// Whether a QPS plan is bought for a day or for a month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Period {
    Day,
    Month,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }
}

/// Graduated prepaid-QPS price for buying `qps` QPS for one day or one month (seed: 40 QPS of
/// face comparison = 10 x 12.8 + 30 x 10.8 = 452.00 a day; 218 x 10 + 188 x 30 = 7,820.00 a
/// month). `qps_prices` tiers ascend by `up_to` (inclusive).
pub fn qps_cost(prices: &[QpsPrice], qps: u32, period: Period) -> Vec<TierLine> {
    let bands = prices.iter().map(|p| {
        let price = match period {
            Period::Day => p.day,
            Period::Month => p.month,
        };
        (p.up_to.map(Decimal::from), price)
    });
    graduated_bands(bands, Decimal::ZERO, Decimal::from(qps))
}

/// Calls a package of `points` buys at `points_per_unit` points per call:
/// `floor(points / points_per_unit)` (seed: 5000 points at 0.2 = 25000 calls). Zero when the
/// factor is not positive.
pub fn package_calls(points: Decimal, points_per_unit: Decimal) -> Decimal {
    if points_per_unit <= Decimal::ZERO || points <= Decimal::ZERO {
        return Decimal::ZERO;
    }
    let Some(q) = points.checked_div(points_per_unit) else { return Decimal::ZERO };
    let mut q = q.floor();
    // The quotient is rounded at 28 digits; make the floor exact: q * f <= points < (q + 1) * f.
    if q > Decimal::ZERO && mul(q, points_per_unit) > points {
        q -= Decimal::ONE;
    } else if mul(add(q, Decimal::ONE), points_per_unit) <= points {
        q += Decimal::ONE;
    }
    q
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PricingError {
    #[error("no image search package of {capacity} images at {qps} QPS is sold (sizes: {sizes})")]
    UnknownImagePackage { capacity: u64, qps: u32, sizes: String },
}

/// The Image Search package of `(capacity, qps)`.
pub fn image_package(catalog: &ImageSearchCatalog, size: (u64, u32)) -> Result<&ImagePackage, PricingError> {
    catalog.packages.iter().find(|p| p.capacity == size.0 && p.qps == size.1).ok_or_else(|| {
        let sizes = if catalog.packages.is_empty() {
            "none configured".to_string()
        } else {
            catalog.packages.iter().map(|p| format!("{}/{}", p.capacity, p.qps)).collect::<Vec<_>>().join(", ")
        };
        PricingError::UnknownImagePackage { capacity: size.0, qps: size.1, sizes }
    })
}

/// Seed 004 upgrade/downgrade: the price difference `new.month - old.month` (negative = a refund).
pub fn image_search_difference(
    catalog: &ImageSearchCatalog,
    from: (u64, u32),
    to: (u64, u32),
) -> Result<Decimal, PricingError> {
    let old = image_package(catalog, from)?;
    let new = image_package(catalog, to)?;
    Ok(new.month - old.month)
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;
    use crate::catalog::{self, Catalog, RawCatalog};
    use crate::config::{parse_toml, Errs};

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).expect("test decimal")
    }

    fn tier(up_to: Option<u64>, price: &str) -> Tier {
        Tier { up_to, price: d(price) }
    }

    /// License plate recognition, seed 000 example 1.
    fn plate_tiers() -> Vec<Tier> {
        vec![tier(Some(10_000), "0.15"), tier(Some(100_000), "0.10"), tier(Some(1_000_000), "0.06"), tier(None, "0.02")]
    }

    fn qps(up_to: Option<u32>, day: &str, month: &str) -> QpsPrice {
        QpsPrice { up_to, day: d(day), month: d(month) }
    }

    /// Face comparison 1:1, seed 000 prepaid QPS example.
    fn face_qps() -> Vec<QpsPrice> {
        vec![
            qps(Some(10), "12.8", "218"),
            qps(Some(50), "10.8", "188"),
            qps(Some(100), "9.8", "136"),
            qps(None, "9.0", "126"),
        ]
    }

    /// Comprehensive video enhancement, seed 000 example 2 (the 3x3 matrix).
    fn video_matrix() -> Vec<VideoPrice> {
        let mut v = Vec::new();
        for (lines, prices) in
            [(720, ["4.00", "8.00", "16.00"]), (1440, ["8.00", "16.00", "32.00"]), (2160, ["24.00", "48.00", "96.00"])]
        {
            for (fps, price) in [30, 60, 120].into_iter().zip(prices) {
                v.push(VideoPrice { max_fps: fps, max_lines: lines, price: d(price) });
            }
        }
        v
    }

    /// Seed 004 price list.
    fn image_catalog() -> ImageSearchCatalog {
        let rows: [(u64, u32, &str); 15] = [
            (100_000, 1, "300.00"),
            (2_500_000, 5, "800.00"),
            (2_500_000, 10, "1500.00"),
            (5_000_000, 5, "1600.00"),
            (5_000_000, 10, "2900.00"),
            (10_000_000, 5, "2900.00"),
            (10_000_000, 10, "5500.00"),
            (20_000_000, 5, "5500.00"),
            (20_000_000, 10, "10300.00"),
            (30_000_000, 5, "7900.00"),
            (30_000_000, 10, "14700.00"),
            (40_000_000, 5, "10000.00"),
            (40_000_000, 10, "18600.00"),
            (50_000_000, 5, "11800.00"),
            (50_000_000, 10, "22100.00"),
        ];
        ImageSearchCatalog {
            currency: "USD".into(),
            delete_qps: 20,
            retention_days: 7,
            packages: rows.iter().map(|&(capacity, qps, m)| ImagePackage { capacity, qps, month: d(m) }).collect(),
        }
    }

    fn total(lines: &[TierLine]) -> Decimal {
        lines.iter().map(|l| l.amount).sum()
    }

    fn line(from: &str, to: Option<&str>, units: &str, price: &str, amount: &str) -> TierLine {
        TierLine { from: d(from), to: to.map(d), units: d(units), price: d(price), amount: d(amount) }
    }

    #[test]
    fn round2_is_half_up_away_from_zero() {
        assert_eq!(round2(d("37.333333")), d("37.33"));
        assert_eq!(round2(d("0.125")), d("0.13"));
        assert_eq!(round2(d("0.135")), d("0.14"));
        assert_eq!(round2(d("-0.125")), d("-0.13"));
        assert_eq!(round2(d("2.004")), d("2.00"));
    }

    #[test]
    fn graduated_15000_license_plate_calls_cost_2000() {
        let lines = graduated(&plate_tiers(), Decimal::ZERO, d("15000"));
        assert_eq!(
            lines,
            vec![
                line("0", Some("10000"), "10000", "0.15", "1500.00"),
                line("10000", Some("100000"), "5000", "0.10", "500.00"),
            ]
        );
        assert_eq!(total(&lines), d("2000.00"));
    }

    #[test]
    fn graduated_exactly_at_the_tier_boundary() {
        let lines = graduated(&plate_tiers(), Decimal::ZERO, d("10000"));
        assert_eq!(lines, vec![line("0", Some("10000"), "10000", "0.15", "1500.00")]);
        let lines = graduated(&plate_tiers(), Decimal::ZERO, d("10001"));
        assert_eq!(
            lines,
            vec![
                line("0", Some("10000"), "10000", "0.15", "1500.00"),
                line("10000", Some("100000"), "1", "0.10", "0.10")
            ]
        );
        assert_eq!(total(&lines), d("1500.10"));
    }

    #[test]
    fn graduated_with_a_nonzero_start() {
        let lines = graduated(&plate_tiers(), d("9999"), d("2"));
        assert_eq!(
            lines,
            vec![line("0", Some("10000"), "1", "0.15", "0.15"), line("10000", Some("100000"), "1", "0.10", "0.10")]
        );
        // Later in the month: the open-ended last tier.
        let lines = graduated(&plate_tiers(), d("999999"), d("3"));
        assert_eq!(
            lines,
            vec![line("100000", Some("1000000"), "1", "0.06", "0.06"), line("1000000", None, "2", "0.02", "0.04")]
        );
        // Starting beyond the first tiers touches only the later ones.
        let lines = graduated(&plate_tiers(), d("20000"), d("100"));
        assert_eq!(lines, vec![line("10000", Some("100000"), "100", "0.10", "10.00")]);
    }

    #[test]
    fn graduated_edge_cases() {
        assert!(graduated(&plate_tiers(), Decimal::ZERO, Decimal::ZERO).is_empty());
        assert!(graduated(&plate_tiers(), d("5"), d("-3")).is_empty());
        assert!(graduated(&[], Decimal::ZERO, d("10")).is_empty());
        // Every unit of a huge month is charged somewhere: the units add up.
        let lines = graduated(&plate_tiers(), Decimal::ZERO, d("2000000"));
        assert_eq!(lines.iter().map(|l| l.units).sum::<Decimal>(), d("2000000"));
        assert_eq!(total(&lines), d("1500") + d("9000") + d("54000") + d("20000"));
        // Fractional units (video minutes) are graduated exactly, rounded per line.
        let lines = graduated(&[tier(Some(1), "16"), tier(None, "8")], Decimal::ZERO, d("2.5"));
        assert_eq!(lines, vec![line("0", Some("1"), "1", "16", "16.00"), line("1", None, "1.5", "8", "12.00")]);
    }

    #[test]
    fn marginal_price_at_the_boundaries() {
        let t = plate_tiers();
        assert_eq!(marginal_price(&t, Decimal::ZERO), Some(d("0.15")));
        assert_eq!(marginal_price(&t, d("9999")), Some(d("0.15")));
        assert_eq!(marginal_price(&t, d("10000")), Some(d("0.10")));
        assert_eq!(marginal_price(&t, d("999999")), Some(d("0.06")));
        assert_eq!(marginal_price(&t, d("1000000")), Some(d("0.02")));
        assert_eq!(marginal_price(&t, d("5000000000")), Some(d("0.02")));
        assert_eq!(marginal_price(&[], Decimal::ZERO), None);
    }

    #[test]
    fn video_2min20s_at_60fps_1080_lines_costs_37_33() {
        let m = video_matrix();
        let cell = video_cell(&m, 60, 1080).expect("fits");
        assert_eq!((cell.max_fps, cell.max_lines, cell.price), (60, 1440, d("16.00")));
        let exact = video_amount(cell.price, 140_000);
        assert_eq!(round2(exact), d("37.33"));
        // Exact until shown: 16 x 140000 / 60000 = 37.333...
        assert!(exact > d("37.333333") && exact < d("37.333334"));
        // Seed: (2 x 16) + (20/60 x 16).
        assert_eq!(round2(video_amount(cell.price, 120_000) + video_amount(cell.price, 20_000)), d("37.33"));
        assert_eq!(video_amount(d("16"), 60_000), d("16"));
        assert_eq!(video_amount(d("16"), 0), Decimal::ZERO);
    }

    #[test]
    fn video_matrix_cells_and_outside() {
        let m = video_matrix();
        let price = |fps, lines| video_cell(&m, fps, lines).map(|c| c.price);
        assert_eq!(price(30, 720), Some(d("4.00")));
        assert_eq!(price(24, 480), Some(d("4.00")));
        assert_eq!(price(31, 720), Some(d("8.00")));
        assert_eq!(price(30, 721), Some(d("8.00")));
        assert_eq!(price(60, 720), Some(d("8.00")));
        assert_eq!(price(120, 720), Some(d("16.00")));
        assert_eq!(price(120, 1440), Some(d("32.00")));
        assert_eq!(price(30, 2160), Some(d("24.00")));
        assert_eq!(price(60, 1441), Some(d("48.00")));
        assert_eq!(price(120, 2160), Some(d("96.00")));
        assert_eq!(price(240, 1080), None);
        assert_eq!(price(121, 720), None);
        assert_eq!(price(60, 4320), None);
        assert_eq!(price(30, 2161), None);
        assert!(video_cell(&[], 30, 720).is_none());
        // Order in the list does not matter: the smallest fitting cell wins.
        let mut rev = video_matrix();
        rev.reverse();
        assert_eq!(video_cell(&rev, 60, 1080).map(|c| (c.max_fps, c.max_lines)), Some((60, 1440)));
    }

    #[test]
    fn prepaid_qps_40_face_comparison_day_and_month() {
        let day = qps_cost(&face_qps(), 40, Period::Day);
        assert_eq!(
            day,
            vec![line("0", Some("10"), "10", "12.8", "128.00"), line("10", Some("50"), "30", "10.8", "324.00")]
        );
        assert_eq!(total(&day), d("452.00"));
        let month = qps_cost(&face_qps(), 40, Period::Month);
        assert_eq!(
            month,
            vec![line("0", Some("10"), "10", "218", "2180.00"), line("10", Some("50"), "30", "188", "5640.00")]
        );
        assert_eq!(total(&month), d("7820.00"));
        assert_eq!(total(&qps_cost(&face_qps(), 10, Period::Day)), d("128.00"));
        assert_eq!(total(&qps_cost(&face_qps(), 101, Period::Day)), d("128") + d("432") + d("490") + d("9.0"));
        assert!(qps_cost(&face_qps(), 0, Period::Day).is_empty());
        assert!(qps_cost(&[], 5, Period::Month).is_empty());
    }

    #[test]
    fn package_5000_points_at_0_2_buys_25000_calls() {
        assert_eq!(package_calls(d("5000"), d("0.2")), d("25000"));
        for (points, calls) in [
            ("10000", "50000"),
            ("50000", "250000"),
            ("500000", "2500000"),
            ("5000000", "25000000"),
            ("20000000", "100000000"),
        ] {
            assert_eq!(package_calls(d(points), d("0.2")), d(calls));
        }
        assert_eq!(package_calls(d("5000"), Decimal::ONE), d("5000"));
        assert_eq!(package_calls(d("10"), d("3")), d("3"));
        assert_eq!(package_calls(d("1"), d("0.3")), d("3"));
        assert_eq!(package_calls(d("0.1"), d("0.2")), Decimal::ZERO);
        assert_eq!(package_calls(d("5000"), Decimal::ZERO), Decimal::ZERO);
    }

    #[test]
    fn image_search_upgrade_and_downgrade_differences() {
        let c = image_catalog();
        assert_eq!(image_search_difference(&c, (2_500_000, 5), (5_000_000, 10)), Ok(d("2100.00")));
        assert_eq!(image_search_difference(&c, (5_000_000, 10), (2_500_000, 5)), Ok(d("-2100.00")));
        assert_eq!(image_search_difference(&c, (2_500_000, 5), (2_500_000, 10)), Ok(d("700.00")));
        assert_eq!(image_search_difference(&c, (100_000, 1), (50_000_000, 10)), Ok(d("21800.00")));
        assert_eq!(image_search_difference(&c, (10_000_000, 5), (5_000_000, 10)), Ok(Decimal::ZERO));
    }

    #[test]
    fn image_search_unknown_size_lists_the_sizes() {
        let c = image_catalog();
        let err = image_search_difference(&c, (3_000_000, 5), (5_000_000, 10)).expect_err("unknown");
        let PricingError::UnknownImagePackage { capacity, qps, ref sizes } = err;
        assert_eq!((capacity, qps), (3_000_000, 5));
        assert!(sizes.starts_with("100000/1, 2500000/5, 2500000/10"), "{sizes}");
        let msg = err.to_string();
        assert!(msg.contains("no image search package of 3000000 images at 5 QPS"), "{msg}");
        assert!(msg.contains("50000000/10"), "{msg}");
        assert!(image_search_difference(&c, (2_500_000, 5), (2_500_000, 7)).is_err());
    }

    #[test]
    fn tier_lines_serialize_decimals_as_strings() {
        let lines = graduated(&plate_tiers(), Decimal::ZERO, d("15000"));
        let json = serde_json::to_value(&lines).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!([
                { "from": "0", "to": "10000", "units": "10000", "price": "0.15", "amount": "1500.00" },
                { "from": "10000", "to": "100000", "units": "5000", "price": "0.10", "amount": "500.00" }
            ])
        );
        let last = graduated(&plate_tiers(), d("1000000"), d("1"));
        let json = serde_json::to_value(&last).expect("serialize");
        assert_eq!(
            json,
            serde_json::json!([{ "from": "1000000", "to": null, "units": "1", "price": "0.02", "amount": "0.02" }])
        );
        assert_eq!(ser::money_string(d("-0.001")), "0.00");
        assert_eq!(ser::money_string(d("-2100")), "-2100.00");
        assert_eq!(ser::plain_string(d("2.500")), "2.5");
    }

    fn shipped() -> Catalog {
        let mut errors = Vec::new();
        let raw: Option<RawCatalog> = parse_toml("catalog.toml", include_str!("../config/catalog.toml"), &mut errors);
        let raw = raw.unwrap_or_else(|| panic!("shipped catalog does not parse: {errors:?}"));
        let c = catalog::compile(raw, &mut Errs { file: "catalog.toml", out: &mut errors });
        assert!(errors.is_empty(), "shipped catalog errors: {errors:?}");
        c
    }

    #[test]
    fn shipped_catalog_reproduces_every_seed_figure() {
        let c = shipped();
        assert_eq!(c.currency, "CNY");

        let plate = c.feature("license-plate-recognition").expect("license plate");
        let lines = graduated(&plate.payg_tiers, Decimal::ZERO, d("15000"));
        assert_eq!(lines.iter().map(|l| l.amount).collect::<Vec<_>>(), vec![d("1500.00"), d("500.00")]);
        assert_eq!(total(&lines), d("2000.00"));
        assert_eq!(total(&graduated(&plate.payg_tiers, Decimal::ZERO, d("10000"))), d("1500.00"));
        assert_eq!(total(&graduated(&plate.payg_tiers, Decimal::ZERO, d("10001"))), d("1500.10"));
        assert_eq!(marginal_price(&plate.payg_tiers, d("9999")), Some(d("0.15")));
        assert_eq!(marginal_price(&plate.payg_tiers, d("10000")), Some(d("0.10")));
        assert_eq!(marginal_price(&plate.payg_tiers, d("1000000")), Some(d("0.02")));

        let face = c.feature("face-comparison-1-1").expect("face comparison");
        assert_eq!(total(&qps_cost(&face.qps_prices, 40, Period::Day)), d("452.00"));
        assert_eq!(total(&qps_cost(&face.qps_prices, 40, Period::Month)), d("7820.00"));

        let od = c.feature("object-detection").expect("object detection");
        assert_eq!(od.points_per_unit, d("0.2"));
        assert_eq!(package_calls(Decimal::from(5000u32), od.points_per_unit), d("25000"));
        let p = od.package_prices.iter().find(|p| p.points == 5000).expect("5000-point package");
        assert_eq!(p.price, d("50"));

        let video = c.feature("comprehensive-video-enhancement").expect("video enhancement");
        let cell = video_cell(&video.video_prices, 60, 1080).expect("in the matrix");
        assert_eq!((cell.max_fps, cell.max_lines, cell.price), (60, 1440, d("16.00")));
        assert_eq!(round2(video_amount(cell.price, 140_000)), d("37.33"));
        assert_eq!(video_cell(&video.video_prices, 30, 720).map(|c| c.price), Some(d("4.00")));
        assert_eq!(video_cell(&video.video_prices, 120, 2160).map(|c| c.price), Some(d("96.00")));
        assert!(video_cell(&video.video_prices, 240, 1080).is_none());
        assert!(video_cell(&video.video_prices, 60, 4320).is_none());

        let is = &c.image_search;
        assert_eq!(is.currency, "USD");
        assert_eq!(is.delete_qps, 20);
        assert_eq!(is.retention_days, 7);
        assert_eq!(image_search_difference(is, (2_500_000, 5), (5_000_000, 10)), Ok(d("2100.00")));
        assert_eq!(image_search_difference(is, (5_000_000, 10), (2_500_000, 5)), Ok(d("-2100.00")));
        assert_eq!(image_package(is, (100_000, 1)).map(|p| p.month), Ok(d("300.00")));
        assert_eq!(image_package(is, (50_000_000, 10)).map(|p| p.month), Ok(d("22100.00")));
        assert!(matches!(
            image_search_difference(is, (2_500_000, 5), (60_000_000, 10)),
            Err(PricingError::UnknownImagePackage { capacity: 60_000_000, qps: 10, .. })
        ));
    }
}
