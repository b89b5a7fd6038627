//! Stable small ids and `'static` names for tenants and features. Token buckets and metric
//! handles are keyed by these ids, so they survive a reload that keeps their tenant and feature.
//! Ids are never reused; each distinct name is stored once for the life of the process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// An id no other call in this process gets: what tells one instance (a snapshot, a store, a
/// metrics registry) from another in a thread's memo of its last answer.
pub fn instance_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The key of a (tenant, feature) or (tenant, package) pair: its two ids, mixed (murmur3's
/// finalizer, a bijection: still one key per pair). Maps of pairs hash with `FxHasher`, which
/// multiplies: the low 32 bits of its hash, and so a `DashMap`'s shard, would depend on the
/// feature alone, putting every tenant of a feature behind one shard lock that all cores write.
#[inline]
pub fn pair(tenant: u32, feature: u32) -> u64 {
    let mut x = (u64::from(tenant) << 32) | u64::from(feature);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// The shard `DashMap` 6 puts a hash in, of `shards` (a power of two).
    fn shard(hash: u64, shards: u32) -> u64 {
        (hash << 7) >> (64 - shards.trailing_zeros())
    }

    #[test]
    fn the_tenants_of_one_feature_spread_over_the_shards_of_a_map_of_pairs() {
        let fx = rustc_hash::FxBuildHasher;
        for shards in [8u32, 64] {
            let mut per_shard = vec![0u32; shards as usize];
            let mut per_shard_month = vec![0u32; shards as usize];
            for t in 0..10_000 {
                per_shard[shard(fx.hash_one(pair(t, 3)), shards) as usize] += 1;
                per_shard_month[shard(fx.hash_one((pair(t, 3), 24_323u32)), shards) as usize] += 1;
            }
            for counts in [per_shard, per_shard_month] {
                let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                let even = 10_000 / shards;
                assert!(*min > even / 2 && *max < even * 2, "{shards} shards: {counts:?}");
            }
        }
        // Still one key per pair.
        let keys: std::collections::HashSet<u64> = (0..300)
            .flat_map(|t| (0..300).map(move |f| pair(t, f)))
            .chain([pair(u32::MAX, u32::MAX), pair(0, 0)])
            .collect();
        assert_eq!(keys.len(), 300 * 300 + 1);
    }
}
