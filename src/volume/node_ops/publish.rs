//! Publishing: the staged volume bound onto a pod's target, with its fsGroup and I/O limits.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;

use crate::backend::{Backend, VolumeRecord};
use crate::error::{Error, Result};
use crate::model::spec::{AccessMode, AccessType};
use crate::model::VolumeId;
use crate::node::fs_group;
use crate::node::io_throttle;
use crate::node::loopdev::{self, LoopIndex};
use crate::node::mount::{self, MountEntry, PathState};

use super::{canonical, Publication, BLOCK_STAGING_FILE};

/// The volume's I/O limits on the cgroups of every pod this node publishes
/// it to.
pub(super) fn apply_io_limits(
    b: &dyn Backend,
    kubelet: &Path,
    cgroups: &Path,
    record: &VolumeRecord,
) -> Result<()> {
    let Some(device) = b.attached_device(&record.id)? else {
        return Ok(());
    };
    let number = mount::device_number(&device)?;
    let targets: Vec<PathBuf> = mount::mounts()?
        .into_iter()
        .filter(|m| m.dev == number || is_block_bind(m, &device).unwrap_or(false))
        .map(|m| m.mount_point)
        .collect();
    for target in targets {
        throttle_pod(kubelet, cgroups, &target, number, record)?;
    }
    Ok(())
}

/// The volume's I/O limits on the cgroup of the pod `target` publishes it
/// to (limits left out cleared); limits that cannot take effect there are an
/// error. A path that is no pod's is left alone.
pub(super) fn throttle_pod(
    kubelet: &Path,
    cgroups: &Path,
    target: &Path,
    device: (u32, u32),
    record: &VolumeRecord,
) -> Result<()> {
    let Some(uid) = io_throttle::pod_uid(kubelet, target) else {
        return Ok(());
    };
    io_throttle::limit_pod(cgroups, &uid, device, &record.params.io_limits)
}

/// The volume's files made group `gid`'s (fsGroup), unless its root already is.
pub(super) fn give_to_group(root: &Path, gid: u32) -> Result<()> {
    if fs_group::root_matches(root, gid)? {
        return Ok(());
    }
    fs_group::apply(root, gid)
}

pub(super) fn publish(
    b: &dyn Backend,
    stacked: &LoopIndex,
    id: &VolumeId,
    req: &Publication,
) -> Result<()> {
    let not_staged = || {
        Error::Precondition(format!(
            "volume {id} is not staged at {}",
            req.staging.path().display()
        ))
    };
    let device = b.attached_device(id)?.ok_or_else(not_staged)?;
    let number = mount::device_number(&device)?;
    let source = if req.capability.is_block() {
        let file = req.staging.join(BLOCK_STAGING_FILE);
        let staged = file.mount_state()?.ok_or_else(not_staged)?;
        if !staged.is_bind_of(number) {
            return Err(not_staged());
        }
        file
    } else {
        let staged = req.staging.mount_state()?.ok_or_else(not_staged)?;
        if !staged.is_filesystem_of(number) {
            return Err(not_staged());
        }
        req.staging.clone()
    };
    if req.capability.access_mode == AccessMode::SingleNodeSingleWriter {
        ensure_single_publication(&device, req, source.path())?;
    }
    let read_only = req.read_only || req.capability.access_mode.read_only();
    if let Some(state) = req.target.mount_state()? {
        let published = if req.capability.is_block() {
            block_publication(&state, &device)?
        } else if state.is_filesystem_of(number) {
            Some(state.read_only)
        } else {
            None
        };
        return match published {
            None => Err(Error::AlreadyExists(format!(
                "{} is already a mount of another volume",
                req.target.path().display()
            ))),
            Some(ro) if ro != read_only => Err(Error::AlreadyExists(format!(
                "{} is already published {}",
                req.target.path().display(),
                if ro { "read-only" } else { "read-write" }
            ))),
            Some(_) => Ok(()),
        };
    }
    match &req.capability.access_type {
        AccessType::Mount { mount_flags, .. } => {
            let extra = mount::parse_options(mount_flags)?.flags & !MsFlags::MS_RDONLY;
            // Before the bind, so a retry after a failure applies it again; through
            // the staging mount, as the target is read-only when published so.
            if let Some(gid) = req.mount_group.filter(|_| !read_only) {
                give_to_group(req.staging.path(), gid)?;
            }
            req.target.ensure_dir()?;
            req.target.bind_from_path(&source, read_only, extra)
        }
        AccessType::Block => {
            req.target.ensure_file()?;
            if !read_only {
                return req.target.bind_from_path(&source, false, MsFlags::empty());
            }
            // A read-only bind does not stop writes through a device node: give
            // the workload its own read-only loop device over the staged one.
            let real = canonical(&device)?;
            let ro_device = stacked.attach_read_only(&real)?;
            let bound = req.target.bind_from(&ro_device, true, MsFlags::empty());
            if bound.is_err() {
                let _ = stacked.detach(&real, &ro_device);
            }
            bound
        }
    }
}

/// How a Block target is published from `device`: `Some(false)` a bind of
/// the device itself, `Some(true)` a read-only loop device stacked on it,
/// `None` something else.
pub(super) fn block_publication(state: &PathState, device: &Path) -> Result<Option<bool>> {
    if state.is_bind_of(mount::device_number(device)?) {
        return Ok(Some(false));
    }
    Ok(stacked_read_only_device(state, device)?.map(|_| true))
}

/// The read-only loop device a Block target is bound to, if it sits on
/// `device`: one sysfs read of the bound device's entry, one status of the device.
pub(super) fn stacked_read_only_device(
    state: &PathState,
    device: &Path,
) -> Result<Option<PathBuf>> {
    let Some(bound) = state.block_device.filter(|_| state.mount_root) else {
        return Ok(None);
    };
    let Some((node, _)) = loopdev::backing_of(bound) else {
        return Ok(None);
    };
    Ok(loopdev::is_backed_by(&node, &canonical(device)?).then_some(node))
}

/// SINGLE_NODE_SINGLE_WRITER: one workload at a time. Any other mount of the
/// device than its staging and the requested target is a publication elsewhere.
pub(super) fn ensure_single_publication(
    device: &Path,
    req: &Publication,
    staged_at: &Path,
) -> Result<()> {
    let number = mount::device_number(device)?;
    for entry in mount::mounts()? {
        let ours = entry.dev == number || is_block_bind(&entry, device)?;
        let expected = entry.mount_point == staged_at
            || entry.mount_point == req.staging.path()
            || entry.mount_point == req.target.path();
        if ours && !expected {
            return Err(Error::Precondition(format!(
                "volume is single-writer and already published at {}",
                entry.mount_point.display()
            )));
        }
    }
    Ok(())
}

/// A mountinfo bind of the device node itself (Block volumes): the devtmpfs
/// with the device's name as root.
pub(super) fn is_block_bind(entry: &MountEntry, device: &Path) -> Result<bool> {
    let real = canonical(device)?;
    let Ok(relative) = real.strip_prefix("/dev") else {
        return Ok(false);
    };
    Ok(entry.root == Path::new("/").join(relative))
}

pub(super) fn is_mounted_anywhere(device: &Path) -> bool {
    let Ok(number) = mount::device_number(device) else {
        return false;
    };
    mount::mounts()
        .map(|all| {
            all.iter()
                .any(|m| m.dev == number || is_block_bind(m, device).unwrap_or(false))
        })
        .unwrap_or(true)
}
