//! A published filesystem volume's files made the pod's fsGroup's
//! (`volume_mount_group`, capability VOLUME_MOUNT_GROUP): what the kubelet
//! does itself for drivers without it. ext4 and xfs have no `gid=` mount
//! option, so, as the CSI spec asks, files get the group and become
//! readable and writable by it, and directories get setgid so new files
//! inherit it. The walk opens every entry relative to its parent without
//! following symlinks and stays on the volume's filesystem, so a link in
//! the volume cannot point it at the host's files.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, Mode, SFlag};
use nix::unistd::{fchown, fchownat, Gid};

use crate::error::{Error, Result};

/// Group read and write; directories also search and setgid.
const FILE_BITS: u32 = 0o060;
const DIR_BITS: u32 = 0o2070;

/// Whether the volume's root already belongs to `gid` the way [`apply`]
/// leaves it: then the walk is skipped (the kubelet's `OnRootMismatch`).
pub fn root_matches(root: &Path, gid: u32) -> Result<bool> {
    let st = nix::sys::stat::stat(root).map_err(|e| io("stat", root, e))?;
    Ok(st.st_gid == gid && st.st_mode & DIR_BITS == DIR_BITS)
}

/// Give everything below `root` (a mount point) to group `gid`.
pub fn apply(root: &Path, gid: u32) -> Result<()> {
    let dir = nix::fcntl::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io("open", root, e))?;
    let dev = fstat(&dir).map_err(|e| io("stat", root, e))?.st_dev;
    let gid = Gid::from_raw(gid);
    take(&dir, gid, true).map_err(|e| io("change group of", root, e))?;
    let mut stack = vec![dir];
    while let Some(dir) = stack.pop() {
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .map_err(|e| Error::io("list", root, e))?;
        for entry in listing {
            let name = entry.map_err(|e| Error::io("list", root, e))?.file_name();
            let name = Path::new(&name);
            let st = match fstatat(&dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(nix::errno::Errno::ENOENT) => continue,
                Err(e) => return Err(io("stat", name, e)),
            };
            if st.st_dev != dev {
                continue; // another filesystem mounted inside: not this volume's
            }
            let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
            let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
            if kind == SFlag::S_IFDIR {
                let child = openat(&dir, name, flags | OFlag::O_DIRECTORY, Mode::empty())
                    .map_err(|e| io("open", name, e))?;
                take(&child, gid, true).map_err(|e| io("change group of", name, e))?;
                stack.push(child);
            } else if kind == SFlag::S_IFREG {
                let file = openat(&dir, name, flags | OFlag::O_NONBLOCK, Mode::empty())
                    .map_err(|e| io("open", name, e))?;
                take(&file, gid, false).map_err(|e| io("change group of", name, e))?;
            } else {
                // Links, sockets, devices: the group only, never through a link.
                fchownat(
                    &dir,
                    name,
                    None,
                    Some(gid),
                    nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                )
                .map_err(|e| io("change group of", name, e))?;
            }
        }
    }
    Ok(())
}

/// Group `gid` and its permission bits on one open file or directory.
fn take(fd: &OwnedFd, gid: Gid, dir: bool) -> nix::Result<()> {
    let mode = fstat(fd.as_fd())?.st_mode;
    fchown(fd.as_fd(), None, Some(gid))?;
    let mut bits = if dir { DIR_BITS } else { FILE_BITS };
    if !dir && mode & 0o100 != 0 {
        bits |= 0o010; // executable by the owner: by the group too
    }
    // chown clears setgid on files: set the bits after it.
    fchmod(fd.as_fd(), Mode::from_bits_truncate((mode & 0o7777) | bits))
}

fn io(what: &'static str, path: &Path, e: nix::errno::Errno) -> Error {
    Error::io(what, path, std::io::Error::from(e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn files_and_directories_get_the_group_and_links_are_not_followed() {
        if !nix::unistd::geteuid().is_root() {
            return; // chown to another group needs root; the conformance test covers it
        }
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::NamedTempFile::new().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/data"), b"x").unwrap();
        std::fs::set_permissions(root.join("sub/data"), PermissionsExt::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
        assert!(!root_matches(root, 4321).unwrap());
        apply(root, 4321).unwrap();
        assert!(root_matches(root, 4321).unwrap());
        let sub = std::fs::metadata(root.join("sub")).unwrap();
        assert_eq!(
            (sub.gid(), sub.mode() & 0o7777 & DIR_BITS),
            (4321, DIR_BITS)
        );
        let data = std::fs::metadata(root.join("sub/data")).unwrap();
        assert_eq!((data.gid(), data.mode() & 0o777), (4321, 0o660));
        let target = std::fs::metadata(outside.path()).unwrap();
        assert_ne!(target.gid(), 4321, "the link's target was changed");
        assert_eq!(
            std::fs::symlink_metadata(root.join("escape"))
                .unwrap()
                .gid(),
            4321
        );
    }
}
