//! Model-based property tests: random sequences of every operation (reads, writes with every
//! TTL policy, `incr` on non-integers and at the overflow edges, expiry, scans page by page,
//! batches, invalid inputs), clock advances, snapshots, clean reopens and simulated power
//! losses, applied to the engine and to a `BTreeMap` model that must agree on every result.
//! Writes are acknowledged `Immediate`ly or `Buffered`; after a power loss the store must hold
//! the model's state after some prefix of the operations that includes every acknowledged
//! one, and the model continues from the state the store shows.
//!
//! `PROPTEST_CASES` raises the number of cases (default 64).

#[path = "support/model.rs"]
mod model;
#[path = "support/sim.rs"]
mod sim;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_engine::{Db, Durability, Limits, ManualClock, Options};
use model::{BatchItem, Model, Op, Policy, T0_MS, TTL_MAX_MS, check_recovered, dump, run_on_db};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use sim::{DirLoss, SimDisk, engine_thread_panics};

/// Cases per property unless `PROPTEST_CASES` says otherwise.
const CASES_DEFAULT: u32 = 64;
/// Most actions in one case.
const ACTIONS_PER_CASE_MAX: usize = 80;
/// The store's key limit in these tests (small, so oversize keys are cheap).
const KEY_BYTES_LIMIT: usize = 8;
/// The store's value limit in these tests.
const VALUE_BYTES_LIMIT: usize = 24;
/// The store's batch-size limit in these tests.
const BATCH_OPS_LIMIT: usize = 4;
/// Longest valid TTL generated, in ms (short, so keys expire within a case).
const TTL_MS_MAX: u64 = 600;
/// Largest clock step, in ms.
const CLOCK_STEP_MS_MAX: u64 = 400;
/// Largest scan page asked for.
const SCAN_LIMIT_MAX: usize = 4;
/// Where the simulated store lives.
const STORE: &str = "/model/store";

fn limits() -> Limits {
    Limits {
        max_key_bytes: KEY_BYTES_LIMIT,
        max_value_bytes: VALUE_BYTES_LIMIT,
        max_batch_ops: BATCH_OPS_LIMIT,
        max_batch_bytes: 1 << 20,
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CASES_DEFAULT);
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource(
            "proptest-regressions",
        ))),
        ..ProptestConfig::default()
    }
}

/// Keys that share prefixes (for scans) and collide often.
fn key() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        Just(b"a".to_vec()),
        Just(b"ab".to_vec()),
        Just(b"abc".to_vec()),
        Just(b"b".to_vec()),
        Just(b"b\0".to_vec()),
        Just(b"\xff".to_vec()),
        Just(Vec::new()),
        Just(b"n".to_vec()),
    ]
    .boxed()
}

/// A key one byte over the limit.
fn long_key() -> BoxedStrategy<Vec<u8>> {
    Just(vec![b'k'; KEY_BYTES_LIMIT + 1]).boxed()
}

/// Values, including integers at and past the edges of `incr`'s grammar.
fn value() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..=VALUE_BYTES_LIMIT),
        1 => prop_oneof![
            Just(b"0".to_vec()),
            Just(b"-1".to_vec()),
            Just(b"41".to_vec()),
            Just(i64::MAX.to_string().into_bytes()),
            Just(i64::MIN.to_string().into_bytes()),
            Just(b"01".to_vec()),
            Just(b"-0".to_vec()),
            Just(b"+1".to_vec()),
            Just(b" 1".to_vec()),
            Just(b"9223372036854775808".to_vec()),
        ],
    ]
    .boxed()
}

fn long_value() -> BoxedStrategy<Vec<u8>> {
    Just(vec![b'v'; VALUE_BYTES_LIMIT + 1]).boxed()
}

fn ttl() -> BoxedStrategy<u64> {
    (1..=TTL_MS_MAX).boxed()
}

fn bad_ttl() -> BoxedStrategy<u64> {
    prop_oneof![Just(0), Just(TTL_MAX_MS + 1)].boxed()
}

fn maybe_ttl() -> BoxedStrategy<Option<u64>> {
    proptest::option::of(ttl()).boxed()
}

fn delta() -> BoxedStrategy<i64> {
    prop_oneof![
        4 => -5i64..=5,
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
    .boxed()
}

fn policy() -> BoxedStrategy<Policy> {
    prop_oneof![
        Just(Policy::Keep),
        ttl().prop_map(Policy::Set),
        Just(Policy::Clear),
    ]
    .boxed()
}

fn batch_item() -> BoxedStrategy<BatchItem> {
    prop_oneof![
        (key(), value(), maybe_ttl()).prop_map(|(key, value, ttl_ms)| BatchItem::Set {
            key,
            value,
            ttl_ms
        }),
        // Absolute expiries around "now" (the clock starts at T0 and moves < 1 minute).
        (key(), value(), proptest::option::of(0..60_000u64)).prop_map(|(key, value, at)| {
            BatchItem::SetAt {
                key,
                value,
                expires_at_ms: at.map(|a| T0_MS + a),
            }
        }),
        key().prop_map(|key| BatchItem::Delete { key }),
    ]
    .boxed()
}

/// A valid write: every input within limits.
fn valid_write() -> BoxedStrategy<Op> {
    prop_oneof![
        4 => (key(), value(), maybe_ttl())
            .prop_map(|(key, value, ttl_ms)| Op::Set { key, value, ttl_ms }),
        2 => (key(), value(), maybe_ttl())
            .prop_map(|(key, value, ttl_ms)| Op::SetNx { key, value, ttl_ms }),
        3 => (key(), proptest::option::of(value()), value(), policy()).prop_map(
            |(key, expected, new, ttl)| Op::Cas {
                key,
                expected,
                new,
                ttl
            }
        ),
        2 => (key(), value())
            .prop_map(|(key, expected)| Op::CompareAndDelete { key, expected }),
        2 => key().prop_map(|key| Op::Delete { key }),
        3 => (key(), delta(), maybe_ttl())
            .prop_map(|(key, delta, ttl_ms)| Op::Incr { key, delta, ttl_ms }),
        2 => (key(), ttl()).prop_map(|(key, ttl_ms)| Op::Expire { key, ttl_ms }),
        2 => key().prop_map(|key| Op::Persist { key }),
        3 => proptest::collection::vec(batch_item(), 0..=BATCH_OPS_LIMIT).prop_map(Op::Batch),
    ]
    .boxed()
}

/// A write with exactly one invalid input (so which error wins is never in question).
fn invalid_write() -> BoxedStrategy<Op> {
    prop_oneof![
        (long_key(), value()).prop_map(|(key, value)| Op::Set {
            key,
            value,
            ttl_ms: None
        }),
        (key(), long_value()).prop_map(|(key, value)| Op::SetNx {
            key,
            value,
            ttl_ms: None
        }),
        (key(), value(), bad_ttl()).prop_map(|(key, value, t)| Op::Set {
            key,
            value,
            ttl_ms: Some(t)
        }),
        (key(), value(), bad_ttl()).prop_map(|(key, new, t)| Op::Cas {
            key,
            expected: None,
            new,
            ttl: Policy::Set(t)
        }),
        (key(), bad_ttl()).prop_map(|(key, ttl_ms)| Op::Expire { key, ttl_ms }),
        (key(), bad_ttl()).prop_map(|(key, t)| Op::Incr {
            key,
            delta: 1,
            ttl_ms: Some(t)
        }),
        long_key().prop_map(|key| Op::Delete { key }),
        long_key().prop_map(|key| Op::Persist { key }),
        // One item too many.
        proptest::collection::vec(
            key().prop_map(|key| BatchItem::Delete { key }),
            BATCH_OPS_LIMIT + 1
        )
        .prop_map(Op::Batch),
        (key(), long_value()).prop_map(|(key, value)| Op::Batch(vec![
            BatchItem::Delete { key: key.clone() },
            BatchItem::Set {
                key,
                value,
                ttl_ms: None
            },
        ])),
    ]
    .boxed()
}

fn read() -> BoxedStrategy<Op> {
    prop_oneof![
        key().prop_map(|key| Op::Get { key }),
        key().prop_map(|key| Op::GetWithTtl { key }),
        key().prop_map(|key| Op::Ttl { key }),
        (
            prop_oneof![
                Just(Vec::new()),
                Just(b"a".to_vec()),
                Just(b"ab".to_vec()),
                Just(b"b".to_vec()),
                Just(b"z".to_vec()),
            ],
            0..=SCAN_LIMIT_MAX,
            any::<bool>()
        )
            .prop_map(|(prefix, limit, with_values)| Op::Scan {
                prefix,
                limit,
                with_values
            }),
    ]
    .boxed()
}

/// One step of a case.
#[derive(Debug, Clone)]
enum Action {
    /// An operation; writes wait for `Immediate` durability.
    Op(Op),
    /// A write acknowledged at once (`Buffered`): a power loss may drop it.
    Buffered(Op),
    /// Move the clock forward, in ms.
    Advance(u64),
    /// `Db::compact`.
    Compact,
    /// Close and open again.
    Reopen,
    /// Lose power and open the disk that is left (seed, whether unsynced directory operations
    /// may survive).
    Crash(u64, bool),
}

fn action(durable_store: bool) -> BoxedStrategy<Action> {
    let durable_only = if durable_store { 1 } else { 0 };
    prop_oneof![
        12 => valid_write().prop_map(Action::Op),
        2 => invalid_write().prop_map(Action::Op),
        6 => read().prop_map(Action::Op),
        3 * durable_only => valid_write().prop_map(Action::Buffered),
        5 => (1..=CLOCK_STEP_MS_MAX).prop_map(Action::Advance),
        durable_only => Just(Action::Compact),
        durable_only => Just(Action::Reopen),
        2 * durable_only => (any::<u64>(), any::<bool>()).prop_map(|(s, k)| Action::Crash(s, k)),
    ]
    .boxed()
}

fn options(clock: &ManualClock) -> Options {
    Options::default()
        .clock(Arc::new(clock.clone()))
        .limits(limits())
        .shards(4)
        .wal_segment_bytes(4096)
        .snapshot_after_wal_bytes(4096)
        // The active expirer and automatic snapshots run concurrently with the operations:
        // what they do must never be visible.
        .active_expiry(Duration::from_millis(1), 2)
}

fn now_ms(clock: &ManualClock) -> u64 {
    use keel_engine::Clock;
    clock.now_ms()
}

/// Runs `actions` on a store on the simulated disk and on the model.
fn check_disk_store(actions: &[Action]) -> Result<(), TestCaseError> {
    let dir = Path::new(STORE);
    let clock = ManualClock::new(T0_MS);
    let mut disk = SimDisk::with_dir(dir);
    let open = |disk: &SimDisk| Db::open(dir, options(&clock).storage(Arc::new(disk.clone())));
    let mut db = open(&disk).expect("a new store opens");
    let mut model = Model::new(limits());
    // States a power loss may return to: before each `Buffered` write not yet made durable
    // by a later acknowledged one.
    let mut undurable: Vec<Model> = Vec::new();
    for (i, action) in actions.iter().enumerate() {
        let now = now_ms(&clock);
        match action {
            Action::Op(op) => {
                let before = model.clone();
                let want = model.apply(op, now);
                let got = run_on_db(&db, op);
                prop_assert_eq!(&got, &want, "action {}: {:?}", i, op);
                if model != before {
                    // Its fdatasync covered every earlier record.
                    undurable.clear();
                }
            }
            Action::Buffered(op) => {
                let before = model.clone();
                let want = model.apply(op, now);
                let got = run_on_db(&db.with_durability(Durability::Buffered), op);
                prop_assert_eq!(&got, &want, "action {}: buffered {:?}", i, op);
                if model != before {
                    undurable.push(before);
                }
            }
            Action::Advance(ms) => clock.advance(Duration::from_millis(*ms)),
            Action::Compact => {
                let report = db.compact();
                prop_assert!(
                    matches!(report, Ok(Some(_))),
                    "action {}: compact: {:?}",
                    i,
                    report
                );
                undurable.clear();
            }
            Action::Reopen => {
                db.close().expect("a healthy store closes");
                undurable.clear();
                db = open(&disk).expect("a closed store reopens");
                prop_assert_eq!(dump(&db), model.visible(now), "action {}: after reopen", i);
            }
            Action::Crash(seed, keep_dir_ops) => {
                let dir_loss = match keep_dir_ops {
                    true => DirLoss::KeepPrefix,
                    false => DirLoss::ForgetUnsynced,
                };
                // The image is taken first: what the old store does while closing cannot
                // reach it.
                let (image, fates) = disk.power_loss(*seed, dir_loss);
                drop(db);
                disk = image;
                db = match open(&disk) {
                    Ok(db) => db,
                    Err(e) => {
                        return Err(TestCaseError::fail(format!(
                            "action {i}: reopen after power loss failed: {e:?}; {fates:?}"
                        )));
                    }
                };
                let mut candidates = vec![model.clone()];
                candidates.extend(undurable.drain(..).rev());
                match check_recovered(&db, &candidates, now) {
                    Ok(found) => model = candidates.swap_remove(found),
                    Err(diff) => {
                        return Err(TestCaseError::fail(format!(
                            "action {i}: after power loss ({fates:?}): {diff}"
                        )));
                    }
                }
            }
        }
    }
    db.close().expect("a healthy store closes");
    let db = open(&disk).expect("a closed store reopens");
    prop_assert_eq!(
        dump(&db),
        model.visible(now_ms(&clock)),
        "after the final reopen"
    );
    prop_assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
    Ok(())
}

/// Runs `actions` on a memory-only store and on the model.
fn check_memory_store(actions: &[Action]) -> Result<(), TestCaseError> {
    let clock = ManualClock::new(T0_MS);
    let db = Db::memory(options(&clock));
    let mut model = Model::new(limits());
    for (i, action) in actions.iter().enumerate() {
        let now = now_ms(&clock);
        match action {
            Action::Op(op) | Action::Buffered(op) => {
                let want = model.apply(op, now);
                prop_assert_eq!(run_on_db(&db, op), want, "action {}: {:?}", i, op);
            }
            Action::Advance(ms) => clock.advance(Duration::from_millis(*ms)),
            Action::Compact | Action::Reopen | Action::Crash(..) => {}
        }
    }
    prop_assert_eq!(dump(&db), model.visible(now_ms(&clock)));
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_store_on_disk_agrees_with_the_model_through_reopens_and_power_losses(
        actions in proptest::collection::vec(action(true), 1..=ACTIONS_PER_CASE_MAX)
    ) {
        engine_thread_panics();
        check_disk_store(&actions)?;
    }

    #[test]
    fn a_memory_store_agrees_with_the_model(
        actions in proptest::collection::vec(action(false), 1..=ACTIONS_PER_CASE_MAX)
    ) {
        check_memory_store(&actions)?;
    }
}
