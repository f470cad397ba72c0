//! Filesystems on a device: probe before anything, format only blank devices,
//! grow after expansion.

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::spec::FsType;
use crate::node::cmd::{self, Tool};

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
    let out = Tool::read_only("blkid")
        .args([
            Path::new("-p"),
            Path::new("-o"),
            Path::new("export"),
            device,
        ])
        .output()?;
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

/// The deadline of a tool that works through all of `device` (mkfs, fsck, resize): these all
/// change on-disk metadata, so past it they are logged, never killed.
fn deadline_for(device: &Path) -> std::time::Duration {
    cmd::timeout_for_bytes(crate::node::loopdev::device_size(device).unwrap_or(0))
}

fn mkfs(device: &Path, fs: FsType, discard: bool) -> Result<()> {
    let deadline = deadline_for(device);
    match fs {
        FsType::Ext4 => {
            // Lazy init: inode tables and journal are zeroed in the background
            // after mount, so formatting a big volume takes well under a second.
            let mut extended = String::from("lazy_itable_init=1,lazy_journal_init=1");
            extended.push_str(if discard { ",discard" } else { ",nodiscard" });
            Tool::changes_metadata("mkfs.ext4")
                .args([
                    Path::new("-q"),
                    Path::new("-F"),
                    Path::new("-E"),
                    Path::new(&extended),
                    device,
                ])
                .deadline(deadline)
                .run()?;
        }
        FsType::Xfs => {
            let mut args = vec![Path::new("-q")];
            if !discard {
                args.push(Path::new("-K"));
            }
            args.push(device);
            Tool::changes_metadata("mkfs.xfs")
                .args(args)
                .deadline(deadline)
                .run()?;
        }
    }
    Ok(())
}

/// Grow the filesystem mounted at `mount_point` (from `device`) to fill the device.
pub fn grow_online(device: &Path, mount_point: &Path, fs: &str) -> Result<()> {
    match fs {
        "ext4" | "ext3" | "ext2" => {
            // The kernel refuses online ext4 resizing without CAP_SYS_RESOURCE.
            if !has_capability(CAP_SYS_RESOURCE) {
                return Err(Error::Precondition(
                    "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE; \
                     it will grow when the volume is next staged"
                        .to_owned(),
                ));
            }
            Tool::changes_metadata("resize2fs")
                .arg(device)
                .deadline(deadline_for(device))
                .run()
                .map(drop)
        }
        "xfs" => Tool::changes_metadata("xfs_growfs")
            .arg(mount_point)
            .deadline(deadline_for(device))
            .run()
            .map(drop),
        other => Err(Error::Precondition(format!(
            "cannot grow a {other} filesystem"
        ))),
    }
}

/// Grow an unmounted ext4 filesystem (resize2fs insists on a fresh check first).
pub fn grow_offline_ext4(device: &Path) -> Result<()> {
    let deadline = deadline_for(device);
    // -p repairs what it safely can: it writes.
    let check = Tool::changes_metadata("e2fsck")
        .args([Path::new("-f"), Path::new("-p"), device])
        .deadline(deadline)
        .output()?;
    // 0: clean, 1: errors fixed. Anything else needs a human.
    if !matches!(check.status.code(), Some(0 | 1)) {
        return Err(Error::Precondition(format!(
            "{} needs repair before it can grow: {}",
            device.display(),
            cmd::failure("e2fsck", &check)
        )));
    }
    Tool::changes_metadata("resize2fs")
        .arg(device)
        .deadline(deadline)
        .run()
        .map(drop)
}

const CAP_SYS_RESOURCE: u32 = 24;

pub fn has_capability(bit: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << bit) != 0)
}

/// Whether a mounted ext4 filesystem can grow in this process.
pub fn can_grow_ext4_online() -> bool {
    has_capability(CAP_SYS_RESOURCE)
}

/// Bytes the filesystem on `device` spans, read from its superblock; `None`
/// for a filesystem Kennel does not grow.
pub fn filesystem_bytes(device: &Path) -> Result<Option<u64>> {
    use std::io::Read;
    let mut head = vec![0u8; 2048];
    let mut file = std::fs::File::open(device).map_err(|e| Error::io("open", device, e))?;
    file.read_exact(&mut head)
        .map_err(|e| Error::io("read superblock of", device, e))?;
    Ok(superblock_bytes(&head))
}

/// ext2/3/4 superblock at byte 1024 (little endian), XFS at byte 0 (big endian).
fn superblock_bytes(head: &[u8]) -> Option<u64> {
    if head.len() < 2048 {
        return None;
    }
    let le32 =
        |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]) as u64;
    let be32 =
        |at: usize| u32::from_be_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]) as u64;
    if &head[0..4] == b"XFSB" {
        let blocks = (be32(8) << 32) | be32(12);
        return Some(be32(4) * blocks);
    }
    if u16::from_le_bytes([head[1024 + 56], head[1024 + 57]]) == 0xEF53 {
        let block_size = 1024u64 << le32(1024 + 24);
        const INCOMPAT_64BIT: u64 = 0x80;
        let high = if le32(1024 + 96) & INCOMPAT_64BIT != 0 {
            le32(1024 + 0x150)
        } else {
            0
        };
        return Some(((high << 32) | le32(1024 + 4)) * block_size);
    }
    None
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
    fn superblock_sizes_are_read() {
        let mut ext = vec![0u8; 2048];
        ext[1024 + 4..1024 + 8].copy_from_slice(&65536u32.to_le_bytes());
        ext[1024 + 24..1024 + 28].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
        ext[1024 + 56..1024 + 58].copy_from_slice(&0xEF53u16.to_le_bytes());
        assert_eq!(superblock_bytes(&ext), Some(65536 * 4096));
        let mut xfs = vec![0u8; 2048];
        xfs[0..4].copy_from_slice(b"XFSB");
        xfs[4..8].copy_from_slice(&4096u32.to_be_bytes());
        xfs[8..16].copy_from_slice(&1000u64.to_be_bytes());
        assert_eq!(superblock_bytes(&xfs), Some(4096 * 1000));
        assert_eq!(superblock_bytes(&[0u8; 2048]), None);
    }

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
