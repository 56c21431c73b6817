//! Size limits against the on-disk format: a limit the format cannot frame is refused when the
//! store is opened, and a write at every ceiling is acknowledged and read back after a reopen,
//! from the WAL and from a snapshot.

use keel_engine::{
    BATCH_BYTES_CEILING, Batch, Db, Error, KEY_BYTES_CEILING, Limits, Options, VALUE_BYTES_CEILING,
};

fn at_ceilings() -> Limits {
    Limits {
        max_key_bytes: KEY_BYTES_CEILING,
        max_value_bytes: VALUE_BYTES_CEILING,
        max_batch_ops: 10,
        max_batch_bytes: BATCH_BYTES_CEILING,
    }
}

#[test]
fn a_limit_above_its_ceiling_is_refused_at_open_and_nothing_is_created() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("store");
    let cases = [
        (
            "max_key_bytes",
            Limits {
                max_key_bytes: KEY_BYTES_CEILING + 1,
                ..at_ceilings()
            },
        ),
        (
            "max_value_bytes",
            Limits {
                max_value_bytes: VALUE_BYTES_CEILING + 1,
                ..at_ceilings()
            },
        ),
        (
            "max_batch_bytes",
            Limits {
                max_batch_bytes: BATCH_BYTES_CEILING + 1,
                ..at_ceilings()
            },
        ),
    ];
    for (name, limits) in cases {
        match Db::open(&dir, Options::default().limits(limits)) {
            Err(Error::InvalidOption { option, .. }) => assert_eq!(option, name),
            other => panic!("{name}: expected InvalidOption, got {other:?}"),
        }
        assert!(
            !dir.exists(),
            "{name}: a refused open created the directory"
        );
    }
    // The largest value the old clamp allowed (1 GiB) no longer fits: it is refused, not
    // acknowledged and then cut off as a torn tail at the next open.
    let one_gib = Limits {
        max_value_bytes: 1 << 30,
        ..at_ceilings()
    };
    assert!(matches!(
        Db::open(&dir, Options::default().limits(one_gib)),
        Err(Error::InvalidOption {
            option: "max_value_bytes",
            ..
        })
    ));
    Db::open(&dir, Options::default().limits(at_ceilings()))
        .unwrap()
        .close()
        .unwrap();
}

/// One test (it holds about 1 GiB values several times over, so it runs them in sequence):
/// a set with the largest key and value, and a batch of exactly the largest size, each read
/// back after a reopen from the WAL, then from a snapshot.
#[test]
fn writes_at_every_ceiling_survive_recovery_from_the_wal_and_from_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    // No automatic snapshot: the first reopens must replay the WAL.
    let options = Options::default()
        .limits(at_ceilings())
        .snapshot_after_wal_bytes(u64::MAX);
    let key = vec![b'k'; KEY_BYTES_CEILING];
    let value = vec![0xA5u8; VALUE_BYTES_CEILING];

    let db = Db::open(dir.path(), options.clone()).unwrap();
    db.set(&key, &value, None).unwrap();
    // One byte more of value is refused, not written.
    let mut longer = value.clone();
    longer.push(0);
    assert!(matches!(
        db.set(b"other", &longer, None),
        Err(Error::ValueTooLarge { .. })
    ));
    drop(longer);
    db.close().unwrap();

    let db = Db::open(dir.path(), options.clone()).unwrap();
    let r = db.stats().recovery.unwrap();
    assert_eq!((r.records, r.bytes_truncated), (1, 0), "{r:?}");
    assert!(
        db.get(&key).as_deref() == Some(&value[..]),
        "value read back"
    );

    // A batch whose counted bytes are exactly the ceiling: one set of the same size under a
    // second key of the largest size. One op more (a delete) is over the ceiling.
    let key2 = vec![b'j'; KEY_BYTES_CEILING];
    assert!(db.delete(&key).unwrap());
    let mut batch = Batch::new();
    batch.set(key2.clone(), value.clone(), None);
    let mut over = batch.clone();
    over.delete(b"x".to_vec());
    match db.write_batch(&over) {
        Err(Error::BatchTooLarge { bytes, .. }) => assert!(bytes > BATCH_BYTES_CEILING),
        other => panic!("expected BatchTooLarge, got {other:?}"),
    }
    drop(over);
    db.write_batch(&batch).unwrap();
    drop(batch);
    db.close().unwrap();

    let db = Db::open(dir.path(), options.clone()).unwrap();
    assert_eq!(db.get(&key), None);
    assert!(
        db.get(&key2).as_deref() == Some(&value[..]),
        "batch read back"
    );
    // Through a snapshot: the entry is written to and loaded from the snapshot file.
    let report = db.compact().unwrap().unwrap();
    assert_eq!(report.entries, 1);
    db.close().unwrap();
    let db = Db::open(dir.path(), options).unwrap();
    let r = db.stats().recovery.unwrap();
    assert_eq!(r.snapshot_lsn, report.lsn);
    assert!(
        db.get(&key2).as_deref() == Some(&value[..]),
        "snapshot read back"
    );
    db.close().unwrap();
}

/// `update_many`'s writes are one record: they are held to the batch limits like a batch.
#[test]
fn update_many_writes_over_the_batch_byte_limit_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        max_key_bytes: 16,
        max_value_bytes: 600,
        max_batch_ops: 10,
        max_batch_bytes: 1024,
    };
    let db = Db::open(dir.path(), Options::default().limits(limits)).unwrap();
    let keys: [&[u8]; 2] = [b"a", b"b"];
    let result = db.update_many(&keys, |_, _| {
        let write = Some((vec![1u8; 600], keel_engine::TtlPolicy::Keep));
        Ok((vec![write.clone(), write], ()))
    });
    match result {
        Err(Error::BatchTooLarge { ops: 2, bytes, .. }) => assert!(bytes > 1024),
        Err(e) => panic!("expected BatchTooLarge, got {e:?}"),
        Ok(_) => panic!("expected BatchTooLarge, got Ok"),
    }
    assert_eq!((db.get("a"), db.get("b")), (None, None));
    // Under the limit it writes.
    db.update_many(&keys, |_, _| {
        let write = Some((vec![1u8; 400], keel_engine::TtlPolicy::Keep));
        Ok((vec![write.clone(), write], ()))
    })
    .unwrap()
    .wait()
    .unwrap();
    assert_eq!(db.get("a"), Some(vec![1u8; 400]));
}
