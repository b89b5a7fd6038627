//! The Redis scripts and store against real Redis processes: a single `redis-server` and a
//! 3-node Redis Cluster (each test starts its own, on free loopback ports). Without
//! `redis-server` on PATH every test prints a notice and passes, unless `CI=true`.

use super::harness::{Opts, RedisCluster, RedisServer};
use super::*;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

/// What keeps the Redis processes alive for the test's length.
#[allow(dead_code)]
enum Keep {
    One(RedisServer),
    Cluster(RedisCluster),
}

fn opts() -> RedisOpts {
    RedisOpts { key_prefix: "tp".into(), op_timeout: Duration::from_secs(2), done_ttl: Duration::from_secs(60) }
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
                if store.admit("acme", "face", limit, depth).await.unwrap().is_ok() {
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
    assert_eq!(store.admit("acme", "seg", 4, 4).await.unwrap(), Ok((3, 1)));
    assert_eq!(store.admit("acme", "seg", 4, 4).await.unwrap(), Ok((2, 1)));
    assert_eq!(store.admit("acme", "seg", 4, 4).await.unwrap(), Ok((1, 1)));
    assert_eq!(store.admit("acme", "seg", 4, 4).await.unwrap(), Ok((0, 1)));
    let retry = store.admit("acme", "seg", 4, 4).await.unwrap().expect_err("the fifth is throttled");
    assert!(retry > Duration::from_millis(150) && retry <= Duration::from_millis(250), "retry {retry:?}");
    // A refund gives exactly one token back.
    store.refund("acme", "seg", 4, 4).await.unwrap();
    assert!(store.admit("acme", "seg", 4, 4).await.unwrap().is_ok(), "one token back");
    assert!(store.admit("acme", "seg", 4, 4).await.unwrap().is_err());
    // A refund of another shape is ignored; a new shape is a fresh (full) bucket.
    store.refund("acme", "seg", 8, 8).await.unwrap();
    assert!(store.admit("acme", "seg", 4, 4).await.unwrap().is_err());
    assert_eq!(store.admit("acme", "seg", 10, 10).await.unwrap(), Ok((9, 1)));
    // Another tenant's bucket is its own.
    assert_eq!(store.admit("globex", "seg", 4, 4).await.unwrap(), Ok((3, 1)));
    // A refund on a full bucket keeps it full, never fuller than its depth.
    store.refund("initech", "seg", 2, 2).await.unwrap();
    assert!(store.admit("initech", "seg", 2, 2).await.unwrap().is_ok());
    assert!(store.admit("initech", "seg", 2, 2).await.unwrap().is_ok());
    assert!(store.admit("initech", "seg", 2, 2).await.unwrap().is_err());
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
                let Some(idx) = store.reserve("acme", &cands, want, id, Duration::from_secs(30)).await.unwrap() else {
                    continue;
                };
                assert_eq!(idx, 1, "a package that cannot hold the whole factor never pays");
                // A retried reserve holds nothing more.
                assert_eq!(store.reserve("acme", &cands, want, id, Duration::from_secs(30)).await.unwrap(), Some(1));
                if (task + call) % 3 == 0 {
                    store.release("acme", id).await.unwrap();
                    store.release("acme", id).await.unwrap();
                    assert_eq!(store.commit("acme", id).await.unwrap(), None, "commit after release");
                } else {
                    let first = store.commit("acme", id).await.unwrap();
                    assert!(first.is_some(), "the first commit commits");
                    committed.fetch_add(1, Ordering::Relaxed);
                    assert_eq!(store.commit("acme", id).await.unwrap(), first, "a repeated commit is a replay");
                    store.release("acme", id).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let consumed = store.consumed("acme", "pkg").await.unwrap();
    assert_eq!(consumed, committed.load(Ordering::Relaxed) * want);
    assert!(consumed <= points, "consumed {consumed} > points {points}");
    assert_eq!(consumed, points, "enough calls to drain it");
    assert_eq!(store.held("acme", "pkg").await.unwrap(), 0);
    assert_eq!(store.consumed("acme", "small").await.unwrap(), 0);
}

/// Concurrent video takes over two packages: never past their points, each take's sum is what
/// the packages consumed, and a replay takes nothing more.
async fn take_up_to_never_takes_more_than_a_package_holds_under_concurrency(store: RedisStore) {
    let (a_pts, b_pts) = (7_000_000i64, 5_500_000i64);
    // A call in flight holds part of `a`: takes leave it alone.
    assert_eq!(store.reserve("acme", &[("a", a_pts)], 1_000_000, 1, Duration::from_secs(30)).await.unwrap(), Some(0));
    let taken = Arc::new(AtomicI64::new(0));
    let mut tasks = Vec::new();
    for task in 0..48u128 {
        let (store, taken) = (store.clone(), taken.clone());
        tasks.push(tokio::spawn(async move {
            let want = 250_000 + (task as i64 % 5) * 100_000;
            let from = [
                TakeFrom { package: "a", points: a_pts, want, alert_at: None },
                TakeFrom { package: "b", points: b_pts, want, alert_at: None },
            ];
            let id = 1000 + task;
            let got = store.take_up_to("acme", &from, id).await.unwrap();
            assert_eq!(got.len(), 2);
            for g in &got {
                assert!(g.taken >= 0 && g.taken <= want);
            }
            let again = store.take_up_to("acme", &from, id).await.unwrap();
            assert_eq!(again, got, "a replay answers the first take");
            taken.fetch_add(got.iter().map(|g| g.taken).sum::<i64>(), Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let a = store.consumed("acme", "a").await.unwrap();
    let b = store.consumed("acme", "b").await.unwrap();
    assert!(a <= a_pts - 1_000_000, "a: consumed {a} plus the hold exceeds its points");
    assert!(b <= b_pts, "b: consumed {b}");
    assert_eq!(a + b, taken.load(Ordering::Relaxed));
    assert_eq!((a, b), (a_pts - 1_000_000, b_pts), "48 takes of ≥ 0.25 points drain both");
}

async fn settlement_replay_is_idempotent(store: RedisStore) {
    let pts = 10_000_000;
    assert_eq!(store.reserve("acme", &[("p", pts)], 4_000_000, 7, Duration::from_secs(30)).await.unwrap(), Some(0));
    let s = Settle {
        hold: HoldAction::Commit,
        alert_at: Some(3_000_000),
        usage: Some(("face", "2026-11", "package", 1)),
        image: ImagePart::None,
        part: "s",
    };
    let first = store.settle("acme", 7, s).await.unwrap();
    assert_eq!(
        first,
        Settled { replay: false, hold: true, consumed: Some(4_000_000), cell_total: Some(1), alert_fired: true, images: None }
    );
    let again = store.settle("acme", 7, s).await.unwrap();
    assert_eq!(again, Settled { replay: true, ..first }, "a replay returns the first answer and applies nothing");
    assert_eq!(store.consumed("acme", "p").await.unwrap(), 4_000_000);
    // Usage added per (id, part): a repeat adds nothing, another id adds.
    assert_eq!(store.add_usage("acme", "face", "2026-11", "payg:", 1, 8, "u").await.unwrap(), 1);
    assert_eq!(store.add_usage("acme", "face", "2026-11", "payg:", 1, 8, "u").await.unwrap(), 1);
    assert_eq!(store.add_usage("acme", "face", "2026-11", "payg:", 2, 9, "u").await.unwrap(), 3);
    let month = store.month("acme", "2026-11").await.unwrap();
    assert_eq!(month, vec![("face".to_string(), vec![("package".to_string(), 1), ("payg:".to_string(), 3)])]);
}

async fn low_balance_alert_fires_once_under_concurrency(store: RedisStore) {
    let pts = 100_000_000i64;
    let fired = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..40u128 {
        let (store, fired) = (store.clone(), fired.clone());
        tasks.push(tokio::spawn(async move {
            if store.reserve("acme", &[("p", pts)], 2_000_000, id, Duration::from_secs(30)).await.unwrap().is_some() {
                let s = Settle {
                    hold: HoldAction::Commit,
                    alert_at: Some(pts - 80_000_000), // remaining ≤ 80 % of the points
                    usage: None,
                    image: ImagePart::None,
                    part: "s",
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
    assert!(!store.mark_alerted("acme", "p").await.unwrap(), "already fired");
    assert!(store.mark_alerted("acme", "q").await.unwrap(), "another package's first time");
    assert!(!store.mark_alerted("acme", "q").await.unwrap());
}

async fn sweep_gives_back_holds_and_image_slots_after_their_lease(store: RedisStore) {
    let pts = 2_000_000;
    let lease = Duration::from_millis(300);
    assert_eq!(store.reserve("acme", &[("p", pts)], 2_000_000, 1, lease).await.unwrap(), Some(0));
    assert_eq!(store.reserve("acme", &[("p", pts)], 2_000_000, 2, lease).await.unwrap(), None, "all held");
    assert!(store.reserve_image_slot("acme", 1, 3, lease).await.unwrap());
    assert!(!store.reserve_image_slot("acme", 1, 4, lease).await.unwrap(), "the one slot is held");
    // Before the lease ends, nothing is given back.
    assert_eq!(store.sweep().await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(store.sweep_tenant("acme").await.unwrap(), (1, 1));
    assert_eq!(store.held("acme", "p").await.unwrap(), 0);
    assert_eq!(store.commit("acme", 1).await.unwrap(), None, "a swept hold is not committed");
    assert_eq!(store.consumed("acme", "p").await.unwrap(), 0);
    assert_eq!(store.reserve("acme", &[("p", pts)], 2_000_000, 5, lease).await.unwrap(), Some(0), "the points are back");
    assert!(store.reserve_image_slot("acme", 1, 6, lease).await.unwrap(), "the slot is back");
    assert_eq!(store.sweep_tenant("acme").await.unwrap(), (0, 0));
}

async fn image_slots_respect_capacity_and_settle_once(store: RedisStore) {
    let lease = Duration::from_secs(30);
    let held = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for id in 0..20u128 {
        let (store, held) = (store.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            if store.reserve_image_slot("acme", 5, id, lease).await.unwrap() {
                held.fetch_add(1, Ordering::Relaxed);
                assert!(store.reserve_image_slot("acme", 5, id, lease).await.unwrap(), "idempotent on id");
                let n = store.settle_images("acme", id, ImagePart::Add).await.unwrap();
                assert_eq!(store.settle_images("acme", id, ImagePart::Add).await.unwrap(), n, "a replay");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(held.load(Ordering::Relaxed), 5, "capacity 5");
    assert_eq!(store.image_count("acme").await.unwrap(), 5);
    assert!(!store.reserve_image_slot("acme", 5, 100, lease).await.unwrap(), "full");
    assert_eq!(store.settle_images("acme", 101, ImagePart::Delete).await.unwrap(), 4);
    assert!(store.reserve_image_slot("acme", 5, 102, lease).await.unwrap());
    store.settle_images("acme", 102, ImagePart::Release).await.unwrap();
    assert_eq!(store.settle_images("acme", 103, ImagePart::Set(2)).await.unwrap(), 2, "a reported count wins");
    for id in 104..110 {
        store.settle_images("acme", id, ImagePart::Delete).await.unwrap();
    }
    assert_eq!(store.image_count("acme").await.unwrap(), 0, "never below zero");
}

async fn month_usage_and_overrides_read_back(store: RedisStore) {
    assert_eq!(store.month("acme", "2026-11").await.unwrap(), vec![]);
    store.add_usage("acme", "video", "2026-11", "payg:1080p", 90_000, 1, "u").await.unwrap();
    store.add_usage("acme", "face", "2026-11", "free_default", 1, 2, "u").await.unwrap();
    store.add_usage("acme", "face", "2026-12", "free_default", 1, 3, "u").await.unwrap();
    let m = store.month("acme", "2026-11").await.unwrap();
    assert_eq!(
        m,
        vec![
            ("face".to_string(), vec![("free_default".to_string(), 1)]),
            ("video".to_string(), vec![("payg:1080p".to_string(), 90_000)]),
        ]
    );
    store.put_override("acme", "face", r#"{"qps":10}"#).await.unwrap();
    store.put_override("acme", "face", r#"{"qps":10}"#).await.unwrap();
    store.put_override("globex", "seg", r#"{"qps":5}"#).await.unwrap();
    assert_eq!(
        store.overrides().await.unwrap(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_fails_within_the_timeout_and_a_restart_recovers() {
    let Some(mut s) = RedisServer::start("a_dead_server_fails_within_the_timeout", Opts::default()) else { return };
    let o = RedisOpts { op_timeout: Duration::from_millis(300), ..opts() };
    let store = RedisStore::connect(&[s.url()], o).await.unwrap();
    assert!(store.admit("acme", "face", 10, 10).await.unwrap().is_ok());
    s.kill9();
    let start = Instant::now();
    let err = store.admit("acme", "face", 10, 10).await.expect_err("Redis is down");
    assert!(start.elapsed() < Duration::from_millis(1500), "answered in {:?}: {err}", start.elapsed());
    s.restart();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match store.admit("acme", "face", 10, 10).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "no reconnect within 5 s: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `appendfsync always`: a commit Redis acknowledged survives kill -9 and a restart on the same
/// directory, and nothing is refilled.
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
        assert_eq!(store.reserve("acme", &[("p", pts)], 1_000_000, id, Duration::from_secs(30)).await.unwrap(), Some(0));
        assert!(store.commit("acme", id).await.unwrap().is_some());
    }
    s.kill9();
    s.restart();
    let store = RedisStore::connect(&[s.url()], opts()).await.unwrap();
    assert_eq!(store.consumed("acme", "p").await.unwrap(), pts, "every acknowledged commit is there");
    assert_eq!(store.reserve("acme", &[("p", pts)], 1_000_000, 9, Duration::from_secs(30)).await.unwrap(), None);
    assert_eq!(store.commit("acme", 3).await.unwrap(), Some(4_000_000), "the replay marker survived too");
}
