//! One immutable, validated view of all configuration: routes, catalog and entitlements. The
//! gateway holds it in a single `ArcSwap`; a request reads everything it needs through one load.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::catalog::Catalog;
use crate::config::entitlements::Tenant;
use crate::config::gateway::{Route, Settings};

pub struct Sources {
    pub generation: u64,
    pub settings: Settings,
    pub routes: Vec<Route>,
    pub catalog: Catalog,
    pub tenants: Vec<Tenant>,
}

/// Routes in configuration order; first match wins. Exact paths are found by hash, prefixes by a
/// scan that stops at the first exact match's position.
pub struct Router {
    routes: Vec<Route>,
    exact: HashMap<String, usize, FxBuildHasher>,
    prefixes: Vec<usize>,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Self {
        let mut exact = HashMap::with_hasher(FxBuildHasher);
        let mut prefixes = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            if r.prefix {
                prefixes.push(i);
            } else {
                exact.entry(r.path.clone()).or_insert(i);
            }
        }
        Router { routes, exact, prefixes }
    }

    pub fn find(&self, path: &str) -> Option<&Route> {
        let exact = self.exact.get(path).copied();
        let limit = exact.unwrap_or(usize::MAX);
        let prefix = self
            .prefixes
            .iter()
            .copied()
            .take_while(|&i| i < limit)
            .find(|&i| path.starts_with(self.routes[i].path.as_str()));
        prefix.or(exact).map(|i| &self.routes[i])
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

pub struct Snapshot {
    pub generation: u64,
    pub settings: Settings,
    pub router: Router,
    pub catalog: Catalog,
    pub tenants: Vec<Tenant>,
    /// sha256(API key) → index into `tenants`.
    pub keys: HashMap<[u8; 32], usize, FxBuildHasher>,
    pub tenant_index: HashMap<String, usize>,
    /// Keys already verified against `keys`, so a known key costs a hash lookup, not a SHA-256.
    /// Only keys that matched are added (unknown keys cannot grow it), at most [`VERIFIED_CAP`];
    /// it starts empty with every snapshot, so a key removed by a reload stops working at once.
    verified: DashMap<Box<[u8]>, usize, FxBuildHasher>,
    verified_len: AtomicUsize,
    /// Tells this snapshot from any other in a thread's memo of its last key ([`Snapshot::identify`]).
    id: u64,
}

/// How many verified keys a snapshot remembers; beyond that, keys are hashed on every request.
pub const VERIFIED_CAP: usize = 1 << 20;

impl Snapshot {
    pub fn new(s: Sources) -> Self {
        let mut keys = HashMap::with_hasher(FxBuildHasher);
        let mut tenant_index = HashMap::new();
        for (i, t) in s.tenants.iter().enumerate() {
            tenant_index.insert(t.name.clone(), i);
            for k in &t.api_keys {
                keys.insert(*k, i);
            }
        }
        Snapshot {
            generation: s.generation,
            settings: s.settings,
            router: Router::new(s.routes),
            catalog: s.catalog,
            tenants: s.tenants,
            keys,
            tenant_index,
            verified: DashMap::with_hasher(FxBuildHasher),
            verified_len: AtomicUsize::new(0),
            id: crate::intern::instance_id(),
        }
    }

    /// The tenant an API key belongs to (SPEC §3.3: entitlements store the key's SHA-256).
    ///
    /// The thread's last verified key (of this snapshot) answers without the map: a `DashMap`
    /// read takes its shard's lock, a write to a cache line that every core serving the same
    /// key writes too.
    pub fn identify(&self, key: &[u8]) -> Option<usize> {
        thread_local! {
            /// (snapshot id, key, tenant index) of the thread's last verified key.
            static LAST: RefCell<(u64, Vec<u8>, usize)> = const { RefCell::new((u64::MAX, Vec::new(), 0)) };
        }
        LAST.with(|last| {
            let mut last = last.borrow_mut();
            if last.0 == self.id && same_key(&last.1, key) {
                return Some(last.2);
            }
            let i = self.verify(key)?;
            last.0 = self.id;
            last.1.clear();
            last.1.extend_from_slice(key);
            last.2 = i;
            Some(i)
        })
    }

    /// A key's tenant through the verified keys, else its SHA-256 (then remembered).
    fn verify(&self, key: &[u8]) -> Option<usize> {
        if let Some(i) = self.verified.get(key) {
            return Some(*i);
        }
        let hash: [u8; 32] = Sha256::digest(key).into();
        let i = *self.keys.get(&hash)?;
        if self.verified_len.load(Ordering::Relaxed) < VERIFIED_CAP && self.verified.insert(key.into(), i).is_none() {
            self.verified_len.fetch_add(1, Ordering::Relaxed);
        }
        Some(i)
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenant_index.get(name).map(|&i| &self.tenants[i])
    }
}

/// Whether two API keys are equal, in a time that depends on their lengths only: the thread's
/// last key may be another tenant's, and a comparison that stops at the first differing byte
/// would tell a caller how much of it they guessed. A length is no secret (a key's length says
/// nothing of its bytes). Eight bytes at a time (the last 0-7 one by one), each step's
/// difference through `black_box` so that the compiler cannot stop early; the verdict through
/// `subtle`, as the admin token's.
/// (`subtle`'s own slice comparison takes ~15 instructions a byte: ~600 for a 40-byte key.)
fn same_key(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let ((aw, at), (bw, bt)) = (a.as_chunks::<8>(), b.as_chunks::<8>());
    let mut diff = 0u64;
    for (x, y) in aw.iter().zip(bw) {
        diff = std::hint::black_box(diff | (u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y)));
    }
    for (x, y) in at.iter().zip(bt) {
        diff = std::hint::black_box(diff | u64::from(x ^ y));
    }
    diff.ct_eq(&0).into()
}

/// Parses and validates all three texts into a runtime snapshot (not yet published).
pub fn build(texts: &crate::config::Texts, generation: u64) -> Result<Snapshot, crate::config::ConfigErrors> {
    let mut errors = Vec::new();
    let main: Option<crate::config::gateway::RawGateway> =
        crate::config::parse_toml(&texts.main_name, &texts.main, &mut errors);
    let raw_catalog: Option<crate::catalog::RawCatalog> =
        crate::config::parse_toml(&texts.catalog_name, &texts.catalog, &mut errors);
    let raw_ents: Option<crate::config::entitlements::RawEntitlements> =
        crate::config::parse_json(&texts.entitlements_name, &texts.entitlements, &mut errors);

    let catalog: Option<Catalog> = raw_catalog
        .map(|c| crate::catalog::compile(c, &mut crate::config::Errs { file: &texts.catalog_name, out: &mut errors }));
    // Routes and entitlements are checked against the catalog; each file that parsed is checked
    // even when another did not (check prints every error: a typo in turnstile.toml must not hide
    // a cap exceeded in entitlements.json).
    let Some(catalog) = catalog else {
        return Err(crate::config::ConfigErrors(errors));
    };
    let mut settings = main.and_then(|main| {
        crate::config::gateway::compile(
            main,
            &catalog,
            &mut crate::config::Errs { file: &texts.main_name, out: &mut errors },
        )
    });
    if let (Some((s, _)), Some(base)) = (settings.as_mut(), texts.base_dir.as_ref()) {
        if s.ledger_dir.is_relative() {
            s.ledger_dir = base.join(&s.ledger_dir);
        }
    }
    let tenants = raw_ents.map(|e| {
        crate::config::entitlements::compile(
            e,
            &catalog,
            &mut crate::config::Errs { file: &texts.entitlements_name, out: &mut errors },
        )
    });
    if !errors.is_empty() {
        return Err(crate::config::ConfigErrors(errors));
    }
    let (Some((settings, routes)), Some(tenants)) = (settings, tenants) else {
        return Err(crate::config::ConfigErrors(errors));
    };
    Ok(Snapshot::new(Sources { generation, settings, routes, catalog, tenants }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(path: &str, prefix: bool, feature: usize) -> Route {
        Route { path: path.into(), prefix, feature, op: None }
    }

    /// A snapshot whose tenants each have one API key: (tenant, key).
    fn with_keys(keys: &[(&str, &str)]) -> Snapshot {
        let tenants: Vec<String> = keys
            .iter()
            .map(|(t, k)| {
                format!(r#""{t}": {{"api_keys": ["{}"], "services": ["text_recognition"]}}"#, crate::hash_key(k))
            })
            .collect();
        let texts = crate::config::Texts::in_memory(
            "[server]\nupstream = \"http://127.0.0.1:1\"\n",
            include_str!("../config/catalog.toml"),
            format!(r#"{{"tenants": {{{}}}}}"#, tenants.join(",")),
        );
        build(&texts, 1).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_threads_last_key_answers_only_for_its_own_snapshot() {
        let a = with_keys(&[("alpha", "k1"), ("beta", "k2")]);
        // A reload gave k1 to another tenant, then removed it.
        let b = with_keys(&[("gamma", "k9"), ("beta", "k1")]);
        let c = with_keys(&[("alpha", "k2")]);
        let name = |s: &Snapshot, key: &str| s.identify(key.as_bytes()).map(|i| s.tenants[i].name.clone());
        for _ in 0..3 {
            assert_eq!(name(&a, "k1").as_deref(), Some("alpha"));
            assert_eq!(name(&a, "k1").as_deref(), Some("alpha"), "the thread's last key, again");
            assert_eq!(name(&b, "k1").as_deref(), Some("beta"), "the same key in another snapshot");
            assert_eq!(name(&c, "k1"), None, "a key the snapshot does not have");
            assert_eq!(name(&c, "k2").as_deref(), Some("alpha"));
            assert_eq!(name(&a, "k2").as_deref(), Some("beta"));
            for near in ["k", "k12", "K1", ""] {
                assert_eq!(name(&a, near), None, "{near:?} is not k1");
            }
        }
        // Another thread has its own last key.
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(name(&b, "k1").as_deref(), Some("beta")));
        });
        assert_eq!(name(&a, "k1").as_deref(), Some("alpha"));
    }

    proptest::proptest! {
        /// `same_key` is `==`: for keys of 0-80 bytes, equal ones, ones that differ in one
        /// byte (anywhere, a word's last byte included), and ones of another length.
        #[test]
        fn same_key_is_equality(
            a in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
            at in 0usize..80,
            flip in 1u8..=255,
            other in proptest::collection::vec(proptest::num::u8::ANY, 0..80),
        ) {
            proptest::prop_assert!(same_key(&a, &a.clone()));
            if !a.is_empty() {
                let mut b = a.clone();
                b[at % a.len()] ^= flip;
                proptest::prop_assert!(!same_key(&a, &b));
                proptest::prop_assert!(!same_key(&a, &a[..a.len() - 1]));
            }
            proptest::prop_assert_eq!(same_key(&a, &other), a == other);
        }
    }

    #[test]
    fn first_match_wins_across_exact_and_prefix() {
        let r = Router::new(vec![
            route("/v1/a/", true, 0),
            route("/v1/a/x", false, 1),
            route("/v1/b", false, 2),
            route("/v1/", true, 3),
        ]);
        assert_eq!(r.find("/v1/a/x").map(|r| r.feature), Some(0), "the earlier prefix wins");
        assert_eq!(r.find("/v1/b").map(|r| r.feature), Some(2));
        assert_eq!(r.find("/v1/c").map(|r| r.feature), Some(3));
        assert_eq!(r.find("/v1").map(|r| r.feature), None, "a prefix /v1/* does not match /v1");
        assert!(r.find("/other").is_none());
    }
}
