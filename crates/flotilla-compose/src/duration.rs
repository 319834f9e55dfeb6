//! Compose durations: Go's `time.ParseDuration` format (`1h2m3s4ms`, `1.5s`, `500ms`).

use std::time::Duration;

/// Parses a Compose duration. A bare number (`"10"`) is taken as seconds, which Compose itself
/// rejects but which is what people mean. Returns the reason on failure.
pub(crate) fn parse_duration(input: &str) -> Result<Duration, String> {
    let text = input.trim();
    let explain = || {
        format!(
            "{input:?} is not a duration (expected e.g. \"10s\", \"1m30s\", \"500ms\", \"1.5s\")"
        )
    };
    if text.is_empty() {
        return Err(explain());
    }
    if text.starts_with('-') {
        return Err(format!("{input:?} is negative; durations must be >= 0"));
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    if let Ok(secs) = text.parse::<f64>() {
        return seconds(secs).ok_or_else(explain);
    }
    let mut total_nanos: f64 = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(explain)?;
        let number: f64 = rest[..number_len].parse().map_err(|_| explain())?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let nanos_per_unit = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(explain()),
        };
        rest = &rest[unit_len..];
        total_nanos += number * nanos_per_unit;
    }
    seconds(total_nanos / 1e9).ok_or_else(explain)
}

/// Seconds as a `Duration`, or `None` when out of range (negative, NaN or absurdly large).
fn seconds(secs: f64) -> Option<Duration> {
    Duration::try_from_secs_f64(secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_compose_forms() {
        let ok = [
            ("10s", Duration::from_secs(10)),
            ("1m30s", Duration::from_secs(90)),
            ("500ms", Duration::from_millis(500)),
            ("1.5s", Duration::from_millis(1500)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("10", Duration::from_secs(10)),
            ("0s", Duration::ZERO),
            ("250us", Duration::from_micros(250)),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in ["", "10 parsecs", "s", "1x", "-1s", "1..2s", "ms10", "1e400"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains(&format!("{bad:?}")), "{bad}: {err}");
        }
        assert!(parse_duration("-5s").unwrap_err().contains("negative"));
    }
}
