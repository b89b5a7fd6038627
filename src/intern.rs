//! Stable small ids and `'static` names for tenants and features. Token buckets and metric
//! handles are keyed by these ids, so they survive a reload that keeps their tenant and feature.
//! Ids are never reused; each distinct name is stored once for the life of the process.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex, PoisonError};

#[derive(Default)]
struct Table {
    ids: HashMap<&'static str, u32>,
}

impl Table {
    fn get(&mut self, name: &str) -> (u32, &'static str) {
        if let Some((&k, &id)) = self.ids.get_key_value(name) {
            return (id, k);
        }
        let id = u32::try_from(self.ids.len()).unwrap_or(u32::MAX);
        let k: &'static str = Box::leak(name.to_owned().into_boxed_str());
        self.ids.insert(k, id);
        (id, k)
    }
}

static TENANTS: LazyLock<Mutex<Table>> = LazyLock::new(Default::default);
static FEATURES: LazyLock<Mutex<Table>> = LazyLock::new(Default::default);
static PACKAGES: LazyLock<Mutex<Table>> = LazyLock::new(Default::default);

/// Only called while building a snapshot, never on the request path.
pub fn tenant(name: &str) -> (u32, &'static str) {
    TENANTS.lock().unwrap_or_else(PoisonError::into_inner).get(name)
}

pub fn feature(name: &str) -> (u32, &'static str) {
    FEATURES.lock().unwrap_or_else(PoisonError::into_inner).get(name)
}

/// A package id (ids are unique per tenant; the returned id is shared by all tenants using it).
pub fn package(id: &str) -> (u32, &'static str) {
    PACKAGES.lock().unwrap_or_else(PoisonError::into_inner).get(id)
}

/// The bucket key of a (tenant, feature) pair.
#[inline]
pub fn pair(tenant: u32, feature: u32) -> u64 {
    (u64::from(tenant) << 32) | u64::from(feature)
}
