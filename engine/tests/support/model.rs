//! The reference model of the engine's semantics: a `BTreeMap` from key to (value, absolute
//! expiry) plus the rules of every operation, written independently of the engine from its
//! documentation. [`Op`] is one operation; [`Model::apply`] and [`run_on_db`] run it on the
//! model and on a real `Db` and return comparable [`Outcome`]s. [`check_recovered`] compares a
//! reopened store with the states a crash may legitimately leave.
//!
//! Shared by several test binaries (and the fuzz targets), each of which uses a subset.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use keel_engine::{Batch, Db, Error, Limits, ScanCursor, TTL_MAX, Ttl, TtlPolicy};

/// The manual clock's start: a realistic Unix time in ms.
pub const T0_MS: u64 = 1_700_000_000_000;

/// `TTL_MAX` in milliseconds.
pub const TTL_MAX_MS: u64 = TTL_MAX.as_millis() as u64;

/// The most pages one model scan walks (a bound, not a limit the engine has).
pub const SCAN_PAGES_MAX: usize = 1_000;

/// One key's state: its value and absolute expiry (Unix ms, 0 = none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The value.
    pub value: Vec<u8>,
    /// Absolute expiry in Unix ms; 0 means none.
    pub expires_at_ms: u64,
}

impl Slot {
    fn is_live(&self, now_ms: u64) -> bool {
        self.expires_at_ms == 0 || self.expires_at_ms > now_ms
    }
}

/// What a compare-and-swap does to the TTL, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Keep the current expiry.
    Keep,
    /// Expire this many ms after the swap (0 and > `TTL_MAX` are invalid).
    Set(u64),
    /// No expiry.
    Clear,
}

/// One operation of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchItem {
    /// Set, with an optional TTL in ms.
    Set {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// TTL in ms.
        ttl_ms: Option<u64>,
    },
    /// Set with an absolute expiry.
    SetAt {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// Absolute expiry, Unix ms.
        expires_at_ms: Option<u64>,
    },
    /// Delete.
    Delete {
        /// Key.
        key: Vec<u8>,
    },
}

impl BatchItem {
    fn key(&self) -> &[u8] {
        match self {
            BatchItem::Set { key, .. }
            | BatchItem::SetAt { key, .. }
            | BatchItem::Delete { key } => key,
        }
    }
}

/// One operation on the store. TTLs are in milliseconds; 0 stands for a zero `Duration`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `Db::set`.
    Set {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// TTL in ms.
        ttl_ms: Option<u64>,
    },
    /// `Db::set_nx`.
    SetNx {
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
        /// TTL in ms.
        ttl_ms: Option<u64>,
    },
    /// `Db::compare_and_swap`.
    Cas {
        /// Key.
        key: Vec<u8>,
        /// Required current value.
        expected: Option<Vec<u8>>,
        /// New value.
        new: Vec<u8>,
        /// TTL policy.
        ttl: Policy,
    },
    /// `Db::compare_and_delete`.
    CompareAndDelete {
        /// Key.
        key: Vec<u8>,
        /// Required current value.
        expected: Vec<u8>,
    },
    /// `Db::delete`.
    Delete {
        /// Key.
        key: Vec<u8>,
    },
    /// `Db::incr`.
    Incr {
        /// Key.
        key: Vec<u8>,
        /// Amount.
        delta: i64,
        /// TTL stamped on creation, in ms.
        ttl_ms: Option<u64>,
    },
    /// `Db::expire`.
    Expire {
        /// Key.
        key: Vec<u8>,
        /// TTL in ms.
        ttl_ms: u64,
    },
    /// `Db::persist`.
    Persist {
        /// Key.
        key: Vec<u8>,
    },
    /// `Db::write_batch`.
    Batch(Vec<BatchItem>),
    /// `Db::get`.
    Get {
        /// Key.
        key: Vec<u8>,
    },
    /// `Db::get_with_ttl`.
    GetWithTtl {
        /// Key.
        key: Vec<u8>,
    },
    /// `Db::ttl`.
    Ttl {
        /// Key.
        key: Vec<u8>,
    },
    /// Every page of `Db::scan`.
    Scan {
        /// Prefix.
        prefix: Vec<u8>,
        /// Page size asked for.
        limit: usize,
        /// Whether values (and expiries) are returned.
        with_values: bool,
    },
}

impl Op {
    /// True if the operation can change the store.
    pub fn is_write(&self) -> bool {
        !matches!(
            self,
            Op::Get { .. } | Op::GetWithTtl { .. } | Op::Ttl { .. } | Op::Scan { .. }
        )
    }

    /// Keys the operation writes (for diagnostics).
    pub fn keys(&self) -> Vec<&[u8]> {
        match self {
            Op::Set { key, .. }
            | Op::SetNx { key, .. }
            | Op::Cas { key, .. }
            | Op::CompareAndDelete { key, .. }
            | Op::Delete { key }
            | Op::Incr { key, .. }
            | Op::Expire { key, .. }
            | Op::Persist { key }
            | Op::Get { key }
            | Op::GetWithTtl { key }
            | Op::Ttl { key } => vec![key],
            Op::Batch(items) => items.iter().map(BatchItem::key).collect(),
            Op::Scan { .. } => Vec::new(),
        }
    }
}

/// The engine error kinds an operation's input can cause, and the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrKind {
    /// `Error::KeyTooLarge`.
    KeyTooLarge,
    /// `Error::ValueTooLarge`.
    ValueTooLarge,
    /// `Error::BatchTooLarge`.
    BatchTooLarge,
    /// `Error::InvalidTtl`.
    InvalidTtl,
    /// `Error::NotAnInteger`.
    NotAnInteger,
    /// `Error::Overflow`.
    Overflow,
    /// `Error::Poisoned`, `Error::Io` or `Error::Closed`: what a failing disk may cause.
    Fault(String),
    /// Anything else (never expected).
    Other(String),
}

impl ErrKind {
    /// Classifies an engine error.
    pub fn of(e: &Error) -> ErrKind {
        match e {
            Error::KeyTooLarge { .. } => ErrKind::KeyTooLarge,
            Error::ValueTooLarge { .. } => ErrKind::ValueTooLarge,
            Error::BatchTooLarge { .. } => ErrKind::BatchTooLarge,
            Error::InvalidTtl { .. } => ErrKind::InvalidTtl,
            Error::NotAnInteger => ErrKind::NotAnInteger,
            Error::Overflow => ErrKind::Overflow,
            Error::Poisoned(_) | Error::Io(_) | Error::Closed => ErrKind::Fault(e.to_string()),
            other => ErrKind::Other(format!("{other:?}")),
        }
    }
}

/// One scanned entry: key, value (if asked), expiry (if asked).
pub type ScanRow = (Vec<u8>, Option<Vec<u8>>, Option<u64>);

/// The result of an operation, comparable between model and engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Success without a value.
    Unit,
    /// Whether it took effect.
    Bool(bool),
    /// `incr`'s result.
    Int(i64),
    /// `get`.
    Value(Option<Vec<u8>>),
    /// `get_with_ttl` (remaining TTL in ms).
    ValueTtl(Option<(Vec<u8>, Option<u64>)>),
    /// `ttl`.
    Ttl(Ttl),
    /// Every page of a scan.
    Pages(Vec<Vec<ScanRow>>),
    /// An error.
    Err(ErrKind),
}

impl Outcome {
    /// True for an error a failing disk may cause.
    pub fn is_fault(&self) -> bool {
        matches!(self, Outcome::Err(ErrKind::Fault(_)))
    }
}

/// Redis's integer grammar, written again from its description (not the engine's code): an
/// optional `-`, digits without leading zeros (`0` alone is fine), no `-0`, fits an i64.
pub fn model_parse_i64(bytes: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(bytes).ok()?;
    let digits = text.strip_prefix('-').unwrap_or(text);
    let well_formed = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
        && text != "-0";
    if !well_formed || digits.len() > 19 {
        return None;
    }
    text.parse::<i64>().ok()
}

fn ttl_valid(ms: u64) -> bool {
    (1..=TTL_MAX_MS).contains(&ms)
}

/// The reference store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Model {
    /// Every key ever set and not deleted, expired ones included (they are invisible).
    pub map: BTreeMap<Vec<u8>, Slot>,
    /// The store's limits.
    pub limits: Limits,
}

impl Model {
    /// An empty store with `limits`.
    pub fn new(limits: Limits) -> Self {
        Model {
            map: BTreeMap::new(),
            limits,
        }
    }

    fn live(&self, key: &[u8], now: u64) -> Option<&Slot> {
        self.map.get(key).filter(|s| s.is_live(now))
    }

    /// The live entries at `now`: key → (value, expiry or 0).
    pub fn visible(&self, now: u64) -> BTreeMap<Vec<u8>, (Vec<u8>, u64)> {
        self.map
            .iter()
            .filter(|(_, s)| s.is_live(now))
            .map(|(k, s)| (k.clone(), (s.value.clone(), s.expires_at_ms)))
            .collect()
    }

    fn key_ok(&self, key: &[u8]) -> Result<(), ErrKind> {
        match key.len() > self.limits.max_key_bytes {
            true => Err(ErrKind::KeyTooLarge),
            false => Ok(()),
        }
    }

    fn value_ok(&self, value: &[u8]) -> Result<(), ErrKind> {
        match value.len() > self.limits.max_value_bytes {
            true => Err(ErrKind::ValueTooLarge),
            false => Ok(()),
        }
    }

    fn ttl_ok(ttl_ms: Option<u64>) -> Result<(), ErrKind> {
        match ttl_ms {
            Some(ms) if !ttl_valid(ms) => Err(ErrKind::InvalidTtl),
            _ => Ok(()),
        }
    }

    fn put(&mut self, key: &[u8], value: Vec<u8>, expires_at_ms: u64) {
        self.map.insert(
            key.to_vec(),
            Slot {
                value,
                expires_at_ms,
            },
        );
    }

    /// Applies `op` at time `now` and returns its outcome. Which error wins when two inputs of
    /// one operation are invalid is unspecified, so generators make at most one invalid.
    pub fn apply(&mut self, op: &Op, now: u64) -> Outcome {
        match self.apply_inner(op, now) {
            Ok(o) => o,
            Err(e) => Outcome::Err(e),
        }
    }

    fn apply_inner(&mut self, op: &Op, now: u64) -> Result<Outcome, ErrKind> {
        let at = |ttl_ms: Option<u64>| ttl_ms.map_or(0, |t| now + t);
        Ok(match op {
            Op::Set { key, value, ttl_ms } => {
                self.value_ok(value)?;
                Model::ttl_ok(*ttl_ms)?;
                self.key_ok(key)?;
                self.put(key, value.clone(), at(*ttl_ms));
                Outcome::Unit
            }
            Op::SetNx { key, value, ttl_ms } => {
                self.value_ok(value)?;
                Model::ttl_ok(*ttl_ms)?;
                self.key_ok(key)?;
                if self.live(key, now).is_some() {
                    return Ok(Outcome::Bool(false));
                }
                self.put(key, value.clone(), at(*ttl_ms));
                Outcome::Bool(true)
            }
            Op::Cas {
                key,
                expected,
                new,
                ttl,
            } => {
                self.value_ok(new)?;
                if let Policy::Set(ms) = ttl {
                    Model::ttl_ok(Some(*ms))?;
                }
                self.key_ok(key)?;
                let current = self.live(key, now);
                let matches = match (current, expected) {
                    (None, None) => true,
                    (Some(s), Some(e)) => &s.value == e,
                    _ => false,
                };
                if !matches {
                    return Ok(Outcome::Bool(false));
                }
                let expires = match ttl {
                    Policy::Keep => current.map_or(0, |s| s.expires_at_ms),
                    Policy::Set(ms) => now + ms,
                    Policy::Clear => 0,
                };
                self.put(key, new.clone(), expires);
                Outcome::Bool(true)
            }
            Op::CompareAndDelete { key, expected } => {
                self.key_ok(key)?;
                match self.live(key, now) {
                    Some(s) if &s.value == expected => {
                        self.map.remove(key.as_slice());
                        Outcome::Bool(true)
                    }
                    _ => Outcome::Bool(false),
                }
            }
            Op::Delete { key } => {
                self.key_ok(key)?;
                match self.live(key, now) {
                    Some(_) => {
                        self.map.remove(key.as_slice());
                        Outcome::Bool(true)
                    }
                    None => Outcome::Bool(false),
                }
            }
            Op::Incr { key, delta, ttl_ms } => {
                Model::ttl_ok(*ttl_ms)?;
                self.key_ok(key)?;
                let (base, expires) = match self.live(key, now) {
                    Some(s) => (
                        model_parse_i64(&s.value).ok_or(ErrKind::NotAnInteger)?,
                        s.expires_at_ms,
                    ),
                    None => (0, at(*ttl_ms)),
                };
                let next = base.checked_add(*delta).ok_or(ErrKind::Overflow)?;
                self.put(key, next.to_string().into_bytes(), expires);
                Outcome::Int(next)
            }
            Op::Expire { key, ttl_ms } => {
                Model::ttl_ok(Some(*ttl_ms))?;
                self.key_ok(key)?;
                match self.map.get_mut(key.as_slice()).filter(|s| s.is_live(now)) {
                    Some(s) => {
                        s.expires_at_ms = now + ttl_ms;
                        Outcome::Bool(true)
                    }
                    None => Outcome::Bool(false),
                }
            }
            Op::Persist { key } => {
                self.key_ok(key)?;
                match self.map.get_mut(key.as_slice()).filter(|s| s.is_live(now)) {
                    Some(s) if s.expires_at_ms != 0 => {
                        s.expires_at_ms = 0;
                        Outcome::Bool(true)
                    }
                    _ => Outcome::Bool(false),
                }
            }
            Op::Batch(items) => {
                let mut bytes = 4usize;
                for item in items {
                    match item {
                        BatchItem::Set { key, value, ttl_ms } => {
                            self.key_ok(key)?;
                            self.value_ok(value)?;
                            Model::ttl_ok(*ttl_ms)?;
                            bytes += 1 + 2 + key.len() + 8 + 4 + value.len();
                        }
                        BatchItem::SetAt { key, value, .. } => {
                            self.key_ok(key)?;
                            self.value_ok(value)?;
                            bytes += 1 + 2 + key.len() + 8 + 4 + value.len();
                        }
                        BatchItem::Delete { key } => {
                            self.key_ok(key)?;
                            bytes += 1 + 2 + key.len();
                        }
                    }
                }
                if items.len() > self.limits.max_batch_ops || bytes > self.limits.max_batch_bytes {
                    return Err(ErrKind::BatchTooLarge);
                }
                for item in items {
                    match item {
                        BatchItem::Set { key, value, ttl_ms } => {
                            self.put(key, value.clone(), at(*ttl_ms));
                        }
                        BatchItem::SetAt {
                            key,
                            value,
                            expires_at_ms,
                        } => match expires_at_ms {
                            Some(t) if *t <= now => {
                                self.map.remove(key.as_slice());
                            }
                            _ => self.put(key, value.clone(), expires_at_ms.unwrap_or(0)),
                        },
                        BatchItem::Delete { key } => {
                            self.map.remove(key.as_slice());
                        }
                    }
                }
                Outcome::Unit
            }
            Op::Get { key } => Outcome::Value(self.live(key, now).map(|s| s.value.clone())),
            Op::GetWithTtl { key } => Outcome::ValueTtl(self.live(key, now).map(|s| {
                let ttl = (s.expires_at_ms != 0).then(|| s.expires_at_ms - now);
                (s.value.clone(), ttl)
            })),
            Op::Ttl { key } => Outcome::Ttl(match self.live(key, now) {
                None => Ttl::Missing,
                Some(s) if s.expires_at_ms == 0 => Ttl::NoExpiry,
                Some(s) => Ttl::Remaining(Duration::from_millis(s.expires_at_ms - now)),
            }),
            Op::Scan {
                prefix,
                limit,
                with_values,
            } => {
                let limit = (*limit).clamp(1, keel_engine::SCAN_LIMIT_MAX);
                let rows: Vec<ScanRow> = self
                    .map
                    .iter()
                    .filter(|(k, s)| k.starts_with(prefix) && s.is_live(now))
                    .map(|(k, s)| match with_values {
                        true => (
                            k.clone(),
                            Some(s.value.clone()),
                            (s.expires_at_ms != 0).then_some(s.expires_at_ms),
                        ),
                        false => (k.clone(), None, None),
                    })
                    .collect();
                // A full last page is followed by one more (empty) page: the engine cannot know
                // it was the last.
                let mut pages: Vec<Vec<ScanRow>> =
                    rows.chunks(limit).map(<[ScanRow]>::to_vec).collect();
                if rows.len().is_multiple_of(limit) {
                    pages.push(Vec::new());
                }
                Outcome::Pages(pages)
            }
        })
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Runs `op` on `db` and returns its outcome in the model's terms.
pub fn run_on_db(db: &Db, op: &Op) -> Outcome {
    let result: Result<Outcome, Error> = match op {
        Op::Set { key, value, ttl_ms } => {
            db.set(key, value, ttl_ms.map(ms)).map(|()| Outcome::Unit)
        }
        Op::SetNx { key, value, ttl_ms } => {
            db.set_nx(key, value, ttl_ms.map(ms)).map(Outcome::Bool)
        }
        Op::Cas {
            key,
            expected,
            new,
            ttl,
        } => {
            let policy = match ttl {
                Policy::Keep => TtlPolicy::Keep,
                Policy::Set(t) => TtlPolicy::Set(ms(*t)),
                Policy::Clear => TtlPolicy::Clear,
            };
            db.compare_and_swap(key, expected.as_deref(), new, policy)
                .map(Outcome::Bool)
        }
        Op::CompareAndDelete { key, expected } => {
            db.compare_and_delete(key, expected).map(Outcome::Bool)
        }
        Op::Delete { key } => db.delete(key).map(Outcome::Bool),
        Op::Incr { key, delta, ttl_ms } => db.incr(key, *delta, ttl_ms.map(ms)).map(Outcome::Int),
        Op::Expire { key, ttl_ms } => db.expire(key, ms(*ttl_ms)).map(Outcome::Bool),
        Op::Persist { key } => db.persist(key).map(Outcome::Bool),
        Op::Batch(items) => {
            let mut batch = Batch::new();
            for item in items {
                match item {
                    BatchItem::Set { key, value, ttl_ms } => {
                        batch.set(key.clone(), value.clone(), ttl_ms.map(ms));
                    }
                    BatchItem::SetAt {
                        key,
                        value,
                        expires_at_ms,
                    } => {
                        batch.set_expiring_at(key.clone(), value.clone(), *expires_at_ms);
                    }
                    BatchItem::Delete { key } => {
                        batch.delete(key.clone());
                    }
                }
            }
            db.write_batch(&batch).map(|()| Outcome::Unit)
        }
        Op::Get { key } => Ok(Outcome::Value(db.get(key))),
        Op::GetWithTtl { key } => Ok(Outcome::ValueTtl(db.get_with_ttl(key).map(|(v, t)| {
            (
                v,
                t.map(|d| u64::try_from(d.as_millis()).expect("TTL fits u64 ms")),
            )
        }))),
        Op::Ttl { key } => Ok(Outcome::Ttl(db.ttl(key))),
        Op::Scan {
            prefix,
            limit,
            with_values,
        } => {
            let mut pages = Vec::new();
            let mut cursor: Option<ScanCursor> = None;
            loop {
                let page = db.scan(prefix, cursor.as_ref(), *limit, *with_values);
                pages.push(
                    page.entries
                        .into_iter()
                        .map(|e| (e.key, e.value, e.expires_at_ms))
                        .collect(),
                );
                match page.next {
                    Some(next) if pages.len() < SCAN_PAGES_MAX => cursor = Some(next),
                    _ => break,
                }
            }
            Ok(Outcome::Pages(pages))
        }
    };
    result.unwrap_or_else(|e| Outcome::Err(ErrKind::of(&e)))
}

/// Every live entry of `db`: key → (value, expiry or 0).
pub fn dump(db: &Db) -> BTreeMap<Vec<u8>, (Vec<u8>, u64)> {
    let mut out = BTreeMap::new();
    let mut cursor: Option<ScanCursor> = None;
    loop {
        let page = db.scan(b"", cursor.as_ref(), keel_engine::SCAN_LIMIT_MAX, true);
        for e in page.entries {
            let value = e.value.expect("scan asked for values");
            out.insert(e.key, (value, e.expires_at_ms.unwrap_or(0)));
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => return out,
        }
    }
}

/// Checks that the reopened `db` holds exactly one of `candidates` (at `now`), the states a
/// crash may leave: `candidates[0]` has every acknowledged operation, later ones add
/// operations that were in flight. Returns the index of the state found, or a description of
/// how the store differs from `candidates[0]`, key by key.
pub fn check_recovered(db: &Db, candidates: &[Model], now: u64) -> Result<usize, String> {
    let got = dump(db);
    for (i, candidate) in candidates.iter().enumerate() {
        if candidate.visible(now) == got {
            return Ok(i);
        }
    }
    let mut report = format!(
        "recovered state matches none of {} allowed states; differences from the acknowledged \
         state:\n",
        candidates.len()
    );
    let want = candidates[0].visible(now);
    let keys: std::collections::BTreeSet<&Vec<u8>> = want.keys().chain(got.keys()).collect();
    for key in keys {
        let (w, g) = (want.get(key), got.get(key));
        if w != g {
            let others: Vec<_> = candidates[1..]
                .iter()
                .map(|c| c.visible(now).get(key).cloned())
                .collect();
            report.push_str(&format!(
                "  key {:?}: recovered {:?}, acknowledged {:?}, in-flight alternatives {:?}\n",
                String::from_utf8_lossy(key),
                g.map(show),
                w.map(show),
                others
                    .iter()
                    .map(|o| o.as_ref().map(show))
                    .collect::<Vec<_>>()
            ));
        }
    }
    Err(report)
}

fn show(slot: &(Vec<u8>, u64)) -> String {
    format!("{}@{}", String::from_utf8_lossy(&slot.0), slot.1)
}
