//! Property test of the configuration loader (issue 11): random mutations of valid
//! `turnstile.toml`, `catalog.toml` and `entitlements.json` texts never make `config::build`
//! panic, and every error it returns names its file and is located: by the field path, or, for
//! a syntax error, by line and column.

use proptest::prelude::*;
use turnstile::config::{ConfigError, Texts, EMBEDDED_CATALOG, EMBEDDED_ENTITLEMENTS, EMBEDDED_MAIN};
use turnstile::snapshot::build;

const FILES: [&str; 3] = ["turnstile.toml", "catalog.toml", "entitlements.json"];

#[derive(Debug, Clone)]
enum Mutation {
    /// Delete line `n` (modulo the line count).
    DeleteLine(usize),
    /// Give the value on line `n` (the first `key = value` / `"key": value` line from there)
    /// a value of another type.
    ChangeType(usize, &'static str),
    /// Insert an unknown key at the start of the table / object that line `n` opens or is in.
    UnknownKey(usize),
    /// Cut the text at byte `n` (modulo its length).
    Truncate(usize),
    /// Insert random bytes (as UTF-8, lossily) at byte `n`.
    Bytes(usize, Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let values = prop::sample::select(vec!["1", "-1", "1.5", "\"text\"", "true", "[]", "{}", "[1, \"a\"]", "\"\""]);
    prop_oneof![
        any::<usize>().prop_map(Mutation::DeleteLine),
        (any::<usize>(), values).prop_map(|(n, v)| Mutation::ChangeType(n, v)),
        any::<usize>().prop_map(Mutation::UnknownKey),
        any::<usize>().prop_map(Mutation::Truncate),
        (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(n, b)| Mutation::Bytes(n, b)),
    ]
}

fn boundary(text: &str, n: usize) -> usize {
    let mut i = n % (text.len() + 1);
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Applies `m` to `text` (a TOML file unless `json`); the name of the unknown key inserted, if any.
fn apply(text: &str, json: bool, m: &Mutation) -> (String, Option<&'static str>) {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let count = lines.len().max(1);
    let sep = if json { ':' } else { '=' };
    match m {
        Mutation::DeleteLine(n) => {
            if !lines.is_empty() {
                lines.remove(n % count);
            }
        }
        Mutation::ChangeType(n, v) => {
            if let Some(i) = (0..count).map(|k| (n + k) % count).find(|&i| {
                let l = lines[i].trim_start();
                !l.starts_with('#') && l.contains(sep) && !l.starts_with('[')
            }) {
                let l = &lines[i];
                let at = l.find(sep).unwrap_or(0);
                let end = if json { l[at..].find([',', '}']).map_or(l.len(), |e| at + e) } else { l.len() };
                lines[i] = format!("{} {v}{}", &l[..=at], &l[end..]);
            }
        }
        Mutation::UnknownKey(n) => {
            if json {
                // Right after an opening brace: the first key of that object.
                let starts: Vec<usize> = text.match_indices('{').map(|(i, _)| i + 1).collect();
                if starts.is_empty() {
                    return (text.to_string(), None);
                }
                let at = starts[n % starts.len()];
                let tail = text[at..].trim_start();
                let comma = if tail.starts_with('}') { "" } else { "," };
                return (format!("{}\"zz_unknown_key\": 1{comma}{}", &text[..at], &text[at..]), Some("zz_unknown_key"));
            }
            // After a table header line (`[x]` or `[[x]]`): a key of that table.
            let headers: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].trim_start().starts_with('[') && lines[i].trim_end().ends_with(']'))
                .collect();
            if headers.is_empty() {
                return (text.to_string(), None);
            }
            lines.insert(headers[n % headers.len()] + 1, "zz_unknown_key = 1".into());
            return (lines.join("\n"), Some("zz_unknown_key"));
        }
        Mutation::Truncate(n) => return (text[..boundary(text, *n)].to_string(), None),
        Mutation::Bytes(n, b) => {
            let at = boundary(text, *n);
            return (format!("{}{}{}", &text[..at], String::from_utf8_lossy(b), &text[at..]), None);
        }
    }
    (lines.join("\n"), None)
}

fn located(e: &ConfigError) -> bool {
    !e.path.is_empty() || e.message.contains("line ")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn mutated_configuration_never_panics_and_every_error_is_located(file in 0usize..3, m in mutation()) {
        let mut texts = [EMBEDDED_MAIN.to_string(), EMBEDDED_CATALOG.to_string(), EMBEDDED_ENTITLEMENTS.to_string()];
        let (mutated, unknown) = apply(&texts[file], file == 2, &m);
        texts[file] = mutated;
        let [main, catalog, ents] = texts;
        let errors = match build(&Texts::in_memory(main, catalog, ents), 1) {
            Ok(_) => return Ok(()),
            Err(e) => e.0,
        };
        prop_assert!(!errors.is_empty());
        for e in &errors {
            prop_assert!(FILES.contains(&e.file.as_str()), "{e} does not name a file");
            prop_assert!(located(e), "{e} names no field path and no line");
        }
        if let Some(key) = unknown {
            prop_assert!(
                // An unknown key of a struct is reported as such; one in a map of names (tenants,
                // families, ...) becomes an entry of the wrong shape, named by the same path.
                errors.iter().any(|e| e.file == FILES[file] && e.path.ends_with(key)),
                "the unknown key is not named: {errors:?}"
            );
        }
    }
}
