//! The request path routing sees and the upstream receives (SPEC §4).
//!
//! [`normalize`] percent-decodes unreserved characters (ALPHA / DIGIT / `-` / `.` / `_` / `~`),
//! writes every other escape in upper-case hex, removes dot-segments (RFC 3986 §5.2.4) and merges
//! runs of `/`. Empty segments count for nothing, as in Go's `path.Clean`: `/a//../b` is `/b`; a
//! trailing `/` (also one left by a final `.` or `..`) is kept, since `/a/` and `/a` may be
//! different resources. It refuses, as [`BadPath`], what no spelling of a plain path needs: an
//! encoded `/` or `\`, a bare `\`, a byte outside RFC 3986's `pchar` set, a `%` not followed by two
//! hex digits, a dot-segment with `;` parameters (`..;`, `.;`: see [`BadPath::DotSegmentParams`]),
//! and anything that does not start with `/`.
//!
//! The output is a fixed point: normalizing it again returns it unchanged, and borrowed. Already
//! normal paths (nearly every request) are checked in one pass over their bytes and returned as
//! [`Cow::Borrowed`], so the request path allocates nothing for them.

use std::borrow::Cow;

use http::{Uri, Version};

/// Why a request target is refused with 400 `bad_path`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("it is not an origin-form path (one that starts with /)")]
    NotOriginForm,
    #[error("it has an encoded / or \\ (%2F or %5C)")]
    EncodedSeparator,
    #[error("it has a \\")]
    Backslash,
    #[error("it has a byte that a URI path cannot hold unencoded")]
    InvalidByte,
    #[error("it has a % that is not followed by two hex digits")]
    InvalidEscape,
    #[error("it has a dot-segment with parameters (`.;` or `..;`), which servers that strip `;` parameters read as `.` or `..`")]
    DotSegmentParams,
}

/// `.;…` or `..;…`: a segment that RFC 3986 keeps as a name, but that servers which strip `;`
/// parameters from each segment before resolving dot-segments (Tomcat, Spring) read as `.` or
/// `..`. `/v1/detect/..;/face/compare` would be routed and billed as object detection and served
/// as face comparison by such an upstream, so it is refused instead.
fn dot_segment_with_params(seg: &[u8]) -> bool {
    seg.starts_with(b".;") || seg.starts_with(b"..;")
}

/// RFC 3986 `unreserved`: decoded wherever it appears as an escape.
fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// What a path may hold unencoded: `pchar` less `%` (RFC 3986 §3.3), and `/`.
fn plain_byte(b: u8) -> bool {
    unreserved(b)
        || matches!(b, b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b';' | b'=' | b':' | b'@' | b'/')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// The byte an escape at `p[i]` (the `%`) stands for.
fn escape(p: &[u8], i: usize) -> Result<u8, BadPath> {
    match (p.get(i + 1).copied().and_then(hex), p.get(i + 2).copied().and_then(hex)) {
        (Some(h), Some(l)) => Ok(h << 4 | l),
        _ => Err(BadPath::InvalidEscape),
    }
}

/// The path of a request target in origin form, or `""` (which [`normalize`] refuses) for one in
/// absolute form, authority form or `*`. HTTP/2 requests always carry a scheme and authority
/// (from `:scheme` / `:authority`); their `:path` is what is judged.
pub fn origin_path(uri: &Uri, version: Version) -> &str {
    let h1 = matches!(version, Version::HTTP_09 | Version::HTTP_10 | Version::HTTP_11);
    if h1 && (uri.scheme().is_some() || uri.authority().is_some()) {
        return "";
    }
    uri.path()
}

/// The normal form of `path` (see the module docs), borrowed when `path` is already normal.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, BadPath> {
    if is_normal(path.as_bytes()) {
        Ok(Cow::Borrowed(path))
    } else {
        normalize_slow(path.as_bytes()).map(Cow::Owned)
    }
}

/// True when `p` is valid and [`normalize`] would return it unchanged; false when it needs work
/// or is invalid (the slow path then says why).
fn is_normal(p: &[u8]) -> bool {
    if p.first() != Some(&b'/') {
        return false;
    }
    let mut seg_start = 1;
    let mut i = 1;
    while i <= p.len() {
        if i == p.len() || p[i] == b'/' {
            let seg = &p[seg_start..i];
            // An empty segment is normal only as the last one (a trailing `/`).
            if (seg.is_empty() && i < p.len()) || seg == b"." || seg == b".." || dot_segment_with_params(seg) {
                return false;
            }
            seg_start = i + 1;
            i += 1;
            continue;
        }
        match p[i] {
            b'%' => match escape(p, i) {
                // Kept as it is only when upper-case and neither unreserved nor a separator.
                Ok(v)
                    if !unreserved(v)
                        && v != b'/'
                        && v != b'\\'
                        && !p[i + 1..i + 3].iter().any(u8::is_ascii_lowercase) =>
                {
                    i += 3
                }
                _ => return false,
            },
            b if plain_byte(b) => i += 1,
            _ => return false,
        }
    }
    true
}

fn normalize_slow(p: &[u8]) -> Result<String, BadPath> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    if p.first() != Some(&b'/') {
        return Err(BadPath::NotOriginForm);
    }
    // 1. Validate; decode unreserved escapes, upper-case the others.
    let mut decoded = String::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'%' => {
                let v = escape(p, i)?;
                if v == b'/' || v == b'\\' {
                    return Err(BadPath::EncodedSeparator);
                }
                if unreserved(v) {
                    decoded.push(char::from(v));
                } else {
                    decoded.push('%');
                    decoded.push(char::from(HEX[usize::from(v >> 4)]));
                    decoded.push(char::from(HEX[usize::from(v & 15)]));
                }
                i += 3;
            }
            b'\\' => return Err(BadPath::Backslash),
            b if plain_byte(b) => {
                decoded.push(char::from(b));
                i += 1;
            }
            _ => return Err(BadPath::InvalidByte),
        }
    }
    // 2. Remove dot-segments and empty segments; keep a trailing `/`.
    let mut out = String::with_capacity(decoded.len());
    let mut trailing = false;
    for seg in decoded[1..].split('/') {
        match seg {
            "" | "." => trailing = true,
            ".." => {
                if let Some(j) = out.rfind('/') {
                    out.truncate(j);
                }
                trailing = true;
            }
            s if dot_segment_with_params(s.as_bytes()) => return Err(BadPath::DotSegmentParams),
            s => {
                out.push('/');
                out.push_str(s);
                trailing = false;
            }
        }
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::gateway::Route;
    use crate::snapshot::Router;
    use proptest::prelude::*;

    fn n(p: &str) -> Result<String, BadPath> {
        normalize(p).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/v1/face/compare",
            "/v1/detect/",
            "/a%20b/%3A",
            "/a/.../b",
            "/a/.b/c..",
            "/~user/x-y_z",
            "/a;b/c",
            "/a/...;x",
            "/a/x..;/b",
        ] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(q)) if q == p), "{p}");
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        for (p, want) in [
            ("/a/b/../c", "/a/c"),
            ("/a/./b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../a", "/a"),
            ("/.", "/"),
            ("//", "/"),
            ("//a//b//", "/a/b/"),
            ("/a//../b", "/b"),
            ("/a/b//..", "/a/"),
            ("/v1/detect/../face/compare", "/v1/face/compare"),
        ] {
            assert_eq!(n(p).as_deref(), Ok(want), "{p}");
        }
    }

    #[test]
    fn escapes() {
        for (p, want) in [
            ("/v1/%66ace/compare", "/v1/face/compare"),
            ("/v1/detect/%2e%2e/face/compare", "/v1/face/compare"),
            ("/v1/detect/%2E./face", "/v1/face"),
            ("/v1/detect/.%2e/face", "/v1/face"),
            ("/a/%2e/b", "/a/b"),
            ("/%7e%5F%2d%30", "/~_-0"),
            ("/a%3a%40", "/a%3A%40"),
            ("/a%20b", "/a%20b"),
            ("/%25", "/%25"),
            ("/%252e%252e/x", "/%252e%252e/x"),
            ("/%c3%a9", "/%C3%A9"),
        ] {
            assert_eq!(n(p).as_deref(), Ok(want), "{p}");
        }
    }

    #[test]
    fn refusals() {
        use BadPath::*;
        for (p, why) in [
            ("", NotOriginForm),
            ("*", NotOriginForm),
            ("a/b", NotOriginForm),
            ("%2Fa", NotOriginForm),
            ("/a%2Fb", EncodedSeparator),
            ("/a%2fb", EncodedSeparator),
            ("/a%5Cb", EncodedSeparator),
            ("/a%5cb", EncodedSeparator),
            ("/a\\b", Backslash),
            ("/a%", InvalidEscape),
            ("/a%4", InvalidEscape),
            ("/a%zz", InvalidEscape),
            ("/a%%41", InvalidEscape),
            ("/a b", InvalidByte),
            ("/a\u{7f}", InvalidByte),
            ("/a\u{1}", InvalidByte),
            ("/a\"b", InvalidByte),
            ("/a{b}", InvalidByte),
            ("/a?b", InvalidByte),
            ("/a#b", InvalidByte),
            ("/é", InvalidByte),
            ("/v1/detect/..;/face/compare", DotSegmentParams),
            ("/v1/detect/..;x=1/face/compare", DotSegmentParams),
            ("/v1/detect/%2e%2E;/face/compare", DotSegmentParams),
            ("/a/.;/b", DotSegmentParams),
            ("/a/..;", DotSegmentParams),
        ] {
            assert_eq!(n(p), Err(why), "{p:?}");
        }
    }

    #[test]
    fn origin_form_only() {
        let h1 = Version::HTTP_11;
        assert_eq!(origin_path(&"/a?b".parse().unwrap(), h1), "/a");
        assert_eq!(origin_path(&"http://x/a".parse().unwrap(), h1), "");
        assert_eq!(origin_path(&"x:80".parse().unwrap(), h1), "");
        assert_eq!(origin_path(&"*".parse().unwrap(), h1), "*");
        assert_eq!(origin_path(&"http://x/a".parse().unwrap(), Version::HTTP_2), "/a");
    }

    // --- properties ------------------------------------------------------------------------

    /// Any string of path-ish bytes, valid or not.
    fn any_path() -> impl Strategy<Value = String> {
        proptest::string::string_regex(r"/?([a-zA-Z0-9./%\\_~:@!;-]|%[0-9a-fA-F]{2}|\.\.|//){0,24}").unwrap()
    }

    /// A path in normal form: segments of plain characters and reserved escapes, maybe a
    /// trailing `/`.
    fn plain_path() -> impl Strategy<Value = String> {
        let seg = proptest::string::string_regex(r"([a-zA-Z0-9_~:@!-]|%2[0-9A-C]|%3[A-F]|\.\.\.){1,4}").unwrap();
        (proptest::collection::vec(seg, 0..6), any::<bool>()).prop_map(|(segs, trailing)| {
            let mut p = String::new();
            for s in &segs {
                p.push('/');
                p.push_str(s);
            }
            if trailing || p.is_empty() {
                p.push('/');
            }
            p
        })
    }

    /// Another spelling of a plain path: escapes for unreserved characters (either case),
    /// `./`, `x/../`, doubled slashes, lower-case hex.
    fn respell(plain: &str, choices: &[u8]) -> String {
        let mut out = String::new();
        let mut k = 0;
        let mut next = || {
            k += 1;
            choices.get(k % choices.len().max(1)).copied().unwrap_or(0)
        };
        let b = plain.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'/' {
                out.push('/');
                match next() % 5 {
                    0 => out.push_str("./"),
                    1 => out.push_str("zz/../"),
                    2 => out.push('/'),
                    3 => out.push_str("%2e/"),
                    _ => {}
                }
                i += 1;
            } else if c == b'%' {
                // A reserved escape: lower-case its hex half the time.
                let esc = &plain[i..i + 3];
                out.push_str(&if next() % 2 == 0 { esc.to_ascii_lowercase() } else { esc.to_string() });
                i += 3;
            } else {
                if unreserved(c) && next() % 3 == 0 {
                    let e = format!("%{c:02X}");
                    out.push_str(&if next() % 2 == 0 { e.to_ascii_lowercase() } else { e });
                } else {
                    out.push(char::from(c));
                }
                i += 1;
            }
        }
        out
    }

    fn router() -> Router {
        let r = |path: &str, prefix: bool, feature: usize| Route { path: path.into(), prefix, feature, op: None };
        Router::new(vec![
            r("/v1/face/compare", false, 0),
            r("/v1/detect/", true, 1),
            r("/a/", true, 2),
            r("/a/b", false, 3),
            r("/", false, 4),
        ])
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn normal_form_is_a_fixed_point_without_dot_segments_or_double_slashes(p in any_path()) {
            if let Ok(q) = normalize(&p) {
                prop_assert!(q.starts_with('/'));
                prop_assert!(!q.contains("//") && !q.contains("/./") && !q.contains("/../"), "{q}");
                prop_assert!(!q.ends_with("/.") && !q.ends_with("/.."), "{q}");
                prop_assert!(matches!(normalize(&q), Ok(Cow::Borrowed(r)) if r == q), "not a fixed point: {q}");
            }
        }

        #[test]
        fn the_fast_check_agrees_with_the_full_normalization(p in any_path()) {
            if is_normal(p.as_bytes()) {
                prop_assert_eq!(normalize_slow(p.as_bytes()), Ok(p.clone()));
            }
        }

        #[test]
        fn every_spelling_routes_like_its_plain_spelling(
            plain in plain_path(),
            choices in proptest::collection::vec(any::<u8>(), 1..32),
        ) {
            prop_assert!(matches!(normalize(&plain), Ok(Cow::Borrowed(_))), "{plain} is normal");
            let spelling = respell(&plain, &choices);
            let q = normalize(&spelling);
            prop_assert_eq!(q.as_deref(), Ok(plain.as_str()), "{}", spelling);
            let r = router();
            let f = |p: &str| r.find(p).map(|x| x.feature);
            prop_assert_eq!(f(&q.unwrap_or_default()), f(&plain));
        }
    }
}

#[cfg(test)]
mod config_tests {
    use crate::config::Texts;
    use crate::snapshot::build;

    #[test]
    fn a_route_must_be_written_in_normal_form() {
        let main = |path: &str| {
            format!("[server]\nupstream = \"http://127.0.0.1:1\"\n[[routes]]\npath = {path:?}\nfeature = \"object-detection\"\n")
        };
        let catalog = include_str!("../config/catalog.toml");
        let ents = r#"{"tenants": {}}"#;
        assert!(build(&Texts::in_memory(main("/v1/detect/*"), catalog, ents), 1).is_ok());
        for (path, says) in [
            ("/v1/x/../detect/*", r#"write "/v1/detect/*""#),
            ("/v1//detect", r#"write "/v1/detect""#),
            ("/v1/%64etect", r#"write "/v1/detect""#),
            ("/v1/a%2fb", "encoded /"),
        ] {
            let e = build(&Texts::in_memory(main(path), catalog, ents), 1).err().expect(path).to_string();
            assert!(e.contains("routes[0].path") && e.contains(says), "{path}: {e}");
        }
    }
}
