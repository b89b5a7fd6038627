//! Integer units (`STORE.md`): package points as `i64` micro-points, video usage in
//! milliseconds. A leaf module: config, payer and stores all convert through it.

use rust_decimal::Decimal;

/// Micro-points per point.
pub const MICRO: i64 = 1_000_000;
/// Milliseconds per minute (video usage).
pub const MS_PER_MINUTE: i64 = 60_000;

/// `d` in micro-points; `None` when it has more than 6 decimals (after dropping trailing zeros)
/// or does not fit an `i64`.
pub fn to_micro(d: Decimal) -> Option<i64> {
    let n = d.normalize();
    if n.scale() > 6 {
        return None;
    }
    let m = n.checked_mul(Decimal::from(MICRO))?;
    i64::try_from(m.trunc()).ok()
}

/// [`to_micro`] with the reason it failed, for config errors.
pub fn micro_or_reason(d: Decimal) -> Result<i64, String> {
    if d.normalize().scale() > 6 {
        return Err(format!("{d} has more than 6 decimals (points are kept in micro-points)"));
    }
    to_micro(d).ok_or_else(|| format!("{d} is too large"))
}

/// Micro-points as an exact decimal (no trailing zeros).
pub fn from_micro(m: i64) -> Decimal {
    Decimal::new(m, 6).normalize()
}

/// Milliseconds as exact decimal minutes (`ms / 60000`, no trailing zeros).
pub fn ms_to_minutes(ms: i64) -> Decimal {
    (Decimal::from(ms) / Decimal::from(MS_PER_MINUTE)).normalize()
}

/// Decimal minutes (as the ledger kept them before integer units) to milliseconds, rounded to
/// the nearest ms.
pub fn minutes_to_ms(minutes: Decimal) -> i64 {
    let ms = (minutes * Decimal::from(MS_PER_MINUTE)).round();
    i64::try_from(ms).unwrap_or(if ms.is_sign_negative() { i64::MIN } else { i64::MAX })
}

/// The highest QPS any limit may be set to (plans, upgrades, `default_qps`, image search): a
/// cluster-mode bucket's emission interval is whole microseconds (Redis's clock), which a higher
/// limit would round to 0, an unlimited bucket. Here, a leaf module, so that the catalog and the
/// entitlements check it alike.
pub const MAX_QPS: u32 = 1_000_000;

/// The error for a QPS limit of 0 or above [`MAX_QPS`], if it is one.
pub fn qps_out_of_range(q: u32) -> Option<String> {
    match q {
        0 => Some("must be at least 1".into()),
        q if q > MAX_QPS => Some(format!("{q} is above the most a limit may be, {MAX_QPS} QPS")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn micro_conversion_is_exact_up_to_six_decimals() {
        assert_eq!(to_micro(d("0.2")), Some(200_000));
        assert_eq!(to_micro(d("5000")), Some(5_000_000_000));
        assert_eq!(to_micro(d("0.000001")), Some(1));
        assert_eq!(to_micro(d("1.2300000000")), Some(1_230_000), "trailing zeros are not decimals");
        assert_eq!(to_micro(d("0.0000001")), None);
        assert_eq!(to_micro(d("79228162514264337593543950335")), None, "overflow");
        assert_eq!(from_micro(200_000).to_string(), "0.2");
        assert_eq!(from_micro(5_000_000_000).to_string(), "5000");
    }

    #[test]
    fn minutes_are_exact_decimals_of_ms() {
        assert_eq!(ms_to_minutes(30_000).to_string(), "0.5");
        assert_eq!(ms_to_minutes(140_000), Decimal::from(140_000) / Decimal::from(60_000));
        assert_eq!(minutes_to_ms(ms_to_minutes(140_000)), 140_000);
        assert_eq!(minutes_to_ms(d("1.5")), 90_000);
    }
}
