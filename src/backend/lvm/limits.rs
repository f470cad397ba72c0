//! A volume's I/O limits in one short tag of its own, beside the record's
//! tags (`kennel.csi.dev/io=rb1048576+wi100`): changing them is one
//! `lvchange` swapping that tag, and a volume without limits has none.

use super::index::Lv;
use super::LvmBackend;
use crate::backend::VolumeRecord;
use crate::error::{Error, Result};
use crate::volume::limits::IoLimits;
use crate::volume::VolumeId;

const PREFIX: &str = "kennel.csi.dev/io=";

/// The tag of `limits`; `None` when there are none.
pub(super) fn tag(limits: &IoLimits) -> Option<String> {
    (!limits.is_empty()).then(|| format!("{PREFIX}{}", limits.to_compact()))
}

/// The limits an LV's tags hold (none when there is no such tag).
pub(super) fn from_tags(tags: &[String]) -> IoLimits {
    tags.iter()
        .find_map(|t| t.strip_prefix(PREFIX))
        .and_then(IoLimits::from_compact)
        .unwrap_or_default()
}

/// A record's tags: the record without its limits, then the limits' tag.
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

    #[test]
    fn limits_live_in_one_short_tag() {
        let limits = IoLimits {
            write_bps: Some(10 << 20),
            ..Default::default()
        };
        let t = tag(&limits).unwrap();
        assert_eq!(t, "kennel.csi.dev/io=wb10485760");
        assert_eq!(from_tags(&["kennel.csi.dev".into(), t]), limits);
        assert_eq!(tag(&IoLimits::default()), None);
        assert_eq!(from_tags(&[]), IoLimits::default());
    }
}
