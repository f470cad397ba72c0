//! The size of an attached device: the backing file re-read after it grew, the window moved,
//! and any block device's size asked of the kernel.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::ioctl::{self, LoopInfo64};
use super::Window;
use crate::error::{IoContext, Result};

/// Re-read the backing file's size after it grew.
pub fn refresh_capacity(device: &Path) -> Result<()> {
    let dev = File::open(device).ctx("open", device)?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    unsafe { ioctl::set_capacity(dev.as_raw_fd()) }.ctx("LOOP_SET_CAPACITY", device)?;
    Ok(())
}

/// Move an attached device's window (e.g. after the LV under it grew).
pub fn set_window(device: &Path, window: Window) -> Result<()> {
    let dev = File::open(device).ctx("open", device)?;
    let mut info = std::mem::MaybeUninit::<LoopInfo64>::zeroed();
    // SAFETY: LOOP_GET_STATUS64 fills one loop_info64; zeroed is a valid start.
    unsafe { ioctl::get_status64(dev.as_raw_fd(), info.as_mut_ptr()) }
        .ctx("LOOP_GET_STATUS64", device)?;
    // SAFETY: initialized above (zeroed, then filled by the kernel).
    let mut info = unsafe { info.assume_init() };
    info.lo_offset = window.offset;
    info.lo_sizelimit = window.size_limit;
    // SAFETY: `info` is a valid loop_info64.
    unsafe { ioctl::set_status64(dev.as_raw_fd(), &info) }.ctx("LOOP_SET_STATUS64", device)?;
    Ok(())
}

/// Size in bytes of any block device.
pub fn device_size(device: &Path) -> Result<u64> {
    let dev = File::open(device).ctx("open", device)?;
    let mut size = 0u64;
    // SAFETY: BLKGETSIZE64 writes one u64.
    unsafe { ioctl::blk_get_size64(dev.as_raw_fd(), &mut size) }.ctx("BLKGETSIZE64", device)?;
    Ok(size)
}
