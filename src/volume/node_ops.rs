//! Node-side decisions: stage, publish, their inverses, stats and growth.
//!
//! Every step first reads what is already true on the host (mountinfo, loop
//! attachments), so each call is idempotent and a restarted driver picks up
//! where it stopped. The blocking work of staging (`stage`) and publishing
//! (`publish`, with fsGroup and I/O limits) lives in submodules.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::model::spec::Capability;
use crate::model::volume_size::CapacityRange;
use crate::model::VolumeId;
use crate::node::fs as filesystem;
use crate::node::fs_health;
use crate::node::host_path::{HostPath, KubeletDir};
use crate::node::io_throttle;
use crate::node::loopdev::{self, LoopIndex};
use crate::node::mount::{self, PathState};
use crate::volume::controller_ops::{parse_known, run_blocking};
use crate::volume::work::Work;

mod publish;
mod stage;

use publish::{apply_io_limits, publish, stacked_read_only_device, throttle_pod};
use stage::stage;

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
