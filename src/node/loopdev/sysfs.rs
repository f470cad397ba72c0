//! What sysfs says about loop devices: every attached device with its backing file and window,
//! and the entry of one device. Reads are counted (a scan costs one read per device on the host).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::Window;
use crate::error::{IoContext, Result};

/// The kernel's block major for loop devices.
pub const LOOP_MAJOR: u32 = 7;

/// Files and directories read under `/sys` by this process: a scan of every
/// loop device costs as many reads as the host has devices.
static SYSFS_READS: AtomicU64 = AtomicU64::new(0);

pub fn sysfs_reads() -> u64 {
    SYSFS_READS.load(Ordering::Relaxed)
}

fn sysfs_read(path: &Path) -> std::io::Result<String> {
    SYSFS_READS.fetch_add(1, Ordering::Relaxed);
    fs::read_to_string(path)
}

/// One attached loop device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub device: PathBuf,
    pub backing_file: PathBuf,
    pub offset: u64,
    pub size_limit: u64,
    pub direct_io: bool,
}

/// Every attached loop device, read from `/sys/block/loop*/loop`.
pub fn attachments() -> Result<Vec<Attachment>> {
    attachments_in(Path::new("/sys/block"))
}

fn attachments_in(sys_block: &Path) -> Result<Vec<Attachment>> {
    let mut found = Vec::new();
    SYSFS_READS.fetch_add(1, Ordering::Relaxed);
    let entries = fs::read_dir(sys_block).ctx("read", sys_block)?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| n.starts_with("loop")) else {
            continue;
        };
        let loop_dir = entry.path().join("loop");
        // Detached devices have no `loop` directory; a device detaching
        // under us may lose it between reads.
        let Ok(backing) = sysfs_read(&loop_dir.join("backing_file")) else {
            continue;
        };
        let read_u64 = |file: &str| {
            sysfs_read(&loop_dir.join(file))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        found.push(Attachment {
            device: PathBuf::from(format!("/dev/{name}")),
            backing_file: backing_path(&backing),
            offset: read_u64("offset"),
            size_limit: read_u64("sizelimit"),
            direct_io: read_u64("dio") == 1,
        });
    }
    found.sort_by(|a, b| a.device.cmp(&b.device));
    Ok(found)
}

/// sysfs shows a removed backing file with a suffix.
fn backing_path(raw: &str) -> PathBuf {
    let raw = raw.trim_end_matches('\n');
    PathBuf::from(raw.strip_suffix(" (deleted)").unwrap_or(raw))
}

/// The loop device with this device number and its backing file, in one
/// read of that device's sysfs entry: `None` if it is not a loop device or
/// not attached.
pub fn backing_of(device: (u32, u32)) -> Option<(PathBuf, PathBuf)> {
    if device.0 != LOOP_MAJOR {
        return None;
    }
    let entry = PathBuf::from(format!("/sys/dev/block/{}:{}", device.0, device.1));
    let backing = sysfs_read(&entry.join("loop/backing_file")).ok()?;
    let name = fs::read_link(&entry).ok()?;
    let node = Path::new("/dev").join(name.file_name()?);
    Some((node, backing_path(&backing)))
}

/// The byte window (offset, size limit) an attached loop device node
/// exposes, from its sysfs entry; `None` if it is not attached.
pub fn window_of_node(device: &Path) -> Option<Window> {
    let dir = Path::new("/sys/block")
        .join(device.file_name()?)
        .join("loop");
    let read = |file: &str| sysfs_read(&dir.join(file)).ok()?.trim().parse().ok();
    Some(Window {
        offset: read("offset")?,
        size_limit: read("sizelimit")?,
    })
}

/// Loop devices currently backed by `backing` (normally zero or one).
pub fn find_attached(backing: &Path) -> Result<Vec<Attachment>> {
    Ok(attachments()?
        .into_iter()
        .filter(|a| a.backing_file == backing)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysfs_attachments_are_parsed() {
        let dir = tempfile::tempdir().expect("test setup");
        let sys = dir.path();
        fs::create_dir_all(sys.join("loop3/loop")).expect("test setup");
        fs::write(
            sys.join("loop3/loop/backing_file"),
            "/var/lib/kennel/a b.img\n",
        )
        .expect("test setup");
        fs::write(sys.join("loop3/loop/offset"), "4096\n").expect("test setup");
        fs::write(sys.join("loop3/loop/sizelimit"), "0\n").expect("test setup");
        fs::write(sys.join("loop3/loop/dio"), "1\n").expect("test setup");
        fs::create_dir_all(sys.join("loop4")).expect("test setup"); // detached: no loop/ dir
        fs::create_dir_all(sys.join("vda")).expect("test setup");
        let found = attachments_in(sys).expect("test setup");
        assert_eq!(
            found,
            vec![Attachment {
                device: PathBuf::from("/dev/loop3"),
                backing_file: PathBuf::from("/var/lib/kennel/a b.img"),
                offset: 4096,
                size_limit: 0,
                direct_io: true,
            }]
        );
    }
}
