//! Quiescing a mounted filesystem so a copy of its device is consistent.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{Error, IoContext, Result};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Run `work` while the filesystem mounted at `mount_point` is frozen: all
/// dirty data is on the device and new writes wait. Thawed even if `work` fails.
pub fn while_frozen<T>(mount_point: &Path, work: impl FnOnce() -> Result<T>) -> Result<T> {
    let dir = File::open(mount_point).ctx("open", mount_point)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE ignores its argument beyond reading an int.
    unsafe { fifreeze(dir.as_raw_fd(), &mut arg) }.ctx("FIFREEZE", mount_point)?;
    let result = work();
    // SAFETY: as above.
    let thawed = unsafe { fithaw(dir.as_raw_fd(), &mut arg) };
    match (result, thawed) {
        (Ok(value), Ok(_)) => Ok(value),
        (Err(e), _) => Err(e),
        (Ok(_), Err(e)) => Err(Error::io("FITHAW", mount_point, e.into())),
    }
}
