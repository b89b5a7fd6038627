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
                Decimal::from_str_exact(s.trim())
                    .or_else(|_| Decimal::from_str(s.trim()))
                    .map(Dec)
                    .map_err(|_| E::custom(format!("{s:?} is not a decimal number")))
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
