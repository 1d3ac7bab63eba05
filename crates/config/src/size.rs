use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("'{0}' is not a size: use a number with an optional unit, e.g. 7G, 7GiB, 512M or 1073741824")]
    Malformed(String),
    #[error("'{0}' is too large")]
    Overflow(String),
    #[error("size must be larger than 0")]
    Zero,
}

/// Parses `7G`, `7GiB`, `7g`, `512M`, `512MiB`, `64K`, `1T` and plain byte
/// counts. Units are binary (G = GiB), as for every block-device tool.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    if digits.is_empty() {
        return Err(SizeError::Malformed(text.to_string()));
    }
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(SizeError::Malformed(text.to_string())),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))?;
    if bytes == 0 {
        return Err(SizeError::Zero);
    }
    Ok(bytes)
}

/// As [`parse_size`], but "0" (with or without a unit) is 0: for amounts
/// that may be none, like a VRAM reserve.
pub fn parse_size_or_zero(text: &str) -> Result<u64, SizeError> {
    match parse_size(text) {
        Err(SizeError::Zero) => Ok(0),
        r => r,
    }
}

/// Bytes for reading, rounded to one decimal: `79.2G`, `512.0M`, `4.0K`.
pub fn human_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1u64 << shift {
            return format!("{:.1}{unit}", bytes as f64 / (1u64 << shift) as f64);
        }
    }
    format!("{bytes}B")
}

/// Renders bytes the way users write them: `7G`, `512M`, `1536K`, `4097B`.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_where_allowed_and_human_sizes() {
        assert_eq!(parse_size_or_zero("0"), Ok(0));
        assert_eq!(parse_size_or_zero("0M"), Ok(0));
        assert_eq!(parse_size_or_zero("512M"), Ok(512 << 20));
        assert!(parse_size_or_zero("x").is_err());
        assert_eq!(human_size(85_017_853_952), "79.2G");
        assert_eq!(human_size(512 << 20), "512.0M");
        assert_eq!(human_size(100), "100B");
    }

    #[test]
    fn accepts_the_documented_forms() {
        for (text, want) in [
            ("7G", 7u64 << 30),
            ("7GiB", 7 << 30),
            ("7g", 7 << 30),
            ("512M", 512 << 20),
            ("512MiB", 512 << 20),
            ("1073741824", 1 << 30),
            ("64K", 64 << 10),
            ("1T", 1 << 40),
            (" 2G ", 2 << 30),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn rejects_garbage_zero_and_overflow() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("0"), Err(SizeError::Zero));
        assert_eq!(parse_size("0G"), Err(SizeError::Zero));
        for bad in ["G", "7X", "-1G", "1.5G", "seven", "7 G B"] {
            assert!(
                matches!(parse_size(bad), Err(SizeError::Malformed(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for b in [7u64 << 30, 512 << 20, 1536 << 10, 4097, 1 << 40] {
            assert_eq!(parse_size(&format_size(b)), Ok(b));
        }
        assert_eq!(format_size(7 << 30), "7G");
    }
}
