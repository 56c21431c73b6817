//! `keel migrate SRC DST`: a thin wrapper around [`keel::migrate`]. It opens both ends (a
//! directory, `keel://DIR` or any `keel::connect` URL), draws a progress bar on standard error
//! (only when it is a terminal), prints a summary line, and with `--verify` compares the two
//! ends afterwards and lists the differences (exit 1 if there are any).

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keel::Embedded;
use keel::migrate::{self, Merge, MigrateOptions, MigrateReport, VerifyOptions};

use super::commands::{Create, Store, Target, runtime};
use super::escape::escape_bytes;
use super::failure::{CmdResult, Failure};

/// What `keel migrate` was asked to do.
#[derive(Debug)]
pub struct Request {
    /// The source URL or directory.
    pub source: String,
    /// The destination URL or directory.
    pub destination: String,
    /// Only keys starting with this.
    pub prefix: Vec<u8>,
    /// The conflict rule.
    pub merge: Merge,
    /// Count, write nothing.
    pub dry_run: bool,
    /// Compare both ends afterwards.
    pub verify: bool,
    /// Keys per batch.
    pub batch_keys: usize,
    /// How far apart two expiry deadlines may be for `--verify`.
    pub ttl_tolerance: Duration,
}

/// Runs `keel migrate`.
pub fn run(request: Request, out: &mut dyn Write) -> CmdResult {
    let runtime = runtime()?;
    let source_target = Target::from_url(&request.source);
    let destination_target = Target::from_url(&request.destination);
    if source_target == destination_target {
        return Err(Failure::Error(format!(
            "the source and the destination are the same store ({})",
            source_target.describe()
        )));
    }
    let source = Store::open(&runtime, &source_target, Create::Never)?;
    let destination = match open_destination(&runtime, &destination_target, request.dry_run) {
        Ok(store) => store,
        Err(e) => {
            source.close(&runtime)?;
            return Err(e);
        }
    };
    let result = runtime.block_on(copy_and_verify(&request, &source, &destination, out));
    let closed_source = source.close(&runtime);
    let closed_destination = destination.close(&runtime);
    result?;
    closed_source?;
    closed_destination
}

/// Opens the destination. A dry run creates nothing, not even an empty store: a store
/// directory that does not exist yet stands for an empty store, and is counted against one.
fn open_destination(
    runtime: &tokio::runtime::Runtime,
    target: &Target,
    dry_run: bool,
) -> Result<Store, Failure> {
    match target {
        Target::Dir(dir) if dry_run && !dir.exists() => Ok(Store {
            backend: Arc::new(Embedded::memory()),
            db: None,
            label: dir.display().to_string(),
        }),
        _ if dry_run => Store::open(runtime, target, Create::Never),
        _ => Store::open(runtime, target, Create::IfMissing),
    }
}

async fn copy_and_verify(
    request: &Request,
    source: &Store,
    destination: &Store,
    out: &mut dyn Write,
) -> CmdResult {
    let options = MigrateOptions {
        prefix: request.prefix.clone(),
        merge: request.merge,
        dry_run: request.dry_run,
        batch_keys: request.batch_keys,
        stop_after_keys: None,
        source_label: source.label.clone(),
    };
    // indicatif draws nothing when standard error is not a terminal.
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} {pos} keys handled ({per_sec}), {msg} [{elapsed_precise}]",
    ) {
        bar.set_style(style);
    }
    let migrated = migrate::migrate(
        &*source.backend,
        &*destination.backend,
        &options,
        |report| {
            bar.set_position(report.copied + report.skipped + report.expired);
            bar.set_message(format!(
                "{} copied, {} skipped, {} expired",
                report.copied, report.skipped, report.expired
            ));
        },
    )
    .await;
    bar.finish_and_clear();
    let report = migrated.map_err(|e| Failure::Error(e.to_string()))?;
    writeln!(
        out,
        "{}",
        summary(&report, &source.label, &destination.label)
    )?;
    if !request.verify {
        return Ok(());
    }
    let options = VerifyOptions {
        prefix: request.prefix.clone(),
        ttl_tolerance: request.ttl_tolerance,
        batch_keys: request.batch_keys,
    };
    let verified = migrate::verify(&*source.backend, &*destination.backend, &options)
        .await
        .map_err(|e| Failure::Error(e.to_string()))?;
    writeln!(
        out,
        "verify: source {} key(s), destination {} key(s) under \"{}\", {} difference(s) \
         (expiry tolerance {} ms)",
        verified.source_keys,
        verified.destination_keys,
        escape_bytes(&request.prefix),
        verified.differences,
        request.ttl_tolerance.as_millis()
    )?;
    for difference in &verified.examples {
        writeln!(out, "  {difference}")?;
    }
    let unlisted = verified.differences - verified.examples.len() as u64;
    if unlisted > 0 {
        writeln!(out, "  ... and {unlisted} more")?;
    }
    if verified.is_clean() {
        Ok(())
    } else {
        Err(Failure::Negative(
            "verify: the destination differs from the source".to_owned(),
        ))
    }
}

/// The summary line: counts and rate.
fn summary(report: &MigrateReport, source: &str, destination: &str) -> String {
    let counts = format!(
        "{} key(s), skipped {} (kept the destination's), {} expired during the copy; \
         {:.3} s, {:.0} keys/s",
        report.copied,
        report.skipped,
        report.expired,
        report.elapsed.as_secs_f64(),
        report.keys_per_sec()
    );
    let resumed = if report.resumed {
        " (resumed an interrupted run)"
    } else {
        ""
    };
    if report.dry_run {
        format!(
            "dry run {source} -> {destination}{resumed}: would copy {counts}; nothing was written"
        )
    } else {
        format!("migrated {source} -> {destination}{resumed}: copied {counts}")
    }
}
