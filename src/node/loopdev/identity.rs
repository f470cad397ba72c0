//! Which file a loop device is really attached to: the device and inode the kernel holds, not
//! the path sysfs prints.

use std::fs::{self, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use super::ioctl::{self, LoopInfo64};

/// A backing file as the kernel knows it (LOOP_GET_STATUS64's device and inode). sysfs's
/// `backing_file` is no identity: the kernel prints the path as the mount it was opened through
/// sees it, so once the mount namespace that attached a device is gone (a driver container
/// replaced by a new one) it names the file relative to a bind mount that no longer exists
/// (`/kv-….img` for `/var/lib/kennel/loop/kv-….img`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct FileId {
    dev: u64,
    ino: u64,
}

pub(super) fn file_id(path: &Path) -> Option<FileId> {
    fs::metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The backing file of an attached loop device node; `None` if it is detached.
pub(super) fn backing_id(device: &Path) -> Option<FileId> {
    let dev = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device)
        .ok()?;
    let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
    // SAFETY: LOOP_GET_STATUS64 fills one loop_info64; zeroed is a valid start.
    unsafe { ioctl::get_status64(dev.as_raw_fd(), info.as_mut_ptr()) }.ok()?;
    // SAFETY: initialized above (zeroed, then filled by the kernel).
    let info = unsafe { info.assume_init() };
    Some(FileId {
        dev: info.lo_device,
        ino: info.lo_inode,
    })
}

/// Whether the loop device node `device` is attached to the file `backing`.
pub fn is_backed_by(device: &Path, backing: &Path) -> bool {
    match (backing_id(device), file_id(backing)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}
