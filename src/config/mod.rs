//! Loading and validating the three configuration files (SPEC §3).
//!
//! Each file is parsed with unknown keys collected (all of them, not just the first) and type
//! errors reported with their field path; then the semantic checks run across all three files and
//! every problem is returned, each naming the file and the field path.

pub mod entitlements;
pub mod gateway;

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserializer;

pub use crate::diag::{ConfigError, ConfigErrors, Dec, Errs};

/// Where the configuration comes from: files on disk, or the embedded demo.
#[derive(Debug, Clone)]
pub enum ConfigSource {
    Files { main: PathBuf },
    Embedded,
}

pub const EMBEDDED_MAIN: &str = include_str!("../../config/turnstile.toml");
pub const EMBEDDED_CATALOG: &str = include_str!("../../config/catalog.toml");
pub const EMBEDDED_ENTITLEMENTS: &str = include_str!("../../config/entitlements.json");

/// The three files' texts and the names errors should use for them.
#[derive(Clone)]
pub struct Texts {
    pub main_name: String,
    pub main: String,
    pub catalog_name: String,
    pub catalog: String,
    pub entitlements_name: String,
    pub entitlements: String,
    /// Paths to watch for changes (empty for the embedded configuration).
    pub watch_paths: Vec<PathBuf>,
    /// The main file's folder: relative paths in it (the ledger) are resolved against it.
    /// `None` for the embedded configuration (relative to the working directory).
    pub base_dir: Option<PathBuf>,
}

fn read(path: &Path, errors: &mut Vec<ConfigError>) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Some(s),
        Err(e) => {
            errors.push(ConfigError {
                file: path.display().to_string(),
                path: String::new(),
                message: format!("cannot read: {e}"),
            });
            None
        }
    }
}

impl Texts {
    /// Texts that come from no file (tests, benchmarks), named after the files they stand for.
    pub fn in_memory(main: impl Into<String>, catalog: impl Into<String>, entitlements: impl Into<String>) -> Texts {
        Texts {
            main_name: "turnstile.toml".into(),
            main: main.into(),
            catalog_name: "catalog.toml".into(),
            catalog: catalog.into(),
            entitlements_name: "entitlements.json".into(),
            entitlements: entitlements.into(),
            watch_paths: Vec::new(),
            base_dir: None,
        }
    }
}

/// Reads the main file, then the catalog and entitlements it names (relative to its folder).
pub fn read_texts(source: &ConfigSource) -> Result<Texts, ConfigErrors> {
    match source {
        ConfigSource::Embedded => Ok(Texts {
            main_name: "turnstile.toml (embedded demo)".into(),
            main: EMBEDDED_MAIN.into(),
            catalog_name: "catalog.toml (embedded demo)".into(),
            catalog: EMBEDDED_CATALOG.into(),
            entitlements_name: "entitlements.json (embedded demo)".into(),
            entitlements: EMBEDDED_ENTITLEMENTS.into(),
            watch_paths: Vec::new(),
            base_dir: None,
        }),
        ConfigSource::Files { main } => {
            let Located { main_name, text, dir, files } = locate(main)?;
            let mut errors = Vec::new();
            let catalog_path = dir.join(&files.catalog);
            let ent_path = dir.join(&files.entitlements);
            let catalog = read_named(&main_name, "files.catalog", &files.catalog, &catalog_path, &mut errors);
            let entitlements =
                read_named(&main_name, "files.entitlements", &files.entitlements, &ent_path, &mut errors);
            match (catalog, entitlements) {
                (Some(catalog), Some(entitlements)) => Ok(Texts {
                    main_name,
                    main: text,
                    catalog_name: catalog_path.display().to_string(),
                    catalog,
                    entitlements_name: ent_path.display().to_string(),
                    entitlements,
                    watch_paths: vec![main.clone(), catalog_path, ent_path],
                    base_dir: Some(dir),
                }),
                _ => {
                    // Check prints every error: the main file's own (syntax, unknown keys,
                    // types) come first, though the files it names could not be read.
                    let mut all = main_parse_errors(&main_name, &text);
                    all.append(&mut errors);
                    Err(ConfigErrors(all))
                }
            }
        }
    }
}

/// Reads the main file and the catalog it names, not the entitlements (`quote` prices from the
/// catalog alone): the catalog's name for errors, and its text.
pub fn read_catalog(main: &Path) -> Result<(String, String), ConfigErrors> {
    let Located { main_name, dir, files, .. } = locate(main)?;
    let mut errors = Vec::new();
    let path = dir.join(&files.catalog);
    match read_named(&main_name, "files.catalog", &files.catalog, &path, &mut errors) {
        Some(catalog) => Ok((path.display().to_string(), catalog)),
        None => Err(ConfigErrors(errors)),
    }
}

/// The main file, read, and the files its `[files]` names.
struct Located {
    main_name: String,
    text: String,
    /// The main file's folder: the other files' paths are relative to it.
    dir: PathBuf,
    files: gateway::RawFiles,
}

fn locate(main: &Path) -> Result<Located, ConfigErrors> {
    let mut errors = Vec::new();
    let main_name = main.display().to_string();
    let Some(text) = read(main, &mut errors) else { return Err(ConfigErrors(errors)) };
    // Only [files] is needed to find the other two; full validation happens later.
    let Some(files) = gateway::peek_files(&text) else {
        // The main file does not parse, so which files it names is unknown: its own errors are
        // reported, and no default-named file is guessed (one beside it may belong to another
        // configuration, or not exist and hide the real error).
        let mut errors = main_parse_errors(&main_name, &text);
        if errors.is_empty() {
            errors.push(ConfigError {
                file: main_name,
                path: "files".into(),
                message: "cannot be read to find the catalog and entitlements".into(),
            });
        }
        return Err(ConfigErrors(errors));
    };
    let dir = main.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok(Located { main_name, text, dir, files })
}

/// The errors of parsing the main file alone (before the checks that need the catalog).
fn main_parse_errors(main_name: &str, text: &str) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    let _: Option<gateway::RawGateway> = parse_toml(main_name, text, &mut errors);
    errors
}

/// Reads a file the main file names at `field`; an error names the main file and that field
/// (SPEC §2), where the fix is made.
fn read_named(
    main_name: &str,
    field: &str,
    written: &str,
    path: &Path,
    errors: &mut Vec<ConfigError>,
) -> Option<String> {
    std::fs::read_to_string(path)
        .map_err(|e| {
            let relative =
                if Path::new(written).is_relative() { " (a relative path is from this file's folder)" } else { "" };
            errors.push(ConfigError {
                file: main_name.into(),
                path: field.into(),
                message: format!("cannot read {}: {e}{relative}", path.display()),
            })
        })
        .ok()
}

/// Renders a serde_ignored path as `a.b[0].c`.
fn ignored_path(p: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    fn walk(p: &P<'_>, out: &mut String) {
        match p {
            P::Root => {}
            P::Seq { parent, index } => {
                walk(parent, out);
                out.push_str(&format!("[{index}]"));
            }
            P::Map { parent, key } => {
                walk(parent, out);
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut s = String::new();
    walk(p, &mut s);
    s
}

fn deserialize_collecting<'de, D, T>(
    file: &str,
    de: D,
    describe: impl Fn(D::Error) -> String,
    errors: &mut Vec<ConfigError>,
) -> Option<T>
where
    D: Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    let mut unknown = Vec::new();
    let mut on_unknown = |p: serde_ignored::Path<'_>| unknown.push(ignored_path(&p));
    let de = serde_ignored::Deserializer::new(de, &mut on_unknown);
    let result: Result<T, _> = serde_path_to_error::deserialize(de);
    for path in unknown {
        errors.push(ConfigError { file: file.into(), path, message: "unknown key (check its spelling)".into() });
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            errors.push(ConfigError { file: file.into(), path, message: describe(e.into_inner()) });
            None
        }
    }
}

pub fn parse_toml<T: DeserializeOwned>(file: &str, text: &str, errors: &mut Vec<ConfigError>) -> Option<T> {
    let before = errors.len();
    let describe = |e: toml::de::Error| {
        // One line per error, each naming its file: the parser's message may span lines
        // ("invalid table header\nexpected ...").
        let message = e.message().trim_end().lines().map(str::trim).collect::<Vec<_>>().join(": ");
        match e.span() {
            Some(span) => {
                // A span may end inside a character; the text before it is cut at a boundary.
                let mut start = span.start.min(text.len());
                while !text.is_char_boundary(start) {
                    start -= 1;
                }
                let before = &text[..start];
                let line = before.matches('\n').count() + 1;
                // In characters, as editors count columns (a byte count is off after an `é`).
                let col = before[before.rfind('\n').map_or(0, |i| i + 1)..].chars().count() + 1;
                format!("{message} (line {line}, column {col})")
            }
            None => message,
        }
    };
    let v = deserialize_collecting(file, toml::Deserializer::new(text), describe, errors);
    v.filter(|_| errors.len() == before)
}

pub fn parse_json<T: DeserializeOwned>(file: &str, text: &str, errors: &mut Vec<ConfigError>) -> Option<T> {
    let before = errors.len();
    let mut de = serde_json::Deserializer::from_str(text);
    let v = deserialize_collecting(file, &mut de, |e| e.to_string(), errors);
    if v.is_some() {
        if let Err(e) = de.end() {
            errors.push(ConfigError { file: file.into(), path: String::new(), message: e.to_string() });
        }
    }
    v.filter(|_| errors.len() == before)
}
