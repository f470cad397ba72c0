//! Whether a mounted filesystem hit errors: ext4 counts them in sysfs (one
//! small read per question, whatever the node's mount count), and a
//! filesystem that went read-only after them shows it in its superblock's
//! mount options (`emergency_ro` on recent kernels, `ro` under a read-write
//! mount on older ones).

use std::path::Path;

use crate::node::mount::MountEntry;

/// Errors ext4 recorded on the filesystem of block device `dev` since it was
/// last checked; `None` when it is no mounted ext4 filesystem.
pub fn ext4_errors(dev: (u32, u32)) -> Option<u64> {
    let (major, minor) = dev;
    let device = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    let name = device.file_name()?;
    let count = Path::new("/sys/fs/ext4").join(name).join("errors_count");
    std::fs::read_to_string(count).ok()?.trim().parse().ok()
}

/// ext4 recorded an error since the filesystem on `device` (block device
/// `dev`) was mounted: sysfs's `last_error_time` is not older than the
/// superblock's last mount time. Linux 6.6 to 6.14 shut an
/// `errors=remount-ro` filesystem down on an error without showing it in
/// the mount table; this is how such a filesystem is recognized.
pub fn ext4_error_since_mount(device: &Path, dev: (u32, u32)) -> bool {
    let (major, minor) = dev;
    let error_time = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}"))
        .ok()
        .and_then(|d| Some(Path::new("/sys/fs/ext4").join(d.file_name()?)))
        .and_then(|d| std::fs::read_to_string(d.join("last_error_time")).ok())
        .and_then(|t| t.trim().parse::<u64>().ok())
        .unwrap_or(0);
    error_time > 0 && mount_time(device).is_some_and(|mounted| error_time >= mounted)
}

/// The superblock's last mount time (`s_mtime`, seconds).
fn mount_time(device: &Path) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(device).ok()?;
    let mut raw = [0u8; 4];
    // The superblock starts at byte 1024; s_mtime is at 0x2C in it.
    file.read_exact_at(&mut raw, 1024 + 0x2C).ok()?;
    Some(u64::from(u32::from_le_bytes(raw)))
}

/// The filesystem of `dev` is mounted `errors=remount-ro`.
pub fn remounts_read_only_on_errors(mounts: &[MountEntry], dev: (u32, u32)) -> bool {
    mounts
        .iter()
        .any(|m| m.dev == dev && m.super_options.iter().any(|o| o == "errors=remount-ro"))
}

/// The mounts of device `dev` show its filesystem went read-only by itself:
/// the superblock is read-only while a mount of it was made read-write.
pub fn went_read_only(mounts: &[MountEntry], dev: (u32, u32)) -> bool {
    mounts.iter().filter(|m| m.dev == dev).any(|m| {
        let has = |o: &str| m.super_options.iter().any(|s| s == o);
        // `options` holds the mount's own options, then the superblock's.
        let mounted_rw = m.options.iter().any(|o| o == "rw");
        has("emergency_ro") || (has("ro") && mounted_rw)
    })
}

/// What to tell a person about a filesystem with `errors` recorded errors
/// that did or did not go read-only.
pub fn describe(errors: Option<u64>, read_only: bool) -> Option<String> {
    let recorded = match errors {
        Some(n) if n > 0 => format!(" ({n} recorded)"),
        _ => String::new(),
    };
    if read_only {
        return Some(format!(
            "filesystem went read-only after errors{recorded}: writes fail; stop the workload, \
             unstage the volume and repair the filesystem (e2fsck -f, xfs_repair)"
        ));
    }
    match errors {
        Some(n) if n > 0 => Some(format!(
            "filesystem recorded {n} error(s) since it was last checked: its data may be \
             damaged; unstage the volume and check it (e2fsck -f)"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::mount::parse_mountinfo;

    const DEV: (u32, u32) = (7, 3);

    fn entries(text: &str) -> Vec<MountEntry> {
        parse_mountinfo(text)
    }

    #[test]
    fn emergency_ro_under_a_read_write_mount_went_read_only() {
        // Linux 6.x: ext4 after errors=remount-ro keeps "rw" and adds emergency_ro.
        let m = entries(
            "47 27 7:3 / /k/staging rw,relatime shared:5 - ext4 /dev/loop3 rw,errors=remount-ro,emergency_ro\n",
        );
        assert!(went_read_only(&m, DEV));
    }

    #[test]
    fn a_read_only_superblock_under_a_read_write_mount_went_read_only() {
        // Older kernels flip the superblock to ro; the mount itself stays rw.
        let m = entries(
            "47 27 7:3 / /k/staging rw,relatime - ext4 /dev/loop3 ro,errors=remount-ro\n\
             48 27 7:3 / /k/pod ro,relatime - ext4 /dev/loop3 ro,errors=remount-ro\n",
        );
        assert!(went_read_only(&m, DEV));
    }

    #[test]
    fn a_filesystem_mounted_read_only_on_purpose_is_fine() {
        let m = entries(
            "47 27 7:3 / /k/staging ro,relatime - ext4 /dev/loop3 ro\n\
             48 27 7:3 / /k/pod ro,relatime - ext4 /dev/loop3 ro\n",
        );
        assert!(!went_read_only(&m, DEV));
        // A read-only bind of a healthy read-write filesystem.
        let m = entries(
            "47 27 7:3 / /k/staging rw,relatime - ext4 /dev/loop3 rw\n\
             48 27 7:3 / /k/pod ro,relatime - ext4 /dev/loop3 rw\n",
        );
        assert!(!went_read_only(&m, DEV));
        // Another device's trouble is not this one's.
        let m = entries("47 27 7:4 / /k/other rw - ext4 /dev/loop4 rw,emergency_ro\n");
        assert!(!went_read_only(&m, DEV));
    }

    #[test]
    fn errors_remount_ro_is_read_from_the_superblock_options() {
        let m = entries("47 27 7:3 / /k/staging rw - ext4 /dev/loop3 rw,errors=remount-ro\n");
        assert!(remounts_read_only_on_errors(&m, DEV));
        let m = entries("47 27 7:3 / /k/staging rw - ext4 /dev/loop3 rw\n");
        assert!(!remounts_read_only_on_errors(&m, DEV));
    }

    #[test]
    fn the_message_says_what_happened_and_what_to_do() {
        assert_eq!(describe(None, false), None);
        assert_eq!(describe(Some(0), false), None);
        let why = describe(Some(2), true).unwrap();
        assert!(why.contains("read-only after errors (2 recorded)"), "{why}");
        assert!(why.contains("e2fsck"), "{why}");
        let why = describe(Some(1), false).unwrap();
        assert!(why.contains("recorded 1 error"), "{why}");
    }
}
