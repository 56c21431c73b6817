//! The [`Backend`] contract on PostgreSQL: [`PostgresBackend`] keeps every key in one table,
//! reached through a pool of connections, with each operation a single prepared statement
//! (cached per connection), so each is atomic without explicit transactions or retries.
//!
//! # Schema
//! [`PostgresBackend::ensure_schema`] creates, if missing:
//!
//! ```sql
//! CREATE TABLE "keel_kv" (key bytea PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NULL);
//! CREATE INDEX "keel_kv_expires_at_idx" ON "keel_kv" (expires_at) WHERE expires_at IS NOT NULL;
//! ```
//!
//! The table name is configurable (optionally schema-qualified) and is always quoted. A NULL
//! `expires_at` means the key does not expire. The table is logged (crash safe) by default;
//! [`TableDurability::Unlogged`] trades crash safety for faster writes.
//!
//! # Clock
//! Expiry is judged by the *server's* clock, through `now()`. Each operation is one statement
//! in its own implicit transaction, so `now()` is the instant that statement started, and it is
//! stable within the statement: the liveness test, the TTL stamped on a write and the TTL read
//! back all see the same instant, which a volatile `clock_timestamp()` would not guarantee
//! (it could disagree between the `WHERE` and the `SET` of one upsert). Expiry instants are
//! stored truncated to whole milliseconds (`date_trunc('milliseconds', now()) + ttl`), so a TTL
//! round-trips in milliseconds and a key is live while `expires_at > now()`, exactly as in the
//! embedded engine. One consequence: an operation that waits for another's row lock judges
//! expiry at the instant it started, so for that operation a key can outlive its deadline by
//! the length of the wait. [`Backend::now_ms`] reads the same `now()`.
//!
//! # Expired rows and the sweeper
//! An expired row is invisible to every read and write: reads filter it out, and writes that
//! create a key (`set_nx`, `compare_and_swap` from `None`, `incr`) overwrite it as if it were
//! absent. A background task deletes expired rows in bounded batches (at most
//! [`PostgresOptions::sweep_batch`] rows per statement, using the partial index on
//! `expires_at`) every [`PostgresOptions::sweep_interval`], repeating at once while batches
//! come back full so a backlog drains quickly. It skips rows other sessions have locked, so
//! several processes can sweep one table, and it stops when the backend is dropped. A sweep
//! that fails (server down, table not yet created) is retried at the next interval.
//!
//! # Requirements
//! PostgreSQL 12 or later (`ON CONFLICT`, `SKIP LOCKED`, `MATERIALIZED`); checked at connect.
//!
//! # TLS
//! `sslmode=require|verify-ca|verify-full` (and `sslrootcert=PATH`) in the URL turn on TLS with
//! rustls; see the [`tls`] module for what each mode checks.

mod notice;
pub mod tls;
pub mod user_sessions;

pub use user_sessions::PostgresUserSessions;

use std::error::Error as _;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    ClientWrapper, Hook, HookError, Manager, ManagerConfig, Object, Pool, PoolError,
    RecyclingMethod, Runtime, StatementCache,
};
use keel_primitives::backend::rate;
use keel_primitives::backend::{
    KEY_BYTES_MAX, RateMode, RateOutcome, RateRule, ReleaseNotices, VALUE_BYTES_MAX, check_key,
    check_value, not_an_integer, overflow, ttl_ms,
};
use keel_primitives::{
    Backend, Error, ErrorKind, Result, SCAN_LIMIT_MAX, ScanCursor, ScanPage, Ttl, TtlPolicy,
};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

/// The table used when [`PostgresOptions::table`] is not changed.
pub const TABLE_DEFAULT: &str = "keel_kv";
/// Connections in the pool by default.
pub const POOL_SIZE_DEFAULT: usize = 16;
/// How often the sweeper runs by default.
pub const SWEEP_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// Expired rows one sweep statement deletes at most, by default.
pub const SWEEP_BATCH_DEFAULT: u32 = 1_000;
/// Largest accepted [`PostgresOptions::sweep_batch`]: one statement must stay short.
pub const SWEEP_BATCH_MAX: u32 = 100_000;
/// Per-operation time limit by default.
pub const OP_TIMEOUT_DEFAULT: Duration = Duration::from_secs(5);

/// Idle time before the first TCP keepalive probe.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// The server-side `statement_timeout` and `lock_timeout` for an operation time limit:
/// three quarters of it (at least 1 ms), so the server ends a stuck statement before the
/// client's deadline and reports it as a timeout itself.
fn server_timeout(op_timeout: Duration) -> Duration {
    (op_timeout * 3 / 4).max(Duration::from_millis(1))
}

/// PostgreSQL's identifier limit (NAMEDATALEN - 1); longer names are silently truncated.
const IDENTIFIER_BYTES_MAX: usize = 63;
/// Appended to the table name to name the sweeper's index.
const INDEX_SUFFIX: &str = "_expires_at_idx";
/// Appended to an unlogged table's name to name its logged fence table.
const FENCE_SUFFIX: &str = "_fence";
const _: () = assert!(FENCE_SUFFIX.len() <= INDEX_SUFFIX.len());
/// The longest table name whose index name still fits in an identifier.
const TABLE_NAME_BYTES_MAX: usize = IDENTIFIER_BYTES_MAX - INDEX_SUFFIX.len();
const _: () = assert!(TABLE_NAME_BYTES_MAX + INDEX_SUFFIX.len() <= IDENTIFIER_BYTES_MAX);
/// Keys one `delete_prefix` statement deletes at most.
const DELETE_PREFIX_BATCH: i64 = 1_000;
/// `ensure_schema` may build an index on an existing table: it gets at least this long.
const SCHEMA_TIMEOUT_MIN: Duration = Duration::from_secs(60);
/// Oldest supported server (`server_version_num`).
const SERVER_VERSION_MIN: i32 = 120_000;
/// Advisory lock taken while creating the schema, so concurrent `ensure_schema` calls from
/// several processes do not race on `CREATE TABLE IF NOT EXISTS` (which is not atomic).
/// The bytes spell "keel_sch".
const SCHEMA_LOCK_KEY: i64 = 0x6b65_656c_5f73_6368;

/// Whether the table survives a server crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TableDurability {
    /// A normal table: every committed write is in the write-ahead log, survives a crash and
    /// is replicated to standbys.
    #[default]
    Logged,
    /// `CREATE UNLOGGED TABLE`: writes skip the write-ahead log, so they are faster, but after
    /// a crash or unclean shutdown the server empties the table, and standbys never see it
    /// (it cannot be read on a replica nor survive a failover). For caches and rate limits
    /// that can afford to start empty.
    ///
    /// Fencing counters (`incr_durable`) stay safe: `ensure_schema` also creates a *logged*
    /// companion table, `<table>_fence`, holding each counter's floor, written in the same
    /// durable statement, so after a crash a counter continues above every value it returned
    /// (the lock's tokens never repeat). On such a table, deleting a counter's key does not
    /// reset it; letting it expire does.
    Unlogged,
}

/// How [`PostgresBackend::connect_with`] sets up the backend. Start from
/// [`PostgresOptions::default`] and change what you need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresOptions {
    /// The table holding the keys: an identifier (ASCII letters, digits, `_`, not starting
    /// with a digit, at most 48 bytes so its index name fits), optionally qualified by a
    /// schema (`"schema.table"`). It is quoted, so it is case-sensitive. Default
    /// [`TABLE_DEFAULT`].
    pub table: String,
    /// Logged (the default) or unlogged; applies when [`PostgresBackend::ensure_schema`]
    /// creates the table, and `ensure_schema` refuses an existing table that differs.
    pub durability: TableDurability,
    /// Most connections held open at once (at least 1). Default [`POOL_SIZE_DEFAULT`].
    pub pool_size: usize,
    /// Pause between sweeps of expired rows (more than zero). Default
    /// [`SWEEP_INTERVAL_DEFAULT`].
    pub sweep_interval: Duration,
    /// Most expired rows one sweep statement deletes (1 to [`SWEEP_BATCH_MAX`]). A batch must
    /// finish within [`PostgresOptions::op_timeout`], or it is cancelled and retried at the
    /// next interval. Default [`SWEEP_BATCH_DEFAULT`].
    pub sweep_batch: u32,
    /// Time limit of each operation, including waiting for a connection (more than zero).
    /// Past it the operation fails with [`ErrorKind::Timeout`], its statement is cancelled
    /// and its connection closed. Default [`OP_TIMEOUT_DEFAULT`].
    pub op_timeout: Duration,
}

impl Default for PostgresOptions {
    fn default() -> Self {
        PostgresOptions {
            table: TABLE_DEFAULT.to_owned(),
            durability: TableDurability::Logged,
            pool_size: POOL_SIZE_DEFAULT,
            sweep_interval: SWEEP_INTERVAL_DEFAULT,
            sweep_batch: SWEEP_BATCH_DEFAULT,
            op_timeout: OP_TIMEOUT_DEFAULT,
        }
    }
}

impl PostgresOptions {
    fn validate(&self) -> Result<TableName> {
        let invalid = |what: String| Err(Error::new(ErrorKind::InvalidInput, what));
        if self.pool_size == 0 {
            return invalid("pool_size must be at least 1".to_owned());
        }
        if self.sweep_interval.is_zero() {
            return invalid("sweep_interval must be more than zero".to_owned());
        }
        if self.sweep_batch == 0 || self.sweep_batch > SWEEP_BATCH_MAX {
            return invalid(format!(
                "sweep_batch is {}, it must be between 1 and {SWEEP_BATCH_MAX}",
                self.sweep_batch
            ));
        }
        if self.op_timeout.is_zero() {
            return invalid("op_timeout must be more than zero".to_owned());
        }
        TableName::parse(&self.table)
    }
}

/// A validated table name, quoted for SQL.
#[derive(Debug, Clone, PartialEq, Eq)]
struct TableName {
    /// `"table"` or `"schema"."table"`.
    quoted: String,
    /// The index's name, `"table_expires_at_idx"` (an index lives in its table's schema).
    index: String,
    /// The logged companion table of an unlogged table, `"table_fence"`, which keeps the
    /// floor of every `incr_durable` counter (see [`TableDurability::Unlogged`]).
    fence: String,
    /// The rate-limit step's functions: `"table_rate_limit"`, its per-rule `"table_rate_judge"`
    /// and floor division `"table_rate_fdiv"` (in the table's schema).
    rate_step: String,
    rate_judge: String,
    rate_fdiv: String,
}

impl TableName {
    fn parse(name: &str) -> Result<TableName> {
        let refuse = |why: &str| {
            Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "invalid table name {name:?}: {why}; use ASCII letters, digits and `_`, not \
                     starting with a digit, optionally as schema.table"
                ),
            ))
        };
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, name),
        };
        if let Some(schema) = schema
            && !is_identifier(schema, IDENTIFIER_BYTES_MAX)
        {
            return refuse("the schema is not a plain identifier of at most 63 bytes");
        }
        if !is_identifier(table, TABLE_NAME_BYTES_MAX) {
            return refuse("the table is not a plain identifier of at most 48 bytes");
        }
        let qualify = |name: &str| match schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        };
        Ok(TableName {
            quoted: qualify(table),
            index: format!("\"{table}{INDEX_SUFFIX}\""),
            fence: qualify(&format!("{table}{FENCE_SUFFIX}")),
            rate_step: qualify(&format!("{table}_rate_limit")),
            rate_judge: qualify(&format!("{table}_rate_judge")),
            rate_fdiv: qualify(&format!("{table}_rate_fdiv")),
        })
    }
}

/// A plain SQL identifier: `[A-Za-z_][A-Za-z0-9_]*`, 1 to `max` bytes. Such a name needs no
/// escaping inside double quotes (nor inside a string literal).
fn is_identifier(s: &str, max: usize) -> bool {
    let mut bytes = s.bytes();
    let Some(first) = bytes.next() else {
        return false;
    };
    s.len() <= max
        && (first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// The smallest byte string greater than every string starting with `prefix`, or `None` if
/// there is none (the empty prefix, or one made only of 0xff bytes). Keys in
/// `[prefix, successor)` are exactly the keys starting with `prefix`.
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let last = prefix.iter().rposition(|&b| b != 0xff)?;
    let mut successor = prefix[..=last].to_vec();
    successor[last] += 1;
    Some(successor)
}

/// Where a scan page starts: the prefix itself, or just after the cursor (`cursor + 0x00` is
/// the smallest string greater than `cursor`), whichever is greater.
fn scan_start(prefix: &[u8], cursor: Option<&ScanCursor>) -> Vec<u8> {
    match cursor {
        Some(c) if c.0.as_slice() >= prefix => {
            let mut start = Vec::with_capacity(c.0.len() + 1);
            start.extend_from_slice(&c.0);
            start.push(0);
            start
        }
        _ => prefix.to_vec(),
    }
}

/// The rate-limit step's functions for table `t` (`rate_limit.sql`).
fn rate_limit_ddl(t: &TableName) -> String {
    include_str!("rate_limit.sql")
        .replace("{fdiv}", &t.rate_fdiv)
        .replace("{judge}", &t.rate_judge)
        .replace("{step}", &t.rate_step)
        .replace("{table}", &t.quoted)
}

/// SQL that is the same for every table.
mod fragment {
    /// The statement's instant, truncated to the millisecond.
    pub const NOW_MS: &str = "date_trunc('milliseconds', now())";
    /// Row alias `t` is live. Equivalent to comparing whole milliseconds, because stored
    /// instants are whole milliseconds.
    pub const LIVE: &str = "(t.expires_at IS NULL OR t.expires_at > now())";
    /// Whole milliseconds left for row `t` (at least 1 when live; NULL if it does not expire).
    pub const REMAINING_MS: &str =
        "(extract(epoch FROM t.expires_at - date_trunc('milliseconds', now())) * 1000)::bigint";
    /// Redis's integer grammar: optional `-`, no leading zeros, no `-0`, at most 19 digits.
    /// Applied to `encode(value, 'escape')`, which leaves printable ASCII as is and turns NUL,
    /// `\` and every byte >= 0x80 into a backslash escape, so invalid UTF-8 cannot fail the
    /// check with an error: it just does not match.
    pub const INTEGER_RE: &str = "^(0|-?[1-9][0-9]{0,18})$";
}

/// The expiry instant `ttl` milliseconds from now, for a nullable bigint parameter (`NULL`
/// gives `NULL`: no expiry).
fn expires_at(param: u8) -> String {
    format!(
        "{} + ${param}::bigint * interval '1 millisecond'",
        fragment::NOW_MS
    )
}

/// Every statement, built once for the configured table.
#[derive(Debug)]
struct Sql {
    get: String,
    get_with_ttl: String,
    ttl: String,
    set: String,
    set_nx: String,
    cas_expected: String,
    compare_and_delete: String,
    delete: String,
    incr: String,
    incr_durable: String,
    expire: String,
    persist: String,
    scan_bounded: String,
    scan_unbounded: String,
    delete_prefix_bounded: String,
    delete_prefix_unbounded: String,
    sweep: String,
    /// Deletes expired floors of an unlogged table's fence table.
    sweep_fence: Option<String>,
    now_ms: String,
    rate_limit: String,
}

impl Sql {
    fn new(table: &TableName, durability: TableDurability) -> Sql {
        use fragment::{INTEGER_RE, LIVE, REMAINING_MS};
        let t = &table.quoted;
        let fence = (durability == TableDurability::Unlogged).then_some(table.fence.as_str());
        let exp3 = expires_at(3);
        Sql {
            get: format!("SELECT t.value FROM {t} AS t WHERE t.key = $1 AND {LIVE}"),
            get_with_ttl: format!(
                "SELECT t.value, {REMAINING_MS} FROM {t} AS t WHERE t.key = $1 AND {LIVE}"
            ),
            ttl: format!("SELECT {REMAINING_MS} FROM {t} AS t WHERE t.key = $1 AND {LIVE}"),
            set: format!(
                "INSERT INTO {t} AS t (key, value, expires_at) VALUES ($1, $2, {exp3}) \
                 ON CONFLICT (key) DO UPDATE \
                 SET value = excluded.value, expires_at = excluded.expires_at"
            ),
            // Also compare_and_swap(expected = None): an expired row counts as absent, so it
            // is overwritten; a live row is left alone and nothing is returned.
            set_nx: format!(
                "INSERT INTO {t} AS t (key, value, expires_at) VALUES ($1, $2, {exp3}) \
                 ON CONFLICT (key) DO UPDATE \
                 SET value = excluded.value, expires_at = excluded.expires_at \
                 WHERE t.expires_at <= now() \
                 RETURNING true"
            ),
            // $3: keep the current expiry; otherwise $4 is the new TTL (NULL: none).
            cas_expected: format!(
                "UPDATE {t} AS t SET value = $2, expires_at = CASE WHEN $3::boolean \
                 THEN t.expires_at ELSE {} END \
                 WHERE t.key = $1 AND t.value = $5 AND {LIVE} \
                 RETURNING true",
                expires_at(4)
            ),
            compare_and_delete: format!(
                "DELETE FROM {t} AS t WHERE t.key = $1 AND t.value = $2 AND {LIVE} RETURNING true"
            ),
            // Deletes an expired row too (it is garbage anyway) but reports only a live one.
            delete: format!(
                "WITH d AS (DELETE FROM {t} AS t WHERE t.key = $1 RETURNING t.expires_at) \
                 SELECT count(*) FROM d AS t WHERE {LIVE}"
            ),
            incr: incr_sql(t, false, INTEGER_RE),
            incr_durable: match fence {
                None => incr_sql(t, true, INTEGER_RE),
                Some(fence) => incr_fenced_sql(t, fence, INTEGER_RE),
            },
            sweep_fence: fence.map(|fence| {
                format!(
                    "WITH d AS (DELETE FROM {fence} AS t WHERE t.key = ANY(ARRAY(\
                       SELECT s.key FROM {fence} AS s WHERE s.expires_at <= now() \
                       LIMIT $1 FOR UPDATE SKIP LOCKED)) AND t.expires_at <= now() RETURNING 1) \
                     SELECT count(*) FROM d"
                )
            }),
            expire: format!(
                "UPDATE {t} AS t SET expires_at = {} WHERE t.key = $1 AND {LIVE} RETURNING true",
                expires_at(2)
            ),
            persist: format!(
                "UPDATE {t} AS t SET expires_at = NULL \
                 WHERE t.key = $1 AND t.expires_at > now() RETURNING true"
            ),
            scan_bounded: format!(
                "SELECT t.key FROM {t} AS t WHERE t.key >= $1 AND t.key < $2 AND {LIVE} \
                 ORDER BY t.key LIMIT $3"
            ),
            scan_unbounded: format!(
                "SELECT t.key FROM {t} AS t WHERE t.key >= $1 AND {LIVE} ORDER BY t.key LIMIT $2"
            ),
            delete_prefix_bounded: delete_prefix_sql(t, "s.key >= $1 AND s.key < $2", 3),
            delete_prefix_unbounded: delete_prefix_sql(t, "s.key >= $1", 2),
            // The inner SELECT walks the partial index and locks its batch, skipping rows
            // other sessions hold; the outer test re-checks expiry on the row version being
            // deleted, so a row revived meanwhile (an upsert over an expired key) survives.
            sweep: format!(
                "WITH d AS (DELETE FROM {t} AS t WHERE t.key = ANY(ARRAY(\
                   SELECT s.key FROM {t} AS s WHERE s.expires_at <= now() \
                   ORDER BY s.expires_at LIMIT $1 FOR UPDATE SKIP LOCKED)) \
                 AND t.expires_at <= now() RETURNING 1) \
                 SELECT count(*) FROM d"
            ),
            now_ms: "SELECT floor(extract(epoch FROM now()) * 1000)::bigint".to_owned(),
            rate_limit: format!(
                "SELECT {}($1::bytea[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], \
                 $6::bigint[], $7::boolean, $8::bigint)",
                table.rate_step
            ),
        }
    }
}

/// `incr` as one upsert. A missing or expired key becomes `$2` with the create TTL `$3`; a
/// live key is parsed and added to, keeping its expiry. A value outside Redis's grammar or
/// the i64 range raises `22P02` (a deliberate failing cast; the `CASE` arms are tried in
/// order, so nothing is parsed before it passed the cheaper checks) and an overflowing sum
/// raises `22003` (bigint addition). Both abort the statement, so the row is unchanged, and
/// both are raised while the row is locked, so the verdict is about the value actually seen.
///
/// The durable variant first switches `synchronous_commit` on for this transaction when the
/// session has it off, so the commit is acknowledged only once flushed.
fn incr_sql(t: &str, durable: bool, integer_re: &str) -> String {
    let exp3 = expires_at(3);
    let source = if durable {
        format!(
            "WITH durable AS (SELECT set_config('synchronous_commit', 'on', true) \
               WHERE current_setting('synchronous_commit') = 'off') \
             INSERT INTO {t} AS t (key, value, expires_at) \
             SELECT $1::bytea, convert_to($2::bigint::text, 'UTF8'), {exp3} \
             FROM (SELECT count(*) FROM durable) AS d"
        )
    } else {
        format!(
            "INSERT INTO {t} AS t (key, value, expires_at) \
             VALUES ($1::bytea, convert_to($2::bigint::text, 'UTF8'), {exp3})"
        )
    };
    let not_an_integer = "convert_to(('keel incr: the stored value is not an integer (' \
                          || octet_length(t.value) || ' bytes)')::bigint::text, 'UTF8')";
    format!(
        "{source} ON CONFLICT (key) DO UPDATE SET \
         value = CASE \
           WHEN t.expires_at <= now() THEN excluded.value \
           WHEN octet_length(t.value) > 20 THEN {not_an_integer} \
           WHEN encode(t.value, 'escape') !~ '{integer_re}' THEN {not_an_integer} \
           WHEN encode(t.value, 'escape')::numeric \
             NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN {not_an_integer} \
           ELSE convert_to((encode(t.value, 'escape')::bigint + $2::bigint)::text, 'UTF8') \
         END, \
         expires_at = CASE WHEN t.expires_at <= now() THEN excluded.expires_at \
           ELSE t.expires_at END \
         RETURNING convert_from(t.value, 'UTF8')::bigint"
    )
}

/// `incr_durable` on an unlogged table. The data table forgets everything in a crash, so the
/// counter's floor is kept in the logged fence table, written in the same statement: the new
/// value is `max(current, floor) + delta` (`floor + delta` when the row is missing, as after a
/// crash), and the floor follows it. The transaction writes a logged table with
/// `synchronous_commit` on, so it is acknowledged only once the floor is on disk: a counter
/// never returns a value at or below one it returned before, even across a crash restart.
/// The floor shares the counter's expiry, so an expired counter starts again from zero as
/// `incr` says; `delete` does not reset it (it keeps the floor).
fn incr_fenced_sql(t: &str, fence: &str, integer_re: &str) -> String {
    let exp3 = expires_at(3);
    let not_an_integer = "convert_to(('keel incr: the stored value is not an integer (' \
                          || octet_length(t.value) || ' bytes)')::bigint::text, 'UTF8')";
    let floor = format!(
        "(SELECT f.floor FROM {fence} AS f WHERE f.key = $1::bytea \
           AND (f.expires_at IS NULL OR f.expires_at > now()))"
    );
    format!(
        "WITH durable AS (SELECT set_config('synchronous_commit', 'on', true) \
           WHERE current_setting('synchronous_commit') = 'off'), \
         up AS (INSERT INTO {t} AS t (key, value, expires_at) \
           SELECT $1::bytea, convert_to((coalesce({floor}, 0) + $2::bigint)::text, 'UTF8'), {exp3} \
           FROM (SELECT count(*) FROM durable) AS d \
           ON CONFLICT (key) DO UPDATE SET \
           value = CASE \
             WHEN t.expires_at <= now() THEN excluded.value \
             WHEN octet_length(t.value) > 20 THEN {not_an_integer} \
             WHEN encode(t.value, 'escape') !~ '{integer_re}' THEN {not_an_integer} \
             WHEN encode(t.value, 'escape')::numeric \
               NOT BETWEEN -9223372036854775808 AND 9223372036854775807 THEN {not_an_integer} \
             ELSE convert_to((greatest(encode(t.value, 'escape')::bigint, \
               coalesce({floor}, encode(t.value, 'escape')::bigint)) + $2::bigint)::text, 'UTF8') \
           END, \
           expires_at = CASE WHEN t.expires_at <= now() THEN excluded.expires_at \
             ELSE t.expires_at END \
           RETURNING convert_from(t.value, 'UTF8')::bigint AS v, t.expires_at AS e), \
         kept AS (INSERT INTO {fence} AS f (key, floor, expires_at) SELECT $1::bytea, v, e FROM up \
           ON CONFLICT (key) DO UPDATE SET floor = excluded.floor, expires_at = excluded.expires_at) \
         SELECT v FROM up"
    )
}

/// One batch of `delete_prefix`: picks up to `$limit` keys in the range, deletes them, and
/// returns how many were picked (the loop goes on while batches are full) and how many of
/// the deleted rows were live (the count the caller gets).
fn delete_prefix_sql(t: &str, range: &str, limit_param: u8) -> String {
    format!(
        "WITH picked AS MATERIALIZED (\
           SELECT s.key FROM {t} AS s WHERE {range} ORDER BY s.key LIMIT ${limit_param}), \
         d AS (DELETE FROM {t} AS t WHERE t.key = ANY(ARRAY(SELECT key FROM picked)) \
           RETURNING t.expires_at) \
         SELECT (SELECT count(*) FROM picked), (SELECT count(*) FROM d AS t WHERE {})",
        fragment::LIVE
    )
}

/// Why one statement did not return rows.
enum Failure {
    Pg(tokio_postgres::Error),
    Pool(PoolError),
    Timeout,
}

/// What the backend and its sweeper share.
struct Shared {
    pool: Pool,
    sql: Sql,
    table: TableName,
    options: PostgresOptions,
    /// `host:port/database as user`, for messages (never the password).
    target: String,
    /// Server process ids of the pooled connections.
    pids: Arc<Pids>,
    /// Server processes to terminate before the next statement (see `try_query`).
    doomed: Arc<tokio::sync::Mutex<Vec<i32>>>,
    doomed_count: AtomicUsize,
    /// `server_version_num`, once connect has read it.
    server_version: AtomicI32,
    /// Sweeps that failed, and the last failure's message.
    sweep_failures: AtomicU64,
    sweep_last_error: Mutex<Option<String>>,
    /// The rate-limit step's function was missing (a schema created by an older version):
    /// steps take the default path until `ensure_schema` creates it.
    rate_step_missing: AtomicBool,
    /// Lock release notices to and from other handles (`NOTIFY`/`LISTEN`).
    notices: notice::Notices,
}

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

impl Shared {
    /// Runs one statement (prepared once per connection) within `limit`.
    ///
    /// A connection whose statement did not finish normally (past `limit`, or the caller
    /// dropped the future) is never reused: it is closed and its server process is
    /// *doomed*. Doomed processes are terminated (`pg_terminate_backend`) before any later
    /// statement of this backend runs, and, past `limit`, before this call returns. So an
    /// operation that failed or was cancelled has either taken effect already or never
    /// will: even bytes a network still holds arrive at a process that no longer exists.
    async fn try_query(
        &self,
        sql: &str,
        params: Params<'_>,
        limit: Duration,
    ) -> Result<Vec<Row>, Failure> {
        let deadline = Instant::now() + limit;
        let client = match tokio::time::timeout_at(deadline, self.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(Failure::Pool(e)),
            Err(_) => return Err(Failure::Timeout),
        };
        let mut in_flight = InFlight::new(client, self);
        let outcome = tokio::time::timeout_at(deadline, async {
            self.terminate_doomed(in_flight.client()).await?;
            let client = in_flight.client();
            let statement = client.prepare_cached(sql).await?;
            client.query(&statement, params).await
        })
        .await;
        match outcome {
            Ok(Ok(rows)) => {
                in_flight.finish();
                Ok(rows)
            }
            Ok(Err(e)) => {
                if must_reconnect(&e) {
                    in_flight.discard();
                } else {
                    in_flight.finish();
                }
                Err(Failure::Pg(e))
            }
            Err(_) => {
                // Doom the connection, then end its process now, so the statement is over
                // before the caller hears about the timeout.
                in_flight.doom();
                self.settle().await;
                Err(Failure::Timeout)
            }
        }
    }

    /// Terminates every doomed server process, on `client`, before anything else runs there.
    /// Operations arriving meanwhile wait for it: none may be acknowledged before the doomed
    /// statements are over.
    async fn terminate_doomed(&self, client: &Object) -> Result<(), tokio_postgres::Error> {
        if self.doomed_count.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        let mut doomed = self.doomed.lock().await;
        if doomed.is_empty() {
            return Ok(());
        }
        // PostgreSQL 14 and later wait (up to the given milliseconds) until the process has
        // exited; older servers only signal it.
        let sql = if self.server_version.load(Ordering::Relaxed) >= 140_000 {
            "SELECT pg_terminate_backend(p, 1000) FROM unnest($1::integer[]) AS p"
        } else {
            "SELECT pg_terminate_backend(p) FROM unnest($1::integer[]) AS p"
        };
        client.query(sql, &[&*doomed]).await?;
        doomed.clear();
        self.doomed_count.store(0, Ordering::SeqCst);
        Ok(())
    }

    /// Terminates the doomed processes on a fresh connection, bounded by the operation time
    /// limit. If the server cannot be reached they stay doomed, and the next operation
    /// terminates them before its own statement.
    async fn settle(&self) {
        let limit = self.options.op_timeout;
        let _ = tokio::time::timeout(limit, async {
            if let Ok(client) = self.pool.get().await
                && self.terminate_doomed(&client).await.is_err()
            {
                drop(Object::take(client));
            }
        })
        .await;
    }

    /// Remembers that `client`'s server process must be terminated before anything else is
    /// acknowledged.
    fn doom(&self, client: &ClientWrapper) {
        match self.pids.of(client) {
            Some(pid) => {
                // Counted first, so a caller that sees 0 cannot miss a pid being added.
                self.doomed_count.fetch_add(1, Ordering::SeqCst);
                match self.doomed.try_lock() {
                    Ok(mut doomed) => doomed.push(pid),
                    Err(_) => {
                        let doomed = Arc::clone(&self.doomed);
                        tokio::spawn(async move { doomed.lock().await.push(pid) });
                    }
                }
            }
            None => tracing::warn!(
                target: "keel::postgres",
                "a connection with a statement in flight was closed without knowing its \
                 server process; the statement ends at the server's statement_timeout"
            ),
        }
    }

    async fn query(&self, op: &'static str, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        self.try_query(sql, params, self.options.op_timeout)
            .await
            .map_err(|f| self.error(op, f))
    }

    /// Runs a statement that returns a row only when it acted (`RETURNING true`).
    async fn acted(&self, op: &'static str, sql: &str, params: Params<'_>) -> Result<bool> {
        Ok(!self.query(op, sql, params).await?.is_empty())
    }

    /// The single `bigint` of a one-row, one-column result.
    async fn scalar(&self, op: &'static str, sql: &str, params: Params<'_>) -> Result<i64> {
        let rows = self.query(op, sql, params).await?;
        let Some(row) = rows.first() else {
            return Err(Error::new(
                ErrorKind::Permanent,
                format!("postgres {op}: the statement returned no row"),
            ));
        };
        self.column(op, row, 0)
    }

    fn column<'r, T: tokio_postgres::types::FromSql<'r>>(
        &self,
        op: &'static str,
        row: &'r Row,
        idx: usize,
    ) -> Result<T> {
        row.try_get(idx).map_err(|e| self.error(op, Failure::Pg(e)))
    }

    /// Deletes up to `sweep_batch` expired rows; returns how many.
    async fn sweep_once(&self) -> Result<u64> {
        let batch = i64::from(self.options.sweep_batch);
        let mut deleted = self.scalar("sweep", &self.sql.sweep, &[&batch]).await?;
        if let Some(sweep_fence) = &self.sql.sweep_fence {
            deleted = deleted.max(self.scalar("sweep", sweep_fence, &[&batch]).await?);
        }
        Ok(u64::try_from(deleted).unwrap_or(0))
    }

    fn error(&self, op: &'static str, failure: Failure) -> Error {
        match failure {
            Failure::Timeout => Error::new(
                ErrorKind::Timeout,
                format!(
                    "postgres {op} did not finish within {} ms; it may or may not have taken \
                     effect, but it will not take effect after this error (raise op_timeout \
                     if the server is just slow)",
                    self.options.op_timeout.as_millis()
                ),
            ),
            Failure::Pool(PoolError::Backend(e)) => self.pg_error(op, e),
            Failure::Pool(PoolError::Timeout(_)) => Error::new(
                ErrorKind::Timeout,
                format!(
                    "postgres {op}: timed out waiting for a connection to {}",
                    self.target
                ),
            ),
            Failure::Pool(e) => Error::new(
                ErrorKind::Permanent,
                format!("postgres {op}: the connection pool failed"),
            )
            .with_source(e),
            Failure::Pg(e) => self.pg_error(op, e),
        }
    }

    fn pg_error(&self, op: &'static str, e: tokio_postgres::Error) -> Error {
        let message = match e.as_db_error() {
            Some(db) if *db.code() == SqlState::UNDEFINED_TABLE => format!(
                "postgres {op}: table {} does not exist; call ensure_schema() once, or create \
                 it as the module documentation shows ({})",
                self.table.quoted,
                detail(&e)
            ),
            Some(_) => format!("postgres {op} failed ({})", detail(&e)),
            None => format!(
                "postgres {op} failed talking to {} ({})",
                self.target,
                detail(&e)
            ),
        };
        Error::new(classify(&e), message).with_source(e)
    }
}

/// The server process id of each pooled connection (learned when the pool opens it), so a
/// connection abandoned mid-statement can be terminated from another one. Keyed by the
/// connection's statement cache, which lives exactly as long as the connection.
#[derive(Default)]
struct Pids(std::sync::Mutex<Vec<(Weak<StatementCache>, i32)>>);

impl Pids {
    fn insert(&self, client: &ClientWrapper, pid: i32) {
        let mut pids = self.0.lock().unwrap_or_else(|p| p.into_inner());
        pids.retain(|(cache, _)| cache.strong_count() > 0);
        pids.push((Arc::downgrade(&client.statement_cache), pid));
    }

    fn of(&self, client: &ClientWrapper) -> Option<i32> {
        let pids = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let key = Arc::downgrade(&client.statement_cache);
        pids.iter()
            .find(|(cache, _)| cache.ptr_eq(&key))
            .map(|(_, pid)| *pid)
    }
}

/// A pooled connection with a statement possibly in flight. Dropped while still holding it
/// (the caller dropped the operation's future), it dooms the connection: taken out of the
/// pool, closed, and its server process terminated before any later statement runs. A busy
/// connection is never handed to another operation.
struct InFlight<'a> {
    client: Option<Object>,
    shared: &'a Shared,
}

impl<'a> InFlight<'a> {
    fn new(client: Object, shared: &'a Shared) -> InFlight<'a> {
        InFlight {
            client: Some(client),
            shared,
        }
    }

    fn client(&self) -> &Object {
        // Present until finish, discard or doom consume it, and none of them runs while the
        // statement future borrows it.
        self.client
            .as_ref()
            .expect("the connection is held until the statement is over")
    }

    /// The statement finished: the connection goes back to the pool.
    fn finish(&mut self) {
        self.client = None;
    }

    /// The statement finished, but the connection must not be reused (failover, shutdown):
    /// it is closed, so the pool opens a fresh one.
    fn discard(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }

    /// The statement may still be running: close the connection and doom its process.
    fn doom(&mut self) {
        if let Some(client) = self.client.take() {
            let client = Object::take(client);
            self.shared.doom(&client);
            drop(client);
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.doom();
    }
}

/// Errors after which the connection must not be reused: the server is shutting down or
/// starting (`57P01`-`57P03`), or it is a read-only standby (`25006`: a failover demoted it,
/// and a new connection through the same address reaches the new primary), or the connection
/// itself is gone.
fn must_reconnect(e: &tokio_postgres::Error) -> bool {
    e.is_closed()
        || matches!(
            e.code().map(SqlState::code),
            Some("57P01" | "57P02" | "57P03" | "25006")
        )
}

/// What went wrong, beyond the client's one-line summary (which the error's source shows):
/// the server's message and SQLSTATE, or the chain of causes (e.g. "Connection refused").
fn detail(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{}: {}", db.code().code(), db.message());
    }
    let mut causes = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        causes.push(s.to_string());
        source = s.source();
    }
    if causes.is_empty() {
        e.to_string()
    } else {
        causes.join(": ")
    }
}

/// Retry advice for a client or server error.
fn classify(e: &tokio_postgres::Error) -> ErrorKind {
    if let Some(code) = e.code() {
        return classify_code(code.code());
    }
    // Not from the server: connection refused, reset or closed, TLS or protocol trouble. The
    // next connection may work, so it is transient, unless it is a timeout: an I/O timeout,
    // or the client's own connect timeout (which it reports only in its message).
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return ErrorKind::Timeout;
        }
        source = s.source();
    }
    if e.to_string().contains("timeout") {
        ErrorKind::Timeout
    } else {
        ErrorKind::Transient
    }
}

/// Retry advice for a SQLSTATE.
fn classify_code(code: &str) -> ErrorKind {
    match code {
        // query_canceled (statement_timeout, or our cancel), lock_not_available (lock_timeout).
        "57014" | "55P03" => ErrorKind::Timeout,
        // serialization_failure, deadlock_detected: the standard advice is to retry.
        "40001" | "40P01" => ErrorKind::Transient,
        // admin_shutdown, crash_shutdown, cannot_connect_now (starting up, or recovering).
        "57P01" | "57P02" | "57P03" => ErrorKind::Transient,
        // read_only_sql_transaction: usually a failover left us on a standby.
        "25006" => ErrorKind::Transient,
        // Connection exceptions; insufficient resources (too many connections, disk full,
        // out of memory); system errors (I/O).
        c if c.starts_with("08") || c.starts_with("53") || c.starts_with("58") => {
            ErrorKind::Transient
        }
        // Everything else will not pass by retrying: authentication (28), undefined objects
        // and syntax (42), data exceptions (22), missing database (3D), internal errors.
        _ => ErrorKind::Permanent,
    }
}

/// `host:port/database as user`, for messages.
fn describe(config: &tokio_postgres::Config) -> String {
    let ports = config.get_ports();
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let host = match host {
                Host::Tcp(name) => name.clone(),
                #[cfg(unix)]
                Host::Unix(path) => path.display().to_string(),
            };
            // One port applies to every host; otherwise there is one per host.
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    let hosts = if hosts.is_empty() {
        "localhost:5432".to_owned()
    } else {
        hosts.join(",")
    };
    format!(
        "{hosts}/{} as {}",
        config.get_dbname().or(config.get_user()).unwrap_or("?"),
        config.get_user().unwrap_or("?")
    )
}

/// The keel [`Backend`] on a PostgreSQL table. Create it with [`PostgresBackend::connect`]
/// or [`PostgresBackend::connect_with`], then call [`PostgresBackend::ensure_schema`] once
/// (or create the table yourself). Dropping it stops the sweeper and closes the pool.
pub struct PostgresBackend {
    shared: Arc<Shared>,
    sweeper: JoinHandle<()>,
}

impl std::fmt::Debug for PostgresBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresBackend")
            .field("target", &self.shared.target)
            .field("table", &self.shared.table.quoted)
            .field("options", &self.shared.options)
            .finish()
    }
}

impl Drop for PostgresBackend {
    fn drop(&mut self) {
        self.sweeper.abort();
    }
}

impl PostgresBackend {
    /// Connects with [`PostgresOptions::default`]. `url` is a libpq-style URL or key/value
    /// string, e.g. `postgres://user:password@host:5432/database`.
    ///
    /// # Errors
    /// As [`PostgresBackend::connect_with`].
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with(url, PostgresOptions::default()).await
    }

    /// Connects, checks the server with one query, and starts the sweeper. Does not touch
    /// the schema: call [`PostgresBackend::ensure_schema`] for that. Must be called within a
    /// Tokio runtime (the pool and the sweeper run on it).
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`] for invalid options, an unparsable URL, an unknown
    /// `sslmode` or an unreadable `sslrootcert`; [`ErrorKind::Transient`] if the server cannot be reached (the message
    /// names the host, port, database and user); [`ErrorKind::Timeout`] if it does not answer
    /// within [`PostgresOptions::op_timeout`]; [`ErrorKind::Permanent`] for failed
    /// authentication, a missing database or a server older than PostgreSQL 12.
    pub async fn connect_with(url: &str, options: PostgresOptions) -> Result<Self> {
        let table = options.validate()?;
        let (url, tls) = tls::split(url)?;
        let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
            Error::new(
                ErrorKind::InvalidInput,
                "invalid postgres URL; expected e.g. postgres://user:password@host:5432/database",
            )
            .with_source(e)
        })?;
        config.ssl_mode(tls.ssl_mode());
        let tls_config = tls.client_config()?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(options.op_timeout);
        }
        // The server gives up on a statement before the client does, so an operation that
        // times out has normally been ended by the server already (see `Shared::try_query`
        // for the rest), and a write can never wait for a row lock long after its caller left.
        let server_ms = server_timeout(options.op_timeout).as_millis();
        let session = format!("-c statement_timeout={server_ms} -c lock_timeout={server_ms}");
        let session = match config.get_options() {
            Some(existing) if !existing.is_empty() => format!("{existing} {session}"),
            _ => session,
        };
        config.options(&session);
        // Keepalive probes find a connection that a NAT or load balancer dropped silently.
        config.keepalives(true);
        config.keepalives_idle(KEEPALIVE_IDLE);
        if config.get_application_name().is_none() {
            config.application_name("keel");
        }
        let target = describe(&config);
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let notices = notice::Notices::new(&table.quoted, config.clone(), tls_config.clone());
        let manager = match tls_config {
            None => Manager::from_config(config, NoTls, manager_config),
            Some(tls_config) => Manager::from_config(
                config,
                tokio_postgres_rustls::MakeRustlsConnect::new(tls_config),
                manager_config,
            ),
        };
        let pids = Arc::new(Pids::default());
        let learn = Arc::clone(&pids);
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .runtime(Runtime::Tokio1)
            .post_create(Hook::async_fn(move |client, _| {
                let pids = Arc::clone(&learn);
                Box::pin(async move {
                    let row = client
                        .query_one("SELECT pg_backend_pid()", &[])
                        .await
                        .map_err(HookError::Backend)?;
                    pids.insert(client, row.get(0));
                    Ok(())
                })
            }))
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Permanent,
                    "could not build the postgres connection pool",
                )
                .with_source(e)
            })?;
        let shared = Arc::new(Shared {
            sql: Sql::new(&table, options.durability),
            pool,
            table,
            options,
            target,
            pids,
            doomed: Arc::default(),
            doomed_count: AtomicUsize::new(0),
            server_version: AtomicI32::new(0),
            sweep_failures: AtomicU64::new(0),
            sweep_last_error: Mutex::new(None),
            rate_step_missing: AtomicBool::new(false),
            notices,
        });
        check_server(&shared).await?;
        let sweeper = tokio::spawn(sweep_forever(
            Arc::downgrade(&shared),
            shared.options.sweep_interval,
            u64::from(shared.options.sweep_batch),
        ));
        Ok(PostgresBackend { shared, sweeper })
    }

    /// Creates the table and the sweeper's index if they are missing (safe to call from
    /// several processes at once), then checks that an existing table's durability matches
    /// [`PostgresOptions::durability`]. Never alters or drops anything.
    ///
    /// # Errors
    /// [`ErrorKind::Permanent`] if the role may not create the table, or the table exists
    /// with the other durability (the message gives the `ALTER TABLE` that fixes it); as for
    /// any operation on connection trouble. It may take up to a minute (or `op_timeout`, if
    /// longer) when it builds the index on a large existing table.
    pub async fn ensure_schema(&self) -> Result<()> {
        let shared = &self.shared;
        let t = &shared.table;
        let unlogged = match shared.options.durability {
            TableDurability::Logged => "",
            TableDurability::Unlogged => "UNLOGGED ",
        };
        // One simple-protocol message with several statements runs as one transaction, so the
        // advisory lock is held until the schema is committed.
        let limit = shared.options.op_timeout.max(SCHEMA_TIMEOUT_MIN);
        let server_ms = server_timeout(limit).as_millis();
        // An unlogged table's counters keep their floor in a logged table (see
        // `TableDurability::Unlogged`).
        let fence_ddl = match shared.options.durability {
            TableDurability::Logged => String::new(),
            TableDurability::Unlogged => format!(
                " CREATE TABLE IF NOT EXISTS {} (key bytea PRIMARY KEY, floor bigint NOT NULL, \
                   expires_at timestamptz NULL);",
                t.fence
            ),
        };
        let ddl = format!(
            "SET LOCAL statement_timeout = {server_ms}; SET LOCAL lock_timeout = {server_ms}; \
             SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY}); \
             CREATE {unlogged}TABLE IF NOT EXISTS {table} (\
               key bytea PRIMARY KEY, value bytea NOT NULL, expires_at timestamptz NULL); \
             CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at) \
               WHERE expires_at IS NOT NULL;{fence_ddl} {rate_ddl}",
            table = t.quoted,
            index = t.index,
            rate_ddl = rate_limit_ddl(t),
        );
        let deadline = Instant::now() + limit;
        let client = match tokio::time::timeout_at(deadline, shared.pool.get()).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => return Err(shared.error("ensure_schema", Failure::Pool(e))),
            Err(_) => return Err(shared.error("ensure_schema", Failure::Timeout)),
        };
        match tokio::time::timeout_at(deadline, client.batch_execute(&ddl)).await {
            Ok(result) => result.map_err(|e| shared.pg_error("ensure_schema", e))?,
            Err(_) => {
                let client = Object::take(client);
                shared.doom(&client);
                drop(client);
                shared.settle().await;
                return Err(shared.error("ensure_schema", Failure::Timeout));
            }
        }
        drop(client);
        shared.rate_step_missing.store(false, Ordering::Relaxed);
        // The quoted name is made of identifier characters and double quotes only, so it
        // can be passed as text to to_regclass.
        let rows = shared
            .query(
                "ensure_schema",
                "SELECT c.relpersistence = 'u' FROM pg_class AS c WHERE c.oid = to_regclass($1)",
                &[&t.quoted],
            )
            .await?;
        let Some(row) = rows.first() else {
            return Err(Error::new(
                ErrorKind::Permanent,
                format!(
                    "postgres ensure_schema: table {} is not visible after creating it",
                    t.quoted
                ),
            ));
        };
        let is_unlogged: bool = shared.column("ensure_schema", row, 0)?;
        let wanted_unlogged = shared.options.durability == TableDurability::Unlogged;
        if is_unlogged != wanted_unlogged {
            let (is, fix) = if is_unlogged {
                ("UNLOGGED", "SET LOGGED")
            } else {
                ("logged", "SET UNLOGGED")
            };
            return Err(Error::new(
                ErrorKind::Permanent,
                format!(
                    "postgres table {table} exists and is {is}, but the options ask for {:?}; \
                     run ALTER TABLE {table} {fix} (it rewrites the table), or change \
                     PostgresOptions::durability",
                    shared.options.durability,
                    table = t.quoted,
                ),
            ));
        }
        Ok(())
    }

    /// Deletes up to [`PostgresOptions::sweep_batch`] expired rows now, as the background
    /// sweeper does each round; returns how many. Useful after a bulk expiry, or in tests.
    ///
    /// # Errors
    /// As for any operation: connection trouble, a timeout, a missing table.
    pub async fn sweep_once(&self) -> Result<u64> {
        self.shared.sweep_once().await
    }

    /// How many background sweeps have failed since connect, and the last failure's message.
    /// Each failure is also logged as a `tracing` warning (target `keel::postgres`). Failing
    /// sweeps do not break the contract (expired rows stay invisible) but let the table grow:
    /// a role without `DELETE` on the table, for example, shows up here.
    pub fn sweep_failures(&self) -> (u64, Option<String>) {
        let last = self
            .shared
            .sweep_last_error
            .lock()
            .map(|l| l.clone())
            .unwrap_or(None);
        (self.shared.sweep_failures.load(Ordering::Relaxed), last)
    }

    /// The options this backend was created with.
    pub fn options(&self) -> &PostgresOptions {
        &self.shared.options
    }

    async fn incr_with(
        &self,
        sql: &str,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        let ttl = ttl_param(ttl_on_create)?;
        check_key(key)?;
        let shared = &self.shared;
        match shared
            .try_query(sql, &[&key, &delta, &ttl], shared.options.op_timeout)
            .await
        {
            Ok(rows) => {
                let Some(row) = rows.first() else {
                    return Err(Error::new(
                        ErrorKind::Permanent,
                        "postgres incr: the upsert returned no row",
                    ));
                };
                shared.column("incr", row, 0)
            }
            // The statement raises these two only from its value checks (see incr_sql).
            Err(Failure::Pg(e)) if e.code() == Some(&SqlState::INVALID_TEXT_REPRESENTATION) => {
                Err(not_an_integer())
            }
            Err(Failure::Pg(e)) if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                Err(overflow())
            }
            Err(failure) => Err(shared.error("incr", failure)),
        }
    }

    /// One page of keys in `[start, prefix_successor)`.
    async fn scan_page(&self, prefix: &[u8], start: &[u8], limit: i64) -> Result<Vec<Row>> {
        let sql = &self.shared.sql;
        match prefix_successor(prefix) {
            Some(end) => {
                self.shared
                    .query("scan", &sql.scan_bounded, &[&start, &end, &limit])
                    .await
            }
            None => {
                self.shared
                    .query("scan", &sql.scan_unbounded, &[&start, &limit])
                    .await
            }
        }
    }
}

/// Checks that the server answers and is recent enough.
async fn check_server(shared: &Shared) -> Result<()> {
    let rows = shared
        .try_query(
            "SELECT current_setting('server_version_num')::integer",
            &[],
            shared.options.op_timeout,
        )
        .await
        .map_err(|failure| {
            let advice = "check that the server is running and that the URL's host, port, \
                          database, user and password are right";
            let target = &shared.target;
            match failure {
                Failure::Pg(e) | Failure::Pool(PoolError::Backend(e)) => Error::new(
                    classify(&e),
                    format!(
                        "could not connect to postgres at {target} ({}); {advice}",
                        detail(&e)
                    ),
                )
                .with_source(e),
                Failure::Timeout => Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "could not connect to postgres at {target}: no answer within {} ms; \
                         {advice}",
                        shared.options.op_timeout.as_millis()
                    ),
                ),
                other => shared.error("connect", other),
            }
        })?;
    let version: i32 = match rows.first() {
        Some(row) => shared.column("connect", row, 0)?,
        None => 0,
    };
    shared.server_version.store(version, Ordering::Relaxed);
    if version < SERVER_VERSION_MIN {
        return Err(Error::new(
            ErrorKind::Permanent,
            format!(
                "postgres at {} is version {version}; keel needs PostgreSQL 12 or later",
                shared.target
            ),
        ));
    }
    Ok(())
}

/// The sweeper: every `interval`, deletes expired rows in batches until a batch comes back
/// short. Holds only a weak reference between rounds, and ends once the backend is gone
/// (the backend also aborts it on drop).
async fn sweep_forever(shared: Weak<Shared>, interval: Duration, batch: u64) {
    let mut ticks = tokio::time::interval_at(Instant::now() + interval, interval);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        // An error (server down, table not created yet, a role without DELETE) ends this
        // round and is reported; the next tick tries again.
        loop {
            match shared.sweep_once().await {
                Ok(deleted) if deleted < batch => break,
                Ok(_) => {}
                Err(e) => {
                    shared.sweep_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        target: "keel::postgres",
                        table = %shared.table.quoted,
                        error = %e,
                        "sweeping expired rows failed; they stay (invisible) until a sweep succeeds"
                    );
                    if let Ok(mut last) = shared.sweep_last_error.lock() {
                        *last = Some(e.to_string());
                    }
                    break;
                }
            }
        }
    }
}

/// A TTL as the nullable milliseconds parameter the statements take.
fn ttl_param(ttl: Option<Duration>) -> Result<Option<i64>> {
    // ttl_ms caps TTLs at TTL_MAX (ten years, about 3.2e11 ms), far inside i64.
    ttl.map(|t| ttl_ms(t).map(|ms| i64::try_from(ms).unwrap_or(i64::MAX)))
        .transpose()
}

/// A remaining TTL read back from the server. It is at least 1 ms for a live key; the floor
/// only guards against a server clock step between the two readings of one statement.
fn remaining(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms).unwrap_or(0).max(1))
}

#[async_trait]
impl Backend for PostgresBackend {
    fn name(&self) -> &str {
        "postgres"
    }

    async fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        check_key(key)?;
        let rows = self
            .shared
            .query("get", &self.shared.sql.get, &[&key])
            .await?;
        match rows.first() {
            Some(row) => Ok(Some(self.shared.column("get", row, 0)?)),
            None => Ok(None),
        }
    }

    async fn get_with_ttl(&self, key: &[u8]) -> Result<Option<(Vec<u8>, Option<Duration>)>> {
        check_key(key)?;
        let shared = &self.shared;
        let rows = shared
            .query("get_with_ttl", &shared.sql.get_with_ttl, &[&key])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let value: Vec<u8> = shared.column("get_with_ttl", row, 0)?;
        let ttl: Option<i64> = shared.column("get_with_ttl", row, 1)?;
        Ok(Some((value, ttl.map(remaining))))
    }

    async fn set(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<()> {
        let ttl = ttl_param(ttl)?;
        check_key(key)?;
        check_value(value)?;
        self.shared
            .query("set", &self.shared.sql.set, &[&key, &value, &ttl])
            .await
            .map(drop)
    }

    async fn set_nx(&self, key: &[u8], value: &[u8], ttl: Option<Duration>) -> Result<bool> {
        let ttl = ttl_param(ttl)?;
        check_key(key)?;
        check_value(value)?;
        self.shared
            .acted("set_nx", &self.shared.sql.set_nx, &[&key, &value, &ttl])
            .await
    }

    async fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: &[u8],
        ttl: TtlPolicy,
    ) -> Result<bool> {
        let (keep, ttl) = match ttl {
            TtlPolicy::Keep => (true, None),
            TtlPolicy::Set(t) => (false, ttl_param(Some(t))?),
            TtlPolicy::Clear => (false, None),
        };
        check_key(key)?;
        check_value(new)?;
        let sql = &self.shared.sql;
        match expected {
            // Absent or expired: create it. Keep on a key that was absent means no expiry.
            None => {
                self.shared
                    .acted("compare_and_swap", &sql.set_nx, &[&key, &new, &ttl])
                    .await
            }
            // No stored value can be longer than the limit.
            Some(expected) if expected.len() > VALUE_BYTES_MAX => Ok(false),
            Some(expected) => {
                self.shared
                    .acted(
                        "compare_and_swap",
                        &sql.cas_expected,
                        &[&key, &new, &keep, &ttl, &expected],
                    )
                    .await
            }
        }
    }

    async fn compare_and_delete(&self, key: &[u8], expected: &[u8]) -> Result<bool> {
        check_key(key)?;
        if expected.len() > VALUE_BYTES_MAX {
            return Ok(false);
        }
        let sql = &self.shared.sql.compare_and_delete;
        self.shared
            .acted("compare_and_delete", sql, &[&key, &expected])
            .await
    }

    async fn delete(&self, key: &[u8]) -> Result<bool> {
        check_key(key)?;
        let live = self
            .shared
            .scalar("delete", &self.shared.sql.delete, &[&key])
            .await?;
        Ok(live > 0)
    }

    async fn incr(&self, key: &[u8], delta: i64, ttl_on_create: Option<Duration>) -> Result<i64> {
        self.incr_with(&self.shared.sql.incr, key, delta, ttl_on_create)
            .await
    }

    async fn publish_release(&self, key: &[u8]) -> Result<()> {
        check_key(key)?;
        let channel = self.shared.notices.channel();
        let payload = self.shared.notices.payload(key);
        self.shared
            .query(
                "publish_release",
                "SELECT pg_notify($1, $2)",
                &[&channel, &payload],
            )
            .await?;
        Ok(())
    }

    fn release_notices(&self) -> Option<ReleaseNotices> {
        self.shared.notices.receiver()
    }

    /// As `incr`, but committed with `synchronous_commit` on even when the session's default
    /// is off, so the result is acknowledged only once flushed to the server's disk.
    async fn incr_durable(
        &self,
        key: &[u8],
        delta: i64,
        ttl_on_create: Option<Duration>,
    ) -> Result<i64> {
        self.incr_with(&self.shared.sql.incr_durable, key, delta, ttl_on_create)
            .await
    }

    async fn expire(&self, key: &[u8], ttl: Duration) -> Result<bool> {
        let ttl = ttl_param(Some(ttl))?;
        check_key(key)?;
        self.shared
            .acted("expire", &self.shared.sql.expire, &[&key, &ttl])
            .await
    }

    async fn persist(&self, key: &[u8]) -> Result<bool> {
        check_key(key)?;
        self.shared
            .acted("persist", &self.shared.sql.persist, &[&key])
            .await
    }

    async fn ttl(&self, key: &[u8]) -> Result<Ttl> {
        check_key(key)?;
        let rows = self
            .shared
            .query("ttl", &self.shared.sql.ttl, &[&key])
            .await?;
        let Some(row) = rows.first() else {
            return Ok(Ttl::Missing);
        };
        let ms: Option<i64> = self.shared.column("ttl", row, 0)?;
        Ok(match ms {
            None => Ttl::NoExpiry,
            Some(ms) => Ttl::Remaining(remaining(ms)),
        })
    }

    /// Keyset pagination in key order: each page continues strictly after the last key of
    /// the previous one, so every key present for the whole scan is returned exactly once.
    async fn scan(
        &self,
        prefix: &[u8],
        cursor: Option<&ScanCursor>,
        limit: usize,
    ) -> Result<ScanPage> {
        if prefix.len() > KEY_BYTES_MAX {
            return Ok(ScanPage::default());
        }
        let limit = limit.clamp(1, SCAN_LIMIT_MAX);
        let start = scan_start(prefix, cursor);
        let rows = self
            .scan_page(prefix, &start, i64::try_from(limit).unwrap_or(i64::MAX))
            .await?;
        let keys = rows
            .iter()
            .map(|row| self.shared.column::<Vec<u8>>("scan", row, 0))
            .collect::<Result<Vec<_>>>()?;
        let next = match keys.last() {
            Some(last) if keys.len() == limit => Some(ScanCursor(last.clone())),
            _ => None,
        };
        Ok(ScanPage { keys, next })
    }

    /// One statement calling the table's `rate_limit` function (created by `ensure_schema`):
    /// the rules' rows read, decided in exact `numeric` arithmetic and written in the
    /// statement's transaction, serialized per key by transaction-scoped advisory locks, at
    /// the server's clock. A schema from an older version without the function takes the
    /// default step (with a warning) until `ensure_schema` runs.
    async fn rate_limit(
        &self,
        rules: &[RateRule<'_>],
        mode: RateMode,
        at_ms: Option<u64>,
    ) -> Result<RateOutcome> {
        rate::validate(rules)?;
        for rule in rules {
            check_key(rule.key)?;
        }
        let shared = &self.shared;
        if shared.rate_step_missing.load(Ordering::Relaxed) {
            return rate::rate_limit_cas(self, rules, mode, at_ms).await;
        }
        let int = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let keys: Vec<&[u8]> = rules.iter().map(|r| r.key).collect();
        let algos: Vec<&str> = rules.iter().map(|r| r.algorithm.code()).collect();
        let limits: Vec<i64> = rules.iter().map(|r| int(r.limit)).collect();
        let periods: Vec<i64> = rules.iter().map(|r| int(r.period_ms)).collect();
        let bursts: Vec<i64> = rules.iter().map(|r| int(r.burst)).collect();
        let costs: Vec<i64> = rules.iter().map(|r| int(r.cost)).collect();
        let consume = mode == RateMode::Consume;
        let at = at_ms.map(int);
        let rows = shared
            .try_query(
                &shared.sql.rate_limit,
                &[
                    &keys, &algos, &limits, &periods, &bursts, &costs, &consume, &at,
                ],
                shared.options.op_timeout,
            )
            .await;
        let rows = match rows {
            Ok(rows) => rows,
            Err(Failure::Pg(e))
                if e.as_db_error()
                    .is_some_and(|db| *db.code() == SqlState::UNDEFINED_FUNCTION) =>
            {
                tracing::warn!(
                    target: "keel::postgres",
                    "the rate-limit function {} is missing (the schema predates it); rate \
                     limits take the slower compare-and-swap path until ensure_schema() runs",
                    shared.table.rate_step
                );
                shared.rate_step_missing.store(true, Ordering::Relaxed);
                return rate::rate_limit_cas(self, rules, mode, at_ms).await;
            }
            Err(f) => return Err(shared.error("rate_limit", f)),
        };
        let reply: Vec<i64> = match rows.first() {
            Some(row) => shared.column("rate_limit", row, 0)?,
            None => Vec::new(),
        };
        rate_reply(&reply, rules.len())
    }

    async fn now_ms(&self) -> Result<u64> {
        let ms = self
            .shared
            .scalar("now_ms", &self.shared.sql.now_ms, &[])
            .await?;
        u64::try_from(ms).map_err(|_| {
            Error::new(
                ErrorKind::Permanent,
                format!("postgres now_ms: the server clock reads {ms} ms, before 1970"),
            )
        })
    }

    /// Deletes in batches of up to 1,000 keys, one statement each, instead of one statement
    /// per key.
    async fn delete_prefix(&self, prefix: &[u8]) -> Result<u64> {
        if prefix.len() > KEY_BYTES_MAX {
            return Ok(0);
        }
        let shared = &self.shared;
        let successor = prefix_successor(prefix);
        let mut deleted = 0u64;
        loop {
            let rows = match &successor {
                Some(end) => {
                    shared
                        .query(
                            "delete_prefix",
                            &shared.sql.delete_prefix_bounded,
                            &[&prefix, end, &DELETE_PREFIX_BATCH],
                        )
                        .await?
                }
                None => {
                    shared
                        .query(
                            "delete_prefix",
                            &shared.sql.delete_prefix_unbounded,
                            &[&prefix, &DELETE_PREFIX_BATCH],
                        )
                        .await?
                }
            };
            let Some(row) = rows.first() else {
                return Ok(deleted);
            };
            let picked: i64 = shared.column("delete_prefix", row, 0)?;
            let live: i64 = shared.column("delete_prefix", row, 1)?;
            deleted += u64::try_from(live).unwrap_or(0);
            if picked < DELETE_PREFIX_BATCH {
                return Ok(deleted);
            }
        }
    }
}

/// Reads the native step's reply (see [`rate::decode_reply`]).
fn rate_reply(reply: &[i64], rules: usize) -> Result<RateOutcome> {
    rate::decode_reply(reply, rules).ok_or_else(|| {
        Error::new(
            ErrorKind::Permanent,
            format!(
                "postgres rate_limit: the function answered {reply:?} for {rules} rules; \
                 run ensure_schema() to replace it with this version's"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_successor_bounds_exactly_the_prefixed_keys() {
        assert_eq!(prefix_successor(b""), None);
        assert_eq!(prefix_successor(b"\xff"), None);
        assert_eq!(prefix_successor(b"\xff\xff\xff"), None);
        assert_eq!(prefix_successor(b"a"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"a\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"a\xff\xff"), Some(b"b".to_vec()));
        assert_eq!(prefix_successor(b"a\x00"), Some(b"a\x01".to_vec()));
        assert_eq!(prefix_successor(b"ab\xfe"), Some(b"ab\xff".to_vec()));
        assert_eq!(prefix_successor(b"\xfe\xff"), Some(b"\xff".to_vec()));
        // Exhaustively over a small alphabet with the edge bytes: a key is in
        // [prefix, successor) if and only if it starts with the prefix.
        let alphabet = [0x00u8, 0x01, 0x7f, 0xfe, 0xff];
        let mut strings: Vec<Vec<u8>> = vec![Vec::new()];
        for len in 1..=3 {
            let mut next = Vec::new();
            for s in strings.iter().filter(|s| s.len() == len - 1) {
                for &b in &alphabet {
                    let mut t = s.clone();
                    t.push(b);
                    next.push(t);
                }
            }
            strings.extend(next);
        }
        for prefix in &strings {
            let end = prefix_successor(prefix);
            for key in &strings {
                let in_range = key >= prefix && end.as_ref().is_none_or(|e| key < e);
                assert_eq!(
                    in_range,
                    key.starts_with(prefix),
                    "prefix {prefix:?} key {key:?}"
                );
            }
        }
    }

    #[test]
    fn scan_starts_strictly_after_the_cursor_and_never_before_the_prefix() {
        assert_eq!(scan_start(b"p/", None), b"p/".to_vec());
        let cursor = ScanCursor(b"p/17".to_vec());
        assert_eq!(scan_start(b"p/", Some(&cursor)), b"p/17\x00".to_vec());
        let before = ScanCursor(b"a".to_vec());
        assert_eq!(scan_start(b"p/", Some(&before)), b"p/".to_vec());
        let max = ScanCursor(vec![0xff; KEY_BYTES_MAX]);
        let start = scan_start(b"", Some(&max));
        assert!(start.as_slice() > max.0.as_slice());
    }

    #[test]
    fn table_names_are_validated_and_quoted() {
        let quoted = |name: &str| TableName::parse(name).map(|t| (t.quoted, t.index));
        assert_eq!(
            quoted("keel_kv").ok(),
            Some((
                "\"keel_kv\"".to_owned(),
                "\"keel_kv_expires_at_idx\"".to_owned()
            ))
        );
        assert_eq!(
            quoted("app.Cache2").ok(),
            Some((
                "\"app\".\"Cache2\"".to_owned(),
                "\"Cache2_expires_at_idx\"".to_owned()
            ))
        );
        assert!(quoted("_x").is_ok());
        assert!(quoted(&"t".repeat(TABLE_NAME_BYTES_MAX)).is_ok());
        assert!(quoted(&format!("{}.t", "s".repeat(IDENTIFIER_BYTES_MAX))).is_ok());
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "a\"b",
            "x;DROP TABLE y",
            "a.b.c",
            ".a",
            "a.",
            "tablé",
            "a'b",
            "a\0b",
            &"t".repeat(TABLE_NAME_BYTES_MAX + 1),
            &format!("{}.t", "s".repeat(IDENTIFIER_BYTES_MAX + 1)),
        ] {
            let err = quoted(bad).expect_err(bad);
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn sqlstates_are_classified_for_retry() {
        assert_eq!(classify_code("40001"), ErrorKind::Transient);
        assert_eq!(classify_code("40P01"), ErrorKind::Transient);
        assert_eq!(classify_code("57P01"), ErrorKind::Transient);
        assert_eq!(classify_code("08006"), ErrorKind::Transient);
        assert_eq!(classify_code("53300"), ErrorKind::Transient);
        assert_eq!(classify_code("57014"), ErrorKind::Timeout);
        assert_eq!(classify_code("42P01"), ErrorKind::Permanent);
        assert_eq!(classify_code("42601"), ErrorKind::Permanent);
        assert_eq!(classify_code("28P01"), ErrorKind::Permanent);
        assert_eq!(classify_code("3D000"), ErrorKind::Permanent);
    }

    #[tokio::test]
    async fn invalid_options_and_urls_are_refused_before_connecting() {
        let url = "postgres://postgres@127.0.0.1:1/test";
        let bad = [
            PostgresOptions {
                pool_size: 0,
                ..PostgresOptions::default()
            },
            PostgresOptions {
                sweep_batch: 0,
                ..PostgresOptions::default()
            },
            PostgresOptions {
                sweep_batch: SWEEP_BATCH_MAX + 1,
                ..PostgresOptions::default()
            },
            PostgresOptions {
                sweep_interval: Duration::ZERO,
                ..PostgresOptions::default()
            },
            PostgresOptions {
                op_timeout: Duration::ZERO,
                ..PostgresOptions::default()
            },
            PostgresOptions {
                table: "no spaces".to_owned(),
                ..PostgresOptions::default()
            },
        ];
        for options in bad {
            let err = PostgresBackend::connect_with(url, options.clone())
                .await
                .expect_err("invalid options");
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{options:?}: {err}");
        }
        for url in [
            "postgres://host:notaport/db",
            "postgres://h/db?sslmode=bogus",
            "postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        ] {
            let err = PostgresBackend::connect(url).await.expect_err(url);
            assert_eq!(err.kind(), ErrorKind::InvalidInput, "{url}: {err}");
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_a_clear_transient_error() {
        // Port 1 (tcpmux) is essentially never served, so the connection is refused at once.
        let err = PostgresBackend::connect("postgres://keel@127.0.0.1:1/nowhere")
            .await
            .expect_err("nothing listens on port 1");
        assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
        let text = err.to_string();
        assert!(
            text.contains("could not connect to postgres at 127.0.0.1:1/nowhere"),
            "{text}"
        );
    }

    /// Tests against a real server, from the same variable as the conformance suite.
    mod server {
        use super::*;

        fn url() -> String {
            match std::env::var("KEEL_TEST_POSTGRES_URL") {
                Ok(url) if !url.is_empty() => url,
                _ => panic!(
                    "KEEL_TEST_POSTGRES_URL is not set, so the postgres adapter's server tests \
                     cannot run; set it to a server you may create tables on, e.g. \
                     postgres://postgres@127.0.0.1:5432/test"
                ),
            }
        }

        /// A table name no other test or run uses.
        pub(super) fn table(purpose: &str) -> String {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!(
                "keel_test_{purpose}_{}_{:x}",
                std::process::id(),
                nanos as u64
            )
        }

        async fn backend(options: PostgresOptions) -> PostgresBackend {
            let backend = PostgresBackend::connect_with(&url(), options)
                .await
                .unwrap();
            backend.ensure_schema().await.unwrap();
            backend
        }

        pub(super) async fn raw(backend: &PostgresBackend) -> Object {
            backend.shared.pool.get().await.unwrap()
        }

        async fn rows_in_table(backend: &PostgresBackend) -> i64 {
            let sql = format!("SELECT count(*) FROM {}", backend.shared.table.quoted);
            raw(backend)
                .await
                .query_one(&sql, &[])
                .await
                .unwrap()
                .get(0)
        }

        pub(super) async fn drop_table(backend: &PostgresBackend) {
            let sql = format!("DROP TABLE IF EXISTS {}", backend.shared.table.quoted);
            raw(backend).await.batch_execute(&sql).await.unwrap();
        }

        /// A schema from before the rate-limit function (dropped here): steps take the
        /// compare-and-swap path with the same answers, and `ensure_schema` brings the
        /// one-statement step back, continuing from the same state.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn a_missing_rate_limit_function_falls_back_until_ensure_schema() {
            let b = backend(PostgresOptions {
                table: table("ratefn"),
                ..PostgresOptions::default()
            })
            .await;
            let drop_fn = format!("DROP FUNCTION {}", b.shared.table.rate_step);
            raw(&b).await.batch_execute(&drop_fn).await.unwrap();
            let rule = |key: &'static [u8]| RateRule {
                key,
                algorithm: rate::RateAlgorithm::Gcra,
                limit: 3,
                period_ms: 3_600_000,
                burst: 3,
                cost: 1,
            };
            let mut admitted = Vec::new();
            for _ in 0..2 {
                let rules = [rule(b"k")];
                let outcome = b.rate_limit(&rules, RateMode::Consume, None);
                admitted.push(outcome.await.unwrap().admitted);
            }
            assert!(
                b.shared.rate_step_missing.load(Ordering::Relaxed),
                "the missing function was noticed"
            );
            b.ensure_schema().await.unwrap();
            assert!(!b.shared.rate_step_missing.load(Ordering::Relaxed));
            for _ in 0..3 {
                let rules = [rule(b"k")];
                let outcome = b.rate_limit(&rules, RateMode::Consume, None);
                admitted.push(outcome.await.unwrap().admitted);
            }
            assert_eq!(
                admitted,
                [true, true, true, false, false],
                "3 per hour across both paths, one state"
            );
            drop_table(&b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn sweeper_deletes_expired_rows_in_batches() {
            let options = PostgresOptions {
                table: table("sweep"),
                sweep_batch: 10,
                // Long enough that only the explicit sweeps below run.
                sweep_interval: Duration::from_secs(3600),
                ..PostgresOptions::default()
            };
            let b = backend(options.clone()).await;
            for i in 0..25 {
                b.set(
                    format!("dead/{i}").as_bytes(),
                    b"v",
                    Some(Duration::from_millis(1)),
                )
                .await
                .unwrap();
            }
            for i in 0..5 {
                b.set(
                    format!("live/{i}").as_bytes(),
                    b"v",
                    Some(Duration::from_secs(600)),
                )
                .await
                .unwrap();
                b.set(format!("forever/{i}").as_bytes(), b"v", None)
                    .await
                    .unwrap();
            }
            // Let the 1 ms TTLs pass on the server's clock.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert_eq!(rows_in_table(&b).await, 35, "expired rows stay until swept");
            assert_eq!(b.sweep_once().await.unwrap(), 10);
            assert_eq!(b.sweep_once().await.unwrap(), 10);
            assert_eq!(b.sweep_once().await.unwrap(), 5);
            assert_eq!(b.sweep_once().await.unwrap(), 0);
            assert_eq!(
                rows_in_table(&b).await,
                10,
                "only expired rows were deleted"
            );

            // The background task drains a backlog larger than one batch in one round.
            let background = backend(PostgresOptions {
                sweep_interval: Duration::from_millis(20),
                ..options
            })
            .await;
            for i in 0..35 {
                let key = format!("dead-again/{i}");
                background
                    .set(key.as_bytes(), b"v", Some(Duration::from_millis(1)))
                    .await
                    .unwrap();
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while rows_in_table(&background).await > 10 {
                assert!(
                    Instant::now() < deadline,
                    "the background sweeper did not delete expired rows"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(rows_in_table(&background).await, 10);
            drop_table(&b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn unlogged_option_creates_an_unlogged_table() {
            let persistence = |b: PostgresBackend| async move {
                let client = raw(&b).await;
                let row = client
                    .query_one(
                        "SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass($1)",
                        &[&b.shared.table.quoted],
                    )
                    .await
                    .unwrap();
                let p: String = row.get(0);
                drop(client);
                (b, p)
            };
            let unlogged_options = PostgresOptions {
                table: table("unlogged"),
                durability: TableDurability::Unlogged,
                ..PostgresOptions::default()
            };
            let (unlogged, p) = persistence(backend(unlogged_options.clone()).await).await;
            assert_eq!(p, "u");
            unlogged.set(b"k", b"v", None).await.unwrap();
            assert_eq!(unlogged.get(b"k").await.unwrap(), Some(b"v".to_vec()));

            // Asking for a logged table over the existing unlogged one is refused, with the fix.
            let logged_view = PostgresBackend::connect_with(
                &url(),
                PostgresOptions {
                    durability: TableDurability::Logged,
                    ..unlogged_options
                },
            )
            .await
            .unwrap();
            let err = logged_view
                .ensure_schema()
                .await
                .expect_err("durability mismatch");
            assert_eq!(err.kind(), ErrorKind::Permanent);
            assert!(err.to_string().contains("SET LOGGED"), "{err}");
            drop_table(&unlogged).await;

            let (logged, p) = persistence(
                backend(PostgresOptions {
                    table: table("logged"),
                    ..PostgresOptions::default()
                })
                .await,
            )
            .await;
            assert_eq!(p, "p", "logged is the default");
            drop_table(&logged).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn incr_grammar_matches_redis_exactly() {
            let b = backend(PostgresOptions {
                table: table("incr"),
                ..PostgresOptions::default()
            })
            .await;
            for (stored, delta, expected) in [
                (&b"0"[..], 1, 1),
                (b"-1", 1, 0),
                (b"9223372036854775807", 0, i64::MAX),
                (b"9223372036854775806", 1, i64::MAX),
                (b"-9223372036854775808", 0, i64::MIN),
                (b"-9223372036854775807", -1, i64::MIN),
                (b"1000000000000000000", 1, 1_000_000_000_000_000_001),
            ] {
                b.set(b"n", stored, None).await.unwrap();
                assert_eq!(
                    b.incr(b"n", delta, None).await.unwrap(),
                    expected,
                    "{stored:?}"
                );
                assert_eq!(
                    b.get(b"n").await.unwrap(),
                    Some(expected.to_string().into_bytes())
                );
            }
            for bad in [
                &b"1\n"[..],
                b"\n1",
                b"00",
                b"-",
                b"-01",
                b"--1",
                b"0x10",
                b"\\061",
                b"\xe2\x88\x921", // U+2212 MINUS SIGN
                b"\xef\xbc\x91",  // U+FF11 FULLWIDTH DIGIT ONE
                b"-9223372036854775809",
                b"10000000000000000000",
                b"99999999999999999999",
                b"123456789012345678901",
            ] {
                b.set(b"n", bad, None).await.unwrap();
                let err = b.incr(b"n", 1, None).await.expect_err("not an integer");
                assert_eq!(err.kind(), ErrorKind::NotAnInteger, "{bad:?}: {err}");
                assert_eq!(b.get(b"n").await.unwrap(), Some(bad.to_vec()));
            }
            // A large non-numeric value is refused without parsing it.
            let big = vec![b'1'; 1 << 20];
            b.set(b"n", &big, None).await.unwrap();
            let err = b.incr(b"n", 1, None).await.expect_err("not an integer");
            assert_eq!(err.kind(), ErrorKind::NotAnInteger);
            drop_table(&b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn incr_durable_turns_synchronous_commit_on_when_the_session_has_it_off() {
            let b = backend(PostgresOptions {
                table: table("durable"),
                ..PostgresOptions::default()
            })
            .await;
            let mut client = raw(&b).await;
            client
                .batch_execute("SET synchronous_commit = off")
                .await
                .unwrap();
            let tx = client.transaction().await.unwrap();
            let key: &[u8] = b"fence";
            let ttl: Option<i64> = None;
            let row = tx
                .query_one(&b.shared.sql.incr_durable, &[&key, &7i64, &ttl])
                .await
                .unwrap();
            assert_eq!(row.get::<_, i64>(0), 7);
            let setting = tx.query_one("SHOW synchronous_commit", &[]).await.unwrap();
            assert_eq!(setting.get::<_, String>(0), "on");
            tx.commit().await.unwrap();
            let setting = client
                .query_one("SHOW synchronous_commit", &[])
                .await
                .unwrap();
            assert_eq!(
                setting.get::<_, String>(0),
                "off",
                "only that transaction changed"
            );
            client
                .batch_execute("RESET synchronous_commit")
                .await
                .unwrap();
            drop(client);
            drop_table(&b).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn errors_are_classified() {
            let missing = PostgresBackend::connect_with(
                &url(),
                PostgresOptions {
                    table: table("missing"),
                    ..PostgresOptions::default()
                },
            )
            .await
            .unwrap();
            let err = missing.get(b"k").await.expect_err("no table");
            assert_eq!(err.kind(), ErrorKind::Permanent);
            assert!(err.to_string().contains("ensure_schema"), "{err}");

            drop(missing);
            // A statement stuck behind a row lock past op_timeout is a Timeout; it was ended
            // by the server (lock_timeout), so it never lands, not even after the lock is
            // released, and the backend keeps working afterwards.
            let b = backend(PostgresOptions {
                table: table("timeout"),
                op_timeout: Duration::from_secs(1),
                ..PostgresOptions::default()
            })
            .await;
            b.set(b"k", b"v", None).await.unwrap();
            let mut holder = raw(&b).await;
            let tx = holder.transaction().await.unwrap();
            let key: &[u8] = b"k";
            let lock = format!(
                "SELECT 1 FROM {} WHERE key = $1 FOR UPDATE",
                b.shared.table.quoted
            );
            tx.query(&lock, &[&key]).await.unwrap();
            let err = b
                .set(b"k", b"w", None)
                .await
                .expect_err("blocked by the lock");
            assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
            tx.rollback().await.unwrap();
            drop(holder);
            assert_eq!(
                b.get(b"k").await.unwrap(),
                Some(b"v".to_vec()),
                "w never ran"
            );
            b.set(b"k", b"x", None).await.unwrap();
            assert_eq!(b.get(b"k").await.unwrap(), Some(b"x".to_vec()));
            drop_table(&b).await;
        }

        /// The issue's reproduction, as a rule: in rounds of "row locked, `set w` times out,
        /// lock released, `set x` acknowledged", `w` never lands, before or after `x`.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn timed_out_write_never_lands_after_a_later_write() {
            let b = backend(PostgresOptions {
                table: table("late_write"),
                op_timeout: Duration::from_secs(1),
                pool_size: 2,
                ..PostgresOptions::default()
            })
            .await;
            let lock = format!(
                "SELECT 1 FROM {} WHERE key = $1 FOR UPDATE",
                b.shared.table.quoted
            );
            let key: &[u8] = b"k";
            for round in 0..6 {
                b.set(b"k", b"v", None).await.unwrap();
                let mut holder = raw(&b).await;
                let tx = holder.transaction().await.unwrap();
                tx.query(&lock, &[&key]).await.unwrap();
                let err = b.set(b"k", b"w", None).await.expect_err("locked");
                assert_eq!(err.kind(), ErrorKind::Timeout, "round {round}: {err}");
                tx.rollback().await.unwrap();
                drop(holder);
                b.set(b"k", b"x", None).await.unwrap();
                // Any statement of the timed-out call would have been behind the lock, which
                // is gone: a read through every pooled connection sees its effect if any.
                for _ in 0..2 {
                    assert_eq!(
                        b.get(b"k").await.unwrap(),
                        Some(b"x".to_vec()),
                        "round {round}"
                    );
                }
            }
            drop_table(&b).await;
        }

        /// A caller that drops the future mid-statement: with a pool of one, the next
        /// unrelated call still completes promptly (the busy connection is not reused), and
        /// the dropped write never lands after a later one.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn dropped_call_is_cancelled_and_frees_the_pool() {
            let b = backend(PostgresOptions {
                table: table("dropped"),
                op_timeout: Duration::from_secs(2),
                pool_size: 1,
                ..PostgresOptions::default()
            })
            .await;
            b.set(b"k", b"v", None).await.unwrap();
            // The lock holder uses its own connection, outside the pool of one.
            let (holder, connection) = tokio_postgres::connect(&url(), NoTls).await.unwrap();
            tokio::spawn(connection);
            holder.batch_execute("BEGIN").await.unwrap();
            let lock = format!(
                "SELECT 1 FROM {} WHERE key = 'k'::bytea FOR UPDATE",
                b.shared.table.quoted
            );
            holder.batch_execute(&lock).await.unwrap();
            // The write reaches the server and waits for the row lock; its caller gives up.
            let dropped = tokio::time::timeout(Duration::from_millis(100), b.set(b"k", b"w", None));
            assert!(dropped.await.is_err(), "the call was still waiting");
            let started = Instant::now();
            assert_eq!(b.get(b"other").await.unwrap(), None);
            let took = started.elapsed();
            assert!(
                took < Duration::from_secs(1),
                "an unrelated call took {took:?} after a dropped one"
            );
            holder.batch_execute("ROLLBACK").await.unwrap();
            b.set(b"k", b"x", None).await.unwrap();
            assert_eq!(b.get(b"k").await.unwrap(), Some(b"x".to_vec()));
            drop_table(&b).await;
        }

        /// A path that stops delivering: the call returns Timeout within its bounds, and once
        /// it has returned, its write cannot land (the connection it used is closed, and a
        /// network that loses what the closed socket sent never delivers it).
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn frozen_path_times_out_and_the_write_never_lands() {
            let direct = backend(PostgresOptions {
                table: table("frozen"),
                ..PostgresOptions::default()
            })
            .await;
            let config: tokio_postgres::Config = url().parse().unwrap();
            let port = config.get_ports().first().copied().unwrap_or(5432);
            let proxy = crate::fault_proxy::FaultProxy::start(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                port,
            )))
            .await;
            let proxied =
                url().replace(&format!(":{port}/"), &format!(":{}/", proxy.addr().port()));
            assert_ne!(proxied, url(), "the test URL must name its port explicitly");
            let op_timeout = Duration::from_secs(1);
            let b = PostgresBackend::connect_with(
                &proxied,
                PostgresOptions {
                    table: direct.shared.options.table.clone(),
                    op_timeout,
                    pool_size: 1,
                    ..PostgresOptions::default()
                },
            )
            .await
            .unwrap();
            b.set(b"k", b"v", None).await.unwrap();
            proxy.freeze_existing();
            let started = Instant::now();
            let err = b.set(b"k", b"w", None).await.expect_err("frozen");
            assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
            assert!(
                started.elapsed() < op_timeout * 4,
                "{:?}",
                started.elapsed()
            );
            b.set(b"k", b"x", None).await.unwrap();
            proxy.thaw();
            proxy.drained().await;
            assert_eq!(direct.get(b"k").await.unwrap(), Some(b"x".to_vec()));
            drop(b);
            drop_table(&direct).await;
        }

        /// A pooled connection that finds itself on a read-only server (a failover left it on
        /// a standby: SQLSTATE 25006) is not reused: the write fails as transient and the
        /// next call gets a fresh connection. Here the connection's session is made read-only,
        /// which is what a demoted primary looks like to it.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn read_only_connection_is_replaced() {
            let b = backend(PostgresOptions {
                table: table("read_only"),
                pool_size: 1,
                ..PostgresOptions::default()
            })
            .await;
            let pooled = raw(&b).await;
            pooled
                .batch_execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
                .await
                .unwrap();
            drop(pooled);
            let err = b
                .set(b"k", b"v", None)
                .await
                .expect_err("read-only session");
            assert_eq!(err.kind(), ErrorKind::Transient, "{err}");
            b.set(b"k", b"v", None).await.unwrap();
            assert_eq!(b.get(b"k").await.unwrap(), Some(b"v".to_vec()));
            drop_table(&b).await;
        }

        /// Sweeps that fail are counted and their error kept, not swallowed.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn failing_sweeps_are_reported() {
            let b = PostgresBackend::connect_with(
                &url(),
                PostgresOptions {
                    table: table("no_such_table"),
                    sweep_interval: Duration::from_millis(10),
                    ..PostgresOptions::default()
                },
            )
            .await
            .unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (failures, last) = b.sweep_failures();
                if failures > 0 {
                    assert!(last.unwrap_or_default().contains("does not exist"));
                    break;
                }
                assert!(Instant::now() < deadline, "no sweep failure was reported");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    /// Tests on the scratch server `scripts/test` starts for them (127.0.0.1:5433, TLS on, its
    /// own data directory), which they may crash and restart. One at a time: they share it.
    mod scratch {
        use super::server::{drop_table, raw, table};
        use super::*;

        static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

        fn env(var: &str) -> String {
            match std::env::var(var) {
                Ok(v) if !v.is_empty() => v,
                _ => panic!(
                    "{var} is not set: run scripts/test, which creates the scratch Postgres \
                     (TLS on, port 5433) these tests crash and restart"
                ),
            }
        }

        fn pg_ctl(args: &[&str]) {
            let bin = env("KEEL_TEST_PG_BIN");
            let dir = env("KEEL_TEST_PG_SCRATCH_DIR");
            let status = std::process::Command::new("runuser")
                .args(["-u", "postgres", "--", &format!("{bin}/pg_ctl"), "-D", &dir])
                .args(args)
                .stdout(std::process::Stdio::null())
                .status()
                .unwrap();
            assert!(status.success(), "pg_ctl {args:?} failed");
        }

        /// `pg_ctl -m immediate stop` (a crash: no checkpoint, unlogged tables are reset at
        /// the next start), then a normal start.
        fn crash_and_restart() {
            pg_ctl(&["-m", "immediate", "stop"]);
            let log = format!("{}/server.log", env("KEEL_TEST_PG_SCRATCH_DIR"));
            pg_ctl(&[
                "-l",
                &log,
                "-w",
                "-o",
                "-p 5433 -k /tmp -c listen_addresses=127.0.0.1 -c ssl=on",
                "start",
            ]);
        }

        async fn open(table: &str, durability: TableDurability) -> PostgresBackend {
            let b = PostgresBackend::connect_with(
                &env("KEEL_TEST_PG_SCRATCH_URL"),
                PostgresOptions {
                    table: table.to_owned(),
                    durability,
                    ..PostgresOptions::default()
                },
            )
            .await
            .unwrap();
            b.ensure_schema().await.unwrap();
            b
        }

        /// The issue's reproduction: five `incr_durable`, an immediate stop, a restart. On an
        /// unlogged table the data is gone (as unlogged promises) but the counter continues
        /// from its durable floor; on a logged table it simply continues.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn fencing_counter_survives_a_crash_restart_on_logged_and_unlogged_tables() {
            let _serial = SERIAL.lock().await;
            let unlogged_table = table("fence_u");
            let logged_table = table("fence_l");
            let unlogged = open(&unlogged_table, TableDurability::Unlogged).await;
            let logged = open(&logged_table, TableDurability::Logged).await;
            for expected in 1..=5 {
                assert_eq!(
                    unlogged.incr_durable(b"fence", 1, None).await.unwrap(),
                    expected
                );
                assert_eq!(
                    logged.incr_durable(b"fence", 1, None).await.unwrap(),
                    expected
                );
            }
            unlogged.set(b"cached", b"v", None).await.unwrap();
            drop((unlogged, logged));
            crash_and_restart();
            let unlogged = open(&unlogged_table, TableDurability::Unlogged).await;
            let logged = open(&logged_table, TableDurability::Logged).await;
            assert_eq!(
                unlogged.get(b"cached").await.unwrap(),
                None,
                "the crash emptied it"
            );
            assert_eq!(unlogged.incr_durable(b"fence", 1, None).await.unwrap(), 6);
            assert_eq!(logged.incr_durable(b"fence", 1, None).await.unwrap(), 6);
            // A plain incr on the emptied table starts over; only durable counters are fenced.
            assert_eq!(unlogged.incr(b"plain", 1, None).await.unwrap(), 1);
            drop_table(&unlogged).await;
            let fence = format!("DROP TABLE {}", unlogged.shared.table.fence);
            raw(&unlogged).await.batch_execute(&fence).await.unwrap();
            drop_table(&logged).await;
        }

        /// `sslmode` with rustls: `require` encrypts, `verify-full` checks the chain and the
        /// name (the test certificate names localhost only), `verify-ca` only the chain.
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn tls_modes_encrypt_and_check_what_they_promise() {
            let _serial = SERIAL.lock().await;
            let url = env("KEEL_TEST_PG_SCRATCH_URL");
            let ca = env("KEEL_TEST_TLS_CA");
            let uses_tls = |b: PostgresBackend| async move {
                let client = raw(&b).await;
                let row = client
                    .query_one(
                        "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                        &[],
                    )
                    .await
                    .unwrap();
                row.get::<_, bool>(0)
            };
            let plain = PostgresBackend::connect(&url).await.unwrap();
            assert!(!uses_tls(plain).await, "no sslmode: no TLS");
            for mode in [
                "sslmode=require".to_owned(),
                format!("sslmode=verify-full&sslrootcert={ca}"),
            ] {
                let b = PostgresBackend::connect(&format!("{url}?{mode}"))
                    .await
                    .unwrap();
                assert!(uses_tls(b).await, "{mode}");
            }
            let by_ip = url.replace("localhost", "127.0.0.1");
            let err =
                PostgresBackend::connect(&format!("{by_ip}?sslmode=verify-full&sslrootcert={ca}"))
                    .await
                    .expect_err("the certificate does not name 127.0.0.1");
            assert_ne!(err.kind(), ErrorKind::InvalidInput, "{err}");
            let b =
                PostgresBackend::connect(&format!("{by_ip}?sslmode=verify-ca&sslrootcert={ca}"))
                    .await
                    .unwrap();
            assert!(uses_tls(b).await, "verify-ca checks the chain only");
            PostgresBackend::connect(&format!("{url}?sslmode=verify-full"))
                .await
                .expect_err("the private CA is not among the system's roots");
        }
    }
}
