//! Filesystems on a device: probe before anything, format only blank devices,
//! grow after expansion.

use std::path::Path;

use crate::error::{Error, Result};
use crate::node::cmd;
use crate::volume::spec::FsType;

/// What a device carries, as blkid's low-level probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Blank,
    Filesystem(String),
    /// A partition table, RAID or LVM signature...: data that is not ours to touch.
    Other(String),
}

/// Probe `device` for any signature (superblock or partition table).
pub fn probe(device: &Path) -> Result<Content> {
    let out = cmd::output(
        "blkid",
        [
            Path::new("-p"),
            Path::new("-o"),
            Path::new("export"),
            device,
        ],
    )?;
    match out.status.code() {
        Some(0) => Ok(parse_blkid_export(&String::from_utf8_lossy(&out.stdout))),
        // 2: no signature found.
        Some(2) => Ok(Content::Blank),
        _ => Err(cmd::failure("blkid", &out)),
    }
}

fn parse_blkid_export(text: &str) -> Content {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
            .map(str::to_owned)
    };
    match (field("USAGE").as_deref(), field("TYPE"), field("PTTYPE")) {
        (Some("filesystem"), Some(fs), _) => Content::Filesystem(fs),
        (_, Some(kind), _) => Content::Other(kind),
        (_, None, Some(pt)) => Content::Other(format!("partition table {pt}")),
        _ => Content::Other("unknown signature".to_owned()),
    }
}

/// Make sure `device` carries `fs`: format it if blank, accept it if it
/// already has that filesystem, refuse anything else. Never reformats.
pub fn ensure_filesystem(device: &Path, fs: FsType, discard: bool) -> Result<bool> {
    match probe(device)? {
        Content::Blank => {
            mkfs(device, fs, discard)?;
            Ok(true)
        }
        Content::Filesystem(found) if found == fs.name() => Ok(false),
        Content::Filesystem(found) => Err(Error::AlreadyExists(format!(
            "{} already carries a {found} filesystem; refusing to format it as {}",
            device.display(),
            fs.name()
        ))),
        Content::Other(what) => Err(Error::Precondition(format!(
            "{} carries {what}; refusing to format it",
            device.display()
        ))),
    }
}

fn mkfs(device: &Path, fs: FsType, discard: bool) -> Result<()> {
    match fs {
        FsType::Ext4 => {
            // Lazy init: inode tables and journal are zeroed in the background
            // after mount, so formatting a big volume takes well under a second.
            let mut extended = String::from("lazy_itable_init=1,lazy_journal_init=1");
            extended.push_str(if discard { ",discard" } else { ",nodiscard" });
            cmd::run(
                "mkfs.ext4",
                [
                    Path::new("-q"),
                    Path::new("-F"),
                    Path::new("-E"),
                    Path::new(&extended),
                    device,
                ],
            )?;
        }
        FsType::Xfs => {
            let mut args = vec![Path::new("-q")];
            if !discard {
                args.push(Path::new("-K"));
            }
            args.push(device);
            cmd::run("mkfs.xfs", args)?;
        }
    }
    Ok(())
}

/// Grow the filesystem mounted at `mount_point` (from `device`) to fill the device.
pub fn grow(device: &Path, mount_point: &Path, fs: &str) -> Result<()> {
    match fs {
        "ext4" | "ext3" | "ext2" => cmd::run("resize2fs", [device]).map(drop),
        "xfs" => cmd::run("xfs_growfs", [mount_point]).map(drop),
        other => Err(Error::Precondition(format!(
            "cannot grow a {other} filesystem"
        ))),
    }
}

/// Space and inode use of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

pub fn usage(path: &Path) -> Result<Usage> {
    use crate::error::IoContext;
    let st = nix::sys::statvfs::statvfs(path).ctx("statvfs", path)?;
    let frsize = st.fragment_size() as u64;
    let total_bytes = st.blocks() as u64 * frsize;
    let free_bytes = st.blocks_free() as u64 * frsize;
    let total_inodes = st.files() as u64;
    let free_inodes = st.files_free() as u64;
    Ok(Usage {
        total_bytes,
        available_bytes: st.blocks_available() as u64 * frsize,
        used_bytes: total_bytes.saturating_sub(free_bytes),
        total_inodes,
        free_inodes,
        used_inodes: total_inodes.saturating_sub(free_inodes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blkid_export_is_classified() {
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Content::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nTYPE=LVM2_member\nUSAGE=raid\n"),
            Content::Other("LVM2_member".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/loop0\nPTUUID=1\nPTTYPE=gpt\n"),
            Content::Other("partition table gpt".into())
        );
    }
}
