//! Where an LV's bytes are, and moving them: the byte range a linear LV
//! occupies on its PV (for hosts without device-mapper) and block copies.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::cli::SegRow;
pub use crate::backend::ByteRange;
use crate::error::{Error, IoContext, Result};

/// A run of extents on one PV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeRange {
    pub pv: PathBuf,
    pub first: u64,
    pub count: u64,
}

/// Parse one `seg_pe_ranges` entry, `/dev/sdb:0-24` (inclusive).
fn parse_range(raw: &str) -> Option<PeRange> {
    let (pv, range) = raw.trim().rsplit_once(':')?;
    let (first, last) = range.split_once('-')?;
    let (first, last): (u64, u64) = (first.parse().ok()?, last.parse().ok()?);
    (last >= first && !pv.is_empty()).then(|| PeRange {
        pv: PathBuf::from(pv),
        first,
        count: last - first + 1,
    })
}

/// The single PV range holding all of an LV, if it is linear, unstriped and
/// its segments follow each other on one PV. Otherwise, why not.
pub fn contiguous_range(segments: &[SegRow]) -> std::result::Result<PeRange, String> {
    let mut segs: Vec<&SegRow> = segments.iter().collect();
    segs.sort_by_key(|s| s.seg_start_pe);
    let mut whole: Option<PeRange> = None;
    for seg in segs {
        if seg.segtype != "linear" || seg.stripes != 1 {
            return Err(format!(
                "it is a {} LV with {} stripe(s), not a plain linear one",
                seg.segtype, seg.stripes
            ));
        }
        let range = parse_range(&seg.seg_pe_ranges)
            .ok_or_else(|| format!("unexpected extent range {:?}", seg.seg_pe_ranges))?;
        whole = match whole {
            None => Some(range),
            Some(w) if w.pv == range.pv && w.first + w.count == range.first => Some(PeRange {
                count: w.count + range.count,
                ..w
            }),
            Some(_) => return Err("its extents are not contiguous on one PV".to_owned()),
        };
    }
    whole.ok_or_else(|| "it has no segments".to_owned())
}

/// Every PV range an LV's segments occupy, whatever their type (a striped
/// segment lists one range per stripe).
pub fn pv_ranges(segments: &[SegRow]) -> std::result::Result<Vec<PeRange>, String> {
    let mut ranges = Vec::new();
    for seg in segments {
        for raw in seg.seg_pe_ranges.split_whitespace() {
            ranges
                .push(parse_range(raw).ok_or_else(|| format!("unexpected extent range {raw:?}"))?);
        }
    }
    if ranges.is_empty() {
        return Err("it has no extents on a PV".to_owned());
    }
    Ok(ranges)
}

const CHUNK: usize = 4 << 20;
/// Bytes zeroed at each end of a new LV: where filesystem, partition and
/// RAID signatures live, so old data on reused extents is never mistaken for
/// a filesystem.
pub const WIPE_BYTES: u64 = 1 << 20;

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .ctx("open", path)
}

/// Copy `src` into the start of `dst` (which must be at least as large).
pub fn copy(src: &ByteRange, dst: &ByteRange) -> Result<()> {
    if dst.len < src.len {
        return Err(Error::Internal(format!(
            "copy of {} bytes into {} bytes",
            src.len, dst.len
        )));
    }
    let input = File::open(&src.device).ctx("open", &src.device)?;
    let output = open_rw(&dst.device)?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < src.len {
        let n = (src.len - done).min(CHUNK as u64) as usize;
        input
            .read_exact_at(&mut buf[..n], src.offset + done)
            .ctx("read", &src.device)?;
        output
            .write_all_at(&buf[..n], dst.offset + done)
            .ctx("write", &dst.device)?;
        done += n as u64;
    }
    output.sync_all().ctx("fsync", &dst.device)
}

/// Zero `[from, from + len)` of the range (clipped to it).
pub fn zero(dst: &ByteRange, from: u64, len: u64) -> Result<()> {
    let end = from.saturating_add(len).min(dst.len);
    if from >= end {
        return Ok(());
    }
    let output = open_rw(&dst.device)?;
    let buf = vec![0u8; CHUNK];
    let mut at = from;
    while at < end {
        let n = (end - at).min(CHUNK as u64) as usize;
        output
            .write_all_at(&buf[..n], dst.offset + at)
            .ctx("write", &dst.device)?;
        at += n as u64;
    }
    output.sync_all().ctx("fsync", &dst.device)
}

nix::ioctl_write_ptr_bad!(blk_zero_out, nix::request_code_none!(0x12, 127), [u64; 2]);

/// Zero the whole range, cheaply where the device can (`BLKZEROOUT`: write
/// zeroes or unmap on disks, a hole in a loop device's backing file), by
/// writing zeros otherwise.
pub fn zero_out(dst: &ByteRange) -> Result<()> {
    let file = open_rw(&dst.device)?;
    let range = [dst.offset, dst.len];
    // SAFETY: BLKZEROOUT reads two u64s (start, length) from the pointer.
    let fast = unsafe { blk_zero_out(std::os::fd::AsRawFd::as_raw_fd(&file), &range) };
    match fast {
        Ok(_) => Ok(()),
        Err(errno) => {
            tracing::debug!(device = %dst.device.display(), %errno, "BLKZEROOUT unavailable; writing zeros");
            zero(dst, 0, dst.len)
        }
    }
}

/// Zero both ends of a new LV (everything from `keep` on stays untouched at
/// the start: the copied data).
pub fn wipe_signatures(dst: &ByteRange, keep: u64) -> Result<()> {
    zero(dst, keep, WIPE_BYTES)?;
    zero(
        dst,
        dst.len.saturating_sub(WIPE_BYTES).max(keep),
        WIPE_BYTES,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(start: u64, size: u64, ranges: &str) -> SegRow {
        SegRow {
            segtype: "linear".into(),
            stripes: 1,
            seg_start_pe: start,
            seg_size_pe: size,
            seg_pe_ranges: ranges.into(),
        }
    }

    #[test]
    fn adjacent_segments_form_one_range() {
        let range = contiguous_range(&[
            seg(25, 5, "/dev/loop0:25-29"),
            seg(0, 25, "/dev/loop0:0-24"),
        ])
        .expect("test setup");
        assert_eq!(
            range,
            PeRange {
                pv: "/dev/loop0".into(),
                first: 0,
                count: 30
            }
        );
    }

    #[test]
    fn scattered_striped_and_thin_lvs_have_no_single_range() {
        assert!(contiguous_range(&[
            seg(0, 25, "/dev/loop0:0-24"),
            seg(25, 25, "/dev/loop0:28-52")
        ])
        .is_err());
        assert!(contiguous_range(&[seg(0, 2, "/dev/a:0-0"), seg(1, 1, "/dev/b:1-1")]).is_err());
        let mut striped = seg(0, 2, "/dev/a:0-0 /dev/b:0-0");
        striped.stripes = 2;
        striped.segtype = "striped".into();
        assert!(contiguous_range(&[striped]).is_err());
        let mut thin = seg(0, 2, "");
        thin.segtype = "thin".into();
        assert!(contiguous_range(&[thin]).is_err());
        assert!(contiguous_range(&[]).is_err());
    }

    #[test]
    fn every_range_of_every_segment_is_found_for_zeroing() {
        let mut striped = seg(0, 4, "/dev/a:0-1 /dev/b:3-4");
        striped.stripes = 2;
        striped.segtype = "striped".into();
        let ranges = pv_ranges(&[striped, seg(4, 2, "/dev/a:7-8")]).expect("test setup");
        let found: Vec<(String, u64, u64)> = ranges
            .iter()
            .map(|r| (r.pv.display().to_string(), r.first, r.count))
            .collect();
        assert_eq!(
            found,
            vec![
                ("/dev/a".to_owned(), 0, 2),
                ("/dev/b".to_owned(), 3, 2),
                ("/dev/a".to_owned(), 7, 2)
            ]
        );
        // Nothing to zero is not "zeroed": a thin LV's segment names no PV.
        let mut thin = seg(0, 2, "");
        thin.segtype = "thin".into();
        assert!(pv_ranges(&[thin]).is_err());
        assert!(pv_ranges(&[seg(0, 2, "/dev/a:x")]).is_err());
    }

    #[test]
    fn copies_and_wipes_stay_inside_their_ranges() {
        let dir = tempfile::tempdir().expect("test setup");
        let dev = dir.path().join("pv");
        std::fs::write(&dev, vec![0xaau8; 8 << 20]).expect("test setup");
        let src = ByteRange {
            device: dev.clone(),
            offset: 1 << 20,
            len: 2 << 20,
        };
        let dst = ByteRange {
            device: dev.clone(),
            offset: 4 << 20,
            len: 3 << 20,
        };
        std::fs::File::options()
            .write(true)
            .open(&dev)
            .expect("test setup")
            .write_all_at(b"hello", 1 << 20)
            .expect("test setup");
        copy(&src, &dst).expect("test setup");
        wipe_signatures(&dst, src.len).expect("test setup");
        let data = std::fs::read(&dev).expect("test setup");
        assert_eq!(&data[4 << 20..(4 << 20) + 5], b"hello");
        assert!(data[(6 << 20)..(7 << 20)].iter().all(|&b| b == 0));
        assert!(
            data[(7 << 20)..].iter().all(|&b| b == 0xaa),
            "past the range"
        );
        assert!(
            data[(3 << 20)..(4 << 20)].iter().all(|&b| b == 0xaa),
            "before the range"
        );
    }
}
