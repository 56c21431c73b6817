//! Crash safety on a simulated disk. A seeded workload (every write operation, batches, TTLs,
//! a manual clock, segment rolls, snapshots, reopens) runs on [`SimDisk`]; the test crashes it
//! at every crash point in turn (before each call that changes the disk), takes the disk a
//! power loss would leave, reopens the store and checks it against a model of what was
//! acknowledged: every acknowledged write is there with its absolute expiry, the one write in
//! flight is there whole or not at all (so batches are all-or-nothing), nothing else is, no
//! engine thread panicked, and the recovered store takes writes and reopens. Crashes during
//! recovery and during a snapshot install are swept the same way, and a second sweep lets
//! directory operations reach the disk without their fsync. Then SQLite-style fault
//! injection: the Nth call of each kind fails, once or for good; the engine must return
//! typed errors, never acknowledge a write whose fdatasync failed, poison itself after a failed
//! WAL write or fdatasync (writes refused, reads served), and a reopen on a healthy disk must
//! recover every acknowledged write.
//!
//! `KEEL_CRASH_POINTS` raises the number of crash points swept (default 1,000; the second
//! sweep covers 3/10 of that).

#[path = "support/model.rs"]
mod model;
#[path = "support/sim.rs"]
mod sim;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_engine::{Db, Error, Limits, ManualClock, Options, RecoveryReport};
use model::{BatchItem, ErrKind, Model, Op, Outcome, Policy, T0_MS, check_recovered, dump};
use sim::{DirLoss, Event, Fault, FsyncFailure, OpKind, Rng, SimDisk, engine_thread_panics};

/// Where every simulated store lives.
const STORE: &str = "/sim/store";
/// Crash points the default run sweeps, at least.
const CRASH_POINTS_DEFAULT: u64 = 1_000;
/// Operations per crash-sweep workload: enough for several segment rolls and snapshots.
const CRASH_WORKLOAD_OPS: usize = 260;
/// Operations per fault-injection workload (each call of each kind is failed in turn).
const FAULT_WORKLOAD_OPS: usize = 90;
/// Regular keys the workload writes (few, so operations overwrite each other).
const KEYS: u64 = 24;
/// Integer keys `incr` works on.
const COUNTERS: u64 = 4;
/// Longest value the workload writes.
const VALUE_BYTES_MAX: u64 = 256;
/// Shortest TTL the workload uses, in ms.
const TTL_MS_MIN: u64 = 20;
/// Longest TTL the workload uses, in ms.
const TTL_MS_MAX: u64 = 3_000;
/// Largest clock step between operations, in ms.
const CLOCK_STEP_MS_MAX: u64 = 400;
/// Small segments so the workload rolls the WAL often.
const SEGMENT_BYTES: u64 = 4096;
/// A small threshold so writers take snapshots themselves (at 4x it, with the maintenance
/// thread idle).
const SNAPSHOT_AFTER_BYTES: u64 = 4096;
/// The key the recovery check writes after every reopen.
const PROBE_KEY: &[u8] = b"zz-probe";

fn store() -> &'static Path {
    Path::new(STORE)
}

/// One step of a workload.
#[derive(Debug, Clone)]
enum Step {
    Op(Op),
    Advance(u64),
    Compact,
    Reopen,
}

impl Step {
    fn label(&self) -> &'static str {
        match self {
            Step::Op(op) => match op {
                Op::Set { ttl_ms: None, .. } => "set",
                Op::Set { .. } => "set with TTL",
                Op::SetNx { .. } => "set_nx",
                Op::Cas { .. } => "compare_and_swap",
                Op::CompareAndDelete { .. } => "compare_and_delete",
                Op::Delete { .. } => "delete",
                Op::Incr { .. } => "incr",
                Op::Expire { .. } => "expire",
                Op::Persist { .. } => "persist",
                Op::Batch(_) => "batch",
                _ => "read",
            },
            Step::Advance(_) => "clock",
            Step::Compact => "compact",
            Step::Reopen => "close and reopen",
        }
    }
}

fn key(i: u64) -> Vec<u8> {
    format!("k{i:02}").into_bytes()
}

fn counter(i: u64) -> Vec<u8> {
    format!("n{i}").into_bytes()
}

/// A value unique to (seed, op, part), so a recovered value names the write it came from.
fn value(rng: &mut Rng, seed: u64, op: usize, part: usize) -> Vec<u8> {
    let mut v = format!("v{seed}.{op}.{part}.").into_bytes();
    let len = rng.range(1, VALUE_BYTES_MAX) as usize;
    while v.len() < len {
        v.push(b'a' + (v.len() % 26) as u8);
    }
    v
}

fn ttl(rng: &mut Rng) -> u64 {
    rng.range(TTL_MS_MIN, TTL_MS_MAX)
}

fn maybe_ttl(rng: &mut Rng) -> Option<u64> {
    rng.chance(1, 3).then(|| ttl(rng))
}

/// A deterministic workload. A model runs alongside so compare-and-swap and
/// compare-and-delete often expect the value actually there.
fn workload(seed: u64, ops: usize) -> Vec<Step> {
    let mut rng = Rng::new(seed);
    let mut model = Model::new(Limits::default());
    let mut now = T0_MS;
    let mut steps = Vec::new();
    for i in 0..ops {
        let k = key(rng.below(KEYS));
        let current =
            |model: &Model, k: &[u8], now: u64| model.visible(now).get(k).map(|(v, _)| v.clone());
        let step = match rng.below(100) {
            0..=17 => Step::Op(Op::Set {
                key: k,
                value: value(&mut rng, seed, i, 0),
                ttl_ms: None,
            }),
            18..=27 => Step::Op(Op::Set {
                key: k,
                value: value(&mut rng, seed, i, 0),
                ttl_ms: Some(ttl(&mut rng)),
            }),
            28..=33 => Step::Op(Op::SetNx {
                key: k,
                value: value(&mut rng, seed, i, 0),
                ttl_ms: maybe_ttl(&mut rng),
            }),
            34..=42 => {
                // Mostly counters; now and then a regular key, which is not an integer.
                let key = match rng.chance(1, 8) {
                    true => k,
                    false => counter(rng.below(COUNTERS)),
                };
                Step::Op(Op::Incr {
                    key,
                    delta: rng.range(0, 25) as i64 - 5,
                    ttl_ms: maybe_ttl(&mut rng),
                })
            }
            43..=50 => {
                let expected = match rng.chance(2, 3) {
                    true => current(&model, &k, now),
                    false => Some(b"not-the-value".to_vec()),
                };
                let ttl = match rng.below(3) {
                    0 => Policy::Keep,
                    1 => Policy::Set(ttl(&mut rng)),
                    _ => Policy::Clear,
                };
                Step::Op(Op::Cas {
                    key: k,
                    expected,
                    new: value(&mut rng, seed, i, 0),
                    ttl,
                })
            }
            51..=55 => {
                let expected = match rng.chance(2, 3) {
                    true => current(&model, &k, now).unwrap_or_default(),
                    false => b"not-the-value".to_vec(),
                };
                Step::Op(Op::CompareAndDelete { key: k, expected })
            }
            56..=61 => Step::Op(Op::Delete { key: k }),
            62..=66 => Step::Op(Op::Expire {
                key: k,
                ttl_ms: ttl(&mut rng),
            }),
            67..=70 => Step::Op(Op::Persist { key: k }),
            71..=81 => {
                let n = rng.range(2, 5) as usize;
                let items = (0..n)
                    .map(|part| {
                        let key = key(rng.below(KEYS));
                        match rng.below(5) {
                            0 | 1 => BatchItem::Set {
                                key,
                                value: value(&mut rng, seed, i, part),
                                ttl_ms: None,
                            },
                            2 => BatchItem::Set {
                                key,
                                value: value(&mut rng, seed, i, part),
                                ttl_ms: Some(ttl(&mut rng)),
                            },
                            3 => BatchItem::SetAt {
                                key,
                                value: value(&mut rng, seed, i, part),
                                // Sometimes already past: the item then deletes the key.
                                expires_at_ms: Some(now + ttl(&mut rng) - 2 * TTL_MS_MIN),
                            },
                            _ => BatchItem::Delete { key },
                        }
                    })
                    .collect();
                Step::Op(Op::Batch(items))
            }
            82..=86 => Step::Op(match rng.below(3) {
                0 => Op::Get { key: k },
                1 => Op::GetWithTtl { key: k },
                _ => Op::Ttl { key: k },
            }),
            87..=88 => Step::Op(Op::Scan {
                prefix: b"k".to_vec(),
                limit: rng.range(1, 9) as usize,
                with_values: rng.chance(1, 2),
            }),
            // Rare enough that writers also reach the automatic snapshot threshold.
            89 if rng.chance(1, 2) => Step::Compact,
            90 => Step::Reopen,
            _ => Step::Advance(rng.range(1, CLOCK_STEP_MS_MAX)),
        };
        match &step {
            Step::Op(op) => {
                model.apply(op, now);
            }
            Step::Advance(ms) => now += ms,
            Step::Compact | Step::Reopen => {}
        }
        steps.push(step);
        if rng.chance(1, 4) {
            let ms = rng.range(1, CLOCK_STEP_MS_MAX / 4);
            now += ms;
            steps.push(Step::Advance(ms));
        }
    }
    steps
}

fn options(disk: &SimDisk, clock: &ManualClock) -> Options {
    Options::default()
        .storage(Arc::new(disk.clone()))
        .clock(Arc::new(clock.clone()))
        .wal_segment_bytes(SEGMENT_BYTES)
        .snapshot_after_wal_bytes(SNAPSHOT_AFTER_BYTES)
        .shards(4)
        // The maintenance thread never ticks during a test: every storage call then comes
        // from the workload, in the same order on every run, so crash point k is the same
        // call each time. Snapshots still happen: writers take them at 4x the threshold.
        .active_expiry(Duration::from_secs(24 * 3600), 256)
}

fn now_ms(clock: &ManualClock) -> u64 {
    use keel_engine::Clock;
    clock.now_ms()
}

/// How a run treats the first failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnFault {
    /// The machine crashed: stop at the first error.
    Stop,
    /// A fault was injected: keep going, as an application would, checking what the engine
    /// promises after it.
    Continue,
}

/// How a run ended.
struct RunEnd {
    /// The open store, if any.
    db: Option<Db>,
    /// The model of every acknowledged operation (and of a write whose acknowledgement
    /// failed but which a reopen then showed: the store builds on it from then on).
    acked: Model,
    /// The model with the write in flight when the first failure hit applied too, if a write
    /// was in flight: a crash may or may not have kept it.
    in_flight: Option<Model>,
    /// Earlier states a power loss may still return to: a reopen showed a write whose
    /// fdatasync had failed, and no acknowledged write has made it durable since.
    floor: Vec<Model>,
    /// The first failure, for messages.
    failure: Option<String>,
    /// Where each step started, in crash points, and its label (for classifying points).
    step_starts: Vec<(u64, &'static str)>,
}

impl RunEnd {
    /// The states a process restart may leave: everything acknowledged, plus the write in
    /// flight.
    fn restart_candidates(&self) -> Vec<Model> {
        let mut c = vec![self.acked.clone()];
        c.extend(self.in_flight.clone());
        c
    }

    /// The states a power loss may leave: those, or an unacknowledged state not yet durable.
    fn candidates(&self) -> Vec<Model> {
        let mut c = self.restart_candidates();
        c.extend(self.floor.iter().cloned());
        c
    }
}

fn is_fault(e: &Error) -> bool {
    matches!(e, Error::Io(_) | Error::Poisoned(_) | Error::Closed)
}

/// Runs `steps` on `disk`. With `OnFault::Stop` the run ends at the first error; with
/// `Continue` it checks the engine's promises after each failure and carries on.
fn run(steps: &[Step], disk: &SimDisk, clock: &ManualClock, on_fault: OnFault) -> RunEnd {
    let mut end = RunEnd {
        db: None,
        acked: Model::new(Limits::default()),
        in_flight: None,
        floor: Vec::new(),
        failure: None,
        step_starts: Vec::new(),
    };
    let fail = |failure: &mut Option<String>, what: String| {
        if failure.is_none() {
            *failure = Some(what);
        }
    };
    end.step_starts.push((disk.crash_points(), "open"));
    match Db::open(store(), options(disk, clock)) {
        Ok(db) => end.db = Some(db),
        Err(e) => {
            assert!(is_fault(&e), "open failed with a non-I/O error: {e:?}");
            fail(&mut end.failure, format!("open: {e}"));
            if on_fault == OnFault::Stop {
                return end;
            }
            // A transient fault has passed; a persistent one fails again and ends the run.
            match Db::open(store(), options(disk, clock)) {
                Ok(db) => end.db = Some(db),
                Err(_) => return end,
            }
        }
    }
    // Injected WAL faults the open store has met (each must have poisoned it), counted from
    // the moment it opened.
    let mut wal_faults_seen = 0;
    let mut injected_at_open = disk.injected().len();
    for (i, step) in steps.iter().enumerate() {
        end.step_starts.push((disk.crash_points(), step.label()));
        let db = end.db.as_ref().expect("a store is open between steps");
        let injected_before = disk.injected().len();
        match step {
            Step::Advance(ms) => clock.advance(Duration::from_millis(*ms)),
            Step::Op(op) => {
                let now = now_ms(clock);
                let mut next = end.acked.clone();
                let want = next.apply(op, now);
                let got = model::run_on_db(db, op);
                let faults_now = wal_faults(&disk.injected()[injected_before..]);
                if got == want {
                    assert!(
                        !(op.is_write() && faults_now > 0 && want != Outcome::Bool(false)),
                        "step {i}: {op:?} was acknowledged although the WAL write or fdatasync \
                         under it failed ({:?})",
                        &disk.injected()[injected_before..]
                    );
                    if end.in_flight.is_none() {
                        if op.is_write() && next != end.acked {
                            // Acknowledged: fdatasync succeeded, so everything before it in
                            // the log is durable too.
                            end.floor.clear();
                        }
                        end.acked = next;
                        continue;
                    }
                    // After a failed write (the store is poisoned) reads may show the
                    // in-flight write or not, and no write may change anything.
                    assert!(
                        !op.is_write() || matches!(want, Outcome::Err(_)),
                        "step {i}: a poisoned store applied {op:?}"
                    );
                    continue;
                }
                if let Some(in_flight) = &mut end.in_flight
                    && !op.is_write()
                    && in_flight.apply(op, now) == got
                {
                    continue;
                }
                assert!(
                    got.is_fault(),
                    "step {i}: {op:?} returned {got:?}, the model says {want:?}"
                );
                assert!(
                    disk.crashed() || !disk.injected().is_empty(),
                    "step {i}: {op:?} failed with {got:?} although no storage call failed"
                );
                fail(&mut end.failure, format!("step {i} {op:?}: {got:?}"));
                if !op.is_write() {
                    continue;
                }
                if end.in_flight.is_none() && !matches!(want, Outcome::Err(_)) {
                    end.in_flight = Some(next);
                }
                if on_fault == OnFault::Stop {
                    return end;
                }
                let err = match &got {
                    Outcome::Err(ErrKind::Fault(e)) => e.clone(),
                    _ => unreachable!("checked above"),
                };
                assert!(
                    err.contains("poisoned"),
                    "step {i}: a failed write must poison the store, got {err}"
                );
                assert!(db.stats().poisoned, "step {i}: store not marked poisoned");
            }
            Step::Compact => {
                if let Err(e) = db.compact() {
                    assert!(is_fault(&e), "step {i}: compact failed with {e:?}");
                    assert!(
                        disk.crashed() || !disk.injected().is_empty(),
                        "step {i}: compact failed with {e:?} although no storage call failed"
                    );
                    fail(&mut end.failure, format!("step {i} compact: {e}"));
                    if on_fault == OnFault::Stop {
                        return end;
                    }
                }
            }
            Step::Reopen => {
                let db = end.db.take().expect("open");
                let poisoned = db.stats().poisoned;
                match db.close() {
                    Ok(()) => assert!(!poisoned, "step {i}: a poisoned store closed cleanly"),
                    Err(e) => {
                        assert!(is_fault(&e), "step {i}: close failed with {e:?}");
                        fail(&mut end.failure, format!("step {i} close: {e}"));
                        if on_fault == OnFault::Stop {
                            return end;
                        }
                    }
                }
                let db = match Db::open(store(), options(disk, clock)) {
                    Ok(db) => db,
                    Err(e) => {
                        assert!(is_fault(&e), "step {i}: reopen failed with {e:?}");
                        fail(&mut end.failure, format!("step {i} reopen: {e}"));
                        if on_fault == OnFault::Stop {
                            return end;
                        }
                        match Db::open(store(), options(disk, clock)) {
                            Ok(db) => db,
                            Err(_) => return end,
                        }
                    }
                };
                // A reopen (no power loss) settles what the in-flight write left.
                let now = now_ms(clock);
                let found = check_recovered(&db, &end.restart_candidates(), now)
                    .unwrap_or_else(|diff| panic!("step {i}: after a reopen: {diff}"));
                if found == 1 {
                    // The write reached the file but not (for sure) the disk.
                    let shown = end
                        .in_flight
                        .take()
                        .expect("candidate 1 is the in-flight write");
                    end.floor.push(std::mem::replace(&mut end.acked, shown));
                }
                end.in_flight = None;
                end.db = Some(db);
                wal_faults_seen = 0;
                injected_at_open = disk.injected().len();
                continue;
            }
        }
        // A failed WAL write or fdatasync poisons the open store: writes refused from now on.
        let seen = wal_faults(&disk.injected()[injected_at_open..]);
        if seen > wal_faults_seen {
            wal_faults_seen = seen;
            let db = end.db.as_ref().expect("open");
            assert!(
                db.stats().poisoned,
                "step {i}: a failed WAL write or fdatasync did not poison the store"
            );
            match db.set(PROBE_KEY, "refused", None) {
                Err(Error::Poisoned(msg)) => assert!(!msg.is_empty()),
                other => panic!("step {i}: a poisoned store answered a write with {other:?}"),
            }
        }
    }
    end
}

/// Injected failures of writes and fdatasyncs on WAL segments.
fn wal_faults(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| {
            matches!(e.kind, OpKind::Write | OpKind::SyncData) && e.name().starts_with("wal-")
        })
        .count()
}

/// Opens the store on `disk`, checks it holds one of `candidates`, writes the probe key,
/// closes, loses power again and checks the reopened store holds the same plus the probe.
/// Returns the index of the candidate found and what recovery reported.
fn verify_recovery(
    disk: &SimDisk,
    clock: &ManualClock,
    candidates: &[Model],
    ctx: &str,
) -> (usize, RecoveryReport) {
    let db = Db::open(store(), options(disk, clock)).unwrap_or_else(|e| {
        panic!(
            "{ctx}: reopen failed: {e:?}\nfiles: {:?}",
            disk.listing(store())
        )
    });
    let now = now_ms(clock);
    let report = db
        .stats()
        .recovery
        .expect("a disk store reports its recovery");
    let found = check_recovered(&db, candidates, now).unwrap_or_else(|diff| {
        panic!(
            "{ctx}: {diff}\nrecovery: {:?}\nfiles: {:?}",
            db.stats().recovery,
            disk.listing(store())
        )
    });
    db.set(PROBE_KEY, ctx, None)
        .unwrap_or_else(|e| panic!("{ctx}: the recovered store refuses writes: {e:?}"));
    db.close()
        .unwrap_or_else(|e| panic!("{ctx}: the recovered store does not close: {e:?}"));
    let (again, _) = disk.power_loss(0x5eed, DirLoss::ForgetUnsynced);
    let db = Db::open(store(), options(&again, clock))
        .unwrap_or_else(|e| panic!("{ctx}: second reopen failed: {e:?}"));
    let mut want = candidates[found].clone();
    want.apply(
        &Op::Set {
            key: PROBE_KEY.to_vec(),
            value: ctx.as_bytes().to_vec(),
            ttl_ms: None,
        },
        now,
    );
    assert_eq!(
        dump(&db),
        want.visible(now_ms(clock)),
        "{ctx}: the second reopen lost or changed something"
    );
    drop(db);
    (found, report)
}

/// What one crash-point sweep covered.
#[derive(Default)]
struct Coverage {
    points: u64,
    in_flight_kept: u64,
    in_flight_lost: u64,
    /// "step: call file" → crash points.
    kinds: BTreeMap<String, u64>,
}

fn file_class(e: &Event) -> &'static str {
    let name = e.name();
    if name.starts_with("wal-") {
        "WAL segment"
    } else if name.ends_with(".snap.tmp") {
        "snapshot temp file"
    } else if name.ends_with(".snap") {
        "snapshot"
    } else if name.starts_with("CLOSED") {
        "clean-close marker"
    } else {
        "store directory"
    }
}

/// Names the call at crash point `k` by what it does, from its neighbours in the trace.
fn describe(trace: &[Event], k: usize) -> &'static str {
    use OpKind::*;
    let Some(e) = trace.get(k) else {
        return "after the last call";
    };
    let before = |n: usize| k.checked_sub(n).and_then(|i| trace.get(i));
    let is = |e: Option<&Event>, kind: OpKind, class: &str| {
        e.is_some_and(|e| e.kind == kind && file_class(e) == class)
    };
    let wal = "WAL segment";
    let tmp = "snapshot temp file";
    let after = trace.get(k + 1);
    let marker = "clean-close marker";
    match (e.kind, file_class(e)) {
        (Create, "clean-close marker") => "close: create the clean-close marker temp file",
        (Write, "clean-close marker") => "close: write the clean-close marker",
        (SyncData, "clean-close marker") => "close: fdatasync the clean-close marker",
        (Rename, "clean-close marker") => "close: rename the clean-close marker into place",
        (SyncDir, _) if is(before(1), Rename, marker) => {
            "close: fsync the directory after the marker"
        }
        (Create, "WAL segment") => "create a WAL segment",
        (Write, "WAL segment") if is(before(1), Create, wal) => "write a new segment's header",
        (SyncData, "WAL segment") if is(before(2), Create, wal) => {
            "fdatasync a new segment's header"
        }
        (SyncDir, _) if is(before(3), Create, wal) => "fsync the directory after a new segment",
        // Checked before "sealing": at open, cutting a torn tail is followed by the rewrite of
        // the last segment, which starts with a create.
        (SyncData, "WAL segment") if is(before(1), Truncate, wal) => {
            "fdatasync a segment after cutting its torn tail"
        }
        (SyncData, "WAL segment") if is(after, Create, wal) => {
            "fdatasync sealing a segment before a roll"
        }
        (Write, "WAL segment") => "write a WAL batch",
        (SyncData, "WAL segment") => "fdatasync the WAL (group commit)",
        (Truncate, "WAL segment") => "cut a torn WAL tail",
        (Remove, "WAL segment") => "remove a WAL segment a snapshot covers",
        (Remove, "snapshot temp file") => "remove a leftover snapshot temp file",
        (Create, "snapshot temp file") => "create the snapshot temp file",
        (Write, "snapshot temp file") if is(before(1), Create, tmp) => "write the snapshot header",
        (Write, "snapshot temp file") if is(after, SyncData, tmp) => "write the snapshot footer",
        (Write, "snapshot temp file") => "write a snapshot chunk",
        (SyncData, "snapshot temp file") => "fdatasync the snapshot temp file",
        (Rename, _) => "rename the snapshot into place",
        (SyncDir, _) if is(before(1), Rename, tmp) => "fsync the directory after the rename",
        (Remove, "snapshot") => "remove an older snapshot",
        (SyncDir, _) if before(1).is_some_and(|e| e.kind == Remove) => {
            "fsync the directory after removals"
        }
        (SyncDir, _) => "fsync the directory",
        _ => "other",
    }
}

/// "step: what the call at crash point k does".
fn classify(k: u64, trace: &[Event], starts: &[(u64, &'static str)]) -> String {
    let step = starts
        .iter()
        .rev()
        .find(|(at, _)| *at <= k)
        .map_or("open", |(_, label)| label);
    format!("{step}: {}", describe(trace, k as usize))
}

/// Crashes `steps` at every crash point and verifies the recovery of `losses` different
/// power-loss images of each.
fn sweep(seed: u64, steps: &[Step], dir_loss: DirLoss, losses: u64, cov: &mut Coverage) {
    let disk = SimDisk::with_dir(store());
    let clock = ManualClock::new(T0_MS);
    let clean = run(steps, &disk, &clock, OnFault::Stop);
    assert!(
        clean.failure.is_none(),
        "clean run failed: {:?}",
        clean.failure
    );
    drop(clean.db);
    let total = disk.crash_points();
    let trace = disk.trace();
    let mut rng = Rng::new(seed);
    for k in 0..=total {
        let disk = SimDisk::with_dir(store());
        disk.crash_at(k);
        disk.seed_cut_writes(rng.next_u64());
        let clock = ManualClock::new(T0_MS);
        let end = run(steps, &disk, &clock, OnFault::Stop);
        let seen = disk.trace();
        let same = (k as usize).min(seen.len());
        assert_eq!(
            seen[..same],
            trace[..same],
            "seed {seed} crash point {k}: the workload is not deterministic"
        );
        let candidates = end.candidates();
        // Closing is part of the run: its calls (the clean-close marker) are crash points.
        drop(end.db);
        assert!(
            k == total || disk.crashed(),
            "seed {seed}: crash point {k} never reached"
        );
        let label = classify(k, &trace, &clean.step_starts);
        for loss in 0..losses {
            let (image, fates) = disk.power_loss(rng.next_u64(), dir_loss);
            // Time passes while the machine is down: some TTLs end before recovery.
            let clock = ManualClock::new(now_ms(&clock) + rng.below(CLOCK_STEP_MS_MAX));
            let ctx = format!(
                "seed {seed} crash point {k}/{total} ({label}), power loss {loss} \
                 ({dir_loss:?}), failure {:?}, files {fates:?}",
                end.failure
            );
            match verify_recovery(&image, &clock, &candidates, &ctx).0 {
                0 if candidates.len() > 1 => cov.in_flight_lost += 1,
                0 => {}
                _ => cov.in_flight_kept += 1,
            }
        }
        cov.points += 1;
        *cov.kinds.entry(label).or_insert(0) += 1;
    }
    assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
}

fn crash_points_wanted() -> u64 {
    std::env::var("KEEL_CRASH_POINTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CRASH_POINTS_DEFAULT)
}

#[test]
fn every_crash_point_keeps_acknowledged_writes_and_batches_whole() {
    engine_thread_panics();
    let started = Instant::now();
    let wanted = crash_points_wanted();
    let mut cov = Coverage::default();
    let mut seed = 1;
    while cov.points < wanted {
        let steps = workload(seed, CRASH_WORKLOAD_OPS);
        sweep(seed, &steps, DirLoss::ForgetUnsynced, 1, &mut cov);
        seed += 1;
    }
    println!(
        "{} crash points over {} workloads in {:.1?}; in-flight write kept {} times, lost {} \
         times",
        cov.points,
        seed - 1,
        started.elapsed(),
        cov.in_flight_kept,
        cov.in_flight_lost
    );
    for (kind, n) in &cov.kinds {
        println!("  {n:6}  {kind}");
    }
    // The sweep must actually reach the interesting places.
    for must in [
        "open: create a WAL segment",
        "fdatasync sealing a segment before a roll",
        "write a new segment's header",
        "fsync the directory after a new segment",
        "write a WAL batch",
        "fdatasync the WAL (group commit)",
        "batch: write a WAL batch",
        "compact: write a snapshot chunk",
        "compact: fdatasync the snapshot temp file",
        "compact: rename the snapshot into place",
        "compact: fsync the directory after the rename",
        "remove a WAL segment a snapshot covers",
        "after the last call",
    ] {
        assert!(
            cov.kinds.keys().any(|k| k.contains(must)),
            "no crash point {must:?}: {:?}",
            cov.kinds.keys()
        );
    }
    assert!(
        cov.kinds
            .keys()
            .any(|k| !k.starts_with("compact") && k.ends_with("create the snapshot temp file")),
        "no automatic snapshot taken by a writer"
    );
    assert!(cov.in_flight_kept > 0 && cov.in_flight_lost > 0);
}

/// Operations in the workload whose every crash point is also crashed during recovery.
const RECOVERY_WORKLOAD_OPS: usize = 120;

#[test]
fn a_crash_during_recovery_leaves_a_store_that_recovers_again() {
    engine_thread_panics();
    let seed = 1_000;
    // Snapshots in between, so some crash images hold segments a snapshot covers.
    let mut steps = Vec::new();
    for i in 0..3 {
        steps.extend(workload(seed + i, RECOVERY_WORKLOAD_OPS / 3));
        steps.push(Step::Compact);
    }
    let disk = SimDisk::with_dir(store());
    let clean = run(&steps, &disk, &ManualClock::new(T0_MS), OnFault::Stop);
    drop(clean.db);
    let total = disk.crash_points();
    let mut rng = Rng::new(seed);
    let mut kinds: BTreeMap<&'static str, u64> = BTreeMap::new();
    for k in 0..=total {
        let disk = SimDisk::with_dir(store());
        disk.crash_at(k);
        disk.seed_cut_writes(rng.next_u64());
        let clock = ManualClock::new(T0_MS);
        let end = run(&steps, &disk, &clock, OnFault::Stop);
        let candidates = end.candidates();
        drop(end.db);
        let (image, _) = disk.power_loss(rng.next_u64(), DirLoss::ForgetUnsynced);
        // How many crash points does recovering this image have?
        let probe = image.restart();
        let probed = Db::open(store(), options(&probe, &clock)).expect("recovery of a crash image");
        // The open's own calls (closing, which writes the clean-close marker, comes after).
        let recovery_trace = probe.trace();
        drop(probed);
        for j in 0..recovery_trace.len() as u64 {
            let disk = image.restart();
            disk.crash_at(j);
            disk.seed_cut_writes(rng.next_u64());
            let reopened = Db::open(store(), options(&disk, &clock));
            assert!(
                reopened.is_err(),
                "crash point {k}, recovery crash point {j}: open succeeded although a call it \
                 made failed"
            );
            let (again, fates) = disk.power_loss(rng.next_u64(), DirLoss::ForgetUnsynced);
            let what = describe(&recovery_trace, j as usize);
            let ctx = format!("crash point {k}, then recovery crash point {j} ({what}), {fates:?}");
            verify_recovery(&again, &clock, &candidates, &ctx);
            *kinds.entry(what).or_insert(0) += 1;
        }
    }
    println!("recovery crash points: {kinds:?}");
    for must in [
        "cut a torn WAL tail",
        "fdatasync a segment after cutting its torn tail",
        "create a WAL segment",
        "remove a WAL segment a snapshot covers",
        "fsync the directory after removals",
    ] {
        assert!(
            kinds.contains_key(must),
            "no recovery crash point {must:?}: {kinds:?}"
        );
    }
    assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
}

/// Power losses tried at each crash point of a snapshot install.
const SNAPSHOT_POWER_LOSSES: u64 = 8;

fn snapshot_lsn_of(e: &Event) -> u64 {
    let name = e.name();
    name["snapshot-".len()..]
        .split('.')
        .next()
        .and_then(|d| d.parse().ok())
        .expect("a snapshot file name")
}

#[test]
fn a_crash_at_every_step_of_a_snapshot_install_keeps_every_acknowledged_write() {
    engine_thread_panics();
    let seed = 2_000;
    let mut steps = workload(seed, 60);
    steps.push(Step::Compact);
    steps.extend(workload(seed + 1, 60));
    steps.push(Step::Compact);
    let disk = SimDisk::with_dir(store());
    let clean = run(&steps, &disk, &ManualClock::new(T0_MS), OnFault::Stop);
    let compact_starts = clean.step_starts.last().expect("steps").0;
    drop(clean.db);
    let trace = disk.trace();
    let renames: Vec<&Event> = trace
        .iter()
        .filter(|e| e.kind == OpKind::Rename && file_class(e) == "snapshot temp file")
        .collect();
    assert!(renames.len() >= 2, "two snapshots expected: {renames:?}");
    let old_lsn = snapshot_lsn_of(renames[renames.len() - 2]);
    let new_lsn = snapshot_lsn_of(renames[renames.len() - 1]);
    let mut seen = Vec::new();
    for k in compact_starts..=disk.crash_points() {
        let what = describe(&trace, k as usize);
        seen.push(what);
        for variant in 0..SNAPSHOT_POWER_LOSSES {
            let disk = SimDisk::with_dir(store());
            disk.crash_at(k);
            disk.seed_cut_writes(variant);
            let clock = ManualClock::new(T0_MS);
            let end = run(&steps, &disk, &clock, OnFault::Stop);
            let candidates = end.candidates();
            drop(end.db);
            // Even variants forget every unsynced directory operation; odd ones keep a prefix
            // of them (a temp file or the rename may then survive without the fsync).
            let dir_loss = match variant % 2 {
                0 => DirLoss::ForgetUnsynced,
                _ => DirLoss::KeepPrefix,
            };
            let (image, fates) = disk.power_loss(variant, dir_loss);
            let ctx = format!("snapshot install crash point {k} ({what}), {dir_loss:?} {variant}");
            let (_, report) = verify_recovery(&image, &clock, &candidates, &ctx);
            // Until the directory fsync after the rename returns, the new snapshot may be
            // forgotten (and is, when unsynced operations are); from then on it must be the one
            // loaded.
            let is_install =
                |e: &Event| e.kind == OpKind::Rename && file_class(e) == "snapshot temp file";
            let renamed_and_synced = trace[compact_starts as usize..k as usize]
                .windows(2)
                .any(|w| is_install(&w[0]) && w[1].kind == OpKind::SyncDir);
            let renamed = trace[compact_starts as usize..k as usize]
                .iter()
                .any(is_install);
            let allowed = match (renamed_and_synced, renamed, dir_loss) {
                (true, _, _) => vec![new_lsn],
                (false, true, DirLoss::KeepPrefix) => vec![old_lsn, new_lsn],
                _ => vec![old_lsn],
            };
            assert!(
                allowed.contains(&report.snapshot_lsn),
                "{ctx}: loaded the snapshot at {}, allowed {allowed:?} ({fates:?})",
                report.snapshot_lsn
            );
            let leftovers: Vec<_> = image
                .listing(store())
                .into_iter()
                .filter(|(name, _, _)| name.ends_with(".tmp"))
                .collect();
            assert!(
                leftovers.is_empty(),
                "{ctx}: temp files left after recovery: {leftovers:?}"
            );
        }
    }
    for must in [
        "create the snapshot temp file",
        "write the snapshot header",
        "write a snapshot chunk",
        "write the snapshot footer",
        "fdatasync the snapshot temp file",
        "rename the snapshot into place",
        "fsync the directory after the rename",
        "remove an older snapshot",
        "remove a WAL segment a snapshot covers",
        "fsync the directory after removals",
        "after the last call",
    ] {
        assert!(
            seen.contains(&must),
            "snapshot step {must:?} not crashed: {seen:?}"
        );
    }
    assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
}

/// Power-loss images recovered per crash point in the sweep where directory operations may
/// reach the disk without an fsync.
const DIR_PREFIX_LOSSES: u64 = 4;

#[test]
fn directory_entries_that_reach_disk_before_their_fsync_do_not_break_recovery() {
    engine_thread_panics();
    let mut cov = Coverage::default();
    let mut seed = 3_000;
    let wanted = crash_points_wanted() * 3 / 10;
    while cov.points < wanted {
        let steps = workload(seed, CRASH_WORKLOAD_OPS);
        sweep(
            seed,
            &steps,
            DirLoss::KeepPrefix,
            DIR_PREFIX_LOSSES,
            &mut cov,
        );
        seed += 1;
    }
}

/// Seed of the fault-injection workload.
const FAULT_SEED: u64 = 4_000;

/// Fails call `n` of `kind`, for every `n` the workload makes, once and then for good; checks
/// each run (see `run` with `OnFault::Continue`) and the recovery of the disk it leaves, after
/// a process restart and after a power loss. Returns how many runs hit their fault.
fn fault_sweep(kinds: &[OpKind]) -> u64 {
    engine_thread_panics();
    // Short stretches of the usual workload, with a snapshot and a reopen between them so
    // every kind of call is made.
    let mut steps = Vec::new();
    for (i, then) in [Step::Compact, Step::Reopen, Step::Compact, Step::Reopen]
        .into_iter()
        .enumerate()
    {
        steps.extend(workload(FAULT_SEED + i as u64, FAULT_WORKLOAD_OPS / 4));
        steps.push(then);
    }
    let disk = SimDisk::with_dir(store());
    let clean = run(&steps, &disk, &ManualClock::new(T0_MS), OnFault::Continue);
    assert!(
        clean.failure.is_none(),
        "clean run failed: {:?}",
        clean.failure
    );
    drop(clean.db);
    let mut runs = 0;
    for &kind in kinds {
        let calls = disk.calls(kind);
        assert!(calls > 0, "the workload never calls {kind:?}");
        for nth in 0..calls {
            for persistent in [false, true] {
                let fault = Fault {
                    kind,
                    nth,
                    persistent,
                };
                let disk = SimDisk::with_dir(store());
                disk.inject(fault);
                disk.seed_cut_writes(nth);
                let clock = ManualClock::new(T0_MS);
                let end = run(&steps, &disk, &clock, OnFault::Continue);
                let candidates = end.candidates();
                // Closing is part of the run: a fault may hit the clean-close marker.
                drop(end.db);
                let injected = disk.injected();
                assert!(!injected.is_empty(), "{fault:?} was never hit");
                disk.heal();
                let ctx = format!(
                    "{fault:?} at {:?}, first failure {:?}",
                    injected[0], end.failure
                );
                verify_recovery(
                    &disk.restart(),
                    &clock,
                    &candidates,
                    &format!("{ctx}, restart"),
                );
                let (image, _) = disk.power_loss(nth, DirLoss::ForgetUnsynced);
                verify_recovery(&image, &clock, &candidates, &format!("{ctx}, power loss"));
                runs += 1;
            }
        }
    }
    assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
    println!("{kinds:?}: {runs} faulty runs");
    runs
}

#[test]
fn a_failed_fdatasync_is_never_acknowledged_and_poisons_the_store() {
    fault_sweep(&[OpKind::SyncData]);
}

#[test]
fn a_failed_write_is_never_acknowledged_and_poisons_the_store() {
    fault_sweep(&[OpKind::Write]);
}

#[test]
fn a_failed_rename_leaves_the_previous_snapshot_and_every_write() {
    fault_sweep(&[OpKind::Rename]);
}

#[test]
fn a_failed_read_fails_the_open_and_a_healthy_reopen_recovers() {
    fault_sweep(&[OpKind::Read]);
}

#[test]
fn a_failed_create_of_a_segment_or_snapshot_loses_no_acknowledged_write() {
    fault_sweep(&[OpKind::Create]);
}

#[test]
fn a_failed_directory_fsync_loses_no_acknowledged_write() {
    fault_sweep(&[OpKind::SyncDir]);
}

#[test]
fn a_failed_list_len_remove_open_lock_or_mkdir_is_a_typed_error() {
    fault_sweep(&[
        OpKind::List,
        OpKind::Len,
        OpKind::Remove,
        OpKind::OpenAppend,
        OpKind::Lock,
        OpKind::CreateDir,
    ]);
}

#[test]
fn a_failed_truncation_of_a_torn_tail_fails_the_open_and_a_healthy_reopen_recovers() {
    engine_thread_panics();
    let steps = workload(FAULT_SEED, FAULT_WORKLOAD_OPS / 2);
    let disk = SimDisk::with_dir(store());
    let clock = ManualClock::new(T0_MS);
    let end = run(&steps, &disk, &clock, OnFault::Stop);
    assert!(end.failure.is_none(), "{:?}", end.failure);
    let db = end.db.expect("open");
    db.close().expect("closes");
    // A torn write at the end of the last segment.
    let (last, _, _) = disk
        .listing(store())
        .into_iter()
        .rfind(|(name, _, _)| name.starts_with("wal-"))
        .expect("a segment");
    let path = store().join(&last);
    let mut bytes = disk.file(&path).expect("the segment");
    bytes.extend_from_slice(&[0x5A; 57]);
    disk.put_file(&path, &bytes);
    for kind in [OpKind::OpenAppend, OpKind::Truncate, OpKind::SyncData] {
        for persistent in [false, true] {
            let faulty = disk.restart();
            faulty.inject(Fault {
                kind,
                nth: 0,
                persistent,
            });
            match Db::open(store(), options(&faulty, &clock)) {
                Err(Error::Io(_)) => {}
                other => panic!("{kind:?}: open with a failing cut returned {other:?}"),
            }
            faulty.heal();
            let ctx = format!("failed {kind:?} while cutting a torn tail");
            verify_recovery(
                &faulty.restart(),
                &clock,
                std::slice::from_ref(&end.acked),
                &ctx,
            );
            let (image, _) = faulty.power_loss(7, DirLoss::ForgetUnsynced);
            verify_recovery(&image, &clock, std::slice::from_ref(&end.acked), &ctx);
        }
    }
    assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
}

// The simulated disk itself: it must lose exactly what the contract allows, or the tests
// above prove nothing.

fn sim_file(disk: &SimDisk, name: &str, bytes: &[u8], sync: bool) {
    use keel_engine::storage::Storage;
    let mut file = disk.create(&store().join(name)).expect("create");
    file.write_all(bytes).expect("write");
    if sync {
        file.sync_data().expect("sync");
    }
}

#[test]
fn the_simulated_disk_keeps_synced_bytes_and_forgets_unsynced_directory_entries() {
    use keel_engine::storage::Storage;
    let mut fates_seen = std::collections::BTreeSet::new();
    for seed in 0..200 {
        let disk = SimDisk::with_dir(store());
        sim_file(&disk, "synced", b"durable", true);
        sim_file(&disk, "renamed", b"r", true);
        sim_file(&disk, "removed", b"gone?", true);
        disk.sync_dir(store()).expect("sync dir");
        // Unsynced: an appended tail, a new file, a rename, a removal.
        let mut tail = disk.open_append(&store().join("synced")).expect("open");
        tail.write_all(b"+unsynced tail").expect("write");
        sim_file(&disk, "new", b"synced data, unsynced name", true);
        disk.rename(&store().join("renamed"), &store().join("moved"))
            .expect("rename");
        disk.remove(&store().join("removed")).expect("remove");

        let (after, fates) = disk.power_loss(seed, DirLoss::ForgetUnsynced);
        let synced = after
            .read(&store().join("synced"))
            .expect("a synced file survives");
        assert!(
            synced.starts_with(b"durable"),
            "synced bytes lost: {synced:?}"
        );
        assert!(synced.len() <= b"durable+unsynced tail".len());
        assert!(
            after.read(&store().join("new")).is_err(),
            "an unsynced name survived"
        );
        assert!(
            after.read(&store().join("renamed")).is_ok(),
            "an unsynced rename stuck"
        );
        assert!(after.read(&store().join("moved")).is_err());
        assert!(
            after.read(&store().join("removed")).is_ok(),
            "an unsynced removal stuck"
        );
        fates_seen.extend(
            fates
                .into_iter()
                .filter(|f| f.name == "synced")
                .map(|f| f.how),
        );

        let (after, _) = disk.power_loss(seed, DirLoss::KeepPrefix);
        let names = after.list(store()).expect("list");
        // A prefix of (create new, rename, remove): never a later one without the earlier.
        let applied = [
            names.contains(&"new".to_owned()),
            names.contains(&"moved".to_owned()),
            !names.contains(&"removed".to_owned()),
        ];
        assert!(
            applied.windows(2).all(|w| w[0] || !w[1]),
            "not a prefix: {names:?}"
        );
    }
    for how in [
        "unsynced dropped",
        "unsynced kept",
        "unsynced prefix",
        "torn with garbage",
        "unsynced pages in any order",
    ] {
        assert!(
            fates_seen.contains(how),
            "{how} never happened: {fates_seen:?}"
        );
    }
}

#[test]
fn the_simulated_disk_can_lose_an_unsynced_page_and_keep_a_later_one() {
    use keel_engine::storage::Storage;
    let synced = vec![b's'; 100];
    let unsynced: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8 | 1).collect();
    let mut holes = 0;
    for seed in 0..400 {
        let disk = SimDisk::with_dir(store());
        sim_file(&disk, "wal", &synced, true);
        disk.sync_dir(store()).expect("sync dir");
        let mut file = disk.open_append(&store().join("wal")).expect("open");
        file.write_all(&unsynced).expect("write");
        let (after, fates) = disk.power_loss(seed, DirLoss::ForgetUnsynced);
        let bytes = after
            .read(&store().join("wal"))
            .expect("a synced file survives");
        assert_eq!(
            bytes[..100],
            synced[..],
            "synced bytes changed (seed {seed})"
        );
        if fates[0].how != "unsynced pages in any order" {
            continue;
        }
        assert_eq!(bytes.len(), synced.len() + unsynced.len());
        // The 64-byte blocks of the unsynced part that reached the disk intact.
        let kept: Vec<bool> = bytes[100..]
            .chunks(64)
            .zip(unsynced.chunks(64))
            .map(|(a, b)| a == b)
            .collect();
        let first_lost = kept.iter().position(|k| !k);
        if first_lost.is_some_and(|lost| kept[lost..].iter().any(|k| *k)) {
            holes += 1;
        }
    }
    assert!(
        holes >= 20,
        "only {holes} losses left a hole before kept data"
    );
}

#[test]
fn the_simulated_disk_fails_every_call_from_the_crash_point_on() {
    use keel_engine::storage::Storage;
    let disk = SimDisk::with_dir(store());
    disk.crash_at(2);
    let mut file = disk.create(&store().join("f")).expect("crash point 0");
    file.write_all(b"ok").expect("crash point 1");
    assert!(file.sync_data().is_err(), "crash point 2 fails");
    assert!(disk.crashed());
    assert!(file.write_all(b"more").is_err());
    assert!(disk.read(&store().join("f")).is_err(), "reads fail too");
    assert!(disk.list(store()).is_err());
    assert_eq!(disk.crash_points(), 2);
    let (after, _) = disk.power_loss(0, DirLoss::KeepPrefix);
    let _ = after.read(&store().join("f"));
    assert!(
        after.list(store()).is_ok(),
        "the disk after a power loss works"
    );
}

#[test]
fn a_simulated_lock_is_exclusive_until_dropped() {
    use keel_engine::storage::{LockError, Storage};
    let disk = SimDisk::with_dir(store());
    let path = store().join("LOCK");
    let held = disk.lock(&path).expect("first lock");
    assert!(matches!(disk.lock(&path), Err(LockError::Held { .. })));
    drop(held);
    assert!(disk.lock(&path).is_ok());
}

#[test]
fn a_simulated_write_back_error_can_lose_the_bytes_for_good() {
    use keel_engine::storage::Storage;
    let path = store().join("f");
    for (behaviour, survives) in [
        (FsyncFailure::KeepsPages, true),
        (FsyncFailure::LosesPages, false),
    ] {
        let disk = SimDisk::with_dir(store());
        disk.on_fsync_failure(behaviour);
        sim_file(&disk, "f", b"one,", true);
        disk.sync_dir(store()).expect("sync dir");
        let mut file = disk.open_append(&path).expect("open");
        file.write_all(b"two,").expect("write");
        disk.inject(Fault {
            kind: OpKind::SyncData,
            nth: disk.calls(OpKind::SyncData),
            persistent: false,
        });
        assert!(file.sync_data().is_err());
        assert_eq!(disk.read(&path).expect("read"), b"one,two,", "reads see it");
        file.write_all(b"three").expect("write");
        file.sync_data().expect("a later sync succeeds");
        // A power loss that writes back none of what was never synced.
        let after = (0..)
            .map(|seed| disk.power_loss(seed, DirLoss::ForgetUnsynced))
            .find(|(_, fates)| {
                fates
                    .iter()
                    .all(|f| f.how == "synced" || f.how == "unsynced dropped")
            })
            .map(|(after, _)| after)
            .expect("some seed drops the unsynced bytes");
        let want: &[u8] = match survives {
            true => b"one,two,three",
            false => b"one,\0\0\0\0three",
        };
        assert_eq!(after.read(&path).expect("read"), want, "{behaviour:?}");
    }
}

// `Periodic` durability. A write is acknowledged once the WAL `write` returned, before any
// fdatasync; DESIGN.md's rule for a crash: recovery shows a prefix of the acknowledged
// sequence (never a reordering), and that prefix holds every write acknowledged before the
// last fdatasync that completed, and every write acknowledged through an `Immediate` handle
// (the store's durable points, e.g. a fencing counter).

/// The background interval: longer than any run, so the only fdatasyncs are the durable
/// points, segment rolls, snapshots and closes, the same calls on every run (crash point k
/// is the same call each time, but for the one WAL fdatasync `periodic_sweep` describes).
const PERIODIC_INTERVAL: Duration = Duration::from_secs(3600);
/// One write in this many goes through an `Immediate` handle.
const PERIODIC_DURABLE_EVERY: u64 = 12;

/// A short interval: the writer thread's background fdatasyncs land between the workload's
/// calls wherever the scheduler puts them (crash point k differs from run to run).
const PERIODIC_INTERVAL_SHORT: Duration = Duration::from_micros(250);

fn periodic_options(disk: &SimDisk, clock: &ManualClock, interval: Duration) -> Options {
    options(disk, clock).durability(keel_engine::Durability::Periodic(interval))
}

/// fdatasyncs of WAL segments that completed on `disk` so far (the call a crash hit did not).
fn wal_syncs_completed(disk: &SimDisk) -> usize {
    let done = disk.crash_points() as usize;
    disk.trace()[..done]
        .iter()
        .filter(|e| e.kind == OpKind::SyncData && e.name().starts_with("wal-"))
        .count()
}

/// How a `Periodic` run ended.
struct PeriodicEnd {
    db: Option<Db>,
    /// The state after each acknowledged write that changed something, in order;
    /// `states[0]` is the empty store.
    states: Vec<Model>,
    /// For each of `states`, the WAL fdatasyncs completed when it was acknowledged, and
    /// whether it was acknowledged through an `Immediate` handle.
    acked_at: Vec<(usize, bool)>,
    /// The state with the write in flight applied, if the crash hit a write.
    in_flight: Option<Model>,
    failure: Option<String>,
}

impl PeriodicEnd {
    /// The first state recovery may show: the newest acknowledged before the last completed
    /// fdatasync, or acknowledged durably.
    fn required(&self, syncs: usize) -> usize {
        self.acked_at
            .iter()
            .rposition(|&(at, durable)| durable || at < syncs)
            .unwrap_or(0)
    }

    /// Every state a crash may leave, given the fdatasyncs completed before it.
    fn candidates(&self, syncs: usize) -> Vec<Model> {
        let mut c: Vec<Model> = self.states[self.required(syncs)..].to_vec();
        // Newest first: the usual outcome, found fastest.
        c.reverse();
        c.extend(self.in_flight.clone());
        c
    }
}

/// Runs `steps` on a `Periodic` store until the first failure.
fn run_periodic(
    steps: &[Step],
    disk: &SimDisk,
    clock: &ManualClock,
    seed: u64,
    interval: Duration,
) -> PeriodicEnd {
    let mut rng = Rng::new(seed);
    let mut end = PeriodicEnd {
        db: None,
        states: vec![Model::new(Limits::default())],
        acked_at: vec![(0, false)],
        in_flight: None,
        failure: None,
    };
    match Db::open(store(), periodic_options(disk, clock, interval)) {
        Ok(db) => end.db = Some(db),
        Err(e) => {
            assert!(is_fault(&e), "open failed with a non-I/O error: {e:?}");
            end.failure = Some(format!("open: {e}"));
            return end;
        }
    }
    for (i, step) in steps.iter().enumerate() {
        let db = end.db.as_ref().expect("open between steps");
        match step {
            Step::Advance(ms) => clock.advance(Duration::from_millis(*ms)),
            Step::Op(op) => {
                let durable = op.is_write() && rng.chance(1, PERIODIC_DURABLE_EVERY);
                let now = now_ms(clock);
                let acked = end.states.last().expect("a state").clone();
                let mut next = acked.clone();
                let want = next.apply(op, now);
                let got = match durable {
                    true => model::run_on_db(
                        &db.with_durability(keel_engine::Durability::Immediate),
                        op,
                    ),
                    false => model::run_on_db(db, op),
                };
                if got == want {
                    if next != acked {
                        end.states.push(next);
                        end.acked_at.push((wal_syncs_completed(disk), durable));
                    }
                    continue;
                }
                assert!(
                    got.is_fault() && disk.crashed(),
                    "step {i}: {op:?} returned {got:?}, the model says {want:?}"
                );
                if op.is_write() && !matches!(want, Outcome::Err(_)) {
                    end.in_flight = Some(next);
                }
                end.failure = Some(format!("step {i} {op:?}: {got:?}"));
                return end;
            }
            Step::Compact => {
                if let Err(e) = db.compact() {
                    assert!(is_fault(&e) && disk.crashed(), "step {i}: compact: {e:?}");
                    end.failure = Some(format!("step {i} compact: {e}"));
                    return end;
                }
            }
            Step::Reopen => {
                let db = end.db.take().expect("open");
                if let Err(e) = db.close() {
                    assert!(is_fault(&e) && disk.crashed(), "step {i}: close: {e:?}");
                    end.failure = Some(format!("step {i} close: {e}"));
                    return end;
                }
                match Db::open(store(), periodic_options(disk, clock, interval)) {
                    Ok(db) => {
                        // A clean close syncs everything: a restart shows it all.
                        let want = end.states.last().expect("a state");
                        check_recovered(&db, std::slice::from_ref(want), now_ms(clock))
                            .unwrap_or_else(|diff| panic!("step {i}: after a reopen: {diff}"));
                        end.db = Some(db);
                    }
                    Err(e) => {
                        assert!(is_fault(&e) && disk.crashed(), "step {i}: reopen: {e:?}");
                        end.failure = Some(format!("step {i} reopen: {e}"));
                        return end;
                    }
                }
            }
        }
    }
    end
}

/// Power-loss images recovered per crash point of the `Periodic` sweep.
const PERIODIC_POWER_LOSSES: u64 = 2;

/// Crashes `Periodic(interval)` workloads at every crash point, from seed `first_seed` on,
/// until `wanted` points are covered, and checks the rule above after each. With a long
/// interval every run makes the same calls, and the sweep checks that it does.
fn periodic_sweep(interval: Duration, first_seed: u64, wanted: u64) {
    engine_thread_panics();
    let started = Instant::now();
    let deterministic = interval == PERIODIC_INTERVAL;
    let (mut points, mut seed) = (0, first_seed);
    // WAL fdatasyncs the writer thread made on its own schedule, in the clean runs.
    let mut background_syncs = 0;
    // How far recovery fell behind the acknowledged writes: 0, 1–9, 10 or more states.
    let mut behind = [0u64; 3];
    let mut required_above_zero = 0;
    let mut holes = 0u64;
    while points < wanted {
        let steps = workload(seed, CRASH_WORKLOAD_OPS);
        let disk = SimDisk::with_dir(store());
        let clean = run_periodic(&steps, &disk, &ManualClock::new(T0_MS), seed, interval);
        assert!(
            clean.failure.is_none(),
            "clean run failed: {:?}",
            clean.failure
        );
        drop(clean.db);
        let total = disk.crash_points();
        let trace = disk.trace();
        if !deterministic {
            // The same workload without background fdatasyncs: the difference is theirs.
            let quiet = SimDisk::with_dir(store());
            let end = run_periodic(
                &steps,
                &quiet,
                &ManualClock::new(T0_MS),
                seed,
                PERIODIC_INTERVAL,
            );
            drop(end.db);
            background_syncs +=
                wal_syncs_completed(&disk).saturating_sub(wal_syncs_completed(&quiet));
        }
        let mut rng = Rng::new(seed);
        for k in 0..=total {
            let disk = SimDisk::with_dir(store());
            disk.crash_at(k);
            disk.seed_cut_writes(rng.next_u64());
            let clock = ManualClock::new(T0_MS);
            let mut end = run_periodic(&steps, &disk, &clock, seed, interval);
            // Apart from WAL fdatasyncs, every run makes the same calls up to its crash. One
            // fdatasync may move: a snapshot's "make the WAL durable" on a WAL that already is
            // leaves a sync request behind, which the next commit serves with an fdatasync
            // (when a writer leads it) or without (when the writer thread, woken by the
            // request, leads it first with nothing unsynced). Rare, and timing-dependent.
            let seen = disk.trace();
            let same = (k as usize).min(seen.len());
            let calls = |t: &[Event]| -> Vec<Event> {
                t.iter()
                    .filter(|e| !(e.kind == OpKind::SyncData && e.name().starts_with("wal-")))
                    .cloned()
                    .collect()
            };
            let (seen_calls, clean_calls) = (calls(&seen[..same]), calls(&trace));
            assert!(
                !deterministic || clean_calls.starts_with(&seen_calls),
                "seed {seed} crash point {k}: the workload is not deterministic"
            );
            // Closing is part of the run (its final fdatasync is a crash point).
            drop(end.db.take());
            let syncs = wal_syncs_completed(&disk);
            let required = end.required(syncs);
            required_above_zero += u64::from(required > 0);
            let candidates = end.candidates(syncs);
            for loss in 0..PERIODIC_POWER_LOSSES {
                let (image, fates) = disk.power_loss(rng.next_u64(), DirLoss::ForgetUnsynced);
                let clock = ManualClock::new(now_ms(&clock) + rng.below(CLOCK_STEP_MS_MAX));
                let ctx = format!(
                    "seed {seed} crash point {k}/{total} ({}), power loss {loss}: {} states \
                     acknowledged, {syncs} WAL fdatasyncs completed, state {required} must be \
                     there; failure {:?}, files {fates:?}",
                    describe(&seen, k as usize),
                    end.states.len(),
                    end.failure
                );
                let (found, report) = verify_recovery(&image, &clock, &candidates, &ctx);
                holes += u64::from(report.records_discarded > 0);
                let lag = match end.in_flight.is_some() && found == candidates.len() - 1 {
                    true => 0,
                    false => found,
                };
                behind[match lag {
                    0 => 0,
                    1..=9 => 1,
                    _ => 2,
                }] += 1;
            }
            points += 1;
        }
        seed += 1;
    }
    println!(
        "Periodic({interval:?}): {points} crash points over {} workloads in {:.1?}; recovered the newest \
         state {} times, 1-9 states behind {} times, 10+ behind {} times; a synced state was \
         required at {required_above_zero} points",
        seed - first_seed,
        started.elapsed(),
        behind[0],
        behind[1],
        behind[2]
    );
    println!(
        "  recoveries that discarded valid records after a hole in the unsynced tail: {holes}"
    );
    // The sweep must see both outcomes the rule allows: unsynced writes lost, and kept.
    assert!(behind[0] > 0 && behind[1] + behind[2] > 0, "{behind:?}");
    // And the failure model that loses unsynced pages out of order must have struck where
    // valid records followed the hole (several unsynced batches).
    assert!(holes > 0, "no power loss left a hole before valid records");
    assert!(required_above_zero > 0);
    assert!(
        deterministic || background_syncs > 0,
        "no background fdatasync happened at {interval:?}"
    );
    println!("  background fdatasyncs in the clean runs: {background_syncs}");
    assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
}

#[test]
fn periodic_durability_recovers_a_prefix_holding_every_write_acknowledged_before_the_last_fdatasync()
 {
    periodic_sweep(PERIODIC_INTERVAL, 5_000, crash_points_wanted() / 2);
}

#[test]
fn periodic_background_fdatasyncs_keep_the_prefix_rule_at_every_crash_point() {
    periodic_sweep(PERIODIC_INTERVAL_SHORT, 5_500, crash_points_wanted() / 4);
}

// Concurrent writers. Several threads write to one `Immediate` store at once, private keys
// (one thread each) and shared keys, with sets, deletes and batches spanning both; the
// machine crashes at crash point k, wherever the interleaving of that run put it. Recovery
// must keep every acknowledged write and show a state some serial order of the commits
// produces: each thread's private keys hold a prefix of that thread's operations (everything
// it had acknowledged, plus perhaps the one in flight), a shared key holds a value some
// write gave it and no acknowledged write that began after that write ended is lost, and a
// value from an operation in flight is there only if the rest of that operation is too.
// The thread interleaving is the scheduler's, so crash point k is not the same call on every
// run; the operations are seeded, and every failure message names the seed and the point.

/// Writer threads.
const WRITERS: usize = 4;
/// Operations per writer thread.
const WRITER_OPS: usize = 30;
/// Keys each thread alone writes.
const PRIVATE_KEYS: u64 = 3;
/// Keys every thread writes.
const SHARED_KEYS: u64 = 2;

/// Whether a delete that found the key already gone is exempt from "no acknowledged write is
/// lost". It is not: such a delete is acknowledged only once the delete (by another thread,
/// perhaps still in flight) whose effect it saw is durable. Before that rule (engine/DESIGN.md,
/// "Invariants"), a crash could lose the other delete and bring the key back although this
/// one was acknowledged, and the sweep failed 10 of 10 runs with this set to `false`.
const NOOP_DELETES_UNCHECKED: bool = false;

/// One write of a key: a value, or `None` for a delete.
type KeyWrite = (Vec<u8>, Option<Vec<u8>>);

/// One operation of a writer thread, as it ran.
#[derive(Debug, Clone)]
struct WriterOp {
    writes: Vec<KeyWrite>,
    /// Logical time before the call and after it returned (`None`: failed or never returned,
    /// so in flight at the crash).
    start: u64,
    end: Option<u64>,
    /// A delete that found nothing to delete (it logs nothing).
    noop: bool,
}

fn private_key(thread: usize, i: u64) -> Vec<u8> {
    format!("p{thread}.{i}").into_bytes()
}

fn shared_key(i: u64) -> Vec<u8> {
    format!("s{i}").into_bytes()
}

/// The seeded operations of writer `thread`.
fn writer_ops(seed: u64, thread: usize) -> Vec<Vec<KeyWrite>> {
    let mut rng = Rng::new(seed * 64 + thread as u64);
    (0..WRITER_OPS)
        .map(|i| {
            let val = |part: usize| Some(format!("w{thread}.{i}.{part}").into_bytes());
            let private = private_key(thread, rng.below(PRIVATE_KEYS));
            let shared = shared_key(rng.below(SHARED_KEYS));
            match rng.below(10) {
                0..=3 => vec![(private, val(0))],
                4..=6 => vec![(shared, val(0))],
                7 => vec![(
                    match rng.chance(1, 2) {
                        true => private,
                        false => shared,
                    },
                    None,
                )],
                _ => vec![(private, val(0)), (shared, val(1))],
            }
        })
        .collect()
}

/// Runs every writer thread's operations on `db` at once; each thread stops at its first
/// error. Returns each thread's operations as they ran.
fn run_writers(db: &Db, ops: &[Vec<Vec<KeyWrite>>]) -> Vec<Vec<WriterOp>> {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicU64, Ordering};
    let clock = AtomicU64::new(0);
    let barrier = Barrier::new(ops.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = ops
            .iter()
            .map(|mine| {
                let (db, clock, barrier) = (db.clone(), &clock, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    let mut done = Vec::new();
                    for writes in mine {
                        let start = clock.fetch_add(1, Ordering::SeqCst);
                        let mut noop = false;
                        let result = match writes.as_slice() {
                            [(key, Some(value))] => db.set(key, value, None),
                            [(key, None)] => db.delete(key).map(|deleted| noop = !deleted),
                            _ => {
                                let mut batch = keel_engine::Batch::new();
                                for (key, value) in writes {
                                    match value {
                                        Some(v) => batch.set(key.clone(), v.clone(), None),
                                        None => batch.delete(key.clone()),
                                    };
                                }
                                db.write_batch(&batch)
                            }
                        };
                        let end = clock.fetch_add(1, Ordering::SeqCst);
                        let ok = match &result {
                            Ok(()) => true,
                            Err(e) => {
                                assert!(is_fault(e), "a write failed with {e:?}");
                                false
                            }
                        };
                        done.push(WriterOp {
                            writes: writes.clone(),
                            start,
                            end: ok.then_some(end),
                            noop,
                        });
                        if !ok {
                            break;
                        }
                    }
                    done
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a writer thread panicked"))
            .collect()
    })
}

/// (key, value) → the operation that wrote it: (thread, index).
type Origins<'a> = BTreeMap<(&'a [u8], &'a [u8]), (usize, usize)>;

/// Checks a recovered store against what the writers did (see the comment above
/// `WRITERS`); `Err` says what is wrong.
fn check_serial(
    got: &BTreeMap<Vec<u8>, (Vec<u8>, u64)>,
    ran: &[Vec<WriterOp>],
) -> Result<(), String> {
    // Which operation wrote each value: (thread, index).
    let mut origin: Origins<'_> = BTreeMap::new();
    for (t, ops) in ran.iter().enumerate() {
        for (i, op) in ops.iter().enumerate() {
            for (key, value) in &op.writes {
                if let Some(v) = value {
                    origin.insert((key, v), (t, i));
                }
            }
        }
    }
    // Per thread, the prefixes of its operations its private keys are consistent with.
    let mut prefixes: Vec<Vec<usize>> = Vec::new();
    for (t, ops) in ran.iter().enumerate() {
        let acked = ops.iter().filter(|op| op.end.is_some()).count();
        let mine: BTreeMap<&Vec<u8>, &(Vec<u8>, u64)> = got
            .iter()
            .filter(|(k, _)| k.starts_with(format!("p{t}.").as_bytes()))
            .collect();
        let fits: Vec<usize> = (acked..=ops.len())
            .filter(|&p| {
                let mut state: BTreeMap<&Vec<u8>, &Vec<u8>> = BTreeMap::new();
                for op in &ops[..p] {
                    for (key, value) in &op.writes {
                        if !key.starts_with(b"p") {
                            continue;
                        }
                        match value {
                            Some(v) => state.insert(key, v),
                            None => state.remove(key),
                        };
                    }
                }
                state.len() == mine.len()
                    && state
                        .iter()
                        .all(|(k, v)| mine.get(k).is_some_and(|(g, _)| &g == v))
            })
            .collect();
        if fits.is_empty() {
            return Err(format!(
                "thread {t}: its keys {mine:?} are no prefix of its operations from the {acked} \
                 it had acknowledged on ({} ran)",
                ops.len()
            ));
        }
        prefixes.push(fits);
    }
    for (key, (value, _)) in got {
        let Some(&(t, i)) = origin.get(&(key.as_slice(), value.as_slice())) else {
            return Err(format!("{key:?} holds {value:?}, which no write gave it"));
        };
        if !prefixes[t].iter().any(|&p| p > i) {
            return Err(format!(
                "{key:?} holds {value:?} from thread {t}'s operation {i}, but thread {t}'s keys \
                 show only its first {:?} operations",
                prefixes[t]
            ));
        }
    }
    // Shared keys: no acknowledged write may be lost to one that ended before it began.
    for s in 0..SHARED_KEYS {
        let key = shared_key(s);
        let now = got.get(&key).map(|(v, _)| v);
        // When the write that left the key as it is returned (`None`: it never did, so
        // any later write may be ordered before it); the empty key counts from time 0 if
        // nobody deleted it.
        let shown_end: Option<u64> = match now {
            Some(v) => {
                let (t, i) = origin[&(key.as_slice(), v.as_slice())];
                ran[t][i].end
            }
            None => {
                // The latest-ending candidate: a delete (or the initial empty state).
                let deletes = ran
                    .iter()
                    .flatten()
                    .filter(|op| op.writes.iter().any(|(k, v)| *k == key && v.is_none()));
                let mut best = Some(0);
                for d in deletes {
                    best = match (best, d.end) {
                        (_, None) | (None, _) => None,
                        (Some(a), Some(b)) => Some(a.max(b)),
                    };
                }
                best
            }
        };
        let Some(shown_end) = shown_end else { continue };
        for op in ran.iter().flatten() {
            let writes_key = op.writes.iter().find(|(k, _)| *k == key);
            if let Some((_, value)) = writes_key
                && op.end.is_some()
                && !(op.noop && NOOP_DELETES_UNCHECKED)
                && op.start > shown_end
            {
                return Err(format!(
                    "{key:?} shows {now:?}, whose write returned at {shown_end}, but the \
                     acknowledged write of {value:?} that ran from {} to {:?} after it is lost{}",
                    op.start,
                    op.end,
                    match op.noop {
                        true => " (a delete that found the key gone)",
                        false => "",
                    }
                ));
            }
        }
    }
    Ok(())
}

#[test]
fn concurrent_writers_keep_every_acknowledged_write_in_a_serial_order_at_every_crash_point() {
    engine_thread_panics();
    let started = Instant::now();
    let wanted = crash_points_wanted();
    let (mut points, mut seed) = (0, 6_000);
    let (mut in_flight_kept, mut crashed_mid_run, mut holes) = (0, 0, 0u64);
    while points < wanted {
        let ops: Vec<_> = (0..WRITERS).map(|t| writer_ops(seed, t)).collect();
        // A clean run: how many crash points this workload has (about; the interleaving, and
        // so how writes group into commits, differs between runs).
        let disk = SimDisk::with_dir(store());
        let clock = ManualClock::new(T0_MS);
        let db = Db::open(store(), options(&disk, &clock)).expect("open");
        let ran = run_writers(&db, &ops);
        assert!(ran.iter().flatten().all(|op| op.end.is_some()));
        check_serial(&dump(&db), &ran).unwrap_or_else(|e| panic!("seed {seed}, no crash: {e}"));
        db.close().expect("close");
        let total = disk.crash_points();
        let mut rng = Rng::new(seed);
        for k in 0..=total {
            let disk = SimDisk::with_dir(store());
            disk.crash_at(k);
            disk.seed_cut_writes(rng.next_u64());
            let clock = ManualClock::new(T0_MS);
            let ran = match Db::open(store(), options(&disk, &clock)) {
                Ok(db) => {
                    let ran = run_writers(&db, &ops);
                    let _ = db.close();
                    ran
                }
                Err(e) => {
                    assert!(is_fault(&e), "open: {e:?}");
                    vec![Vec::new(); WRITERS]
                }
            };
            let in_flight = ran.iter().flatten().filter(|op| op.end.is_none()).count();
            crashed_mid_run += u64::from(in_flight > 0);
            let images = [("restart", disk.restart(), Vec::new()), {
                let (image, fates) = disk.power_loss(rng.next_u64(), DirLoss::ForgetUnsynced);
                ("power loss", image, fates)
            }];
            for (how, image, fates) in images {
                let ctx = format!(
                    "seed {seed} crash point {k}/{total}, {how}: {in_flight} writes in flight, \
                     files {fates:?}"
                );
                let db = Db::open(store(), options(&image, &clock))
                    .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e:?}"));
                holes += u64::from(db.stats().recovery.is_some_and(|r| r.records_discarded > 0));
                let got = dump(&db);
                check_serial(&got, &ran).unwrap_or_else(|e| {
                    panic!("{ctx}: {e}\nrecovered {got:?}\nwriters ran {ran:?}")
                });
                let kept = ran
                    .iter()
                    .flatten()
                    .filter(|op| op.end.is_none())
                    .any(|op| {
                        op.writes
                            .iter()
                            .any(|(k, v)| v.is_some() && got.get(k).map(|(g, _)| g) == v.as_ref())
                    });
                in_flight_kept += u64::from(kept);
                // The recovered store takes writes and keeps them across a clean reopen.
                db.set(PROBE_KEY, ctx.as_bytes(), None)
                    .unwrap_or_else(|e| panic!("{ctx}: the recovered store refuses writes: {e:?}"));
                db.close().unwrap_or_else(|e| panic!("{ctx}: close: {e:?}"));
                let db = Db::open(store(), options(&image.restart(), &clock))
                    .unwrap_or_else(|e| panic!("{ctx}: second reopen failed: {e:?}"));
                let mut want = got;
                want.insert(PROBE_KEY.to_vec(), (ctx.as_bytes().to_vec(), 0));
                assert_eq!(
                    dump(&db),
                    want,
                    "{ctx}: the second reopen lost or changed something"
                );
            }
            points += 1;
        }
        seed += 1;
    }
    println!(
        "concurrent writers: {points} crash points over {} workloads in {:.1?}; a crash hit \
         writes in flight at {crashed_mid_run} points, an in-flight write survived {in_flight_kept} \
         times; {holes} recoveries discarded valid records after a hole in the unsynced tail",
        seed - 6_000,
        started.elapsed(),
    );
    assert!(crashed_mid_run > 0 && in_flight_kept > 0);
    assert_eq!(engine_thread_panics(), 0, "an engine thread panicked");
}
