//! Binding a backing file to a loop device and unbinding it: a free device from the kernel,
//! configured in one ioctl where the kernel has it (step by step on older kernels), with direct
//! I/O when the backing filesystem allows it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use super::ioctl::{
    self, LoopConfig, LoopInfo64, LOOP_CONTROL, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY,
    LO_KEY_SIZE, LO_NAME_SIZE,
};
use crate::error::{Error, IoContext, Result};

/// How often to retry when another process takes the free device first.
const ATTACH_ATTEMPTS: usize = 16;
/// 5 ms steps: up to 2 s for a device to be released after LOOP_CLR_FD.
const DETACH_WAIT_STEPS: usize = 400;

/// Where to place a loop device over a file: the whole file by default, or a
/// byte range of it (an LV's extents on its physical volume).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Window {
    pub offset: u64,
    pub size_limit: u64,
}

/// Attach `backing` to a free loop device and return the device path.
/// Direct I/O is asked for (so pages are not cached in both the loop device
/// and the backing file) and dropped if the backing filesystem refuses it.
pub fn attach(backing: &Path, window: Window) -> Result<PathBuf> {
    attach_with(backing, window, false)
}

/// A read-only loop device over `backing` (a file or another block device):
/// writes through it fail with EROFS whatever the opener asks for.
pub fn attach_read_only(backing: &Path) -> Result<PathBuf> {
    attach_with(backing, Window::default(), true)
}

fn attach_with(backing: &Path, window: Window, read_only: bool) -> Result<PathBuf> {
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(backing)
        .ctx("open backing file", backing)?;
    let control = File::open(LOOP_CONTROL).ctx("open", LOOP_CONTROL)?;
    let mut last_err = None;
    for _ in 0..ATTACH_ATTEMPTS {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let number = unsafe { ioctl::ctl_get_free(control.as_raw_fd()) }
            .ctx("LOOP_CTL_GET_FREE", LOOP_CONTROL)?;
        let device = PathBuf::from(format!("/dev/loop{number}"));
        match configure(&device, &file, backing, window, read_only) {
            Ok(()) => return Ok(device),
            // Someone else configured it between GET_FREE and our call: try the next one.
            Err(Errno::EBUSY) => last_err = Some(Errno::EBUSY),
            Err(errno) => return Err(Error::io("attach loop device", device, errno.into())),
        }
    }
    Err(Error::io(
        "attach loop device for",
        backing,
        std::io::Error::from(last_err.unwrap_or(Errno::EBUSY)),
    ))
}

pub(super) fn configure(
    device: &Path,
    file: &File,
    backing: &Path,
    window: Window,
    read_only: bool,
) -> std::result::Result<(), Errno> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(device)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
    let mut info = new_info(backing, window, read_only);
    info.lo_flags |= LO_FLAGS_DIRECT_IO;
    let mut config = LoopConfig {
        fd: file.as_raw_fd() as u32,
        block_size: 0,
        info,
        reserved: [0; 8],
    };
    // SAFETY: `config` is a valid loop_config for the lifetime of the call.
    let result = unsafe { ioctl::configure(dev.as_raw_fd(), &config) };
    match result {
        Ok(_) => Ok(()),
        // Direct I/O impossible on this backing file: buffered I/O then.
        Err(Errno::EINVAL) => {
            config.info.lo_flags &= !LO_FLAGS_DIRECT_IO;
            // SAFETY: as above.
            match unsafe { ioctl::configure(dev.as_raw_fd(), &config) } {
                Ok(_) => Ok(()),
                Err(Errno::EINVAL | Errno::ENOTTY) => legacy_configure(&dev, file, &config.info),
                Err(e) => Err(e),
            }
        }
        // Kernels before 5.8 lack LOOP_CONFIGURE.
        Err(Errno::ENOTTY) => legacy_configure(&dev, file, &new_info(backing, window, read_only)),
        Err(e) => Err(e),
    }
}

fn legacy_configure(dev: &File, file: &File, info: &LoopInfo64) -> std::result::Result<(), Errno> {
    // SAFETY: LOOP_SET_FD takes a file descriptor by value.
    unsafe { ioctl::set_fd(dev.as_raw_fd(), file.as_raw_fd()) }?;
    // SAFETY: `info` is a valid loop_info64.
    if let Err(e) = unsafe { ioctl::set_status64(dev.as_raw_fd(), info) } {
        // SAFETY: undo the half-configured device.
        let _ = unsafe { ioctl::clr_fd(dev.as_raw_fd()) };
        return Err(e);
    }
    Ok(())
}

fn new_info(backing: &Path, window: Window, read_only: bool) -> LoopInfo64 {
    let mut name = [0u8; LO_NAME_SIZE];
    let bytes = backing.as_os_str().as_encoded_bytes();
    let len = bytes.len().min(LO_NAME_SIZE - 1);
    name[..len].copy_from_slice(&bytes[..len]);
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: window.offset,
        lo_sizelimit: window.size_limit,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: if read_only { LO_FLAGS_READ_ONLY } else { 0 },
        lo_file_name: name,
        lo_crypt_name: [0; LO_NAME_SIZE],
        lo_encrypt_key: [0; LO_KEY_SIZE],
        lo_init: [0; 2],
    }
}

/// Detach a loop device. If it is still open (mounted), the kernel detaches
/// it when the last user closes it.
pub fn detach(device: &Path) -> Result<()> {
    let dev = match File::open(device) {
        Ok(dev) => dev,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("open", device, e)),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    match unsafe { ioctl::clr_fd(dev.as_raw_fd()) } {
        Ok(_) | Err(Errno::ENXIO) => {}
        Err(e) => return Err(Error::io("LOOP_CLR_FD", device, e.into())),
    }
    drop(dev);
    wait_detached(device);
    Ok(())
}

/// The kernel clears a device that someone else (udev, blkid) still holds
/// when they close it; wait briefly so callers see it gone.
fn wait_detached(device: &Path) {
    let Some(name) = device.file_name() else {
        return;
    };
    let backing = Path::new("/sys/block").join(name).join("loop/backing_file");
    for _ in 0..DETACH_WAIT_STEPS {
        if !backing.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    tracing::warn!(target: super::LOG_TARGET, device = %device.display(), "loop device still busy; it detaches when closed");
}
