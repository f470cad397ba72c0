//! Staging: a volume's device formatted if it carries nothing, mounted (or bound, for Block)
//! at the kubelet's staging path.

use std::path::Path;

use nix::mount::MsFlags;

use crate::backend::{Backend, VolumeRecord};
use crate::error::{Error, Result};
use crate::model::spec::{AccessType, Capability, FsType};
use crate::node::fs as filesystem;
use crate::node::host_path::HostPath;
use crate::node::loopdev::{self};
use crate::node::mount::{self};
use crate::node::selinux;

use super::publish::is_mounted_anywhere;
use super::BLOCK_STAGING_FILE;

pub(super) fn stage(
    b: &dyn Backend,
    record: &VolumeRecord,
    staging: &HostPath,
    cap: &Capability,
) -> Result<()> {
    staging.ensure_dir()?;
    let attached_before = b.attached_device(&record.id)?;
    let device = b.attach(&record.id)?;
    crate::faults::step("stage: device attached");
    let result = match &cap.access_type {
        AccessType::Block => stage_block(&device, staging),
        AccessType::Mount {
            fs_type,
            mount_flags,
        } => {
            let fs = fs_type
                .or_else(|| record.capabilities.iter().find_map(Capability::fs_type))
                .or_else(|| b.default_fs_type(record));
            stage_filesystem(
                &device,
                staging,
                fs,
                mount_flags,
                cap,
                record.params.mkfs_discard,
            )
        }
    };
    if result.is_err() && attached_before.is_none() && !is_mounted_anywhere(&device) {
        // Leave the host as we found it.
        let _ = b.detach(&record.id);
    }
    result
}

pub(super) fn stage_block(device: &Path, staging: &HostPath) -> Result<()> {
    let file = staging.join(BLOCK_STAGING_FILE);
    let number = mount::device_number(device)?;
    if let Some(state) = file.mount_state()? {
        return if state.is_bind_of(number) {
            Ok(())
        } else {
            Err(Error::AlreadyExists(format!(
                "{} is staged from another device",
                file.path().display()
            )))
        };
    }
    if let Some(state) = staging.mount_state()? {
        return Err(Error::AlreadyExists(format!(
            "{} already holds a {} filesystem mount",
            staging.path().display(),
            state.fs_type
        )));
    }
    file.ensure_file()?;
    file.bind_from(device, false, MsFlags::empty())
}

pub(super) fn stage_filesystem(
    device: &Path,
    staging: &HostPath,
    fs: Option<FsType>,
    mount_flags: &[String],
    cap: &Capability,
    discard: bool,
) -> Result<()> {
    let mut options = mount::parse_options(mount_flags)?;
    if cap.access_mode.read_only() {
        options.flags |= MsFlags::MS_RDONLY;
    }
    if let Some(state) = staging.mount_state()? {
        if !state.is_filesystem_of(mount::device_number(device)?) {
            let (major, minor) = state.dev;
            return Err(Error::AlreadyExists(format!(
                "{} is already a mount of device {major}:{minor}",
                staging.path().display(),
            )));
        }
        if fs.is_some_and(|fs| fs.name() != state.fs_type) {
            return Err(Error::AlreadyExists(format!(
                "volume is staged with {}, not {}",
                state.fs_type,
                fs.map_or("", FsType::name)
            )));
        }
        return Ok(());
    }
    if staging.join(BLOCK_STAGING_FILE).mount_state()?.is_some() {
        return Err(Error::AlreadyExists(format!(
            "{} is staged as a block volume",
            staging.path().display()
        )));
    }
    let fs_name = match filesystem::probe(device)? {
        // Existing data decides the filesystem when the request does not.
        filesystem::Content::Filesystem(found) if fs.is_none() => found,
        filesystem::Content::Blank
        | filesystem::Content::Filesystem(_)
        | filesystem::Content::Other(_) => {
            let fs = fs.unwrap_or(FsType::DEFAULT);
            if cap.access_mode.read_only()
                && filesystem::probe(device)? == filesystem::Content::Blank
            {
                return Err(Error::Precondition(
                    "a blank volume cannot be staged read-only".to_owned(),
                ));
            }
            filesystem::ensure_filesystem(device, fs, discard)?;
            crate::faults::step("stage: filesystem made");
            fs.name().to_owned()
        }
    };
    // A volume expanded while unstaged grows now: ext4 before mounting (no
    // special capability needed), xfs only once mounted.
    let needs_growth = filesystem::filesystem_bytes(device)?
        .is_some_and(|fs_bytes| fs_bytes < loopdev::device_size(device).unwrap_or(0));
    if needs_growth && fs_name == "ext4" && !cap.access_mode.read_only() {
        filesystem::grow_offline_ext4(device)?;
    }
    staging
        .mount_device(device, &fs_name, &options)
        .map_err(|e| label_refused(&options, e))?;
    if needs_growth && fs_name == "xfs" && !cap.access_mode.read_only() {
        if let Err(e) = filesystem::grow_online(device, staging.path(), &fs_name) {
            let _ = staging.unmount_all();
            return Err(e);
        }
    }
    Ok(())
}

/// A mount with an SELinux label that failed where SELinux is off: say so
/// (the kernel only logs "Unknown parameter 'context'").
pub(super) fn label_refused(options: &mount::MountOptions, e: Error) -> Error {
    match options.data.iter().find(|o| selinux::is_label_option(o)) {
        Some(label) if !selinux::enabled() => Error::Precondition(format!(
            "the kernel refused mount option {label} ({e}): SELinux is not enabled on this \
             node, and the kubelet sends that option only where it is; check the node's \
             SELinux state"
        )),
        _ => e,
    }
}
