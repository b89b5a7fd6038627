//! Configuration diagnostics and the decimal-as-string type, shared by every parser (a leaf:
//! `catalog` and `config` both use it, neither imports the other for it).

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use serde::{Deserialize, Deserializer};

/// One problem in one file, at one field.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: String,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}: {}: {}", self.file, self.path, self.message)
        }
    }
}

/// Every problem found; never empty.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Collects errors for one file.
pub struct Errs<'a> {
    pub file: &'a str,
    pub out: &'a mut Vec<ConfigError>,
}

impl Errs<'_> {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.out.push(ConfigError { file: self.file.to_string(), path: path.into(), message: message.into() });
    }
}

/// `s` as written (its scale too: `"0.10"` stays `0.10`), or `None`: a number with more digits
/// than a `Decimal` keeps is refused rather than rounded (`str::parse` rounds it), unless only
/// trailing zeros of the fraction are past what it keeps (those are dropped).
pub fn exact_decimal(s: &str) -> Option<Decimal> {
    let t = s.trim();
    if let Ok(d) = Decimal::from_str_exact(t) {
        return Some(d);
    }
    if !t.contains('.') {
        return None;
    }
    let stripped = t.trim_end_matches('0');
    let stripped = stripped.strip_suffix('.').unwrap_or(stripped);
    if !stripped.bytes().any(|b| b.is_ascii_digit()) {
        return None;
    }
    Decimal::from_str_exact(stripped).ok()
}

/// A decimal written as a string (`"0.15"`): money and points are never floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dec(pub Decimal);

impl<'de> Deserialize<'de> for Dec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Dec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal written as a string, e.g. \"0.15\"")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Dec, E> {
                match exact_decimal(s) {
                    Some(d) => Ok(Dec(d)),
                    // Money is billed as written: a number a Decimal would round is refused.
                    None if Decimal::from_str(s.trim()).is_ok() => Err(E::custom(format!(
                        "{s:?} has more digits than a decimal keeps exactly (at most 28 significant \
                         digits): it would be rounded"
                    ))),
                    None => Err(E::custom(format!("{s:?} is not a decimal number"))),
                }
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Dec, E> {
                Err(E::custom(format!("{v} is a float: write decimals as strings, e.g. \"{v}\"")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Dec, E> {
                Err(E::custom(format!("{v} is a number: write decimals as strings, e.g. \"{v}\"")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Dec, E> {
                Err(E::custom(format!("{v} is a number: write decimals as strings, e.g. \"{v}\"")))
            }
        }
        d.deserialize_any(V)
    }
}

impl serde::Serialize for Dec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = self.0.normalize();
        // Whole numbers (the ledger's call counts and ms) without Decimal's formatter and its
        // String: the same text, digits on the stack.
        if d.scale() == 0 {
            if let Ok(n) = i64::try_from(d.mantissa()) {
                return s.serialize_str(itoa::Buffer::new().format(n));
            }
        }
        s.serialize_str(&d.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(text: &str) -> Result<Dec, String> {
        serde_json::from_value(serde_json::Value::String(text.into())).map_err(|e| e.to_string())
    }

    #[test]
    fn decimals_are_read_exactly_or_refused() {
        // More digits than a Decimal keeps: refused, not rounded to a number nobody wrote.
        for text in [
            "0.00250000000000000000000000001",
            "0.20000000000000000000000000001",
            "5000.00000000000000000000000001",
            "50000.0000000000000000000000001",
            "1.00000000000000000000000000000000001",
        ] {
            let e = dec(text).expect_err(text);
            assert!(e.contains("more digits than"), "{text}: {e}");
        }
        // Trailing zeros change nothing: the number as written.
        assert_eq!(dec("2.5000000000000000000000000000000"), Ok(Dec(Decimal::new(25, 1))));
        assert_eq!(dec(" 0.2000000000000000000000000000000 "), Ok(Dec(Decimal::new(2, 1))));
        assert_eq!(dec("0.0000000000000000000000000000000"), Ok(Dec(Decimal::ZERO)));
        assert_eq!(dec("0.0000000000000000000000000001"), Ok(Dec(Decimal::new(1, 28))));
        assert_eq!(dec("79228162514264337593543950335"), Ok(Dec(Decimal::MAX)));
        // 29 significant digits that a Decimal holds exactly.
        assert_eq!(
            dec("5000.0000000000000000000000001"),
            Ok(Dec(Decimal::from_i128_with_scale(50_000_000_000_000_000_000_000_000_001, 25)))
        );
        assert_eq!(dec("-7.25"), Ok(Dec(Decimal::new(-725, 2))));
        // The scale as written: a price "0.10" is shown as "0.10".
        assert_eq!(dec("0.10").map(|d| d.0.scale()), Ok(2));
        assert_eq!(dec("16.00").map(|d| d.0.scale()), Ok(2));
        for text in ["", "abc", "1.2.3", "79228162514264337593543950336"] {
            assert!(dec(text).is_err(), "{text:?}");
        }
    }

    #[test]
    fn decimals_serialize_as_their_normal_text() {
        for text in [
            "0",
            "-0",
            "1",
            "-1",
            "42",
            "1000",
            "9223372036854775807",
            "-9223372036854775808",
            "1.50",
            "0.001",
            "12.3000",
            "-7.25",
            "79228162514264337593543950335",
        ] {
            let d: Decimal = text.parse().expect("decimal");
            let json = serde_json::to_string(&Dec(d)).expect("serialize");
            assert_eq!(json, format!("\"{}\"", d.normalize()), "{text}");
        }
    }
}
