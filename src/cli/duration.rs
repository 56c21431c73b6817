//! Parsing of the durations the CLI accepts for TTLs: a non-negative integer followed by one
//! of the units `ms`, `s`, `m` or `h` (`500ms`, `10s`, `5m`, `1h`). Nothing else is accepted:
//! no fractions, no bare numbers, no combined forms like `1h30m`, so a typo cannot silently
//! mean something else. Zero parses; the engine rejects it as an invalid TTL with its own
//! message, so the rule lives in one place.

use std::time::Duration;

/// Parses a CLI duration. The error text is shown to the user by the argument parser.
///
/// # Errors
/// A message naming the accepted forms when `text` is not `<integer><unit>`, or when the
/// duration does not fit in a `u64` of milliseconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(digits_end);
    let usage = || {
        format!(
            "invalid duration {text:?}: expected an integer followed by ms, s, m or h \
             (e.g. 500ms, 10s, 5m, 1h)"
        )
    };
    if digits.is_empty() {
        return Err(usage());
    }
    let ms_per_unit: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(usage()),
    };
    let amount: u64 = digits
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: the number is too large"))?;
    let ms = amount
        .checked_mul(ms_per_unit)
        .ok_or_else(|| format!("invalid duration {text:?}: the number is too large"))?;
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "+1s",
            "1 s",
            "1S",
            "1d",
            "1h30m",
            "10sec",
            "ms",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
