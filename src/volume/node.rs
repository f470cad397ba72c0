//! Node-side decisions: stage, publish, their inverses, stats and growth.
//!
//! Every step first reads what is already true on the host (mountinfo, loop
//! attachments), so each call is idempotent and a restarted driver picks up
//! where it stopped.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::mount::MsFlags;

use crate::backend::{Backend, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::node::mount::{self, MountEntry};
use crate::node::{fs as filesystem, loopdev};
use crate::volume::capacity::CapacityRange;
use crate::volume::controller::{parse_known, run_blocking};
use crate::volume::locks::LockMap;
use crate::volume::spec::{AccessMode, AccessType, Capability, FsType};
use crate::volume::VolumeId;

/// Inside a Block volume's staging directory, the file the device is bound to.
pub const BLOCK_STAGING_FILE: &str = "device";

pub struct NodeOps {
    backend: Arc<dyn Backend>,
    locks: LockMap,
}

pub struct StageRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub capability: Capability,
}

pub struct PublishRequest {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub target_path: PathBuf,
    pub capability: Capability,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeStats {
    Filesystem(filesystem::Usage),
    Block { total_bytes: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatsReport {
    pub stats: VolumeStats,
    /// Why the volume is unhealthy, if it is.
    pub abnormal: Option<String>,
}

impl NodeOps {
    pub fn new(backend: Arc<dyn Backend>, locks: LockMap) -> Self {
        NodeOps { backend, locks }
    }

    pub async fn stage(&self, req: StageRequest) -> Result<()> {
        let id = parse_known(&req.volume_id)?;
        let _guard = self.locks.lock(id.as_str()).await?;
        run_blocking(self.backend.clone(), move |b| {
            let record = known(b, &id)?;
            stage(b, &record, &req.staging_path, &req.capability)
        })
        .await
    }

    pub async fn unstage(&self, raw_id: &str, staging_path: PathBuf) -> Result<()> {
        let id = parse_known(raw_id)?;
        let _guard = self.locks.lock(id.as_str()).await?;
        run_blocking(self.backend.clone(), move |b| {
            known(b, &id)?;
            let device = b.attached_device(&id)?;
            let block_file = staging_path.join(BLOCK_STAGING_FILE);
            ensure_ours_or_unmounted(&block_file, device.as_deref())?;
            ensure_ours_or_unmounted(&staging_path, device.as_deref())?;
            mount::unmount_all(&block_file)?;
            remove_path(&block_file)?;
            mount::unmount_all(&staging_path)?;
            // Read-only devices of Block publications that were never unpublished.
            if let Some(device) = device {
                for stacked in loopdev::find_attached(&device)? {
                    loopdev::detach(&stacked.device)?;
                }
            }
            b.detach(&id)
        })
        .await
    }

    pub async fn publish(&self, req: PublishRequest) -> Result<()> {
        let id = parse_known(&req.volume_id)?;
        let _guard = self.locks.lock(id.as_str()).await?;
        run_blocking(self.backend.clone(), move |b| {
            known(b, &id)?;
            publish(b, &id, &req)
        })
        .await
    }

    pub async fn unpublish(&self, raw_id: &str, target_path: PathBuf) -> Result<()> {
        let id = parse_known(raw_id)?;
        let _guard = self.locks.lock(id.as_str()).await?;
        run_blocking(self.backend.clone(), move |b| {
            known(b, &id)?;
            let device = b.attached_device(&id)?;
            ensure_ours_or_unmounted(&target_path, device.as_deref())?;
            let stacked = match (device, mount::mounts_at(&target_path)?.pop()) {
                (Some(device), Some(entry)) => stacked_read_only_device(&entry, &device)?,
                _ => None,
            };
            mount::unmount_all(&target_path)?;
            if let Some(ro_device) = stacked {
                loopdev::detach(&ro_device)?;
            }
            remove_path(&target_path)
        })
        .await
    }

    pub async fn stats(&self, raw_id: &str, volume_path: PathBuf) -> Result<StatsReport> {
        let id = parse_known(raw_id)?;
        run_blocking(self.backend.clone(), move |b| {
            let record = known(b, &id)?;
            require_existing(&volume_path)?;
            let device = b.attached_device(&id)?.ok_or_else(|| {
                Error::NotFound(format!("volume {id} is not staged on this node"))
            })?;
            let entry = mount_of(&volume_path, &device)?.ok_or_else(|| {
                Error::NotFound(format!(
                    "{} is not a mount of volume {id}",
                    volume_path.display()
                ))
            })?;
            let stats = if is_block_bind(&entry, &device)? {
                VolumeStats::Block {
                    total_bytes: loopdev::device_size(&device)?,
                }
            } else {
                VolumeStats::Filesystem(filesystem::usage(&volume_path)?)
            };
            let abnormal = b
                .health(&record)
                .or_else(|| went_read_only(&record, &entry));
            Ok(StatsReport { stats, abnormal })
        })
        .await
    }

    /// Make the device and its filesystem see the volume's current size.
    pub async fn expand(
        &self,
        raw_id: &str,
        volume_path: PathBuf,
        range: CapacityRange,
    ) -> Result<u64> {
        let id = parse_known(raw_id)?;
        let _guard = self.locks.lock(id.as_str()).await?;
        run_blocking(self.backend.clone(), move |b| {
            let record = known(b, &id)?;
            require_existing(&volume_path)?;
            let device = b.attached_device(&id)?.ok_or_else(|| {
                Error::Precondition(format!("volume {id} is not staged on this node"))
            })?;
            b.refresh_device(&id)?;
            let size = loopdev::device_size(&device)?;
            if !range.admits(size) && range.required > record.capacity_bytes {
                return Err(Error::OutOfRange(format!(
                    "volume is {size} bytes; expand it in the controller first"
                )));
            }
            if let Some(entry) = mount_of(&volume_path, &device)? {
                // Already grown (e.g. offline, on the last stage): nothing to ask the kernel.
                let fs_bytes = filesystem::filesystem_bytes(&device)?;
                let needs_growth = fs_bytes.is_none_or(|bytes| bytes < size);
                if needs_growth && !is_block_bind(&entry, &device)? {
                    filesystem::grow_online(&device, &volume_path, &entry.fs_type)?;
                }
            }
            Ok(size)
        })
        .await
    }
}

/// Refuse to tear down a mount that belongs to another volume: a request
/// naming the wrong volume must not take another workload's data away.
fn ensure_ours_or_unmounted(path: &Path, device: Option<&Path>) -> Result<()> {
    let Some(entry) = mount::mounts_at(path)?.pop() else {
        return Ok(());
    };
    let ours = match device {
        Some(device) => {
            entry.dev == mount::device_number(device)?
                || is_block_bind(&entry, device)?
                || stacked_read_only_device(&entry, device)?.is_some()
        }
        // Not attached: only a stale bind of a device node that nothing backs
        // any more can be left of it.
        None => {
            entry.fs_type == "devtmpfs" && {
                let bound =
                    Path::new("/dev").join(entry.root.strip_prefix("/").unwrap_or(&entry.root));
                !loopdev::attachments()?.iter().any(|a| a.device == bound)
            }
        }
    };
    if ours {
        return Ok(());
    }
    Err(Error::Precondition(format!(
        "{} is a mount of {} ({}), not of this volume; refusing to unmount it",
        path.display(),
        entry.source,
        entry.fs_type
    )))
}

fn require_existing(volume_path: &Path) -> Result<()> {
    if volume_path.exists() {
        return Ok(());
    }
    Err(Error::NotFound(format!(
        "volume path {} does not exist",
        volume_path.display()
    )))
}

fn known(b: &dyn Backend, id: &VolumeId) -> Result<VolumeRecord> {
    b.get(id)?
        .ok_or_else(|| Error::VolumeNotFound(id.to_string()))
}

fn stage(b: &dyn Backend, record: &VolumeRecord, staging: &Path, cap: &Capability) -> Result<()> {
    ensure_dir(staging)?;
    let attached_before = b.attached_device(&record.id)?;
    let device = b.attach(&record.id)?;
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

fn stage_block(device: &Path, staging: &Path) -> Result<()> {
    let file = staging.join(BLOCK_STAGING_FILE);
    if let Some(entry) = mount::mounts_at(&file)?.pop() {
        return if is_block_bind(&entry, device)? {
            Ok(())
        } else {
            Err(Error::AlreadyExists(format!(
                "{} is staged from another device",
                file.display()
            )))
        };
    }
    if let Some(entry) = mount::mounts_at(staging)?.pop() {
        return Err(Error::AlreadyExists(format!(
            "{} already holds a {} filesystem mount",
            staging.display(),
            entry.fs_type
        )));
    }
    ensure_file(&file)?;
    mount::bind(device, &file, false, MsFlags::empty())
}

fn stage_filesystem(
    device: &Path,
    staging: &Path,
    fs: Option<FsType>,
    mount_flags: &[String],
    cap: &Capability,
    discard: bool,
) -> Result<()> {
    let mut options = mount::parse_options(mount_flags)?;
    if cap.access_mode.read_only() {
        options.flags |= MsFlags::MS_RDONLY;
    }
    if let Some(entry) = mount::mounts_at(staging)?.pop() {
        if entry.dev != mount::device_number(device)? {
            return Err(Error::AlreadyExists(format!(
                "{} is already a mount of {}",
                staging.display(),
                entry.source
            )));
        }
        if fs.is_some_and(|fs| fs.name() != entry.fs_type) {
            return Err(Error::AlreadyExists(format!(
                "volume is staged with {}, not {}",
                entry.fs_type,
                fs.map_or("", FsType::name)
            )));
        }
        return Ok(());
    }
    if mount::mounts_at(&staging.join(BLOCK_STAGING_FILE))?
        .pop()
        .is_some()
    {
        return Err(Error::AlreadyExists(format!(
            "{} is staged as a block volume",
            staging.display()
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
    mount::mount_device(device, staging, &fs_name, &options)?;
    if needs_growth && fs_name == "xfs" && !cap.access_mode.read_only() {
        if let Err(e) = filesystem::grow_online(device, staging, &fs_name) {
            let _ = mount::unmount_all(staging);
            return Err(e);
        }
    }
    Ok(())
}

fn publish(b: &dyn Backend, id: &VolumeId, req: &PublishRequest) -> Result<()> {
    let not_staged = || {
        Error::Precondition(format!(
            "volume {id} is not staged at {}",
            req.staging_path.display()
        ))
    };
    let device = b.attached_device(id)?.ok_or_else(not_staged)?;
    let source = if req.capability.is_block() {
        let file = req.staging_path.join(BLOCK_STAGING_FILE);
        let staged = mount::mounts_at(&file)?.pop().ok_or_else(not_staged)?;
        if !is_block_bind(&staged, &device)? {
            return Err(not_staged());
        }
        file
    } else {
        let staged = mount::mounts_at(&req.staging_path)?
            .pop()
            .ok_or_else(not_staged)?;
        if staged.dev != mount::device_number(&device)? {
            return Err(not_staged());
        }
        req.staging_path.clone()
    };
    if req.capability.access_mode == AccessMode::SingleNodeSingleWriter {
        ensure_single_publication(&device, req, &source)?;
    }
    let read_only = req.read_only || req.capability.access_mode.read_only();
    if let Some(entry) = mount::mounts_at(&req.target_path)?.pop() {
        let published = if req.capability.is_block() {
            block_publication(&entry, &device)?
        } else if entry.dev == mount::device_number(&device)? {
            Some(entry.read_only())
        } else {
            None
        };
        return match published {
            None => Err(Error::AlreadyExists(format!(
                "{} is already a mount of another volume",
                req.target_path.display()
            ))),
            Some(ro) if ro != read_only => Err(Error::AlreadyExists(format!(
                "{} is already published {}",
                req.target_path.display(),
                if ro { "read-only" } else { "read-write" }
            ))),
            Some(_) => Ok(()),
        };
    }
    match &req.capability.access_type {
        AccessType::Mount { mount_flags, .. } => {
            let extra = mount::parse_options(mount_flags)?.flags & !MsFlags::MS_RDONLY;
            ensure_dir(&req.target_path)?;
            mount::bind(&source, &req.target_path, read_only, extra)
        }
        AccessType::Block => {
            if let Some(parent) = req.target_path.parent() {
                ensure_dir(parent)?;
            }
            ensure_file(&req.target_path)?;
            if !read_only {
                return mount::bind(&source, &req.target_path, false, MsFlags::empty());
            }
            // A read-only bind does not stop writes through a device node: give
            // the workload its own read-only loop device over the staged one.
            let ro_device = loopdev::attach_read_only(&device)?;
            let bound = mount::bind(&ro_device, &req.target_path, true, MsFlags::empty());
            if bound.is_err() {
                let _ = loopdev::detach(&ro_device);
            }
            bound
        }
    }
}

/// How a Block target is published from `device`: `Some(false)` a bind of
/// the device itself, `Some(true)` a read-only loop device stacked on it,
/// `None` something else.
fn block_publication(entry: &MountEntry, device: &Path) -> Result<Option<bool>> {
    if is_block_bind(entry, device)? {
        return Ok(Some(false));
    }
    Ok(stacked_read_only_device(entry, device)?.map(|_| true))
}

/// The read-only loop device a Block target is bound to, if it sits on `device`.
fn stacked_read_only_device(entry: &MountEntry, device: &Path) -> Result<Option<PathBuf>> {
    let stacked = loopdev::find_attached(device)?;
    for attachment in stacked {
        if is_block_bind(entry, &attachment.device)? {
            return Ok(Some(attachment.device));
        }
    }
    Ok(None)
}

/// SINGLE_NODE_SINGLE_WRITER: one workload at a time. Any other mount of the
/// device than its staging and the requested target is a publication elsewhere.
fn ensure_single_publication(device: &Path, req: &PublishRequest, staged_at: &Path) -> Result<()> {
    let number = mount::device_number(device)?;
    for entry in mount::mounts()? {
        let ours = entry.dev == number || is_block_bind(&entry, device)?;
        let expected = entry.mount_point == staged_at
            || entry.mount_point == req.staging_path
            || entry.mount_point == req.target_path;
        if ours && !expected {
            return Err(Error::Precondition(format!(
                "volume is single-writer and already published at {}",
                entry.mount_point.display()
            )));
        }
    }
    Ok(())
}

/// The visible mount at `path` if it comes from `device`.
fn mount_of(path: &Path, device: &Path) -> Result<Option<MountEntry>> {
    let Some(entry) = mount::mounts_at(path)?.pop() else {
        return Ok(None);
    };
    let ours = entry.dev == mount::device_number(device)? || is_block_bind(&entry, device)?;
    Ok(ours.then_some(entry))
}

/// A bind of the device node itself (Block volumes): mountinfo shows the
/// devtmpfs with the device's name as root.
fn is_block_bind(entry: &MountEntry, device: &Path) -> Result<bool> {
    let real = fs::canonicalize(device).ctx("resolve", device)?;
    let Ok(relative) = real.strip_prefix("/dev") else {
        return Ok(false);
    };
    Ok(entry.root == Path::new("/").join(relative))
}

fn is_mounted_anywhere(device: &Path) -> bool {
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

/// A staging mount that went read-only although the volume is writable:
/// the filesystem hit errors (`errors=remount-ro`).
fn went_read_only(record: &VolumeRecord, entry: &MountEntry) -> Option<String> {
    let writable = record
        .capabilities
        .iter()
        .all(|c| !c.access_mode.read_only());
    let super_ro = entry
        .options
        .iter()
        .skip_while(|o| *o != "-")
        .any(|o| o == "ro");
    (writable && super_ro).then(|| "filesystem was remounted read-only after errors".to_owned())
}

fn ensure_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).ctx("create directory", path)
}

fn ensure_file(path: &Path) -> Result<()> {
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(Error::io("create file", path, e)),
    }
}

/// Remove a file or an empty directory we created; absent is fine.
fn remove_path(path: &Path) -> Result<()> {
    let result = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io("stat", path, e)),
        Ok(meta) if meta.is_dir() => fs::remove_dir(path),
        Ok(_) => fs::remove_file(path),
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}
