//! Loop devices through the kernel's ioctl interface (no `losetup`).

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use nix::errno::Errno;

use crate::error::{Error, IoContext, Result};

const LOOP_CONTROL: &str = "/dev/loop-control";
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
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_DIRECT_IO: u32 = 16;
/// How often to retry when another process takes the free device first.
const ATTACH_ATTEMPTS: usize = 16;
/// 5 ms steps: up to 2 s for a device to be released after LOOP_CLR_FD.
const DETACH_WAIT_STEPS: usize = 400;

#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

mod ioctl {
    use super::{LoopConfig, LoopInfo64};
    nix::ioctl_none_bad!(ctl_get_free, 0x4C82);
    nix::ioctl_write_int_bad!(ctl_add, 0x4C80);
    nix::ioctl_write_int_bad!(ctl_remove, 0x4C81);
    nix::ioctl_write_ptr_bad!(configure, 0x4C0A, LoopConfig);
    nix::ioctl_write_int_bad!(set_fd, 0x4C00);
    nix::ioctl_write_ptr_bad!(set_status64, 0x4C04, LoopInfo64);
    nix::ioctl_read_bad!(get_status64, 0x4C05, LoopInfo64);
    nix::ioctl_none_bad!(clr_fd, 0x4C01);
    nix::ioctl_none_bad!(set_capacity, 0x4C07);
    nix::ioctl_read!(blk_get_size64, 0x12, 114, u64);
}

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

fn configure(
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
    tracing::warn!(device = %device.display(), "loop device still busy; it detaches when closed");
}

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

/// A backing file as the kernel knows it (LOOP_GET_STATUS64's device and inode). sysfs's
/// `backing_file` is no identity: the kernel prints the path as the mount it was opened through
/// sees it, so once the mount namespace that attached a device is gone (a driver container
/// replaced by a new one) it names the file relative to a bind mount that no longer exists
/// (`/kv-….img` for `/var/lib/kennel/loop/kv-….img`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct FileId {
    dev: u64,
    ino: u64,
}

fn file_id(path: &Path) -> Option<FileId> {
    fs::metadata(path).ok().map(|m| FileId {
        dev: m.dev(),
        ino: m.ino(),
    })
}

/// The backing file of an attached loop device node; `None` if it is detached.
fn backing_id(device: &Path) -> Option<FileId> {
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

/// The block device nodes directly in `dir` (e.g. `/dev`), as candidates for [`LoopIndex::scan`].
pub fn device_nodes(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)
        .ctx("read", dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
        .map(|e| e.path())
        .collect())
}

/// Which loop device holds which backing file, for the files one owner
/// cares about: built with one scan of the attached devices at start-up
/// (matched by device and inode, not by sysfs's path), kept up to date by
/// attaching and detaching through it, and checked on every use against
/// that device's status (a device detached and reused by someone else is
/// dropped, never trusted).
#[derive(Default)]
pub struct LoopIndex {
    devices: Mutex<BTreeMap<PathBuf, Attached>>,
}

/// The devices over one backing file, and that file's identity when it was indexed: a file
/// removed while attached (a volume whose record was lost) is still recognised.
#[derive(Clone)]
struct Attached {
    file: FileId,
    devices: Vec<PathBuf>,
}

impl LoopIndex {
    /// Index the attached devices over any of `files`.
    pub fn scan(files: impl IntoIterator<Item = PathBuf>) -> Result<Self> {
        let wanted: BTreeMap<FileId, PathBuf> = files
            .into_iter()
            .filter_map(|path| Some((file_id(&path)?, path)))
            .collect();
        // sysfs keeps the backing file's own name even when its directory reads wrong: opening
        // only the devices whose name matches keeps this scan from holding other owners'
        // devices open while they detach them.
        let names: BTreeSet<&OsStr> = wanted.values().filter_map(|p| p.file_name()).collect();
        let mut devices: BTreeMap<PathBuf, Attached> = BTreeMap::new();
        if !wanted.is_empty() {
            for attachment in attachments()? {
                let named = attachment.backing_file.file_name();
                if !named.is_some_and(|n| names.contains(n)) {
                    continue;
                }
                let Some(file) = backing_id(&attachment.device) else {
                    continue;
                };
                if let Some(path) = wanted.get(&file) {
                    devices
                        .entry(path.clone())
                        .or_insert_with(|| Attached {
                            file,
                            devices: Vec::new(),
                        })
                        .devices
                        .push(attachment.device);
                }
            }
        }
        Ok(LoopIndex {
            devices: Mutex::new(devices),
        })
    }

    fn devices(&self) -> MutexGuard<'_, BTreeMap<PathBuf, Attached>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The devices over `backing`, each verified against the kernel.
    pub fn find(&self, backing: &Path) -> Vec<PathBuf> {
        let Some(listed) = self.devices().get(backing).cloned() else {
            return Vec::new();
        };
        let verified: Vec<PathBuf> = listed
            .devices
            .iter()
            .filter(|device| backing_id(device) == Some(listed.file))
            .cloned()
            .collect();
        if verified.len() != listed.devices.len() {
            let mut devices = self.devices();
            match verified.is_empty() {
                true => devices.remove(backing),
                false => devices.insert(
                    backing.to_owned(),
                    Attached {
                        file: listed.file,
                        devices: verified.clone(),
                    },
                ),
            };
        }
        verified
    }

    /// Attach `backing` (see [`attach`]) and remember the device.
    pub fn attach(&self, backing: &Path, window: Window) -> Result<PathBuf> {
        self.remember(backing, attach(backing, window)?)
    }

    /// Attach `backing` read-only (see [`attach_read_only`]) and remember the device.
    pub fn attach_read_only(&self, backing: &Path) -> Result<PathBuf> {
        self.remember(backing, attach_read_only(backing)?)
    }

    fn remember(&self, backing: &Path, device: PathBuf) -> Result<PathBuf> {
        let file = backing_id(&device)
            .or_else(|| file_id(backing))
            .ok_or_else(|| Error::NotFound(format!("{} is not attached", device.display())))?;
        let mut devices = self.devices();
        let entry = devices.entry(backing.to_owned()).or_insert(Attached {
            file,
            devices: Vec::new(),
        });
        // A new file at the same path: the old one's devices are not this file's.
        if entry.file != file {
            *entry = Attached {
                file,
                devices: Vec::new(),
            };
        }
        entry.devices.push(device.clone());
        Ok(device)
    }

    /// Detach one device over `backing` and forget it.
    pub fn detach(&self, backing: &Path, device: &Path) -> Result<()> {
        detach(device)?;
        let mut devices = self.devices();
        if let Some(entry) = devices.get_mut(backing) {
            entry.devices.retain(|d| d != device);
            if entry.devices.is_empty() {
                devices.remove(backing);
            }
        }
        Ok(())
    }

    /// Detach every device over `backing`.
    pub fn detach_all(&self, backing: &Path) -> Result<()> {
        for device in self.find(backing) {
            self.detach(backing, &device)?;
        }
        Ok(())
    }
}

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

    #[test]
    fn loop_structs_match_the_kernel_abi() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
