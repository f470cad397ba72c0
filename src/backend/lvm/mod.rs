//! The LVM backend: one LV per volume in a volume group (one VG per device
//! class), driven through lvm2's own tools.
//!
//! All persistent state is in LV tags (see `tags`). The driver keeps an
//! in-memory [`index`] of its VGs, loaded at start-up and kept current by
//! its own changes, so a volume's whole life costs two lvm2 commands: one
//! `lvcreate` (record tags included) and one `lvremove`. Stage, publish,
//! stats, listings and lookups run none. A background refresh picks up
//! changes made by hand. Every command scans only the VGs' PVs (`--devices`),
//! a list each reload brings up to date (a `vgextend` needs no restart).
//!
//! With device-mapper, an LV is created active and stays active until it is
//! removed (after a reboot, one activation at start-up); the node side uses
//! `/dev/VG/LV`. Without it (`--lvm-activation loop`, automatic when
//! `/dev/mapper/control` cannot be opened), lvm2 runs with `--driverloaded n`
//! and only edits metadata; a linear LV is placed by the driver on a free run
//! of extents it picks from the index and is exposed through a loop device
//! over its byte range of the PV. Thin LVs and striped LVs need
//! device-mapper.
//!
//! ## No tenant reads another's data
//! An LV's extents are zeroed (`BLKZEROOUT`) before `lvremove` returns them
//! to the VG, so free extents of a Kennel VG always read as zeros and a new
//! LV needs no wipe. The LV still holds its extents while they are zeroed, so
//! capacity stays honest. An inactive LV (after a reboot) is activated to be
//! zeroed; one that still cannot be zeroed is not removed, and the call
//! fails naming it. At start-up every Kennel LV that holds extents (volumes,
//! full-copy snapshots, half-built LVs) is activated before the sweep
//! removes half-built ones. This assumes the VG's free space starts zeroed
//! (a new sparse file or a discarded disk) and that LVs are removed through
//! Kennel. Thin LVs are not zeroed by Kennel: their pool zeroes a block when
//! it is provisioned (`-Zy`, lvm2's default), and Kennel refuses to use a
//! thin pool made with `-Zn` (FAILED_PRECONDITION naming the pool).
//!
//! ## Operations that need more than one command
//! Clones, restores, full-copy snapshots and volumes filled by the caller
//! fill an LV after creating it, so their `lvcreate` also sets the `pending`
//! tag: `lvcreate (pending)` → copy → `lvchange --deltag pending`. An LV still pending at start-up is debris
//! of an interrupted call and is zeroed and removed; a pending LV is never
//! listed or served.
//!
//! ## Where things are
//! - this file: the configuration, the backend's state and start-up
//!   (`LvmBackend::open`: lock the VGs, load the index, activate, sweep).
//! - [`backend_impl`]: the `Backend` contract, calling into the rooms below.
//! - [`refresh`]: the index kept in step with lvm2 (reloads, the background
//!   refresh, lookups that confirm a miss).
//! - [`activation`]: device-mapper activation, at start-up and on demand, and
//!   the LVs that failed to activate.
//! - [`allocation`]: creating an LV (`lvcreate`, picking free extents without
//!   device-mapper, the LVs being built right now).
//! - [`windows`]: where an LV's bytes are (a loop window over its PV range, or
//!   its device-mapper device) and whether it is attached.
//! - [`copies`]: clones, restores and full-copy snapshots (pending → copy →
//!   commit).
//! - [`fill`]: volumes whose bytes the caller writes (pending → fill →
//!   commit), and where a snapshot's bytes are for a caller to read.
//! - [`cow`]: the short-lived copy-on-write snapshot a copy of an in-use
//!   volume reads from under device-mapper, so its workload is held only
//!   for an instant.
//! - [`removal`]: zeroing an LV and removing it.
//! - [`sweep`]: removing the half-built LVs of interrupted calls.
//! - [`capacity`]: free space of a VG and room in a thin pool.
//! - [`health`]: why a volume's LV is unhealthy, from the index and the
//!   activation failures.
//! - [`io_limits_tag`]: a volume's I/O limits, in a short tag of their own.
//! - [`cli`], [`data`], [`index`], [`tool_metrics`], [`params`], [`tags`]: lvm2's
//!   command line, byte copying and zeroing, the in-memory index, lvm2 call
//!   metrics, StorageClass parameters and the records kept in LV tags.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};
use crate::node::loopdev::LoopIndex;

mod activation;
mod allocation;
mod backend_impl;
mod capacity;
pub mod cli;
mod copies;
mod cow;
pub mod data;
mod fill;
mod group;
mod health;
pub mod index;
mod io_limits_tag;
pub mod metadata;
pub mod params;
mod refresh;
mod removal;
mod sweep;
pub mod tags;
pub mod tool_metrics;
mod windows;

pub use activation::{device_mapper_available, Activation};
use cli::Lvm;
use index::Index;
use params::{DeviceClass, LvmParams};
use refresh::{load, Changes};

#[derive(Debug, Clone)]
pub struct LvmConfig {
    /// Device classes; the first is the default.
    pub classes: Vec<DeviceClass>,
    pub activation: Activation,
    /// Thin volumes may promise at most this many times the pool's size.
    pub thin_overprovision_ratio: f64,
    /// Where the per-VG lock files live (on the host, shared by every
    /// driver and tool that manages these VGs).
    pub lock_dir: PathBuf,
    /// How often the index is reloaded to notice changes made by hand.
    pub refresh_interval: Duration,
}

/// The default of [`LvmConfig::refresh_interval`].
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);

pub struct LvmBackend {
    lvm: Lvm,
    classes: Vec<DeviceClass>,
    vgs: Vec<String>,
    granularity: u64,
    ratio: f64,
    index: Arc<Mutex<Index>>,
    changes: Arc<Changes>,
    /// LVs (`VG/LV`) whose last activation failed, and why (see `activation`).
    not_activated: Mutex<BTreeMap<String, String>>,
    /// LVs this process is building right now (pending on purpose).
    in_flight: Mutex<HashSet<String>>,
    /// Held across one LV creation: picking free extents, `lvcreate` and indexing it. Two
    /// creations at once could pick from a map the other is changing, and a reload after a
    /// failed one would forget the other's reservation. lvm2 serializes VG writes anyway.
    creating: Mutex<()>,
    /// device-mapper mode: one marker file per staged LV (LVs stay active,
    /// so activation no longer tells a staged volume apart). Under /run:
    /// gone after a reboot, like the mounts they stand for.
    staged_dir: PathBuf,
    /// Without device-mapper: the loop devices exposing LV windows of our
    /// PVs (found without scanning every loop device on a crowded node).
    windows: LoopIndex,
    _locks: Vec<Flock<File>>,
}

impl LvmBackend {
    pub fn open(config: LvmConfig) -> Result<Self> {
        if config.classes.is_empty() {
            return Err(Error::invalid(
                "the lvm backend needs at least one --volume-group",
            ));
        }
        let mut seen = HashSet::new();
        for class in &config.classes {
            if !seen.insert(class.name.clone()) {
                return Err(Error::invalid(format!(
                    "device class {:?} is given twice",
                    class.name
                )));
            }
        }
        if config.thin_overprovision_ratio.is_nan() || config.thin_overprovision_ratio < 1.0 {
            return Err(Error::invalid(
                "--thin-overprovision-ratio must be at least 1",
            ));
        }
        let activation = config.activation.resolve();
        let no_udev = !Path::new("/run/udev/control").exists();
        let lvm = Lvm::new(activation == Activation::Loop, no_udev);
        let mut vgs: Vec<String> = config.classes.iter().map(|c| c.vg.clone()).collect();
        vgs.sort();
        vgs.dedup();
        // Lock first: a second driver must never see (and sweep) the
        // first one's LVs in the making.
        let locks = vgs
            .iter()
            .map(|vg| lock_vg(&config.lock_dir, vg))
            .collect::<Result<Vec<_>>>()?;
        let index = load(&lvm, &vgs).map_err(|e| {
            Error::Precondition(format!("volume group(s) {} unusable: {e}", vgs.join(", ")))
        })?;
        for vg in &vgs {
            if index.vg(vg).is_none() {
                return Err(Error::Precondition(format!(
                    "volume group {vg:?} not found"
                )));
            }
        }
        let granularity = vgs
            .iter()
            .filter_map(|vg| index.vg(vg))
            .map(|v| v.extent_size)
            .max()
            .unwrap_or(4 << 20)
            .max(crate::model::volume_size::MIB);
        if !granularity.is_power_of_two() {
            return Err(Error::Precondition(format!(
                "extent size {granularity} is not a power of two"
            )));
        }
        lvm.scope_to(index.pv_names());
        let windows = if activation == Activation::Loop {
            let pvs: HashSet<PathBuf> = index
                .pv_names()
                .iter()
                .filter_map(|pv| fs::canonicalize(pv).ok())
                .collect();
            LoopIndex::scan(pvs)?
        } else {
            // device-mapper exposes LVs itself: no loop device to find.
            LoopIndex::default()
        };
        let backend = LvmBackend {
            lvm,
            classes: config.classes,
            vgs,
            granularity,
            ratio: config.thin_overprovision_ratio,
            index: Arc::new(Mutex::new(index)),
            changes: Arc::default(),
            not_activated: Mutex::default(),
            in_flight: Mutex::new(HashSet::new()),
            creating: Mutex::new(()),
            staged_dir: config.lock_dir.join("lvm-staged"),
            windows,
            _locks: locks,
        };
        tracing::info!(
            vgs = %backend.vgs.join(","),
            pvs = %backend.lvm.devices().join(","),
            device_mapper = backend.lvm.device_mapper(),
            "lvm backend ready"
        );
        // Activate first: the sweep zeroes what it removes, and needs its bytes.
        backend.activate_all();
        backend.sweep();
        backend.start_refresh(config.refresh_interval);
        Ok(backend)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn class(&self, params: &LvmParams) -> Result<&DeviceClass> {
        match &params.device_class {
            None => Ok(&self.classes[0]),
            Some(name) => self
                .classes
                .iter()
                .find(|c| &c.name == name)
                .ok_or_else(|| {
                    Error::invalid(format!(
                        "parameter {:?}: unknown device class {name:?} (this node has: {})",
                        params::DEVICE_CLASS,
                        self.classes
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                }),
        }
    }

    fn require_device_mapper(&self, what: &str) -> Result<()> {
        if self.lvm.device_mapper() {
            Ok(())
        } else {
            Err(Error::Precondition(format!(
                "{what} needs device-mapper, which this host lacks (/dev/mapper/control); only linear volumes work here"
            )))
        }
    }
}

/// One driver per VG on a host: the pending-LV sweep assumes it. The lock
/// directory must be the host's (the lvm overlay mounts it) for this to hold
/// across containers.
fn lock_vg(dir: &Path, vg: &str) -> Result<Flock<File>> {
    fs::create_dir_all(dir).ctx("create", dir)?;
    let path = dir.join(format!("lvm-{vg}.lock"));
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .ctx("open", &path)?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        Error::Precondition(format!(
            "volume group {vg:?} is in use by another Kennel driver ({}: {errno})",
            path.display()
        ))
    })
}
