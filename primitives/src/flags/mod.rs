//! Feature flags stored in the backend as versioned JSON documents, evaluated in process.
//!
//! A [`Flag`] has named variants (a boolean flag is `{"on": true, "off": false}`), a default
//! variant, a kill switch (`enabled`), allow and block lists, and ordered [`Rule`]s: the first
//! rule whose [`Constraint`]s all match serves a variant or a percentage [`Rollout`] with
//! weighted variants. Bucketing is Unleash's ([`bucket`]): deterministic, sticky, salted by the
//! flag key (or a group id), and raising a percentage only adds subjects.
//!
//! Documents are validated when written ([`Flag::validate`], [`FlagStore::put`]): weights sum
//! to 100, percentages are 0 to 100, variants exist, operators are known; an invalid document
//! is refused with a typed [`FlagError`] and nothing is written.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use keel_primitives::flags::{EvalContext, Flag, Reason};
//!
//! let flag = Flag::from_json(br#"{
//!     "key": "new-checkout", "enabled": true,
//!     "variants": {"on": true, "off": false}, "default_variant": "off",
//!     "allow": {"variant": "on", "ids": ["alice"]},
//!     "rules": [{"constraints": [{"attribute": "country", "operator": "IN", "values": ["NL", "BE"]}],
//!                "rollout": {"percentage": 25, "variants": [{"name": "on", "weight": 100}]}}]
//! }"#)?;
//! let details = flag.evaluate(&EvalContext::new("alice"));
//! assert_eq!((details.value.as_bool(), details.reason), (Some(true), Reason::TargetingMatch));
//! let details = flag.evaluate(&EvalContext::new("bob").with("country", "US"));
//! assert_eq!((details.value.as_bool(), details.reason), (Some(false), Reason::Default));
//! # Ok(())
//! # }
//! ```
//!
//! # Keys
//! - `flags:doc:{key}`: the flag's JSON document. Permanent by nature (a flag lives until it is
//!   deleted); bounded by the number of flags and [`DOC_BYTES_MAX`] each.
//! - `flags:version`: a counter bumped (`incr`) after every write or delete, so a
//!   [`FlagClient`] learns of a change with one read per refresh. Permanent (one key).
//!
//! Each document carries its own `version`, raised by one on every write through a
//! compare-and-swap, so two concurrent writers cannot silently overwrite each other.

pub mod bucket;
mod client;
#[cfg(feature = "openfeature")]
pub mod openfeature;

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::backend::{Backend, TtlPolicy};
use crate::error::Error;

pub use client::{FlagClient, REFRESH_INTERVAL_DEFAULT};

/// Prefix of flag documents: `flags:doc:{key}`.
pub const DOC_KEY_PREFIX: &str = "flags:doc:";
/// The change counter every write bumps.
pub const VERSION_KEY: &str = "flags:version";
/// Longest flag key, in bytes.
pub const FLAG_KEY_BYTES_MAX: usize = 256;
/// Largest flag document, in bytes.
pub const DOC_BYTES_MAX: usize = 256 * 1024;
/// Most flags a store holds ([`FlagStore::list`] and the client's cache load at most this).
pub const FLAGS_MAX: usize = 10_000;
/// How many compare-and-swap rounds a write tries against concurrent writers.
const WRITE_ROUNDS_MAX: u32 = 8;

/// The known constraint operators (Unleash's names, plus `STR_EQ`).
pub const OPERATORS: &[&str] = &[
    "IN",
    "NOT_IN",
    "STR_EQ",
    "STR_CONTAINS",
    "STR_STARTS_WITH",
    "STR_ENDS_WITH",
    "NUM_EQ",
    "NUM_GT",
    "NUM_GTE",
    "NUM_LT",
    "NUM_LTE",
    "SEMVER_EQ",
    "SEMVER_GT",
    "SEMVER_LT",
];

/// Why a flag operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FlagError {
    /// The document is not valid JSON for the schema (a missing field, a wrong type, an unknown
    /// field). Nothing was written.
    #[error("flag document is malformed: {0}; nothing was written")]
    Malformed(String),
    /// A constraint names an operator keel does not know. Nothing was written.
    #[error("flag {flag:?}: unknown constraint operator {operator:?} (known: {known}); nothing was written", known = OPERATORS.join(", "))]
    UnknownOperator {
        /// The flag.
        flag: String,
        /// The operator given.
        operator: String,
    },
    /// Rollout variant weights do not sum to 100. Nothing was written.
    #[error("flag {flag:?}: variant weights sum to {sum}, not 100; nothing was written")]
    WeightsNot100 {
        /// The flag.
        flag: String,
        /// Their sum.
        sum: u64,
    },
    /// A percentage is over 100. Nothing was written.
    #[error("flag {flag:?}: percentage {percentage} is outside 0..=100; nothing was written")]
    BadPercentage {
        /// The flag.
        flag: String,
        /// The value given.
        percentage: u64,
    },
    /// A rule, list or default names a variant the flag does not define. Nothing was written.
    #[error("flag {flag:?}: variant {variant:?} is not defined; nothing was written")]
    UnknownVariant {
        /// The flag.
        flag: String,
        /// The variant named.
        variant: String,
    },
    /// Something else in the document is invalid (an empty or too long key, a rule serving
    /// nothing or two things, a numeric or semver operator with a value that does not parse,
    /// a document over [`DOC_BYTES_MAX`]). Nothing was written.
    #[error("flag {flag:?}: {reason}; nothing was written")]
    Invalid {
        /// The flag.
        flag: String,
        /// What is wrong.
        reason: String,
    },
    /// The flag does not exist.
    #[error("flag {0:?} does not exist")]
    NotFound(String),
    /// Concurrent writers kept changing the flag; nothing was written by this call. Retry.
    #[error("flag {0:?} kept changing under concurrent writes; nothing was written, retry")]
    Contention(String),
    /// The backend failed (see [`Error::kind`]).
    #[error(transparent)]
    Backend(#[from] Error),
}

/// A feature flag document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Flag {
    /// The flag's key (1 to [`FLAG_KEY_BYTES_MAX`] bytes).
    pub key: String,
    /// Raised by one on every write; set by [`FlagStore::put`] (a written value is ignored).
    #[serde(default)]
    pub version: u64,
    /// The kill switch: when false every evaluation serves the default variant with
    /// [`Reason::Disabled`].
    pub enabled: bool,
    /// What the flag is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Variant name → value (any JSON value).
    pub variants: BTreeMap<String, Value>,
    /// Served when disabled, when blocked, and when no rule matches.
    pub default_variant: String,
    /// Subjects (targeting keys) served a fixed variant, before any rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow: Option<Allow>,
    /// Subjects always served the default variant, before the allow list and every rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub block: Vec<String>,
    /// Rules, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

/// The allow list: these subjects get `variant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// The variant served.
    pub variant: String,
    /// The subjects.
    pub ids: Vec<String>,
}

/// A targeting rule: when every constraint matches, serve `variant`, or the `rollout` (a
/// subject outside the rollout's percentage falls through to the next rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// All must match (none: the rule matches everyone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// A fixed variant (exactly one of `variant` and `rollout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// A percentage rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<Rollout>,
}

/// A percentage rollout with weighted variants (Unleash's flexible rollout).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// Share of subjects in the rollout, 0 to 100.
    pub percentage: u64,
    /// The context attribute that identifies a subject (default `userId`: the targeting key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stickiness: Option<String>,
    /// The bucketing salt (default: the flag key). Flags sharing a group id put a subject in
    /// the same bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// Variants and weights (summing to 100) for subjects in the rollout.
    pub variants: Vec<WeightedVariant>,
}

/// One variant of a rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedVariant {
    /// The variant.
    pub name: String,
    /// Its weight, 0 to 100.
    pub weight: u64,
}

/// A condition on a context attribute (Unleash's constraint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Constraint {
    /// The attribute (`userId` is the targeting key).
    pub attribute: String,
    /// One of [`OPERATORS`].
    pub operator: String,
    /// Values for `IN` and `NOT_IN`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    /// The value for every other operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Negates the result.
    #[serde(default, skip_serializing_if = "is_false")]
    pub inverted: bool,
    /// String operators ignore case.
    #[serde(default, skip_serializing_if = "is_false")]
    pub case_insensitive: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// What an evaluation sees of the subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EvalContext {
    /// The subject's id (the `userId` attribute; the default stickiness).
    pub targeting_key: Option<String>,
    /// Other attributes.
    pub attributes: BTreeMap<String, String>,
}

impl EvalContext {
    /// A context for subject `id`.
    pub fn new(id: impl Into<String>) -> Self {
        EvalContext {
            targeting_key: Some(id.into()),
            attributes: BTreeMap::new(),
        }
    }

    /// Adds an attribute.
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }

    fn get(&self, name: &str) -> Option<&str> {
        if name == "userId"
            && let Some(k) = &self.targeting_key
        {
            return Some(k);
        }
        self.attributes.get(name).map(String::as_str)
    }
}

/// Why an evaluation returned what it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Reason {
    /// No rule matched: the default variant.
    Default,
    /// The allow or block list, or a rule serving a fixed variant, matched.
    TargetingMatch,
    /// A percentage rollout placed the subject.
    Split,
    /// The flag is switched off: the default variant.
    Disabled,
    /// The flag is missing or its value has the wrong type: the caller's default.
    Error,
}

/// The result of an evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct Details {
    /// The value served.
    pub value: Value,
    /// The variant served (empty on [`Reason::Error`]).
    pub variant: String,
    /// Why.
    pub reason: Reason,
    /// The flag document's version (0 on [`Reason::Error`]).
    pub version: u64,
}

impl Flag {
    /// Parses and validates a document.
    ///
    /// # Errors
    /// [`FlagError::Malformed`] for JSON that does not fit the schema, else the errors of
    /// [`validate`](Self::validate).
    pub fn from_json(bytes: &[u8]) -> Result<Flag, FlagError> {
        if bytes.len() > DOC_BYTES_MAX {
            return Err(FlagError::Invalid {
                flag: String::new(),
                reason: format!("the document is over {DOC_BYTES_MAX} bytes"),
            });
        }
        let flag: Flag =
            serde_json::from_slice(bytes).map_err(|e| FlagError::Malformed(e.to_string()))?;
        flag.validate()?;
        Ok(flag)
    }

    /// The document as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain data with string map keys cannot fail.
        serde_json::to_vec_pretty(self).unwrap_or_default()
    }

    /// Checks the document: key length, variants named anywhere exist, weights sum to 100,
    /// percentages and weights are 0 to 100, operators are known and their values parse,
    /// each rule serves exactly one thing.
    ///
    /// # Errors
    /// The [`FlagError`] naming the first problem found.
    pub fn validate(&self) -> Result<(), FlagError> {
        let flag = || self.key.clone();
        let invalid = |reason: String| FlagError::Invalid {
            flag: self.key.clone(),
            reason,
        };
        if self.key.is_empty() || self.key.len() > FLAG_KEY_BYTES_MAX {
            return Err(invalid(format!(
                "the key must be 1 to {FLAG_KEY_BYTES_MAX} bytes"
            )));
        }
        let known = |v: &str| -> Result<(), FlagError> {
            if self.variants.contains_key(v) {
                Ok(())
            } else {
                Err(FlagError::UnknownVariant {
                    flag: flag(),
                    variant: v.to_owned(),
                })
            }
        };
        if self.variants.is_empty() {
            return Err(invalid("a flag needs at least one variant".into()));
        }
        known(&self.default_variant)?;
        if let Some(a) = &self.allow {
            known(&a.variant)?;
        }
        for rule in &self.rules {
            for c in &rule.constraints {
                if !OPERATORS.contains(&c.operator.as_str()) {
                    return Err(FlagError::UnknownOperator {
                        flag: flag(),
                        operator: c.operator.clone(),
                    });
                }
                let single = matches!(c.operator.as_str(), "IN" | "NOT_IN");
                if !single && c.value.is_none() {
                    return Err(invalid(format!("operator {} needs a `value`", c.operator)));
                }
                if let Some(v) = &c.value {
                    if c.operator.starts_with("NUM_") && v.trim().parse::<f64>().is_err() {
                        return Err(invalid(format!("{v:?} is not a number")));
                    }
                    if c.operator.starts_with("SEMVER_") && Semver::parse(v).is_none() {
                        return Err(invalid(format!("{v:?} is not a semantic version")));
                    }
                }
            }
            match (&rule.variant, &rule.rollout) {
                (Some(v), None) => known(v)?,
                (None, Some(r)) => {
                    if r.percentage > 100 {
                        return Err(FlagError::BadPercentage {
                            flag: flag(),
                            percentage: r.percentage,
                        });
                    }
                    let mut sum = 0u64;
                    for w in &r.variants {
                        known(&w.name)?;
                        if w.weight > 100 {
                            return Err(FlagError::BadPercentage {
                                flag: flag(),
                                percentage: w.weight,
                            });
                        }
                        sum += w.weight;
                    }
                    if sum != 100 {
                        return Err(FlagError::WeightsNot100 { flag: flag(), sum });
                    }
                }
                _ => {
                    return Err(invalid(
                        "each rule serves exactly one of `variant` and `rollout`".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Evaluates the flag for `ctx` (no I/O).
    pub fn evaluate(&self, ctx: &EvalContext) -> Details {
        let serve = |variant: &str, reason| Details {
            value: self.variants.get(variant).cloned().unwrap_or(Value::Null),
            variant: variant.to_owned(),
            reason,
            version: self.version,
        };
        if !self.enabled {
            return serve(&self.default_variant, Reason::Disabled);
        }
        if let Some(id) = &ctx.targeting_key {
            if self.block.iter().any(|b| b == id) {
                return serve(&self.default_variant, Reason::TargetingMatch);
            }
            if let Some(a) = &self.allow
                && a.ids.iter().any(|i| i == id)
            {
                return serve(&a.variant, Reason::TargetingMatch);
            }
        }
        for rule in &self.rules {
            if !rule.constraints.iter().all(|c| c.matches(ctx)) {
                continue;
            }
            if let Some(v) = &rule.variant {
                return serve(v, Reason::TargetingMatch);
            }
            if let Some(r) = &rule.rollout {
                let Some(subject) = ctx.get(r.stickiness.as_deref().unwrap_or("userId")) else {
                    continue;
                };
                let group = r.group_id.as_deref().unwrap_or(&self.key);
                if r.percentage == 0
                    || u64::from(bucket::rollout_bucket(group, subject)) > r.percentage
                {
                    continue;
                }
                if let Some(v) = r.pick_variant(group, subject) {
                    return serve(v, Reason::Split);
                }
            }
        }
        serve(&self.default_variant, Reason::Default)
    }
}

impl Rollout {
    /// Unleash's variant selection: the subject's variant bucket (1 to 1000) falls in the
    /// variant whose cumulative weight (scaled to 1000) first reaches it.
    fn pick_variant<'a>(&'a self, group: &str, subject: &str) -> Option<&'a str> {
        let target = u64::from(bucket::variant_bucket(group, subject));
        let mut cumulative = 0;
        for v in &self.variants {
            cumulative += v.weight * 10;
            if v.weight > 0 && cumulative >= target {
                return Some(&v.name);
            }
        }
        None
    }
}

impl Constraint {
    fn matches(&self, ctx: &EvalContext) -> bool {
        let result = match ctx.get(&self.attribute) {
            None => self.operator == "NOT_IN",
            Some(actual) => self.test(actual),
        };
        result != self.inverted
    }

    fn test(&self, actual: &str) -> bool {
        let ci = self.case_insensitive;
        let eq = |a: &str, b: &str| {
            if ci {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        let lower = |s: &str| if ci { s.to_lowercase() } else { s.to_owned() };
        let value = self.value.as_deref().unwrap_or("");
        let num = || {
            Some((
                actual.trim().parse::<f64>().ok()?,
                value.trim().parse::<f64>().ok()?,
            ))
        };
        let ver = || Some(Semver::parse(actual)?.cmp(&Semver::parse(value)?));
        match self.operator.as_str() {
            "IN" => self.values.iter().any(|v| eq(v, actual)),
            "NOT_IN" => !self.values.iter().any(|v| eq(v, actual)),
            "STR_EQ" => eq(actual, value),
            "STR_CONTAINS" => lower(actual).contains(&lower(value)),
            "STR_STARTS_WITH" => lower(actual).starts_with(&lower(value)),
            "STR_ENDS_WITH" => lower(actual).ends_with(&lower(value)),
            "NUM_EQ" => num().is_some_and(|(a, b)| a == b),
            "NUM_GT" => num().is_some_and(|(a, b)| a > b),
            "NUM_GTE" => num().is_some_and(|(a, b)| a >= b),
            "NUM_LT" => num().is_some_and(|(a, b)| a < b),
            "NUM_LTE" => num().is_some_and(|(a, b)| a <= b),
            "SEMVER_EQ" => ver() == Some(Ordering::Equal),
            "SEMVER_GT" => ver() == Some(Ordering::Greater),
            "SEMVER_LT" => ver() == Some(Ordering::Less),
            // Validation refuses unknown operators; a document that bypassed it matches nothing.
            _ => false,
        }
    }
}

/// A semantic version (2.0.0): `MAJOR.MINOR.PATCH[-PRERELEASE][+BUILD]`, ordered by the spec
/// (build metadata ignored; a pre-release sorts before its release).
#[derive(Debug, PartialEq, Eq)]
struct Semver<'a> {
    core: [u64; 3],
    pre: Option<&'a str>,
}

impl<'a> Semver<'a> {
    fn parse(s: &'a str) -> Option<Semver<'a>> {
        let s = s.trim();
        let s = s.split_once('+').map_or(s, |(v, _)| v);
        let (core, pre) = match s.split_once('-') {
            Some((c, p)) if !p.is_empty() => (c, Some(p)),
            Some(_) => return None,
            None => (s, None),
        };
        let mut parts = core.split('.');
        let mut out = [0u64; 3];
        for slot in &mut out {
            let p = parts.next()?;
            if p.is_empty() || (p.len() > 1 && p.starts_with('0')) {
                return None;
            }
            *slot = p.parse().ok()?;
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Semver { core: out, pre })
    }
}

impl Ord for Semver<'_> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.core
            .cmp(&other.core)
            .then_with(|| match (self.pre, other.pre) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(a), Some(b)) => {
                    let (mut x, mut y) = (a.split('.'), b.split('.'));
                    loop {
                        match (x.next(), y.next()) {
                            (None, None) => return Ordering::Equal,
                            (None, Some(_)) => return Ordering::Less,
                            (Some(_), None) => return Ordering::Greater,
                            (Some(p), Some(q)) => {
                                let o = match (p.parse::<u64>(), q.parse::<u64>()) {
                                    (Ok(m), Ok(n)) => m.cmp(&n),
                                    (Ok(_), Err(_)) => Ordering::Less,
                                    (Err(_), Ok(_)) => Ordering::Greater,
                                    (Err(_), Err(_)) => p.cmp(q),
                                };
                                if o != Ordering::Equal {
                                    return o;
                                }
                            }
                        }
                    }
                }
            })
    }
}

impl PartialOrd for Semver<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Reads and writes flag documents in a backend.
#[derive(Clone)]
pub struct FlagStore {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for FlagStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlagStore")
            .field("backend", &self.backend.name())
            .finish()
    }
}

fn doc_key(key: &str) -> Vec<u8> {
    format!("{DOC_KEY_PREFIX}{key}").into_bytes()
}

impl FlagStore {
    /// A store over `backend`.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        FlagStore { backend }
    }

    /// The flag `key`, if it exists.
    ///
    /// # Errors
    /// [`FlagError::Backend`]; a stored document that no longer validates is
    /// [`FlagError::Malformed`] or the validation error.
    pub async fn get(&self, key: &str) -> Result<Option<Flag>, FlagError> {
        match self.backend.get(&doc_key(key)).await? {
            None => Ok(None),
            Some(bytes) => Flag::from_json(&bytes).map(Some),
        }
    }

    /// Validates and writes `flag` (replacing any previous version), returning the version
    /// written (the previous version + 1, or 1), then bumps the change counter.
    ///
    /// # Errors
    /// Any validation error of [`Flag::validate`] (nothing written), [`FlagError::Contention`]
    /// if concurrent writers kept winning, or [`FlagError::Backend`].
    pub async fn put(&self, flag: &Flag) -> Result<u64, FlagError> {
        flag.validate()?;
        self.update(&flag.key, |_| Ok(Some(flag.clone()))).await
    }

    /// Sets the kill switch of an existing flag; returns the new version.
    ///
    /// # Errors
    /// [`FlagError::NotFound`], [`FlagError::Contention`], [`FlagError::Backend`].
    pub async fn set_enabled(&self, key: &str, enabled: bool) -> Result<u64, FlagError> {
        self.update(key, |old| match old {
            None => Err(FlagError::NotFound(key.to_owned())),
            Some(mut f) => {
                f.enabled = enabled;
                Ok(Some(f))
            }
        })
        .await
    }

    /// Read-modify-CAS of one document, then the change counter.
    async fn update(
        &self,
        key: &str,
        f: impl Fn(Option<Flag>) -> Result<Option<Flag>, FlagError>,
    ) -> Result<u64, FlagError> {
        let dk = doc_key(key);
        for _ in 0..WRITE_ROUNDS_MAX {
            let raw = self.backend.get(&dk).await?;
            let old = match &raw {
                None => None,
                Some(b) => Some(
                    serde_json::from_slice::<Flag>(b)
                        .map_err(|e| FlagError::Malformed(e.to_string()))?,
                ),
            };
            let old_version = old.as_ref().map_or(0, |o| o.version);
            let Some(mut next) = f(old)? else {
                return Ok(old_version);
            };
            next.version = old_version + 1;
            next.validate()?;
            let bytes = next.to_json();
            if bytes.len() > DOC_BYTES_MAX {
                return Err(FlagError::Invalid {
                    flag: key.to_owned(),
                    reason: format!("the document is over {DOC_BYTES_MAX} bytes"),
                });
            }
            if self
                .backend
                .compare_and_swap(&dk, raw.as_deref(), &bytes, TtlPolicy::Clear)
                .await?
            {
                self.backend.incr(VERSION_KEY.as_bytes(), 1, None).await?;
                return Ok(next.version);
            }
        }
        Err(FlagError::Contention(key.to_owned()))
    }

    /// Deletes a flag; returns whether it existed.
    ///
    /// # Errors
    /// [`FlagError::Backend`].
    pub async fn delete(&self, key: &str) -> Result<bool, FlagError> {
        let existed = self.backend.delete(&doc_key(key)).await?;
        if existed {
            self.backend.incr(VERSION_KEY.as_bytes(), 1, None).await?;
        }
        Ok(existed)
    }

    /// The change counter (0 before the first write).
    ///
    /// # Errors
    /// [`FlagError::Backend`].
    pub async fn change_counter(&self) -> Result<i64, FlagError> {
        match self.backend.get(VERSION_KEY.as_bytes()).await? {
            None => Ok(0),
            Some(b) => crate::backend::parse_i64(&b)
                .ok_or_else(|| FlagError::Backend(crate::backend::not_an_integer())),
        }
    }

    /// Every flag, sorted by key (at most [`FLAGS_MAX`]). Documents that fail validation are
    /// skipped with a `tracing` warning rather than hiding every other flag.
    ///
    /// # Errors
    /// [`FlagError::Backend`].
    pub async fn list(&self) -> Result<Vec<Flag>, FlagError> {
        let mut keys = Vec::new();
        let mut cursor = None;
        loop {
            let page = self
                .backend
                .scan(DOC_KEY_PREFIX.as_bytes(), cursor.as_ref(), 1000)
                .await?;
            keys.extend(page.keys);
            match page.next {
                Some(n) if keys.len() < FLAGS_MAX * 2 => cursor = Some(n),
                _ => break,
            }
        }
        keys.sort();
        keys.dedup();
        keys.truncate(FLAGS_MAX);
        let mut flags = Vec::with_capacity(keys.len());
        for k in keys {
            if let Some(bytes) = self.backend.get(&k).await? {
                match Flag::from_json(&bytes) {
                    Ok(f) => flags.push(f),
                    Err(e) => {
                        tracing::warn!(key = %String::from_utf8_lossy(&k), error = %e, "skipping an invalid flag document")
                    }
                }
            }
        }
        Ok(flags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_orders_by_the_spec() {
        let v = |s| Semver::parse(s).unwrap();
        let chain = [
            "1.0.0-alpha",
            "1.0.0-alpha.1",
            "1.0.0-alpha.beta",
            "1.0.0-beta",
            "1.0.0-beta.2",
            "1.0.0-beta.11",
            "1.0.0-rc.1",
            "1.0.0",
            "1.2.0",
            "1.10.0",
            "2.0.0",
        ];
        for w in chain.windows(2) {
            assert!(v(w[0]) < v(w[1]), "{} < {}", w[0], w[1]);
        }
        assert_eq!(v("1.0.0+build").cmp(&v("1.0.0")), Ordering::Equal);
        for bad in ["1", "1.0", "01.0.0", "1.0.0-", "a.b.c", "1.0.0.0"] {
            assert!(Semver::parse(bad).is_none(), "{bad}");
        }
    }
}
