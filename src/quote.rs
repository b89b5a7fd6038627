//! `turnstile quote` (SPEC §2): prices a usage or a purchase from the catalog that the main
//! configuration file names.
//!
//! ```text
//! turnstile quote payg    --feature F (--calls N | --video-seconds S --fps N --lines N)
//! turnstile quote qps     --feature F --qps N --period day|month
//! turnstile quote package --feature F --points N
//! turnstile quote image-search --from CAPACITY/QPS --to CAPACITY/QPS
//! ```
//! `--json` prints exactly one JSON object on stdout; errors go to stderr with exit status 1.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::Decimal;
use serde_json::{json, Value};

use crate::catalog::{self, Catalog, Feature, Method, RawCatalog, Unit, IMAGE_SEARCH};
use crate::config::{self, Errs};
use crate::diag::exact_decimal;
use crate::pricing::{self, ser, Period, TierLine};

/// Options every quote takes.
#[derive(clap::Args, Debug, Clone)]
pub struct QuoteOpts {
    /// Main configuration file; the catalog it names is read.
    #[arg(long, default_value = "config/turnstile.toml")]
    pub config: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum QuoteCmd {
    /// Pay-as-you-go price of calls in one month (graduated tiers), or of processed video.
    #[command(group(clap::ArgGroup::new("usage").required(true).args(["calls", "video_seconds"])))]
    Payg {
        /// Feature id, e.g. license-plate-recognition.
        #[arg(long)]
        feature: String,
        /// Calls in one calendar month (counted from the month's first call).
        #[arg(long, conflicts_with_all = ["video_seconds", "fps", "lines"])]
        calls: Option<u64>,
        /// Seconds of processed video (decimals allowed, to the millisecond).
        #[arg(long, requires_all = ["fps", "lines"])]
        video_seconds: Option<String>,
        /// Frame rate of the video, frames per second.
        #[arg(long, requires = "video_seconds")]
        fps: Option<u32>,
        /// Shorter side of the frame in lines (1080 for 1920x1080).
        #[arg(long, requires = "video_seconds")]
        lines: Option<u32>,
        #[command(flatten)]
        opts: QuoteOpts,
    },
    /// Prepaid QPS for one day or one month (graduated per QPS).
    Qps {
        /// Feature id, e.g. face-comparison-1-1.
        #[arg(long)]
        feature: String,
        /// QPS to buy.
        #[arg(long)]
        qps: u32,
        #[arg(long, value_enum)]
        period: Period,
        #[command(flatten)]
        opts: QuoteOpts,
    },
    /// The calls a resource package buys, and its price.
    Package {
        /// Feature id, e.g. object-detection.
        #[arg(long)]
        feature: String,
        /// Package size in points (one of the sizes the catalog sells).
        #[arg(long)]
        points: u64,
        #[command(flatten)]
        opts: QuoteOpts,
    },
    /// Price difference of an Image Search upgrade or downgrade (negative: a refund).
    ImageSearch {
        /// Current package, CAPACITY/QPS (e.g. 2500000/5 or 2.5M/5).
        #[arg(long)]
        from: String,
        /// New package, CAPACITY/QPS (e.g. 5000000/10 or 5M/10).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        opts: QuoteOpts,
    },
}

/// What a quote prints: a JSON object, or text lines ending with the total line.
struct Output {
    json: Value,
    text: String,
}

pub fn run(cmd: QuoteCmd) -> ExitCode {
    let opts = match &cmd {
        QuoteCmd::Payg { opts, .. }
        | QuoteCmd::Qps { opts, .. }
        | QuoteCmd::Package { opts, .. }
        | QuoteCmd::ImageSearch { opts, .. } => opts.clone(),
    };
    let catalog = match load_catalog(&opts.config) {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!(
                "turnstile quote: the catalog is invalid ({} error(s)); run `turnstile check --config {}`",
                errors.len(),
                opts.config.display()
            );
            return ExitCode::FAILURE;
        }
    };
    match quote(&catalog, &cmd) {
        Ok(out) => {
            if opts.json {
                println!("{}", out.json);
            } else {
                print!("{}", out.text);
            }
            ExitCode::SUCCESS
        }
        Err(msg) => {
            eprintln!("turnstile quote: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// Reads the main file and the catalog it names, and compiles the catalog alone.
fn load_catalog(main: &std::path::Path) -> Result<Catalog, Vec<config::ConfigError>> {
    let (name, text) = config::read_catalog(main).map_err(|e| e.0)?;
    let mut errors = Vec::new();
    let raw: Option<RawCatalog> = config::parse_toml(&name, &text, &mut errors);
    let Some(raw) = raw else { return Err(errors) };
    let catalog = catalog::compile(raw, &mut Errs { file: &name, out: &mut errors });
    if errors.is_empty() {
        Ok(catalog)
    } else {
        Err(errors)
    }
}

fn quote(catalog: &Catalog, cmd: &QuoteCmd) -> Result<Output, String> {
    match cmd {
        QuoteCmd::Payg { feature, calls, video_seconds, fps, lines, .. } => {
            let f = feature_of(catalog, feature)?;
            require(f, Method::Payg, "pay-as-you-go")?;
            match (calls, video_seconds, fps, lines) {
                (Some(calls), None, _, _) => payg_calls(catalog, f, *calls),
                (None, Some(secs), Some(fps), Some(lines)) => {
                    let ms = parse_seconds(secs).map_err(|e| format!("--video-seconds: {e}"))?;
                    payg_video(catalog, f, ms, *fps, *lines)
                }
                _ => Err("give either --calls N, or --video-seconds S --fps N --lines N".into()),
            }
        }
        QuoteCmd::Qps { feature, qps, period, .. } => {
            let f = feature_of(catalog, feature)?;
            quote_qps(catalog, f, *qps, *period)
        }
        QuoteCmd::Package { feature, points, .. } => {
            let f = feature_of(catalog, feature)?;
            quote_package(catalog, f, *points)
        }
        QuoteCmd::ImageSearch { from, to, .. } => {
            let from = parse_size(from).map_err(|e| format!("--from: {e}"))?;
            let to = parse_size(to).map_err(|e| format!("--to: {e}"))?;
            quote_image_search(catalog, from, to)
        }
    }
}

fn feature_of<'c>(catalog: &'c Catalog, id: &str) -> Result<&'c Feature, String> {
    if id == IMAGE_SEARCH {
        return Err(format!(
            "{IMAGE_SEARCH} is sold as subscription packages: use `turnstile quote image-search --from CAPACITY/QPS --to CAPACITY/QPS`"
        ));
    }
    catalog.feature(id).ok_or_else(|| {
        let mut near: Vec<&str> = catalog
            .features
            .iter()
            .map(|f| f.id.as_str())
            .filter(|f| *f != IMAGE_SEARCH && (f.contains(id) || id.contains(f)))
            .collect();
        near.sort_unstable();
        near.truncate(5);
        let hint = if near.is_empty() {
            "see the [features.*] sections of the catalog for the ids".to_string()
        } else {
            format!("did you mean {}?", near.join(", "))
        };
        format!("unknown feature {id:?}: {hint}")
    })
}

fn billing_list(f: &Feature) -> String {
    let names = [
        (Method::Payg, "payg"),
        (Method::SinglePackage, "single_package"),
        (Method::GeneralPackage, "general_package"),
        (Method::PrepaidQps, "prepaid_qps"),
    ];
    let v: Vec<&str> = names.iter().filter(|(m, _)| f.billing.has(*m)).map(|(_, n)| *n).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn require(f: &Feature, m: Method, what: &str) -> Result<(), String> {
    if f.billing.has(m) {
        Ok(())
    } else {
        Err(format!("{} is not sold {what} (its billing: {})", f.id, billing_list(f)))
    }
}

/// Sum of the per-line amounts (each already rounded), as the total is shown.
fn total_of(lines: &[TierLine]) -> Decimal {
    pricing::round2(lines.iter().map(|l| l.amount).sum())
}

fn range_text(l: &TierLine, what: &str) -> String {
    let from = ser::plain_string(l.from);
    match l.to {
        Some(to) => format!("{from} < {what} <= {}", ser::plain_string(to)),
        None => format!("{what} > {from}"),
    }
}

fn tier_text(out: &mut String, lines: &[TierLine], what: &str, unit_price: &str) {
    let rows: Vec<[String; 4]> = lines
        .iter()
        .map(|l| [range_text(l, what), ser::plain_string(l.units), l.price.to_string(), ser::money_string(l.amount)])
        .collect();
    let w = |i: usize| rows.iter().map(|r| r[i].len()).max().unwrap_or(0);
    let (w0, w1, w2, w3) = (w(0), w(1), w(2), w(3));
    for [range, units, price, amount] in &rows {
        let _ = writeln!(out, "  {range:<w0$}  {units:>w1$} x {price:>w2$} {unit_price} = {amount:>w3$}");
    }
}

fn priced(currency: &str, total: Decimal, lines: Value, text: String) -> Output {
    let total = ser::money_string(total);
    let mut text = text;
    let _ = writeln!(text, "total: {total} {currency}");
    Output { json: json!({ "total": total, "currency": currency, "lines": lines }), text }
}

fn payg_calls(catalog: &Catalog, f: &Feature, calls: u64) -> Result<Output, String> {
    if f.unit == Unit::VideoMinute {
        return Err(format!(
            "{} is billed per minute of processed video: use --video-seconds S --fps N --lines N instead of --calls",
            f.id
        ));
    }
    if f.payg_tiers.is_empty() {
        return Err(format!("no price configured for {} (it is metered, but the catalog gives no payg_tiers)", f.id));
    }
    let lines = pricing::graduated(&f.payg_tiers, Decimal::ZERO, Decimal::from(calls));
    let total = total_of(&lines);
    let cur = &catalog.currency;
    let mut text = format!("{} ({}): {calls} calls in one month, pay-as-you-go\n", f.id, f.name);
    tier_text(&mut text, &lines, "calls", &format!("{cur}/call"));
    let json_lines = serde_json::to_value(&lines).map_err(|e| e.to_string())?;
    Ok(priced(cur, total, json_lines, text))
}

fn payg_video(catalog: &Catalog, f: &Feature, ms: u64, fps: u32, lines: u32) -> Result<Output, String> {
    if f.unit == Unit::Call {
        return Err(format!("{} is billed per call: use --calls N instead of --video-seconds/--fps/--lines", f.id));
    }
    if f.video_prices.is_empty() {
        return Err(format!("no price configured for {} (it is metered, but the catalog gives no video_prices)", f.id));
    }
    let Some(cell) = pricing::video_cell(&f.video_prices, fps, lines) else {
        let max_fps = f.video_prices.iter().map(|c| c.max_fps).max().unwrap_or(0);
        let max_lines = f.video_prices.iter().map(|c| c.max_lines).max().unwrap_or(0);
        return Err(format!(
            "no price for {fps} fps at {lines} lines: {} is priced up to {max_fps} fps and {max_lines} lines (the shorter side of the frame)",
            f.id
        ));
    };
    let exact = pricing::video_amount(cell.price, ms);
    let amount = pricing::round2(exact);
    let minutes = Decimal::from(ms) / Decimal::from(60_000u32);
    let seconds = Decimal::from_i128_with_scale(i128::from(ms), 3);
    let cur = &catalog.currency;
    let line = json!({
        "minutes": ser::plain_string(minutes),
        "seconds": ser::plain_string(seconds),
        "price": cell.price.to_string(),
        "fps": fps,
        "lines": lines,
        "cell": { "max_fps": cell.max_fps, "max_lines": cell.max_lines },
        "amount": ser::money_string(amount),
    });
    let mut text =
        format!("{} ({}): {} of video at {fps} fps, {lines} lines, pay-as-you-go\n", f.id, f.name, duration_text(ms));
    let _ = writeln!(
        text,
        "  cell <= {} fps, <= {} lines: {} min x {} {cur}/min = {}",
        cell.max_fps,
        cell.max_lines,
        ser::plain_string(minutes.round_dp(6)),
        cell.price,
        ser::money_string(amount)
    );
    Ok(priced(cur, amount, Value::Array(vec![line]), text))
}

fn duration_text(ms: u64) -> String {
    let min = ms / 60_000;
    let rest = Decimal::new(i64::try_from(ms % 60_000).unwrap_or(0), 3);
    match (min, rest.is_zero()) {
        (0, _) => format!("{} s", ser::plain_string(rest)),
        (m, true) => format!("{m} min"),
        (m, false) => format!("{m} min {} s", ser::plain_string(rest)),
    }
}

fn quote_qps(catalog: &Catalog, f: &Feature, qps: u32, period: Period) -> Result<Output, String> {
    require(f, Method::PrepaidQps, "as prepaid QPS")?;
    if f.qps_prices.is_empty() {
        return Err(format!("no QPS price configured for {} (the catalog gives no qps_prices)", f.id));
    }
    if qps == 0 {
        return Err("--qps must be at least 1".into());
    }
    let lines = pricing::qps_cost(&f.qps_prices, qps, period);
    let total = total_of(&lines);
    let cur = &catalog.currency;
    let p = period.as_str();
    let mut text = format!("{} ({}): {qps} QPS for one {p}, prepaid\n", f.id, f.name);
    tier_text(&mut text, &lines, "QPS", &format!("{cur}/QPS/{p}"));
    if let Some(cap) = catalog.family_cap(f).filter(|&c| qps > c) {
        let note = format!(
            "note: {qps} QPS exceeds the {} cap of {cap}: the console sells at most {cap} (ask support for more), and turnstile rejects plans above the cap",
            catalog.family_id(f)
        );
        eprintln!("{note}");
    }
    let json_lines = serde_json::to_value(&lines).map_err(|e| e.to_string())?;
    let mut out = priced(cur, total, json_lines, text);
    if let Value::Object(m) = &mut out.json {
        m.insert("qps".into(), json!(qps));
        m.insert("period".into(), json!(p));
    }
    Ok(out)
}

fn quote_package(catalog: &Catalog, f: &Feature, points: u64) -> Result<Output, String> {
    if !f.billing.has(Method::SinglePackage) && !f.billing.has(Method::GeneralPackage) {
        return Err(format!("{} is not sold as a resource package (its billing: {})", f.id, billing_list(f)));
    }
    if f.package_prices.is_empty() {
        let hint = if f.billing.has(Method::GeneralPackage) {
            " (it can be paid from a general-purpose package, priced outside this catalog)"
        } else {
            ""
        };
        return Err(format!("no package price configured for {}{hint}", f.id));
    }
    let Some(pp) = f.package_prices.iter().find(|p| p.points == points) else {
        let mut sizes: Vec<u64> = f.package_prices.iter().map(|p| p.points).collect();
        sizes.sort_unstable();
        let sizes: Vec<String> = sizes.iter().map(u64::to_string).collect();
        return Err(format!("no package of {points} points is sold for {} (sizes: {} points)", f.id, sizes.join(", ")));
    };
    let calls = pricing::package_calls(Decimal::from(points), f.points_per_unit);
    let calls_json = calls.to_u64().map_or_else(|| json!(ser::plain_string(calls)), |c| json!(c));
    let (unit, units) = match f.unit {
        Unit::Call => ("call", "calls"),
        Unit::VideoMinute => ("video-minute", "minutes"),
    };
    let cur = &catalog.currency;
    let amount = pricing::round2(pp.price);
    let ppu = ser::plain_string(f.points_per_unit);
    let line = json!({
        "points": points.to_string(),
        "points_per_unit": ppu,
        "unit": unit,
        "calls": calls_json,
        "price": pp.price.to_string(),
        "amount": ser::money_string(amount),
    });
    let mut text = format!("{} ({}): package of {points} points\n", f.id, f.name);
    let _ = writeln!(text, "  {points} points / {ppu} points per {unit} = {} {units}", ser::plain_string(calls));
    let _ = writeln!(text, "  price: {}", ser::money_string(amount));
    let mut out = priced(cur, amount, Value::Array(vec![line]), text);
    if let Value::Object(m) = &mut out.json {
        m.insert("calls".into(), calls_json);
        m.insert("points".into(), json!(points.to_string()));
    }
    Ok(out)
}

fn quote_image_search(catalog: &Catalog, from: (u64, u32), to: (u64, u32)) -> Result<Output, String> {
    let is = &catalog.image_search;
    let old = pricing::image_package(is, from).map_err(|e| e.to_string())?;
    let new = pricing::image_package(is, to).map_err(|e| e.to_string())?;
    let diff = pricing::image_search_difference(is, from, to).map_err(|e| e.to_string())?;
    let cur = &is.currency;
    let pkg = |p: &catalog::ImagePackage| json!({ "capacity": p.capacity, "qps": p.qps, "month": ser::money_string(p.month) });
    let lines = json!([
        { "item": "new", "capacity": new.capacity, "qps": new.qps, "amount": ser::money_string(new.month) },
        { "item": "old", "capacity": old.capacity, "qps": old.qps, "amount": ser::money_string(-old.month) },
    ]);
    let kind = match diff.cmp(&Decimal::ZERO) {
        std::cmp::Ordering::Greater => "upgrade: pay the difference",
        std::cmp::Ordering::Less => "downgrade: the difference is refunded",
        std::cmp::Ordering::Equal => "same price: nothing to pay or refund",
    };
    let mut text = format!(
        "image search {}/{} -> {}/{} ({kind}; the billing cycle keeps its start)\n",
        old.capacity, old.qps, new.capacity, new.qps
    );
    let _ = writeln!(text, "  new package {}/{}: {} {cur}/month", new.capacity, new.qps, ser::money_string(new.month));
    let _ = writeln!(text, "  old package {}/{}: -{} {cur}/month", old.capacity, old.qps, ser::money_string(old.month));
    let mut out = priced(cur, diff, lines, text);
    if let Value::Object(m) = &mut out.json {
        m.insert("from".into(), pkg(old));
        m.insert("to".into(), pkg(new));
    }
    Ok(out)
}

/// `--video-seconds`: a non-negative number of seconds, at most 3 decimals, as milliseconds.
fn parse_seconds(s: &str) -> Result<u64, String> {
    let d = match exact_decimal(s) {
        Some(d) => d,
        None if s.trim().parse::<Decimal>().is_ok() => {
            return Err(format!("{s}: give seconds to the millisecond at most (3 decimals)"))
        }
        None => return Err(format!("{s:?} is not a number of seconds (e.g. 140 or 140.5)")),
    };
    if d.is_sign_negative() && !d.is_zero() {
        return Err(format!("{s} is negative"));
    }
    let ms = d.checked_mul(Decimal::from(1000u32)).ok_or_else(|| format!("{s} seconds is too long"))?;
    if ms.fract() != Decimal::ZERO {
        return Err(format!("{s}: give seconds to the millisecond at most (3 decimals)"));
    }
    ms.to_u64().ok_or_else(|| format!("{s} seconds is too long"))
}

/// `CAPACITY/QPS`: `2500000/5`, `2,500,000/5`, `2.5M/5` or `100k/1`.
fn parse_size(s: &str) -> Result<(u64, u32), String> {
    let bad = || format!("{s:?} is not CAPACITY/QPS (e.g. 2500000/5 or 2.5M/5)");
    let (cap, qps) = s.split_once('/').ok_or_else(bad)?;
    let cap: String = cap.trim().chars().filter(|c| *c != ',' && *c != '_').collect();
    let (num, mult) = match cap.chars().last() {
        Some('k' | 'K') => (&cap[..cap.len() - 1], 1_000u32),
        Some('m' | 'M') => (&cap[..cap.len() - 1], 1_000_000),
        _ => (cap.as_str(), 1),
    };
    let num = exact_decimal(num).ok_or_else(bad)?;
    let cap = num.checked_mul(Decimal::from(mult)).ok_or_else(bad)?;
    if cap.is_sign_negative() || cap.fract() != Decimal::ZERO {
        return Err(bad());
    }
    let cap = cap.to_u64().ok_or_else(bad)?;
    let qps: u32 = qps.trim().parse().map_err(|_| bad())?;
    if cap == 0 || qps == 0 {
        return Err(bad());
    }
    Ok((cap, qps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_every_accepted_spelling() {
        assert_eq!(parse_size("2500000/5"), Ok((2_500_000, 5)));
        assert_eq!(parse_size("2.5M/5"), Ok((2_500_000, 5)));
        assert_eq!(parse_size("2,500,000/10"), Ok((2_500_000, 10)));
        assert_eq!(parse_size("100k/1"), Ok((100_000, 1)));
        assert_eq!(parse_size(" 5m / 10 "), Ok((5_000_000, 10)));
        for bad in ["", "5", "/5", "5M/", "abc/5", "2.5/5", "-1/5", "5M/0", "0/5", "5M/x", "5M/5/5", "1.0000005M/5"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
        // More digits than a Decimal keeps: not rounded into a size that is sold.
        assert!(parse_size("2.50000000000000000000000000001M/5").is_err());
        assert_eq!(parse_size("2.50000000000000000000000000000M/5"), Ok((2_500_000, 5)));
    }

    #[test]
    fn seconds_parse_to_milliseconds() {
        assert_eq!(parse_seconds("140"), Ok(140_000));
        assert_eq!(parse_seconds("140.5"), Ok(140_500));
        assert_eq!(parse_seconds("0"), Ok(0));
        for bad in ["", "x", "-1", "1.0005", "1e400"] {
            assert!(parse_seconds(bad).is_err(), "{bad:?} should be rejected");
        }
        // Not a whole millisecond, however many places it takes to say so (a Decimal keeps 28
        // digits: parsed loosely, this rounds to 140 s and is quoted as if it were).
        assert!(parse_seconds("140.0000000000000000000000000001").is_err());
        // Trailing zeros are still whole milliseconds.
        assert_eq!(parse_seconds("140.000000000000000000000000000000"), Ok(140_000));
    }

    fn shipped() -> Catalog {
        let mut errors = Vec::new();
        let raw: Option<RawCatalog> =
            config::parse_toml("catalog.toml", include_str!("../config/catalog.toml"), &mut errors);
        catalog::compile(raw.expect("shipped catalog parses"), &mut Errs { file: "catalog.toml", out: &mut errors })
    }

    #[test]
    fn huge_video_seconds_are_shown_as_given() {
        let cmd = QuoteCmd::Payg {
            feature: "comprehensive-video-enhancement".into(),
            calls: None,
            video_seconds: Some("18446744073709551.615".into()),
            fps: Some(60),
            lines: Some(1080),
            opts: QuoteOpts { config: "x".into(), json: true },
        };
        let out = quote(&shipped(), &cmd).expect("priced");
        // u64::MAX ms: the seconds line must not be clamped to i64::MAX ms.
        assert_eq!(out.json["lines"][0]["seconds"], "18446744073709551.615", "{}", out.json);
        assert_eq!(out.json["lines"][0]["minutes"], "307445734561825.86025", "{}", out.json);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_text(140_000), "2 min 20 s");
        assert_eq!(duration_text(120_000), "2 min");
        assert_eq!(duration_text(1_500), "1.5 s");
    }
}
