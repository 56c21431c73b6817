//! The engine's semantics, operation by operation, with a manual clock so expiry is exact and
//! nothing sleeps. Each test runs on a memory-only store and on a durable store, and the
//! durable ones are reopened to check that what was acknowledged survives.

use std::sync::Arc;
use std::time::Duration;

use keel_engine::{
    Batch, Db, Durability, Error, Limits, ManualClock, Options, TTL_MAX, Ttl, TtlPolicy,
};

const T0: u64 = 1_700_000_000_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

struct Fixture {
    clock: ManualClock,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        Fixture {
            clock: ManualClock::new(T0),
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn options(&self) -> Options {
        Options::default().clock(Arc::new(self.clock.clone()))
    }
    fn open(&self) -> Db {
        Db::open(self.dir.path(), self.options()).unwrap()
    }
    fn memory(&self) -> Db {
        Db::memory(self.options())
    }
    /// Both kinds of store, for tests whose semantics must not depend on durability.
    fn both(&self) -> [Db; 2] {
        [self.memory(), self.open()]
    }
}

#[test]
fn get_set_delete_round_trip_binary_data() {
    let f = Fixture::new();
    for db in f.both() {
        assert_eq!(db.get(b"\x00\xff"), None);
        db.set(b"\x00\xff", b"\xfe\x00v", None).unwrap();
        assert_eq!(db.get(b"\x00\xff"), Some(b"\xfe\x00v".to_vec()));
        db.set(b"", b"", None).unwrap();
        assert_eq!(
            db.get(b""),
            Some(vec![]),
            "empty key and empty value are values"
        );
        assert!(db.delete(b"\x00\xff").unwrap());
        assert!(!db.delete(b"\x00\xff").unwrap());
        assert_eq!(db.get(b"\x00\xff"), None);
    }
}

#[test]
fn expiry_is_exact_to_the_millisecond() {
    let f = Fixture::new();
    for db in f.both() {
        db.set("k", "v", Some(ms(100))).unwrap();
        f.clock.advance(ms(99));
        assert_eq!(db.get_with_ttl("k"), Some((b"v".to_vec(), Some(ms(1)))));
        f.clock.advance(ms(1));
        assert_eq!(
            db.get("k"),
            None,
            "a key is invisible the instant it expires"
        );
        assert_eq!(db.ttl("k"), Ttl::Missing);
        assert!(!db.delete("k").unwrap());
        assert!(
            db.set_nx("k", "again", None).unwrap(),
            "set_nx succeeds on an expired key"
        );
        assert_eq!(db.ttl("k"), Ttl::NoExpiry);
        db.delete("k").unwrap();
    }
}

#[test]
fn sub_millisecond_ttl_rounds_up_and_zero_or_huge_is_refused() {
    let f = Fixture::new();
    for db in f.both() {
        db.set("k", "v", Some(Duration::from_micros(1))).unwrap();
        assert_eq!(db.ttl("k"), Ttl::Remaining(ms(1)));
        for bad in [Duration::ZERO, TTL_MAX + ms(1)] {
            assert!(matches!(
                db.set("z", "v", Some(bad)),
                Err(Error::InvalidTtl { .. })
            ));
            assert!(matches!(
                db.set_nx("z", "v", Some(bad)),
                Err(Error::InvalidTtl { .. })
            ));
            assert!(matches!(
                db.incr("z", 1, Some(bad)),
                Err(Error::InvalidTtl { .. })
            ));
            assert!(matches!(db.expire("k", bad), Err(Error::InvalidTtl { .. })));
            assert!(matches!(
                db.compare_and_swap("z", None, "v", TtlPolicy::Set(bad)),
                Err(Error::InvalidTtl { .. })
            ));
        }
        assert_eq!(db.get("z"), None, "nothing was written");
        assert_eq!(
            db.ttl("k"),
            Ttl::Remaining(ms(1)),
            "a bad expire changes nothing"
        );
    }
}

#[test]
fn set_replaces_ttl_and_set_nx_respects_live_keys() {
    let f = Fixture::new();
    for db in f.both() {
        db.set("k", "1", Some(ms(50))).unwrap();
        db.set("k", "2", None).unwrap();
        f.clock.advance(ms(60));
        assert_eq!(db.get("k"), Some(b"2".to_vec()));
        assert!(!db.set_nx("k", "3", None).unwrap());
        assert_eq!(db.get("k"), Some(b"2".to_vec()));
        db.delete("k").unwrap();
    }
}

#[test]
fn compare_and_swap_and_delete() {
    let f = Fixture::new();
    for db in f.both() {
        assert!(
            !db.compare_and_swap("k", Some(b"x"), "y", TtlPolicy::Keep)
                .unwrap()
        );
        assert!(
            db.compare_and_swap("k", None, "a", TtlPolicy::Set(ms(100)))
                .unwrap()
        );
        assert!(
            !db.compare_and_swap("k", None, "b", TtlPolicy::Keep)
                .unwrap()
        );
        f.clock.advance(ms(10));
        assert!(
            db.compare_and_swap("k", Some(b"a"), "b", TtlPolicy::Keep)
                .unwrap()
        );
        assert_eq!(
            db.ttl("k"),
            Ttl::Remaining(ms(90)),
            "Keep keeps the absolute expiry"
        );
        assert!(
            db.compare_and_swap("k", Some(b"b"), "c", TtlPolicy::Set(ms(500)))
                .unwrap()
        );
        assert_eq!(db.ttl("k"), Ttl::Remaining(ms(500)));
        assert!(
            db.compare_and_swap("k", Some(b"c"), "d", TtlPolicy::Clear)
                .unwrap()
        );
        assert_eq!(db.ttl("k"), Ttl::NoExpiry);
        assert!(!db.compare_and_delete("k", "c").unwrap());
        assert!(db.compare_and_delete("k", "d").unwrap());
        assert_eq!(db.get("k"), None);
        // An expired value cannot be matched, only replaced as absent.
        db.set("e", "old", Some(ms(5))).unwrap();
        f.clock.advance(ms(5));
        assert!(
            !db.compare_and_swap("e", Some(b"old"), "x", TtlPolicy::Keep)
                .unwrap()
        );
        assert!(!db.compare_and_delete("e", "old").unwrap());
        assert!(
            db.compare_and_swap("e", None, "new", TtlPolicy::Keep)
                .unwrap()
        );
        assert_eq!(db.ttl("e"), Ttl::NoExpiry);
        db.delete("e").unwrap();
    }
}

#[test]
fn incr_grammar_overflow_and_ttl_on_create() {
    let f = Fixture::new();
    for db in f.both() {
        assert_eq!(db.incr("n", 5, Some(ms(1000))).unwrap(), 5);
        f.clock.advance(ms(400));
        assert_eq!(db.incr("n", -7, Some(ms(50_000))).unwrap(), -2);
        assert_eq!(
            db.ttl("n"),
            Ttl::Remaining(ms(600)),
            "TTL is stamped only on create"
        );
        assert_eq!(db.get("n"), Some(b"-2".to_vec()));
        db.set("n", "9223372036854775807", None).unwrap();
        assert!(matches!(db.incr("n", 1, None), Err(Error::Overflow)));
        assert_eq!(db.get("n"), Some(b"9223372036854775807".to_vec()));
        for bad in ["+1", "01", "-0", " 1", "1.0", "", "x"] {
            db.set("n", bad, Some(ms(100))).unwrap();
            assert!(
                matches!(db.incr("n", 1, None), Err(Error::NotAnInteger)),
                "{bad:?}"
            );
            assert_eq!(db.get("n"), Some(bad.as_bytes().to_vec()));
            assert_eq!(db.ttl("n"), Ttl::Remaining(ms(100)));
        }
        db.delete("n").unwrap();
    }
}

#[test]
fn expire_persist_and_ttl() {
    let f = Fixture::new();
    for db in f.both() {
        assert_eq!(db.ttl("k"), Ttl::Missing);
        assert!(!db.expire("k", ms(10)).unwrap());
        assert!(!db.persist("k").unwrap());
        db.set("k", "v", None).unwrap();
        assert!(!db.persist("k").unwrap());
        assert!(db.expire("k", ms(10)).unwrap());
        assert_eq!(db.ttl("k"), Ttl::Remaining(ms(10)));
        assert!(db.persist("k").unwrap());
        assert_eq!(db.ttl("k"), Ttl::NoExpiry);
        db.delete("k").unwrap();
    }
}

#[test]
fn scan_pages_return_each_live_key_exactly_once_in_order() {
    let f = Fixture::new();
    for db in f.both() {
        for i in 0..1000u32 {
            db.set(format!("p/{i:04}"), i.to_string(), None).unwrap();
        }
        db.set("p/dead", "x", Some(ms(1))).unwrap();
        db.set("q/0", "x", None).unwrap();
        f.clock.advance(ms(1));
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = db.scan("p/", cursor.as_ref(), 33, true);
            assert!(page.entries.len() <= 33);
            for e in &page.entries {
                let i: u32 = std::str::from_utf8(&e.key[2..]).unwrap().parse().unwrap();
                assert_eq!(e.value.as_deref(), Some(i.to_string().as_bytes()));
                assert_eq!(e.expires_at_ms, None);
            }
            seen.extend(page.entries.into_iter().map(|e| e.key));
            match page.next {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        let expected: Vec<Vec<u8>> = (0..1000u32)
            .map(|i| format!("p/{i:04}").into_bytes())
            .collect();
        assert_eq!(seen, expected);
    }
}

#[test]
fn scan_under_concurrent_writes_returns_stable_keys_exactly_once() {
    let f = Fixture::new();
    let db = f.memory();
    for i in 0..2000u32 {
        db.set(format!("s/{i:05}"), "v", None).unwrap();
    }
    let writer = {
        let db = db.clone();
        std::thread::spawn(move || {
            for i in 0..2000u32 {
                db.set(format!("s/{:05}x", (i * 7) % 2000), "v", None)
                    .unwrap();
                db.delete(format!("s/{:05}x", (i * 13) % 2000)).unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = db.scan("s/", cursor.as_ref(), 50, false);
        seen.extend(page.entries.into_iter().map(|e| e.key));
        match page.next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    writer.join().unwrap();
    let stable: Vec<Vec<u8>> = seen
        .iter()
        .filter(|k| !k.ends_with(b"x"))
        .cloned()
        .collect();
    let expected: Vec<Vec<u8>> = (0..2000u32)
        .map(|i| format!("s/{i:05}").into_bytes())
        .collect();
    assert_eq!(stable, expected, "each stable key exactly once, in order");
}

#[test]
fn oversize_inputs_are_refused_and_write_nothing() {
    let f = Fixture::new();
    let limits = Limits {
        max_key_bytes: 8,
        max_value_bytes: 16,
        max_batch_ops: 3,
        max_batch_bytes: 1024,
    };
    let db = Db::open(f.dir.path(), f.options().limits(limits)).unwrap();
    assert!(matches!(
        db.set("123456789", "v", None),
        Err(Error::KeyTooLarge { len: 9, max: 8 })
    ));
    assert!(matches!(
        db.set("k", [0u8; 17], None),
        Err(Error::ValueTooLarge { len: 17, max: 16 })
    ));
    assert!(matches!(
        db.incr("123456789", 1, None),
        Err(Error::KeyTooLarge { .. })
    ));
    let mut batch = Batch::new();
    batch
        .set("a", "1", None)
        .set("b", "2", None)
        .set("c", "3", None)
        .set("d", "4", None);
    assert!(matches!(
        db.write_batch(&batch),
        Err(Error::BatchTooLarge { ops: 4, .. })
    ));
    let mut batch = Batch::new();
    batch.set("a", "1", None).set("123456789", "2", None);
    assert!(matches!(
        db.write_batch(&batch),
        Err(Error::KeyTooLarge { .. })
    ));
    assert_eq!(db.get("a"), None, "a rejected batch writes nothing");
    assert_eq!(
        db.stats().wal_bytes,
        32,
        "nothing reached the WAL beyond its header"
    );
    db.close().unwrap();
    let db = Db::open(f.dir.path(), f.options()).unwrap();
    assert_eq!(db.stats().keys, 0);
}

#[test]
fn batch_is_all_or_nothing_and_survives_reopen() {
    let f = Fixture::new();
    let db = f.open();
    db.set("gone", "x", None).unwrap();
    let mut batch = Batch::new();
    batch
        .set("a", "1", Some(ms(1000)))
        .set("b", "2", None)
        .delete("gone")
        .set("a", "3", None);
    db.write_batch(&batch).unwrap();
    assert_eq!(
        db.get("a"),
        Some(b"3".to_vec()),
        "later operations on a key win"
    );
    assert_eq!(db.ttl("a"), Ttl::NoExpiry);
    db.close().unwrap();
    let db = f.open();
    assert_eq!(db.get("a"), Some(b"3".to_vec()));
    assert_eq!(db.get("b"), Some(b"2".to_vec()));
    assert_eq!(db.get("gone"), None);
}

#[test]
fn restart_keeps_absolute_expiry_and_expired_keys_stay_gone() {
    let f = Fixture::new();
    let db = f.open();
    db.set("short", "v", Some(ms(100))).unwrap();
    db.set("long", "v", Some(ms(10_000))).unwrap();
    db.incr("n", 1, Some(ms(5_000))).unwrap();
    db.set("forever", "v", None).unwrap();
    db.close().unwrap();
    f.clock.advance(ms(1_000));
    let db = f.open();
    assert_eq!(db.get("short"), None, "expired while closed: stays gone");
    assert_eq!(
        db.ttl("long"),
        Ttl::Remaining(ms(9_000)),
        "expiry is absolute, not re-armed"
    );
    assert_eq!(db.ttl("n"), Ttl::Remaining(ms(4_000)));
    assert_eq!(db.ttl("forever"), Ttl::NoExpiry);
    assert_eq!(db.stats().keys, 3);
}

#[test]
fn clock_stepped_back_does_not_resurrect_keys_across_restart() {
    let f = Fixture::new();
    let db = f.open();
    db.set("k", "v", Some(ms(100))).unwrap();
    f.clock.advance(ms(200));
    db.set("later", "v", None).unwrap(); // logged at T0+200
    db.close().unwrap();
    f.clock.set_ms(T0); // the wall clock jumps back
    let db = f.open();
    assert_eq!(
        db.get("k"),
        None,
        "the store's clock is floored at the newest logged time"
    );
    assert!(db.now_ms() >= T0 + 200);
}

#[test]
fn active_expirer_reclaims_memory_and_logs_deletions() {
    let f = Fixture::new();
    let opts = f.options().active_expiry(Duration::from_millis(1), 64);
    let db = Db::open(f.dir.path(), opts.clone()).unwrap();
    for i in 0..5000u32 {
        db.set(format!("k{i}"), "v", Some(ms(10))).unwrap();
    }
    db.set("keep", "v", None).unwrap();
    f.clock.advance(ms(10));
    // Bounded work per tick: reclaiming 5,000 keys takes many ticks. Wait for it by polling the
    // expirer's own counter (the expirer runs on a 1 ms period).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while db.stats().expired_reclaimed < 5000 {
        assert!(
            std::time::Instant::now() < deadline,
            "expirer stalled: {:?}",
            db.stats()
        );
        std::thread::yield_now();
    }
    assert_eq!(db.stats().keys, 1);
    db.close().unwrap();
    f.clock.set_ms(T0); // even with the clock stepped back, the logged deletions hold
    let db = Db::open(f.dir.path(), f.options()).unwrap();
    assert_eq!(db.stats().keys, 1);
    assert_eq!(db.get("keep"), Some(b"v".to_vec()));
}

#[test]
fn second_open_of_the_same_directory_is_locked() {
    let f = Fixture::new();
    let db = f.open();
    match Db::open(f.dir.path(), f.options()) {
        Err(Error::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(db);
    let _again = f.open();
}

#[test]
fn lock_wait_gives_up_with_locked_after_the_wait() {
    let f = Fixture::new();
    let _held = f.open();
    let started = std::time::Instant::now();
    let r = Db::open(f.dir.path(), f.options().lock_wait(ms(50)));
    assert!(matches!(r, Err(Error::Locked { .. })), "{r:?}");
    assert!(started.elapsed() >= ms(50));
}

#[test]
fn with_durability_shares_the_store() {
    let f = Fixture::new();
    let db = Db::open(f.dir.path(), f.options().durability(Durability::Buffered)).unwrap();
    let durable = db.with_durability(Durability::Immediate);
    assert_eq!(durable.incr("fence", 1, None).unwrap(), 1);
    assert_eq!(db.get("fence"), Some(b"1".to_vec()));
    let before = durable.stats().wal_fsyncs;
    durable.incr("fence", 1, None).unwrap();
    assert!(
        durable.stats().wal_fsyncs > before,
        "an Immediate write is fsynced even on a Buffered store"
    );
    assert!(durable.stats().durable_lsn >= 2);
}

#[test]
fn every_durability_mode_survives_a_clean_close() {
    for durability in [
        Durability::Immediate,
        Durability::Periodic(ms(50)),
        Durability::Buffered,
    ] {
        let f = Fixture::new();
        let db = Db::open(f.dir.path(), f.options().durability(durability)).unwrap();
        for i in 0..500u32 {
            db.set(format!("k{i}"), i.to_string(), None).unwrap();
        }
        db.close().unwrap();
        let db = f.open();
        assert_eq!(db.stats().keys, 500, "{durability:?}");
        assert_eq!(db.get("k499"), Some(b"499".to_vec()));
    }
}

#[test]
fn wal_rolls_segments_and_replays_them_in_order() {
    let f = Fixture::new();
    let db = Db::open(f.dir.path(), f.options().wal_segment_bytes(4096)).unwrap();
    for i in 0..2000u32 {
        db.set(format!("k{}", i % 300), i.to_string(), None)
            .unwrap();
    }
    let stats = db.stats();
    assert!(stats.wal_segments > 10, "{stats:?}");
    db.close().unwrap();
    let db = f.open();
    let r = db.stats().recovery.unwrap();
    assert_eq!(r.records, 2000);
    assert_eq!(db.stats().keys, 300);
    assert_eq!(db.get("k299"), Some(b"1799".to_vec()));
    assert_eq!(db.get("k199"), Some(b"1999".to_vec()));
}

#[test]
fn async_pending_resolves_when_durable() {
    let f = Fixture::new();
    let db = f.open();
    let pending = db
        .submit(keel_engine::Op::Incr {
            key: b"n",
            delta: 2,
            ttl_on_create: None,
        })
        .unwrap();
    // Drive the future with a minimal executor: the WAL writer thread wakes it.
    let outcome = block_on(pending).unwrap();
    assert_eq!(outcome, keel_engine::Outcome::Int(2));
    assert!(db.stats().durable_lsn >= 1);
}

/// Async writers on several threads, each driving its own `Pending` futures: a commit hands
/// their wakers off, and a waiter that finds its record durable wakes the others', so threads
/// wake each other. Every write resolves (none is left asleep) with the right count, and every
/// acknowledged increment is there after a reopen.
#[test]
fn async_writers_woken_through_the_hand_off_all_resolve_and_survive_a_reopen() {
    const THREADS: usize = 8;
    const WRITES_PER_THREAD: i64 = 300;
    let f = Fixture::new();
    let db = f.open();
    let writes = db.with_durability(Durability::Immediate).for_async();
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let writes = writes.clone();
            std::thread::spawn(move || {
                let key = format!("writer:{t}");
                for n in 1..=WRITES_PER_THREAD {
                    let pending = writes
                        .submit(keel_engine::Op::Incr {
                            key: key.as_bytes(),
                            delta: 1,
                            ttl_on_create: None,
                        })
                        .unwrap();
                    assert_eq!(block_on(pending).unwrap(), keel_engine::Outcome::Int(n));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // The last handle closes the store and releases its lock.
    drop(writes);
    db.close().unwrap();
    let db = f.open();
    for t in 0..THREADS {
        let value = WRITES_PER_THREAD.to_string().into_bytes();
        assert_eq!(db.get(format!("writer:{t}")), Some(value));
    }
}

fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    use std::task::{Context, Poll, Wake, Waker};
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending => std::thread::park(),
        }
    }
}

#[test]
fn opening_without_create_if_missing_creates_nothing() {
    let f = Fixture::new();
    let missing = f.dir.path().join("typo");
    let opts = f.options().create_if_missing(false);
    assert!(matches!(
        Db::open(&missing, opts.clone()),
        Err(Error::NotAStore { .. })
    ));
    assert!(!missing.exists(), "nothing was created");
    assert!(matches!(
        Db::verify(&missing, &keel_engine::storage::FsStorage),
        Err(Error::NotAStore { .. })
    ));
    f.open().close().unwrap();
    Db::open(f.dir.path(), opts).unwrap();
}

#[test]
fn close_releases_the_lock_for_the_next_open() {
    let f = Fixture::new();
    let db = f.open();
    db.close().unwrap();
    let db = f.open();
    db.set("k", "v", None).unwrap();
    drop(db);
    f.open();
}
