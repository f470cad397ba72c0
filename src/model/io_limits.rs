//! A volume's I/O limits: the mutable parameters of CreateVolume and
//! ControllerModifyVolume (a VolumeAttributesClass's parameters).
//!
//! | key | meaning |
//! |---|---|
//! | `readBytesPerSecond`, `writeBytesPerSecond` | bytes per second |
//! | `readIOPS`, `writeIOPS` | I/O operations per second |
//!
//! Values are positive decimal integers, optionally with a suffix: `k`, `M`,
//! `G` (powers of 1000) or `Ki`, `Mi`, `Gi` (powers of 1024). `0` or
//! `unlimited` removes a limit. A key a request leaves out keeps its value
//! (the CSI spec: no change from the absence of a key); a volume created
//! without a key has no limit for it. Any other key is INVALID_ARGUMENT.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const READ_BPS: &str = "readBytesPerSecond";
pub const WRITE_BPS: &str = "writeBytesPerSecond";
pub const READ_IOPS: &str = "readIOPS";
pub const WRITE_IOPS: &str = "writeIOPS";

/// Limits of one volume; `None` is unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_bps: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_iops: Option<u64>,
}

impl IoLimits {
    pub fn is_empty(&self) -> bool {
        *self == IoLimits::default()
    }

    fn slot(&mut self, key: &str) -> Option<&mut Option<u64>> {
        Some(match key {
            READ_BPS => &mut self.read_bps,
            WRITE_BPS => &mut self.write_bps,
            READ_IOPS => &mut self.read_iops,
            WRITE_IOPS => &mut self.write_iops,
            _ => return None,
        })
    }

    fn values(&self) -> [(&'static str, Option<u64>); 4] {
        [
            (READ_BPS, self.read_bps),
            (WRITE_BPS, self.write_bps),
            (READ_IOPS, self.read_iops),
            (WRITE_IOPS, self.write_iops),
        ]
    }

    /// These limits with the keys of `params` applied; an unknown key or a
    /// bad value is INVALID_ARGUMENT naming it.
    pub fn apply(&self, params: &BTreeMap<String, String>) -> Result<IoLimits> {
        let mut next = *self;
        for (key, value) in params {
            let slot = next.slot(key).ok_or_else(|| {
                Error::invalid(format!(
                    "unknown mutable parameter {key:?} (known: {READ_BPS}, {WRITE_BPS}, \
                     {READ_IOPS}, {WRITE_IOPS})"
                ))
            })?;
            *slot = parse_value(key, value)?;
        }
        Ok(next)
    }

    /// The limits as mutable parameters (set ones only).
    pub fn to_params(&self) -> BTreeMap<String, String> {
        self.values()
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), v?.to_string())))
            .collect()
    }
}

fn parse_value(key: &str, value: &str) -> Result<Option<u64>> {
    if value == "unlimited" {
        return Ok(None);
    }
    let (digits, unit) = match value.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => value.split_at(at),
        None => (value, ""),
    };
    let multiplier: u64 = match unit {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => 0,
    };
    let number = digits.parse::<u64>().ok().filter(|_| multiplier > 0);
    let Some(total) = number.and_then(|n| n.checked_mul(multiplier)) else {
        return Err(Error::invalid(format!(
            "mutable parameter {key}: {value:?} is not a count (digits, optionally k, M, G, Ki, \
             Mi or Gi; 0 or unlimited for none)"
        )));
    };
    Ok(Some(total).filter(|t| *t > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn values_take_suffixes_and_zero_removes() {
        let l = IoLimits::default()
            .apply(&params(&[
                (READ_BPS, "10Mi"),
                (WRITE_BPS, "5M"),
                (READ_IOPS, "1k"),
                (WRITE_IOPS, "250"),
            ]))
            .unwrap();
        assert_eq!(l.read_bps, Some(10 << 20));
        assert_eq!(l.write_bps, Some(5_000_000));
        assert_eq!((l.read_iops, l.write_iops), (Some(1000), Some(250)));
        // A key left out keeps its value; 0 and unlimited remove one.
        let m = l
            .apply(&params(&[(READ_BPS, "0"), (WRITE_BPS, "unlimited")]))
            .unwrap();
        assert_eq!(
            (m.read_bps, m.write_bps, m.read_iops),
            (None, None, Some(1000))
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_parameter() {
        let e = IoLimits::default()
            .apply(&params(&[("readBPS", "1")]))
            .unwrap_err();
        assert!(e.to_string().contains("\"readBPS\""), "{e}");
        for bad in ["-1", "1.5", "10m", "", "1Ti", "99999999999999999999", "1 k"] {
            let e = IoLimits::default()
                .apply(&params(&[(WRITE_IOPS, bad)]))
                .unwrap_err();
            assert!(e.to_string().contains(WRITE_IOPS), "{bad}: {e}");
        }
    }

    #[test]
    fn only_set_limits_become_parameters() {
        let l = IoLimits {
            read_bps: Some(1 << 20),
            write_iops: Some(100),
            ..Default::default()
        };
        assert_eq!(
            l.to_params(),
            params(&[(READ_BPS, "1048576"), (WRITE_IOPS, "100")])
        );
        assert!(IoLimits::default().to_params().is_empty());
    }
}
