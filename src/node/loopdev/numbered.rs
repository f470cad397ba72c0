//! Loop devices made and removed under chosen numbers, and a file bound to one of them: for
//! crowding a node in benchmarks and tests, never on a volume's path.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::attach::{configure, Window};
use super::ioctl::{self, LOOP_CONTROL};
use crate::error::{Error, IoContext, Result};

/// A loop device created with LOOP_CTL_ADD under a chosen number (for
/// crowding a node in benchmarks and tests).
pub fn add_device(number: u32) -> Result<PathBuf> {
    let control = File::open(LOOP_CONTROL).ctx("open", LOOP_CONTROL)?;
    // SAFETY: LOOP_CTL_ADD takes the device number by value.
    unsafe { ioctl::ctl_add(control.as_raw_fd(), number as libc::c_int) }
        .ctx("LOOP_CTL_ADD", format!("/dev/loop{number}"))?;
    Ok(PathBuf::from(format!("/dev/loop{number}")))
}

/// Remove a detached loop device made with [`add_device`].
pub fn remove_device(number: u32) -> Result<()> {
    let control = File::open(LOOP_CONTROL).ctx("open", LOOP_CONTROL)?;
    // SAFETY: LOOP_CTL_REMOVE takes the device number by value.
    match unsafe { ioctl::ctl_remove(control.as_raw_fd(), number as libc::c_int) } {
        Ok(_) | Err(Errno::ENODEV) => Ok(()),
        Err(e) => Err(Error::io(
            "LOOP_CTL_REMOVE",
            format!("/dev/loop{number}"),
            e.into(),
        )),
    }
}

/// Attach `backing` to one given, unbound loop device.
pub fn attach_to(device: &Path, backing: &Path) -> Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(backing)
        .ctx("open backing file", backing)?;
    configure(device, &file, backing, Window::default(), false)
        .map_err(|errno| Error::io("attach loop device", device, errno.into()))
}
