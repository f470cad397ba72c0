//! cgroup v1: the blkio throttle files of a pod's cgroups, one per key.
//!
//! blk-throttle on cgroup v1 is not hierarchical: a process in a child of a throttled cgroup
//! writes at full speed (measured on Linux 6.18: 1.1 MB/s in the throttled cgroup, 2 GB/s in
//! its child). A pod's processes live in its containers' cgroups below the pod's, so a rule goes
//! on the pod cgroup (where the driver keeps the truth) and on every cgroup below it; containers
//! started later are given their pod's rules by [`mirror_pod_rules`], which the driver runs every
//! few seconds on a cgroup v1 node.

use std::path::{Path, PathBuf};

use super::write_rule;
use crate::error::{Error, Result};
use crate::model::io_limits::IoLimits;

/// The throttle files, in the order of [`IoLimits`]' keys.
const FILES: [&str; 4] = [
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
    "blkio.throttle.read_iops_device",
    "blkio.throttle.write_iops_device",
];

/// Set (or, for an unlimited key, clear) the throttles of `dev` in `cgroup` and every cgroup
/// below it.
pub fn apply(cgroup: &Path, dev: (u32, u32), limits: &IoLimits) -> Result<()> {
    let (major, minor) = dev;
    let values = [
        limits.read_bps,
        limits.write_bps,
        limits.read_iops,
        limits.write_iops,
    ];
    for dir in with_descendants(cgroup) {
        for (file, value) in FILES.iter().zip(values) {
            let path = dir.join(file);
            // "0" removes the rule for the device.
            let line = format!("{major}:{minor} {}", value.unwrap_or(0));
            write_rule(&path, &line).map_err(|e| Error::io("write", path, e))?;
        }
    }
    Ok(())
}

/// Give every cgroup below each pod cgroup under `root` exactly its pod's throttles (rules the
/// pod has are set, rules it lacks are cleared): what a container started after its volume was
/// published, or one that kept a rule the pod has since dropped, should have. Returns how many
/// rules it wrote. Nothing in a pod is throttled by the kubelet itself, so the pod cgroup's rules
/// are all the driver's.
pub fn mirror_pod_rules(root: &Path) -> Result<usize> {
    let mut written = 0;
    for pod in super::all_pod_cgroups(root) {
        let below: Vec<PathBuf> = with_descendants(&pod).into_iter().skip(1).collect();
        if below.is_empty() {
            continue;
        }
        for file in FILES {
            let Ok(want) = read_rules(&pod.join(file)) else {
                continue; // the pod went away meanwhile
            };
            for dir in &below {
                let path = dir.join(file);
                let Ok(have) = read_rules(&path) else {
                    continue;
                };
                for line in changes(&have, &want) {
                    match write_rule(&path, &line) {
                        Ok(()) => written += 1,
                        // A container cgroup removed while we walked.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io("write", path, e)),
                    }
                }
            }
        }
    }
    Ok(written)
}

/// `dir` and every directory below it, parents first.
fn with_descendants(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_owned()];
    let mut next = 0;
    while next < all.len() {
        let entries = std::fs::read_dir(&all[next])
            .into_iter()
            .flatten()
            .flatten();
        let children: Vec<PathBuf> = entries
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        all.extend(children);
        next += 1;
    }
    all
}

/// A throttle file's rules: (`major:minor`, value) per line.
fn read_rules(path: &Path) -> std::io::Result<Vec<(String, u64)>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .filter_map(|l| {
            let (dev, value) = l.split_once(' ')?;
            Some((dev.to_owned(), value.trim().parse().ok()?))
        })
        .collect())
}

/// The lines that turn the rules `have` into `want`: each wanted rule that differs, and "0" for
/// each device `want` has no rule for.
fn changes(have: &[(String, u64)], want: &[(String, u64)]) -> Vec<String> {
    let set = want
        .iter()
        .filter(|w| !have.contains(w))
        .map(|(dev, value)| format!("{dev} {value}"));
    let clear = have
        .iter()
        .filter(|(dev, _)| !want.iter().any(|(d, _)| d == dev))
        .map(|(dev, _)| format!("{dev} 0"));
    set.chain(clear).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(pairs: &[(&str, u64)]) -> Vec<(String, u64)> {
        pairs.iter().map(|(d, v)| (d.to_string(), *v)).collect()
    }

    #[test]
    fn changes_set_what_differs_and_clear_what_the_pod_lacks() {
        let want = rules(&[("7:3", 1048576), ("7:4", 200)]);
        let have = rules(&[("7:3", 1048576), ("7:4", 100), ("7:9", 5)]);
        assert_eq!(changes(&have, &want), vec!["7:4 200", "7:9 0"]);
        assert!(changes(&want, &want).is_empty());
        assert_eq!(changes(&[], &want), vec!["7:3 1048576", "7:4 200"]);
    }
}
