//! The integer grammar `incr` accepts, identical to Redis's `string2ll`: an optional `-`, then
//! decimal digits with no leading zeros (`0` alone is fine), no `+`, no spaces, no `-0`, and
//! the result must fit a signed 64-bit integer.

/// Parses `bytes` as a Redis integer, or `None` if it is not one.
pub fn parse_i64(bytes: &[u8]) -> Option<i64> {
    // i64::MIN is 20 bytes long with its sign; anything longer cannot be valid.
    if bytes.is_empty() || bytes.len() > 20 {
        return None;
    }
    if bytes == b"0" {
        return Some(0);
    }
    let (negative, digits) = match bytes[0] {
        b'-' => (true, &bytes[1..]),
        _ => (false, bytes),
    };
    if digits.is_empty() || digits[0] == b'0' {
        return None; // "-", leading zeros, and "-0"
    }
    let mut magnitude: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        magnitude = magnitude
            .checked_mul(10)?
            .checked_add(u64::from(b - b'0'))?;
    }
    if negative {
        // -(2^63) is representable; anything larger in magnitude is not.
        if magnitude > i64::MAX as u64 + 1 {
            return None;
        }
        Some((magnitude as i64).wrapping_neg())
    } else {
        i64::try_from(magnitude).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::parse_i64;

    #[test]
    fn accepts_redis_integers() {
        for (s, v) in [
            ("0", 0),
            ("1", 1),
            ("-1", -1),
            ("9223372036854775807", i64::MAX),
            ("-9223372036854775808", i64::MIN),
            ("120", 120),
        ] {
            assert_eq!(parse_i64(s.as_bytes()), Some(v), "{s}");
        }
    }

    #[test]
    fn rejects_everything_redis_rejects() {
        for s in [
            "",
            "-",
            "+1",
            "01",
            "-0",
            "00",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "abc",
            "9223372036854775808",
            "-9223372036854775809",
            "99999999999999999999",
            "0x10",
        ] {
            assert_eq!(parse_i64(s.as_bytes()), None, "{s:?}");
        }
        assert_eq!(parse_i64(b"1\0"), None);
        assert_eq!(parse_i64(&[0xff]), None);
    }

    #[test]
    fn round_trips_through_display() {
        for v in [0i64, 1, -1, 42, i64::MAX, i64::MIN, -1_000_000] {
            assert_eq!(parse_i64(v.to_string().as_bytes()), Some(v));
        }
    }
}
