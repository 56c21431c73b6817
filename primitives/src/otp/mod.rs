//! One-time codes sent by SMS or e-mail ([`Otp`]), and TOTP/HOTP authenticator codes with
//! replay protection ([`totp`]), built only on the [`Backend`] contract.
//!
//! [`Otp::issue`] makes a code for a subject (a phone number, an e-mail address, a user id) and
//! a purpose (`login`, `reset`, …); [`Otp::verify`] checks it. The whole value of the primitive
//! is that every check is atomic on the backend, so the usual races cannot happen:
//! - **The attempt is counted before the comparison** (`incr` on the code's attempt counter):
//!   100 concurrent wrong guesses consume 100 attempts, never fewer.
//! - **A correct code is consumed atomically** (`compare_and_delete` of the exact record): of
//!   two concurrent correct verifications exactly one succeeds.
//! - **The comparison is constant time** (`subtle`), on keyed hashes.
//! - **Codes are stored only as keyed hashes**: BLAKE3 keyed with a key derived from the
//!   server's [`OtpSecret`], over the purpose, the subject, a per-code nonce and the code. A
//!   plain hash of a 6-digit code is reversed offline in a million tries; this one cannot be
//!   without the secret. Subjects appear in keys only as a keyed 128-bit tag, so a dump of the
//!   store reveals neither codes nor phone numbers.
//! - **Resends are limited**: a cooldown between two codes for the same subject and purpose
//!   ([`OtpError::Cooldown`], with the time left) and a budget of codes per subject per window
//!   ([`OtpError::ResendBudget`]).
//! - **Guesses are limited per subject across codes**: every verification of a subject counts
//!   against a failure budget before anything else is looked at, and only a success resets it,
//!   so re-issuing a code does not reset the guess budget (NIST SP 800-63B §5.2.2 asks for at
//!   most 100 consecutive failed attempts per account, the default here).
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::otp::{Otp, OtpOptions, OtpSecret, PublicOutcome, Verification};
//!
//! let secret = OtpSecret::from_bytes(&[7u8; 32])?; // load it from your secret store
//! let otp = Otp::new(Arc::new(Embedded::memory()), secret, OtpOptions::default())?;
//! let issued = otp.issue("+15550100", "login").await?;
//! // send issued.code().as_str() by SMS …
//! let wrong = otp.verify("+15550100", "login", "000000").await?;
//! let right = otp.verify("+15550100", "login", issued.code().as_str()).await?;
//! if issued.code().as_str() != "000000" {
//!     assert!(matches!(wrong, Verification::Wrong { attempts_left: 4 }));
//!     assert_eq!(right, Verification::Verified);
//! }
//! // Tell the client only the public outcome: "wrong" and "no such code" look the same.
//! assert_eq!(wrong.public(), PublicOutcome::Rejected);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Outcomes, and what the caller may tell the client
//! [`Verification`] is the server's detail: verified, wrong (with the attempts left), too many
//! attempts (the code is burnt), expired or unknown, or locked (the subject's failure budget is
//! spent). [`Verification::public`] folds it into what a client may learn
//! ([`PublicOutcome`]): verified, rejected, or locked. Wrong, burnt and unknown all become
//! *rejected*, so a client cannot tell whether a subject has a pending code (no subject
//! enumeration). *Locked* does not leak either: the failure budget is counted for every
//! verification of every subject, whether a code exists or not.
//!
//! # Keys
//! `{tag}` is 32 hex digits: the first 128 bits of the subject's BLAKE3 hash keyed with a key
//! derived from the secret. `{purpose}` is 1 to [`PURPOSE_BYTES_MAX`] ASCII letters, digits,
//! `-`, `_` or `.` (so it cannot contain the `:` separator).
//! - `otp:code:{purpose}:{tag}`: the current code, 65 bytes: version (1) ‖ nonce (16) ‖ keyed
//!   hash (32) ‖ issued at, Unix ms (u64 LE) ‖ expires at, Unix ms (u64 LE). TTL: the longer
//!   of the code's TTL and the resend cooldown.
//! - `otp:att:{purpose}:{tag}:{nonce}`: attempts on that one code (decimal, `incr`), TTL the
//!   code's TTL. A new code has a new nonce, hence a fresh counter. `otp:att:{purpose}:{tag}:-`
//!   counts verifications that found no code: a stand-in write, so that path costs the same
//!   round trips as a wrong guess.
//! - `otp:sent:{tag}:{window}`: codes issued to the subject in one resend window (all
//!   purposes), TTL two windows.
//! - `otp:fail:{tag}`: the subject's consecutive counted verifications without a success (all
//!   purposes), TTL the failure window from the first one; deleted by a success.
//! - `otp:totp:{subject}`: the last accepted TOTP time step, see [`totp`].
//!
//! Every key carries a TTL: nothing grows forever.
//!
//! # Clocks
//! Code expiry, cooldowns and resend windows read "now" once per call, by default from
//! [`Backend::now_ms`] (the backend's trusted clock, the same for every application node).
//! [`Otp::with_clock`] injects a [`Clock`] instead ([`ManualClock`](crate::ratelimit::ManualClock)
//! in tests). The keys' TTLs always run on the backend's clock; they only bound how long
//! state is kept.

pub mod totp;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use subtle::ConstantTimeEq;

use crate::backend::{Backend, Ttl, TtlPolicy, ttl_ms};
use crate::error::{Error, ErrorKind};

pub use keel_engine::Clock;

/// Longest subject, in bytes.
pub const SUBJECT_BYTES_MAX: usize = 256;
/// Longest purpose, in bytes.
pub const PURPOSE_BYTES_MAX: usize = 32;
/// Shortest and longest code.
pub const CODE_LENGTH_MIN: usize = 4;
/// See [`CODE_LENGTH_MIN`].
pub const CODE_LENGTH_MAX: usize = 32;
/// Smallest and largest alphabet.
pub const ALPHABET_SIZE_MIN: usize = 2;
/// See [`ALPHABET_SIZE_MIN`].
pub const ALPHABET_SIZE_MAX: usize = 64;
/// Shortest server secret, in bytes.
pub const SECRET_BYTES_MIN: usize = 32;
/// Largest per-code attempt limit and per-window budgets.
pub const BUDGET_MAX: u32 = 100_000;
/// Default code length.
pub const CODE_LENGTH_DEFAULT: usize = 6;
/// Default alphabet: decimal digits.
pub const ALPHABET_DEFAULT: &str = "0123456789";
/// Default code lifetime.
pub const CODE_TTL_DEFAULT: Duration = Duration::from_secs(300);
/// Default attempts per code.
pub const ATTEMPTS_DEFAULT: u32 = 5;
/// Default pause between two codes for one subject and purpose.
pub const RESEND_COOLDOWN_DEFAULT: Duration = Duration::from_secs(30);
/// Default codes per subject per resend window.
pub const RESEND_BUDGET_DEFAULT: u32 = 5;
/// Default resend window.
pub const RESEND_WINDOW_DEFAULT: Duration = Duration::from_secs(3600);
/// Default consecutive failed verifications per subject (NIST SP 800-63B: at most 100).
pub const FAILURE_BUDGET_DEFAULT: u32 = 100;
/// Default time a subject's failure count is kept after its first failure.
pub const FAILURE_WINDOW_DEFAULT: Duration = Duration::from_secs(24 * 3600);
/// Compare-and-swap rounds [`Otp::issue`] tries against concurrent issues before giving up.
pub const ISSUE_CAS_ROUNDS_MAX: u32 = 16;

const KEY_PREFIX_CODE: &str = "otp:code:";
const KEY_PREFIX_ATTEMPTS: &str = "otp:att:";
const KEY_PREFIX_SENT: &str = "otp:sent:";
const KEY_PREFIX_FAILURES: &str = "otp:fail:";
const RECORD_VERSION: u8 = 1;
const NONCE_BYTES: usize = 16;
const HASH_BYTES: usize = 32;
const TAG_BYTES: usize = 16;
const RECORD_BYTES: usize = 1 + NONCE_BYTES + HASH_BYTES + 8 + 8;
const CONTEXT_CODE_KEY: &str = "keel 2026-11-29 otp code hash v1";
const CONTEXT_SUBJECT_KEY: &str = "keel 2026-11-29 otp subject tag v1";

const _: () = assert!(RECORD_BYTES == 65);
const _: () = assert!(
    ALPHABET_SIZE_MAX <= 256,
    "codes sample one byte per character"
);
const _: () = assert!(
    PURPOSE_BYTES_MAX <= u8::MAX as usize,
    "the hash input length-prefixes it"
);

/// Why an OTP operation failed. Nothing is written when input is refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OtpError {
    /// A subject, purpose, code, secret, URI or option is invalid; see `reason`. Nothing was
    /// written. Do not retry unchanged.
    #[error("invalid {field}: {reason}; nothing was written")]
    Invalid {
        /// What was invalid (`"subject"`, `"purpose"`, `"code"`, `"secret"`, `"options"`, …).
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A code for this subject and purpose was issued less than the cooldown ago. No new code
    /// was issued; the previous one stays valid.
    #[error("a code was sent moments ago; a new one can be sent in {retry_after:?}")]
    Cooldown {
        /// Time until a new code can be issued.
        retry_after: Duration,
    },
    /// The subject has had its budget of codes for the current window. No code was issued.
    #[error("too many codes were sent to this subject; a new one can be sent in {retry_after:?}")]
    ResendBudget {
        /// Time until the window ends.
        retry_after: Duration,
    },
    /// A compare-and-swap loop lost too many rounds to concurrent writers. Nothing was
    /// changed; retrying may succeed.
    #[error(
        "{rounds} compare-and-swap rounds lost to concurrent writers; nothing was changed, retry"
    )]
    Contention {
        /// Rounds tried.
        rounds: u32,
    },
    /// The backend failed (see [`Error::kind`]), or stored state is not what this module
    /// writes ([`ErrorKind::Corruption`]).
    #[error(transparent)]
    Backend(#[from] Error),
}

fn invalid(field: &'static str, reason: impl Into<String>) -> OtpError {
    OtpError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// The server secret that keys the code hashes and subject tags: at least
/// [`SECRET_BYTES_MIN`] bytes, ideally 32 random bytes kept in your secret store. Changing it
/// invalidates every outstanding code (and resets the per-subject counters, whose keys change).
#[derive(Clone)]
pub struct OtpSecret {
    code_key: [u8; 32],
    subject_key: [u8; 32],
}

impl fmt::Debug for OtpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OtpSecret(..)")
    }
}

impl OtpSecret {
    /// The secret from raw bytes; two independent keys are derived from it with BLAKE3's key
    /// derivation (one for code hashes, one for subject tags).
    ///
    /// # Errors
    /// [`OtpError::Invalid`] if shorter than [`SECRET_BYTES_MIN`].
    pub fn from_bytes(secret: &[u8]) -> Result<Self, OtpError> {
        if secret.len() < SECRET_BYTES_MIN {
            return Err(invalid(
                "secret",
                format!(
                    "the server secret is {} bytes, at least {SECRET_BYTES_MIN} are needed",
                    secret.len()
                ),
            ));
        }
        Ok(OtpSecret {
            code_key: blake3::derive_key(CONTEXT_CODE_KEY, secret),
            subject_key: blake3::derive_key(CONTEXT_SUBJECT_KEY, secret),
        })
    }
}

/// How codes look and how much may be tried. Start from `OtpOptions::default()` and chain
/// setters; [`Otp::new`] validates the whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OtpOptions {
    length: usize,
    alphabet: String,
    ttl: Duration,
    attempts: u32,
    cooldown: Duration,
    resend_budget: u32,
    resend_window: Duration,
    failure_budget: u32,
    failure_window: Duration,
}

impl Default for OtpOptions {
    fn default() -> Self {
        OtpOptions {
            length: CODE_LENGTH_DEFAULT,
            alphabet: ALPHABET_DEFAULT.to_owned(),
            ttl: CODE_TTL_DEFAULT,
            attempts: ATTEMPTS_DEFAULT,
            cooldown: RESEND_COOLDOWN_DEFAULT,
            resend_budget: RESEND_BUDGET_DEFAULT,
            resend_window: RESEND_WINDOW_DEFAULT,
            failure_budget: FAILURE_BUDGET_DEFAULT,
            failure_window: FAILURE_WINDOW_DEFAULT,
        }
    }
}

impl OtpOptions {
    /// Characters per code, [`CODE_LENGTH_MIN`] to [`CODE_LENGTH_MAX`]. Default 6.
    pub fn code_length(mut self, length: usize) -> Self {
        self.length = length;
        self
    }

    /// The characters codes are drawn from: distinct printable ASCII characters (no space),
    /// [`ALPHABET_SIZE_MIN`] to [`ALPHABET_SIZE_MAX`] of them. Default the ten digits. Codes
    /// are checked exactly (case-sensitively).
    pub fn alphabet(mut self, alphabet: impl Into<String>) -> Self {
        self.alphabet = alphabet.into();
        self
    }

    /// How long a code is valid. Default [`CODE_TTL_DEFAULT`] (5 minutes).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Verifications one code allows, correct or not, 1 to [`BUDGET_MAX`]; the last allowed
    /// wrong guess burns the code. Default [`ATTEMPTS_DEFAULT`] (5).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.attempts = attempts;
        self
    }

    /// Least time between two codes for one subject and purpose (zero: none). Default
    /// [`RESEND_COOLDOWN_DEFAULT`] (30 s).
    pub fn resend_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// At most `budget` codes per subject (all purposes) per fixed `window`. Default
    /// [`RESEND_BUDGET_DEFAULT`] (5) per [`RESEND_WINDOW_DEFAULT`] (1 hour).
    pub fn resend_budget(mut self, budget: u32, window: Duration) -> Self {
        self.resend_budget = budget;
        self.resend_window = window;
        self
    }

    /// At most `budget` consecutive counted verifications without a success per subject (all
    /// purposes, across codes), remembered for `window` after the first. Default
    /// [`FAILURE_BUDGET_DEFAULT`] (100) per [`FAILURE_WINDOW_DEFAULT`] (24 hours).
    pub fn failure_budget(mut self, budget: u32, window: Duration) -> Self {
        self.failure_budget = budget;
        self.failure_window = window;
        self
    }

    fn validate(&self) -> Result<(), OtpError> {
        if !(CODE_LENGTH_MIN..=CODE_LENGTH_MAX).contains(&self.length) {
            return Err(invalid(
                "options",
                format!(
                    "code length {} is outside {CODE_LENGTH_MIN}..={CODE_LENGTH_MAX}",
                    self.length
                ),
            ));
        }
        let bytes = self.alphabet.as_bytes();
        if !(ALPHABET_SIZE_MIN..=ALPHABET_SIZE_MAX).contains(&bytes.len())
            || !bytes.iter().all(u8::is_ascii_graphic)
        {
            return Err(invalid(
                "options",
                format!(
                    "the alphabet must be {ALPHABET_SIZE_MIN} to {ALPHABET_SIZE_MAX} printable \
                     ASCII characters without spaces, got {:?}",
                    self.alphabet
                ),
            ));
        }
        let mut sorted = bytes.to_vec();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid(
                "options",
                format!("the alphabet {:?} repeats a character", self.alphabet),
            ));
        }
        for (name, value) in [
            ("max_attempts", self.attempts),
            ("resend budget", self.resend_budget),
            ("failure budget", self.failure_budget),
        ] {
            if !(1..=BUDGET_MAX).contains(&value) {
                return Err(invalid(
                    "options",
                    format!("{name} {value} is outside 1..={BUDGET_MAX}"),
                ));
            }
        }
        for (name, value) in [
            ("ttl", self.ttl),
            ("resend window", self.resend_window),
            ("failure window", self.failure_window),
        ] {
            ttl_ms(value).map_err(|e| invalid("options", format!("{name}: {}", e.message())))?;
        }
        ttl_ms(self.resend_window * 2)
            .map_err(|e| invalid("options", format!("resend window: {}", e.message())))?;
        if !self.cooldown.is_zero() {
            ttl_ms(self.cooldown)
                .map_err(|e| invalid("options", format!("resend cooldown: {}", e.message())))?;
        }
        Ok(())
    }
}

/// An issued code. Its `Debug` never prints the code.
#[derive(Clone, PartialEq, Eq)]
pub struct Code(String);

impl fmt::Debug for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Code(..)")
    }
}

impl Code {
    /// The code, to send to the subject.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// What [`Otp::issue`] returns.
#[derive(Debug, Clone)]
pub struct Issued {
    code: Code,
    expires_at_ms: u64,
    ttl: Duration,
}

impl Issued {
    /// The code to send. Only its keyed hash was stored.
    pub fn code(&self) -> &Code {
        &self.code
    }

    /// When it expires, Unix ms on the clock in use.
    pub fn expires_at_ms(&self) -> u64 {
        self.expires_at_ms
    }

    /// How long it is valid from issue.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// The server-side detail of a verification. Show clients only [`Verification::public`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verification {
    /// The code was right and is now consumed: it will not verify again.
    Verified,
    /// The code was wrong; this many attempts remain on it.
    Wrong {
        /// Attempts left on this code (at least 1).
        attempts_left: u32,
    },
    /// The code's attempts are used up (this was the last wrong guess, or a guess after it):
    /// the code is burnt. Issue a new one.
    TooManyAttempts,
    /// No live code for this subject and purpose: never issued, expired, already used, burnt
    /// earlier, or replaced by a newer code.
    ExpiredOrUnknown,
    /// The subject's failure budget is spent: nothing was compared. Wait, or reset it from a
    /// trusted channel.
    Locked {
        /// Until the failure count expires (backend TTL).
        retry_after: Duration,
    },
}

/// What a client may learn about a verification: wrong, burnt and unknown codes look the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublicOutcome {
    /// The code was right.
    Verified,
    /// The code was not accepted (wrong, burnt, expired, or no code at all).
    Rejected,
    /// Too many failures for this subject; try again after `retry_after`.
    Locked {
        /// Time until a new attempt counts.
        retry_after: Duration,
    },
}

impl Verification {
    /// True for [`Verification::Verified`].
    pub fn is_verified(self) -> bool {
        self == Verification::Verified
    }

    /// The outcome to show a client: [`PublicOutcome::Rejected`] for wrong, burnt and unknown
    /// codes alike, so no client can learn whether a subject has a pending code.
    pub fn public(self) -> PublicOutcome {
        match self {
            Verification::Verified => PublicOutcome::Verified,
            Verification::Locked { retry_after } => PublicOutcome::Locked { retry_after },
            Verification::Wrong { .. }
            | Verification::TooManyAttempts
            | Verification::ExpiredOrUnknown => PublicOutcome::Rejected,
        }
    }
}

/// A stored code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record {
    nonce: [u8; NONCE_BYTES],
    hash: [u8; HASH_BYTES],
    issued_at_ms: u64,
    expires_at_ms: u64,
}

impl Record {
    fn encode(&self) -> [u8; RECORD_BYTES] {
        let mut out = [0u8; RECORD_BYTES];
        out[0] = RECORD_VERSION;
        out[1..17].copy_from_slice(&self.nonce);
        out[17..49].copy_from_slice(&self.hash);
        out[49..57].copy_from_slice(&self.issued_at_ms.to_le_bytes());
        out[57..65].copy_from_slice(&self.expires_at_ms.to_le_bytes());
        out
    }

    fn decode(raw: &[u8]) -> Result<Record, Error> {
        let corrupt = || {
            Error::new(
                ErrorKind::Corruption,
                format!(
                    "an OTP code record holds {} bytes this module did not write; delete it",
                    raw.len()
                ),
            )
        };
        if raw.len() != RECORD_BYTES || raw[0] != RECORD_VERSION {
            return Err(corrupt());
        }
        let array = |range: std::ops::Range<usize>| -> [u8; 8] {
            let mut a = [0u8; 8];
            a.copy_from_slice(&raw[range]);
            a
        };
        let mut nonce = [0u8; NONCE_BYTES];
        nonce.copy_from_slice(&raw[1..17]);
        let mut hash = [0u8; HASH_BYTES];
        hash.copy_from_slice(&raw[17..49]);
        Ok(Record {
            nonce,
            hash,
            issued_at_ms: u64::from_le_bytes(array(49..57)),
            expires_at_ms: u64::from_le_bytes(array(57..65)),
        })
    }
}

/// One-time codes on one backend. Cheap to clone.
#[derive(Clone)]
pub struct Otp {
    backend: Arc<dyn Backend>,
    secret: Arc<OtpSecret>,
    options: Arc<OtpOptions>,
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for Otp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Otp")
            .field("backend", &self.backend.name())
            .field("options", &self.options)
            .field(
                "clock",
                &if self.clock.is_some() {
                    "injected"
                } else {
                    "backend"
                },
            )
            .finish_non_exhaustive()
    }
}

/// The per-call keys of one subject and purpose.
struct Keys {
    tag_hex: String,
    tag: [u8; TAG_BYTES],
    code: Vec<u8>,
}

impl Otp {
    /// One-time codes on `backend`, hashed with `secret`, shaped and limited by `options`,
    /// reading time from the backend.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for invalid options.
    pub fn new(
        backend: Arc<dyn Backend>,
        secret: OtpSecret,
        options: OtpOptions,
    ) -> Result<Self, OtpError> {
        options.validate()?;
        Ok(Otp {
            backend,
            secret: Arc::new(secret),
            options: Arc::new(options),
            clock: None,
        })
    }

    /// Reads time from `clock` instead of the backend (tests: a manual clock).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The options in force.
    pub fn options(&self) -> &OtpOptions {
        &self.options
    }

    async fn now_ms(&self) -> Result<u64, Error> {
        match &self.clock {
            Some(clock) => Ok(clock.now_ms()),
            None => self.backend.now_ms().await,
        }
    }

    /// The subject's keyed tag (validated first).
    fn tag(&self, subject: &[u8]) -> Result<[u8; TAG_BYTES], OtpError> {
        validate_subject(subject)?;
        let full = blake3::keyed_hash(&self.secret.subject_key, subject);
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&full.as_bytes()[..TAG_BYTES]);
        Ok(tag)
    }

    fn keys(&self, subject: &[u8], purpose: &str) -> Result<Keys, OtpError> {
        let tag = self.tag(subject)?;
        validate_purpose(purpose)?;
        let tag_hex = hex(&tag);
        let code = format!("{KEY_PREFIX_CODE}{purpose}:{tag_hex}").into_bytes();
        Ok(Keys { tag_hex, tag, code })
    }

    fn hash(&self, purpose: &str, tag: &[u8; TAG_BYTES], nonce: &[u8], code: &[u8]) -> [u8; 32] {
        let mut h = blake3::Hasher::new_keyed(&self.secret.code_key);
        h.update(&[RECORD_VERSION]);
        // The purpose is at most PURPOSE_BYTES_MAX (< 256) bytes: a one-byte length prefix
        // keeps the encoding unambiguous; the other parts are fixed-width or last.
        h.update(&[purpose.len() as u8]);
        h.update(purpose.as_bytes());
        h.update(tag);
        h.update(nonce);
        h.update(code);
        *h.finalize().as_bytes()
    }

    /// Issues a new code for `subject` and `purpose`, replacing any previous one (whose
    /// attempts then no longer matter: it cannot verify any more).
    ///
    /// Order: the cooldown is checked (a read), then the resend budget is counted (`incr`; a
    /// refused issue gives it back), then the code record is swapped in with
    /// `compare_and_swap` against the record read, so of concurrent issues inside one cooldown
    /// exactly one wins and the others get [`OtpError::Cooldown`].
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for an empty or oversize subject or purpose, or a purpose with
    /// other characters than ASCII letters, digits, `-`, `_`, `.` (nothing written);
    /// [`OtpError::Cooldown`]; [`OtpError::ResendBudget`]; [`OtpError::Contention`];
    /// [`OtpError::Backend`].
    pub async fn issue(
        &self,
        subject: impl AsRef<[u8]>,
        purpose: &str,
    ) -> Result<Issued, OtpError> {
        let keys = self.keys(subject.as_ref(), purpose)?;
        let options = &self.options;
        let now = self.now_ms().await?;
        let mut current = self.backend.get(&keys.code).await?;
        self.check_cooldown(current.as_deref(), now)?;

        let window_ms = duration_ms(options.resend_window);
        let window = now / window_ms;
        let sent_key = format!("{KEY_PREFIX_SENT}{}:{window}", keys.tag_hex).into_bytes();
        let sent_ttl = options.resend_window * 2;
        let sent = self.backend.incr(&sent_key, 1, Some(sent_ttl)).await?;
        let give_back = || async {
            // TTL on create too: if the counter vanished meanwhile, the -1 must not live forever.
            let _ = self.backend.incr(&sent_key, -1, Some(sent_ttl)).await;
        };
        if sent > i64::from(options.resend_budget) {
            give_back().await;
            return Err(OtpError::ResendBudget {
                retry_after: Duration::from_millis((window + 1) * window_ms - now),
            });
        }

        let code = generate_code(options.alphabet.as_bytes(), options.length);
        let nonce: [u8; NONCE_BYTES] = rand::random();
        let record = Record {
            nonce,
            hash: self.hash(purpose, &keys.tag, &nonce, code.as_bytes()),
            issued_at_ms: now,
            expires_at_ms: now.saturating_add(duration_ms(options.ttl)),
        }
        .encode();
        let record_ttl = options.ttl.max(options.cooldown);
        for _ in 0..ISSUE_CAS_ROUNDS_MAX {
            let swapped = self
                .backend
                .compare_and_swap(
                    &keys.code,
                    current.as_deref(),
                    &record,
                    TtlPolicy::Set(record_ttl),
                )
                .await;
            match swapped {
                Ok(true) => {
                    return Ok(Issued {
                        code: Code(code),
                        expires_at_ms: now.saturating_add(duration_ms(options.ttl)),
                        ttl: options.ttl,
                    });
                }
                Ok(false) => {}
                Err(e) => {
                    give_back().await;
                    return Err(e.into());
                }
            }
            // Someone else changed the record: a concurrent issue (then we are in its
            // cooldown), a verification that consumed it, or its expiry.
            current = match self.backend.get(&keys.code).await {
                Ok(c) => c,
                Err(e) => {
                    give_back().await;
                    return Err(e.into());
                }
            };
            if let Err(e) = self.check_cooldown(current.as_deref(), now) {
                give_back().await;
                return Err(e);
            }
        }
        give_back().await;
        Err(OtpError::Contention {
            rounds: ISSUE_CAS_ROUNDS_MAX,
        })
    }

    fn check_cooldown(&self, current: Option<&[u8]>, now: u64) -> Result<(), OtpError> {
        let Some(raw) = current else {
            return Ok(());
        };
        let record = Record::decode(raw)?;
        let until = record
            .issued_at_ms
            .saturating_add(duration_ms(self.options.cooldown));
        if now < until {
            return Err(OtpError::Cooldown {
                retry_after: Duration::from_millis(until - now),
            });
        }
        Ok(())
    }

    /// Verifies `code` for `subject` and `purpose`.
    ///
    /// Order, each step atomic on the backend:
    /// 1. the subject's failure count is incremented (for every subject, with or without a
    ///    code, so locking reveals nothing); over the budget → [`Verification::Locked`];
    /// 2. the code record is read; none, or expired on the clock → `ExpiredOrUnknown`;
    /// 3. the code's attempt counter is incremented **before** comparing; over the limit →
    ///    the code is burnt, `TooManyAttempts`;
    /// 4. the keyed hashes are compared in constant time;
    /// 5. right: the record is consumed with `compare_and_delete` (exactly one concurrent
    ///    verifier wins; a loser gets `ExpiredOrUnknown`), the failure count is reset →
    ///    `Verified`; wrong: `Wrong { attempts_left }`, or, on the last allowed attempt, the
    ///    code is burnt → `TooManyAttempts`.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for an empty or oversize subject or purpose, or a code of the
    /// wrong length or with characters outside the alphabet: nothing is counted or written.
    /// [`OtpError::Backend`].
    pub async fn verify(
        &self,
        subject: impl AsRef<[u8]>,
        purpose: &str,
        code: &str,
    ) -> Result<Verification, OtpError> {
        let keys = self.keys(subject.as_ref(), purpose)?;
        self.validate_code(code)?;
        let options = &self.options;

        let fail_key = format!("{KEY_PREFIX_FAILURES}{}", keys.tag_hex).into_bytes();
        let failures = self
            .backend
            .incr(&fail_key, 1, Some(options.failure_window))
            .await?;
        if failures > i64::from(options.failure_budget) {
            let retry_after = match self.backend.ttl(&fail_key).await? {
                Ttl::Remaining(left) => left,
                _ => Duration::ZERO,
            };
            return Ok(Verification::Locked { retry_after });
        }

        let now = self.now_ms().await?;
        let live = match self.backend.get(&keys.code).await? {
            Some(raw) => {
                let record = Record::decode(&raw)?;
                (now < record.expires_at_ms).then_some((raw, record))
            }
            None => None,
        };
        let Some((raw, record)) = live else {
            // No code: count into a stand-in counter anyway, so this path makes the same
            // round trips as a wrong guess and its timing does not tell the two apart.
            let stand_in =
                format!("{KEY_PREFIX_ATTEMPTS}{purpose}:{}:-", keys.tag_hex).into_bytes();
            self.backend.incr(&stand_in, 1, Some(options.ttl)).await?;
            return Ok(Verification::ExpiredOrUnknown);
        };
        let attempts_key = format!(
            "{KEY_PREFIX_ATTEMPTS}{purpose}:{}:{}",
            keys.tag_hex,
            hex(&record.nonce)
        )
        .into_bytes();
        let attempt = self
            .backend
            .incr(&attempts_key, 1, Some(options.ttl))
            .await?;
        let limit = i64::from(options.attempts);
        if attempt > limit {
            self.backend.compare_and_delete(&keys.code, &raw).await?;
            return Ok(Verification::TooManyAttempts);
        }
        let presented = self.hash(purpose, &keys.tag, &record.nonce, code.as_bytes());
        if bool::from(presented.ct_eq(&record.hash)) {
            if !self.backend.compare_and_delete(&keys.code, &raw).await? {
                // Consumed (or replaced, or burnt) by a concurrent call after our read.
                return Ok(Verification::ExpiredOrUnknown);
            }
            self.backend.delete(&fail_key).await?;
            // The attempt counter is kept (it expires with the code's TTL, and a new code has
            // its own): deleting it would let verifications that read the code before it was
            // consumed count from zero again, past the attempt limit.
            return Ok(Verification::Verified);
        }
        if attempt == limit {
            self.backend.compare_and_delete(&keys.code, &raw).await?;
            return Ok(Verification::TooManyAttempts);
        }
        Ok(Verification::Wrong {
            attempts_left: u32::try_from(limit - attempt).unwrap_or(0),
        })
    }

    /// Forgets the subject's failure count (all purposes), e.g. after a reset through a
    /// trusted channel.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for a bad subject; [`OtpError::Backend`].
    pub async fn reset_failures(&self, subject: impl AsRef<[u8]>) -> Result<(), OtpError> {
        let tag = self.tag(subject.as_ref())?;
        let fail_key = format!("{KEY_PREFIX_FAILURES}{}", hex(&tag)).into_bytes();
        self.backend.delete(&fail_key).await?;
        Ok(())
    }

    fn validate_code(&self, code: &str) -> Result<(), OtpError> {
        let length = self.options.length;
        if code.len() != length {
            return Err(invalid(
                "code",
                format!("a code has {length} characters, got {}", code.len()),
            ));
        }
        let alphabet = self.options.alphabet.as_bytes();
        if !code.bytes().all(|c| alphabet.contains(&c)) {
            return Err(invalid(
                "code",
                "the code has characters outside the code alphabet",
            ));
        }
        Ok(())
    }
}

/// `length` characters drawn uniformly from `alphabet` with the thread's CSPRNG (`rand`'s
/// `ThreadRng`, ChaCha seeded from the OS). Each character takes one random byte, rejected if
/// it falls in the incomplete last block (`byte >= 256 - 256 % n`), so there is no modulo
/// bias.
fn generate_code(alphabet: &[u8], length: usize) -> String {
    use rand::Rng;
    let n = alphabet.len() as u16;
    let accept_below = 256 - 256 % n;
    let mut rng = rand::rng();
    let mut code = String::with_capacity(length);
    while code.len() < length {
        let byte: u8 = rng.random();
        if u16::from(byte) < accept_below {
            code.push(char::from(alphabet[usize::from(u16::from(byte) % n)]));
        }
    }
    code
}

fn validate_subject(subject: &[u8]) -> Result<(), OtpError> {
    if subject.is_empty() {
        return Err(invalid("subject", "the subject is empty"));
    }
    if subject.len() > SUBJECT_BYTES_MAX {
        return Err(invalid(
            "subject",
            format!(
                "the subject is {} bytes, the limit is {SUBJECT_BYTES_MAX}",
                subject.len()
            ),
        ));
    }
    Ok(())
}

fn validate_purpose(purpose: &str) -> Result<(), OtpError> {
    if purpose.is_empty() || purpose.len() > PURPOSE_BYTES_MAX {
        return Err(invalid(
            "purpose",
            format!(
                "a purpose is 1 to {PURPOSE_BYTES_MAX} bytes, got {}",
                purpose.len()
            ),
        ));
    }
    if !purpose
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
    {
        return Err(invalid(
            "purpose",
            format!("{purpose:?} has characters other than ASCII letters, digits, '-', '_', '.'"),
        ));
    }
    Ok(())
}

/// Whole milliseconds of a duration already validated as a TTL (or zero).
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;
    use keel_engine::ManualClock;

    fn otp(options: OtpOptions) -> (Arc<dyn Backend>, Otp, ManualClock) {
        let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
        let clock = ManualClock::new(1_800_000_000_000);
        let otp = Otp::new(
            Arc::clone(&b),
            OtpSecret::from_bytes(&[42u8; 32]).unwrap(),
            options,
        )
        .unwrap()
        .with_clock(Arc::new(clock.clone()));
        (b, otp, clock)
    }

    #[test]
    fn codes_are_uniform_over_the_alphabet() {
        // 7 does not divide 256: a modulo-biased sampler would favour the first 4 characters
        // by 37/36. Over 700,000 draws each count is 100,000 ± ~300 (1 sigma); bias would add
        // ~2,700 to the first four.
        let alphabet = b"abcdefg";
        let mut counts = [0u32; 7];
        for _ in 0..100_000 {
            for c in generate_code(alphabet, 7).bytes() {
                counts[usize::from(c - b'a')] += 1;
            }
        }
        for (i, count) in counts.iter().enumerate() {
            assert!(
                (98_500..=101_500).contains(count),
                "character {i} drawn {count} times of 700,000: {counts:?}"
            );
        }
    }

    #[test]
    fn options_are_validated() {
        let bad = [
            OtpOptions::default().code_length(3),
            OtpOptions::default().code_length(33),
            OtpOptions::default().alphabet("0"),
            OtpOptions::default().alphabet("0123401"),
            OtpOptions::default().alphabet("01 2"),
            OtpOptions::default().ttl(Duration::ZERO),
            OtpOptions::default().max_attempts(0),
            OtpOptions::default().resend_budget(1, Duration::ZERO),
            OtpOptions::default().failure_budget(0, Duration::from_secs(1)),
        ];
        for options in bad {
            let b: Arc<dyn Backend> = Arc::new(Embedded::memory());
            let secret = OtpSecret::from_bytes(&[1u8; 32]).unwrap();
            assert!(
                matches!(
                    Otp::new(b, secret, options.clone()),
                    Err(OtpError::Invalid { .. })
                ),
                "{options:?} was accepted"
            );
        }
        assert!(matches!(
            OtpSecret::from_bytes(&[1u8; 31]),
            Err(OtpError::Invalid {
                field: "secret",
                ..
            })
        ));
    }

    #[tokio::test]
    async fn only_a_keyed_hash_is_stored_and_keys_do_not_name_the_subject() {
        let (b, otp, _) = otp(OtpOptions::default().code_length(8));
        let issued = otp.issue("alice@example.com", "login").await.unwrap();
        let page = b.scan(b"otp:", None, 100).await.unwrap();
        assert_eq!(
            page.keys.len(),
            2,
            "the code and the resend counter: {page:?}"
        );
        for key in &page.keys {
            let key = String::from_utf8_lossy(key);
            assert!(!key.contains("alice"), "{key} names the subject");
        }
        let code_key = page
            .keys
            .iter()
            .find(|k| k.starts_with(b"otp:code:login:"))
            .unwrap();
        let raw = b.get(code_key).await.unwrap().unwrap();
        assert_eq!(raw.len(), RECORD_BYTES);
        let needle = issued.code().as_str().as_bytes();
        assert!(
            !raw.windows(needle.len()).any(|w| w == needle),
            "the code is stored in clear"
        );
        assert!(
            !format!("{issued:?}").contains(issued.code().as_str()),
            "Debug prints the code"
        );
    }

    #[tokio::test]
    async fn expiry_follows_the_injected_clock() {
        let (_, otp, clock) = otp(OtpOptions::default());
        let issued = otp.issue("bob", "login").await.unwrap();
        clock.advance(CODE_TTL_DEFAULT);
        assert_eq!(
            otp.verify("bob", "login", issued.code().as_str())
                .await
                .unwrap(),
            Verification::ExpiredOrUnknown
        );
    }

    #[tokio::test]
    async fn corrupt_record_is_reported() {
        let (b, otp, _) = otp(OtpOptions::default());
        otp.issue("carol", "login").await.unwrap();
        let page = b.scan(b"otp:code:", None, 10).await.unwrap();
        b.set(&page.keys[0], b"garbage", None).await.unwrap();
        match otp.verify("carol", "login", "123456").await {
            Err(OtpError::Backend(e)) => assert_eq!(e.kind(), ErrorKind::Corruption),
            other => panic!("expected Corruption, got {other:?}"),
        }
    }
}
