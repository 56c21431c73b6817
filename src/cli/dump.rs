//! The dump format shared by `keel dump` and `keel load`: JSON lines, one object per live key,
//! `{"key":"…","value":"…","expires_at_ms":1234}` with `expires_at_ms` null when the key does
//! not expire. Keys and values are bytes, JSON strings are text, so a key or value that is not
//! valid UTF-8 is written base64-encoded (standard alphabet, padded) under `key_b64` /
//! `value_b64` instead. The reader here validates a whole input before anything is written,
//! and bounds every line so a malformed input cannot make it buffer without limit.

use std::io::{self, BufRead, Read as _};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::Serialize;
use serde_json::{Map, Value};

/// At most this many invalid lines are described when an input is rejected; the rest are
/// only counted.
pub const LOAD_ERRORS_SHOWN_MAX: usize = 20;

/// The fields a dump line may carry; anything else is rejected so a typo is not ignored.
const FIELDS: [&str; 5] = ["key", "key_b64", "value", "value_b64", "expires_at_ms"];

/// One dump line as written. Field order is the order in the output.
#[derive(Serialize)]
struct Line<'a> {
    /// The key, when it is valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    /// The key in base64, when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    key_b64: Option<String>,
    /// The value, when it is valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a str>,
    /// The value in base64, when it is not valid UTF-8.
    #[serde(skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
    /// Absolute expiry in Unix milliseconds; always present, null for no expiry.
    expires_at_ms: Option<u64>,
}

/// The JSON line (without its newline) for one key.
///
/// # Errors
/// Only if JSON serialization fails, which it does not for these field types; the error is
/// passed on rather than assumed away.
pub fn encode_line(
    key: &[u8],
    value: &[u8],
    expires_at_ms: Option<u64>,
) -> Result<String, serde_json::Error> {
    let (key_text, key_b64) = text_or_base64(key);
    let (value_text, value_b64) = text_or_base64(value);
    serde_json::to_string(&Line {
        key: key_text,
        key_b64,
        value: value_text,
        value_b64,
        expires_at_ms,
    })
}

/// The text of `bytes` if it is valid UTF-8, else its base64 encoding: exactly one is `Some`.
fn text_or_base64(bytes: &[u8]) -> (Option<&str>, Option<String>) {
    match std::str::from_utf8(bytes) {
        Ok(text) => (Some(text), None),
        Err(_) => (None, Some(BASE64.encode(bytes))),
    }
}

/// One validated entry of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The key.
    pub key: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
    /// Absolute expiry in Unix milliseconds; `None` if the key does not expire.
    pub expires_at_ms: Option<u64>,
}

/// Size limits a dump line must respect: those of the store it will be loaded into.
#[derive(Debug, Clone, Copy)]
pub struct RecordLimits {
    /// Largest key, in bytes.
    pub key_bytes_max: usize,
    /// Largest value, in bytes.
    pub value_bytes_max: usize,
}

impl RecordLimits {
    /// The longest line a valid record can need: JSON may escape every byte of a UTF-8 key or
    /// value as a six-byte `\u00NN`, plus room for the field names and the expiry.
    pub fn line_bytes_max(&self) -> usize {
        const LINE_OVERHEAD_BYTES: usize = 4096;
        self.key_bytes_max
            .saturating_add(self.value_bytes_max)
            .saturating_mul(6)
            .saturating_add(LINE_OVERHEAD_BYTES)
    }
}

/// The outcome of reading a whole dump.
#[derive(Debug, Default)]
pub struct Validation {
    /// Every valid record, in input order.
    pub records: Vec<Record>,
    /// The first [`LOAD_ERRORS_SHOWN_MAX`] problems, each prefixed with its line number.
    pub errors: Vec<String>,
    /// How many lines were invalid in total.
    pub invalid_lines: usize,
}

/// Reads and validates every line of `reader`. Blank lines are ignored. Nothing is written
/// anywhere: the caller decides what to do once it knows whether the whole input is valid.
///
/// # Errors
/// Only I/O errors from `reader`; bad lines are reported in [`Validation::errors`].
pub fn read_dump(mut reader: impl BufRead, limits: RecordLimits) -> io::Result<Validation> {
    let line_max = limits.line_bytes_max();
    let mut out = Validation::default();
    let mut buf = Vec::new();
    let mut line_no: u64 = 0;
    loop {
        buf.clear();
        let read = (&mut reader)
            .take(line_max as u64 + 1)
            .read_until(b'\n', &mut buf)?;
        if read == 0 {
            break;
        }
        line_no += 1;
        let result = if buf.last() != Some(&b'\n') && buf.len() > line_max {
            // Drop the rest of the over-long line so the next line is numbered correctly.
            reader.skip_until(b'\n')?;
            Err(format!(
                "line is longer than {line_max} bytes, more than any valid record needs"
            ))
        } else {
            let line = buf.strip_suffix(b"\n").unwrap_or(&buf);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            parse_line(line, limits)
        };
        match result {
            Ok(record) => out.records.push(record),
            Err(why) => {
                out.invalid_lines += 1;
                if out.errors.len() < LOAD_ERRORS_SHOWN_MAX {
                    out.errors.push(format!("line {line_no}: {why}"));
                }
            }
        }
    }
    Ok(out)
}

/// Parses and validates one dump line.
///
/// # Errors
/// A sentence saying what is wrong with the line.
pub fn parse_line(line: &[u8], limits: RecordLimits) -> Result<Record, String> {
    let value: Value = serde_json::from_slice(line).map_err(|e| format!("bad JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err("expected a JSON object".to_owned());
    };
    if let Some(unknown) = object.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field {unknown:?} (expected key or key_b64, value or value_b64, expires_at_ms)"
        ));
    }
    let key = bytes_field(&object, "key")?;
    if key.len() > limits.key_bytes_max {
        return Err(format!(
            "key is {} bytes, the limit is {} bytes",
            key.len(),
            limits.key_bytes_max
        ));
    }
    let value = bytes_field(&object, "value")?;
    if value.len() > limits.value_bytes_max {
        return Err(format!(
            "value is {} bytes, the limit is {} bytes",
            value.len(),
            limits.value_bytes_max
        ));
    }
    let expires_at_ms = match object.get("expires_at_ms") {
        None => {
            return Err(
                "missing field \"expires_at_ms\" (null for a key without expiry)".to_owned(),
            );
        }
        Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or_else(|| {
            format!("\"expires_at_ms\" must be null or a non-negative integer, found {v}")
        })?),
    };
    Ok(Record {
        key,
        value,
        expires_at_ms,
    })
}

/// Reads the bytes of `name` from exactly one of the fields `name` (a JSON string) and
/// `name_b64` (base64 text).
fn bytes_field(object: &Map<String, Value>, name: &str) -> Result<Vec<u8>, String> {
    let b64_name = format!("{name}_b64");
    match (object.get(name), object.get(&b64_name)) {
        (Some(_), Some(_)) => Err(format!(
            "both \"{name}\" and \"{b64_name}\" are present; give exactly one"
        )),
        (None, None) => Err(format!("missing field \"{name}\" (or \"{b64_name}\")")),
        (Some(Value::String(text)), None) => Ok(text.clone().into_bytes()),
        (Some(other), None) => Err(format!("\"{name}\" must be a string, found {other}")),
        (None, Some(Value::String(text))) => BASE64
            .decode(text)
            .map_err(|e| format!("\"{b64_name}\" is not valid base64: {e}")),
        (None, Some(other)) => Err(format!(
            "\"{b64_name}\" must be a base64 string, found {other}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RecordLimits = RecordLimits {
        key_bytes_max: 8,
        value_bytes_max: 16,
    };

    #[test]
    fn text_and_binary_round_trip() {
        for (key, value, at) in [
            (&b"k"[..], &b"v"[..], None),
            (b"\xff\x00", b"\x80bin", Some(1234)),
            (b"", b"", Some(0)),
        ] {
            let line = encode_line(key, value, at).unwrap();
            let back = parse_line(line.as_bytes(), LIMITS).unwrap();
            assert_eq!(back.key, key);
            assert_eq!(back.value, value);
            assert_eq!(back.expires_at_ms, at);
        }
        assert_eq!(
            encode_line(b"k", b"\xff", None).unwrap(),
            r#"{"key":"k","value_b64":"/w==","expires_at_ms":null}"#
        );
    }

    #[test]
    fn every_kind_of_bad_line_is_rejected_with_a_reason() {
        let cases: [(&str, &str); 10] = [
            ("{", "bad JSON"),
            ("[1]", "JSON object"),
            (
                r#"{"value":"v","expires_at_ms":null}"#,
                "missing field \"key\"",
            ),
            (
                r#"{"key":"k","key_b64":"aw==","value":"v","expires_at_ms":null}"#,
                "both",
            ),
            (
                r#"{"key":"k","expires_at_ms":null}"#,
                "missing field \"value\"",
            ),
            (r#"{"key":"k","value":"v"}"#, "expires_at_ms"),
            (
                r#"{"key_b64":"!!","value":"v","expires_at_ms":null}"#,
                "not valid base64",
            ),
            (
                r#"{"key":"123456789","value":"v","expires_at_ms":null}"#,
                "limit is 8",
            ),
            (
                r#"{"key":"k","value":"v","expires_at_ms":-1}"#,
                "non-negative",
            ),
            (
                r#"{"key":"k","value":"v","expires_at_ms":null,"ttl":1}"#,
                "unknown field",
            ),
        ];
        for (line, expected) in cases {
            let err = parse_line(line.as_bytes(), LIMITS).unwrap_err();
            assert!(err.contains(expected), "{line}: {err}");
        }
    }

    #[test]
    fn read_dump_numbers_lines_skips_blanks_and_caps_the_error_list() {
        let mut input =
            String::from("\n{\"key\":\"a\",\"value\":\"1\",\"expires_at_ms\":null}\r\n");
        for _ in 0..25 {
            input.push_str("nope\n");
        }
        let found = read_dump(input.as_bytes(), LIMITS).unwrap();
        assert_eq!(found.records.len(), 1);
        assert_eq!(found.invalid_lines, 25);
        assert_eq!(found.errors.len(), LOAD_ERRORS_SHOWN_MAX);
        assert!(
            found.errors[0].starts_with("line 3: "),
            "{}",
            found.errors[0]
        );
    }

    #[test]
    fn an_over_long_line_is_one_error_and_numbering_continues() {
        let long = "x".repeat(LIMITS.line_bytes_max() + 10);
        let input = format!("{long}\nnope\n");
        let found = read_dump(input.as_bytes(), LIMITS).unwrap();
        assert_eq!(found.invalid_lines, 2);
        assert!(found.errors[0].starts_with("line 1: line is longer"));
        assert!(found.errors[1].starts_with("line 2: bad JSON"));
    }
}
