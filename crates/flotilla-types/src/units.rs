//! Parsing of the unit-bearing values Compose uses: byte sizes (`512m`, `1g`) and cpu counts (`0.5`).

use thiserror::Error;

/// Why a unit value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UnitError {
    #[error("{0:?} is not a byte size (expected a number with an optional unit b, k, m, g, t, e.g. \"512m\")")]
    BadBytes(String),
    #[error("{0:?} is not a cpu count (expected a positive number such as 0.5 or 2)")]
    BadCpus(String),
    #[error("byte size {0:?} is too large")]
    TooLarge(String),
}

/// Parses a Compose byte size: a plain integer (bytes) or a number with a `b/k/m/g/t` suffix,
/// optionally followed by `b` or `ib` (`512m`, `1.5GiB`, `1024kb`).
pub fn parse_bytes(input: &str) -> Result<u64, UnitError> {
    let s = input.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Err(UnitError::BadBytes(input.to_string()));
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    let mult: f64 = match unit {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(UnitError::BadBytes(input.to_string())),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| UnitError::BadBytes(input.to_string()))?;
    if !value.is_finite() || value < 0.0 {
        return Err(UnitError::BadBytes(input.to_string()));
    }
    let bytes = value * mult;
    if bytes > u64::MAX as f64 / 2.0 {
        return Err(UnitError::TooLarge(input.to_string()));
    }
    Ok(bytes.round() as u64)
}

/// Parses a Compose cpu count (`"0.5"`, `2`) into millicores.
pub fn parse_cpus(input: &str) -> Result<u64, UnitError> {
    let value: f64 = input
        .trim()
        .parse()
        .map_err(|_| UnitError::BadCpus(input.to_string()))?;
    if !value.is_finite() || value <= 0.0 || value > 1_000_000.0 {
        return Err(UnitError::BadCpus(input.to_string()));
    }
    Ok((value * 1000.0).round() as u64)
}

/// Formats a byte count the way `ps` and `inspect` show it (`512MiB`).
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size && bytes.is_multiple_of((size / 1024).max(1)) {
            let v = bytes as f64 / size as f64;
            return if v.fract() == 0.0 {
                format!("{}{name}", v as u64)
            } else {
                format!("{v:.1}{name}")
            };
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        assert_eq!(parse_bytes("512m"), Ok(512 << 20));
        assert_eq!(parse_bytes("1g"), Ok(1 << 30));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("100"), Ok(100));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("-1m").is_err());
        assert!(parse_bytes("").is_err());
    }

    #[test]
    fn cpus() {
        assert_eq!(parse_cpus("0.5"), Ok(500));
        assert_eq!(parse_cpus("2"), Ok(2000));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("many").is_err());
    }
}
