//! The usage report of SPEC §9 (`GET /admin/v1/tenants/{t}/usage`), assembled from the
//! billing engine's monthly usage and package balances.

use rust_decimal::Decimal;
use serde_json::json;

use crate::billing::Billing;
use crate::catalog::Unit;
use crate::config::entitlements::Tenant;
use crate::payer::PAYERS;
use crate::pricing::{self, ser::money_string, ser::plain_string};
use crate::snapshot::Snapshot;
use crate::time::format_rfc3339;

/// The report of `t` for `month` (`YYYY-MM`).
/// Reads the shared store in cluster mode, so every replica answers the same (SPEC §11.3).
pub async fn usage(
    snap: &Snapshot,
    billing: &Billing,
    t: &Tenant,
    month: &str,
) -> Result<serde_json::Value, crate::store::StoreError> {
    let tz = snap.settings.timezone;
    let catalog = &snap.catalog;
    let mut total = Decimal::ZERO;
    let mut features = serde_json::Map::new();
    for u in billing.usage_shared(snap, t, month).await? {
        let (feature, units, payg) = (u.feature, u.units, u.payg);
        let units_json: serde_json::Map<_, _> =
            PAYERS.iter().zip(units.iter()).map(|(p, u)| (p.to_string(), json!(plain_string(*u)))).collect();
        let payg_units: Decimal = payg.values().copied().sum();
        let payg_json = match catalog.feature(&feature) {
            None => json!({"amount": null, "note": "feature no longer in the catalog"}),
            Some(f) if f.unit == Unit::VideoMinute => {
                // Priced cells sum into the amount; minutes without a price (outside the matrix,
                // or a feature without one) are listed with a null amount and a note, and do not
                // hide the priced ones.
                let mut amount = Decimal::ZERO;
                let mut unpriced = Decimal::ZERO;
                let mut priced = false;
                let mut lines = Vec::new();
                for (cell, minutes) in payg.iter().filter(|(_, m)| !m.is_zero()) {
                    let price = f.video_prices.iter().find(|c| &c.cell() == cell);
                    // From the milliseconds, multiplied before divided (exact, then rounded half-up
                    // once): minutes such as 350 ms = 0.00583… are cut at 28 digits, and a price
                    // times that cut lands below a half-cent the exact amount sits on.
                    let ms = u64::try_from(crate::units::minutes_to_ms(*minutes)).unwrap_or(0);
                    let line_amount = price.map(|c| pricing::round2(pricing::video_amount(c.price, ms)));
                    match line_amount {
                        Some(a) => {
                            amount += a;
                            priced = true;
                        }
                        None => unpriced += *minutes,
                    }
                    let mut line = json!({
                        "cell": cell, "minutes": plain_string(minutes.round_dp(6)),
                        "price": price.map(|c| c.price.to_string()),
                        "amount": line_amount.map(money_string),
                    });
                    if price.is_none() {
                        line["note"] = json!("no price configured");
                    }
                    lines.push(line);
                }
                total += amount;
                let mut v = json!({"amount": money_string(amount), "lines": lines});
                if !unpriced.is_zero() {
                    let minutes = plain_string(unpriced.round_dp(6));
                    v["note"] = if priced {
                        json!(format!(
                            "no price configured for {minutes} minutes; the amount covers the priced lines only"
                        ))
                    } else {
                        // No minute has a price: metered, amount null (SPEC §3.2), not a free "0.00".
                        v["amount"] = serde_json::Value::Null;
                        json!(format!("no price configured for {minutes} minutes"))
                    };
                }
                v
            }
            Some(f) if f.payg_tiers.is_empty() && payg_units > Decimal::ZERO => {
                json!({"amount": null, "note": "no price configured"})
            }
            Some(f) => {
                let lines = pricing::graduated(&f.payg_tiers, Decimal::ZERO, payg_units);
                let amount: Decimal = lines.iter().map(|l| l.amount).sum();
                total += amount;
                json!({"amount": money_string(amount), "tiers": lines})
            }
        };
        // Units nothing could pay for (SPEC §6): listed, never folded into a free payer.
        features.insert(
            feature.to_string(),
            json!({"units": units_json, "payg": payg_json, "unpaid": plain_string(u.unpaid.round_dp(6))}),
        );
    }
    let mut packages = Vec::with_capacity(t.packages.len());
    for p in &t.packages {
        let st = billing.package_shared(t, p).await?;
        packages.push({
            let remaining = (p.points - st.consumed()).max(Decimal::ZERO);
            let mut v = json!({
                "id": p.id, "points": plain_string(p.points), "remaining": plain_string(remaining),
                "expires_at": format_rfc3339(p.expires_at, tz), "low_balance_alerted": st.alerted(),
            });
            match p.target {
                crate::config::entitlements::PackageTarget::Feature(f) => v["feature"] = json!(catalog.features[f].id),
                crate::config::entitlements::PackageTarget::Scope(g) => {
                    v["scope"] = json!(catalog.general_packages[g].id)
                }
            }
            v
        });
    }
    Ok(json!({
            "tenant": t.name, "month": month, "currency": catalog.currency, "total": money_string(total),
            "features": features, "packages": packages,
    }))
}
