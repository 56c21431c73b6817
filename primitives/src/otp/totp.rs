//! Authenticator-app codes: HOTP (RFC 4226) and TOTP (RFC 6238) with HMAC-SHA1, -SHA256 or
//! -SHA512, base32 secrets, `otpauth://` provisioning URIs, and **replay protection** on the
//! [`Backend`]: [`TotpGuard`] stores the last accepted time step per subject and advances it
//! atomically, so a code accepted once is refused the second time, also when two requests race
//! with the same code.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
//! use std::sync::Arc;
//! use keel_primitives::Embedded;
//! use keel_primitives::otp::totp::{Totp, TotpCheck, TotpGuard, TotpSecret};
//!
//! let secret = TotpSecret::generate(); // store secret.to_base32() with the account
//! let totp = Totp::new(secret);
//! let uri = totp.otpauth_uri("Example", "alice@example.com")?; // show as a QR code
//! assert!(uri.starts_with("otpauth://totp/Example:alice%40example.com?secret="));
//!
//! let guard = TotpGuard::new(Arc::new(Embedded::memory()));
//! let now_ms = guard.now_ms().await?;
//! let code = totp.generate_at(now_ms);
//! assert!(matches!(guard.verify("alice", &totp, &code).await?, TotpCheck::Accepted { .. }));
//! assert!(matches!(guard.verify("alice", &totp, &code).await?, TotpCheck::Replayed { .. }));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })
//! # }
//! ```
//!
//! # Replay protection
//! The key `otp:totp:{subject}` holds the last accepted time step (u64, 8 bytes little-endian).
//! [`TotpGuard::verify`] finds the newest step in the skew window whose code matches (each
//! candidate compared in constant time), then, in a compare-and-swap loop, accepts it only if
//! it is newer than the stored step and the swap from the value it read succeeds. Two
//! concurrent verifications of one code: one swap wins, the other re-reads, finds the step
//! already accepted and reports [`TotpCheck::Replayed`]. The key's TTL is `(2 × skew + 2)`
//! steps, longer than any accepted step can stay inside the window, so a lapsed key can never
//! readmit an old code.
//!
//! HOTP needs its counter stored durably with the secret (it is account state, not
//! ephemeral); [`Hotp::verify`] returns the counter that matched, and the caller stores the
//! next one with its own atomic update.
//!
//! TOTP guesses are not counted here: put a rate limiter (or [`super::Otp`]-style failure
//! budget) in front, since 6 digits are guessed in 10^6 tries.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use data_encoding::BASE32_NOPAD;
use hmac::{Hmac, KeyInit, Mac};
use subtle::ConstantTimeEq;

use super::{Clock, OtpError, SUBJECT_BYTES_MAX, invalid};
use crate::backend::{Backend, TtlPolicy};
use crate::error::{Error, ErrorKind};

/// Fewest and most digits a code may have (RFC 4226 requires at least 6; the truncated
/// 31-bit value fills at most 9 decimal digits).
pub const DIGITS_MIN: u32 = 6;
/// See [`DIGITS_MIN`].
pub const DIGITS_MAX: u32 = 9;
/// Shortest secret, in bytes (RFC 4226 §4: at least 128 bits; 160 recommended).
pub const SECRET_BYTES_MIN: usize = 16;
/// Longest secret, in bytes.
pub const SECRET_BYTES_MAX: usize = 128;
/// Length of [`TotpSecret::generate`]'s secrets (160 bits, RFC 4226's recommendation).
pub const SECRET_BYTES_DEFAULT: usize = 20;
/// Default time step.
pub const STEP_DEFAULT: Duration = Duration::from_secs(30);
/// Longest time step.
pub const STEP_MAX: Duration = Duration::from_secs(3600);
/// Default accepted skew, in steps each side of now.
pub const SKEW_DEFAULT: u32 = 1;
/// Largest accepted skew, in steps.
pub const SKEW_MAX: u32 = 10;
/// Most counters [`Hotp::verify`] looks ahead.
pub const LOOK_AHEAD_MAX: u32 = 100;
/// Compare-and-swap rounds [`TotpGuard::verify`] tries. Every lost round means another
/// verification advanced the step, so after at most `2 × skew + 1` rounds the code is either
/// accepted or a replay; this bound is never reached by honest traffic.
pub const GUARD_CAS_ROUNDS_MAX: u32 = 2 * SKEW_MAX + 2;
/// Prefix of the last-accepted-step keys: `otp:totp:{subject}`.
pub const KEY_PREFIX: &[u8] = b"otp:totp:";

/// The HMAC behind the codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Algorithm {
    /// HMAC-SHA1: the default, and what most authenticator apps support.
    #[default]
    Sha1,
    /// HMAC-SHA256.
    Sha256,
    /// HMAC-SHA512.
    Sha512,
}

impl Algorithm {
    fn uri_name(self) -> &'static str {
        match self {
            Algorithm::Sha1 => "SHA1",
            Algorithm::Sha256 => "SHA256",
            Algorithm::Sha512 => "SHA512",
        }
    }

    fn mac(self, key: &[u8], message: &[u8]) -> Vec<u8> {
        fn run<M: Mac + KeyInit>(key: &[u8], message: &[u8]) -> Vec<u8> {
            // HMAC takes keys of any length (long ones are hashed): this cannot fail.
            let mut mac = <M as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
            mac.update(message);
            mac.finalize().into_bytes().to_vec()
        }
        match self {
            Algorithm::Sha1 => run::<Hmac<sha1::Sha1>>(key, message),
            Algorithm::Sha256 => run::<Hmac<sha2::Sha256>>(key, message),
            Algorithm::Sha512 => run::<Hmac<sha2::Sha512>>(key, message),
        }
    }
}

/// A shared HOTP/TOTP secret. Its `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct TotpSecret(Vec<u8>);

impl fmt::Debug for TotpSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TotpSecret({} bytes)", self.0.len())
    }
}

impl TotpSecret {
    /// A new random secret of [`SECRET_BYTES_DEFAULT`] bytes from the thread's CSPRNG.
    pub fn generate() -> Self {
        let bytes: [u8; SECRET_BYTES_DEFAULT] = rand::random();
        TotpSecret(bytes.to_vec())
    }

    /// A secret from raw bytes.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] if shorter than [`SECRET_BYTES_MIN`] or longer than
    /// [`SECRET_BYTES_MAX`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, OtpError> {
        if !(SECRET_BYTES_MIN..=SECRET_BYTES_MAX).contains(&bytes.len()) {
            return Err(invalid(
                "secret",
                format!(
                    "a HOTP/TOTP secret is {SECRET_BYTES_MIN} to {SECRET_BYTES_MAX} bytes, got {}",
                    bytes.len()
                ),
            ));
        }
        Ok(TotpSecret(bytes.to_vec()))
    }

    /// A secret from base32 (RFC 4648), as authenticator apps show it: case, spaces and `=`
    /// padding are ignored.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for anything that is not base32, or a secret of the wrong size.
    pub fn from_base32(text: &str) -> Result<Self, OtpError> {
        let cleaned: String = text
            .chars()
            .filter(|c| !c.is_whitespace() && *c != '=' && *c != '-')
            .map(|c| c.to_ascii_uppercase())
            .collect();
        let bytes = BASE32_NOPAD
            .decode(cleaned.as_bytes())
            .map_err(|e| invalid("secret", format!("not base32: {e}")))?;
        TotpSecret::from_bytes(&bytes)
    }

    /// The secret in unpadded base32, for storage and `otpauth://` URIs.
    pub fn to_base32(&self) -> String {
        BASE32_NOPAD.encode(&self.0)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// The RFC 4226 HOTP value of `counter`: HMAC of the big-endian counter, dynamic truncation,
/// `digits` decimal digits with leading zeros.
///
/// # Errors
/// [`OtpError::Invalid`] for `digits` outside [`DIGITS_MIN`]..=[`DIGITS_MAX`].
pub fn hotp(
    secret: &TotpSecret,
    counter: u64,
    digits: u32,
    algorithm: Algorithm,
) -> Result<String, OtpError> {
    check_digits(digits)?;
    Ok(hotp_unchecked(
        secret.as_bytes(),
        counter,
        digits,
        algorithm,
    ))
}

fn hotp_unchecked(secret: &[u8], counter: u64, digits: u32, algorithm: Algorithm) -> String {
    let mac = algorithm.mac(secret, &counter.to_be_bytes());
    // Every HMAC output here is at least 20 bytes, and the offset is at most 15: in bounds.
    let offset = usize::from(mac[mac.len() - 1] & 0x0f);
    let binary = u32::from_be_bytes([
        mac[offset] & 0x7f,
        mac[offset + 1],
        mac[offset + 2],
        mac[offset + 3],
    ]);
    let value = binary % 10u32.pow(digits);
    format!("{value:0width$}", width = digits as usize)
}

fn check_digits(digits: u32) -> Result<(), OtpError> {
    if !(DIGITS_MIN..=DIGITS_MAX).contains(&digits) {
        return Err(invalid(
            "options",
            format!("codes have {DIGITS_MIN} to {DIGITS_MAX} digits, got {digits}"),
        ));
    }
    Ok(())
}

fn check_code_shape(code: &str, digits: u32) -> Result<(), OtpError> {
    if code.len() != digits as usize || !code.bytes().all(|c| c.is_ascii_digit()) {
        return Err(invalid(
            "code",
            format!("a code is exactly {digits} decimal digits"),
        ));
    }
    Ok(())
}

fn ct_eq_str(a: &str, b: &str) -> bool {
    bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Counter-based codes (RFC 4226).
#[derive(Debug, Clone)]
pub struct Hotp {
    secret: TotpSecret,
    digits: u32,
    algorithm: Algorithm,
}

impl Hotp {
    /// HOTP with `secret`, 6 digits, HMAC-SHA1.
    pub fn new(secret: TotpSecret) -> Self {
        Hotp {
            secret,
            digits: DIGITS_MIN,
            algorithm: Algorithm::Sha1,
        }
    }

    /// Sets the number of digits.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] outside [`DIGITS_MIN`]..=[`DIGITS_MAX`].
    pub fn with_digits(mut self, digits: u32) -> Result<Self, OtpError> {
        check_digits(digits)?;
        self.digits = digits;
        Ok(self)
    }

    /// Sets the HMAC algorithm.
    pub fn with_algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// The code for `counter`.
    pub fn generate(&self, counter: u64) -> String {
        hotp_unchecked(self.secret.as_bytes(), counter, self.digits, self.algorithm)
    }

    /// The counter in `counter..=counter + look_ahead` whose code is `code`, if any (every
    /// candidate is compared, in constant time). Store `matched + 1` as the next counter.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for a code that is not `digits` decimal digits, or a look-ahead
    /// over [`LOOK_AHEAD_MAX`].
    pub fn verify(
        &self,
        code: &str,
        counter: u64,
        look_ahead: u32,
    ) -> Result<Option<u64>, OtpError> {
        check_code_shape(code, self.digits)?;
        if look_ahead > LOOK_AHEAD_MAX {
            return Err(invalid(
                "options",
                format!("look-ahead {look_ahead} is over {LOOK_AHEAD_MAX}"),
            ));
        }
        let mut matched = None;
        for c in (counter..=counter.saturating_add(u64::from(look_ahead))).rev() {
            if ct_eq_str(&self.generate(c), code) {
                matched = Some(c);
            }
        }
        Ok(matched)
    }

    /// The `otpauth://hotp/…` provisioning URI, starting at `counter`.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for an empty issuer or account, or one containing `:`.
    pub fn otpauth_uri(
        &self,
        issuer: &str,
        account: &str,
        counter: u64,
    ) -> Result<String, OtpError> {
        let mut uri = otpauth_base(
            "hotp",
            issuer,
            account,
            &self.secret,
            self.algorithm,
            self.digits,
        )?;
        uri.push_str(&format!("&counter={counter}"));
        Ok(uri)
    }
}

/// Time-based codes (RFC 6238).
#[derive(Debug, Clone)]
pub struct Totp {
    secret: TotpSecret,
    digits: u32,
    algorithm: Algorithm,
    step_secs: u64,
    t0_secs: u64,
    skew: u32,
}

impl Totp {
    /// TOTP with `secret`, 6 digits, HMAC-SHA1, 30-second steps from the Unix epoch, and a
    /// skew of one step each side: what authenticator apps expect.
    pub fn new(secret: TotpSecret) -> Self {
        Totp {
            secret,
            digits: DIGITS_MIN,
            algorithm: Algorithm::Sha1,
            step_secs: STEP_DEFAULT.as_secs(),
            t0_secs: 0,
            skew: SKEW_DEFAULT,
        }
    }

    /// Sets the number of digits.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] outside [`DIGITS_MIN`]..=[`DIGITS_MAX`].
    pub fn with_digits(mut self, digits: u32) -> Result<Self, OtpError> {
        check_digits(digits)?;
        self.digits = digits;
        Ok(self)
    }

    /// Sets the HMAC algorithm.
    pub fn with_algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Sets the time step: whole seconds, 1 s to [`STEP_MAX`].
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for a step that is zero, fractional or too long.
    pub fn with_step(mut self, step: Duration) -> Result<Self, OtpError> {
        if step.subsec_nanos() != 0 || step.is_zero() || step > STEP_MAX {
            return Err(invalid(
                "options",
                format!("the step must be whole seconds, 1 s to {STEP_MAX:?}, got {step:?}"),
            ));
        }
        self.step_secs = step.as_secs();
        Ok(self)
    }

    /// Sets how many steps before and after now are accepted (clock skew, typing time), at
    /// most [`SKEW_MAX`].
    ///
    /// # Errors
    /// [`OtpError::Invalid`] over [`SKEW_MAX`].
    pub fn with_skew(mut self, skew: u32) -> Result<Self, OtpError> {
        if skew > SKEW_MAX {
            return Err(invalid(
                "options",
                format!("skew {skew} is over {SKEW_MAX}"),
            ));
        }
        self.skew = skew;
        Ok(self)
    }

    /// Sets T0, the Unix time (seconds) counting starts from. Default 0.
    pub fn with_t0(mut self, t0_secs: u64) -> Self {
        self.t0_secs = t0_secs;
        self
    }

    /// The time step `unix_ms` falls in (0 before T0).
    pub fn step_at(&self, unix_ms: u64) -> u64 {
        (unix_ms / 1000).saturating_sub(self.t0_secs) / self.step_secs
    }

    /// The code for time step `step`.
    pub fn generate_step(&self, step: u64) -> String {
        hotp_unchecked(self.secret.as_bytes(), step, self.digits, self.algorithm)
    }

    /// The code valid at `unix_ms`.
    pub fn generate_at(&self, unix_ms: u64) -> String {
        self.generate_step(self.step_at(unix_ms))
    }

    /// The newest step within the skew window around `unix_ms` whose code is `code`, if any.
    /// Every candidate is compared, in constant time. This alone does not stop replays: use
    /// [`TotpGuard::verify`].
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for a code that is not `digits` decimal digits.
    pub fn matching_step(&self, code: &str, unix_ms: u64) -> Result<Option<u64>, OtpError> {
        check_code_shape(code, self.digits)?;
        let now = self.step_at(unix_ms);
        let first = now.saturating_sub(u64::from(self.skew));
        let last = now.saturating_add(u64::from(self.skew));
        let mut matched = None;
        for step in first..=last {
            if ct_eq_str(&self.generate_step(step), code) {
                matched = Some(step);
            }
        }
        Ok(matched)
    }

    /// The `otpauth://totp/{issuer}:{account}?secret=…&issuer=…&algorithm=…&digits=…&period=…`
    /// provisioning URI (Google Authenticator's key URI format), percent-encoded.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for an empty issuer or account, or one containing `:`.
    pub fn otpauth_uri(&self, issuer: &str, account: &str) -> Result<String, OtpError> {
        let mut uri = otpauth_base(
            "totp",
            issuer,
            account,
            &self.secret,
            self.algorithm,
            self.digits,
        )?;
        uri.push_str(&format!("&period={}", self.step_secs));
        Ok(uri)
    }

    /// The key's lifetime: longer than any accepted step can stay inside the window.
    fn guard_ttl(&self) -> Duration {
        Duration::from_secs(self.step_secs * (2 * u64::from(self.skew) + 2))
    }
}

fn otpauth_base(
    kind: &str,
    issuer: &str,
    account: &str,
    secret: &TotpSecret,
    algorithm: Algorithm,
    digits: u32,
) -> Result<String, OtpError> {
    for (field, value) in [("issuer", issuer), ("account", account)] {
        if value.is_empty() || value.contains(':') {
            return Err(invalid(
                field,
                format!("{value:?} must be non-empty and must not contain ':'"),
            ));
        }
    }
    Ok(format!(
        "otpauth://{kind}/{}:{}?secret={}&issuer={}&algorithm={}&digits={digits}",
        percent_encode(issuer),
        percent_encode(account),
        secret.to_base32(),
        percent_encode(issuer),
        algorithm.uri_name(),
    ))
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The outcome of [`TotpGuard::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TotpCheck {
    /// The code matched a step newer than any accepted before; that step is now recorded.
    Accepted {
        /// The accepted time step.
        step: u64,
    },
    /// The code matched, but its step was already accepted (or a newer one was): a replay.
    Replayed {
        /// The step the code belongs to.
        step: u64,
    },
    /// The code matches no step in the window.
    Rejected,
}

impl TotpCheck {
    /// True for [`TotpCheck::Accepted`].
    pub fn is_accepted(self) -> bool {
        matches!(self, TotpCheck::Accepted { .. })
    }
}

/// TOTP verification with replay protection on a backend. Cheap to clone.
#[derive(Clone)]
pub struct TotpGuard {
    backend: Arc<dyn Backend>,
    clock: Option<Arc<dyn Clock>>,
}

impl fmt::Debug for TotpGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TotpGuard")
            .field("backend", &self.backend.name())
            .field(
                "clock",
                &if self.clock.is_some() {
                    "injected"
                } else {
                    "backend"
                },
            )
            .finish()
    }
}

impl TotpGuard {
    /// A guard on `backend`, reading time from the backend's trusted clock.
    pub fn new(backend: Arc<dyn Backend>) -> Self {
        TotpGuard {
            backend,
            clock: None,
        }
    }

    /// Reads time from `clock` instead (tests, or the local clock to save a round trip).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Now, Unix ms, on the clock this guard uses.
    ///
    /// # Errors
    /// Backend failures.
    pub async fn now_ms(&self) -> Result<u64, OtpError> {
        match &self.clock {
            Some(clock) => Ok(clock.now_ms()),
            None => Ok(self.backend.now_ms().await?),
        }
    }

    /// Verifies `code` for `subject` (the account; 1 to [`SUBJECT_BYTES_MAX`] bytes) with
    /// `totp`, accepting each time step at most once per subject. See the module docs.
    ///
    /// # Errors
    /// [`OtpError::Invalid`] for a bad subject or code shape (nothing written);
    /// [`OtpError::Contention`] (see [`GUARD_CAS_ROUNDS_MAX`]); [`OtpError::Backend`], with
    /// [`ErrorKind::Corruption`] if the key holds something else.
    pub async fn verify(
        &self,
        subject: impl AsRef<[u8]>,
        totp: &Totp,
        code: &str,
    ) -> Result<TotpCheck, OtpError> {
        let subject = subject.as_ref();
        super::validate_subject(subject)?;
        check_code_shape(code, totp.digits)?;
        let now = self.now_ms().await?;
        let Some(step) = totp.matching_step(code, now)? else {
            return Ok(TotpCheck::Rejected);
        };
        let mut key = Vec::with_capacity(KEY_PREFIX.len() + subject.len());
        key.extend_from_slice(KEY_PREFIX);
        key.extend_from_slice(subject);
        let ttl = totp.guard_ttl();
        let new = step.to_le_bytes();
        for _ in 0..GUARD_CAS_ROUNDS_MAX {
            let current = self.backend.get(&key).await?;
            if let Some(raw) = &current {
                let last = decode_step(&key, raw)?;
                if last >= step {
                    return Ok(TotpCheck::Replayed { step });
                }
            }
            if self
                .backend
                .compare_and_swap(&key, current.as_deref(), &new, TtlPolicy::Set(ttl))
                .await?
            {
                return Ok(TotpCheck::Accepted { step });
            }
        }
        Err(OtpError::Contention {
            rounds: GUARD_CAS_ROUNDS_MAX,
        })
    }
}

const _: () = assert!(KEY_PREFIX.len() + SUBJECT_BYTES_MAX <= crate::backend::KEY_BYTES_MAX);

fn decode_step(key: &[u8], raw: &[u8]) -> Result<u64, Error> {
    let bytes: [u8; 8] = raw.try_into().map_err(|_| {
        Error::new(
            ErrorKind::Corruption,
            format!(
                "TOTP step record {:?} holds {} bytes, not 8; fix or delete it",
                String::from_utf8_lossy(key),
                raw.len()
            ),
        )
    })?;
    Ok(u64::from_le_bytes(bytes))
}

/// The RFC test vectors, shared by the unit tests and the conformance suite.
#[doc(hidden)]
pub mod vectors {
    use super::Algorithm;

    /// RFC 4226 Appendix D: the secret `"12345678901234567890"`.
    pub const HOTP_SECRET: &[u8] = b"12345678901234567890";
    /// RFC 4226 Appendix D: the 6-digit HOTP values for counters 0 to 9.
    pub const HOTP: [&str; 10] = [
        "755224", "287082", "359152", "969429", "338314", "254676", "287922", "162583", "399871",
        "520489",
    ];

    /// RFC 6238 Appendix B: the seed for `algorithm` (20, 32 and 64 bytes).
    pub fn totp_secret(algorithm: Algorithm) -> &'static [u8] {
        match algorithm {
            Algorithm::Sha1 => b"12345678901234567890",
            Algorithm::Sha256 => b"12345678901234567890123456789012",
            Algorithm::Sha512 => {
                b"1234567890123456789012345678901234567890123456789012345678901234"
            }
        }
    }

    /// RFC 6238 Appendix B: (Unix seconds, 8-digit SHA1, SHA256, SHA512 codes), 30 s steps.
    pub const TOTP: [(u64, &str, &str, &str); 6] = [
        (59, "94287082", "46119246", "90693936"),
        (1_111_111_109, "07081804", "68084774", "25091201"),
        (1_111_111_111, "14050471", "67062674", "99943326"),
        (1_234_567_890, "89005924", "91819424", "93441116"),
        (2_000_000_000, "69279037", "90698825", "38618901"),
        (20_000_000_000, "65353130", "77737706", "47863826"),
    ];
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Embedded;
    use keel_engine::ManualClock;

    #[test]
    fn rfc4226_appendix_d_vectors() {
        let secret = TotpSecret::from_bytes(vectors::HOTP_SECRET).unwrap();
        let hotp = Hotp::new(secret.clone());
        for (counter, expected) in vectors::HOTP.iter().enumerate() {
            assert_eq!(
                hotp.generate(counter as u64),
                *expected,
                "counter {counter}"
            );
            assert_eq!(
                super::hotp(&secret, counter as u64, 6, Algorithm::Sha1).unwrap(),
                *expected
            );
        }
        assert_eq!(hotp.verify("969429", 1, 5).unwrap(), Some(3));
        assert_eq!(
            hotp.verify("969429", 4, 5).unwrap(),
            None,
            "counters only move forward"
        );
    }

    #[test]
    fn rfc6238_appendix_b_vectors() {
        for (algorithm, column) in [
            (Algorithm::Sha1, 1),
            (Algorithm::Sha256, 2),
            (Algorithm::Sha512, 3),
        ] {
            let secret = TotpSecret::from_bytes(vectors::totp_secret(algorithm)).unwrap();
            let totp = Totp::new(secret)
                .with_digits(8)
                .unwrap()
                .with_algorithm(algorithm);
            for row in vectors::TOTP {
                let expected = [row.1, row.2, row.3][column - 1];
                assert_eq!(
                    totp.generate_at(row.0 * 1000),
                    expected,
                    "{algorithm:?} at {}",
                    row.0
                );
                assert_eq!(
                    totp.matching_step(expected, row.0 * 1000).unwrap(),
                    Some(row.0 / 30)
                );
            }
        }
    }

    #[test]
    fn secrets_round_trip_through_base32_and_uris_are_encoded() {
        let secret = TotpSecret::from_bytes(b"12345678901234567890").unwrap();
        assert_eq!(secret.to_base32(), "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ");
        let lenient = TotpSecret::from_base32("gezd gnbv gy3t qojq gezd gnbv gy3t qojq").unwrap();
        assert_eq!(lenient, secret);
        assert!(TotpSecret::from_base32("not base32!").is_err());
        assert!(
            TotpSecret::from_base32("GEZDGNBV").is_err(),
            "too short a secret"
        );
        assert!(!format!("{secret:?}").contains("GEZ"));
        let totp = Totp::new(secret);
        assert_eq!(
            totp.otpauth_uri("ACME Co", "john.doe@email.com").unwrap(),
            "otpauth://totp/ACME%20Co:john.doe%40email.com?secret=GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ\
             &issuer=ACME%20Co&algorithm=SHA1&digits=6&period=30"
        );
        assert!(totp.otpauth_uri("a:b", "c").is_err());
    }

    #[test]
    fn bad_shapes_are_refused() {
        let totp = Totp::new(TotpSecret::generate());
        for code in ["", "12345", "1234567", "12345a", "１２３４５６"] {
            assert!(
                matches!(
                    totp.matching_step(code, 0),
                    Err(OtpError::Invalid { field: "code", .. })
                ),
                "{code:?}"
            );
        }
        assert!(Totp::new(TotpSecret::generate()).with_digits(5).is_err());
        assert!(
            Totp::new(TotpSecret::generate())
                .with_step(Duration::ZERO)
                .is_err()
        );
        assert!(
            Totp::new(TotpSecret::generate())
                .with_skew(SKEW_MAX + 1)
                .is_err()
        );
    }

    #[tokio::test]
    async fn an_accepted_step_is_never_accepted_again_and_older_steps_are_replays() {
        let clock = ManualClock::new(1_111_111_111_000);
        let guard =
            TotpGuard::new(Arc::new(Embedded::memory())).with_clock(Arc::new(clock.clone()));
        let totp = Totp::new(TotpSecret::from_bytes(b"12345678901234567890").unwrap());
        let now = totp.step_at(clock.now_ms());
        let current = totp.generate_step(now);
        assert_eq!(
            guard.verify("u", &totp, &current).await.unwrap(),
            TotpCheck::Accepted { step: now }
        );
        assert_eq!(
            guard.verify("u", &totp, &current).await.unwrap(),
            TotpCheck::Replayed { step: now }
        );
        // The previous step's code is still inside the skew window, but older than accepted.
        let previous = totp.generate_step(now - 1);
        assert_eq!(
            guard.verify("u", &totp, &previous).await.unwrap(),
            TotpCheck::Replayed { step: now - 1 }
        );
        // Another subject has its own record.
        assert!(
            guard
                .verify("v", &totp, &current)
                .await
                .unwrap()
                .is_accepted()
        );
    }
}
