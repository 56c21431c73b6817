//! End-to-end tests of the `keel` binary: each test runs the real executable on a temporary
//! store directory and checks its standard output, standard error and exit code. Where a test
//! needs data the CLI cannot write (binary keys, many keys, a held lock) it uses
//! `keel_engine::Db` directly and closes it before running the binary.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use keel_engine::{Batch, Db, Options, ScanEntry};

/// How far a key's absolute expiry may move in a dump and load through the contract: the time
/// the two commands take between reading the clock and writing, with room for a loaded machine.
const EXPIRY_SLACK_MS: u64 = 2_000;

/// What one run of the binary produced.
struct Run {
    code: i32,
    stdout: Vec<u8>,
    stderr: String,
}

impl Run {
    /// Standard output as text (lossy: for assertions on text output only).
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Run {
            // A run killed by a signal has no code; -1 fails every assertion on codes.
            code: output.status.code().unwrap_or(-1),
            stdout: output.stdout,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

/// `keel --db DIR` with `KEEL_DB` cleared, so the developer's environment cannot leak in.
fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel"));
    cmd.arg("--db").arg(dir).env_remove("KEEL_DB");
    cmd
}

/// Runs `keel --db DIR ARGS...`.
fn keel<I, S>(dir: &Path, args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    command(dir)
        .args(args)
        .output()
        .expect("running keel")
        .into()
}

/// Runs `keel --db DIR ARGS...` with `input` on standard input.
fn keel_with_stdin(dir: &Path, args: &[&str], input: &[u8]) -> Run {
    let mut child = command(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning keel");
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(input)
        .expect("writing keel's stdin");
    child.wait_with_output().expect("waiting for keel").into()
}

/// Asserts the exit code, showing both streams when it is wrong.
#[track_caller]
fn assert_code(run: &Run, code: i32) {
    assert_eq!(
        run.code,
        code,
        "stdout: {}\nstderr: {}",
        run.stdout(),
        run.stderr
    );
}

/// A temporary directory and a store path inside it that does not exist yet.
fn store() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("store");
    (tmp, dir)
}

/// Opens the store in-process, as another user of the same directory would.
fn open(dir: &Path) -> Db {
    Db::open(dir, Options::default()).expect("opening the store in the test")
}

/// Every live entry with its value and expiry, in key order.
fn all_entries(db: &Db) -> Vec<ScanEntry> {
    let page = db.scan(b"", None, keel_engine::SCAN_LIMIT_MAX, true);
    assert!(page.next.is_none(), "test stores fit one page");
    page.entries
}

/// The only WAL segment in `dir`.
fn wal_segment(dir: &Path) -> PathBuf {
    let mut segments: Vec<PathBuf> = fs::read_dir(dir)
        .expect("listing the store")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| n.starts_with("wal-") && n.ends_with(".log"))
        })
        .collect();
    assert_eq!(segments.len(), 1, "expected one WAL segment: {segments:?}");
    segments.remove(0)
}

/// Writes `count` keys, one WAL record each, and closes the store.
fn write_keys(dir: &Path, count: usize) {
    let db = open(dir);
    for i in 0..count {
        db.set(format!("key:{i:04}"), format!("value {i}"), None)
            .expect("set");
    }
    db.close().expect("close");
}

#[test]
fn set_then_get_round_trips_the_exact_bytes() {
    let (_tmp, dir) = store();
    let set = keel(&dir, ["set", "greeting", "hello world\n"]);
    assert_code(&set, 0);
    assert_eq!(set.stdout(), "OK\n");
    let get = keel(&dir, ["get", "greeting"]);
    assert_code(&get, 0);
    assert_eq!(
        get.stdout, b"hello world\n",
        "get adds nothing to the value"
    );
    assert!(get.stderr.is_empty());
}

#[test]
fn set_accepts_a_negative_number_as_value() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "n", "-5"]), 0);
    assert_eq!(keel(&dir, ["get", "n"]).stdout, b"-5");
}

#[test]
fn get_of_a_missing_key_exits_1_with_a_message() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "other", "x"]), 0);
    let get = keel(&dir, ["get", "absent"]);
    assert_code(&get, 1);
    assert!(get.stdout.is_empty());
    assert!(get.stderr.contains("not found: absent"), "{}", get.stderr);
}

#[test]
fn set_nx_sets_once_then_refuses_with_exit_1() {
    let (_tmp, dir) = store();
    let first = keel(&dir, ["set", "lock", "a", "--nx"]);
    assert_code(&first, 0);
    assert_eq!(first.stdout(), "OK\n");
    let second = keel(&dir, ["set", "lock", "b", "--nx"]);
    assert_code(&second, 1);
    assert!(second.stdout.is_empty());
    assert_eq!(second.stderr.trim(), "not set: key exists");
    assert_eq!(keel(&dir, ["get", "lock"]).stdout, b"a");
}

#[test]
fn del_prints_1_then_0_and_exits_0_both_times() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "k", "v"]), 0);
    let first = keel(&dir, ["del", "k"]);
    assert_code(&first, 0);
    assert_eq!(first.stdout(), "1\n");
    let second = keel(&dir, ["del", "k"]);
    assert_code(&second, 0);
    assert_eq!(second.stdout(), "0\n");
    assert_code(&keel(&dir, ["get", "k"]), 1);
}

#[test]
fn incr_counts_and_accepts_a_negative_by() {
    let (_tmp, dir) = store();
    assert_eq!(keel(&dir, ["incr", "hits"]).stdout(), "1\n");
    assert_eq!(keel(&dir, ["incr", "hits", "--by", "10"]).stdout(), "11\n");
    let down = keel(&dir, ["incr", "hits", "--by", "-20"]);
    assert_code(&down, 0);
    assert_eq!(down.stdout(), "-9\n");
    assert_eq!(keel(&dir, ["ttl", "hits"]).stdout(), "-1\n");
}

#[test]
fn incr_ttl_is_stamped_only_on_create() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["incr", "c", "--ttl", "1h"]), 0);
    let ttl: i64 = keel(&dir, ["ttl", "c"])
        .stdout()
        .trim()
        .parse()
        .expect("a number");
    assert!(ttl > 3_500_000 && ttl <= 3_600_000, "{ttl}");
    assert_code(&keel(&dir, ["persist", "c"]), 0);
    assert_code(&keel(&dir, ["incr", "c", "--ttl", "1h"]), 0);
    assert_eq!(keel(&dir, ["ttl", "c"]).stdout(), "-1\n");
}

#[test]
fn incr_on_a_non_integer_exits_2_and_leaves_the_value_unchanged() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "name", "ada"]), 0);
    let incr = keel(&dir, ["incr", "name"]);
    assert_code(&incr, 2);
    assert!(incr.stdout.is_empty());
    assert!(incr.stderr.contains("not an integer"), "{}", incr.stderr);
    assert_eq!(keel(&dir, ["get", "name"]).stdout, b"ada");
}

#[test]
fn incr_overflow_exits_2_and_leaves_the_value_unchanged() {
    let (_tmp, dir) = store();
    let max = i64::MAX.to_string();
    assert_code(&keel(&dir, ["set", "big", max.as_str()]), 0);
    let incr = keel(&dir, ["incr", "big"]);
    assert_code(&incr, 2);
    assert!(incr.stderr.contains("overflow"), "{}", incr.stderr);
    assert_eq!(keel(&dir, ["get", "big"]).stdout, max.as_bytes());
}

#[test]
fn ttl_reports_minus_2_minus_1_and_remaining_milliseconds() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "forever", "v"]), 0);
    assert_code(&keel(&dir, ["set", "soon", "v", "--ttl", "10s"]), 0);
    let missing = keel(&dir, ["ttl", "absent"]);
    assert_code(&missing, 0);
    assert_eq!(missing.stdout(), "-2\n");
    assert_eq!(keel(&dir, ["ttl", "forever"]).stdout(), "-1\n");
    let left: i64 = keel(&dir, ["ttl", "soon"])
        .stdout()
        .trim()
        .parse()
        .expect("a number");
    assert!(left > 0 && left <= 10_000, "{left}");
}

#[test]
fn expire_and_persist_print_1_or_0() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "k", "v"]), 0);
    assert_eq!(keel(&dir, ["expire", "absent", "5s"]).stdout(), "0\n");
    assert_eq!(
        keel(&dir, ["persist", "k"]).stdout(),
        "0\n",
        "no TTL to remove"
    );
    let expire = keel(&dir, ["expire", "k", "5m"]);
    assert_code(&expire, 0);
    assert_eq!(expire.stdout(), "1\n");
    let left: i64 = keel(&dir, ["ttl", "k"])
        .stdout()
        .trim()
        .parse()
        .expect("a number");
    assert!(left > 290_000 && left <= 300_000, "{left}");
    assert_eq!(keel(&dir, ["persist", "k"]).stdout(), "1\n");
    assert_eq!(keel(&dir, ["ttl", "k"]).stdout(), "-1\n");
    assert_eq!(keel(&dir, ["persist", "absent"]).stdout(), "0\n");
}

#[test]
fn scan_filters_by_prefix_and_honours_limit() {
    let (_tmp, dir) = store();
    for key in ["user:3", "user:1", "user:2", "order:1", "users"] {
        assert_code(&keel(&dir, ["set", key, "v"]), 0);
    }
    let users = keel(&dir, ["scan", "user:"]);
    assert_code(&users, 0);
    assert_eq!(users.stdout(), "user:1\nuser:2\nuser:3\n");
    assert_eq!(
        keel(&dir, ["scan", "user:", "--limit", "2"]).stdout(),
        "user:1\nuser:2\n"
    );
    assert_eq!(
        keel(&dir, ["scan"]).stdout(),
        "order:1\nuser:1\nuser:2\nuser:3\nusers\n"
    );
    assert_eq!(keel(&dir, ["scan", "--limit", "0"]).stdout(), "");
    assert_eq!(keel(&dir, ["scan", "nothing:"]).stdout(), "");
}

#[test]
fn scan_pages_through_more_than_one_engine_page() {
    let (_tmp, dir) = store();
    let db = open(&dir);
    let mut batch = Batch::new();
    for i in 0..2500 {
        batch.set(format!("k:{i:05}"), "v", None);
    }
    db.write_batch(&batch).expect("batch");
    db.close().expect("close");

    let all = keel(&dir, ["scan", "k:"]);
    assert_code(&all, 0);
    let keys: Vec<String> = all.stdout().lines().map(str::to_owned).collect();
    let expected: Vec<String> = (0..2500).map(|i| format!("k:{i:05}")).collect();
    assert_eq!(keys, expected);
    let limited = keel(&dir, ["scan", "k:", "--limit", "1500"]);
    assert_eq!(limited.stdout().lines().count(), 1500);
    assert_eq!(limited.stdout().lines().last(), Some("k:01499"));
}

#[test]
fn scan_escapes_keys_that_are_not_printable_utf8() {
    let (_tmp, dir) = store();
    let db = open(&dir);
    db.set(b"bin\xff\nkey\\", "v", None).expect("set");
    db.close().expect("close");
    let scan = keel(&dir, ["scan"]);
    assert_code(&scan, 0);
    assert_eq!(scan.stdout(), "bin\\xff\\nkey\\\\\n");
}

#[test]
fn stats_mentions_keys_wal_and_recovery() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "a", "1"]), 0);
    assert_code(&keel(&dir, ["set", "b", "2"]), 0);
    let stats = keel(&dir, ["stats"]);
    assert_code(&stats, 0);
    let text = stats.stdout();
    assert!(text.contains("keys: 2"), "{text}");
    assert!(text.contains("wal bytes:"), "{text}");
    assert!(text.contains("wal segments: 1"), "{text}");
    assert!(text.contains("fsyncs"), "{text}");
    assert!(text.contains("2 records replayed"), "{text}");
}

#[test]
fn read_only_commands_refuse_a_missing_directory_and_create_nothing() {
    let (_tmp, dir) = store();
    for args in [
        &["get", "k"][..],
        &["ttl", "k"],
        &["del", "k"],
        &["scan"],
        &["stats"],
        &["dump"],
        &["verify"],
        &["compact"],
    ] {
        let run = keel(&dir, args);
        assert_code(&run, 2);
        assert!(
            run.stderr.contains("does not exist") || run.stderr.contains("not a keel store"),
            "{args:?}: {}",
            run.stderr
        );
    }
    assert!(!dir.exists());
}

#[test]
fn the_store_directory_can_come_from_the_environment() {
    let (_tmp, dir) = store();
    let set = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["set", "k", "from-env"])
        .env("KEEL_DB", &dir)
        .output()
        .expect("running keel");
    assert_eq!(set.status.code(), Some(0));
    assert_eq!(keel(&dir, ["get", "k"]).stdout, b"from-env");
}

#[test]
fn dump_then_load_round_trips_binary_keys_and_values() {
    let (tmp, source) = store();
    let pairs: [(&[u8], &[u8]); 5] = [
        (b"plain", b"text value"),
        (b"\xff\xfe binary key", b"\x00\x01\x80\xff"),
        (b"text key", b"\xc3\x28 invalid utf8"),
        ("caf\u{e9}".as_bytes(), b"line\nbreak \"quoted\" \\"),
        (b"", b"empty key"),
    ];
    let db = open(&source);
    for (key, value) in pairs {
        db.set(key, value, None).expect("set");
    }
    db.set("expiring", "soon", Some(Duration::from_secs(3600)))
        .expect("set with TTL");
    let expected = all_entries(&db);
    db.close().expect("close");
    assert_eq!(expected.len(), 6);

    let dump = keel(&source, ["dump"]);
    assert_code(&dump, 0);
    let text = dump.stdout();
    assert_eq!(text.lines().count(), 6);
    assert!(
        text.contains(r#"{"key":"plain","value":"text value","expires_at_ms":null}"#),
        "{text}"
    );
    assert!(
        text.contains(r#""key_b64":"//4gYmluYXJ5IGtleQ==""#),
        "{text}"
    );
    assert!(text.contains(r#""value_b64":"AAGA/w==""#), "{text}");

    let file = tmp.path().join("dump.jsonl");
    fs::write(&file, &dump.stdout).expect("writing the dump");
    let target = tmp.path().join("copy");
    let load = keel(&target, [OsStr::new("load"), file.as_os_str()]);
    assert_code(&load, 0);
    assert_eq!(
        load.stdout(),
        "loaded 6 key(s), skipped 0 already expired\n"
    );

    let copy = open(&target);
    let copied = all_entries(&copy);
    copy.close().expect("close");
    // Keys and values survive exactly; an expiry goes through the contract as the time left
    // on the backend's clock, so it may move by the milliseconds the dump and load took.
    assert_eq!(copied.len(), expected.len());
    for (got, want) in copied.iter().zip(&expected) {
        assert_eq!((&got.key, &got.value), (&want.key, &want.value));
        match (got.expires_at_ms, want.expires_at_ms) {
            (None, None) => {}
            (Some(got_at), Some(want_at)) => assert!(
                got_at.abs_diff(want_at) <= EXPIRY_SLACK_MS,
                "expiry moved from {want_at} to {got_at}"
            ),
            other => panic!("expiry changed: {other:?}"),
        }
    }
}

#[test]
fn load_reads_standard_input_and_skips_expired_entries() {
    let (_tmp, dir) = store();
    let input = concat!(
        r#"{"key":"live","value":"1","expires_at_ms":null}"#,
        "\n\n",
        r#"{"key":"gone","value":"2","expires_at_ms":1}"#,
        "\n",
        r#"{"key_b64":"/w==","value":"3","expires_at_ms":null}"#,
    );
    let load = keel_with_stdin(&dir, &["load", "-"], input.as_bytes());
    assert_code(&load, 0);
    assert_eq!(
        load.stdout(),
        "loaded 2 key(s), skipped 1 already expired\n"
    );
    let db = open(&dir);
    assert_eq!(db.get("live").as_deref(), Some(&b"1"[..]));
    assert_eq!(db.get("gone"), None);
    assert_eq!(db.get(b"\xff").as_deref(), Some(&b"3"[..]));
    db.close().expect("close");
}

#[test]
fn load_rejects_bad_lines_by_number_and_writes_nothing() {
    let (tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "before", "x"]), 0);
    let file = tmp.path().join("bad.jsonl");
    let lines = [
        r#"{"key":"good","value":"1","expires_at_ms":null}"#,
        r#"{"key":"broken","value":"#,
        r#"{"key":"k","key_b64":"aw==","value":"v","expires_at_ms":null}"#,
        r#"{"key":"also good","value":"2","expires_at_ms":null}"#,
        r#"{"key_b64":"***","value":"v","expires_at_ms":null}"#,
    ];
    fs::write(&file, lines.join("\n")).expect("writing the input");
    let load = keel(&dir, [OsStr::new("load"), file.as_os_str()]);
    assert_code(&load, 2);
    assert!(load.stdout.is_empty());
    assert!(
        load.stderr
            .contains("3 invalid line(s); nothing was written"),
        "{}",
        load.stderr
    );
    assert!(load.stderr.contains("line 2: bad JSON"), "{}", load.stderr);
    assert!(load.stderr.contains("line 3: both"), "{}", load.stderr);
    assert!(
        load.stderr
            .contains("line 5: \"key_b64\" is not valid base64"),
        "{}",
        load.stderr
    );
    assert!(!load.stderr.contains("line 1:") && !load.stderr.contains("line 4:"));

    let db = open(&dir);
    let keys: Vec<Vec<u8>> = all_entries(&db).into_iter().map(|e| e.key).collect();
    assert_eq!(
        keys,
        vec![b"before".to_vec()],
        "the valid lines were not written either"
    );
    db.close().expect("close");
}

#[test]
fn load_of_a_bad_file_into_a_new_directory_creates_nothing() {
    let (tmp, dir) = store();
    let file = tmp.path().join("bad.jsonl");
    fs::write(&file, "not json\n").expect("writing the input");
    let load = keel(&dir, [OsStr::new("load"), file.as_os_str()]);
    assert_code(&load, 2);
    assert!(load.stderr.contains("line 1:"), "{}", load.stderr);
    assert!(!dir.exists());
}

#[test]
fn load_lists_at_most_20_errors() {
    let (tmp, dir) = store();
    let file = tmp.path().join("bad.jsonl");
    fs::write(&file, "x\n".repeat(25)).expect("writing the input");
    let load = keel(&dir, [OsStr::new("load"), file.as_os_str()]);
    assert_code(&load, 2);
    assert!(load.stderr.contains("line 20:"), "{}", load.stderr);
    assert!(!load.stderr.contains("line 21:"), "{}", load.stderr);
    assert!(load.stderr.contains("and 5 more"), "{}", load.stderr);
}

#[test]
fn verify_passes_on_a_healthy_store() {
    let (_tmp, dir) = store();
    write_keys(&dir, 50);
    let verify = keel(&dir, ["verify"]);
    assert_code(&verify, 0);
    assert!(
        verify.stdout().contains("1 segment(s), 50 record(s)"),
        "{}",
        verify.stdout()
    );
    assert!(!verify.stdout().contains("torn"));
}

#[test]
fn verify_reports_a_flipped_byte_before_valid_records_with_file_and_offset() {
    let (_tmp, dir) = store();
    write_keys(&dir, 300);
    let segment = wal_segment(&dir);
    let mut bytes = fs::read(&segment).expect("reading the segment");
    // Byte 40 is inside the first record's frame (its checksum), which starts right after
    // the 32-byte segment header; 299 valid records follow it.
    bytes[40] ^= 0x5a;
    fs::write(&segment, &bytes).expect("writing the damaged segment");

    let verify = keel(&dir, ["verify"]);
    assert_code(&verify, 2);
    let name = segment
        .file_name()
        .and_then(OsStr::to_str)
        .expect("file name");
    assert!(verify.stderr.contains(name), "{}", verify.stderr);
    assert!(
        verify.stderr.contains("byte offset 32"),
        "{}",
        verify.stderr
    );
    assert_eq!(
        fs::read(&segment).expect("re-read"),
        bytes,
        "verify modifies nothing"
    );

    // Opening refuses the damaged store too, with the same diagnosis.
    let get = keel(&dir, ["get", "key:0001"]);
    assert_code(&get, 2);
    assert!(get.stderr.contains("byte offset 32"), "{}", get.stderr);
}

#[test]
fn verify_reports_a_torn_tail_as_a_note_and_exits_0() {
    let (_tmp, dir) = store();
    write_keys(&dir, 20);
    let segment = wal_segment(&dir);
    let bytes = fs::read(&segment).expect("reading the segment");
    let torn = &bytes[..bytes.len() - 5];
    fs::write(&segment, torn).expect("tearing the last record");

    // The store was closed cleanly, and its clean-close marker vouches for every record: a cut
    // record is then damage to synced data, not a torn write.
    let vouched = keel(&dir, ["verify"]);
    assert_code(&vouched, 2);
    assert!(vouched.stderr.contains("clean close"), "{}", vouched.stderr);

    // A crash leaves no marker: the same cut is a torn tail.
    fs::remove_file(dir.join("CLOSED")).expect("removing the clean-close marker");
    let verify = keel(&dir, ["verify"]);
    assert_code(&verify, 0);
    let text = verify.stdout();
    assert!(text.contains("19 record(s)"), "{text}");
    assert!(text.contains("torn tail"), "{text}");
    assert!(
        text.contains(segment.file_name().and_then(OsStr::to_str).expect("name")),
        "{text}"
    );
    assert_eq!(
        fs::read(&segment).expect("re-read"),
        torn,
        "verify modifies nothing"
    );
}

#[test]
fn verify_fails_on_a_directory_without_a_store() {
    let (_tmp, dir) = store();
    let missing = keel(&dir, ["verify"]);
    assert_code(&missing, 2);
    assert!(
        missing.stderr.contains("does not exist"),
        "{}",
        missing.stderr
    );
    fs::create_dir_all(&dir).expect("mkdir");
    let empty = keel(&dir, ["verify"]);
    assert_code(&empty, 2);
    assert!(empty.stderr.contains("no WAL segment"), "{}", empty.stderr);
}

#[test]
fn a_store_held_open_elsewhere_is_reported_as_locked_with_the_holder_pid() {
    let (_tmp, dir) = store();
    let held = open(&dir);
    let get = keel(&dir, ["get", "k"]);
    assert_code(&get, 2);
    assert!(get.stderr.contains("locked"), "{}", get.stderr);
    assert!(
        get.stderr.contains(&std::process::id().to_string()),
        "{}",
        get.stderr
    );
    // verify takes no lock, so it works while the store is open.
    assert_code(&keel(&dir, ["verify"]), 0);
    held.close().expect("close");
    assert_code(&keel(&dir, ["set", "k", "v"]), 0);
}

#[test]
fn bad_durations_are_rejected_and_nothing_is_written() {
    let (_tmp, dir) = store();
    for bad in ["10x", "1.5s", "10", "s", "1h30m", "99999999999999999999h"] {
        let run = keel(&dir, ["set", "k", "v", "--ttl", bad]);
        assert_code(&run, 2);
        assert!(
            run.stderr.contains("invalid duration"),
            "{bad}: {}",
            run.stderr
        );
    }
    // A leading `-` reads as an option to the argument parser: still a usage error.
    assert_code(&keel(&dir, ["set", "k", "v", "--ttl", "-1s"]), 2);
    let zero = keel(&dir, ["set", "k", "v", "--ttl", "0s"]);
    assert_code(&zero, 2);
    assert!(zero.stderr.contains("invalid TTL 0 ms"), "{}", zero.stderr);
    assert_code(&keel(&dir, ["get", "k"]), 1);

    assert_code(&keel(&dir, ["set", "k", "v"]), 0);
    let expire = keel(&dir, ["expire", "k", "5d"]);
    assert_code(&expire, 2);
    assert!(
        expire.stderr.contains("invalid duration"),
        "{}",
        expire.stderr
    );
    let zero = keel(&dir, ["expire", "k", "0ms"]);
    assert_code(&zero, 2);
    assert!(zero.stderr.contains("invalid TTL"), "{}", zero.stderr);
    assert_eq!(keel(&dir, ["ttl", "k"]).stdout(), "-1\n");
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["frobnicate"]), 2);
    assert_code(&keel(&dir, ["set", "only-a-key"]), 2);
    assert_code(&keel(&dir, ["incr", "k", "--by", "one"]), 2);
    let help = keel(&dir, ["load", "--help"]);
    assert_code(&help, 0);
    assert!(
        help.stdout().contains("before any write"),
        "{}",
        help.stdout()
    );
}

#[test]
fn compact_snapshots_and_the_store_reopens_from_it() {
    let (_tmp, dir) = store();
    for i in 0..50 {
        assert_code(&keel(&dir, ["set", &format!("k{i}"), &format!("v{i}")]), 0);
    }
    let run = keel(&dir, ["compact"]);
    assert_code(&run, 0);
    assert!(
        run.stdout().contains("snapshot at lsn 50: 50 entries"),
        "{}",
        run.stdout()
    );
    let run = keel(&dir, ["verify"]);
    assert_code(&run, 0);
    assert!(run.stdout().contains("ok: snapshot"), "{}", run.stdout());
    let run = keel(&dir, ["stats"]);
    assert!(
        run.stdout().contains("snapshot at lsn 50"),
        "{}",
        run.stdout()
    );
    assert_eq!(keel(&dir, ["get", "k49"]).stdout, b"v49");
}

const FLAG_DOC: &str = r#"{"key": "new-checkout", "enabled": true,
  "variants": {"on": true, "off": false}, "default_variant": "off",
  "rules": [{"rollout": {"percentage": 25, "variants": [{"name": "on", "weight": 100}]}}]}"#;

#[test]
fn flags_set_get_list_enable_disable_delete() {
    let (tmp, dir) = store();
    let file = tmp.path().join("flag.json");
    fs::write(&file, FLAG_DOC).unwrap();
    let run = keel(
        &dir,
        [OsStr::new("flags"), OsStr::new("set"), file.as_os_str()],
    );
    assert_code(&run, 0);
    assert_eq!(run.stdout(), "new-checkout v1\n");
    let run = keel(&dir, ["flags", "list"]);
    assert_code(&run, 0);
    assert_eq!(run.stdout(), "new-checkout\ton\tv1\tdefault=off\n");
    let run = keel(&dir, ["flags", "disable", "new-checkout"]);
    assert_code(&run, 0);
    assert_eq!(run.stdout(), "new-checkout disabled v2\n");
    let run = keel(&dir, ["flags", "get", "new-checkout"]);
    assert_code(&run, 0);
    let doc: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(doc["enabled"], false);
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["rules"][0]["rollout"]["percentage"], 25);
    let run = keel(&dir, ["flags", "enable", "new-checkout"]);
    assert_eq!(run.stdout(), "new-checkout enabled v3\n");
    // The document also goes in through standard input.
    let run = keel_with_stdin(
        &dir,
        &["flags", "set", "-"],
        FLAG_DOC.replace("new-checkout", "other").as_bytes(),
    );
    assert_code(&run, 0);
    assert_eq!(keel(&dir, ["flags", "list"]).stdout().lines().count(), 2);
    assert_eq!(keel(&dir, ["flags", "delete", "other"]).stdout(), "1\n");
    assert_eq!(keel(&dir, ["flags", "delete", "other"]).stdout(), "0\n");
    let run = keel(&dir, ["flags", "get", "other"]);
    assert_code(&run, 1);
    assert!(run.stderr.contains("does not exist"), "{}", run.stderr);
    let run = keel(&dir, ["flags", "enable", "other"]);
    assert_code(&run, 1);
}

#[test]
fn flags_set_refuses_an_invalid_document_and_writes_nothing() {
    let (tmp, dir) = store();
    let file = tmp.path().join("bad.json");
    fs::write(
        &file,
        FLAG_DOC.replace(r#""weight": 100"#, r#""weight": 90"#),
    )
    .unwrap();
    let run = keel(
        &dir,
        [OsStr::new("flags"), OsStr::new("set"), file.as_os_str()],
    );
    assert_code(&run, 2);
    assert!(run.stderr.contains("sum to 90, not 100"), "{}", run.stderr);
    fs::write(
        &file,
        FLAG_DOC.replace(
            r#"[{"rollout""#,
            r#"[{"constraints": [{"attribute": "a", "operator": "LIKE", "value": "x"}], "rollout""#,
        ),
    )
    .unwrap();
    let run = keel(
        &dir,
        [OsStr::new("flags"), OsStr::new("set"), file.as_os_str()],
    );
    assert_code(&run, 2);
    assert!(
        run.stderr.contains("unknown constraint operator \"LIKE\""),
        "{}",
        run.stderr
    );
    // Nothing was written: not even a store was created.
    assert!(!dir.exists());
}

// ---- Any backend by URL, and `keel migrate` ------------------------------------------------

/// Runs `keel ARGS...` with neither `--db` nor `KEEL_DB`: the command names its store itself.
fn keel_bare<I, S>(args: I) -> Run
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(args)
        .env_remove("KEEL_DB")
        .output()
        .expect("running keel")
        .into()
}

/// The URL of a server backend from the environment. Unset is a failure with instructions,
/// never a skip.
#[allow(dead_code)]
fn server_url(var: &str) -> String {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => url,
        _ => panic!(
            "{var} is not set, so this test cannot run. Run `scripts/test`, which starts \
             Redis, Valkey and Postgres on this machine and sets it, or set it yourself to a \
             server you started."
        ),
    }
}

/// A key prefix no other test (or run) uses, so tests can share a server.
fn unique_prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos();
    format!("clitest:{test}:{}:{nanos}:", std::process::id())
}

#[test]
fn url_and_db_together_are_a_usage_error() {
    let (_tmp, dir) = store();
    let run = keel(&dir, ["get", "--url", "memory://", "k"]);
    assert_code(&run, 2);
    assert!(
        run.stderr.contains("--url and --db both name the store"),
        "{}",
        run.stderr
    );
    assert!(!dir.exists());
}

#[test]
fn engine_only_commands_refuse_another_backend_naming_the_command() {
    for command in ["compact", "verify"] {
        let run = keel_bare([command, "--url", "memory://"]);
        assert_code(&run, 2);
        assert!(
            run.stderr
                .contains(&format!("`keel {command}` works on the embedded engine")),
            "{command}: {}",
            run.stderr
        );
    }
}

#[test]
fn keel_urls_name_the_embedded_engine() {
    let (_tmp, dir) = store();
    let url = format!("keel://{}", dir.display());
    assert_code(&keel_bare(["set", "--url", &url, "k", "by-url"]), 0);
    assert_eq!(keel(&dir, ["get", "k"]).stdout, b"by-url");
    // Read-only commands by URL refuse a missing store too.
    let missing = format!("keel://{}", dir.with_file_name("nothing").display());
    let run = keel_bare(["get", "--url", &missing, "k"]);
    assert_code(&run, 2);
    assert!(!dir.with_file_name("nothing").exists());
}

#[test]
fn stats_json_prints_the_engine_figures_as_one_object() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "a", "1"]), 0);
    assert_code(&keel(&dir, ["set", "b:1", "2", "--ttl", "1h"]), 0);
    let run = keel(&dir, ["stats", "--json", "--prefix", "b:"]);
    assert_code(&run, 0);
    assert_eq!(
        run.stdout().lines().count(),
        1,
        "one line: {}",
        run.stdout()
    );
    let stats: serde_json::Value = serde_json::from_slice(&run.stdout).expect("JSON");
    assert_eq!(stats["backend"], "embedded");
    assert_eq!(stats["keys"], 2);
    assert_eq!(stats["keys_under_prefix"], 1);
    assert_eq!(stats["wal_segments"], 1);
    assert_eq!(stats["recovery"]["records"], 2);
    for field in [
        "memory_bytes",
        "wal_bytes",
        "wal_fsyncs",
        "snapshots",
        "evictions",
        "durable_lsn",
        "clock_ms",
    ] {
        assert!(stats[field].is_u64(), "{field}: {stats}");
    }
    assert_eq!(stats["poisoned"], false);
}

/// The data commands on a server backend, under a prefix of their own.
#[allow(dead_code)]
fn data_commands_work_by_url(url: &str, test: &str) {
    let p = unique_prefix(test);
    let k = |name: &str| format!("{p}{name}");
    let ok = |args: &[&str]| {
        let mut full = vec![args[0], "--url", url];
        full.extend_from_slice(&args[1..]);
        let run = keel_bare(&full);
        assert_code(&run, 0);
        run.stdout()
    };
    assert_eq!(ok(&["set", &k("a"), "hello", "--ttl", "1h"]), "OK\n");
    assert_eq!(ok(&["get", &k("a")]), "hello");
    let ttl: i64 = ok(&["ttl", &k("a")]).trim().parse().expect("a number");
    assert!((3_590_000..=3_600_000).contains(&ttl), "{ttl}");
    assert_eq!(ok(&["persist", &k("a")]), "1\n");
    assert_eq!(ok(&["ttl", &k("a")]), "-1\n");
    assert_eq!(ok(&["expire", &k("a"), "10m"]), "1\n");
    assert_eq!(ok(&["incr", &k("n"), "--by", "5"]), "5\n");
    assert_eq!(ok(&["incr", &k("n"), "--by", "-2"]), "3\n");
    let nx = keel_bare(["set", "--url", url, &k("a"), "x", "--nx"]);
    assert_code(&nx, 1);
    let missing = keel_bare(["get", "--url", url, &k("none")]);
    assert_code(&missing, 1);
    let mut scanned: Vec<String> = ok(&["scan", &p]).lines().map(str::to_owned).collect();
    scanned.sort();
    assert_eq!(scanned, [k("a"), k("n")]);
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&["stats", "--json", "--prefix", &p])).expect("JSON");
    assert_eq!(stats["keys_under_prefix"], 2);
    assert!(stats["clock_ms"].is_u64(), "{stats}");
    assert!(
        stats.get("wal_bytes").is_none(),
        "no engine figures: {stats}"
    );
    let line = format!(
        r#"{{"key":"{}","value":"loaded","expires_at_ms":null}}"#,
        k("l")
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["load", "--url", url, "-"])
        .env_remove("KEEL_DB")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning keel");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(line.as_bytes())
        .expect("writing stdin");
    let load: Run = child.wait_with_output().expect("waiting").into();
    assert_code(&load, 0);
    assert_eq!(ok(&["get", &k("l")]), "loaded");
    for name in ["a", "n", "l"] {
        assert_eq!(ok(&["del", &k(name)]), "1\n");
    }
    assert_eq!(ok(&["del", &k("a")]), "0\n");
}

#[cfg(feature = "redis")]
#[test]
fn data_commands_work_on_redis_by_url() {
    data_commands_work_by_url(&server_url("KEEL_TEST_REDIS_URL"), "redis");
}

#[cfg(feature = "valkey")]
#[test]
fn data_commands_work_on_valkey_by_url() {
    data_commands_work_by_url(&server_url("KEEL_TEST_VALKEY_URL"), "valkey");
}

#[cfg(feature = "postgres")]
#[test]
fn data_commands_work_on_postgres_by_url() {
    data_commands_work_by_url(&server_url("KEEL_TEST_POSTGRES_URL"), "postgres");
}

#[test]
fn migrate_between_directories_copies_ttls_and_a_dry_run_creates_nothing() {
    let (tmp, source) = store();
    let db = open(&source);
    db.set("a", "1", None).expect("set");
    db.set("b", "2", Some(Duration::from_secs(3600)))
        .expect("set");
    db.set(b"\xff bin", "3", None).expect("set");
    db.close().expect("close");
    let destination = tmp.path().join("copy");

    let dry = keel_bare([
        OsStr::new("migrate"),
        source.as_os_str(),
        destination.as_os_str(),
        OsStr::new("--dry-run"),
    ]);
    assert_code(&dry, 0);
    assert!(
        dry.stdout().contains("would copy 3 key(s)"),
        "{}",
        dry.stdout()
    );
    assert!(!destination.exists(), "a dry run creates nothing");

    let url = format!("keel://{}", destination.display());
    let run = keel_bare([
        OsStr::new("migrate"),
        source.as_os_str(),
        OsStr::new(&url),
        OsStr::new("--verify"),
    ]);
    assert_code(&run, 0);
    let text = run.stdout();
    assert!(text.contains("copied 3 key(s)"), "{text}");
    assert!(text.contains("keys/s"), "{text}");
    assert!(text.contains("0 difference(s)"), "{text}");
    let copy = open(&destination);
    let original = open(&source);
    let (copied, expected) = (all_entries(&copy), all_entries(&original));
    assert_eq!(copied.len(), 3);
    for (got, want) in copied.iter().zip(&expected) {
        assert_eq!((&got.key, &got.value), (&want.key, &want.value));
        match (got.expires_at_ms, want.expires_at_ms) {
            (None, None) => {}
            // The same absolute expiry, to within the milliseconds the copy took.
            (Some(g), Some(w)) => assert!(g <= w && w - g <= 1_000, "{g} vs {w}"),
            other => panic!("expiry changed: {other:?}"),
        }
    }
    copy.close().expect("close");
    original.close().expect("close");
}

#[test]
fn migrate_refuses_options_it_cannot_honour() {
    let (_tmp, dir) = store();
    assert_code(&keel(&dir, ["set", "a", "1"]), 0);
    let run = keel(&dir, ["migrate", "memory://", "memory://"]);
    assert_code(&run, 2);
    assert!(run.stderr.contains("--db does not apply"), "{}", run.stderr);
    let run = keel_bare([
        OsStr::new("migrate"),
        dir.as_os_str(),
        OsStr::new("memory://"),
        OsStr::new("--batch"),
        OsStr::new("0"),
    ]);
    assert_code(&run, 2);
    assert!(run.stderr.contains("batch size is 0"), "{}", run.stderr);
    let run = keel_bare(["migrate", "memory://", "memory://", "--merge", "sometimes"]);
    assert_code(&run, 2);
}

#[cfg(feature = "redis")]
#[test]
fn migrate_to_redis_refuses_a_second_run_and_applies_each_merge_rule() {
    let redis = server_url("KEEL_TEST_REDIS_URL");
    let p = unique_prefix("migrate-rules");
    let (_tmp, dir) = store();
    let db = open(&dir);
    db.set(format!("{p}a"), "1", Some(Duration::from_secs(3600)))
        .expect("set");
    db.set(format!("{p}b"), "2", None).expect("set");
    db.close().expect("close");
    let migrate = |extra: &[&str]| {
        let mut args = vec![
            OsStr::new("migrate"),
            dir.as_os_str(),
            OsStr::new(&redis),
            OsStr::new("--prefix"),
            OsStr::new(&p),
        ];
        args.extend(extra.iter().map(OsStr::new));
        keel_bare(args)
    };

    let first = migrate(&["--verify"]);
    assert_code(&first, 0);
    assert!(
        first.stdout().contains("copied 2 key(s)"),
        "{}",
        first.stdout()
    );
    assert!(
        first.stdout().contains("0 difference(s)"),
        "{}",
        first.stdout()
    );
    let ttl: i64 = keel_bare(["ttl", "--url", &redis, &format!("{p}a")])
        .stdout()
        .trim()
        .parse()
        .expect("a number");
    assert!((3_590_000..=3_600_000).contains(&ttl), "{ttl}");

    let again = migrate(&[]);
    assert_code(&again, 2);
    assert!(again.stderr.contains("not empty"), "{}", again.stderr);

    assert_code(
        &keel_bare(["set", "--url", &redis, &format!("{p}b"), "theirs"]),
        0,
    );
    let fail = migrate(&["--merge", "fail"]);
    assert_code(&fail, 2);
    assert!(
        fail.stderr.contains(&format!("conflict: \"{p}b\"")),
        "{}",
        fail.stderr
    );

    // A dry run with --verify compares without writing: the difference is listed, exit 1.
    let dry = migrate(&["--merge", "overwrite", "--dry-run", "--verify"]);
    assert_code(&dry, 1);
    assert!(
        dry.stdout().contains(&format!("value differs: {p}b")),
        "{}",
        dry.stdout()
    );
    let skip = migrate(&["--merge", "skip", "--verify"]);
    assert_code(&skip, 1);
    assert!(skip.stdout().contains("skipped 2"), "{}", skip.stdout());
    assert_eq!(
        keel_bare(["get", "--url", &redis, &format!("{p}b")]).stdout,
        b"theirs"
    );

    let overwrite = migrate(&["--merge", "overwrite", "--verify"]);
    assert_code(&overwrite, 0);
    assert_eq!(
        keel_bare(["get", "--url", &redis, &format!("{p}b")]).stdout,
        b"2"
    );
    for key in ["a", "b"] {
        assert_code(
            &keel_bare(["del", "--url", &redis, &format!("{p}{key}")]),
            0,
        );
    }
}

#[cfg(feature = "postgres")]
#[test]
fn migrate_resumes_an_interrupted_run() {
    let postgres = server_url("KEEL_TEST_POSTGRES_URL");
    let p = unique_prefix("migrate-resume");
    let (_tmp, dir) = store();
    let db = open(&dir);
    for i in 0..300 {
        db.set(format!("{p}{i:03}"), format!("v{i}"), None)
            .expect("set");
    }
    db.close().expect("close");

    // Interrupt a run after 120 keys, through the library with the label the CLI gives a
    // store directory.
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let stopped = runtime.block_on(async {
        let source = keel::connect(dir.to_str().expect("utf-8 path"))
            .await
            .expect("source");
        let destination = keel::connect(&postgres).await.expect("destination");
        keel::migrate::migrate(
            &*source,
            &*destination,
            &keel::migrate::MigrateOptions {
                prefix: p.clone().into_bytes(),
                batch_keys: 50,
                stop_after_keys: Some(120),
                source_label: dir.display().to_string(),
                ..Default::default()
            },
            |_| {},
        )
        .await
        .expect("interrupted run")
    });
    assert!(stopped.stopped);

    let resumed = keel_bare([
        OsStr::new("migrate"),
        dir.as_os_str(),
        OsStr::new(&postgres),
        OsStr::new("--prefix"),
        OsStr::new(&p),
        OsStr::new("--verify"),
    ]);
    assert_code(&resumed, 0);
    let text = resumed.stdout();
    assert!(text.contains("resumed an interrupted run"), "{text}");
    assert!(text.contains("copied 300 key(s)"), "{text}");
    assert!(
        text.contains("source 300 key(s), destination 300 key(s)"),
        "{text}"
    );
    assert!(text.contains("0 difference(s)"), "{text}");
    runtime.block_on(async {
        let destination = keel::connect(&postgres).await.expect("destination");
        destination
            .delete_prefix(p.as_bytes())
            .await
            .expect("cleaning up");
    });
}
