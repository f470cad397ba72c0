//! Turning a CSI capacity range into one concrete volume size.

use crate::error::{Error, Result};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// A validated capacity request: 0 means "not set", as in CSI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CapacityRange {
    pub required: u64,
    pub limit: u64,
}

impl CapacityRange {
    pub fn new(required: i64, limit: i64) -> Result<Self> {
        if required < 0 || limit < 0 {
            return Err(Error::invalid("capacity bytes must not be negative"));
        }
        let range = CapacityRange {
            required: required as u64,
            limit: limit as u64,
        };
        if range.limit != 0 && range.required > range.limit {
            return Err(Error::OutOfRange(format!(
                "required {} bytes exceeds limit {} bytes",
                range.required, range.limit
            )));
        }
        Ok(range)
    }

    /// Whether an existing volume of `size` bytes satisfies this range.
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }
}

/// Pick the size for a new volume: the smallest multiple of `granularity`
/// that is at least `required` (or `default` when unset) and `minimum`, and
/// not above `limit`.
pub fn choose_size(
    range: CapacityRange,
    granularity: u64,
    minimum: u64,
    default: u64,
) -> Result<u64> {
    debug_assert!(granularity.is_power_of_two());
    let wanted = if range.required == 0 {
        match range.limit {
            0 => default,
            limit => default.min(limit),
        }
    } else {
        range.required
    };
    let size = round_up(wanted.max(minimum), granularity)
        .ok_or_else(|| Error::OutOfRange(format!("{wanted} bytes is too large")))?;
    if range.limit != 0 && size > range.limit {
        return Err(Error::OutOfRange(format!(
            "no size in [{}, {}] bytes is a multiple of {granularity} bytes and at least {minimum} bytes",
            range.required, range.limit
        )));
    }
    if size > i64::MAX as u64 {
        return Err(Error::OutOfRange(format!("{size} bytes is too large")));
    }
    Ok(size)
}

pub fn round_up(bytes: u64, granularity: u64) -> Option<u64> {
    bytes
        .checked_add(granularity - 1)
        .map(|b| b & !(granularity - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(required: i64, limit: i64) -> CapacityRange {
        CapacityRange::new(required, limit).unwrap()
    }

    #[test]
    fn rounds_up_to_granularity() {
        assert_eq!(choose_size(range(1, 0), MIB, MIB, GIB).unwrap(), MIB);
        assert_eq!(
            choose_size(range(MIB as i64 + 1, 0), MIB, MIB, GIB).unwrap(),
            2 * MIB
        );
        assert_eq!(
            choose_size(range(64 * MIB as i64, 0), MIB, MIB, GIB).unwrap(),
            64 * MIB
        );
    }

    #[test]
    fn unset_range_takes_the_default_within_the_limit() {
        assert_eq!(choose_size(range(0, 0), MIB, MIB, GIB).unwrap(), GIB);
        assert_eq!(
            choose_size(range(0, 10 * MIB as i64), MIB, MIB, GIB).unwrap(),
            10 * MIB
        );
    }

    #[test]
    fn minimum_applies_and_can_break_the_limit() {
        assert_eq!(
            choose_size(range(MIB as i64, 0), MIB, 300 * MIB, GIB).unwrap(),
            300 * MIB
        );
        assert!(matches!(
            choose_size(range(MIB as i64, 10 * MIB as i64), MIB, 300 * MIB, GIB),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn impossible_ranges_are_out_of_range() {
        assert!(matches!(
            CapacityRange::new(10, 5),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            CapacityRange::new(-1, 0),
            Err(Error::InvalidArgument(_))
        ));
        // No MiB multiple lies strictly inside (1 MiB, 2 MiB).
        let between = range(MIB as i64 + 1, 2 * MIB as i64 - 1);
        assert!(matches!(
            choose_size(between, MIB, MIB, GIB),
            Err(Error::OutOfRange(_))
        ));
        assert!(matches!(
            choose_size(range(i64::MAX, 0), MIB, MIB, GIB),
            Err(Error::OutOfRange(_))
        ));
    }

    #[test]
    fn admits_checks_both_bounds() {
        assert!(range(MIB as i64, 2 * MIB as i64).admits(2 * MIB));
        assert!(!range(MIB as i64, 2 * MIB as i64).admits(3 * MIB));
        assert!(!range(4 * MIB as i64, 0).admits(2 * MIB));
        assert!(range(0, 0).admits(5));
    }
}

/// Parse a human size: `1048576`, `512Mi`, `10GiB`, `1G` (decimal), `2T`.
pub fn parse_size(raw: &str) -> std::result::Result<u64, String> {
    let raw = raw.trim();
    let split = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
    let (digits, unit) = raw.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {raw:?}"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KB" => 1_000,
        "M" | "MB" => 1_000_000,
        "G" | "GB" => 1_000_000_000,
        "T" | "TB" => 1_000_000_000_000,
        "Ki" | "KiB" => 1 << 10,
        "Mi" | "MiB" => 1 << 20,
        "Gi" | "GiB" => 1 << 30,
        "Ti" | "TiB" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} in {raw:?}")),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size {raw:?} is too large"))
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1048576"), Ok(MIB));
        assert_eq!(parse_size("64Mi"), Ok(64 * MIB));
        assert_eq!(parse_size("10GiB"), Ok(10 * GIB));
        assert_eq!(parse_size("1G"), Ok(1_000_000_000));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5Qi").is_err());
        assert!(parse_size("99999999999999Ti").is_err());
    }
}
