//! The value cache on every backend: single-flight within a process and across replicas (one
//! computation), a dead lease holder, a failing computation, decode failures, invalidation by
//! tag and prefix, negative caching, early refresh, stale-while-revalidate and stale-if-error.
//!
//! Freshness runs on a [`ManualClock`], so stale and early-refresh cases advance time instead
//! of sleeping; only the dead-holder case lets a real lease TTL elapse on the server.

use std::sync::atomic::AtomicUsize;

use super::*;
use crate::cache::{Binary, Cache, CacheStats, EntryOptions, ManualClock, Raw};

pub(super) fn cases() -> Vec<Case> {
    vec![
        case!(cache_get_set_delete_round_trip_with_every_codec),
        case!(cache_single_flight_in_process_computes_once),
        case!(cache_single_flight_across_replicas_computes_once),
        case!(cache_dead_lease_holder_expires_and_another_replica_computes),
        case!(cache_failed_computation_releases_the_lease),
        case!(cache_decode_failure_recomputes_and_overwrites),
        case!(cache_tag_invalidation_is_one_incr),
        case!(cache_prefix_invalidation_drops_matching_entries),
        case!(cache_negative_caching_is_explicit),
        case!(cache_xfetch_refreshes_once_before_expiry),
        case!(cache_stale_while_revalidate_has_one_refresher),
        case!(cache_stale_if_error_serves_stale_within_its_bound),
    ]
}

const CALLERS: usize = 100;
const REPLICAS: usize = 4;
const TTL: Duration = Duration::from_secs(60);
/// A start time for manual clocks (any value works; a realistic one reads well in failures).
const T0: u64 = 1_700_000_000_000;

type Boom = &'static str;

fn replica(c: &Ctx) -> Cache {
    Cache::builder(confined(c), "conf").build().unwrap()
}

fn manual(c: &Ctx, clock: &Arc<ManualClock>) -> crate::cache::CacheBuilder {
    Cache::builder(confined(c), "conf").clock(Arc::clone(clock) as Arc<dyn crate::cache::Clock>)
}

/// Waits (bounded) until `cond` holds; for conditions another task reaches on its own, such as
/// a replica meeting a held lease.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(ms(1)).await;
    }
}

async fn cache_get_set_delete_round_trip_with_every_codec(c: Ctx) {
    let cache = replica(&c);
    assert_eq!(cache.get::<String>("a").await.unwrap(), None);
    cache.set("a", &"alpha".to_owned(), None).await.unwrap();
    assert_eq!(
        cache.get::<String>("a").await.unwrap().as_deref(),
        Some("alpha")
    );
    let bin = cache.with_codec(Binary);
    bin.set("b", &(7u64, "seven".to_owned()), Some(TTL))
        .await
        .unwrap();
    assert_eq!(
        bin.get::<(u64, String)>("b").await.unwrap(),
        Some((7, "seven".to_owned()))
    );
    let raw = cache.with_codec(Raw);
    let bytes = vec![0u8, 0xff, b':', 0];
    raw.set("c\0d", &bytes, Some(TTL)).await.unwrap();
    assert_eq!(raw.get::<Vec<u8>>("c\0d").await.unwrap(), Some(bytes));
    // Every stored entry carries a TTL: nothing grows forever.
    let key = cache.entry_key_of(b"a", &EntryOptions::new()).await;
    assert!(matches!(
        c.b.ttl(&c.k(&key)).await.unwrap(),
        Ttl::Remaining(_)
    ));
    assert!(cache.delete("a").await.unwrap());
    assert!(!cache.delete("a").await.unwrap());
    assert_eq!(cache.get::<String>("a").await.unwrap(), None);
    assert_eq!(cache.stats().hits, 3);
}

async fn cache_single_flight_in_process_computes_once(c: Ctx) {
    let cache = replica(&c);
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let mut handles = Vec::new();
    for _ in 0..CALLERS {
        let (cache, runs, barrier, release) = (
            cache.clone(),
            Arc::clone(&runs),
            Arc::clone(&barrier),
            Arc::clone(&release),
        );
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            cache
                .get_or_compute("hot", TTL, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _permit = release.acquire().await.map_err(|_| "closed")?;
                    Ok::<_, Boom>(42u64)
                })
                .await
                .unwrap()
        }));
    }
    until("the computation started", || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    release.add_permits(1);
    for h in handles {
        assert_eq!(h.await.unwrap(), 42);
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one computation for {CALLERS} callers"
    );
    let s = cache.stats();
    assert_eq!(s.computations, 1);
    assert_eq!(s.hits + s.stampede_joined, (CALLERS - 1) as u64, "{s:?}");
}

async fn cache_single_flight_across_replicas_computes_once(c: Ctx) {
    // Four independent caches on one backend: four replicas, each with its own process-local
    // single-flight, sharing only the backend.
    let replicas: Vec<Cache> = (0..REPLICAS).map(|_| replica(&c)).collect();
    let runs = Arc::new(AtomicUsize::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let mut handles = Vec::new();
    for i in 0..CALLERS {
        let (cache, runs, barrier, release) = (
            replicas[i % REPLICAS].clone(),
            Arc::clone(&runs),
            Arc::clone(&barrier),
            Arc::clone(&release),
        );
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            cache
                .get_or_compute("hot", TTL, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _permit = release.acquire().await.map_err(|_| "closed")?;
                    Ok::<_, Boom>("value".to_owned())
                })
                .await
                .unwrap()
        }));
    }
    until("the computation started", || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    // Every other replica has met the held lease before the computation may finish.
    until("the other replicas wait on the lease", || {
        replicas
            .iter()
            .filter(|r| r.stats().lease_waits >= 1)
            .count()
            == REPLICAS - 1
    })
    .await;
    release.add_permits(1);
    for h in handles {
        assert_eq!(h.await.unwrap(), "value");
    }
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "one computation across {REPLICAS} replicas"
    );
    let total = replicas
        .iter()
        .map(Cache::stats)
        .fold(CacheStats::default(), |a, s| CacheStats {
            computations: a.computations + s.computations,
            stampede_joined: a.stampede_joined + s.stampede_joined,
            hits: a.hits + s.hits,
            ..a
        });
    assert_eq!(total.computations, 1, "{total:?}");
    assert_eq!(
        total.hits + total.stampede_joined,
        (CALLERS - 1) as u64,
        "{total:?}"
    );
    // The lease is gone once the value is stored.
    let lease = replicas[0].lease_key_of(b"hot", &EntryOptions::new()).await;
    assert_eq!(c.b.get(&c.k(&lease)).await.unwrap(), None);
}

async fn cache_dead_lease_holder_expires_and_another_replica_computes(c: Ctx) {
    let cache = Cache::builder(confined(&c), "conf")
        .lease_wait(Duration::from_secs(30))
        .build()
        .unwrap();
    // A replica took the lease and died: its lease stays until its TTL.
    let lease = cache.lease_key_of(b"k", &EntryOptions::new()).await;
    // Long enough that the call below meets it even on a loaded machine (at 300 ms it once
    // expired before the first `set_nx` under nine parallel columns).
    let dead_ttl = ms(2_000);
    assert!(
        c.b.set_nx(&c.k(&lease), b"dead-owner-nonce", Some(dead_ttl))
            .await
            .unwrap()
    );
    let started = Instant::now();
    let v = cache
        .get_or_compute("k", TTL, || async { Ok::<_, Boom>(5u8) })
        .await
        .unwrap();
    assert_eq!(v, 5);
    // It waited on the dead lease (one lease wait) and computed once the lease expired, well
    // before its own 30 s wait bound would have let it compute without the lease. (No lower
    // bound on the time: the embedded engines measure TTLs on their own coarse clocks.)
    assert!(
        started.elapsed() < Duration::from_secs(25),
        "fell back to the wait bound"
    );
    let s = cache.stats();
    assert_eq!((s.computations, s.lease_waits), (1, 1), "{s:?}");
    assert_eq!(cache.get::<u8>("k").await.unwrap(), Some(5));
}

async fn cache_failed_computation_releases_the_lease(c: Ctx) {
    let a = replica(&c);
    let b = replica(&c);
    let started = Arc::new(tokio::sync::Semaphore::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let leader = {
        let (a, started, release) = (a.clone(), Arc::clone(&started), Arc::clone(&release));
        tokio::spawn(async move {
            a.get_or_compute("k", TTL, || async {
                started.add_permits(1);
                let _p = release.acquire().await.map_err(|_| "closed")?;
                Err::<u32, Boom>("origin down")
            })
            .await
        })
    };
    started.acquire().await.unwrap().forget();
    // A caller in the same process joins the failing flight; a caller on another replica
    // waits on the lease.
    let follower = {
        let a = a.clone();
        tokio::spawn(async move {
            a.get_or_compute("k", TTL, || async { Ok::<u32, Boom>(999) })
                .await
        })
    };
    let b_runs = Arc::new(AtomicUsize::new(0));
    let other = {
        let (b, b_runs) = (b.clone(), Arc::clone(&b_runs));
        tokio::spawn(async move {
            b.get_or_compute("k", TTL, || async {
                b_runs.fetch_add(1, Ordering::SeqCst);
                Ok::<u32, Boom>(7)
            })
            .await
        })
    };
    until("the other replica waits on the lease", || {
        b.stats().lease_waits == 1
    })
    .await;
    release.add_permits(1);
    let led = leader.await.unwrap().unwrap_err();
    assert_eq!(*led, "origin down");
    // The in-process follower shares the leader's error (unless it arrived after the flight
    // ended, in which case it found the lease released and computed itself).
    match follower.await.unwrap() {
        Err(e) => assert!(Arc::ptr_eq(&e, &led), "the follower got the leader's error"),
        Ok(v) => assert!(v == 999 || v == 7, "got {v}"),
    }
    // The other replica found the lease released without a value and computed.
    let got = other.await.unwrap().unwrap();
    assert!(got == 7 || got == 999, "got {got}");
    assert!(b_runs.load(Ordering::SeqCst) <= 1);
    // Nothing failed is cached: a fresh caller sees the successful value.
    let now = a
        .get_or_compute("k", TTL, || async { Ok::<u32, Boom>(1) })
        .await
        .unwrap();
    assert_eq!(now, got);
    let lease = a.lease_key_of(b"k", &EntryOptions::new()).await;
    assert_eq!(
        c.b.get(&c.k(&lease)).await.unwrap(),
        None,
        "no lease left behind"
    );
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct UserV1 {
    id: u64,
    name: String,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct UserV2 {
    id: u64,
    name: String,
    email: String,
}

async fn cache_decode_failure_recomputes_and_overwrites(c: Ctx) {
    for binary in [false, true] {
        let json = replica(&c);
        let key = if binary { "user-bin" } else { "user-json" };
        let v1 = UserV1 {
            id: 1,
            name: "ada".into(),
        };
        let v2 = UserV2 {
            id: 1,
            name: "ada".into(),
            email: "ada@example.com".into(),
        };
        // An older build stored the old struct; this build reads the new one.
        let got = if binary {
            let cache = json.with_codec(Binary);
            cache.set(key, &v1, None).await.unwrap();
            let got = cache
                .get_or_compute(key, TTL, || async { Ok::<_, Boom>(v2.clone()) })
                .await
                .unwrap();
            assert_eq!(cache.get::<UserV2>(key).await.unwrap(), Some(v2.clone()));
            got
        } else {
            json.set(key, &v1, None).await.unwrap();
            let got = json
                .get_or_compute(key, TTL, || async { Ok::<_, Boom>(v2.clone()) })
                .await
                .unwrap();
            assert_eq!(json.get::<UserV2>(key).await.unwrap(), Some(v2.clone()));
            got
        };
        assert_eq!(got, v2);
        let s = json.stats();
        // The entry is read twice on a miss (before and after taking the lease), so the one
        // stale struct may be reported twice; it is computed once.
        assert!(s.decode_failures >= 1, "{s:?}");
        assert_eq!(s.computations, 1, "{s:?}");
    }
    // Bytes that are no cache entry at all (another writer) are a miss too.
    let cache = replica(&c);
    let key = cache.entry_key_of(b"junk", &EntryOptions::new()).await;
    c.b.set(&c.k(&key), b"\x09not an entry", None)
        .await
        .unwrap();
    let v = cache
        .get_or_compute("junk", TTL, || async { Ok::<_, Boom>(3u8) })
        .await
        .unwrap();
    assert_eq!(v, 3);
    assert_eq!(cache.get::<u8>("junk").await.unwrap(), Some(3));
}

async fn cache_tag_invalidation_is_one_incr(c: Ctx) {
    let cache = replica(&c);
    let runs = AtomicUsize::new(0);
    let tagged = EntryOptions::new().ttl(TTL).tags(["user:1", "team:9"]);
    let other = EntryOptions::new().ttl(TTL).tags(["user:2"]);
    let compute = |v: u32| {
        runs.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, Boom>(v) }
    };
    assert_eq!(
        cache
            .get_or_compute_with("profile:1", &tagged, || compute(1))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        cache
            .get_or_compute_with("profile:2", &other, || compute(2))
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        cache
            .get_or_compute_with("profile:1", &tagged, || compute(10))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        cache.get_with::<u32>("profile:1", &tagged).await.unwrap(),
        Some(1)
    );
    // Another replica invalidates the team: one incr.
    assert_eq!(replica(&c).invalidate_tag("team:9").await.unwrap(), 1);
    assert_eq!(
        cache.get_with::<u32>("profile:1", &tagged).await.unwrap(),
        None
    );
    assert_eq!(
        cache
            .get_or_compute_with("profile:1", &tagged, || compute(11))
            .await
            .unwrap(),
        11
    );
    assert_eq!(
        cache
            .get_or_compute_with("profile:2", &other, || compute(20))
            .await
            .unwrap(),
        2
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3);
    // Tagged entries can be deleted by key with their tags.
    assert!(cache.delete_with("profile:1", &tagged).await.unwrap());
    assert_eq!(
        cache.get_with::<u32>("profile:1", &tagged).await.unwrap(),
        None
    );
}

async fn cache_prefix_invalidation_drops_matching_entries(c: Ctx) {
    let cache = replica(&c);
    for key in ["user:1", "user:2", "team:1"] {
        cache.set(key, &key.to_owned(), Some(TTL)).await.unwrap();
    }
    cache
        .set_with(
            "user:3",
            &"tagged".to_owned(),
            &EntryOptions::new().tags(["t"]),
        )
        .await
        .unwrap();
    assert_eq!(cache.invalidate_prefix("user:").await.unwrap(), 3);
    assert_eq!(cache.get::<String>("user:1").await.unwrap(), None);
    assert_eq!(cache.get::<String>("user:2").await.unwrap(), None);
    assert_eq!(
        cache.get::<String>("team:1").await.unwrap().as_deref(),
        Some("team:1")
    );
    assert!(cache.clear().await.unwrap() >= 1);
    assert_eq!(cache.get::<String>("team:1").await.unwrap(), None);
}

async fn cache_negative_caching_is_explicit(c: Ctx) {
    let cache = replica(&c);
    let runs = AtomicUsize::new(0);
    let lookup = || {
        runs.fetch_add(1, Ordering::SeqCst);
        async { Ok::<Option<String>, Boom>(None) }
    };
    let plain = EntryOptions::new().ttl(TTL);
    assert_eq!(
        cache
            .get_or_compute_optional("ghost", &plain, lookup)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        cache
            .get_or_compute_optional("ghost", &plain, lookup)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "None is not cached unless asked"
    );
    let negative = plain.clone().negative_ttl(TTL);
    assert_eq!(
        cache
            .get_or_compute_optional("ghost", &negative, lookup)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        cache
            .get_or_compute_optional("ghost", &negative, lookup)
            .await
            .unwrap(),
        None
    );
    assert_eq!(runs.load(Ordering::SeqCst), 3, "a cached None is a hit");
    // get_or_compute never returns a cached negative: it computes.
    let v = cache
        .get_or_compute("ghost", TTL, || async { Ok::<_, Boom>("found".to_owned()) })
        .await
        .unwrap();
    assert_eq!(v, "found");
    // Errors are never cached.
    let failing = || async { Err::<Option<String>, Boom>("down") };
    assert!(
        cache
            .get_or_compute_optional("err", &negative, failing)
            .await
            .is_err()
    );
    assert_eq!(
        cache
            .get_or_compute_optional("err", &negative, || async {
                Ok::<_, Boom>(Some("up".to_owned()))
            })
            .await
            .unwrap()
            .as_deref(),
        Some("up")
    );
}

async fn cache_xfetch_refreshes_once_before_expiry(c: Ctx) {
    let clock = ManualClock::new(T0);
    // A large β makes the draw near-certain a millisecond before expiry, and near-impossible
    // a minute before it.
    let cache = manual(&c, &clock).xfetch_beta(1_000.0).build().unwrap();
    let runs = AtomicUsize::new(0);
    let compute = || {
        let n = runs.fetch_add(1, Ordering::SeqCst) as u32;
        async move { Ok::<_, Boom>(n) }
    };
    assert_eq!(cache.get_or_compute("k", TTL, compute).await.unwrap(), 0);
    for _ in 0..20 {
        assert_eq!(cache.get_or_compute("k", TTL, compute).await.unwrap(), 0);
    }
    assert_eq!(
        cache.stats().refreshes,
        0,
        "no early refresh a minute before expiry"
    );
    clock.advance(TTL - ms(1));
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen.push(cache.get_or_compute("k", TTL, compute).await.unwrap());
    }
    let s = cache.stats();
    assert_eq!(s.refreshes, 1, "{s:?}");
    assert_eq!(s.computations, 2, "{s:?}");
    assert_eq!(*seen.last().unwrap(), 1, "the refreshed value is served");
    assert_eq!(s.misses, 1, "the entry never expired: {s:?}");
}

async fn cache_stale_while_revalidate_has_one_refresher(c: Ctx) {
    let clock = ManualClock::new(T0);
    let cache = manual(&c, &clock)
        .xfetch_beta(0.0)
        .stale_while_revalidate(Duration::from_secs(300))
        .build()
        .unwrap();
    let ttl = Duration::from_secs(10);
    cache
        .get_or_compute("k", ttl, || async { Ok::<_, Boom>("old".to_owned()) })
        .await
        .unwrap();
    clock.advance(Duration::from_secs(15));
    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLERS));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for _ in 0..CALLERS {
        let (cache, runs, release, barrier, tx) = (
            cache.clone(),
            Arc::clone(&runs),
            Arc::clone(&release),
            Arc::clone(&barrier),
            tx.clone(),
        );
        tokio::spawn(async move {
            barrier.wait().await;
            let v = cache
                .get_or_compute("k", ttl, || async {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let _p = release.acquire().await.map_err(|_| "closed")?;
                    Ok::<_, Boom>("new".to_owned())
                })
                .await
                .unwrap();
            let _ = tx.send(v);
        });
    }
    drop(tx);
    // Every caller but the refresher gets the stale value while the refresh is held.
    for _ in 0..CALLERS - 1 {
        assert_eq!(rx.recv().await.unwrap(), "old");
    }
    // The refresher took the lease before the others read it held; it may not have reached its
    // computation yet.
    until("the refresher computes", || {
        runs.load(Ordering::SeqCst) >= 1
    })
    .await;
    release.add_permits(1);
    assert_eq!(rx.recv().await.unwrap(), "new");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "exactly one refresher");
    let s = cache.stats();
    assert_eq!((s.refreshes, s.stale), (1, (CALLERS - 1) as u64), "{s:?}");
    assert_eq!(
        cache.get::<String>("k").await.unwrap().as_deref(),
        Some("new")
    );
}

async fn cache_stale_if_error_serves_stale_within_its_bound(c: Ctx) {
    let clock = ManualClock::new(T0);
    let cache = manual(&c, &clock)
        .xfetch_beta(0.0)
        .stale_if_error(Duration::from_secs(30))
        .build()
        .unwrap();
    let ttl = Duration::from_secs(10);
    cache
        .get_or_compute("k", ttl, || async { Ok::<_, Boom>(1u32) })
        .await
        .unwrap();
    let failing = || async { Err::<u32, Boom>("origin down") };
    // Fresh: no computation at all.
    assert_eq!(cache.get_or_compute("k", ttl, failing).await.unwrap(), 1);
    // Stale within the window: the failure is hidden behind the stale value.
    clock.advance(Duration::from_secs(20));
    assert_eq!(cache.get_or_compute("k", ttl, failing).await.unwrap(), 1);
    assert_eq!(cache.stats().stale, 1);
    // Past the window (10 s TTL + 30 s): the error comes through.
    clock.advance(Duration::from_secs(25));
    assert_eq!(
        *cache.get_or_compute("k", ttl, failing).await.unwrap_err(),
        "origin down"
    );
    // A success stores again.
    assert_eq!(
        cache
            .get_or_compute("k", ttl, || async { Ok::<_, Boom>(2u32) })
            .await
            .unwrap(),
        2
    );
}
