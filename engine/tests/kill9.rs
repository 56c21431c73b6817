//! Real-process crash test. The parent starts this same binary as a child that writes with
//! `Durability::Immediate` from several threads and prints every acknowledged write; the parent
//! `kill -9`s it at a random moment, reopens the store, and checks that every acknowledged
//! write is present, every batch is all-or-nothing, and the store opens cleanly. Iterations
//! accumulate in one directory, so later runs also recover earlier runs' logs.
//!
//! `KEEL_KILL9_ITERATIONS` sets the number of kills (default 50).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keel_engine::{Batch, Db, Durability, Options};

const WRITER_THREADS: usize = 4;

fn main() {
    if let Ok(dir) = std::env::var("KEEL_KILL9_CHILD_DIR") {
        let run: u64 = std::env::var("KEEL_KILL9_RUN").unwrap().parse().unwrap();
        child(&dir, run);
    }
    let iterations: u64 = std::env::var("KEEL_KILL9_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("kill9: {iterations} iterations, seed {seed}");
    let mut rng = seed;
    let dir = tempfile::tempdir().unwrap();
    let mut failed = 0;
    let mut total_acked = 0usize;
    for run in 0..iterations {
        // xorshift64: the kill moment, 2..=60 ms after the child's first acknowledgement.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(2 + rng % 59);
        match iteration(dir.path(), run, delay) {
            Ok(acked) => total_acked += acked,
            Err(why) => {
                failed += 1;
                eprintln!("kill9 run {run} (delay {delay:?}): {why}");
            }
        }
    }
    println!("kill9: {total_acked} acknowledged writes checked across {iterations} kills");
    println!("kill9: {} passed, {failed} failed", iterations - failed);
    std::process::exit(i32::from(failed > 0));
}

/// One kill: returns the number of acknowledged writes verified.
fn iteration(dir: &std::path::Path, run: u64, delay: Duration) -> Result<usize, String> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("KEEL_KILL9_CHILD_DIR", dir)
        .env("KEEL_KILL9_RUN", run.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stdout = child.stdout.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    let (first_tx, first_rx) = std::sync::mpsc::channel();
    let reader = {
        let lines = Arc::clone(&lines);
        std::thread::spawn(move || {
            let mut first = Some(first_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(tx) = first.take() {
                    let _ = tx.send(());
                }
                lines.lock().unwrap().push(line);
            }
        })
    };
    // Kill at a random moment once the child is writing (or if it never starts, after 10 s).
    let _ = first_rx.recv_timeout(Duration::from_secs(10));
    std::thread::sleep(delay);
    child.kill().map_err(|e| e.to_string())?; // SIGKILL
    child.wait().map_err(|e| e.to_string())?;
    reader.join().unwrap();
    let lines = lines.lock().unwrap().clone();
    if lines.is_empty() {
        return Err("the child acknowledged nothing before it was killed".into());
    }

    let opened = Instant::now();
    let db = Db::open(dir, Options::default()).map_err(|e| format!("reopen failed: {e}"))?;
    let reopen = opened.elapsed();
    let mut counters: HashMap<String, i64> = HashMap::new();
    for line in &lines {
        let parts: Vec<&str> = line.split(' ').collect();
        match parts.as_slice() {
            ["S", key, value] => {
                let got = db.get(key);
                if got.as_deref() != Some(value.as_bytes()) {
                    return Err(format!(
                        "acknowledged set {key}={value} lost (found {got:?})"
                    ));
                }
            }
            ["C", key, value] => {
                let v: i64 = value.parse().unwrap();
                let e = counters.entry((*key).to_owned()).or_insert(v);
                *e = (*e).max(v);
            }
            ["B", prefix] => {
                for i in 0..3 {
                    if db.get(format!("{prefix}-{i}")).as_deref() != Some(prefix.as_bytes()) {
                        return Err(format!("acknowledged batch {prefix} incomplete"));
                    }
                }
            }
            _ => {} // a line cut by the kill
        }
    }
    for (key, acked) in &counters {
        let stored: i64 = db
            .get(key)
            .and_then(|v| String::from_utf8(v).ok()?.parse().ok())
            .ok_or_else(|| format!("counter {key} missing"))?;
        if stored < *acked {
            return Err(format!(
                "counter {key} is {stored}, but {acked} was acknowledged"
            ));
        }
    }
    // Atomicity: any batch of this run that is visible at all is visible whole.
    let page = db.scan(format!("r{run}-b"), None, keel_engine::SCAN_LIMIT_MAX, true);
    let mut groups: HashMap<Vec<u8>, usize> = HashMap::new();
    for e in page.entries {
        *groups.entry(e.value.unwrap()).or_default() += 1;
    }
    if let Some((prefix, n)) = groups.iter().find(|(_, n)| **n != 3) {
        return Err(format!(
            "batch {} half-visible: {n} of 3 keys",
            String::from_utf8_lossy(prefix)
        ));
    }
    let recovery = db.stats().recovery.unwrap();
    db.close().map_err(|e| format!("close failed: {e}"))?;
    if run.is_multiple_of(10) {
        println!(
            "kill9 run {run}: {} lines, reopen {reopen:?}, replayed {} records, truncated {} bytes",
            lines.len(),
            recovery.records,
            recovery.bytes_truncated
        );
    }
    Ok(lines.len())
}

/// The child: writes forever from several threads, printing each acknowledged write.
fn child(dir: &str, run: u64) -> ! {
    let db = Db::open(dir, Options::default().durability(Durability::Immediate)).unwrap();
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let threads: Vec<_> = (0..WRITER_THREADS)
        .map(|t| {
            let (db, out) = (db.clone(), Arc::clone(&out));
            std::thread::spawn(move || {
                for i in 0u64.. {
                    let line = match i % 5 {
                        0 => {
                            let key = format!("r{run}-c{t}");
                            let n = db.incr(&key, 1, None).unwrap();
                            format!("C {key} {n}")
                        }
                        1 => {
                            let prefix = format!("r{run}-b{t}-{i}");
                            let mut batch = Batch::new();
                            for j in 0..3 {
                                batch.set(format!("{prefix}-{j}"), prefix.clone(), None);
                            }
                            db.write_batch(&batch).unwrap();
                            format!("B {prefix}")
                        }
                        _ => {
                            let (key, value) = (format!("r{run}-t{t}-{i}"), format!("v{i}"));
                            db.set(&key, &value, None).unwrap();
                            format!("S {key} {value}")
                        }
                    };
                    let mut out = out.lock().unwrap();
                    writeln!(out, "{line}").unwrap();
                    out.flush().unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    unreachable!("the child writes until it is killed")
}
