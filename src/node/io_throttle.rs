//! A volume's I/O limits applied to the pods that use it: cgroup v1 blkio
//! throttles (`blkio.throttle.{read,write}_{bps,iops}_device`) of each pod's
//! cgroup, for the volume's device. Pods are found from where the kubelet
//! publishes volumes (`<kubelet>/pods/<uid>/…`); a pod's cgroup from its UID
//! under the `kubepods` tree (cgroupfs `pod<uid>` or systemd
//! `kubepods-…-pod<uid_with_underscores>.slice`). Limits on the pod cgroup
//! cover all its containers (blk-throttle is hierarchical).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::limits::IoLimits;

/// Where the kubelet's blkio hierarchy is on a node.
pub const DEFAULT_BLKIO_DIR: &str = "/sys/fs/cgroup/blkio";

/// The pod UID of a path the kubelet publishes into, if it is one.
pub fn pod_uid(kubelet: &Path, target: &Path) -> Option<String> {
    let rest = target.strip_prefix(kubelet.join("pods")).ok()?;
    let uid = rest.components().next()?.as_os_str().to_str()?;
    (!uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .then(|| uid.to_owned())
}

/// The blkio cgroups of pod `uid` below `blkio` (at most a few levels down
/// the `kubepods` trees).
pub fn pod_cgroups(blkio: &Path, uid: &str) -> Vec<PathBuf> {
    let names = [
        format!("pod{uid}"),
        format!("pod{}.slice", uid.replace('-', "_")),
    ];
    let mut found = Vec::new();
    let mut level: Vec<PathBuf> = ["kubepods", "kubepods.slice"]
        .iter()
        .map(|d| blkio.join(d))
        .filter(|d| d.is_dir())
        .collect();
    for _ in 0..3 {
        let mut next = Vec::new();
        for dir in &level {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if names
                    .iter()
                    .any(|n| name == *n || name.ends_with(&format!("-{n}")))
                {
                    found.push(path);
                } else {
                    next.push(path);
                }
            }
        }
        level = next;
    }
    found
}

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
        std::fs::write(&path, line).map_err(|e| Error::io("write", path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_uid_comes_from_the_kubelets_pod_directory() {
        let kubelet = Path::new("/var/lib/kubelet");
        let uid = "0b6c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d";
        let target = kubelet.join(format!("pods/{uid}/volumes/kubernetes.io~csi/pvc-1/mount"));
        assert_eq!(pod_uid(kubelet, &target).as_deref(), Some(uid));
        assert_eq!(pod_uid(kubelet, Path::new("/mnt/elsewhere")), None);
        assert_eq!(pod_uid(kubelet, &kubelet.join("pods/../x")), None);
    }

    #[test]
    fn pod_cgroups_are_found_for_both_cgroup_drivers() {
        let dir = tempfile::tempdir().unwrap();
        let uid = "0b6c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d";
        let cgroupfs = dir.path().join(format!("kubepods/burstable/pod{uid}"));
        let systemd = dir.path().join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        std::fs::create_dir_all(&cgroupfs).unwrap();
        std::fs::create_dir_all(&systemd).unwrap();
        std::fs::create_dir_all(dir.path().join("kubepods/burstable/podother")).unwrap();
        let mut found = pod_cgroups(dir.path(), uid);
        found.sort();
        let mut want = vec![cgroupfs, systemd];
        want.sort();
        assert_eq!(found, want);
    }
}
