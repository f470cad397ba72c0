//! cgroup v2: one `io.max` line per device in a pod's cgroup
//! (`MAJ:MIN rbps=… wbps=… riops=… wiops=…`). The file exists only where
//! the parent enables the io controller (`+io` in its
//! `cgroup.subtree_control`).

use std::path::Path;

use super::write_rule;
use crate::error::{Error, Result};
use crate::model::io_limits::IoLimits;

/// Set the limits of `dev` in `cgroup`. Every key is written, `max` for an
/// unlimited one: the kernel drops a device's line once all its keys are
/// `max`, which clears the rule.
pub fn apply(cgroup: &Path, dev: (u32, u32), limits: &IoLimits) -> Result<()> {
    let path = cgroup.join("io.max");
    match write_rule(&path, &line(dev, limits)) {
        Ok(()) => Ok(()),
        // Without the io controller there is no rule to clear.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && limits.is_empty() => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Precondition(format!(
            "cannot apply the volume's I/O limits: cgroup {} has no io.max, the io controller \
             is not enabled for it; enable it on every cgroup above it from the hierarchy's \
             root (`+io` in each cgroup.subtree_control; `io` must be listed in the root's \
             cgroup.controllers, which it is not while cgroup v1 blkio holds it)",
            cgroup.display()
        ))),
        Err(e) => Err(Error::io("write", path, e)),
    }
}

fn line((major, minor): (u32, u32), limits: &IoLimits) -> String {
    let value = |limit: Option<u64>| limit.map_or_else(|| "max".to_owned(), |n| n.to_string());
    format!(
        "{major}:{minor} rbps={} wbps={} riops={} wiops={}",
        value(limits.read_bps),
        value(limits.write_bps),
        value(limits.read_iops),
        value(limits.write_iops)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unlimited_key_is_max() {
        let limits = IoLimits {
            write_bps: Some(1 << 20),
            read_iops: Some(100),
            ..IoLimits::default()
        };
        assert_eq!(
            line((253, 4), &limits),
            "253:4 rbps=max wbps=1048576 riops=100 wiops=max"
        );
        assert_eq!(
            line((7, 0), &IoLimits::default()),
            "7:0 rbps=max wbps=max riops=max wiops=max"
        );
    }

    #[test]
    fn a_cgroup_without_the_io_controller_is_refused_with_what_to_enable() {
        let dir = tempfile::tempdir().unwrap();
        let limits = IoLimits {
            write_bps: Some(1 << 20),
            ..IoLimits::default()
        };
        let err = apply(dir.path(), (7, 0), &limits).unwrap_err();
        assert!(matches!(err, Error::Precondition(_)), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        assert!(msg.contains("+io"), "{msg}");
        // Nothing to clear there, and no file made.
        apply(dir.path(), (7, 0), &IoLimits::default()).unwrap();
        assert!(!dir.path().join("io.max").exists());
    }
}
