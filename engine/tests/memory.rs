//! Bounded memory: `max_memory` with each eviction policy. A write that cannot fit is refused
//! with a typed error and writes nothing; evictions follow the policy and are durable.

use std::sync::Arc;
use std::time::Duration;

use keel_engine::{Batch, Db, Error, EvictionPolicy, ManualClock, Options};

/// Accounted bytes of one entry with a 4-byte key ("k000") and a 100-byte value.
fn entry() -> u64 {
    let db = Db::memory(Options::default());
    db.set("k000", [0u8; 100], None).unwrap();
    db.stats().memory_bytes
}

fn opts(limit: u64, policy: EvictionPolicy, clock: &ManualClock) -> Options {
    Options::default()
        .clock(Arc::new(clock.clone()))
        .max_memory(limit, policy)
        .shards(4)
}

#[test]
fn no_eviction_refuses_the_write_and_writes_nothing() {
    let clock = ManualClock::new(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(
        dir.path(),
        opts(10 * entry(), EvictionPolicy::NoEviction, &clock),
    )
    .unwrap();
    for i in 0..10 {
        db.set(format!("k{i:03}"), [0u8; 100], None).unwrap();
    }
    let wal = db.stats().wal_bytes;
    assert!(matches!(
        db.set("k010", [0u8; 100], None),
        Err(Error::MemoryLimit { .. })
    ));
    assert!(matches!(
        db.incr("k011", 1, None),
        Err(Error::MemoryLimit { .. })
    ));
    let mut batch = Batch::new();
    batch.set("k012", [0u8; 100], None);
    assert!(matches!(
        db.write_batch(&batch),
        Err(Error::MemoryLimit { .. })
    ));
    assert_eq!(db.get("k010"), None);
    assert_eq!(db.stats().wal_bytes, wal, "a refused write reaches the WAL");
    // Shrinking and deleting still work at the limit.
    db.set("k000", [0u8; 10], None).unwrap();
    db.delete("k001").unwrap();
    db.set("k010", [0u8; 100], None).unwrap();
    assert_eq!(db.stats().evictions, 0);
}

#[test]
fn volatile_ttl_evicts_only_keys_with_a_ttl_soonest_first() {
    let clock = ManualClock::new(1_000_000);
    let db = Db::memory(opts(10 * entry(), EvictionPolicy::VolatileTtl, &clock));
    for i in 0..5 {
        db.set(format!("p{i:03}"), [0u8; 100], None).unwrap();
    }
    for i in 0..5 {
        db.set(
            format!("t{i:03}"),
            [0u8; 100],
            Some(Duration::from_secs(100 + i)),
        )
        .unwrap();
    }
    db.set("new0", [0u8; 100], None).unwrap();
    assert_eq!(db.stats().evictions, 1);
    for i in 0..5 {
        assert!(
            db.get(format!("p{i:03}")).is_some(),
            "a key without TTL was evicted"
        );
    }
    let ttl_left = (0..5)
        .filter(|i| db.get(format!("t{i:03}")).is_some())
        .count();
    assert_eq!(ttl_left, 4);
    // Fill until only TTL-less keys remain: then writes are refused.
    for i in 1..5 {
        db.set(format!("new{i}"), [0u8; 100], None).unwrap();
    }
    assert!(matches!(
        db.set("more", [0u8; 100], None),
        Err(Error::MemoryLimit { .. })
    ));
}

#[test]
fn allkeys_lru_keeps_recently_read_keys() {
    let clock = ManualClock::new(1_000_000);
    let db = Db::memory(opts(100 * entry(), EvictionPolicy::AllKeysLru, &clock).shards(1));
    for i in 0..100 {
        db.set(format!("k{i:03}"), [0u8; 100], None).unwrap();
    }
    clock.advance(Duration::from_secs(1));
    // Every tenth key is hot: read after the others were written.
    for i in (0..100).step_by(10) {
        assert!(db.get(format!("k{i:03}")).is_some());
    }
    clock.advance(Duration::from_secs(1));
    for i in 0..50 {
        db.set(format!("n{i:03}"), [0u8; 100], None).unwrap();
    }
    assert_eq!(db.stats().evictions, 50);
    for i in (0..100).step_by(10) {
        assert!(
            db.get(format!("k{i:03}")).is_some(),
            "hot key k{i:03} was evicted"
        );
    }
    assert!(db.stats().memory_bytes <= 100 * entry());
}

#[test]
fn expired_entries_are_evicted_before_live_ones() {
    let clock = ManualClock::new(1_000_000);
    let db = Db::memory(opts(10 * entry(), EvictionPolicy::AllKeysLru, &clock).shards(1));
    for i in 0..5 {
        db.set(format!("live{i}"), [0u8; 100], None).unwrap();
        db.set(
            format!("dead{i}"),
            [0u8; 100],
            Some(Duration::from_millis(1)),
        )
        .unwrap();
    }
    clock.advance(Duration::from_millis(1));
    for i in 0..5 {
        db.set(format!("new{i}"), [0u8; 100], None).unwrap();
    }
    for i in 0..5 {
        assert!(
            db.get(format!("live{i}")).is_some(),
            "live{i} evicted while expired entries remained"
        );
    }
}

#[test]
fn evictions_are_durable_across_restart() {
    let clock = ManualClock::new(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    let o = opts(20 * entry(), EvictionPolicy::AllKeysLru, &clock);
    let db = Db::open(dir.path(), o.clone()).unwrap();
    for i in 0..60 {
        db.set(format!("k{i:03}"), [0u8; 100], None).unwrap();
    }
    let evicted: Vec<String> = (0..60)
        .map(|i| format!("k{i:03}"))
        .filter(|k| db.get(k).is_none())
        .collect();
    assert_eq!(evicted.len() as u64, db.stats().evictions);
    assert_eq!(evicted.len(), 40);
    db.close().unwrap();
    let db = Db::open(dir.path(), o).unwrap();
    for k in &evicted {
        assert_eq!(db.get(k), None, "evicted {k} came back after restart");
    }
    assert_eq!(db.stats().keys, 20);
}
