//! Printing results: one Markdown table per workload (so a run's output can be pasted into
//! BENCHMARKS.md as it is), rows grouped by the number of callers, each with its ratio to
//! keel's engine with `Durability::Immediate` at the same number of callers.

use std::time::Duration;

use super::measure::Measured;

/// The label of the reference row every ratio is taken against.
pub const REFERENCE: &str = "keel Immediate";

/// One row: a backend at a number of callers, measured or not.
#[derive(Debug, Clone)]
pub struct Row {
    /// Which backend, and how it was reached.
    pub backend: String,
    /// Concurrent callers (tasks or threads).
    pub callers: usize,
    /// The figures, or why there are none (unavailable backend, failed operation).
    pub result: Result<Measured, String>,
}

impl Row {
    /// A row that was measured (or failed).
    pub fn new(
        backend: impl Into<String>,
        callers: usize,
        result: Result<Measured, String>,
    ) -> Self {
        Row {
            backend: backend.into(),
            callers,
            result,
        }
    }
}

/// The rows of one workload.
#[derive(Debug, Default)]
pub struct Table {
    /// One line saying what was measured and how.
    pub title: String,
    /// The rows, in the order measured.
    pub rows: Vec<Row>,
}

impl Table {
    /// An empty table.
    pub fn new(title: impl Into<String>) -> Self {
        Table {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    /// The measurement of `backend` at `callers`, if it succeeded.
    pub fn get(&self, backend: &str, callers: usize) -> Option<&Measured> {
        self.rows
            .iter()
            .find(|r| r.backend == backend && r.callers == callers)
            .and_then(|r| r.result.as_ref().ok())
    }

    /// Prints the table, grouped by callers (ascending), in measuring order within a group.
    pub fn print(&self) {
        println!("\n### {}\n", self.title);
        println!("| backend | callers | ops/s | p50 | p99 | × keel Immediate | note |");
        println!("|---|--:|--:|--:|--:|--:|---|");
        let mut callers: Vec<usize> = self.rows.iter().map(|r| r.callers).collect();
        callers.sort_unstable();
        callers.dedup();
        for n in callers {
            let reference = self.get(REFERENCE, n).map(Measured::ops_per_sec);
            for row in self.rows.iter().filter(|r| r.callers == n) {
                match &row.result {
                    Ok(m) => {
                        let ratio = match reference {
                            Some(r) if r > 0.0 => format!("{:.2}", m.ops_per_sec() / r),
                            _ => "—".to_owned(),
                        };
                        println!(
                            "| {} | {} | {} | {} | {} | {} | {} |",
                            row.backend,
                            n,
                            thousands(m.ops_per_sec()),
                            latency(m.quantile_ns(0.50)),
                            latency(m.quantile_ns(0.99)),
                            ratio,
                            m.note
                        );
                    }
                    Err(why) => println!(
                        "| {} | {} | — | — | — | — | {} |",
                        row.backend,
                        n,
                        why.replace('|', "/").replace('\n', " ")
                    ),
                }
            }
        }
    }
}

/// `1234567.8` as `1,234,568`.
pub fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency with a unit that keeps three significant digits readable.
pub fn latency(ns: u64) -> String {
    match ns {
        0..1_000 => format!("{ns} ns"),
        1_000..1_000_000 => format!("{:.1} µs", ns as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.2} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// A duration in seconds with millisecond resolution.
pub fn secs(d: Duration) -> String {
    format!("{:.3} s", d.as_secs_f64())
}
