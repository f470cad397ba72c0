//! Removing every trace of volumes under a directory: for the demo, the
//! benchmark and tests, which must leave the host clean even when they fail.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::node::{loopdev, mount};

/// Mount points at or below `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut points: Vec<PathBuf> = mount::mounts()?
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    Ok(points)
}

/// Loop devices whose backing file lies below `dir`, and those stacked on
/// them (read-only Block publications), the stacked ones first.
pub fn loops_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let all = loopdev::attachments()?;
    let direct: Vec<PathBuf> = all
        .iter()
        .filter(|a| a.backing_file.starts_with(dir))
        .map(|a| a.device.clone())
        .collect();
    let mut ordered: Vec<PathBuf> = all
        .iter()
        .filter(|a| direct.contains(&a.backing_file))
        .map(|a| a.device.clone())
        .collect();
    ordered.extend(direct);
    Ok(ordered)
}

/// Unmount everything below `dir`, then detach its loop devices.
pub fn release_all_under(dir: &Path) -> Result<()> {
    for point in mounts_under(dir)? {
        mount::unmount_all(&point)?;
    }
    for device in loops_under(dir)? {
        loopdev::detach(&device)?;
    }
    Ok(())
}
