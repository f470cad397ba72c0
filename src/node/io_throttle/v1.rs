//! cgroup v1: the blkio throttle files of a pod's cgroup, one per key.

use std::path::Path;

use super::write_rule;
use crate::error::{Error, Result};
use crate::model::limits::IoLimits;

/// Set (or, for an unlimited key, clear) the throttles of `dev` in `cgroup`.
pub fn apply(cgroup: &Path, dev: (u32, u32), limits: &IoLimits) -> Result<()> {
    let (major, minor) = dev;
    for (file, value) in [
        ("blkio.throttle.read_bps_device", limits.read_bps),
        ("blkio.throttle.write_bps_device", limits.write_bps),
        ("blkio.throttle.read_iops_device", limits.read_iops),
        ("blkio.throttle.write_iops_device", limits.write_iops),
    ] {
        let path = cgroup.join(file);
        // "0" removes the rule for the device.
        let line = format!("{major}:{minor} {}", value.unwrap_or(0));
        write_rule(&path, &line).map_err(|e| Error::io("write", path, e))?;
    }
    Ok(())
}
