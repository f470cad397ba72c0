//! A volume's I/O limits applied to the pods that use it, for the volume's
//! device, on each pod's cgroup: cgroup v1 blkio throttles (`v1`) or cgroup
//! v2 `io.max` (`v2`), whichever hierarchy the node has. Pods are found from
//! where the kubelet publishes volumes (`<kubelet>/pods/<uid>/…`); a pod's
//! cgroup from its UID under the `kubepods` tree (cgroupfs `pod<uid>` or
//! systemd `kubepods-…-pod<uid_with_underscores>.slice`), laid out the same
//! on both versions. On cgroup v2 the limits on the pod cgroup cover all its
//! containers (io.max is hierarchical); cgroup v1's blk-throttle is not, so
//! there the rules also go on every container cgroup (see `v1`).

mod v1;
mod v2;

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::model::io_limits::IoLimits;

/// Where the kubelet's blkio hierarchy is on a cgroup v1 node.
pub const DEFAULT_BLKIO_DIR: &str = "/sys/fs/cgroup/blkio";
/// Where a cgroup v2 node mounts its one hierarchy.
pub const UNIFIED_DIR: &str = "/sys/fs/cgroup";

/// A cgroup hierarchy holding the kubelet's pod cgroups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v1 with the blkio controller.
    Blkio(PathBuf),
    /// cgroup v2 (unified).
    Unified(PathBuf),
}

impl Hierarchy {
    /// The hierarchy `dir` (`--blkio-cgroup-dir`) is. The default blkio
    /// directory does not exist on a cgroup v2 node: there the unified
    /// hierarchy at `/sys/fs/cgroup` stands in for it.
    pub fn find(dir: &Path) -> Option<Hierarchy> {
        Self::find_with(dir, Path::new(DEFAULT_BLKIO_DIR), Path::new(UNIFIED_DIR))
    }

    fn find_with(dir: &Path, default: &Path, unified: &Path) -> Option<Hierarchy> {
        if let Some(found) = Self::at(dir) {
            return Some(found);
        }
        if dir != default || dir.exists() {
            return None;
        }
        Self::at(unified).filter(|h| matches!(h, Hierarchy::Unified(_)))
    }

    /// Every cgroup v2 directory has `cgroup.controllers`; a v1 blkio one
    /// has the throttle files.
    fn at(dir: &Path) -> Option<Hierarchy> {
        if dir.join("cgroup.controllers").is_file() {
            Some(Hierarchy::Unified(dir.to_owned()))
        } else if dir.join("blkio.throttle.write_bps_device").is_file() {
            Some(Hierarchy::Blkio(dir.to_owned()))
        } else {
            None
        }
    }

    pub fn root(&self) -> &Path {
        match self {
            Hierarchy::Blkio(root) | Hierarchy::Unified(root) => root,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Hierarchy::Blkio(_) => "cgroup v1 blkio",
            Hierarchy::Unified(_) => "cgroup v2",
        }
    }
}

/// Where I/O limits go, for the driver's start-up log line.
pub fn describe(dir: &Path) -> String {
    match Hierarchy::find(dir) {
        Some(h) => format!("{} at {}", h.describe(), h.root().display()),
        None => format!("no cgroup hierarchy at {}", dir.display()),
    }
}

/// Set the limits of device `dev` on the cgroups of pod `uid` in the
/// hierarchy `dir` names (an unlimited key clears its rule). Limits that
/// cannot take effect are an error saying what is missing, never skipped;
/// with no limits, a hierarchy or pod cgroup that is not there has no rule
/// to clear.
pub fn limit_pod(dir: &Path, uid: &str, dev: (u32, u32), limits: &IoLimits) -> Result<()> {
    let Some(hierarchy) = Hierarchy::find(dir) else {
        if limits.is_empty() {
            return Ok(());
        }
        return Err(Error::Precondition(format!(
            "the volume has I/O limits, but {} is no cgroup hierarchy (neither cgroup v1 blkio \
             nor cgroup v2); point --blkio-cgroup-dir at the node's blkio or cgroup v2 mount, \
             which the node plugin needs from the host",
            dir.display()
        )));
    };
    let cgroups = pod_cgroups(hierarchy.root(), uid);
    if cgroups.is_empty() && !limits.is_empty() {
        return Err(Error::Precondition(format!(
            "the volume has I/O limits, but pod {uid} has no cgroup under {} (kubepods or \
             kubepods.slice, {}); the kubelet makes one for every pod unless it runs with \
             --cgroups-per-qos=false",
            hierarchy.root().display(),
            hierarchy.describe()
        )));
    }
    for cgroup in cgroups {
        match hierarchy {
            Hierarchy::Blkio(_) => v1::apply(&cgroup, dev, limits)?,
            Hierarchy::Unified(_) => v2::apply(&cgroup, dev, limits)?,
        }
    }
    Ok(())
}

/// In the cgroup v1 blkio hierarchy at `blkio_root`, give containers the rules of their pods
/// (see [`v1::mirror_pod_rules`]); how many rules were written. cgroup v2 needs nothing: a
/// pod's `io.max` already holds for its containers.
pub fn keep_container_rules(blkio_root: &Path) -> Result<usize> {
    v1::mirror_pod_rules(blkio_root)
}

/// One rule written to a cgroup control file, in one write as the kernel
/// wants it; the file is never created.
fn write_rule(path: &Path, line: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all(line.as_bytes())
}

/// The pod UID of a path the kubelet publishes into, if it is one.
pub fn pod_uid(kubelet: &Path, target: &Path) -> Option<String> {
    let rest = target.strip_prefix(kubelet.join("pods")).ok()?;
    let uid = rest.components().next()?.as_os_str().to_str()?;
    (!uid.is_empty() && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        .then(|| uid.to_owned())
}

/// The cgroups of pod `uid` below the hierarchy root `root` (at most a few
/// levels down the `kubepods` trees).
pub fn pod_cgroups(root: &Path, uid: &str) -> Vec<PathBuf> {
    let names = [
        format!("pod{uid}"),
        format!("pod{}.slice", uid.replace('-', "_")),
    ];
    find_pod_cgroups(root, |name| {
        names
            .iter()
            .any(|n| name == *n || name.ends_with(&format!("-{n}")))
    })
}

/// Every pod's cgroup below the hierarchy root `root`.
pub fn all_pod_cgroups(root: &Path) -> Vec<PathBuf> {
    find_pod_cgroups(root, |name| {
        let name = name.strip_suffix(".slice").unwrap_or(name);
        let uid = match name.rsplit_once("-pod") {
            Some((_, uid)) => uid,
            None => name.strip_prefix("pod").unwrap_or(""),
        };
        uid.len() >= 32
            && uid
                .chars()
                .all(|c| c.is_ascii_hexdigit() || c == '-' || c == '_')
    })
}

/// The cgroups a few levels down the `kubepods` trees whose names `is_pod` accepts (a pod's
/// cgroup is not searched further).
fn find_pod_cgroups(root: &Path, is_pod: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut level: Vec<PathBuf> = ["kubepods", "kubepods.slice"]
        .iter()
        .map(|d| root.join(d))
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
                if is_pod(&name) {
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

    const UID: &str = "0b6c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d";

    /// Pod `UID`'s cgroup in the cgroupfs and the systemd layout under `root`, each with a
    /// container cgroup below it, plus a pod-like name that is no pod's; the pod cgroups, sorted.
    fn both_layouts(root: &Path) -> Vec<PathBuf> {
        let cgroupfs = root.join(format!("kubepods/burstable/pod{UID}"));
        let systemd = root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            UID.replace('-', "_")
        ));
        for d in [&cgroupfs, &systemd] {
            std::fs::create_dir_all(d.join("0123abcd")).unwrap();
        }
        std::fs::create_dir_all(root.join("kubepods/burstable/podcast")).unwrap();
        let mut pods = vec![cgroupfs, systemd];
        pods.sort();
        pods
    }

    #[test]
    fn every_pod_cgroup_is_found_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let want = both_layouts(dir.path());
        let mut found = all_pod_cgroups(dir.path());
        found.sort();
        assert_eq!(found, want);
    }

    #[test]
    fn pod_cgroups_are_found_for_both_cgroup_drivers() {
        let dir = tempfile::tempdir().unwrap();
        let want = both_layouts(dir.path());
        let mut found = pod_cgroups(dir.path(), UID);
        found.sort();
        assert_eq!(found, want);
    }

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, "").unwrap();
    }

    #[test]
    fn the_hierarchy_is_told_by_its_files() {
        let dir = tempfile::tempdir().unwrap();
        let (v1, v2, none) = (
            dir.path().join("blkio"),
            dir.path().join("unified"),
            dir.path().join("none"),
        );
        touch(&v1.join("blkio.throttle.write_bps_device"));
        touch(&v2.join("cgroup.controllers"));
        std::fs::create_dir(&none).unwrap();
        let missing = dir.path().join("missing");
        let find = |d: &Path, unified: &Path| Hierarchy::find_with(d, &missing, unified);
        assert_eq!(find(&v1, &v2), Some(Hierarchy::Blkio(v1.clone())));
        assert_eq!(find(&v2, &v1), Some(Hierarchy::Unified(v2.clone())));
        assert_eq!(find(&none, &v2), None);
        // Only the default directory, missing, falls back to the unified root.
        assert_eq!(find(&missing, &v2), Some(Hierarchy::Unified(v2.clone())));
        assert_eq!(find(&missing, &v1), None);
        assert_eq!(find(&dir.path().join("other"), &v2), None);
    }

    #[test]
    fn limits_go_to_the_pods_io_max_on_cgroup_v2() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        touch(&root.join("cgroup.controllers"));
        let uid = "0b6c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d";
        let pod = root.join(format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ));
        touch(&pod.join("io.max"));
        let limits = IoLimits {
            read_bps: Some(10 << 20),
            write_iops: Some(50),
            ..IoLimits::default()
        };
        limit_pod(root, uid, (253, 7), &limits).unwrap();
        assert_eq!(
            std::fs::read_to_string(pod.join("io.max")).unwrap(),
            "253:7 rbps=10485760 wbps=max riops=max wiops=50"
        );
    }

    #[test]
    fn limits_that_cannot_take_effect_are_refused_and_no_limits_need_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let uid = "0b6c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d";
        let limits = IoLimits {
            write_bps: Some(1 << 20),
            ..IoLimits::default()
        };
        // No hierarchy at all.
        let err = limit_pod(dir.path(), uid, (7, 0), &limits).unwrap_err();
        assert!(matches!(err, Error::Precondition(_)), "{err:?}");
        assert!(err.to_string().contains("--blkio-cgroup-dir"), "{err}");
        limit_pod(dir.path(), uid, (7, 0), &IoLimits::default()).unwrap();
        // A hierarchy without the pod's cgroup.
        touch(&dir.path().join("cgroup.controllers"));
        std::fs::create_dir(dir.path().join("kubepods")).unwrap();
        let err = limit_pod(dir.path(), uid, (7, 0), &limits).unwrap_err();
        assert!(matches!(err, Error::Precondition(_)), "{err:?}");
        assert!(err.to_string().contains(uid), "{err}");
        limit_pod(dir.path(), uid, (7, 0), &IoLimits::default()).unwrap();
    }
}
