//! `keel demo`: a narrated tour of what the embedded engine and the primitives on it do, meant as the first command a
//! newcomer runs. It works on real data in the store directory, under the `demo:` prefix only,
//! and starts by deleting whatever an earlier run left there, so it can run any number of
//! times. Each step prints the call it makes and what came back.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keel_engine::{Batch, Db, ScanCursor, Ttl, TtlPolicy};
use keel_primitives::lock::{Fence, Lock};
use keel_primitives::ratelimit::{Quota, RateLimiter, Strategy};
use keel_primitives::{Backend, Embedded, Namespaced};

use super::commands::{SCAN_PAGE_KEYS, open_or_create, ttl_number};
use super::escape::escape_bytes;
use super::failure::{CmdResult, Failure};

/// The only prefix the tour writes under.
pub const DEMO_PREFIX: &str = "demo:";

/// Runs the tour on the store in `dir`, narrating to `out`.
pub fn run(dir: &Path, out: &mut dyn Write) -> CmdResult {
    let db = open_or_create(dir)?;
    writeln!(
        out,
        "keel demo: a tour of the embedded engine, on the store in {}",
        dir.display()
    )?;
    if let Some(r) = db.stats().recovery {
        writeln!(
            out,
            "open: recovery replayed {} WAL record(s) from {} segment(s) in {:.3} ms, \
             {} key(s) live",
            r.records,
            r.segments,
            r.duration.as_secs_f64() * 1000.0,
            r.keys
        )?;
    }
    let removed = reset(&db)?;
    writeln!(
        out,
        "reset: deleted {removed} key(s) under {DEMO_PREFIX} left by an earlier run"
    )?;

    // Plain values with a TTL.
    db.set("demo:greeting", "hello", Some(Duration::from_secs(60)))?;
    writeln!(out, "set demo:greeting = \"hello\" with TTL 60s -> OK")?;
    writeln!(
        out,
        "get demo:greeting -> {}",
        show(db.get("demo:greeting"))
    )?;
    if let Some((value, ttl)) = db.get_with_ttl("demo:greeting") {
        let ttl = ttl.map_or("no expiry".to_owned(), |t| {
            format!("{} ms left", t.as_millis())
        });
        writeln!(
            out,
            "get_with_ttl demo:greeting -> {}, {ttl}",
            show(Some(value))
        )?;
    }

    // A lock-like key: first writer wins, then compare-and-swap hands it over.
    let first = db.set_nx("demo:lock", "worker-a", Some(Duration::from_secs(30)))?;
    writeln!(
        out,
        "set_nx demo:lock = \"worker-a\" -> {}",
        verdict(first, "set", "refused")
    )?;
    let second = db.set_nx("demo:lock", "worker-b", Some(Duration::from_secs(30)))?;
    writeln!(
        out,
        "set_nx demo:lock = \"worker-b\" -> {} (worker-a holds it)",
        verdict(second, "set", "refused")
    )?;
    let swapped = db.compare_and_swap(
        "demo:lock",
        Some(b"worker-a".as_slice()),
        "worker-b",
        TtlPolicy::Keep,
    )?;
    writeln!(
        out,
        "compare_and_swap demo:lock \"worker-a\" -> \"worker-b\" -> {}",
        verdict(swapped, "swapped", "refused")
    )?;
    let stale = db.compare_and_swap(
        "demo:lock",
        Some(b"worker-a".as_slice()),
        "worker-c",
        TtlPolicy::Keep,
    )?;
    writeln!(
        out,
        "compare_and_swap demo:lock \"worker-a\" -> \"worker-c\" -> {} \
         (stale: it holds \"worker-b\")",
        verdict(stale, "swapped", "refused")
    )?;
    let released = db.compare_and_delete("demo:lock", "worker-b")?;
    writeln!(
        out,
        "compare_and_delete demo:lock if \"worker-b\" -> {}",
        verdict(released, "deleted", "refused")
    )?;

    // Counters: the TTL is stamped when incr creates the key, and never changed afterwards.
    let one = db.incr("demo:visits", 1, Some(Duration::from_secs(3600)))?;
    writeln!(out, "incr demo:visits by 1 (TTL 1h on create) -> {one}")?;
    let more = db.incr("demo:visits", 41, Some(Duration::from_secs(5)))?;
    writeln!(
        out,
        "incr demo:visits by 41 (TTL 5s on create, ignored) -> {more}, ttl {} ms",
        ttl_number(db.ttl("demo:visits"))
    )?;

    // Changing and removing a TTL.
    let expired = db.expire("demo:greeting", Duration::from_secs(5))?;
    writeln!(
        out,
        "expire demo:greeting 5s -> {}, ttl {} ms",
        u8::from(expired),
        ttl_number(db.ttl("demo:greeting"))
    )?;
    let persisted = db.persist("demo:greeting")?;
    writeln!(
        out,
        "persist demo:greeting -> {}, ttl {} (no expiry); ttl of a missing key is {}",
        u8::from(persisted),
        ttl_number(db.ttl("demo:greeting")),
        ttl_number(Ttl::Missing)
    )?;

    // An atomic batch, then a prefix scan that sees all of it.
    let mut batch = Batch::new();
    batch
        .set("demo:user:1", "ada", None)
        .set("demo:user:2", "grace", None)
        .set("demo:user:3", "edsger", Some(Duration::from_secs(600)))
        .delete("demo:visits");
    db.write_batch(&batch)?;
    writeln!(
        out,
        "write_batch: 3 sets under demo:user: and delete demo:visits, \
         all or nothing (one WAL record)"
    )?;
    let users = db.scan("demo:user:", None, SCAN_PAGE_KEYS, true);
    let listed: Vec<String> = users
        .entries
        .iter()
        .map(|e| format!("{}={}", escape_bytes(&e.key), show(e.value.clone())))
        .collect();
    writeln!(out, "scan demo:user: -> {}", listed.join(", "))?;

    // Errors are typed, and an input error leaves the store unchanged.
    match db.incr("demo:greeting", 1, None) {
        Ok(n) => {
            return Err(Failure::Error(format!(
                "incr on a text value unexpectedly succeeded with {n}"
            )));
        }
        Err(e) => writeln!(out, "incr demo:greeting -> error: {e}")?,
    }
    writeln!(
        out,
        "get demo:greeting -> {} (unchanged)",
        show(db.get("demo:greeting"))
    )?;

    primitives(&db, out)?;

    let stats = db.stats();
    writeln!(
        out,
        "stats: {} key(s), {} memory bytes, WAL {} bytes in {} segment(s), {} fsync(s) since open",
        stats.keys, stats.memory_bytes, stats.wal_bytes, stats.wal_segments, stats.wal_fsyncs
    )?;
    db.close()?;
    writeln!(
        out,
        "done: `keel --db {} scan {DEMO_PREFIX}` lists what the tour left; run it again any time",
        dir.display()
    )?;
    Ok(())
}

/// The service primitives on the same store, through the `Backend` contract: a lock with
/// fencing tokens and a GCRA rate limiter. Everything lives under [`DEMO_PREFIX`].
fn primitives(db: &Db, out: &mut dyn Write) -> CmdResult {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::Error(format!("cannot start an async runtime: {e}")))?;
    runtime.block_on(async {
        let backend: Arc<dyn Backend> = Arc::new(Namespaced::new(
            Arc::new(Embedded::new(db.clone())),
            DEMO_PREFIX,
        ));
        let failed = |what: &str, e: &dyn std::fmt::Display| Failure::Error(format!("{what}: {e}"));

        let lock = Lock::new(Arc::clone(&backend));
        let ttl = Duration::from_secs(30);
        let first = lock
            .try_acquire("report", ttl)
            .await
            .map_err(|e| failed("lock", &e))?
            .ok_or_else(|| Failure::Error("the demo lock was unexpectedly held".into()))?;
        writeln!(
            out,
            "lock report (30s) -> held, fencing token {}",
            first.fencing_token()
        )?;
        let second = lock
            .try_acquire("report", ttl)
            .await
            .map_err(|e| failed("lock", &e))?;
        writeln!(
            out,
            "lock report again -> {}",
            verdict(second.is_some(), "held (wrong!)", "refused: already held")
        )?;
        let old_token = first.fencing_token();
        let released = first.release().await.map_err(|e| failed("release", &e))?;
        writeln!(
            out,
            "release -> {}",
            verdict(released, "released", "not ours any more")
        )?;
        let next = lock
            .try_acquire("report", ttl)
            .await
            .map_err(|e| failed("lock", &e))?
            .ok_or_else(|| Failure::Error("the demo lock was not free after release".into()))?;
        writeln!(
            out,
            "lock report -> held, fencing token {} (strictly larger)",
            next.fencing_token()
        )?;
        let fence = Fence::new(Arc::clone(&backend));
        let now = fence
            .check_and_record("ledger", next.fencing_token())
            .await
            .map_err(|e| failed("fence", &e))?;
        let stale = fence
            .check_and_record("ledger", old_token)
            .await
            .map_err(|e| failed("fence", &e))?;
        writeln!(
            out,
            "fence ledger: token {} -> {}, stale token {old_token} -> {}",
            next.fencing_token(),
            verdict(now.is_accepted(), "accepted", "rejected"),
            verdict(stale.is_accepted(), "accepted (wrong!)", "rejected")
        )?;
        next.release().await.map_err(|e| failed("release", &e))?;

        let limiter = RateLimiter::new(
            Arc::clone(&backend),
            "api",
            Strategy::Gcra,
            Quota::per_second(5),
        )
        .map_err(|e| failed("rate limiter", &e))?;
        let mut verdicts = Vec::new();
        let mut retry = None;
        for _ in 0..7 {
            let d = limiter
                .check("user:1", 1)
                .await
                .map_err(|e| failed("rate limit", &e))?;
            verdicts.push(if d.allowed { "allow" } else { "deny" });
            retry = retry.or(d.retry_after);
        }
        writeln!(
            out,
            "rate limit user:1 (GCRA, 5/s), 7 requests -> {}; retry after {} ms",
            verdicts.join(" "),
            retry.map_or(0, |r| r.as_millis())
        )?;
        Ok(())
    })
}

/// Deletes every key under [`DEMO_PREFIX`]; returns how many there were.
fn reset(db: &Db) -> Result<usize, Failure> {
    let mut cursor: Option<ScanCursor> = None;
    let mut removed = 0;
    loop {
        let page = db.scan(DEMO_PREFIX, cursor.as_ref(), SCAN_PAGE_KEYS, false);
        let mut batch = Batch::new();
        for entry in &page.entries {
            // Fencing counters survive the reset: a token is never handed out twice, not even
            // across runs of the tour.
            if !is_fencing_state(&entry.key) {
                batch.delete(entry.key.as_slice());
            }
        }
        removed += batch.len();
        db.write_batch(&batch)?;
        match page.next {
            Some(next) => cursor = Some(next),
            None => return Ok(removed),
        }
    }
}

/// True for the lock's fencing counter and the fence's highest-token record.
fn is_fencing_state(key: &[u8]) -> bool {
    let rest = &key[DEMO_PREFIX.len().min(key.len())..];
    rest.starts_with(b"lock-stripe:")
        || rest.starts_with(b"lock-fence:")
        || rest.starts_with(b"fence:")
}

/// A value for the narration: quoted text, or escaped bytes, or `(missing)`.
fn show(value: Option<Vec<u8>>) -> String {
    match value {
        Some(v) => format!("\"{}\"", escape_bytes(&v)),
        None => "(missing)".to_owned(),
    }
}

/// `if_yes` or `if_no`, for narrating a boolean outcome.
fn verdict(yes: bool, if_yes: &'static str, if_no: &'static str) -> &'static str {
    if yes { if_yes } else { if_no }
}
