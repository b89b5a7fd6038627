//! The Redis scripts and store against real Redis processes: a single `redis-server` and a
//! 3-node Redis Cluster (each test starts its own, on free loopback ports). Without
//! `redis-server` on PATH every test prints a notice and passes, unless `CI=true`.

use super::harness::{Opts, RedisCluster, RedisServer};
use super::*;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// What keeps the Redis processes alive for the test's length.
#[allow(dead_code)]
pub(crate) enum Keep {
    One(RedisServer),
    Cluster(RedisCluster),
}

fn opts() -> RedisOpts {
    RedisOpts {
        key_prefix: "tp".into(),
        op_timeout: Duration::from_secs(2),
        done_ttl: Duration::from_secs(60),
        replay_done_ttl: Duration::from_secs(600),
        hold_lease: Duration::from_millis(300),
    }
}

async fn single(test: &str) -> Option<(RedisStore, Keep)> {
    let s = RedisServer::start(test, Opts::default())?;
    let store = RedisStore::connect(&[s.url()], opts()).await.expect("connect");
    Some((store, Keep::One(s)))
}

async fn cluster(test: &str) -> Option<(RedisStore, Keep)> {
    let c = RedisCluster::start(test)?;
    let store = RedisStore::connect(&c.urls(), opts()).await.expect("connect to the cluster");
    Some((store, Keep::Cluster(c)))
}

/// The backend-agnostic suite's fixture (`store/tests.rs`): a fresh single server, or a fresh
/// 3-node cluster; `None` when Redis is not installed (and `CI` is not `true`).
pub(crate) async fn suite_fixture(test: &str, cluster_mode: bool) -> Option<(Arc<RedisStore>, Keep)> {
    let (store, keep) = if cluster_mode { cluster(test).await? } else { single(test).await? };
    Some((Arc::new(store), keep))
}

/// Each behaviour runs on a single server and on a 3-node cluster.
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod single_server {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some((store, _keep)) = super::single(stringify!($name)).await else { return };
                    super::$name(store).await;
                }
            )*
        }
        mod cluster_3_nodes {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    let Some((store, _keep)) = super::cluster(stringify!($name)).await else { return };
                    super::$name(store).await;
                }
            )*
        }
    };
}

on_both!(
    gcra_flood_admits_between_limit_t_and_limit_t_plus_depth,
    gcra_burst_remaining_reset_and_refund,
    holds_are_committed_or_released_exactly_once_under_concurrency,
    take_up_to_never_takes_more_than_a_package_holds_under_concurrency,
    settlement_replay_is_idempotent,
    low_balance_alert_fires_once_under_concurrency,
    sweep_gives_back_holds_and_image_slots_after_their_lease,
    image_slots_respect_capacity_and_settle_once,
    month_usage_and_overrides_read_back,
    tenants_keys_share_one_slot,
    the_store_interfaces_on_redis,
    one_round_trip_admits_and_holds_and_a_refused_hold_gives_the_token_back,
    the_sweeper_task_gives_back_a_dead_replicas_holds,
    a_retried_refund_gives_back_one_token,
    a_commit_whose_hold_was_swept_pays_as_spec_6_says,
);

/// A flood of 2 s from 16 tasks: admitted within [limit × T, limit × T + depth] (3% timing
/// allowance on the low side: T is measured here, the bucket runs on Redis's clock).
async fn gcra_flood_admits_between_limit_t_and_limit_t_plus_depth(store: RedisStore) {
    let (limit, depth) = (40u32, 10u32);
    let admitted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (store, admitted) = (store.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                if store.gcra("acme", "face", limit, depth).await.unwrap().is_ok() {
                    admitted.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let n = admitted.load(Ordering::Relaxed) as f64;
    let low = f64::from(limit) * 2.0 * 0.97;
    let high = f64::from(limit) * secs + f64::from(depth);
    assert!(n >= low && n <= high, "admitted {n} in {secs:.3} s: wanted [{low}, {high}]");
}

async fn gcra_burst_remaining_reset_and_refund(store: RedisStore) {
    // Like the local buckets (admission.rs tests): depth at once, remaining counts down.
    assert_eq!(store.gcra("acme", "seg", 4, 4).await.unwrap(), Ok((3, 1)));
    assert_eq!(store.gcra("acme", "seg", 4, 4).await.unwrap(), Ok((2, 1)));
    assert_eq!(store.gcra("acme", "seg", 4, 4).await.unwrap(), Ok((1, 1)));
    assert_eq!(store.gcra("acme", "seg", 4, 4).await.unwrap(), Ok((0, 1)));
    let retry = store.gcra("acme", "seg", 4, 4).await.unwrap().expect_err("the fifth is throttled");
    assert!(retry > Duration::from_millis(150) && retry <= Duration::from_millis(250), "retry {retry:?}");
    // A refund gives exactly one token back.
    store.gcra_refund("acme", "seg", 4, 4, 1).await.unwrap();
    assert!(store.gcra("acme", "seg", 4, 4).await.unwrap().is_ok(), "one token back");
    assert!(store.gcra("acme", "seg", 4, 4).await.unwrap().is_err());
    // A refund of another shape is ignored; a new shape is a fresh (full) bucket.
    store.gcra_refund("acme", "seg", 8, 8, 2).await.unwrap();
    assert!(store.gcra("acme", "seg", 4, 4).await.unwrap().is_err());
    assert_eq!(store.gcra("acme", "seg", 10, 10).await.unwrap(), Ok((9, 1)));
    // Another tenant's bucket is its own.
    assert_eq!(store.gcra("globex", "seg", 4, 4).await.unwrap(), Ok((3, 1)));
    // A refund on a full bucket keeps it full, never fuller than its depth.
    store.gcra_refund("initech", "seg", 2, 2, 3).await.unwrap();
    assert!(store.gcra("initech", "seg", 2, 2).await.unwrap().is_ok());
    assert!(store.gcra("initech", "seg", 2, 2).await.unwrap().is_ok());
    assert!(store.gcra("initech", "seg", 2, 2).await.unwrap().is_err());
}

/// The client retries a command whose answer was lost: the refund it carries must not give a
/// second token back. Sent twice (the same command, as a retry sends it), one token comes back;
/// another refund (another id) gives its own token back.
async fn a_retried_refund_gives_back_one_token(store: RedisStore) {
    // One token per second, three at once: nothing refills while the test runs.
    for _ in 0..3 {
        assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_ok());
    }
    assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_err(), "the bucket is empty");
    store.gcra_refund("acme", "ocr", 1, 3, 7).await.unwrap();
    store.gcra_refund("acme", "ocr", 1, 3, 7).await.unwrap();
    assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_ok(), "the refunded token");
    assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_err(), "and only that one: the retry gave nothing back");
    store.gcra_refund("acme", "ocr", 1, 3, 8).await.unwrap();
    assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_ok(), "another refund's token");
    assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_err());
    // Concurrent copies of one refund (a retry racing the original): still one token.
    let copies: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.gcra_refund("acme", "ocr", 1, 3, 9).await })
        })
        .collect();
    for c in copies {
        c.await.unwrap().unwrap();
    }
    assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_ok(), "one refunded token");
    assert!(store.gcra("acme", "ocr", 1, 3).await.unwrap().is_err(), "of eight copies of one refund");
}

/// 64 tasks × 4 calls on one package that pays 10: every hold is committed or released once;
/// double commits/releases are no-ops; consumed = committed × want ≤ points; nothing stays held.
async fn holds_are_committed_or_released_exactly_once_under_concurrency(store: RedisStore) {
    let want = 3_000_000i64;
    let points = 10 * want;
    let committed = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for task in 0..64u128 {
        let (store, committed) = (store.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            for call in 0..4u128 {
                let id = task << 8 | call;
                let cands = [("small", 1_000_000), ("pkg", points)];
                let Some(idx) = store.hold("acme", &cands, want, id, Duration::from_secs(30)).await.unwrap() else {
                    continue;
                };
                assert_eq!(idx, 1, "a package that cannot hold the whole factor never pays");
                // A retried reserve holds nothing more.
                assert_eq!(store.hold("acme", &cands, want, id, Duration::from_secs(30)).await.unwrap(), Some(1));
                if (task + call) % 3 == 0 {
                    store.release_hold("acme", id).await.unwrap();
                    store.release_hold("acme", id).await.unwrap();
                    assert_eq!(store.commit_hold("acme", id).await.unwrap(), None, "commit after release");
                } else {
                    let first = store.commit_hold("acme", id).await.unwrap();
                    assert!(first.is_some(), "the first commit commits");
                    committed.fetch_add(1, Ordering::Relaxed);
                    assert_eq!(store.commit_hold("acme", id).await.unwrap(), first, "a repeated commit is a replay");
                    store.release_hold("acme", id).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let consumed = store.package_consumed("acme", "pkg").await.unwrap();
    assert_eq!(consumed, committed.load(Ordering::Relaxed) * want);
    assert!(consumed <= points, "consumed {consumed} > points {points}");
    assert_eq!(store.package_held("acme", "pkg").await.unwrap(), 0);
    // Whether the racing calls drained it depends on scheduling (a call that finds the package
    // fully held by others gives up); what is left must still be spendable, exactly: nothing
    // leaked into a hold that is never given back.
    let cands = [("small", 1_000_000), ("pkg", points)];
    let mut id = 1u128 << 100;
    while store.hold("acme", &cands, want, id, Duration::from_secs(30)).await.unwrap().is_some() {
        assert!(store.commit_hold("acme", id).await.unwrap().is_some());
        id += 1;
    }
    assert_eq!(store.package_consumed("acme", "pkg").await.unwrap(), points, "the rest was spendable");
    assert_eq!(store.package_held("acme", "pkg").await.unwrap(), 0);
    assert_eq!(store.package_consumed("acme", "small").await.unwrap(), 0);
}

/// Concurrent video takes over two packages, one total `want` each (the interface's greedy
/// take): never past the packages' points (nor into a call's hold), never more than `want`,
/// exactly `want` while the packages hold it, and a replay takes nothing more.
async fn take_up_to_never_takes_more_than_a_package_holds_under_concurrency(store: RedisStore) {
    use crate::store::{BalanceStore, Candidate, RequestId, TenantKey};
    let (a_pts, b_pts) = (7_000_000i64, 5_500_000i64);
    // A call in flight holds part of `a`: takes leave it alone.
    assert_eq!(store.hold("acme", &[("a", a_pts)], 1_000_000, 1, Duration::from_secs(30)).await.unwrap(), Some(0));
    let taken = Arc::new(AtomicI64::new(0));
    let short = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for task in 0..48u128 {
        let (store, taken, short) = (store.clone(), taken.clone(), short.clone());
        tasks.push(tokio::spawn(async move {
            let t = TenantKey { name: "acme", local: 0 };
            let cands =
                [Candidate { id: "a", points: a_pts, local: 0 }, Candidate { id: "b", points: b_pts, local: 0 }];
            let want = 250_000 + (task as i64 % 5) * 100_000;
            let id = RequestId(1000 + task);
            let got = store.take_up_to(t, &cands, want, id).await.unwrap();
            assert_eq!(got.len(), 2);
            let sum: i64 = got.iter().map(|g| g.taken).sum();
            assert!(got.iter().all(|g| g.taken >= 0) && sum <= want, "{got:?} for {want}");
            if sum < want {
                short.fetch_add(1, Ordering::Relaxed);
            }
            let again = store.take_up_to(t, &cands, want, id).await.unwrap();
            assert_eq!(again, got, "a replay answers the first take");
            taken.fetch_add(sum, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let a = store.package_consumed("acme", "a").await.unwrap();
    let b = store.package_consumed("acme", "b").await.unwrap();
    assert!(a <= a_pts - 1_000_000, "a: consumed {a} plus the hold exceeds its points");
    assert!(b <= b_pts, "b: consumed {b}");
    assert_eq!(a + b, taken.load(Ordering::Relaxed));
    assert_eq!((a, b), (a_pts - 1_000_000, b_pts), "48 takes of 0.25 to 0.65 points drain both");
    // Only the takes that found the packages (nearly) empty got less than they wanted.
    assert!(short.load(Ordering::Relaxed) < 48, "some takes got all they wanted");
}

async fn settlement_replay_is_idempotent(store: RedisStore) {
    let pts = 10_000_000;
    assert_eq!(store.hold("acme", &[("p", pts)], 4_000_000, 7, Duration::from_secs(30)).await.unwrap(), Some(0));
    let s = Settle {
        hold: HoldAction::Commit,
        alert_at: Some(3_000_000),
        usage: Some(("face", "2026-11", "package", 1)),
        image: ImagePart::None,
        also: "",
        part: "s",
        instead: None,
    };
    let first = store.settle("acme", 7, s).await.unwrap();
    assert_eq!(
        first,
        Settled {
            replay: false,
            hold: true,
            consumed: Some(4_000_000),
            cell_total: Some(1),
            alert_fired: true,
            images: None,
            instead: None,
        }
    );
    let again = store.settle("acme", 7, s).await.unwrap();
    assert_eq!(again, Settled { replay: true, ..first }, "a replay returns the first answer and applies nothing");
    assert_eq!(store.package_consumed("acme", "p").await.unwrap(), 4_000_000);
    // Usage added per (id, part): a repeat adds nothing, another id adds.
    assert_eq!(store.add_units("acme", ("face", "2026-11", "payg:", 1), "", 8, "u").await.unwrap(), 1);
    assert_eq!(store.add_units("acme", ("face", "2026-11", "payg:", 1), "", 8, "u").await.unwrap(), 1);
    assert_eq!(store.add_units("acme", ("face", "2026-11", "payg:", 2), "", 9, "u").await.unwrap(), 3);
    let month = store.month_cells("acme", "2026-11").await.unwrap();
    assert_eq!(month, vec![("face".to_string(), vec![("package".to_string(), 1), ("payg:".to_string(), 3)])]);
}

async fn low_balance_alert_fires_once_under_concurrency(store: RedisStore) {
    let pts = 100_000_000i64;
    let fired = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..40u128 {
        let (store, fired) = (store.clone(), fired.clone());
        tasks.push(tokio::spawn(async move {
            if store.hold("acme", &[("p", pts)], 2_000_000, id, Duration::from_secs(30)).await.unwrap().is_some() {
                let s = Settle {
                    hold: HoldAction::Commit,
                    alert_at: Some(pts - 80_000_000), // remaining ≤ 80 % of the points
                    usage: None,
                    image: ImagePart::None,
                    also: "",
                    part: "s",
                    instead: None,
                };
                if store.settle("acme", id, s).await.unwrap().alert_fired {
                    fired.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(fired.load(Ordering::Relaxed), 1, "the alert fires exactly once");
    assert!(!store.alert_once("acme", "p").await.unwrap(), "already fired");
    assert!(store.alert_once("acme", "q").await.unwrap(), "another package's first time");
    assert!(!store.alert_once("acme", "q").await.unwrap());
}

async fn sweep_gives_back_holds_and_image_slots_after_their_lease(store: RedisStore) {
    let pts = 2_000_000;
    let lease = Duration::from_millis(300);
    assert_eq!(store.hold("acme", &[("p", pts)], 2_000_000, 1, lease).await.unwrap(), Some(0));
    assert_eq!(store.hold("acme", &[("p", pts)], 2_000_000, 2, lease).await.unwrap(), None, "all held");
    assert!(store.hold_image_slot("acme", 1, 3, lease).await.unwrap());
    assert!(!store.hold_image_slot("acme", 1, 4, lease).await.unwrap(), "the one slot is held");
    // Before the lease ends, nothing is given back.
    assert_eq!(store.sweep_all().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.sweep_tenant("acme").await.unwrap(), (1, 1));
    assert_eq!(store.package_held("acme", "p").await.unwrap(), 0);
    assert_eq!(store.commit_hold("acme", 1).await.unwrap(), None, "a swept hold is not committed");
    assert_eq!(store.package_consumed("acme", "p").await.unwrap(), 0);
    assert_eq!(store.hold("acme", &[("p", pts)], 2_000_000, 5, lease).await.unwrap(), Some(0), "the points are back");
    assert!(store.hold_image_slot("acme", 1, 6, lease).await.unwrap(), "the slot is back");
    assert_eq!(store.sweep_tenant("acme").await.unwrap(), (0, 0));
}

/// A commit whose hold the sweep gave back (the call outlived its lease): the first candidate
/// holding the whole factor beyond the holds in flight pays it, in the settlement script, and the
/// units go to that payer's field; when none can, to the fallback's fields. Once per id.
async fn a_commit_whose_hold_was_swept_pays_as_spec_6_says(store: RedisStore) {
    let (want, lease) = (2_000_000i64, Duration::from_millis(200));
    let cands = [
        InsteadFrom { package: "a", points: 3_000_000, alert_at: None, field: "payer:single_package" },
        InsteadFrom { package: "b", points: 4_000_000, alert_at: Some(want), field: "payer:general_package" },
    ];
    let settle = |id: u128| {
        let s = Settle {
            hold: HoldAction::Commit,
            alert_at: None,
            usage: Some(("od", "2026-11", "payer:single_package", 1)),
            image: ImagePart::None,
            also: "",
            part: "s",
            instead: Some(Instead { want, candidates: &cands, field: "payer:payg", also: "cell:" }),
        };
        let store = store.clone();
        async move { store.settle("acme", id, s).await.unwrap() }
    };
    // Call 1 holds on a; its lease runs out and the sweep gives the points back.
    assert_eq!(store.hold("acme", &[("a", 3_000_000)], want, 1, lease).await.unwrap(), Some(0));
    tokio::time::sleep(lease * 2).await;
    assert_eq!(store.sweep_tenant("acme").await.unwrap(), (1, 0));
    // Call 2 holds a's points meanwhile (1 left: less than a factor).
    assert_eq!(store.hold("acme", &[("a", 3_000_000)], want, 2, Duration::from_secs(30)).await.unwrap(), Some(0));
    // Call 1's commit: a cannot pay it whole, b can.
    let late = settle(1).await;
    assert_eq!((late.hold, late.instead, late.consumed), (false, Some(PaidInstead::Package(1)), Some(want)));
    assert!(late.alert_fired, "b's alert, at its consumption of one factor");
    assert_eq!(settle(1).await, Settled { replay: true, ..late }, "a replay answers the same, applies nothing");
    // Call 2 commits its own hold, as always.
    let two = settle(2).await;
    assert_eq!((two.hold, two.instead, two.consumed), (true, None, Some(want)));
    // Call 3 outlives its lease on b; then nothing can pay it whole (a: 1, b: 2 - 2 held by call 4).
    assert_eq!(store.hold("acme", &[("b", 4_000_000)], want, 3, lease).await.unwrap(), Some(0));
    tokio::time::sleep(lease * 2).await;
    assert_eq!(store.sweep_tenant("acme").await.unwrap(), (1, 0));
    assert_eq!(store.hold("acme", &[("b", 4_000_000)], want, 4, Duration::from_secs(30)).await.unwrap(), Some(0));
    let unpaid = settle(3).await;
    assert_eq!(
        (unpaid.hold, unpaid.instead, unpaid.consumed, unpaid.cell_total),
        (false, Some(PaidInstead::Fallback), None, Some(1))
    );
    // Call 4 commits its hold on b's last factor.
    let four = settle(4).await;
    assert_eq!((four.hold, four.consumed), (true, Some(4_000_000)));
    assert_eq!(store.package_consumed("acme", "a").await.unwrap(), want, "a paid call 2 only");
    assert_eq!(store.package_consumed("acme", "b").await.unwrap(), 2 * want, "b paid calls 1 and 4");
    assert_eq!(store.package_held("acme", "a").await.unwrap() + store.package_held("acme", "b").await.unwrap(), 0);
    let month = store.month_cells("acme", "2026-11").await.unwrap();
    let fields = vec![
        ("cell:".to_string(), 1),
        ("payer:general_package".to_string(), 1),
        ("payer:payg".to_string(), 1),
        ("payer:single_package".to_string(), 2),
    ];
    // Calls 2 and 4 under the field their settlement named, 1 under b's, 3 under payg's.
    assert_eq!(month, vec![("od".to_string(), fields)], "four calls, each counted once");
    // Without candidates a missing hold commits nothing, as before (a release never pays).
    let s = Settle {
        hold: HoldAction::Commit,
        alert_at: None,
        usage: None,
        image: ImagePart::None,
        also: "",
        part: "t",
        instead: None,
    };
    let none = store.settle("acme", 1, s).await.unwrap();
    assert_eq!((none.hold, none.instead, none.consumed), (false, None, None));
}

async fn image_slots_respect_capacity_and_settle_once(store: RedisStore) {
    let lease = Duration::from_secs(30);
    let held = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..20u128 {
        let (store, held) = (store.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            if store.hold_image_slot("acme", 5, id, lease).await.unwrap() {
                held.fetch_add(1, Ordering::Relaxed);
                assert!(store.hold_image_slot("acme", 5, id, lease).await.unwrap(), "idempotent on id");
                let n = store.settle_image("acme", id, ImagePart::Add).await.unwrap();
                assert_eq!(store.settle_image("acme", id, ImagePart::Add).await.unwrap(), n, "a replay");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(held.load(Ordering::Relaxed), 5, "capacity 5");
    assert_eq!(store.images("acme").await.unwrap(), 5);
    assert!(!store.hold_image_slot("acme", 5, 100, lease).await.unwrap(), "full");
    assert_eq!(store.settle_image("acme", 101, ImagePart::Delete).await.unwrap(), 4);
    assert!(store.hold_image_slot("acme", 5, 102, lease).await.unwrap());
    store.settle_image("acme", 102, ImagePart::Release).await.unwrap();
    assert_eq!(store.settle_image("acme", 103, ImagePart::Set(2)).await.unwrap(), 2, "a reported count wins");
    for id in 104..110 {
        store.settle_image("acme", id, ImagePart::Delete).await.unwrap();
    }
    assert_eq!(store.images("acme").await.unwrap(), 0, "never below zero");
}

async fn month_usage_and_overrides_read_back(store: RedisStore) {
    assert_eq!(store.month_cells("acme", "2026-11").await.unwrap(), vec![]);
    store.add_units("acme", ("video", "2026-11", "payg:1080p", 90_000), "", 1, "u").await.unwrap();
    store.add_units("acme", ("face", "2026-11", "free_default", 1), "", 2, "u").await.unwrap();
    store.add_units("acme", ("face", "2026-12", "free_default", 1), "", 3, "u").await.unwrap();
    let m = store.month_cells("acme", "2026-11").await.unwrap();
    assert_eq!(
        m,
        vec![
            ("face".to_string(), vec![("free_default".to_string(), 1)]),
            ("video".to_string(), vec![("payg:1080p".to_string(), 90_000)]),
        ]
    );
    assert_eq!(store.override_version().await.unwrap(), 0);
    store.put_override_json("acme", "face", r#"{"qps":10}"#).await.unwrap();
    let v1 = store.override_version().await.unwrap();
    assert!(v1 > 0, "a put moves the version");
    store.put_override_json("acme", "face", r#"{"qps":10}"#).await.unwrap();
    store.put_override_json("globex", "seg", r#"{"qps":5}"#).await.unwrap();
    assert_eq!(
        store.override_jsons().await.unwrap(),
        vec![
            ("acme".to_string(), "face".to_string(), r#"{"qps":10}"#.to_string()),
            ("globex".to_string(), "seg".to_string(), r#"{"qps":5}"#.to_string()),
        ]
    );
}

/// Every key a script touches is in its tenant's slot (what lets it run on a Redis Cluster).
async fn tenants_keys_share_one_slot(store: RedisStore) {
    let mut conn = store.conn.clone();
    let mut slots = std::collections::BTreeSet::new();
    for rest in ["b:face", "holds", "h:00", "p:pkg", "m:2026-11:face", "mi:2026-11", "done:00:s", "alerted", "img"] {
        let cmd = redis::cmd("CLUSTER").arg("KEYSLOT").arg(store.key("acme", rest)).clone();
        match cmd.query_async::<i64>(&mut conn).await {
            Ok(slot) => {
                slots.insert(slot);
            }
            // A single server without cluster support answers an error: nothing to check there.
            Err(e) => {
                assert!(!matches!(store.conn, Conn::Cluster(_)), "CLUSTER KEYSLOT on the cluster: {e}");
                return;
            }
        }
    }
    assert_eq!(slots.len(), 1, "slots {slots:?}");
}

/// SPEC §11.4 (an upgrade Redis does not confirm is refused whole): a put that fails part way
/// leaves nothing behind. The override's set sits in its tenant's slot and the index and the
/// version in others, so no transaction spans them on a Redis Cluster; an override left in its
/// set by a failed put would apply everywhere at the next put of the same pair (which lists the
/// pair and moves the version), though the admin call that made it was refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_override_that_fails_part_way_leaves_nothing_behind() {
    let Some(s) = RedisServer::start("a_put_override_that_fails_part_way", Opts::default()) else { return };
    let store = RedisStore::connect(&[s.url()], opts()).await.expect("connect");
    let acl = |rule: &str| assert_eq!(s.cli(&["ACL", "SETUSER", "default", rule]), "OK", "{rule}");
    // Stored before: a later put of the same override that fails does not take it away.
    store.put_override_json("acme", "face", r#"{"qps":10}"#).await.expect("put");
    // The version cannot move: the override was added to its set (and the pair listed) first.
    acl("-incr");
    store.put_override_json("acme", "face", r#"{"qps":25}"#).await.expect_err("INCR refused");
    store.put_override_json("acme", "face", r#"{"qps":10}"#).await.expect_err("INCR refused");
    acl("+incr");
    // The index cannot be written (only the tenants' keys can).
    acl("resetkeys");
    acl("~tp:{*");
    store.put_override_json("acme", "face", r#"{"qps":30}"#).await.expect_err("index refused");
    acl("allkeys");
    let before = store.override_version().await.expect("version");
    store.put_override_json("acme", "face", r#"{"qps":12}"#).await.expect("put");
    assert!(store.override_version().await.expect("version") > before, "the version moved");
    assert_eq!(
        store.override_jsons().await.expect("read"),
        [r#"{"qps":10}"#, r#"{"qps":12}"#].map(|j| ("acme".to_string(), "face".to_string(), j.to_string())),
        "only the puts that succeeded"
    );
}

/// The same promise when the put's caller goes away part way (an admin client that
/// disconnects): a write Redis already has must still get its version, or the override applies
/// at the next put of the pair. Here the override's write waits on its paused node (a Redis
/// Cluster: the index is on another node, so the pair is listed first) when the call is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_override_dropped_part_way_is_made_whole() {
    let Some(c) = RedisCluster::start("a_put_override_dropped_part_way") else { return };
    let store = Arc::new(RedisStore::connect(&c.urls(), opts()).await.expect("connect"));
    let owner = |key: &str| c.nodes.iter().position(|n| n.cli(&["EXISTS", key]) == "1").expect("a node has it");
    // A tenant whose slot is served by another node than the index's.
    let mut on = None;
    for t in (0..12).map(|i| format!("t{i}")) {
        store.put_override_json(&t, "face", r#"{"qps":10}"#).await.expect("put");
        let node = owner(&format!("tp:{{{t}}}:ov:face"));
        if node != owner("tp:ov:index") {
            on = Some((t, node));
            break;
        }
    }
    let (tenant, node) = on.expect("12 tenants all in the index's slots");
    let version = store.override_version().await.expect("version");
    let paused = Instant::now();
    assert_eq!(c.nodes[node].cli(&["CLIENT", "PAUSE", "1500", "WRITE"]), "OK");
    let put = {
        let (store, tenant) = (store.clone(), tenant.clone());
        tokio::spawn(async move { store.put_override_json(&tenant, "ocr", r#"{"qps":25}"#).await })
    };
    let pair = format!("{tenant}\nocr");
    while c.nodes[owner("tp:ov:index")].cli(&["SISMEMBER", "tp:ov:index", &pair]) != "1" {
        assert!(paused.elapsed() < Duration::from_millis(1000), "the pair was never listed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Listed: the override's own write is on its way to the paused node.
    tokio::time::sleep(Duration::from_millis(100)).await;
    put.abort();
    let _ = put.await;
    tokio::time::sleep(Duration::from_millis(1500).saturating_sub(paused.elapsed()) + Duration::from_millis(700)).await;
    let set = format!("tp:{{{tenant}}}:ov:ocr");
    let stored = c.nodes[node].cli(&["SISMEMBER", &set, r#"{"qps":25}"#]) == "1";
    let moved = store.override_version().await.expect("version") > version;
    assert!(stored, "the write on its way landed when the pause ended");
    assert!(moved, "the override is in its set, but the version never moved: no replica reads it until another put");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_fails_within_the_timeout_and_a_restart_recovers() {
    let Some(mut s) = RedisServer::start("a_dead_server_fails_within_the_timeout", Opts::default()) else { return };
    let o = RedisOpts { op_timeout: Duration::from_millis(300), ..opts() };
    let store = RedisStore::connect(&[s.url()], o).await.unwrap();
    assert!(store.gcra("acme", "face", 10, 10).await.unwrap().is_ok());
    s.kill9();
    let start = Instant::now();
    let err = store.gcra("acme", "face", 10, 10).await.expect_err("Redis is down");
    assert!(start.elapsed() < Duration::from_millis(1500), "answered in {:?}: {err}", start.elapsed());
    s.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.gcra("acme", "face", 10, 10).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no reconnect within 5 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `appendfsync always`: a commit Redis acknowledged survives kill -9 and a restart on the same
/// directory, and nothing is refilled (neither the package nor the bucket).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_commits_survive_kill_9_with_appendfsync_always() {
    let Some(mut s) =
        RedisServer::start("acknowledged_commits_survive_kill_9", Opts { aof_always: true, cluster: false })
    else {
        return;
    };
    let store = RedisStore::connect(&[s.url()], opts()).await.unwrap();
    assert_eq!(store.aof_policy().await.unwrap(), ("yes".to_string(), "always".to_string()));
    let pts = 5_000_000;
    for id in 0..5u128 {
        assert_eq!(store.hold("acme", &[("p", pts)], 1_000_000, id, Duration::from_secs(30)).await.unwrap(), Some(0));
        assert!(store.commit_hold("acme", id).await.unwrap().is_some());
    }
    // The bucket's one token (1 per second) is taken just before the crash.
    assert!(store.gcra("acme", "face", 1, 1).await.unwrap().is_ok());
    let crash = Instant::now();
    s.kill9();
    s.restart();
    let store = RedisStore::connect(&[s.url()], opts()).await.unwrap();
    let throttled = store.gcra("acme", "face", 1, 1).await.unwrap();
    let elapsed = crash.elapsed();
    assert!(elapsed < Duration::from_millis(900), "restart took {elapsed:?}: too slow to check the bucket");
    assert!(throttled.is_err(), "the bucket was refilled by the restart");
    assert_eq!(store.package_consumed("acme", "p").await.unwrap(), pts, "every acknowledged commit is there");
    assert_eq!(store.hold("acme", &[("p", pts)], 1_000_000, 9, Duration::from_secs(30)).await.unwrap(), None);
    assert_eq!(store.commit_hold("acme", 3).await.unwrap(), Some(4_000_000), "the replay marker survived too");
}

/// The interfaces of `store/mod.rs` as the gateway calls them.
async fn the_store_interfaces_on_redis(store: RedisStore) {
    use crate::config::gateway::ImageOp;
    use crate::store::{
        Admit, BalanceStore, BucketKey, Candidate, ImageStore, MonthUsage, Override, OverrideStore, PayerKind, Quota,
        RateStore, RequestId, TenantKey, UsageStore, UsageTo,
    };
    let key = BucketKey { tenant: "acme", bucket: "face", local: 0 };
    let q = Quota { limit: 2, depth: 2 };
    assert_eq!(store.admit(key, q).await.unwrap(), Admit::Allowed { remaining: 1, reset_secs: 1 });
    assert_eq!(store.admit(key, q).await.unwrap(), Admit::Allowed { remaining: 0, reset_secs: 1 });
    assert!(matches!(store.admit(key, q).await.unwrap(), Admit::Throttled { .. }));
    store.refund(key, q, RequestId(1)).await.unwrap();
    assert!(matches!(store.admit(key, q).await.unwrap(), Admit::Allowed { .. }));

    let t = TenantKey { name: "acme", local: 0 };
    let cands =
        [Candidate { id: "p1", points: 1_000_000, local: 0 }, Candidate { id: "p2", points: 5_000_000, local: 0 }];
    assert_eq!(store.reserve(t, &cands, 2_000_000, RequestId(1), Duration::from_secs(30)).await.unwrap(), Some(1));
    assert_eq!(store.commit(t, RequestId(1)).await.unwrap(), Some(2_000_000));
    assert_eq!(store.commit(t, RequestId(1)).await.unwrap(), None, "a second commit is a no-op");
    assert_eq!(store.consumed(t, cands[1]).await.unwrap(), 2_000_000);
    assert_eq!(store.reserve(t, &cands, 2_000_000, RequestId(2), Duration::from_secs(30)).await.unwrap(), Some(1));
    store.release(t, RequestId(2)).await.unwrap();
    assert_eq!(store.commit(t, RequestId(2)).await.unwrap(), None, "released, then nothing to commit");
    // One total, taken greedily in order: all of p1, the rest from p2.
    let took = store.take_up_to(t, &cands, 1_500_000, RequestId(3)).await.unwrap();
    assert_eq!(
        (took[0].taken, took[0].consumed, took[1].taken, took[1].consumed),
        (1_000_000, 1_000_000, 500_000, 2_500_000)
    );
    assert_eq!(store.take_up_to(t, &cands, 1_500_000, RequestId(3)).await.unwrap(), took, "a replay");
    assert!(store.mark_alerted(t, cands[0]).await.unwrap());
    assert!(!store.mark_alerted(t, cands[0]).await.unwrap());

    let pay = UsageTo::Payer(PayerKind::Payg);
    assert_eq!(store.add_usage(key, "2026-11", pay, 3, "", RequestId(4)).await.unwrap(), 3);
    assert_eq!(store.add_usage(key, "2026-11", pay, 3, "", RequestId(4)).await.unwrap(), 3, "idempotent");
    assert_eq!(store.add_usage(key, "2026-11", pay, 2, "", RequestId(5)).await.unwrap(), 5);
    let pkg = UsageTo::Payer(PayerKind::SinglePackage);
    assert_eq!(store.add_usage(key, "2026-11", pkg, 1, "", RequestId(5)).await.unwrap(), 1, "another payer, same id");
    let video = BucketKey { tenant: "acme", bucket: "video", local: 0 };
    store.add_usage(video, "2026-11", pay, 90_000, "1080p", RequestId(6)).await.unwrap();
    store.add_usage(video, "2026-11", UsageTo::Unpaid, 30_000, "", RequestId(6)).await.unwrap();
    let mut face = MonthUsage { feature: "face".into(), ..MonthUsage::default() };
    face.units[PayerKind::Payg as usize] = 5;
    face.units[PayerKind::SinglePackage as usize] = 1;
    face.payg.insert(String::new(), 5);
    let mut vid = MonthUsage { feature: "video".into(), unpaid: 30_000, ..MonthUsage::default() };
    vid.units[PayerKind::Payg as usize] = 90_000;
    vid.payg.insert("1080p".into(), 90_000);
    assert_eq!(store.month(t, "2026-11").await.unwrap(), vec![face, vid]);

    assert!(store.reserve_image_slot(t, 1, RequestId(7)).await.unwrap());
    assert!(!store.reserve_image_slot(t, 1, RequestId(8)).await.unwrap());
    assert_eq!(store.settle_images(t, ImageOp::Add, RequestId(7), None).await.unwrap(), 1);
    assert_eq!(store.settle_images(t, ImageOp::Delete, RequestId(9), Some(4)).await.unwrap(), 4, "the report wins");
    assert_eq!(store.image_count(t).await.unwrap(), 4);

    let later = Override { qps: 9, from: 20, until: None };
    let sooner = Override { qps: 7, from: 10, until: Some(30) };
    store.put_override("acme", "face", later.clone()).await.unwrap();
    store.put_override("acme", "face", sooner.clone()).await.unwrap();
    store.put_override("acme", "face", later.clone()).await.unwrap();
    assert_eq!(
        store.overrides().await.unwrap(),
        vec![("acme".to_string(), "face".to_string(), sooner), ("acme".to_string(), "face".to_string(), later)]
    );
}

/// The admission script: a throttled call holds nothing; an admitted one holds on the first
/// candidate that pays the whole factor; with no candidate the token goes back (a 402 follows).
async fn one_round_trip_admits_and_holds_and_a_refused_hold_gives_the_token_back(store: RedisStore) {
    let cands = [("p", 3_000_000i64)];
    let hold = |id: u128, undo: bool| HoldReq {
        candidates: &cands,
        want: 2_000_000,
        id,
        lease: Duration::from_secs(30),
        undo_if_none: undo,
    };
    let bucket = Some(("face", 2u32, 2u32));
    let a = store.admit_and_hold("acme", bucket, Some(hold(1, true))).await.unwrap();
    assert_eq!(a, Admission { admit: Ok((1, 1)), hold: Some(0) });
    // No candidate can hold 2 more points: admitted, no hold, and the token is given back.
    let b = store.admit_and_hold("acme", bucket, Some(hold(2, true))).await.unwrap();
    assert_eq!(b, Admission { admit: Ok((0, 1)), hold: None });
    // So one token is still there; without `undo_if_none` the token stays taken.
    let c = store.admit_and_hold("acme", bucket, Some(hold(3, false))).await.unwrap();
    assert_eq!(c.hold, None);
    assert!(c.admit.is_ok(), "the given-back token");
    let d = store.admit_and_hold("acme", bucket, Some(hold(4, true))).await.unwrap();
    assert!(d.admit.is_err(), "throttled");
    assert_eq!(d.hold, None, "a throttled call holds nothing");
    assert_eq!(store.package_held("acme", "p").await.unwrap(), 2_000_000, "only the first call's hold");
    // A new bucket (the tenant's first call of a feature) given back is a full one again.
    let e = store.admit_and_hold("acme", Some(("seg", 1, 1)), Some(hold(5, true))).await.unwrap();
    assert_eq!(e.hold, None);
    assert!(store.admit_and_hold("acme", Some(("seg", 1, 1)), None).await.unwrap().admit.is_ok());
}

/// A 429 is answered from this replica's cache until its retry time: no store call (here the
/// store is even gone), and a refund drops the cached answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_429_needs_no_store_call_until_its_retry_time() {
    let Some(mut s) = RedisServer::start("a_cached_429_needs_no_store_call", Opts::default()) else { return };
    let store =
        RedisStore::connect(&[s.url()], RedisOpts { op_timeout: Duration::from_millis(300), ..opts() }).await.unwrap();
    assert!(store.gcra("acme", "face", 1, 1).await.unwrap().is_ok());
    let first = store.gcra("acme", "face", 1, 1).await.unwrap().expect_err("throttled");
    assert!(first > Duration::from_millis(800), "{first:?}");
    // A refund drops the cache entry: the next answer comes from Redis again (admitted).
    store.gcra_refund("acme", "face", 1, 1, 1).await.unwrap();
    assert!(store.gcra("acme", "face", 1, 1).await.unwrap().is_ok(), "the refunded token");
    let retry = store.gcra("acme", "face", 1, 1).await.unwrap().expect_err("throttled again");
    s.kill9();
    let cached = store.gcra("acme", "face", 1, 1).await.expect("answered without Redis").expect_err("still throttled");
    assert!(cached <= retry, "{cached:?} > {retry:?}");
    // Another shape (a reload changed the limit) is not answered from the cache.
    assert!(store.gcra("acme", "face", 2, 2).await.is_err(), "Redis is down: a store error");
}

/// A replica reserves and dies (its store handle is gone, nothing released); another replica's
/// sweeper, told the tenants of the configuration, gives the hold back after the lease.
async fn the_sweeper_task_gives_back_a_dead_replicas_holds(store: RedisStore) {
    let dead = store.clone();
    let lease = Duration::from_millis(300);
    assert_eq!(dead.hold("acme", &[("p", 1_000_000)], 1_000_000, 1, lease).await.unwrap(), Some(0));
    drop(dead);
    // The survivor never reserved for acme: it sweeps because the configuration names it.
    let survivor = RedisStore { tenants: Arc::new(DashSet::new()), ..store.clone() };
    survivor.set_tenants(["acme", "globex"]);
    let sweeper = survivor.spawn_sweeper(Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(survivor.package_held("acme", "p").await.unwrap(), 1_000_000, "not before the lease");
    let deadline = Instant::now() + Duration::from_secs(3);
    while survivor.package_held("acme", "p").await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "the hold was not given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sweeper.abort();
    assert_eq!(survivor.hold("acme", &[("p", 1_000_000)], 1_000_000, 2, lease).await.unwrap(), Some(0));
}

/// SPEC §10's store metrics, registered on the gateway's registry: every call is timed, every
/// failure counted, per `op`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_calls_are_timed_and_failures_counted_per_op() {
    let Some(mut s) = RedisServer::start("store_calls_are_timed_and_failures_counted", Opts::default()) else { return };
    let metrics = crate::metrics::Metrics::new(true);
    let m = StoreMetrics::new().unwrap();
    m.register(&metrics.registry).unwrap();
    let o = RedisOpts { op_timeout: Duration::from_millis(300), ..opts() };
    let store = RedisStore::connect(&[s.url()], o).await.unwrap().with_metrics(m);
    store.gcra("acme", "face", 10, 10).await.unwrap().unwrap();
    store.sweep_tenant("acme").await.unwrap();
    s.kill9();
    assert!(store.gcra("acme", "face", 10, 10).await.is_err());
    let text = metrics.render();
    assert!(text.contains("turnstile_store_duration_seconds_count{op=\"admit\"} 2"), "{text}");
    assert!(text.contains("turnstile_store_duration_seconds_count{op=\"sweep\"} 1"), "{text}");
    assert!(text.contains("turnstile_store_errors_total{op=\"admit\"} 1"), "{text}");
    assert!(!text.contains("turnstile_store_errors_total{op=\"sweep\"}"), "{text}");
}

/// A Redis Cluster node dies: calls for the tenants it served fail within the store timeout
/// (never hang), the other tenants keep being served, and its restart (same directory, same
/// nodes.conf) brings its tenants back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_cluster_node_fails_its_tenants_within_the_timeout_only() {
    let Some(mut c) = RedisCluster::start("a_dead_cluster_node_fails_its_tenants") else { return };
    let o = RedisOpts { op_timeout: Duration::from_millis(400), ..opts() };
    let store = RedisStore::connect(&c.urls(), o).await.unwrap();
    let tenants: Vec<String> = (0..12).map(|i| format!("t{i}")).collect();
    for t in &tenants {
        assert!(store.gcra(t, "face", 100, 100).await.unwrap().is_ok());
    }
    c.nodes[0].kill9();
    let (mut ok, mut failed) = (0, 0);
    for t in &tenants {
        let start = Instant::now();
        match store.gcra(t, "face", 100, 100).await {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
        assert!(start.elapsed() < Duration::from_millis(1500), "{t}: answered in {:?}", start.elapsed());
    }
    assert!(ok > 0 && failed > 0, "ok {ok}, failed {failed}: one node of three serves some tenants");
    c.nodes[0].restart();
    let deadline = Instant::now() + Duration::from_secs(8);
    for t in &tenants {
        while store.gcra(t, "face", 100, 100).await.is_err() {
            assert!(Instant::now() < deadline, "{t} not served again after the node's restart");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `open` from a `[cluster]` section: its prefix and lease, the metrics on the given registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_follows_the_cluster_section() {
    use crate::config::gateway::{ClusterSettings, OnStoreError, StoreKind};
    let Some(s) = RedisServer::start("open_follows_the_cluster_section", Opts::default()) else { return };
    let c = ClusterSettings {
        store: StoreKind::Redis,
        redis: vec![s.url()],
        key_prefix: "custom".into(),
        hold_lease: Duration::from_millis(200),
        on_store_error: OnStoreError::Deny,
        expected_replicas: 1,
    };
    let registry = prometheus::Registry::new();
    let store = RedisStore::open(&c, Some(&registry), ["acme"]).await.unwrap();
    assert!(store.hold_image_slot("acme", 1, 1, store.opts.hold_lease).await.unwrap());
    assert_eq!(s.cli(&["exists", "custom:{acme}:imgslots"]), "1", "keys start with key_prefix");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.sweep_tenant("acme").await.unwrap(), (0, 1), "the slot's lease is hold_lease_ms");
    let names: Vec<String> = registry.gather().iter().map(|f| f.name().to_string()).collect();
    assert!(names.contains(&"turnstile_store_duration_seconds".to_string()), "{names:?}");
    // Another store on the same registry cannot register the metrics twice: an error, not a panic.
    assert!(RedisStore::open(&c, Some(&registry), ["acme"]).await.is_err());
}

/// Which Redis errors a journal replay sets aside (`StoreError::Rejected`: the same command
/// gets the same error again) and which it retries (`StoreError::Unavailable`): only a
/// `WRONGTYPE` and an `ERR` a script raised are rejections; I/O errors, a refused or dropped
/// connection, and the server states that pass (loading, busy, a cluster moving slots, a
/// read-only replica, memory, a script cache flushed) are retried, and so is an `ERR` that is
/// not a script's, or a script's that names such a state (Redis 6 wraps them in `ERR`).
#[test]
fn redis_errors_a_replay_sets_aside_are_only_the_clear_rejections() {
    use std::io::ErrorKind as Io;
    let reply = |line: &str| -> redis::RedisError {
        let v = redis::parse_redis_value(format!("-{line}\r\n").as_bytes()).expect("an error reply parses");
        v.extract_error().expect_err("an error reply")
    };
    let retried: Vec<redis::RedisError> = vec![
        std::io::Error::from(Io::ConnectionRefused).into(),
        std::io::Error::from(Io::ConnectionReset).into(),
        std::io::Error::from(Io::BrokenPipe).into(),
        std::io::Error::from(Io::UnexpectedEof).into(),
        std::io::Error::from(Io::TimedOut).into(),
        (redis::ErrorKind::Io, "Connection dropped").into(),
        (redis::ErrorKind::Parse, "unexpected reply").into(),
        reply("LOADING Redis is loading the dataset in memory"),
        reply("BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE."),
        reply("TRYAGAIN Multiple keys request during rehashing of slot"),
        reply("CLUSTERDOWN The cluster is down"),
        reply("MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'."),
        reply("READONLY You can't write against a read only replica."),
        reply("OOM command not allowed when used memory > 'maxmemory'."),
        reply("NOSCRIPT No matching script. Please use EVAL."),
        reply("MOVED 3999 127.0.0.1:6381"),
        reply("ASK 3999 127.0.0.1:6381"),
        reply("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk."),
        reply("NOPERM this user has no permissions to run the 'evalsha' command"),
        reply("SOMETHINGNEW an error code unknown here"),
        reply("ERR max number of clients reached"),
        reply("ERR unknown command 'EVALSHA'"),
        // A script's error that names a state that passes (Redis 7, then Redis 6's wrapping).
        reply("OOM command not allowed when used memory > 'maxmemory'. script: 1225dd29, on @user_script:1."),
        reply("ERR Error running script (call to f_1225dd29): @user_script:1: @user_script: 1: -READONLY You can't write against a read only replica."),
        reply("ERR Script killed by user with SCRIPT KILL... script: 1225dd29, on @user_script:1."),
        reply("ERR Error compiling script (new function): user_script:1: '=' expected near 'x'"),
        // An ACL that refuses a command or key the script calls: the in-script form of NOPERM,
        // which passes once the operator fixes the ACL (Redis 6 and 7.0, then 7.2 and later).
        reply("ERR The user executing the script can't run this command or subcommand script: 1225dd294e3be91e97bf0630238cb21f24b448a1, on @user_script:1."),
        reply("ERR The user executing the script can't access at least one of the keys mentioned in the command arguments script: 39b089b0f806af48b5e1baa28fda5d92b77c5d3b, on @user_script:1."),
        reply("ERR Error running script (call to f_1225dd29): @user_script:1: @user_script: 1: The user executing the script can't run this command or subcommand"),
        reply("ERR ACL failure in script: User default has no permissions to run the 'hincrby' command script: 1225dd29, on @user_script:1."),
    ];
    for e in retried {
        let text = e.to_string();
        assert!(!rejects(&e), "retried: {text}");
        let s = redis_err("settle", e);
        assert!(matches!(s, StoreError::Unavailable { .. }) && !s.is_rejection(), "{text}: {s:?}");
    }
    let rejected = [
        "WRONGTYPE Operation against a key holding the wrong kind of value",
        "WRONGTYPE Operation against a key holding the wrong kind of value script: 1225dd29, on @user_script:1.",
        "ERR hash value is not an integer script: 1225dd29, on @user_script:1.",
        "ERR user_script:1: attempt to index local 'x' (a nil value) script: cf0efd78, on @user_script:1.",
        "ERR Error running script (call to f_1225dd29): @user_script:12: WRONGTYPE Operation against a key holding the wrong kind of value",
    ];
    for line in rejected {
        let e = reply(line);
        assert!(rejects(&e), "rejected: {line}");
        let s = redis_err("settle", e);
        assert!(matches!(s, StoreError::Rejected { .. }) && s.is_rejection(), "{line}: {s:?}");
        // The request path answers it as before: 503 `store_unavailable`.
        let api = crate::error::ApiError::StoreUnavailable { reason: s.to_string() };
        assert_eq!((api.status().as_u16(), api.code()), (503, "store_unavailable"));
        // And says what happened: the store answered, it was not out of reach.
        let message = api.to_string();
        assert!(message.contains("rejected the operation") && !message.contains("reached"), "{message}");
    }
    let corrupt = StoreError::Corrupt { backend: "redis".into(), key: "settle".into(), reason: "1 values".into() };
    assert!(corrupt.is_rejection(), "a reply that does not decode decodes no better the next time");
    let timeout = StoreError::Timeout { backend: "redis".into(), op: "settle", ms: 500 };
    assert!(!timeout.is_rejection());
}
