//! Printing arbitrary key bytes as one readable line. Valid UTF-8 is printed as is, except
//! for the backslash and control characters; every other byte is written as `\xNN`. The
//! result never contains a newline, so "one key per line" output stays parseable, and two
//! different keys never print the same (the backslash itself is escaped).

use std::fmt::Write as _;

/// The escaped, single-line form of `bytes`.
pub fn escape_bytes(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if c.is_ascii_control() => push_hex(&mut out, c as u8),
                c if c.is_control() => {
                    // Writing to a String cannot fail.
                    let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
                }
                c => out.push(c),
            }
        }
        for &b in chunk.invalid() {
            push_hex(&mut out, b);
        }
    }
    out
}

/// Appends `\xNN` for `byte`.
fn push_hex(out: &mut String, byte: u8) {
    // Writing to a String cannot fail.
    let _ = write!(out, "\\x{byte:02x}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_invalid_utf8_controls_and_backslash() {
        assert_eq!(escape_bytes(b"plain:key"), "plain:key");
        assert_eq!(escape_bytes("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(escape_bytes(b"a\xffb"), "a\\xffb");
        assert_eq!(escape_bytes(b"line\nbreak\0"), "line\\nbreak\\x00");
        assert_eq!(escape_bytes(b"back\\slash"), "back\\\\slash");
        assert_eq!(escape_bytes("\u{85}".as_bytes()), "\\u{85}");
    }
}
