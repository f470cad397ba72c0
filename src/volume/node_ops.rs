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
use crate::model::capacity::CapacityRange;
use crate::model::spec::{AccessMode, AccessType, Capability, FsType};
use crate::model::VolumeId;
use crate::node::fs as filesystem;
use crate::node::fs_group;
use crate::node::fs_health;
use crate::node::host_path::{HostPath, KubeletDir};
use crate::node::io_throttle;
use crate::node::loopdev::{self, LoopIndex};
use crate::node::mount::{self, MountEntry, PathState};
use crate::node::selinux;
use crate::volume::controller_ops::{parse_known, run_blocking};
use crate::volume::work::Work;

/// Inside a Block volume's staging directory, the file the device is bound to.
pub const BLOCK_STAGING_FILE: &str = "device";

pub struct NodeOps {
    backend: Arc<dyn Backend>,
    work: Work,
    kubelet: KubeletDir,
    /// Read-only loop devices stacked on staged devices for read-only Block
    /// publications, by the device they sit on.
    stacked: Arc<LoopIndex>,
    /// `--blkio-cgroup-dir`: the cgroup hierarchy (v1 blkio or v2) of the
    /// kubelet's pods, where I/O limits go.
    cgroups: PathBuf,
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
    /// Group to give a Filesystem volume's files (the pod's fsGroup).
    pub mount_group: Option<u32>,
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

/// The paths of a publish request, confined to the kubelet directory.
struct Publication {
    staging: HostPath,
    target: HostPath,
    capability: Capability,
    read_only: bool,
    mount_group: Option<u32>,
}

impl NodeOps {
    /// Node operations on paths below `kubelet`; indexes the read-only loop
    /// devices earlier runs left stacked on block devices.
    pub fn new(backend: Arc<dyn Backend>, work: Work, kubelet: KubeletDir) -> Result<Self> {
        let stacked = LoopIndex::scan(loopdev::device_nodes(Path::new("/dev"))?)?;
        Ok(NodeOps {
            backend,
            work,
            kubelet,
            stacked: Arc::new(stacked),
            cgroups: io_throttle::DEFAULT_BLKIO_DIR.into(),
        })
    }

    /// Apply I/O limits in this cgroup hierarchy (v1 blkio or v2) instead
    /// of the default.
    pub fn with_cgroup_dir(mut self, dir: PathBuf) -> Self {
        self.cgroups = dir;
        self
    }

    /// What puts a volume's stored I/O limits into effect on this node:
    /// every pod it is published to here (none when it is not attached).
    /// ControllerModifyVolume runs it under the volume's lock, after storing
    /// the limits.
    pub fn io_limits_applier(
        &self,
    ) -> impl FnOnce(&dyn Backend, &VolumeRecord) -> Result<()> + Send + 'static {
        let (kubelet, cgroups) = (self.kubelet.root().to_owned(), self.cgroups.clone());
        move |b, record| apply_io_limits(b, &kubelet, &cgroups, record)
    }

    pub fn kubelet_dir(&self) -> &KubeletDir {
        &self.kubelet
    }

    /// A path to inspect (stats, expand): one outside the kubelet directory
    /// cannot hold the volume.
    fn volume_path(&self, path: &Path) -> Result<HostPath> {
        self.kubelet
            .locate(path, "volume_path")
            .map_err(|_| Error::NotFound(format!("volume path {} does not exist", path.display())))
    }

    /// Run `work` on the blocking pool holding the volume's lock until it ends, whatever
    /// happens to the caller (see [`Work`]).
    async fn exclusive<T: Send + 'static>(
        &self,
        key: String,
        work: impl FnOnce(&dyn Backend) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.work
            .run(vec![key], run_blocking(self.backend.clone(), work))
            .await
    }

    pub async fn stage(&self, req: StageRequest) -> Result<()> {
        let staging = self
            .kubelet
            .locate(&req.staging_path, "staging_target_path")?;
        let id = parse_known(&req.volume_id)?;
        self.exclusive(id.as_str().to_owned(), move |b| {
            crate::faults::step("stage: locked");
            let record = known(b, &id)?;
            stage(b, &record, &staging, &req.capability)
        })
        .await
    }

    pub async fn unstage(&self, raw_id: &str, staging_path: PathBuf) -> Result<()> {
        let staging = self.kubelet.locate(&staging_path, "staging_target_path")?;
        let id = parse_known(raw_id)?;
        let stacked = self.stacked.clone();
        self.exclusive(id.as_str().to_owned(), move |b| {
            crate::faults::step("unstage: locked");
            let device = b.attached_device(&id)?;
            let block_file = staging.join(BLOCK_STAGING_FILE);
            if b.get(&id)?.is_none() {
                // The record is gone: still take down what is this volume's here.
                let holds = |path: &HostPath| -> Result<bool> {
                    Ok(match (path.mount_state()?, device.as_deref()) {
                        (Some(state), Some(device)) => {
                            holds_device(&state, mount::device_number(device)?)
                        }
                        _ => false,
                    })
                };
                if !holds(&staging)? && !holds(&block_file)? {
                    return Err(Error::VolumeNotFound(id.to_string()));
                }
                tracing::warn!(volume_id = %id, "volume has no record; unstaging what is left of it");
            }
            ensure_ours_or_unmounted(&block_file, device.as_deref())?;
            ensure_ours_or_unmounted(&staging, device.as_deref())?;
            block_file.unmount_all()?;
            block_file.remove()?;
            staging.unmount_all()?;
            // Read-only devices of Block publications that were never unpublished.
            if let Some(device) = device {
                stacked.detach_all(&canonical(&device)?)?;
            }
            b.detach(&id)
        })
        .await
    }

    pub async fn publish(&self, req: PublishRequest) -> Result<()> {
        let publication = Publication {
            staging: self
                .kubelet
                .locate(&req.staging_path, "staging_target_path")?,
            target: self.kubelet.locate(&req.target_path, "target_path")?,
            capability: req.capability,
            read_only: req.read_only,
            mount_group: req.mount_group,
        };
        let id = parse_known(&req.volume_id)?;
        let stacked = self.stacked.clone();
        let (kubelet, cgroups) = (self.kubelet.root().to_owned(), self.cgroups.clone());
        self.exclusive(id.as_str().to_owned(), move |b| {
            crate::faults::step("publish: locked");
            let record = known(b, &id)?;
            publish(b, &stacked, &id, &publication)?;
            let device = b
                .attached_device(&id)?
                .ok_or_else(|| Error::Internal(format!("volume {id} lost its device")))?;
            throttle_pod(
                &kubelet,
                &cgroups,
                publication.target.path(),
                mount::device_number(&device)?,
                &record,
            )
        })
        .await
    }

    pub async fn unpublish(&self, raw_id: &str, target_path: PathBuf) -> Result<()> {
        let target = self.kubelet.locate(&target_path, "target_path")?;
        let id = parse_known(raw_id)?;
        let stacked = self.stacked.clone();
        self.exclusive(id.as_str().to_owned(), move |b| {
            crate::faults::step("unpublish: locked");
            let device = b.attached_device(&id)?;
            let state = target.mount_state()?;
            let stacked_device = match (&device, &state) {
                (Some(device), Some(state)) => stacked_read_only_device(state, device)?,
                _ => None,
            };
            if b.get(&id)?.is_none() {
                // The record is gone: still take down what is this volume's here.
                let holds = match (&device, &state) {
                    (Some(device), Some(state)) => {
                        holds_device(state, mount::device_number(device)?)
                            || stacked_device.is_some()
                    }
                    _ => false,
                };
                if !holds {
                    return Err(Error::VolumeNotFound(id.to_string()));
                }
                tracing::warn!(volume_id = %id, "volume has no record; unpublishing what is left of it");
            }
            ensure_ours_or_unmounted(&target, device.as_deref())?;
            target.unmount_all()?;
            if let (Some(device), Some(ro_device)) = (device, stacked_device) {
                stacked.detach(&canonical(&device)?, &ro_device)?;
            }
            target.remove()
        })
        .await
    }

    pub async fn stats(&self, raw_id: &str, volume_path: PathBuf) -> Result<StatsReport> {
        let path = self.volume_path(&volume_path)?;
        let id = parse_known(raw_id)?;
        run_blocking(self.backend.clone(), move |b| {
            let record = known(b, &id)?;
            let state = require_existing(&path)?;
            let device = b.attached_device(&id)?.ok_or_else(|| {
                Error::NotFound(format!("volume {id} is not staged on this node"))
            })?;
            let number = mount::device_number(&device)?;
            // A read-only Block publication binds a loop device stacked on it.
            let stacked = stacked_read_only_device(&state, &device)?.is_some();
            if !holds_device(&state, number) && !stacked {
                return Err(Error::NotFound(format!(
                    "{} is not a mount of volume {id}",
                    path.path().display()
                )));
            }
            let stats = if state.is_bind_of(number) || stacked {
                VolumeStats::Block {
                    total_bytes: loopdev::device_size(&device)?,
                }
            } else {
                VolumeStats::Filesystem(filesystem::usage(path.path())?)
            };
            let abnormal = match b.health(&record) {
                Some(problem) => Some(problem),
                None if state.is_filesystem_of(number) => filesystem_trouble(&state, &device)?,
                None => None,
            };
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
        let path = self.volume_path(&volume_path)?;
        let id = parse_known(raw_id)?;
        self.exclusive(id.as_str().to_owned(), move |b| {
            crate::faults::step("expand: locked");
            let record = known(b, &id)?;
            let state = require_existing(&path)?;
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
            // Already grown (e.g. offline, on the last stage): nothing to ask the kernel.
            if state.is_filesystem_of(mount::device_number(&device)?) {
                let fs_bytes = filesystem::filesystem_bytes(&device)?;
                if fs_bytes.is_none_or(|bytes| bytes < size) {
                    filesystem::grow_online(&device, path.path(), &state.fs_type)?;
                }
            }
            Ok(size)
        })
        .await
    }
}

/// The path is a mount of the volume's device: its filesystem or a bind of its node.
fn holds_device(state: &PathState, device: (u32, u32)) -> bool {
    state.is_filesystem_of(device) || state.is_bind_of(device)
}

/// The device's real node path (`/dev/loop3`), as sysfs names backing files.
fn canonical(device: &Path) -> Result<PathBuf> {
    fs::canonicalize(device).ctx("resolve", device)
}

/// Refuse to tear down a mount that belongs to another volume: a request
/// naming the wrong volume must not take another workload's data away.
fn ensure_ours_or_unmounted(path: &HostPath, device: Option<&Path>) -> Result<()> {
    let Some(state) = path.mount_state()? else {
        return Ok(());
    };
    let ours = match device {
        Some(device) => {
            holds_device(&state, mount::device_number(device)?)
                || stacked_read_only_device(&state, device)?.is_some()
        }
        // Not attached: only a stale bind of a loop device node that nothing
        // backs any more can be left of it.
        None => state.block_device.is_some_and(|rdev| {
            rdev.0 == loopdev::LOOP_MAJOR && loopdev::backing_of(rdev).is_none()
        }),
    };
    if ours {
        return Ok(());
    }
    let (major, minor) = state.block_device.unwrap_or(state.dev);
    Err(Error::Precondition(format!(
        "{} is a mount of device {major}:{minor} ({}), not of this volume; refusing to unmount it",
        path.path().display(),
        state.fs_type
    )))
}

fn require_existing(volume_path: &HostPath) -> Result<PathState> {
    volume_path.state()?.ok_or_else(|| {
        Error::NotFound(format!(
            "volume path {} does not exist",
            volume_path.path().display()
        ))
    })
}

fn known(b: &dyn Backend, id: &VolumeId) -> Result<VolumeRecord> {
    b.get(id)?
        .ok_or_else(|| Error::VolumeNotFound(id.to_string()))
}

fn stage(
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

fn stage_block(device: &Path, staging: &HostPath) -> Result<()> {
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

fn stage_filesystem(
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

/// The volume's I/O limits on the cgroups of every pod this node publishes
/// it to.
fn apply_io_limits(
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
fn throttle_pod(
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
fn give_to_group(root: &Path, gid: u32) -> Result<()> {
    if fs_group::root_matches(root, gid)? {
        return Ok(());
    }
    fs_group::apply(root, gid)
}

/// A mount with an SELinux label that failed where SELinux is off: say so
/// (the kernel only logs "Unknown parameter 'context'").
fn label_refused(options: &mount::MountOptions, e: Error) -> Error {
    match options.data.iter().find(|o| selinux::is_label_option(o)) {
        Some(label) if !selinux::enabled() => Error::Precondition(format!(
            "the kernel refused mount option {label} ({e}): SELinux is not enabled on this \
             node, and the kubelet sends that option only where it is; check the node's \
             SELinux state"
        )),
        _ => e,
    }
}

fn publish(b: &dyn Backend, stacked: &LoopIndex, id: &VolumeId, req: &Publication) -> Result<()> {
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
fn block_publication(state: &PathState, device: &Path) -> Result<Option<bool>> {
    if state.is_bind_of(mount::device_number(device)?) {
        return Ok(Some(false));
    }
    Ok(stacked_read_only_device(state, device)?.map(|_| true))
}

/// The read-only loop device a Block target is bound to, if it sits on
/// `device`: one sysfs read of the bound device's entry, one status of the device.
fn stacked_read_only_device(state: &PathState, device: &Path) -> Result<Option<PathBuf>> {
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
fn ensure_single_publication(device: &Path, req: &Publication, staged_at: &Path) -> Result<()> {
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
fn is_block_bind(entry: &MountEntry, device: &Path) -> Result<bool> {
    let real = canonical(device)?;
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

/// A filesystem that hit errors, or went read-only after them
/// (`errors=remount-ro`). One sysfs read; the mount table only when that or
/// the path itself says something is wrong.
fn filesystem_trouble(state: &PathState, device: &Path) -> Result<Option<String>> {
    let errors = fs_health::ext4_errors(state.dev);
    if errors.unwrap_or(0) == 0 && !state.read_only {
        return Ok(None);
    }
    let mounts = mount::mounts()?;
    // Shut down rather than read-only on some kernels: an error since this
    // mount of an errors=remount-ro filesystem is the same thing.
    let read_only = fs_health::went_read_only(&mounts, state.dev)
        || (errors.unwrap_or(0) > 0
            && fs_health::remounts_read_only_on_errors(&mounts, state.dev)
            && fs_health::ext4_error_since_mount(device, state.dev));
    Ok(fs_health::describe(errors, read_only))
}
