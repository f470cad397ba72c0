//! What this machine shows of a volume: its device (a loop device backed by the volume's image,
//! or an LV's device-mapper node) and where that device is mounted. `kennel ctl` runs beside the
//! driver, so this is the node's view without asking the driver for anything CSI lacks.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// A volume's state on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeState {
    /// A block device for the volume exists here.
    pub attached: bool,
    /// Mounted at a staging path.
    pub staged: bool,
    /// Mounts beyond the staging one: the pods' target paths.
    pub published: usize,
    /// The mounted filesystem, or `block` for a raw block volume; None when not mounted.
    pub fs_type: Option<String>,
}

impl NodeState {
    /// `published (N)`, `staged`, `attached` or `-`.
    pub fn summary(&self) -> String {
        match (self.attached, self.staged, self.published) {
            (_, _, n) if n > 0 => format!("published ({n})"),
            (_, true, _) => "staged".to_owned(),
            (true, false, _) => "attached".to_owned(),
            _ => "-".to_owned(),
        }
    }
}

/// One block device: its kernel name (`loop3`, `dm-1`) and `major:minor`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Device {
    name: String,
    dev: String,
}

/// The devices of each volume in `ids`, from sysfs under `sys`.
fn devices(sys: &Path, ids: &[&str]) -> BTreeMap<String, Vec<Device>> {
    let mut found: BTreeMap<String, Vec<Device>> = BTreeMap::new();
    let Ok(entries) = fs::read_dir(sys.join("block")) else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // A loop device names its backing image; a device-mapper node its `vg-lv` name, with
        // dashes doubled.
        let label = fs::read_to_string(path.join("loop/backing_file"))
            .or_else(|_| fs::read_to_string(path.join("dm/name")))
            .unwrap_or_default();
        let Some(id) = ids
            .iter()
            .find(|id| label.contains(**id) || label.contains(&id.replace('-', "--")))
        else {
            continue;
        };
        let dev = fs::read_to_string(path.join("dev")).unwrap_or_default();
        found.entry((*id).to_owned()).or_default().push(Device {
            name,
            dev: dev.trim().to_owned(),
        });
    }
    found
}

/// `(major:minor, root, fs type)` of each mount in a mountinfo text.
fn mounts(mountinfo: &str) -> Vec<(String, String, String)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some((
                (*fields.get(2)?).to_owned(),
                (*fields.get(3)?).to_owned(),
                (*fields.get(sep + 1)?).to_owned(),
            ))
        })
        .collect()
}

fn state_of(devices: &[Device], mounts: &[(String, String, String)]) -> NodeState {
    let mut state = NodeState {
        attached: !devices.is_empty(),
        ..NodeState::default()
    };
    let mut count: usize = 0;
    for (dev, root, fs_type) in mounts {
        for d in devices {
            // A filesystem volume is mounted from the device; a block volume is a bind mount
            // of the device node out of devtmpfs.
            if *dev == d.dev {
                count += 1;
                state.fs_type.get_or_insert_with(|| fs_type.clone());
            } else if fs_type == "devtmpfs" && root.trim_start_matches('/') == d.name {
                count += 1;
                state.fs_type.get_or_insert_with(|| "block".to_owned());
            }
        }
    }
    state.staged = count > 0;
    state.published = count.saturating_sub(1);
    state
}

/// The node state of each volume in `ids`, read from this machine.
pub fn read(ids: &[&str]) -> BTreeMap<String, NodeState> {
    read_from(Path::new("/sys"), Path::new("/proc/self/mountinfo"), ids)
}

fn read_from(sys: &Path, mountinfo: &Path, ids: &[&str]) -> BTreeMap<String, NodeState> {
    let devices = devices(sys, ids);
    let mounts = mounts(&fs::read_to_string(mountinfo).unwrap_or_default());
    ids.iter()
        .map(|id| {
            let devs = devices.get(*id).map(Vec::as_slice).unwrap_or_default();
            ((*id).to_owned(), state_of(devs, &mounts))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_sys(dir: &Path, name: &str, dev: &str, file: &str, label: &str) {
        let block = dir.join("block").join(name);
        fs::create_dir_all(block.join("loop")).unwrap();
        fs::create_dir_all(block.join("dm")).unwrap();
        fs::write(block.join("dev"), format!("{dev}\n")).unwrap();
        fs::write(block.join(file), format!("{label}\n")).unwrap();
    }

    #[test]
    fn staged_published_and_block_volumes() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path().join("sys");
        fake_sys(
            &sys,
            "loop3",
            "7:3",
            "loop/backing_file",
            "/var/lib/kennel/kv-aaa.img",
        );
        fake_sys(
            &sys,
            "loop4",
            "7:4",
            "loop/backing_file",
            "/var/lib/kennel/kv-bbb.img",
        );
        fake_sys(&sys, "dm-0", "253:0", "dm/name", "vg0-kv--ccc");
        fake_sys(
            &sys,
            "loop5",
            "7:5",
            "loop/backing_file",
            "/var/lib/kennel/kv-ddd.img",
        );
        let mountinfo = dir.path().join("mountinfo");
        fs::write(
            &mountinfo,
            "36 25 7:3 / /k/globalmount rw - ext4 /dev/loop3 rw\n\
             37 25 7:3 / /k/pods/a/mount rw - ext4 /dev/loop3 rw\n\
             38 25 7:3 / /k/pods/b/mount rw shared:1 - ext4 /dev/loop3 rw\n\
             39 25 0:5 /loop4 /k/block/staging rw - devtmpfs udev rw\n\
             40 25 253:0 / /k/lvm/globalmount rw - xfs /dev/mapper/vg0-kv--ccc rw\n",
        )
        .unwrap();
        let states = read_from(
            &sys,
            &mountinfo,
            &["kv-aaa", "kv-bbb", "kv-ccc", "kv-ddd", "kv-eee"],
        );
        let aaa = &states["kv-aaa"];
        assert_eq!((aaa.staged, aaa.published), (true, 2));
        assert_eq!(aaa.fs_type.as_deref(), Some("ext4"));
        assert_eq!(aaa.summary(), "published (2)");
        assert_eq!(states["kv-bbb"].fs_type.as_deref(), Some("block"));
        assert_eq!(states["kv-bbb"].summary(), "staged");
        assert_eq!(states["kv-ccc"].fs_type.as_deref(), Some("xfs"));
        assert_eq!(states["kv-ddd"].summary(), "attached");
        assert_eq!(states["kv-eee"], NodeState::default());
        assert_eq!(states["kv-eee"].summary(), "-");
    }
}
