//! The `keel` command-line tool: inspect and change a keel store (on local disk, or on any
//! backend by URL), check its files, move its data in and out as JSON lines, migrate it
//! between backends (`keel migrate`), and run the demo web service (`keel demo`).
//!
//! This file owns the argument grammar (every command and option is documented here, which is
//! also what `keel help` prints) and the exit-code policy; the commands themselves live in
//! `src/cli`. Keys and values are taken from the command line as raw bytes (on Unix, exactly
//! the bytes of the argument), so non-UTF-8 keys can be used too.

mod cli;
#[cfg(feature = "demo")]
mod demo;

use std::ffi::OsString;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use cli::commands::{self, Target};
use cli::duration::parse_duration;
use cli::failure::{CmdResult, Failure};
use keel::migrate::Merge;

/// The store directory used when neither `--db` nor `KEEL_DB` is given.
const DB_DIR_DEFAULT: &str = "./keel-data";
/// The environment variable naming the store directory when `--db` is not given.
const DB_DIR_ENV: &str = "KEEL_DB";

const AFTER_HELP: &str = "\
Durations (--ttl, expire) are an integer and a unit: 500ms, 10s, 5m, 1h.

The data commands (get, set, del, incr, expire, persist, ttl, scan, dump, load, stats) take
--url URL to work on any backend: redis://, rediss://, redis+cluster://, valkey://,
postgres://, sled:PATH, redb:PATH, keel://DIR (the embedded engine, like --db DIR) or
memory://. A backend whose cargo feature was not compiled in is refused with the feature to
enable (build with --features full for all of them).

Exit codes: 0 success; 1 a negative outcome (get of a missing key, set --nx on an existing
key); 2 an error (bad arguments or input, a damaged or locked store, I/O). Errors are written
to standard error.";

/// keel: state for services, in an embedded TTL key-value store on local disk, or on Redis,
/// Valkey, Postgres, sled or redb by URL.
#[derive(Debug, Parser)]
#[command(name = "keel", version, after_help = AFTER_HELP)]
struct Cli {
    /// The store directory [default: $KEEL_DB, else ./keel-data]. `set`, `incr`, `load` and
    /// `demo` create it if needed; the other commands require it to exist.
    #[arg(long, global = true, value_name = "DIR")]
    db: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

/// The `--url` option of the data commands.
#[derive(Debug, Clone, clap::Args)]
struct UrlArg {
    /// Work on this backend instead of a store directory: redis://…, valkey://…,
    /// postgres://…, sled:PATH, redb:PATH, keel://DIR, memory://. Not together with --db.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
}

/// `--merge`: what happens to keys that exist on both sides.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MergeArg {
    /// Keep the destination's value and TTL.
    Skip,
    /// Replace it with the source's.
    Overwrite,
    /// Stop at the first key whose destination value differs (exit 2, naming it).
    Fail,
}

/// Every `keel` command.
#[derive(Debug, Subcommand)]
enum Command {
    /// Set KEY to VALUE and print OK.
    ///
    /// With --nx the key is set only if it does not exist: prints OK if it was set, otherwise
    /// prints `not set: key exists` to standard error and exits 1.
    Set {
        #[command(flatten)]
        url: UrlArg,
        /// The key.
        key: OsString,
        /// The value (a negative number such as -5 is accepted as is; put `--` before any
        /// other value starting with `-`).
        #[arg(allow_negative_numbers = true)]
        value: OsString,
        /// Expire the key after this long (e.g. 500ms, 10s, 5m, 1h).
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// Only set the key if it does not exist.
        #[arg(long)]
        nx: bool,
    },
    /// Print the value of KEY.
    ///
    /// The raw value bytes are written to standard output exactly, with no newline added.
    /// Exits 1 (with a message on standard error) if the key does not exist.
    Get {
        #[command(flatten)]
        url: UrlArg,
        /// The key.
        key: OsString,
    },
    /// Delete KEY; prints 1 if it existed, 0 if not (exit 0 either way).
    Del {
        #[command(flatten)]
        url: UrlArg,
        /// The key.
        key: OsString,
    },
    /// Add to the integer at KEY (a missing key counts as 0) and print the new value.
    ///
    /// A value that is not a decimal 64-bit integer, or a result that would overflow, is an
    /// error (exit 2) and leaves the value unchanged.
    Incr {
        #[command(flatten)]
        url: UrlArg,
        /// The key.
        key: OsString,
        /// The amount to add; may be negative.
        #[arg(long, default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
        /// Expire the key after this long, only if this call creates it.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        ttl: Option<Duration>,
    },
    /// Make KEY expire after DURATION; prints 1, or 0 if the key does not exist.
    Expire {
        #[command(flatten)]
        url: UrlArg,
        /// The key.
        key: OsString,
        /// The new time to live (e.g. 500ms, 10s, 5m, 1h).
        #[arg(value_parser = parse_duration)]
        duration: Duration,
    },
    /// Remove KEY's expiry; prints 1 if it had one, 0 if it had none or does not exist.
    Persist {
        #[command(flatten)]
        url: UrlArg,
        /// The key.
        key: OsString,
    },
    /// Print KEY's remaining time to live in milliseconds: -1 if it does not expire, -2 if it
    /// does not exist.
    Ttl {
        #[command(flatten)]
        url: UrlArg,
        /// The key.
        key: OsString,
    },
    /// List keys starting with PREFIX, one per line: in byte order on a store directory, in
    /// the backend's scan order on others (Redis and Valkey may list a key twice).
    ///
    /// Bytes that are not printable UTF-8 are escaped (`\xNN`, `\n`, `\\`), so every key takes
    /// exactly one line.
    Scan {
        #[command(flatten)]
        url: UrlArg,
        /// Only keys starting with this (default: all keys).
        prefix: Option<OsString>,
        /// Print at most this many keys.
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Print the store's counters: keys, memory, WAL size and fsyncs, snapshots, evictions,
    /// and what recovery did when this command opened it.
    ///
    /// On a backend other than a store directory (--url), prints what the contract can tell:
    /// the backend's name, its clock and the round trip to it. --prefix adds the number of
    /// live keys under a prefix, on any backend (a scan of that prefix).
    Stats {
        #[command(flatten)]
        url: UrlArg,
        /// Print one JSON object (for scripts) instead of one figure per line.
        #[arg(long)]
        json: bool,
        /// Also count the live keys starting with this (scans them).
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<OsString>,
    },
    /// Write a snapshot of every live key now and delete the WAL segments it covers (the
    /// store also does this by itself as the WAL grows). Embedded engine only.
    Compact {
        #[command(flatten)]
        url: UrlArg,
    },
    /// Check the checksum of every record in the store's files without opening, locking or
    /// modifying the store.
    ///
    /// A torn tail (writes a crash cut short, never made durable) is reported as a note and
    /// exits 0: the next open truncates it. Damage to records that were durable (a sealed
    /// segment, a record a later commit marker or the last clean close vouches for) exits 2
    /// and names the file and byte offset. A directory that does not exist or holds no store also exits 2. Embedded
    /// engine only.
    Verify {
        #[command(flatten)]
        url: UrlArg,
    },
    /// Write every live key as one JSON line to standard output.
    ///
    /// Format: {"key":"…","value":"…","expires_at_ms":1234}, with expires_at_ms (absolute Unix
    /// milliseconds) null for keys without expiry. A key or value that is not valid UTF-8 is
    /// written base64-encoded under key_b64 / value_b64 instead. On a network backend the
    /// expiry is computed from the server's clock and the remaining TTL.
    Dump {
        #[command(flatten)]
        url: UrlArg,
    },
    /// Load a file written by `keel dump` (`-` reads standard input).
    ///
    /// Validation happens before any write: every line is checked first (JSON syntax, fields,
    /// base64, size limits) and if any line is bad, up to 20 problems are listed with their
    /// line numbers and nothing is written. Then the entries are written in batches of up to
    /// 1000 concurrent writes, each with the time left until its expiry on the backend's
    /// clock; entries whose expiry has already passed are skipped. A crash or I/O error during
    /// the write phase may leave some entries written; loading the same file again completes
    /// it. Prints how many keys were loaded and skipped.
    Load {
        #[command(flatten)]
        url: UrlArg,
        /// The dump file, or `-` for standard input.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Copy every live key (value and remaining TTL) from SOURCE to DESTINATION.
    ///
    /// SOURCE and DESTINATION are store directories or URLs (as --url takes). Expiry is kept
    /// as an absolute time: a key's deadline is taken when it is read, and the destination
    /// gets the time left at the moment of the write, so a slow copy does not extend TTLs and
    /// a key that expires during the copy is not written. Keys are copied in batches of
    /// concurrent writes, with a progress bar on standard error when it is a terminal and a
    /// summary line at the end.
    ///
    /// A destination that holds keys under the prefix is refused (exit 2, nothing written)
    /// unless --merge says what to do with keys on both sides. An interrupted run leaves a
    /// resume marker in the destination (the reserved key \xffkeel-migrate:<digest of the
    /// prefix>); running the same command again resumes it, rewriting the keys already copied
    /// with the source's current values. A completed run removes the marker.
    ///
    /// --verify then compares both ends: key counts, each key's value (BLAKE3 digest) and
    /// expiry (within --ttl-tolerance), listing the differences; exit 1 if there are any.
    Migrate {
        /// Where the keys come from.
        #[arg(value_name = "SOURCE")]
        source: String,
        /// Where they go.
        #[arg(value_name = "DESTINATION")]
        destination: String,
        /// Only keys starting with this.
        #[arg(long, value_name = "PREFIX")]
        prefix: Option<OsString>,
        /// What to do with keys that already exist in the destination.
        #[arg(long, value_enum, value_name = "RULE")]
        merge: Option<MergeArg>,
        /// Read and count what would be copied, skipped or expired; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Afterwards, compare source and destination key by key.
        #[arg(long)]
        verify: bool,
        /// Keys per batch (scan page and writes in flight), 1 to 10000.
        #[arg(long, value_name = "N", default_value_t = keel::migrate::BATCH_KEYS_DEFAULT)]
        batch: usize,
        /// How far apart the two sides' expiry may be for --verify.
        #[arg(long, value_name = "DURATION", value_parser = parse_duration, default_value = "1s")]
        ttl_tolerance: Duration,
    },
    /// Manage feature flags in the store (validated JSON documents, as a service's FlagStore
    /// writes them).
    #[command(subcommand)]
    Flags(FlagsCommand),
    /// Serve the demo web app: passwordless sign-in, devices, orders, a cached catalog,
    /// webhooks, a feature flag, a circuit breaker, a job lock and metrics, all kept in one
    /// keel store (the --db directory unless --url names another backend).
    ///
    /// Serves on 127.0.0.1 until Ctrl-C (or SIGTERM): requests in flight finish, then the store
    /// is closed; a second Ctrl-C exits at once. Sign-in codes are printed instead of mailed.
    /// With --tour it serves on a free port instead, drives every feature with an HTTP client,
    /// checks each answer and exits (0 if every check passed).
    Demo(DemoArgs),
}

/// `keel demo` options.
#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// The port to serve on, on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 3000)]
    port: u16,
    /// Keep the state in this backend instead of the --db directory (a path, memory://, or a
    /// network URL if keel was built with its feature: redis://, valkey://, postgres://).
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Start on a free port, walk through every feature with an HTTP client, print each
    /// request and answer, check them, and exit. Uses a fresh temporary store unless --url
    /// names one.
    #[arg(long)]
    tour: bool,
}

/// `keel flags` subcommands.
#[derive(Debug, Subcommand)]
enum FlagsCommand {
    /// One line per flag: key, on/off, version, default variant.
    List,
    /// Print flag NAME's JSON document; exits 1 if there is none.
    Get {
        /// The flag key.
        name: String,
    },
    /// Validate the JSON document in FILE (`-` for standard input) and write it; prints the
    /// key and the version written. An invalid document is refused (exit 2) with the reason,
    /// and nothing is written.
    Set {
        /// The flag document.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Turn flag NAME on (its rules apply again); prints the new version.
    Enable {
        /// The flag key.
        name: String,
    },
    /// Turn flag NAME off (the kill switch: everyone gets its default variant).
    Disable {
        /// The flag key.
        name: String,
    },
    /// Delete flag NAME; prints 1 if it existed, 0 if not.
    Delete {
        /// The flag key.
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Prints help or the usage error; exits 0 for help/version and 2 for errors.
        Err(e) => e.exit(),
    };
    let db_flag = cli.db.is_some();
    let dir = cli
        .db
        .or_else(|| std::env::var_os(DB_DIR_ENV).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DB_DIR_DEFAULT));
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let result = run(cli.command, &dir, db_flag, &mut out);
    // Flush what was printed even when the command failed part-way.
    let flushed = out.flush().map_err(Failure::from);
    match result.and(flushed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            match &failure {
                Failure::Negative(message) => report(message),
                Failure::Error(message) => report(&format!("error: {message}")),
                Failure::BrokenPipe => {}
            }
            failure.exit_code()
        }
    }
}

/// Writes `message` to standard error; if even that fails there is nobody left to tell.
fn report(message: &str) {
    let _ = writeln!(io::stderr(), "{message}");
}

/// The store a data command works on: `--url` if given, else the directory (`--db`,
/// `KEEL_DB` or the default). `--url` with `--db` is a usage error (exit 2).
fn target(url: UrlArg, dir: &Path, db_flag: bool) -> Result<Target, Failure> {
    match url.url {
        Some(_) if db_flag => Err(Failure::Error(
            "--url and --db both name the store; give only one".to_owned(),
        )),
        Some(url) => Ok(Target::from_url(&url)),
        None => Ok(Target::Dir(dir.to_owned())),
    }
}

/// Runs one command against the store in `dir` (or the one its `--url` names).
fn run(command: Command, dir: &Path, db_flag: bool, out: &mut dyn Write) -> CmdResult {
    let at = |url: UrlArg| target(url, dir, db_flag);
    match command {
        Command::Set {
            url,
            key,
            value,
            ttl,
            nx,
        } => commands::set(&at(url)?, &bytes(key), &bytes(value), ttl, nx, out),
        Command::Get { url, key } => commands::get(&at(url)?, &bytes(key), out),
        Command::Del { url, key } => commands::del(&at(url)?, &bytes(key), out),
        Command::Incr { url, key, by, ttl } => commands::incr(&at(url)?, &bytes(key), by, ttl, out),
        Command::Expire { url, key, duration } => {
            commands::expire(&at(url)?, &bytes(key), duration, out)
        }
        Command::Persist { url, key } => commands::persist(&at(url)?, &bytes(key), out),
        Command::Ttl { url, key } => commands::ttl(&at(url)?, &bytes(key), out),
        Command::Scan { url, prefix, limit } => commands::scan(
            &at(url)?,
            &prefix.map(bytes).unwrap_or_default(),
            limit,
            out,
        ),
        Command::Stats { url, json, prefix } => {
            let format = if json {
                commands::StatsFormat::Json
            } else {
                commands::StatsFormat::Text
            };
            let prefix = prefix.map(bytes);
            commands::stats(&at(url)?, prefix.as_deref(), format, out)
        }
        Command::Verify { url } => commands::verify(&at(url)?, out),
        Command::Compact { url } => commands::compact(&at(url)?, out),
        Command::Dump { url } => commands::dump(&at(url)?, out),
        Command::Load { url, file } => commands::load(&at(url)?, &file, out),
        Command::Migrate {
            source,
            destination,
            prefix,
            merge,
            dry_run,
            verify,
            batch,
            ttl_tolerance,
        } => {
            if db_flag {
                return Err(Failure::Error(
                    "migrate takes its source and destination as arguments; --db does not \
                     apply"
                        .to_owned(),
                ));
            }
            let merge = match merge {
                None => Merge::Refuse,
                Some(MergeArg::Skip) => Merge::Skip,
                Some(MergeArg::Overwrite) => Merge::Overwrite,
                Some(MergeArg::Fail) => Merge::Fail,
            };
            cli::migrate::run(
                cli::migrate::Request {
                    source,
                    destination,
                    prefix: prefix.map(bytes).unwrap_or_default(),
                    merge,
                    dry_run,
                    verify,
                    batch_keys: batch,
                    ttl_tolerance,
                },
                out,
            )
        }
        Command::Demo(args) => cli::demo::run(
            cli::demo::DemoOptions {
                port: args.port,
                url: args.url,
                tour: args.tour,
            },
            dir,
            out,
        ),
        Command::Flags(flags) => match flags {
            FlagsCommand::List => cli::flags::list(dir, out),
            FlagsCommand::Get { name } => cli::flags::get(dir, &name, out),
            FlagsCommand::Set { file } => cli::flags::set(dir, &file, out),
            FlagsCommand::Enable { name } => cli::flags::set_enabled(dir, &name, true, out),
            FlagsCommand::Disable { name } => cli::flags::set_enabled(dir, &name, false, out),
            FlagsCommand::Delete { name } => cli::flags::delete(dir, &name, out),
        },
    }
}

/// The bytes of a command-line argument: on Unix exactly the bytes the shell passed.
fn bytes(arg: OsString) -> Vec<u8> {
    arg.into_encoded_bytes()
}
