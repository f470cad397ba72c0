//! A volume's I/O limits in one short tag of its own, beside the record's
//! chunks (see `tags`): `kio=rb10m+wi100`. Changing them is one `lvchange`
//! swapping that tag, the record stays as it is, and a volume without limits
//! has no such tag.
//!
//! The value is written like the record's compact text: a two-letter key per
//! limit (`rb`, `wb` bytes per second, `ri`, `wi` operations per second) and
//! its number, byte rates with a binary suffix when they are whole (`10m`),
//! joined by `+`. Every byte is in lvm2's tag character set and the longest
//! tag (four limits of 20 digits) is 95 characters, within lvm2's 128.

use super::index::Lv;
use super::tags::record_text::{parse_size, size};
use super::LvmBackend;
use crate::backend::VolumeRecord;
use crate::error::{Error, Result};
use crate::model::io_limits::IoLimits;
use crate::model::VolumeId;

/// Not shaped like a chunk (`k0/2=`), so the record's decoder passes it by.
pub(super) const PREFIX: &str = "kio=";

/// Short keys, and whether the value is a byte rate (written as a size).
const KEYS: [(&str, bool); 4] = [("rb", true), ("wb", true), ("ri", false), ("wi", false)];

fn slots(limits: &mut IoLimits) -> [&mut Option<u64>; 4] {
    [
        &mut limits.read_bps,
        &mut limits.write_bps,
        &mut limits.read_iops,
        &mut limits.write_iops,
    ]
}

/// The tag of `limits`; `None` when there are none.
pub(super) fn tag(limits: &IoLimits) -> Option<String> {
    let mut limits = *limits;
    let parts: Vec<String> = KEYS
        .iter()
        .zip(slots(&mut limits))
        .filter_map(|((key, bytes), value)| {
            let value = (*value)?;
            Some(if *bytes {
                format!("{key}{}", size(value))
            } else {
                format!("{key}{value}")
            })
        })
        .collect();
    (!parts.is_empty()).then(|| format!("{PREFIX}{}", parts.join("+")))
}

/// The limits a tag's value holds; `None` if it is not one.
fn parse(value: &str) -> Option<IoLimits> {
    let mut limits = IoLimits::default();
    for part in value.split('+') {
        let at = KEYS.iter().position(|(key, _)| part.starts_with(key))?;
        let raw = &part[KEYS[at].0.len()..];
        let number = if KEYS[at].1 {
            parse_size(raw).ok()?
        } else {
            let digits = !raw.is_empty() && raw.bytes().all(|b| b.is_ascii_digit());
            digits.then(|| raw.parse().ok()).flatten()?
        };
        let slot = slots(&mut limits).into_iter().nth(at)?;
        if slot.replace(number).is_some() || number == 0 {
            return None;
        }
    }
    Some(limits)
}

/// The limits an LV's tags hold: none without the tag. A tag that cannot
/// be read is reported and read as no limits (the volume stays usable; the
/// next ControllerModifyVolume writes a good one).
pub(super) fn from_tags(lv_name: &str, tags: &[String]) -> IoLimits {
    let Some(value) = tags.iter().find_map(|t| t.strip_prefix(PREFIX)) else {
        return IoLimits::default();
    };
    parse(value).unwrap_or_else(|| {
        tracing::error!(lv = %lv_name, tag = %value, "unreadable I/O limits tag; read as no limits");
        IoLimits::default()
    })
}

/// A volume's tags for its `lvcreate`: the record's (limits aside), then
/// the limits' tag.
pub(super) fn encode(record: &VolumeRecord) -> Result<Vec<String>> {
    let mut bare = record.clone();
    bare.params.io_limits = IoLimits::default();
    let mut tags = super::tags::encode(&bare)?;
    tags.extend(tag(&record.params.io_limits));
    Ok(tags)
}

impl LvmBackend {
    /// Store new limits for a volume (one `lvchange`, none if unchanged).
    pub(super) fn store_io_limits(&self, id: &VolumeId, limits: IoLimits) -> Result<VolumeRecord> {
        let _change = self.changing();
        let (lv, mut record) = self
            .volume(id)?
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if record.params.io_limits == limits {
            return Ok(record);
        }
        let old: Vec<String> = lv
            .row
            .lv_tags
            .iter()
            .filter(|t| t.starts_with(PREFIX))
            .cloned()
            .collect();
        let new = tag(&limits);
        let mut cmd = self.lvm.cmd("lvchange");
        for t in &old {
            cmd = cmd.arg("--deltag").arg(t);
        }
        if let Some(t) = &new {
            cmd = cmd.arg("--addtag").arg(t);
        }
        // One metadata write: the old tag and the new one are never both there.
        self.lvm.change(
            cmd.arg("--")
                .arg(format!("{}/{}", lv.row.vg_name, lv.row.lv_name)),
        )?;
        let mut row = lv.row.clone();
        row.lv_tags.retain(|t| !t.starts_with(PREFIX));
        row.lv_tags.extend(new);
        let mut changed = Lv::new(row, &[]);
        changed.place = lv.place.clone();
        changed.missing = lv.missing;
        self.index().insert(changed);
        record.params.io_limits = limits;
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::lvm::tags::is_valid_tag;

    #[test]
    fn limits_live_in_one_short_tag() {
        let limits = IoLimits {
            read_bps: Some(10 << 20),
            write_iops: Some(100),
            ..Default::default()
        };
        let t = tag(&limits).unwrap();
        assert_eq!(t, "kio=rb10m+wi100");
        assert_eq!(from_tags("kv", &["kennel.csi.dev".into(), t]), limits);
        let odd = IoLimits {
            write_bps: Some(5_000_000),
            read_iops: Some(1024),
            ..Default::default()
        };
        assert_eq!(tag(&odd).as_deref(), Some("kio=wb5000000+ri1024"));
        assert_eq!(tag(&IoLimits::default()), None);
        assert_eq!(from_tags("kv", &[]), IoLimits::default());
    }

    #[test]
    fn every_tag_is_one_lvm2_accepts_and_reads_back() {
        let all = IoLimits {
            read_bps: Some(u64::MAX),
            write_bps: Some(u64::MAX - 1),
            read_iops: Some(u64::MAX),
            write_iops: Some(u64::MAX),
        };
        let one = IoLimits {
            write_bps: Some(1),
            ..Default::default()
        };
        for limits in [all, one] {
            let t = tag(&limits).unwrap();
            assert!(is_valid_tag(&t), "{t:?}");
            assert_eq!(from_tags("kv", &[t]), limits);
        }
    }

    #[test]
    fn a_damaged_tag_reads_as_no_limits() {
        for bad in [
            "",
            "rb",
            "xx1",
            "rb1m+rb2m",
            "ri1k",
            "wi-1",
            "rb0",
            "rb1m+",
            "wb1q",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
            assert_eq!(
                from_tags("kv", &[format!("{PREFIX}{bad}")]),
                IoLimits::default()
            );
        }
    }
}
