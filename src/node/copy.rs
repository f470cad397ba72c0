//! Copying image data: a reflink where the filesystem shares extents
//! (btrfs, xfs with reflink), a kernel-side copy otherwise.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::error::{IoContext, Result};

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// How the data was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Reflink,
    Full,
}

/// Copy all of `src` into the empty file `dst`.
pub fn clone_or_copy(src: &Path, dst: &mut File, dst_path: &Path) -> Result<CopyKind> {
    let mut source = File::open(src).ctx("open", src)?;
    // SAFETY: FICLONE takes the source file descriptor by value.
    if unsafe { ficlone(dst.as_raw_fd(), source.as_raw_fd() as u64) }.is_ok() {
        return Ok(CopyKind::Reflink);
    }
    // std::io::copy uses copy_file_range between files: no user-space buffer.
    std::io::copy(&mut source, dst).ctx("copy into", dst_path)?;
    Ok(CopyKind::Full)
}
