//! One test suite for every store backend (issue 12): each behaviour of the interfaces is a
//! generic async function over `S: Store`, and [`store_suite!`] instantiates all of them for one
//! backend. A backend is added with one macro line at the end of this file:
//!
//! ```ignore
//! store_suite!(redis_backend, redis_fixture().await);
//! ```
//!
//! where the expression yields `(Arc<S>, guard)`: the store and whatever must outlive the test
//! (a temp dir, a redis-server process). Every test uses tenants of its own (a fresh random
//! name), so a shared server needs no flushing between tests. Tests never depend on timing
//! beyond a GCRA emission interval of one second, and bound their work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::config::gateway::ImageOp;

/// A tenant name no other test (or earlier run against the same server) uses.
fn fresh_tenant(what: &str) -> TenantKey<'static> {
    static N: AtomicU64 = AtomicU64::new(0);
    let ids = RequestIds::new();
    let name = format!("{what}-{:x}-{}", ids.next().0 >> 64, N.fetch_add(1, Ordering::Relaxed));
    let (local, name) = crate::intern::tenant(&name);
    TenantKey { name, local }
}

fn bucket(t: TenantKey<'static>, feature: &str) -> BucketKey<'static> {
    let (f, name) = crate::intern::feature(feature);
    BucketKey { tenant: t.name, bucket: name, local: crate::intern::pair(t.local, f) }
}

fn package(t: TenantKey<'static>, id: &str, points: i64) -> Candidate<'static> {
    let (p, id) = crate::intern::package(id);
    Candidate { id, points, local: crate::intern::pair(t.local, p) }
}

#[test]
fn request_ids_are_unique_and_share_the_process_nonce() {
    let ids = RequestIds::new();
    let (a, b) = (ids.next(), ids.next());
    assert_ne!(a, b);
    assert_eq!(a.0 >> 64, b.0 >> 64);
    assert_ne!(RequestIds::new().next().0 >> 64, a.0 >> 64, "another process (or generator) draws another nonce");
    assert_eq!(format!("{a}").len(), 32);
    // Threads draw from blocks of the same counter: no two ids alike, across threads and
    // generators (two generators interleaved on one thread each keep their own block).
    let other = RequestIds::new();
    let all: Vec<RequestId> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| (0..1000).flat_map(|_| [ids.next(), other.next()]).collect::<Vec<_>>()))
            .collect();
        handles.into_iter().flat_map(|h| h.join().expect("thread")).collect()
    });
    let unique: std::collections::HashSet<RequestId> = all.iter().copied().collect();
    assert_eq!(unique.len(), all.len(), "every id drawn once");
}

const LEASE: Duration = Duration::from_secs(60);

pub async fn admit_takes_depth_then_throttles_and_refund_gives_back_one_token<S: Store + 'static>(s: Arc<S>) {
    let t = fresh_tenant("rate");
    let key = bucket(t, "object-detection");
    // One token per second: nothing refills during the test.
    let q = Quota { limit: 1, depth: 3 };
    for want in [2, 1, 0] {
        match s.admit(key, q).await.unwrap() {
            Admit::Allowed { remaining, .. } => assert_eq!(remaining, want),
            other => panic!("expected allowed, got {other:?}"),
        }
    }
    match s.admit(key, q).await.unwrap() {
        Admit::Throttled { retry_after } => assert!(retry_after <= Duration::from_secs(1), "{retry_after:?}"),
        other => panic!("expected throttled, got {other:?}"),
    }
    let ids = RequestIds::new();
    s.refund(key, q, ids.next()).await.unwrap();
    assert!(matches!(s.admit(key, q).await.unwrap(), Admit::Allowed { remaining: 0, .. }), "one token back");
    assert!(matches!(s.admit(key, q).await.unwrap(), Admit::Throttled { .. }), "and only one");
    // Another shape's refund leaves this bucket alone.
    s.refund(key, Quota { limit: 2, depth: 6 }, ids.next()).await.unwrap();
    assert!(matches!(s.admit(key, q).await.unwrap(), Admit::Throttled { .. }));
    // A new shape is a fresh, full bucket.
    let q2 = Quota { limit: 1, depth: 5 };
    assert!(matches!(s.admit(key, q2).await.unwrap(), Admit::Allowed { remaining: 4, .. }));
    // Another tenant's bucket is its own.
    let other = bucket(fresh_tenant("rate"), "object-detection");
    assert!(matches!(s.admit(other, q).await.unwrap(), Admit::Allowed { remaining: 2, .. }));
}

/// A peek reads the bucket as it is and takes nothing (SPEC §4: the fields of a refusal decided
/// before admission); a bucket of another shape, or none, reads full.
pub async fn peek_reads_the_bucket_and_takes_nothing<S: Store + 'static>(s: Arc<S>) {
    let key = bucket(fresh_tenant("peek"), "object-detection");
    // One token per second: nothing refills during the test (reset rounds the second up).
    let q = Quota { limit: 1, depth: 3 };
    assert_eq!(s.peek(key, q).await.unwrap(), RateState { remaining: 3, reset_secs: 0 }, "no bucket: full");
    assert!(matches!(s.admit(key, q).await.unwrap(), Admit::Allowed { remaining: 2, .. }));
    for _ in 0..5 {
        assert_eq!(s.peek(key, q).await.unwrap(), RateState { remaining: 2, reset_secs: 1 });
    }
    assert_eq!(s.peek(key, Quota { limit: 2, depth: 6 }).await.unwrap(), RateState { remaining: 6, reset_secs: 0 });
    assert!(matches!(s.admit(key, q).await.unwrap(), Admit::Allowed { remaining: 1, .. }), "nothing taken");
    assert!(matches!(s.admit(key, q).await.unwrap(), Admit::Allowed { remaining: 0, .. }));
    assert_eq!(s.peek(key, q).await.unwrap(), RateState { remaining: 0, reset_secs: 3 });
    assert!(matches!(s.admit(key, q).await.unwrap(), Admit::Throttled { .. }));
    assert_eq!(s.peek(key, q).await.unwrap(), RateState { remaining: 0, reset_secs: 3 }, "after a 429 too");
}

pub async fn refund_on_a_full_bucket_keeps_it_at_depth<S: Store + 'static>(s: Arc<S>) {
    let key = bucket(fresh_tenant("rate"), "f");
    let q = Quota { limit: 1, depth: 2 };
    let ids = RequestIds::new();
    s.refund(key, q, ids.next()).await.unwrap();
    s.refund(key, q, ids.next()).await.unwrap();
    let mut admitted = 0;
    for _ in 0..5 {
        if matches!(s.admit(key, q).await.unwrap(), Admit::Allowed { .. }) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2, "never fuller than its depth");
}

pub async fn reserve_holds_the_whole_factor_and_commit_or_release_happen_exactly_once<S: Store + 'static>(s: Arc<S>) {
    let ids = RequestIds::new();
    let t = fresh_tenant("bal");
    let (a, b) = (package(t, "a", 1_000_000), package(t, "b", 1_000_000));
    let cands = [a, b];
    let want = 400_000;
    let (r1, r2, r3) = (ids.next(), ids.next(), ids.next());
    assert_eq!(s.reserve(t, &cands, want, r1, LEASE).await.unwrap(), Some(0));
    assert_eq!(s.reserve(t, &cands, want, r2, LEASE).await.unwrap(), Some(0));
    assert_eq!(s.reserve(t, &cands, want, r3, LEASE).await.unwrap(), Some(1), "0.2 left in a < 0.4");
    assert_eq!(s.reserve(t, &cands, want, r1, LEASE).await.unwrap(), Some(0), "idempotent: same hold");
    assert_eq!(s.consumed(t, a).await.unwrap(), 0, "holds are not consumption");
    assert_eq!(s.commit(t, r1).await.unwrap(), Some(400_000));
    assert_eq!(s.commit(t, r1).await.unwrap(), None, "a second commit is a no-op");
    s.release(t, r2).await.unwrap();
    s.release(t, r2).await.unwrap();
    assert_eq!(s.commit(t, r2).await.unwrap(), None, "released: nothing to commit");
    // r2's share is back: a holds 0.6 again, 0.4 of it reservable.
    let r4 = ids.next();
    assert_eq!(s.reserve(t, &cands, want, r4, LEASE).await.unwrap(), Some(0));
    assert_eq!(s.commit(t, r4).await.unwrap(), Some(800_000));
    s.release(t, r4).await.unwrap();
    assert_eq!(s.consumed(t, a).await.unwrap(), 800_000, "release after commit gives nothing back");
    s.release_in_background(t, r3);
    // The background release is synchronous locally, spawned elsewhere: wait a bounded time.
    let r5 = ids.next();
    let mut got = None;
    for _ in 0..100 {
        got = s.reserve(t, &[b], 1_000_000, r5, LEASE).await.unwrap();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(got, Some(0), "r3's hold on b was given back");
    assert_eq!(s.reserve(t, &[a], 200_001, ids.next(), LEASE).await.unwrap(), None, "0.2 left: not the whole 0.200001");
    assert_eq!(s.consumed(t, package(t, "never-used", 5)).await.unwrap(), 0);
}

pub async fn expired_holds_are_swept_back<S: Store + 'static>(s: Arc<S>) {
    let ids = RequestIds::new();
    let t = fresh_tenant("sweep");
    let a = package(t, "a", 1_000_000);
    let r = ids.next();
    assert_eq!(s.reserve(t, &[a], 1_000_000, r, Duration::from_millis(1)).await.unwrap(), Some(0));
    assert_eq!(s.reserve(t, &[a], 1, ids.next(), LEASE).await.unwrap(), None, "held");
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert!(s.sweep().await.unwrap() >= 1);
    assert_eq!(s.commit(t, r).await.unwrap(), None, "a swept hold cannot be committed");
    assert_eq!(s.reserve(t, &[a], 1_000_000, ids.next(), LEASE).await.unwrap(), Some(0), "given back");
}

pub async fn take_up_to_is_greedy_in_order_and_idempotent<S: Store + 'static>(s: Arc<S>) {
    let ids = RequestIds::new();
    let t = fresh_tenant("take");
    let cands = [package(t, "a", 300), package(t, "b", 500), package(t, "c", 1_000)];
    let r = ids.next();
    let got = s.take_up_to(t, &cands, 700, r).await.unwrap();
    assert_eq!(got, vec![Taken { taken: 300, consumed: 300 }, Taken { taken: 400, consumed: 400 }, Taken::default()]);
    assert_eq!(s.take_up_to(t, &cands, 700, r).await.unwrap(), got, "a repeat answers the same and takes nothing");
    assert_eq!(s.consumed(t, cands[1]).await.unwrap(), 400);
    // Holds of calls in flight are not taken.
    let h = ids.next();
    assert_eq!(s.reserve(t, &cands[2..], 900, h, LEASE).await.unwrap(), Some(0));
    let got = s.take_up_to(t, &cands, 10_000, ids.next()).await.unwrap();
    assert_eq!(got.iter().map(|x| x.taken).collect::<Vec<_>>(), vec![0, 100, 100]);
    assert_eq!(s.take_up_to(t, &cands, 0, ids.next()).await.unwrap().iter().map(|x| x.taken).sum::<i64>(), 0);
}

pub async fn add_usage_is_idempotent_per_request_and_payer<S: Store + 'static>(s: Arc<S>) {
    let ids = RequestIds::new();
    let t = fresh_tenant("usage");
    let (f, v) = (bucket(t, "license-plate-recognition"), bucket(t, "comprehensive-video-enhancement"));
    let m = "2026-03";
    let r = ids.next();
    let payg = UsageTo::Payer(PayerKind::Payg);
    assert_eq!(s.add_usage(f, m, payg, 1, CALL_CELL, r).await.unwrap(), 1);
    assert_eq!(s.add_usage(f, m, payg, 1, CALL_CELL, r).await.unwrap(), 1, "a repeat adds nothing");
    assert_eq!(s.add_usage(f, m, payg, 1, CALL_CELL, ids.next()).await.unwrap(), 2);
    // One video request adds to several payers under one id.
    let r = ids.next();
    let cell = "fps<=60,lines<=1440";
    s.add_usage(v, m, UsageTo::Payer(PayerKind::GeneralPackage), 60_000, CALL_CELL, r).await.unwrap();
    assert_eq!(s.add_usage(v, m, payg, 80_000, cell, r).await.unwrap(), 80_000);
    s.add_usage(v, m, UsageTo::Unpaid, 5, CALL_CELL, r).await.unwrap();
    s.add_usage(v, m, payg, 80_000, cell, r).await.unwrap();
    s.add_usage(v, "2026-04", payg, 7, cell, ids.next()).await.unwrap();
    let got = s.month(t, m).await.unwrap();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].feature, "comprehensive-video-enhancement", "sorted by feature id");
    assert_eq!(got[0].units, [0, 0, 60_000, 80_000, 0]);
    assert_eq!(got[0].payg.get(cell), Some(&80_000));
    assert_eq!(got[0].unpaid, 5);
    assert_eq!(got[1].units[PayerKind::Payg as usize], 2);
    assert_eq!(got[1].payg.get(CALL_CELL), Some(&2));
    assert!(s.month(fresh_tenant("usage"), m).await.unwrap().is_empty());
}

pub async fn mark_alerted_is_true_once<S: Store + 'static>(s: Arc<S>) {
    let t = fresh_tenant("alert");
    let p = package(t, "a", 10);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let s = s.clone();
            tokio::spawn(async move { s.mark_alerted(t, p).await.unwrap() })
        })
        .collect();
    let mut firsts = 0;
    for task in tasks {
        firsts += u32::from(task.await.unwrap());
    }
    assert_eq!(firsts, 1);
    assert!(!s.mark_alerted(t, p).await.unwrap());
    assert!(s.mark_alerted(t, package(t, "b", 10)).await.unwrap(), "per package");
}

pub async fn image_slots_cap_adds_and_settle_once<S: Store + 'static>(s: Arc<S>) {
    let ids = RequestIds::new();
    let t = fresh_tenant("img");
    let (a, b, c) = (ids.next(), ids.next(), ids.next());
    assert!(s.reserve_image_slot(t, 2, a).await.unwrap());
    assert!(s.reserve_image_slot(t, 2, b).await.unwrap());
    assert!(!s.reserve_image_slot(t, 2, c).await.unwrap(), "at capacity with two adds in flight");
    s.release_image_slot(t, b).await.unwrap();
    assert!(s.reserve_image_slot(t, 2, c).await.unwrap(), "b's slot came back");
    assert_eq!(s.settle_images(t, ImageOp::Add, a, None).await.unwrap(), 1);
    assert_eq!(s.settle_images(t, ImageOp::Add, a, None).await.unwrap(), 1, "idempotent");
    assert_eq!(s.settle_images(t, ImageOp::Add, c, None).await.unwrap(), 2);
    assert!(!s.reserve_image_slot(t, 2, ids.next()).await.unwrap(), "full");
    assert_eq!(s.settle_images(t, ImageOp::Delete, ids.next(), None).await.unwrap(), 1);
    assert_eq!(s.settle_images(t, ImageOp::Search, ids.next(), Some(7)).await.unwrap(), 7, "the reported count wins");
    assert_eq!(s.image_count(t).await.unwrap(), 7);
    for _ in 0..9 {
        s.settle_images(t, ImageOp::Delete, ids.next(), None).await.unwrap();
    }
    assert_eq!(s.image_count(t).await.unwrap(), 0, "never below zero");
}

pub async fn overrides_are_kept_once_and_sorted<S: Store + 'static>(s: Arc<S>) {
    let t = fresh_tenant("ov");
    let later = Override { qps: 50, from: 2_000, until: Some(3_000) };
    let first = Override { qps: 45, from: 1_000, until: None };
    s.put_override(t.name, "f", later.clone()).await.unwrap();
    s.put_override(t.name, "f", first.clone()).await.unwrap();
    s.put_override(t.name, "f", later.clone()).await.unwrap();
    let mine: Vec<_> = s.overrides().await.unwrap().into_iter().filter(|(tn, _, _)| tn == t.name).collect();
    assert_eq!(mine, vec![(t.name.to_string(), "f".to_string(), first), (t.name.to_string(), "f".to_string(), later)]);
}

/// Three holds of `want` on `p` in flight at once (those the package can take), then each
/// given back (one in four, picked by `salt`: an upstream error) or committed (a 2xx), counted
/// in `committed`.
async fn three_holds_settled<S: Store>(
    s: &S,
    t: TenantKey<'static>,
    p: Candidate<'static>,
    want: i64,
    ids: &RequestIds,
    salt: u64,
    committed: &AtomicU64,
) {
    let mut held = Vec::new();
    for _ in 0..3 {
        let id = ids.next();
        if s.reserve(t, &[p], want, id, LEASE).await.unwrap().is_some() {
            held.push(id);
        }
        tokio::task::yield_now().await;
    }
    for (k, id) in held.into_iter().enumerate() {
        if (salt + k as u64).is_multiple_of(4) {
            s.release(t, id).await.unwrap();
        } else if s.commit(t, id).await.unwrap().is_some() {
            committed.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Money invariant: concurrent reserve + commit/release never spend more than a package holds,
/// and consumption is exactly the committed holds.
pub async fn concurrent_reservations_never_overspend<S: Store + 'static>(s: Arc<S>) {
    let t = fresh_tenant("race");
    let p = package(t, "a", 10_000_000);
    let committed = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..8u64)
        .map(|th| {
            let (s, committed) = (s.clone(), committed.clone());
            tokio::spawn(async move {
                let ids = RequestIds::new();
                for i in 0..14u64 {
                    // Three holds in flight per task at once: the whole-factor check must count
                    // every hold, not only consumption.
                    three_holds_settled(&*s, t, p, 200_000, &ids, i + th, &committed).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let consumed = s.consumed(t, p).await.unwrap();
    assert!(consumed <= 10_000_000, "{consumed}");
    assert_eq!(consumed, committed.load(Ordering::SeqCst) as i64 * 200_000);
    // Demand (~250 commits) exceeds the 50 the package pays, but whether the racing tasks spent
    // it all depends on scheduling (a release at the very end gives points back that nobody asks
    // for again): what is left must still be spendable, exactly, so no hold leaked.
    let ids = RequestIds::new();
    loop {
        let id = ids.next();
        if s.reserve(t, &[p], 200_000, id, LEASE).await.unwrap().is_none() {
            break;
        }
        assert!(s.commit(t, id).await.unwrap().is_some());
    }
    assert_eq!(s.consumed(t, p).await.unwrap(), 10_000_000, "all of it is spendable and spent");
}

/// Money invariant: concurrent video takes never take more than the packages hold, and what each
/// caller was told it took sums to the consumption.
pub async fn concurrent_takes_never_overdraw<S: Store + 'static>(s: Arc<S>) {
    let t = fresh_tenant("takes");
    let cands: Vec<Candidate<'static>> = (0..20).map(|i| package(t, &format!("p{i}"), 150_000)).collect();
    let cands = Arc::new(cands);
    let tasks: Vec<_> = (0..8u64)
        .map(|th| {
            let (s, cands) = (s.clone(), cands.clone());
            tokio::spawn(async move {
                let ids = RequestIds::new();
                let mut total = 0i64;
                for i in 0..30u64 {
                    let want = 50_000 * (((i + th) % 4) as i64 + 1);
                    let got = s.take_up_to(t, &cands, want, ids.next()).await.unwrap();
                    let sum: i64 = got.iter().map(|x| x.taken).sum();
                    assert!(sum <= want);
                    total += sum;
                }
                total
            })
        })
        .collect();
    let mut told = 0;
    for task in tasks {
        told += task.await.unwrap();
    }
    let mut consumed = 0;
    for c in cands.iter() {
        let n = s.consumed(t, *c).await.unwrap();
        assert!(n <= c.points, "{} consumed {n} of {}", c.id, c.points);
        consumed += n;
    }
    assert_eq!(consumed, told, "every micro-point taken was reported, once");
    assert_eq!(consumed, 20 * 150_000, "demand exceeds supply: every package is spent");
}

/// Money invariant: per-call holds and video takes on the same packages at once never spend
/// more than a package holds: a take leaves alone the points that calls in flight hold, and a
/// hold counts what takes consumed. Consumption is exactly the committed holds plus what each
/// take said it took, and what is left is all there (no hold leaked).
pub async fn concurrent_holds_and_takes_on_one_package_never_overdraw<S: Store + 'static>(s: Arc<S>) {
    // With takes that ignored the holds, one round in three or so still passed on 2 cores.
    for _ in 0..5 {
        holds_and_takes_round(s.clone()).await;
    }
}

async fn holds_and_takes_round<S: Store + 'static>(s: Arc<S>) {
    const FACTOR: i64 = 200_000;
    let t = fresh_tenant("holds-takes");
    // `p` is what both kinds of call spend; takes go on to `q` for the rest.
    let (p, q) = (package(t, "p", 3_000_000), package(t, "q", 1_000_000));
    let (committed, taken_from_p) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Let go at once: the local store never suspends, so tasks started one by one could each
    // finish before the next began.
    let start = Arc::new(tokio::sync::Barrier::new(8));
    let tasks: Vec<_> = (0..8u64)
        .map(|th| {
            let (s, committed, taken_from_p, start) =
                (s.clone(), committed.clone(), taken_from_p.clone(), start.clone());
            tokio::spawn(async move {
                let ids = RequestIds::new();
                start.wait().await;
                for i in 0..30u64 {
                    if th % 2 == 0 {
                        // Per-call features: three holds of the whole factor in flight at once,
                        // then each committed (2xx) or given back (upstream error), while other
                        // tasks take.
                        three_holds_settled(&*s, t, p, FACTOR, &ids, i + th, &committed).await;
                    } else {
                        // A video settlement: whatever `p` holds beyond the holds in flight, the
                        // rest from `q`.
                        let want = 70_000 * (((i + th) % 5) as i64 + 1);
                        let got = s.take_up_to(t, &[p, q], want, ids.next()).await.unwrap();
                        assert!(got.iter().map(|x| x.taken).sum::<i64>() <= want);
                        taken_from_p.fetch_add(got[0].taken as u64, Ordering::SeqCst);
                    }
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let consumed = s.consumed(t, p).await.unwrap();
    assert!(consumed <= p.points, "consumed {consumed} of {}", p.points);
    let said = committed.load(Ordering::SeqCst) as i64 * FACTOR + taken_from_p.load(Ordering::SeqCst) as i64;
    assert_eq!(consumed, said, "committed holds + what the takes said they took");
    // No hold leaked: a take of everything gets exactly what is left.
    let rest = s.take_up_to(t, &[p], i64::MAX / 2, RequestIds::new().next()).await.unwrap();
    assert_eq!(rest[0].taken, p.points - consumed, "what is left is all spendable");
    assert_eq!(s.consumed(t, p).await.unwrap(), p.points);
}

/// Money invariant: each request's usage counts once however many times, from however many
/// tasks, its settlement is replayed, while other requests settle beside it. Consecutive ids
/// (which the local store keeps 8 to a marker entry) are settled by different tasks at once.
pub async fn concurrent_usage_counts_each_request_once<S: Store + 'static>(s: Arc<S>) {
    const IDS: usize = 256;
    const TASKS: usize = 8;
    let t = fresh_tenant("usage-race");
    let f = bucket(t, "license-plate-recognition");
    let ids = RequestIds::new();
    let all: Arc<Vec<RequestId>> = Arc::new((0..IDS).map(|_| ids.next()).collect());
    let tasks: Vec<_> = (0..TASKS)
        .map(|k| {
            let (s, all) = (s.clone(), all.clone());
            tokio::spawn(async move {
                // Each task settles every TASKS-th id twice, and replays its neighbour's.
                for (i, id) in all.iter().enumerate() {
                    if i % TASKS == k || i % TASKS == (k + 1) % TASKS {
                        for _ in 0..2 {
                            let to = UsageTo::Payer(PayerKind::Payg);
                            s.add_usage(f, "2026-03", to, 1, CALL_CELL, *id).await.unwrap();
                        }
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let got = s.month(t, "2026-03").await.unwrap();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].units[PayerKind::Payg as usize], IDS as i64, "each of {IDS} requests once");
    assert_eq!(got[0].payg.get(CALL_CELL), Some(&(IDS as i64)));
}

/// Instantiates every behaviour for one backend: `store_suite!(name, fixture_expr)`, where the
/// expression (evaluated inside the test's runtime) yields `(Arc<S>, guard)`.
#[macro_export]
macro_rules! store_suite {
    ($name:ident, $fixture:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $crate::store_suite!(@tests $fixture;
                admit_takes_depth_then_throttles_and_refund_gives_back_one_token,
                refund_on_a_full_bucket_keeps_it_at_depth,
                peek_reads_the_bucket_and_takes_nothing,
                reserve_holds_the_whole_factor_and_commit_or_release_happen_exactly_once,
                expired_holds_are_swept_back,
                take_up_to_is_greedy_in_order_and_idempotent,
                add_usage_is_idempotent_per_request_and_payer,
                mark_alerted_is_true_once,
                image_slots_cap_adds_and_settle_once,
                overrides_are_kept_once_and_sorted,
                concurrent_reservations_never_overspend,
                concurrent_takes_never_overdraw,
                concurrent_holds_and_takes_on_one_package_never_overdraw,
                concurrent_usage_counts_each_request_once,
            );
        }
    };
    (@tests $fixture:expr; $($t:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $t() {
                let (store, _guard) = $fixture;
                $crate::store::tests::$t(store).await;
            }
        )*
    };
}

/// The local backend on a fresh redb ledger in a temp dir (batched, the system clock).
pub fn local_fixture() -> (Arc<local::LocalStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ledger = crate::ledger::RedbLedger::open(dir.path()).unwrap();
    let store = local::LocalStore::open(
        Box::new(ledger),
        crate::config::gateway::Durability::Batched,
        Duration::from_millis(5),
        Duration::from_secs(2),
        Arc::new(crate::metrics::Metrics::new(true)),
        crate::clock::SystemClock::shared(),
        &|_| false,
    )
    .unwrap();
    (store, dir)
}

store_suite!(local_backend, local_fixture());
store_suite!(local_via_stores_enum, {
    let (s, dir) = local_fixture();
    (Arc::new(Stores::Local(s)), dir)
});
store_suite!(
    redis_single_server,
    match redis::tests::suite_fixture("store_suite", false).await {
        Some(f) => f,
        None => return,
    }
);
store_suite!(
    redis_cluster_3_nodes,
    match redis::tests::suite_fixture("store_suite", true).await {
        Some(f) => f,
        None => return,
    }
);
store_suite!(
    redis_via_stores_enum,
    match redis::tests::suite_fixture("store_suite", false).await {
        Some((s, keep)) => (Arc::new(Stores::Redis((*s).clone())), keep),
        None => return,
    }
);
