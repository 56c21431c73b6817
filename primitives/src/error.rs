//! The contract's one error type. Every backend maps its own failures into [`Error`], keeping
//! the original as the `source`, and classifies them with an [`ErrorKind`] so callers can
//! decide to retry, fail open or give up without knowing which backend they run on.

use std::fmt;

/// What kind of failure an [`Error`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The caller passed something invalid (a TTL of zero or beyond the maximum, a bad URL).
    /// Nothing was written. Do not retry unchanged.
    InvalidInput,
    /// `incr` found a value that is not a decimal i64. The value is unchanged.
    NotAnInteger,
    /// `incr` would overflow an i64. The value is unchanged.
    Overflow,
    /// A key, value or batch is over the size limit. Nothing was written.
    Limit,
    /// A failure that may pass (connection reset, server loading, failover). Retrying may
    /// succeed; whether the write happened is unknown.
    Transient,
    /// The operation did not finish in time. Whether the write happened is unknown.
    Timeout,
    /// A failure that will not pass by retrying (authentication, wrong server type, schema).
    Permanent,
    /// The embedded store refused writes after an I/O failure; reopen it.
    Poisoned,
    /// The store is locked by another process.
    Locked,
    /// Stored data is damaged.
    Corruption,
}

impl ErrorKind {
    /// True for kinds where retrying the same call may succeed (`Transient`, `Timeout`).
    pub fn is_retryable(self) -> bool {
        matches!(self, ErrorKind::Transient | ErrorKind::Timeout)
    }

    /// The kind as a short `snake_case` name (`"limit"`, `"timeout"`, ...): the `kind` label of
    /// the error metrics and the `outcome` field of the backend spans.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotAnInteger => "not_an_integer",
            ErrorKind::Overflow => "overflow",
            ErrorKind::Limit => "limit",
            ErrorKind::Transient => "transient",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Poisoned => "poisoned",
            ErrorKind::Locked => "locked",
            ErrorKind::Corruption => "corruption",
        }
    }
}

/// An error from a [`Backend`](crate::Backend) or a primitive.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// Shorthand for `Result<T, keel_primitives::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind` with a message saying what happened.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the underlying error.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// The classification.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message (without the source).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        if let Some(s) = &self.source {
            write!(f, ": {s}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<keel_engine::Error> for Error {
    fn from(e: keel_engine::Error) -> Self {
        use keel_engine::Error as E;
        let kind = match &e {
            E::KeyTooLarge { .. }
            | E::ValueTooLarge { .. }
            | E::BatchTooLarge { .. }
            | E::MemoryLimit { .. } => ErrorKind::Limit,
            E::InvalidTtl { .. } => ErrorKind::InvalidInput,
            E::NotAnInteger => ErrorKind::NotAnInteger,
            E::Overflow => ErrorKind::Overflow,
            E::Locked { .. } => ErrorKind::Locked,
            E::Corruption { .. } => ErrorKind::Corruption,
            E::Poisoned(_) => ErrorKind::Poisoned,
            E::Closed => ErrorKind::Permanent,
            E::Io(_) => ErrorKind::Transient,
            _ => ErrorKind::Permanent,
        };
        Error::new(kind, "embedded store").with_source(e)
    }
}
