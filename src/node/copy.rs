//! Copying image data: a reflink where the filesystem shares extents
//! (btrfs, xfs with reflink), otherwise a kernel-side copy of only the
//! allocated ranges, so holes and preallocated-but-unwritten space cost nothing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::error::{Error, IoContext, Result};

nix::ioctl_write_int!(ficlone, 0x94, 9);

/// How the data was copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Reflink,
    Sparse,
}

/// Copy all of `src` into the empty file `dst` (same length, same data).
pub fn clone_or_copy(src: &Path, dst: &mut File, dst_path: &Path) -> Result<CopyKind> {
    let source = File::open(src).ctx("open", src)?;
    // SAFETY: FICLONE takes the source file descriptor by value.
    if unsafe { ficlone(dst.as_raw_fd(), source.as_raw_fd() as u64) }.is_ok() {
        return Ok(CopyKind::Reflink);
    }
    let len = source.metadata().ctx("stat", src)?.len();
    copy_data_ranges(&source, dst, len).map_err(|e| Error::io("copy into", dst_path, e.into()))?;
    dst.set_len(len).ctx("resize", dst_path)?;
    Ok(CopyKind::Sparse)
}

/// Copy the ranges SEEK_DATA reports, leaving holes in `dst`.
fn copy_data_ranges(src: &File, dst: &File, len: u64) -> std::result::Result<(), Errno> {
    let mut pos = 0i64;
    while (pos as u64) < len {
        let data = match lseek(src, pos, Whence::SeekData) {
            Ok(offset) => offset,
            // No data after `pos`.
            Err(Errno::ENXIO) => break,
            // No hole support: everything is data.
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => pos,
            Err(e) => return Err(e),
        };
        let hole = match lseek(src, data, Whence::SeekHole) {
            Ok(offset) => offset,
            Err(Errno::EINVAL | Errno::EOPNOTSUPP) => len as i64,
            Err(e) => return Err(e),
        };
        copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

fn copy_range(src: &File, dst: &File, start: i64, mut len: i64) -> std::result::Result<(), Errno> {
    let (mut off_in, mut off_out) = (start, start);
    while len > 0 {
        let copied = nix::fcntl::copy_file_range(
            src,
            Some(&mut off_in),
            dst,
            Some(&mut off_out),
            len as usize,
        )?;
        if copied == 0 {
            return Err(Errno::EIO);
        }
        len -= copied as i64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn copies_data_and_keeps_holes() {
        let dir = tempfile::tempdir().expect("test setup");
        let src_path = dir.path().join("src.img");
        let mut src = File::create(&src_path).expect("test setup");
        src.write_all(b"head").expect("test setup");
        src.seek(SeekFrom::Start(8 << 20)).expect("test setup");
        src.write_all(b"tail").expect("test setup");
        src.set_len(16 << 20).expect("test setup");
        drop(src);
        let dst_path = dir.path().join("dst.img");
        let mut dst = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&dst_path)
            .expect("test setup");
        clone_or_copy(&src_path, &mut dst, &dst_path).expect("test setup");
        let copied = std::fs::read(&dst_path).expect("test setup");
        assert_eq!(copied.len(), 16 << 20);
        assert_eq!(&copied[..4], b"head");
        assert_eq!(&copied[8 << 20..(8 << 20) + 4], b"tail");
        assert!(copied[4..8 << 20].iter().all(|b| *b == 0));
        use std::os::unix::fs::MetadataExt;
        // The hole in the middle was not written out.
        assert!(std::fs::metadata(&dst_path).expect("test setup").blocks() * 512 < 8 << 20);
    }
}
