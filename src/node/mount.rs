//! Mount state: of one path through `statx` on its descriptor, of the whole
//! node from `/proc/self/mountinfo`; mount/umount through `nix`.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::error::{Error, IoContext, Result};
use crate::node::selinux;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// Reads of the whole mount table by this process: its cost grows with the
/// node's mounts, so request paths must not depend on it per question.
static MOUNTINFO_READS: AtomicU64 = AtomicU64::new(0);

pub fn mountinfo_reads() -> u64 {
    MOUNTINFO_READS.load(Ordering::Relaxed)
}

/// One line of mountinfo: the fields Kennel needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The ID `statx(STATX_MNT_ID)` reports for paths on this mount.
    pub mount_id: u64,
    /// In a peer group: mounts below it propagate (`shared:N`).
    pub shared: bool,
    /// major:minor of the mounted device.
    pub dev: (u32, u32),
    /// Path inside the source filesystem that is mounted (`/` unless a bind of a subtree).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub options: Vec<String>,
    /// Options of the filesystem itself (`ro` after errors=remount-ro).
    pub super_options: Vec<String>,
    pub fs_type: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.iter().any(|o| o == "ro")
    }
}

pub fn mounts() -> Result<Vec<MountEntry>> {
    MOUNTINFO_READS.fetch_add(1, Ordering::Relaxed);
    let text = std::fs::read_to_string(MOUNTINFO).ctx("read", MOUNTINFO)?;
    Ok(parse_mountinfo(&text))
}

/// Mounts whose mount point is exactly `path`, oldest first (the last one is visible).
pub fn mounts_at(path: &Path) -> Result<Vec<MountEntry>> {
    Ok(mounts()?
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect())
}

/// major:minor of a block device node.
pub fn device_number(device: &Path) -> Result<(u32, u32)> {
    let st = nix::sys::stat::stat(device).ctx("stat", device)?;
    let rdev = st.st_rdev;
    Ok((
        nix::sys::stat::major(rdev) as u32,
        nix::sys::stat::minor(rdev) as u32,
    ))
}

/// Where the filesystem on `device` is mounted, if anywhere.
pub fn mount_point_of(device: &Path) -> Result<Option<PathBuf>> {
    let number = device_number(device)?;
    Ok(mounts()?
        .into_iter()
        .find(|m| m.dev == number)
        .map(|m| m.mount_point))
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    // 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let mount_id = left.next()?.parse().ok()?;
    let _parent_id = left.next()?;
    let (major, minor) = left.next()?.split_once(':')?;
    let root = unescape(left.next()?);
    let mount_point = unescape(left.next()?);
    let mount_options = left.next()?;
    let shared = left.any(|tag| tag.starts_with("shared:"));
    let mut right = right.split(' ');
    let fs_type = unescape(right.next()?);
    let source = unescape(right.next().unwrap_or(""));
    let super_options = right.next().unwrap_or("");
    let super_options: Vec<String> = super_options
        .split(',')
        .filter(|o| !o.is_empty())
        .map(str::to_owned)
        .collect();
    let mut options: Vec<String> = mount_options.split(',').map(str::to_owned).collect();
    options.extend(super_options.iter().cloned());
    Some(MountEntry {
        mount_id,
        shared,
        super_options,
        dev: (major.parse().ok()?, minor.parse().ok()?),
        root: PathBuf::from(root),
        mount_point: PathBuf::from(mount_point),
        options,
        fs_type,
        source,
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What one path is, from its own descriptor: no mount table involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathState {
    /// The mount the path lies on (the top one if the path is a mount point).
    pub mount_id: u64,
    /// The path is the root of its mount: something is mounted there.
    pub mount_root: bool,
    /// major:minor of the filesystem holding the path.
    pub dev: (u32, u32),
    /// major:minor of the device if the path is a block device node.
    pub block_device: Option<(u32, u32)>,
    /// Writes are refused (mount or filesystem read-only).
    pub read_only: bool,
    /// The filesystem's name where Kennel makes it (ext4, xfs), else its magic number.
    pub fs_type: String,
}

impl PathState {
    /// The path is a mount of the filesystem on `device`.
    pub fn is_filesystem_of(&self, device: (u32, u32)) -> bool {
        self.mount_root && self.dev == device
    }

    /// The path is a bind of the device node `device` (a Block volume).
    pub fn is_bind_of(&self, device: (u32, u32)) -> bool {
        self.mount_root && self.block_device == Some(device)
    }
}

/// Describe the object `fd` refers to (`display` names it in errors).
pub fn path_state(fd: BorrowedFd<'_>, display: &Path) -> Result<PathState> {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: an empty path with AT_EMPTY_PATH describes `fd` itself; `stx`
    // is a valid buffer for one statx record.
    let rc = unsafe {
        libc::statx(
            fd.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_TYPE | libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(Error::io("statx", display, std::io::Error::last_os_error()));
    }
    // SAFETY: statx succeeded and filled the record.
    let stx = unsafe { stx.assume_init() };
    let root_flag = libc::STATX_ATTR_MOUNT_ROOT as u64;
    if stx.stx_mask & libc::STATX_MNT_ID == 0 || stx.stx_attributes_mask & root_flag == 0 {
        return Err(Error::Internal(
            "this kernel's statx reports no mount IDs (Linux 5.8 or later is needed)".to_owned(),
        ));
    }
    let is_block = u32::from(stx.stx_mode) & libc::S_IFMT == libc::S_IFBLK;
    let vfs = nix::sys::statvfs::fstatvfs(fd).ctx("statvfs", display)?;
    let magic = nix::sys::statfs::fstatfs(fd)
        .ctx("statfs", display)?
        .filesystem_type()
        .0 as i64;
    let fs_type = match magic {
        0xEF53 => "ext4".to_owned(),
        0x5846_5342 => "xfs".to_owned(),
        other => format!("{other:#x}"),
    };
    Ok(PathState {
        mount_id: stx.stx_mnt_id,
        mount_root: stx.stx_attributes & root_flag != 0,
        dev: (stx.stx_dev_major, stx.stx_dev_minor),
        block_device: is_block.then_some((stx.stx_rdev_major, stx.stx_rdev_minor)),
        read_only: vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY),
        fs_type,
    })
}

/// Mount options split into kernel flags and filesystem data.
#[derive(Debug, PartialEq, Eq)]
pub struct MountOptions {
    pub flags: MsFlags,
    pub data: Vec<String>,
}

/// Translate user-facing mount options (`noatime`, `ro`, `data=ordered`...).
pub fn parse_options(options: &[String]) -> Result<MountOptions> {
    let mut parsed = MountOptions {
        flags: MsFlags::empty(),
        data: Vec::new(),
    };
    for option in options
        .iter()
        .flat_map(|o| split_options(o))
        .filter(|o| !o.is_empty())
    {
        if option.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(Error::invalid(format!(
                "mount option {option:?} contains whitespace or control characters"
            )));
        }
        // Quotes belong to SELinux labels only, which must be well formed.
        if selinux::is_label_option(option) {
            selinux::check_label_option(option)?;
            parsed.data.push(option.to_owned());
            continue;
        }
        if option.contains('"') {
            return Err(Error::invalid(format!(
                "mount option {option:?} contains a quote"
            )));
        }
        let flag = match option {
            "ro" => MsFlags::MS_RDONLY,
            "rw" | "defaults" | "async" | "auto" => MsFlags::empty(),
            "noatime" => MsFlags::MS_NOATIME,
            "nodiratime" => MsFlags::MS_NODIRATIME,
            "relatime" => MsFlags::MS_RELATIME,
            "strictatime" => MsFlags::MS_STRICTATIME,
            "nosuid" => MsFlags::MS_NOSUID,
            "nodev" => MsFlags::MS_NODEV,
            "noexec" => MsFlags::MS_NOEXEC,
            "sync" => MsFlags::MS_SYNCHRONOUS,
            "dirsync" => MsFlags::MS_DIRSYNC,
            "lazytime" => MsFlags::MS_LAZYTIME,
            "bind" | "rbind" | "remount" | "move" | "shared" | "private" | "slave"
            | "unbindable" => {
                return Err(Error::invalid(format!(
                    "mount option {option:?} is not allowed"
                )))
            }
            other => {
                parsed.data.push(other.to_owned());
                continue;
            }
        };
        parsed.flags |= flag;
    }
    Ok(parsed)
}

/// Split a comma-separated option list, keeping commas inside double quotes
/// (an SELinux label's categories: `context="…:s0:c1,c2"`).
fn split_options(list: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in list.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts
}

pub fn mount_device(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &MountOptions,
) -> Result<()> {
    let data = options.data.join(",");
    let data = (!data.is_empty()).then_some(data.as_str());
    mount(Some(device), target, Some(fs_type), options.flags, data).ctx("mount", target)
}

/// Bind `source` onto `target`; a read-only bind needs a second, remounting call.
pub fn bind(source: &Path, target: &Path, read_only: bool, extra: MsFlags) -> Result<()> {
    mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .ctx("bind mount", target)?;
    let remount_flags = extra
        | if read_only {
            MsFlags::MS_RDONLY
        } else {
            MsFlags::empty()
        };
    if !remount_flags.is_empty() {
        let flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | remount_flags;
        if let Err(e) = mount(None::<&str>, target, None::<&str>, flags, None::<&str>) {
            let _ = umount2(target, MntFlags::empty());
            return Err(Error::io("remount", target, e.into()));
        }
    }
    Ok(())
}

/// Pauses between unmount attempts that find the mount busy: about 1.5 s in all.
const BUSY_RETRY_PAUSES_MS: [u64; 7] = [10, 20, 40, 80, 160, 320, 640];

/// `umount2(path, UMOUNT_NOFOLLOW)`, tried again while the mount is busy.
///
/// A mount is often busy for a moment only: a child forked by another thread
/// holds a copy of a descriptor under it until it execs, or a scanner has the
/// device node open. A mount still busy after the pauses is reported as is.
pub fn unmount_nofollow_when_idle(path: &Path) -> std::result::Result<(), Errno> {
    let mut pauses = BUSY_RETRY_PAUSES_MS.iter();
    loop {
        match umount2(path, MntFlags::UMOUNT_NOFOLLOW) {
            Err(Errno::EBUSY) => match pauses.next() {
                Some(ms) => std::thread::sleep(std::time::Duration::from_millis(*ms)),
                None => return Err(Errno::EBUSY),
            },
            other => return other,
        }
    }
}

/// Unmount everything stacked on `target`. Not mounted is fine.
pub fn unmount_all(target: &Path) -> Result<()> {
    // Bounded: a path can only hold so many stacked mounts.
    for _ in 0..64 {
        match unmount_nofollow_when_idle(target) {
            Ok(()) => continue,
            Err(Errno::EINVAL | Errno::ENOENT) => return Ok(()),
            Err(e) => return Err(Error::io("unmount", target, e.into())),
        }
    }
    Err(Error::Internal(format!(
        "{} still mounted after 64 unmounts",
        target.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
100 27 7:3 / /var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pvc\\040one/mount ro,relatime shared:5 - ext4 /dev/loop3 ro
101 27 0:6 /loop3 /stage/block rw,nosuid - devtmpfs devtmpfs rw,size=100k
garbage line
";

    #[test]
    fn parses_fields_and_unescapes_paths() {
        let mounts = parse_mountinfo(SAMPLE);
        assert_eq!(mounts.len(), 4);
        assert_eq!(mounts[1].dev, (98, 0));
        assert_eq!(mounts[1].root, PathBuf::from("/mnt1"));
        assert_eq!(mounts[1].mount_point, PathBuf::from("/mnt2"));
        assert_eq!(mounts[1].fs_type, "ext3");
        assert_eq!(mounts[1].source, "/dev/root");
        assert!(mounts[1].options.contains(&"errors=continue".to_owned()));
        assert_eq!(
            mounts[2].mount_point,
            PathBuf::from("/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/pvc one/mount")
        );
        assert!(mounts[2].read_only());
        assert!(!mounts[1].read_only());
        assert_eq!(mounts[3].root, PathBuf::from("/loop3"));
    }

    #[test]
    fn unescape_handles_backslashes_and_tabs() {
        assert_eq!(unescape("a\\134b\\011c"), "a\\b\tc");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn options_split_into_flags_and_data() {
        let opts = parse_options(&["noatime".into(), "data=ordered,ro".into(), "discard".into()])
            .expect("test setup");
        assert_eq!(opts.flags, MsFlags::MS_NOATIME | MsFlags::MS_RDONLY);
        assert_eq!(
            opts.data,
            vec!["data=ordered".to_owned(), "discard".to_owned()]
        );
        assert!(parse_options(&["bind".into()]).is_err());
        assert!(parse_options(&["a b".into()]).is_err());
        // An SELinux label keeps its categories; it cannot smuggle options in.
        let label = "context=\"system_u:object_r:container_file_t:s0:c1,c2\"";
        let opts = parse_options(&[format!("noatime,{label}")]).unwrap();
        assert_eq!(opts.data, vec![label.to_owned()]);
        assert_eq!(opts.flags, MsFlags::MS_NOATIME);
        assert!(parse_options(&["context=\"system_u:object_r:t:s0:c1,exec\"".into()]).is_err());
        assert!(parse_options(&["data=\"x,y\"".into()]).is_err());
    }
}
