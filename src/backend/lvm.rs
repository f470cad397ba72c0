//! The LVM backend: one LV per volume in a volume group (one VG per device
//! class), driven through lvm2's own tools.
//!
//! All persistent state is in LV tags (see `tags`). The driver keeps an
//! in-memory [`index`] of its VGs, loaded at start-up and kept current by
//! its own changes, so a volume's whole life costs two lvm2 commands: one
//! `lvcreate` (record tags included) and one `lvremove`. Stage, publish,
//! stats, listings and lookups run none. A background refresh picks up
//! changes made by hand. Every command scans only the VGs' PVs (`--devices`).
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
//! capacity stays honest. This assumes the VG's free space starts zeroed (a
//! new sparse file or a discarded disk) and that LVs are removed through
//! Kennel. Thin LVs are not zeroed: the thin pool zeroes blocks on first
//! write (lvm2's default, `-Zy`).
//!
//! ## Operations that need more than one command
//! Clones, restores and full-copy snapshots fill an LV after creating it, so
//! their `lvcreate` also sets the `pending` tag: `lvcreate (pending)` → copy
//! → `lvchange --deltag pending`. An LV still pending at start-up is debris
//! of an interrupted call and is zeroed and removed; a pending LV is never
//! listed or served.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::{Backend, ContentSource, PoolCapacity, SnapshotRecord, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::node::loopdev::{self, LoopIndex, Window};
use crate::node::{freeze, mount};
use crate::volume::spec::FsType;
use crate::volume::{SnapshotId, VolumeId};

pub mod cli;
pub mod data;
pub mod index;
pub mod metadata;
pub mod metrics;
pub mod params;
pub mod tags;

use cli::{LvRow, Lvm};
use data::{ByteRange, PeRange};
use index::{Index, Kind, Lv};
use params::{DeviceClass, Layout, LvmParams};

/// How the node side reaches an LV's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Activation {
    /// `dm` when the kernel has device-mapper, `loop` otherwise.
    Auto,
    /// device-mapper: LVs active from creation to removal, `/dev/VG/LV`.
    Dm,
    /// No device-mapper: lvm2 with `--driverloaded n`, linear LVs allocated
    /// contiguously and exposed as a loop device over their PV range.
    Loop,
}

impl Activation {
    pub fn resolve(self) -> Activation {
        match self {
            Activation::Auto if device_mapper_available() => Activation::Dm,
            Activation::Auto => Activation::Loop,
            other => other,
        }
    }
}

/// Whether the kernel answers on `/dev/mapper/control` (the node alone
/// proves nothing: lvm2 creates it even where the kernel lacks the driver).
pub fn device_mapper_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .is_ok()
}

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

/// Tells the background refresh whether the index changed under it.
#[derive(Debug, Default)]
struct Changes {
    /// Bumped when a change starts and when it ends.
    generation: AtomicU64,
    /// Changes running now.
    running: AtomicUsize,
}

/// A change to the VGs in progress (see [`Changes`]).
struct Changing<'a>(&'a Changes);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

pub struct LvmBackend {
    lvm: Lvm,
    classes: Vec<DeviceClass>,
    vgs: Vec<String>,
    granularity: u64,
    ratio: f64,
    index: Arc<Mutex<Index>>,
    changes: Arc<Changes>,
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
            .max(crate::volume::capacity::MIB);
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
            LoopIndex::scan(|backing| pvs.contains(backing))?
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
        backend.sweep()?;
        backend.activate_all()?;
        backend.start_refresh(config.refresh_interval);
        Ok(backend)
    }

    /// The index as it stands, in comparable form.
    pub fn index_view(&self) -> index::View {
        self.index().view(!self.lvm.device_mapper())
    }

    /// The index as a fresh load from lvm2 would build it now.
    pub fn fresh_index_view(&self) -> Result<index::View> {
        Ok(load(&self.lvm, &self.vgs)?.view(!self.lvm.device_mapper()))
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mark a change to the VGs (keeps the background refresh off).
    fn changing(&self) -> Changing<'_> {
        self.changes.running.fetch_add(1, Ordering::SeqCst);
        self.changes.generation.fetch_add(1, Ordering::SeqCst);
        Changing(&self.changes)
    }

    /// Reload the whole index now (after rare changes whose effect on the
    /// extent map the driver does not compute itself).
    fn reload(&self) -> Result<()> {
        // Other volumes' changes may land while lvm2 is read: keep them.
        let before = self.index().clone();
        let fresh = load(&self.lvm, &self.vgs)?;
        self.index().merge_reload(&before, fresh);
        Ok(())
    }

    /// Reload every `interval`, off the request path, unless a change is
    /// running or ran meanwhile (its effect is already in the index).
    fn start_refresh(&self, interval: Duration) {
        let index: Weak<Mutex<Index>> = Arc::downgrade(&self.index);
        let changes = self.changes.clone();
        let lvm = self.lvm.reader();
        let vgs = self.vgs.clone();
        let spawned = std::thread::Builder::new()
            .name("lvm-refresh".to_owned())
            .spawn(move || loop {
                std::thread::sleep(interval);
                let Some(index) = index.upgrade() else { return };
                if changes.running.load(Ordering::SeqCst) > 0 {
                    continue;
                }
                let before = changes.generation.load(Ordering::SeqCst);
                match load(&lvm, &vgs) {
                    Ok(fresh) => {
                        let mut index = index.lock().unwrap_or_else(|p| p.into_inner());
                        if changes.running.load(Ordering::SeqCst) == 0
                            && changes.generation.load(Ordering::SeqCst) == before
                        {
                            index.merge_fresh(fresh);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot refresh the LVM index"),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no background LVM refresh");
        }
    }

    /// An LV by name; a miss is confirmed with one targeted `lvs` first (an
    /// LV may have been made by hand since the last refresh).
    fn lookup(&self, name: &str) -> Result<Option<Lv>> {
        if let Some(lv) = self.index().find(name) {
            return Ok(Some(lv.clone()));
        }
        let Some(lv) = self.fetch(&self.vgs, name)?.into_iter().next() else {
            return Ok(None);
        };
        tracing::info!(lv = name, "an LV unknown to the index was found; indexed");
        let mut index = self.index();
        if index.find(name).is_none() {
            index.insert(lv.clone());
        }
        Ok(Some(lv))
    }

    /// The LVs named `name` in `vgs`, asked of lvm2 (one `lvs`).
    fn fetch(&self, vgs: &[String], name: &str) -> Result<Vec<Lv>> {
        let rows = self.lvm.lv_segments(vgs, Some(name))?;
        let mut grouped: BTreeMap<(String, String), (LvRow, Vec<cli::SegRow>)> = BTreeMap::new();
        for row in rows {
            let (lv, seg) = row.split();
            grouped
                .entry((lv.vg_name.clone(), lv.lv_name.clone()))
                .or_insert_with(|| (lv, Vec::new()))
                .1
                .push(seg);
        }
        Ok(grouped
            .into_values()
            .map(|(row, segments)| Lv::new(row, &segments))
            .collect())
    }

    fn volume(&self, id: &VolumeId) -> Result<Option<(Lv, VolumeRecord)>> {
        Ok(self.lookup(id.as_str())?.and_then(|lv| {
            let record = lv.volume()?.clone();
            Some((lv, record))
        }))
    }

    /// Remove LVs whose creation was interrupted (pending, not being built).
    fn sweep(&self) -> Result<()> {
        let busy = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let debris: Vec<Lv> = self
            .index()
            .lvs()
            .filter(|lv| lv.kind == Kind::Pending && !busy.contains(&lv.row.lv_name))
            .cloned()
            .collect();
        for lv in debris {
            tracing::warn!(lv = %lv.row.lv_name, vg = %lv.row.vg_name, "removing the LV of an interrupted operation");
            let _change = self.changing();
            self.remove_lv(&lv)?;
        }
        Ok(())
    }

    /// device-mapper mode after a reboot: Kennel's volumes are active from
    /// creation to removal, so activate the ones that are not (one command).
    fn activate_all(&self) -> Result<()> {
        if !self.lvm.device_mapper() {
            return Ok(());
        }
        let inactive: Vec<String> = self
            .index()
            .lvs()
            .filter(|lv| lv.volume().is_some() && lv.row.lv_active != "active")
            .map(|lv| format!("{}/{}", lv.row.vg_name, lv.row.lv_name))
            .collect();
        if inactive.is_empty() {
            return Ok(());
        }
        let _change = self.changing();
        self.lvm
            .cmd("lvchange")
            .args(["-ay", "-K", "--"])
            .args(&inactive)
            .run()?;
        let mut index = self.index();
        for full in &inactive {
            if let Some((vg, name)) = full.split_once('/') {
                if let Some(lv) = index.get_mut(vg, name) {
                    lv.row.lv_active = "active".to_owned();
                }
            }
        }
        Ok(())
    }

    /// Zero an LV's extents, then remove it and forget it.
    fn remove_lv(&self, lv: &Lv) -> Result<()> {
        if !lv.missing {
            match self.bytes_of(lv) {
                Some(bytes) => data::zero_out(&bytes)?,
                None if lv.row.is_thin() => {}
                None => tracing::warn!(
                    lv = %lv.row.lv_name,
                    "cannot reach the LV's bytes; its extents return to the VG unzeroed"
                ),
            }
            let removed = self.lvm.change(
                self.lvm
                    .cmd("lvremove")
                    .args(["-y", "--"])
                    .arg(format!("{}/{}", lv.row.vg_name, lv.row.lv_name)),
            );
            match removed {
                Ok(_) | Err(Error::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.index().remove(&lv.row.vg_name, &lv.row.lv_name);
        Ok(())
    }

    /// Where an LV's bytes can be written without activating anything.
    fn bytes_of(&self, lv: &Lv) -> Option<ByteRange> {
        if self.lvm.device_mapper() {
            let device = lv_device(&lv.row);
            let reachable = lv.row.lv_active == "active" && !lv.row.is_thin() && device.exists();
            reachable.then_some(ByteRange {
                device,
                offset: 0,
                len: lv.row.lv_size,
            })
        } else {
            self.window(lv).ok().map(|(device, window)| ByteRange {
                device,
                offset: window.offset,
                len: window.size_limit,
            })
        }
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

    /// The thin pool a thin layout names, checked to exist.
    fn pool(&self, vg: &str, pool: &str) -> Result<LvRow> {
        let indexed = self
            .index()
            .get(vg, pool)
            .filter(|lv| !lv.missing)
            .map(|lv| lv.row.clone());
        let row = match indexed {
            Some(row) => Some(row),
            // A pool made since the last refresh (an admin adding a thin
            // class): confirmed with one targeted `lvs`, then indexed.
            None => self
                .fetch(&[vg.to_owned()], pool)?
                .into_iter()
                .next()
                .map(|lv| {
                    if lv.row.is_thin_pool() {
                        tracing::info!(
                            vg,
                            pool,
                            "a thin pool unknown to the index was found; indexed"
                        );
                        let mut index = self.index();
                        if index.get(vg, pool).is_none() {
                            index.insert(lv.clone());
                        }
                    }
                    lv.row
                }),
        };
        row.filter(LvRow::is_thin_pool).ok_or_else(|| {
            Error::invalid(format!(
                "parameter {:?}: no thin pool {pool:?} in volume group {vg:?}",
                params::THIN_POOL
            ))
        })
    }

    /// Room for more thin volumes in `pool`.
    fn thin_room(&self, pool: &LvRow) -> PoolCapacity {
        let provisioned: u64 = self
            .index()
            .lvs()
            .filter(|lv| {
                !lv.missing
                    && lv.row.vg_name == pool.vg_name
                    && lv.row.pool_lv == pool.lv_name
                    && lv.row.is_thin()
            })
            .map(|lv| lv.row.lv_size)
            .sum();
        thin_pool_room(pool, provisioned, self.ratio, self.granularity)
    }

    fn check_thin_room(&self, pool: &LvRow, extra: u64) -> Result<()> {
        let room = self.thin_room(pool);
        let limit = (pool.lv_size as f64 * self.ratio) as u64;
        if room.provisioned_bytes.saturating_add(extra) > limit {
            return Err(Error::Exhausted(format!(
                "thin pool {}/{} would promise {} bytes, more than {} x its {} bytes (--thin-overprovision-ratio)",
                pool.vg_name,
                pool.lv_name,
                room.provisioned_bytes + extra,
                self.ratio,
                pool.lv_size
            )));
        }
        Ok(())
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

    /// Mark an LV name as being built by this process until the guard drops.
    fn building(&self, name: &str) -> InFlight<'_> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
        InFlight {
            set: &self.in_flight,
            name: name.to_owned(),
        }
    }

    /// One `lvcreate` of a new LV carrying `tags` (and `pending` if asked),
    /// indexed on success. Without device-mapper a linear LV goes on a free
    /// run of extents picked here, so its place is known without asking
    /// lvm2; with it, the LV is created active and its size read from the
    /// device.
    fn lvcreate(&self, vg: &str, name: &str, size: u64, new: &New<'_>) -> Result<Lv> {
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        match self.try_lvcreate(vg, name, size, new) {
            // The extent map was stale (an LV made by hand): reload, retry once.
            Err(Error::Exhausted(_)) if !self.lvm.device_mapper() => {
                self.reload()?;
                self.try_lvcreate(vg, name, size, new)
            }
            other => other,
        }
    }

    fn try_lvcreate(&self, vg: &str, name: &str, size: u64, new: &New<'_>) -> Result<Lv> {
        let dm = self.lvm.device_mapper();
        // lvm2 accepts --zero only for linear LVs and thin pools: a thin volume or thin
        // snapshot given -Zn is refused, so -Zn goes on the linear layouts alone.
        let mut cmd = self
            .lvm
            .cmd("lvcreate")
            .args([if dm { "-ay" } else { "-an" }, "-y"]);
        let mut placed: Option<PeRange> = None;
        let mut segtype = "linear";
        let mut pool_lv = String::new();
        // A new LV is blank: no signatures to wipe (lvm2 refuses -Wn on snapshots).
        if new.origin.is_none() {
            cmd = cmd.arg("-Wn");
        }
        match (&new.layout, new.origin) {
            (_, Some(origin)) => {
                // A thin snapshot of a thin origin (shares its blocks).
                cmd = cmd
                    .args(["-s", "-kn", "-n"])
                    .arg(name)
                    .arg(format!("{}/{}", origin.row.vg_name, origin.row.lv_name));
                segtype = "thin";
                pool_lv = origin.row.pool_lv.clone();
            }
            (Layout::Thin { pool }, None) => {
                cmd = cmd
                    .arg("-V")
                    .arg(format!("{size}b"))
                    .arg("-T")
                    .arg(format!("{vg}/{pool}"))
                    .arg("-n")
                    .arg(name);
                segtype = "thin";
                pool_lv = pool.clone();
            }
            (Layout::Linear, None) if !dm && new.stripes.is_none_or(|n| n == 1) => {
                let extent = self.extent_size(vg)?;
                let count = size.div_ceil(extent);
                let range = self.index().take_contiguous(vg, count).ok_or_else(|| {
                    Error::Exhausted(format!(
                        "volume group {vg} has no free run of {count} extents (without device-mapper a volume needs contiguous space)"
                    ))
                })?;
                cmd = cmd
                    .arg("-Zn")
                    .arg("-l")
                    .arg(count.to_string())
                    .args(["--alloc", "contiguous", "-n"])
                    .arg(name)
                    .arg(vg)
                    .arg(format!(
                        "{}:{}-{}",
                        range.pv.display(),
                        range.first,
                        range.first + count - 1
                    ));
                placed = Some(range);
            }
            (Layout::Linear, None) => {
                cmd = cmd.arg("-Zn").arg("-L").arg(format!("{size}b"));
                if let Some(stripes) = new.stripes {
                    cmd = cmd.arg("-i").arg(stripes.to_string());
                    if stripes > 1 {
                        segtype = "striped";
                    }
                }
                if let Some(stripe_size) = new.stripe_size {
                    cmd = cmd.arg("-I").arg(format!("{}k", stripe_size / 1024));
                }
                cmd = cmd.arg("-n").arg(name).arg(vg);
            }
        }
        let cmd = add_tags(cmd, new.tags, new.pending);
        if let Err(e) = self.lvm.change(cmd) {
            if let Some(range) = &placed {
                self.index().give_back(vg, range);
            }
            return Err(e);
        }
        let mut lv_tags = new.tags.to_vec();
        if new.pending {
            lv_tags.push(tags::PENDING.to_owned());
        }
        let mut row = LvRow {
            lv_name: name.to_owned(),
            vg_name: vg.to_owned(),
            lv_size: size,
            lv_tags,
            lv_attr: String::new(),
            segtype: segtype.to_owned(),
            pool_lv,
            origin: new
                .origin
                .map(|o| o.row.lv_name.clone())
                .unwrap_or_default(),
            lv_active: if dm { "active" } else { "" }.to_owned(),
            lv_path: format!("/dev/{vg}/{name}"),
            data_percent: None,
            lv_health_status: String::new(),
        };
        let lv = match placed {
            Some(range) => {
                row.lv_size = range.count * self.extent_size(vg)?;
                let mut lv = Lv::new(row, &[]);
                lv.place = Ok(range);
                lv
            }
            None if dm && new.origin.is_some_and(|o| o.row.is_thin()) => {
                // Thin snapshots skip activation unless asked; the size is the origin's.
                row.lv_size = new.origin.map_or(size, |o| o.row.lv_size);
                row.lv_active = "active".to_owned();
                let mut lv = Lv::new(row, &[]);
                lv.place = Err("a thin LV".to_owned());
                lv
            }
            None if dm => {
                let device = lv_device(&row);
                wait_for(&device)?;
                row.lv_size = device_size(&device)?;
                let mut lv = Lv::new(row, &[]);
                lv.place = Err("placed by lvm2".to_owned());
                lv
            }
            None => {
                // Placed by lvm2 without device-mapper (striped): ask where.
                return self.lookup_fresh(vg, name)?.ok_or_else(|| {
                    Error::Internal(format!("{vg}/{name} vanished after lvcreate"))
                });
            }
        };
        let mut index = self.index();
        if placed_by_lvm(&lv) && !lv.row.is_thin() {
            let extent = index.vg(vg).map_or(1, |v| v.extent_size);
            index.take_extents(vg, lv.row.lv_size.div_ceil(extent));
        }
        index.insert(lv.clone());
        Ok(lv)
    }

    /// Re-read one LV from lvm2 and index it.
    fn lookup_fresh(&self, vg: &str, name: &str) -> Result<Option<Lv>> {
        self.reload()?;
        Ok(self.index().get(vg, name).cloned())
    }

    fn extent_size(&self, vg: &str) -> Result<u64> {
        self.index()
            .vg(vg)
            .map(|v| v.extent_size)
            .ok_or_else(|| Error::Precondition(format!("volume group {vg:?} not found")))
    }

    /// Remove the `pending` tag: the LV is complete.
    fn commit(&self, lv: &Lv) -> Result<()> {
        self.lvm.change(
            self.lvm
                .cmd("lvchange")
                .args(["--deltag", tags::PENDING, "--"])
                .arg(format!("{}/{}", lv.row.vg_name, lv.row.lv_name)),
        )?;
        let mut done = lv.clone();
        done.row.lv_tags.retain(|t| t != tags::PENDING);
        let place = done.place.clone();
        done = Lv::new(done.row, &[]);
        done.place = place;
        self.index().insert(done);
        Ok(())
    }

    /// Run `work` with the LV's bytes reachable: its active device-mapper
    /// device (activated first if needed), or its PV range.
    fn with_bytes<T>(&self, lv: &Lv, work: impl FnOnce(&ByteRange) -> Result<T>) -> Result<T> {
        if self.lvm.device_mapper() {
            if lv.row.lv_active != "active" {
                self.activate(lv)?;
            }
            let device = lv_device(&lv.row);
            wait_for(&device)?;
            work(&ByteRange {
                device,
                offset: 0,
                len: lv.row.lv_size,
            })
        } else {
            let (device, window) = self.window(lv)?;
            work(&ByteRange {
                device,
                offset: window.offset,
                len: window.size_limit,
            })
        }
    }

    fn activate(&self, lv: &Lv) -> Result<()> {
        self.lvm
            .cmd("lvchange")
            .args(["-ay", "-K", "--"])
            .arg(format!("{}/{}", lv.row.vg_name, lv.row.lv_name))
            .run()?;
        if let Some(indexed) = self.index().get_mut(&lv.row.vg_name, &lv.row.lv_name) {
            indexed.row.lv_active = "active".to_owned();
        }
        Ok(())
    }

    /// The PV and byte window holding a contiguous linear LV.
    fn window(&self, lv: &Lv) -> Result<(PathBuf, Window)> {
        if lv.missing {
            return Err(Error::Precondition(format!(
                "logical volume {}/{} is missing (removed outside Kennel)",
                lv.row.vg_name, lv.row.lv_name
            )));
        }
        let (pv, offset, len) = self.index().window(lv).map_err(|why| {
            Error::Precondition(format!(
                "{}/{} cannot be used without device-mapper: {why}",
                lv.row.vg_name, lv.row.lv_name
            ))
        })?;
        let device = fs::canonicalize(&pv).ctx("resolve", &pv)?;
        Ok((
            device,
            Window {
                offset,
                size_limit: len,
            },
        ))
    }

    fn window_attachment(&self, lv: &Lv) -> Result<Option<PathBuf>> {
        let (pv, window) = self.window(lv)?;
        Ok(self
            .window_device(&pv, window.offset)
            .map(|(device, _)| device))
    }

    /// The loop device over `pv` at `offset`, and its current window.
    fn window_device(&self, pv: &Path, offset: u64) -> Option<(PathBuf, Window)> {
        self.windows.find(pv).into_iter().find_map(|device| {
            let current = loopdev::window_of_node(&device)?;
            (current.offset == offset).then_some((device, current))
        })
    }

    /// The loop device already exposing the LV at `window.offset` of `pv`,
    /// its size limit brought up to date (the LV may have grown since).
    fn current_window(&self, pv: &Path, window: Window) -> Result<Option<PathBuf>> {
        let Some((device, current)) = self.window_device(pv, window.offset) else {
            return Ok(None);
        };
        if current.size_limit != window.size_limit {
            loopdev::set_window(&device, window)?;
        }
        Ok(Some(device))
    }

    /// Copy a source LV's data into `dst`; a mounted source volume is
    /// frozen meanwhile so the copy is consistent.
    fn copy_into(&self, src: &Lv, dst: &Lv) -> Result<()> {
        let mounted = if src.volume().is_some() {
            match self.attached_lv_device(src)? {
                Some(device) => mount::mount_point_of(&device)?,
                None => None,
            }
        } else {
            None
        };
        let copy = || {
            self.with_bytes(src, |from| {
                self.with_bytes(dst, |to| {
                    data::copy(from, to)?;
                    data::wipe_signatures(to, from.len)
                })
            })
        };
        match mounted {
            Some(point) => freeze::while_frozen(&point, copy),
            None => copy(),
        }?;
        self.lvm.step();
        Ok(())
    }

    fn staged_marker(&self, lv: &Lv) -> PathBuf {
        self.staged_dir
            .join(format!("{}_{}", lv.row.vg_name, lv.row.lv_name))
    }

    fn attached_lv_device(&self, lv: &Lv) -> Result<Option<PathBuf>> {
        if self.lvm.device_mapper() {
            let device = lv_device(&lv.row);
            Ok((self.staged_marker(lv).exists() && device.exists()).then_some(device))
        } else {
            match self.window_attachment(lv) {
                Ok(found) => Ok(found),
                // An LV that cannot have a window has no attachment either.
                Err(Error::Precondition(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
    }

    /// The LV a content source names (Kennel's, complete).
    fn source_lv(&self, source: &ContentSource) -> Result<Lv> {
        let (name, missing) = match source {
            ContentSource::Snapshot(id) => (
                id.as_str(),
                Error::NotFound(format!("snapshot {id} not found")),
            ),
            ContentSource::Volume(id) => (id.as_str(), Error::VolumeNotFound(id.to_string())),
        };
        self.lookup(name)?
            .filter(|lv| !lv.missing && matches!(lv.kind, Kind::Volume(_) | Kind::Snapshot(_)))
            .ok_or(missing)
    }

    /// Build a new LV `name` of `size` bytes as a copy of `source`.
    /// Afterwards it exists completely (tags without `pending`) or not at all.
    fn build_copy(
        &self,
        vg: &str,
        name: &str,
        size: u64,
        params: &LvmParams,
        source: &Lv,
        tag_list: &[String],
    ) -> Result<()> {
        if let Layout::Thin { .. } = params.layout {
            self.require_device_mapper("a thin volume")?;
        }
        if source.row.is_thin() {
            self.require_device_mapper("copying a thin volume or snapshot")?;
        }
        let _building = self.building(name);
        self.sweep()?;
        if let Layout::Thin { pool } = &params.layout {
            let pool_row = self.pool(vg, pool)?;
            self.check_thin_room(&pool_row, size)?;
        }
        let new = |pending, origin| New {
            layout: params.layout.clone(),
            stripes: params.stripes,
            stripe_size: params.stripe_size,
            tags: tag_list,
            pending,
            origin,
        };
        // Thin origin in the same pool: a thin snapshot shares its blocks.
        if let Layout::Thin { pool } = &params.layout {
            if source.row.is_thin() && source.row.vg_name == vg && &source.row.pool_lv == pool {
                let grow = size > source.row.lv_size;
                let lv = self.lvcreate(vg, name, size, &new(grow, Some(source)))?;
                if grow {
                    return self.finish(&lv, |lv| {
                        self.lvm.change(
                            self.lvm
                                .cmd("lvextend")
                                .arg("-L")
                                .arg(format!("{size}b"))
                                .arg("--")
                                .arg(format!("{}/{}", lv.row.vg_name, lv.row.lv_name)),
                        )?;
                        self.reload()
                    });
                }
                return Ok(());
            }
        }
        if !self.lvm.device_mapper() {
            // Fail before allocating anything.
            self.window(source)?;
        }
        let lv = self.lvcreate(vg, name, size, &new(true, None))?;
        self.finish(&lv, |dst| self.copy_into(source, dst))
    }

    /// Fill a pending LV with `fill`, then commit it; remove it on failure.
    fn finish(&self, lv: &Lv, fill: impl FnOnce(&Lv) -> Result<()>) -> Result<()> {
        let done = fill(lv).and_then(|()| {
            let current = self
                .index()
                .get(&lv.row.vg_name, &lv.row.lv_name)
                .cloned()
                .unwrap_or_else(|| lv.clone());
            self.commit(&current)
        });
        if let Err(e) = &done {
            tracing::warn!(lv = %lv.row.lv_name, error = %e, "removing a partly built LV");
            if let Err(cleanup) = self.remove_lv(lv) {
                tracing::error!(lv = %lv.row.lv_name, error = %cleanup, "cannot remove a partly built LV; the next start will");
            }
        }
        done
    }
}

/// What a new LV is made of.
struct New<'a> {
    layout: Layout,
    stripes: Option<u32>,
    stripe_size: Option<u64>,
    tags: &'a [String],
    pending: bool,
    /// A thin snapshot of this thin LV.
    origin: Option<&'a Lv>,
}

fn placed_by_lvm(lv: &Lv) -> bool {
    lv.place.is_err()
}

/// Read the three reports of one index round.
fn load(lvm: &Lvm, vgs: &[String]) -> Result<Index> {
    let vg_rows = lvm.vgs(vgs)?;
    let pvsegs = lvm.pv_segments(vgs)?;
    let lvsegs = lvm.lv_segments(vgs, None)?;
    Ok(Index::build(vg_rows, pvsegs, lvsegs))
}

/// Removes an LV name from the in-flight set when the build ends.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<String>>,
    name: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.name);
    }
}

fn add_tags(mut cmd: cli::LvmCmd, tag_list: &[String], pending: bool) -> cli::LvmCmd {
    for tag in tag_list {
        cmd = cmd.arg("--addtag").arg(tag);
    }
    if pending {
        cmd = cmd.arg("--addtag").arg(tags::PENDING);
    }
    cmd
}

fn lv_device(row: &LvRow) -> PathBuf {
    if row.lv_path.is_empty() {
        PathBuf::from(format!("/dev/{}/{}", row.vg_name, row.lv_name))
    } else {
        PathBuf::from(&row.lv_path)
    }
}

/// A block device's size in bytes.
fn device_size(device: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(device).ctx("open", device)?;
    file.seek(SeekFrom::End(0)).ctx("size", device)
}

/// Wait (briefly) for a device node lvm2 or udev is creating.
fn wait_for(device: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !device.exists() {
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "{} did not appear after activation",
                device.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// What a thin pool can still take: the smaller of its free data space and
/// what the overprovisioning ratio leaves to promise. A pool lvm2 reports
/// unhealthy (out of data, metadata full and read-only, failed) takes
/// nothing, whatever its data fill says.
fn thin_pool_room(pool: &LvRow, provisioned: u64, ratio: f64, granularity: u64) -> PoolCapacity {
    let used = pool.data_percent.unwrap_or(0.0).clamp(0.0, 100.0);
    let physical_free = if pool.lv_health_status.is_empty() {
        (pool.lv_size as f64 * (100.0 - used) / 100.0) as u64
    } else {
        0
    };
    let promise_limit = (pool.lv_size as f64 * ratio) as u64;
    PoolCapacity {
        total_bytes: pool.lv_size,
        available_bytes: round_down(
            physical_free.min(promise_limit.saturating_sub(provisioned)),
            granularity,
        ),
        provisioned_bytes: provisioned,
    }
}

fn round_down(bytes: u64, granularity: u64) -> u64 {
    bytes / granularity * granularity
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

impl Backend for LvmBackend {
    fn kind(&self) -> &'static str {
        "lvm"
    }

    fn granularity(&self) -> u64 {
        self.granularity
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        // BTreeMap order is (VG, name); the contract is by ID.
        let mut all: Vec<VolumeRecord> = self
            .index()
            .lvs()
            .filter_map(|lv| lv.volume().cloned())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn get(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        Ok(self.volume(id)?.map(|(_, r)| r))
    }

    fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        Ok(self
            .index()
            .lvs()
            .filter_map(Lv::volume)
            .find(|r| r.name == name)
            .cloned())
    }

    fn create(&self, record: &VolumeRecord) -> Result<()> {
        let params = LvmParams::parse(&record.params.backend)?;
        let vg = self.class(&params)?.vg.clone();
        let name = record.id.as_str();
        let _change = self.changing();
        if self
            .index()
            .get(&vg, name)
            .is_some_and(|lv| lv.volume().is_some())
        {
            return Ok(());
        }
        let tag_list = tags::encode(record)?;
        metadata::ensure_room(&self.index, &self.lvm, &vg, &tag_list)?;
        match &record.source {
            Some(source) => {
                let source = self.source_lv(source)?;
                self.build_copy(
                    &vg,
                    name,
                    record.capacity_bytes,
                    &params,
                    &source,
                    &tag_list,
                )?;
            }
            None => {
                if let Layout::Thin { pool } = &params.layout {
                    self.require_device_mapper("a thin volume")?;
                    let pool = self.pool(&vg, pool)?;
                    self.check_thin_room(&pool, record.capacity_bytes)?;
                }
                // Free extents read as zeros (see the module notes): one
                // command creates the volume, complete.
                self.lvcreate(
                    &vg,
                    name,
                    record.capacity_bytes,
                    &New {
                        layout: params.layout.clone(),
                        stripes: params.stripes,
                        stripe_size: params.stripe_size,
                        tags: &tag_list,
                        pending: false,
                        origin: None,
                    },
                )?;
            }
        }
        if let Some(limit) = Some(record.requested.limit).filter(|l| *l != 0) {
            // Stripes round sizes up to whole stripes.
            let created = self.index().get(&vg, name).cloned();
            if let Some(lv) = created {
                if lv.row.lv_size > limit {
                    let _ = self.remove_lv(&lv);
                    return Err(Error::OutOfRange(format!(
                        "the layout rounds the volume up to {} bytes, above the limit of {limit} bytes",
                        lv.row.lv_size
                    )));
                }
            }
        }
        Ok(())
    }

    fn delete(&self, id: &VolumeId) -> Result<()> {
        let Some((lv, _)) = self.volume(id)? else {
            // Absent, foreign or pending (swept at the next start).
            return Ok(());
        };
        let _change = self.changing();
        if let Some(device) = self.attached_lv_device(&lv)? {
            return Err(Error::Precondition(format!(
                "volume {id} is staged on this node ({}); unstage it first",
                device.display()
            )));
        }
        self.remove_lv(&lv)
    }

    fn expand(&self, id: &VolumeId, new_size: u64) -> Result<VolumeRecord> {
        let (lv, record) = self
            .volume(id)?
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if new_size <= lv.row.lv_size {
            return Ok(record);
        }
        let _change = self.changing();
        if lv.row.is_thin() {
            let pool = self.pool(&lv.row.vg_name, &lv.row.pool_lv)?;
            self.check_thin_room(&pool, new_size - lv.row.lv_size)?;
        }
        let mut cmd = self
            .lvm
            .cmd("lvextend")
            .arg("-L")
            .arg(format!("{new_size}b"));
        if !self.lvm.device_mapper() && lv.row.segtype == "linear" {
            // Keep the LV in one PV range, or it could not be attached here.
            cmd = cmd.args(["--alloc", "contiguous"]);
        }
        let cmd = cmd
            .arg("--")
            .arg(format!("{}/{}", lv.row.vg_name, lv.row.lv_name));
        self.lvm.change(cmd).map_err(|e| match e {
            Error::Exhausted(msg) if !self.lvm.device_mapper() => Error::Exhausted(format!(
                "{msg} (without device-mapper a volume grows only into the free extents right after it)"
            )),
            other => other,
        })?;
        // Rare: learn the new extents from lvm2 rather than compute them.
        self.reload()?;
        self.volume(id)?
            .map(|(_, r)| r)
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))
    }

    fn capacity(&self, raw: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        let params = LvmParams::parse(raw)?;
        let vg = self.class(&params)?.vg.clone();
        match &params.layout {
            Layout::Linear => {
                let index = self.index();
                let v = index
                    .vg(&vg)
                    .ok_or_else(|| Error::Precondition(format!("volume group {vg:?} not found")))?;
                let free = v.free_extents * v.extent_size;
                Ok(PoolCapacity {
                    total_bytes: v.size,
                    available_bytes: round_down(free, self.granularity),
                    provisioned_bytes: v.size.saturating_sub(free),
                })
            }
            Layout::Thin { pool } => {
                let mut pool = self.pool(&vg, pool)?;
                // The pool fills as volumes are written, which no index sees:
                // ask for its fill now (one `lvs` of the pool alone).
                let path = format!("{}/{}", pool.vg_name, pool.lv_name);
                let Some(now) = self
                    .lvm
                    .lvs(std::slice::from_ref(&path))?
                    .into_iter()
                    .next()
                else {
                    return Err(Error::Precondition(format!(
                        "thin pool {path} is gone (removed outside Kennel)"
                    )));
                };
                pool.data_percent = now.data_percent;
                pool.lv_health_status = now.lv_health_status;
                Ok(self.thin_room(&pool))
            }
        }
    }

    fn check_params(&self, raw: &BTreeMap<String, String>) -> Result<()> {
        let params = LvmParams::parse(raw)?;
        self.class(&params)?;
        Ok(())
    }

    fn create_snapshot(&self, snapshot: &SnapshotRecord) -> Result<()> {
        let _change = self.changing();
        if self.index().find(snapshot.id.as_str()).is_some() {
            return Ok(());
        }
        let (src, record) = self
            .volume(&snapshot.source_volume)?
            .ok_or_else(|| Error::VolumeNotFound(snapshot.source_volume.to_string()))?;
        let tag_list = tags::encode(snapshot)?;
        metadata::ensure_room(&self.index, &self.lvm, &src.row.vg_name, &tag_list)?;
        let name = snapshot.id.as_str();
        if src.row.is_thin() {
            let _building = self.building(name);
            let cmd = self
                .lvm
                .cmd("lvcreate")
                .args(["-s", "-y", "-n"])
                .arg(name)
                .arg(format!("{}/{}", src.row.vg_name, src.row.lv_name));
            self.lvm.change(add_tags(cmd, &tag_list, false))?;
            self.reload()?;
            return Ok(());
        }
        // A linear volume: a full copy into a linear LV of its size.
        let mut params = LvmParams::parse(&record.params.backend)?;
        params.layout = Layout::Linear;
        params.stripes = None;
        params.stripe_size = None;
        self.build_copy(
            &src.row.vg_name.clone(),
            name,
            src.row.lv_size,
            &params,
            &src,
            &tag_list,
        )
    }

    fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        match self.lookup(id.as_str())? {
            Some(lv) if lv.snapshot().is_some() => {
                let _change = self.changing();
                self.remove_lv(&lv)
            }
            _ => Ok(()),
        }
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut all: Vec<SnapshotRecord> = self
            .index()
            .lvs()
            .filter_map(|lv| lv.snapshot().cloned())
            .collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .lookup(id.as_str())?
            .and_then(|lv| lv.snapshot().cloned()))
    }

    fn find_snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .index()
            .lvs()
            .filter_map(Lv::snapshot)
            .find(|s| s.name == name)
            .cloned())
    }

    fn attach(&self, id: &VolumeId) -> Result<PathBuf> {
        let (lv, _) = self
            .volume(id)?
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if self.lvm.device_mapper() {
            if lv.missing {
                return Err(Error::Precondition(format!(
                    "logical volume {}/{} is missing (removed outside Kennel)",
                    lv.row.vg_name, lv.row.lv_name
                )));
            }
            if lv.row.lv_active != "active" {
                self.activate(&lv)?;
            }
            let device = lv_device(&lv.row);
            wait_for(&device)?;
            fs::create_dir_all(&self.staged_dir).ctx("create", &self.staged_dir)?;
            let marker = self.staged_marker(&lv);
            File::create(&marker).ctx("create", &marker)?;
            return Ok(device);
        }
        let (pv, window) = self.window(&lv)?;
        match self.current_window(&pv, window)? {
            Some(device) => Ok(device),
            None => self.windows.attach(&pv, window),
        }
    }

    fn detach(&self, id: &VolumeId) -> Result<()> {
        let Some((lv, _)) = self.volume(id)? else {
            return Ok(());
        };
        if self.lvm.device_mapper() {
            // The LV stays active until it is removed.
            let marker = self.staged_marker(&lv);
            return match fs::remove_file(&marker) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io("remove", marker, e))
                }
                _ => Ok(()),
            };
        }
        let (pv, window) = match self.window(&lv) {
            Ok(found) => found,
            // An LV that cannot have a window has no attachment either.
            Err(Error::Precondition(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some((device, _)) = self.window_device(&pv, window.offset) {
            self.windows.detach(&pv, &device)?;
        }
        Ok(())
    }

    fn attached_device(&self, id: &VolumeId) -> Result<Option<PathBuf>> {
        match self.volume(id)? {
            Some((lv, _)) => self.attached_lv_device(&lv),
            None => Ok(None),
        }
    }

    fn refresh_device(&self, id: &VolumeId) -> Result<()> {
        if self.lvm.device_mapper() {
            // device-mapper devices change size with the LV.
            return Ok(());
        }
        let Some((lv, _)) = self.volume(id)? else {
            return Ok(());
        };
        let (pv, window) = self.window(&lv)?;
        self.current_window(&pv, window).map(drop)
    }

    fn health(&self, record: &VolumeRecord) -> Option<String> {
        let index = self.index();
        let Some(lv) = index.find(record.id.as_str()) else {
            return Some(format!("logical volume {} is missing", record.id));
        };
        if lv.missing {
            return Some(format!(
                "logical volume {}/{} is missing (removed outside Kennel)",
                lv.row.vg_name, lv.row.lv_name
            ));
        }
        if !lv.row.lv_health_status.is_empty() {
            return Some(format!(
                "logical volume {}/{} reports {}",
                lv.row.vg_name, lv.row.lv_name, lv.row.lv_health_status
            ));
        }
        None
    }

    fn default_fs_type(&self, record: &VolumeRecord) -> Option<FsType> {
        LvmParams::parse(&record.params.backend)
            .ok()
            .and_then(|p| p.fs_type)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(data_percent: Option<f64>, health: &str) -> LvRow {
        LvRow {
            lv_name: "pool".into(),
            vg_name: "vg".into(),
            lv_size: 1 << 30,
            lv_tags: vec![],
            lv_attr: "twi-aotz--".into(),
            segtype: "thin-pool".into(),
            pool_lv: String::new(),
            origin: String::new(),
            lv_active: "active".into(),
            lv_path: String::new(),
            data_percent,
            lv_health_status: health.into(),
        }
    }

    #[test]
    fn thin_room_is_the_smaller_of_free_data_and_what_is_left_to_promise() {
        const MIB: u64 = 1 << 20;
        // A quarter written, nothing promised: the free data space.
        let room = thin_pool_room(&pool(Some(25.0), ""), 0, 2.0, MIB);
        assert_eq!(room.available_bytes, 768 * MIB);
        // Promises near the ratio's limit: what is left to promise.
        let room = thin_pool_room(&pool(Some(25.0), ""), 1900 * MIB, 2.0, MIB);
        assert_eq!(room.available_bytes, 148 * MIB);
        assert_eq!(room.provisioned_bytes, 1900 * MIB);
        // Promised past the limit (a ratio lowered since): nothing, not an underflow.
        let room = thin_pool_room(&pool(Some(0.0), ""), 3 << 30, 2.0, MIB);
        assert_eq!(room.available_bytes, 0);
    }

    #[test]
    fn an_unhealthy_thin_pool_has_no_room() {
        for health in ["out_of_data", "metadata_read_only", "failed"] {
            let room = thin_pool_room(&pool(Some(10.0), health), 0, 1.0, 1 << 20);
            assert_eq!(room.available_bytes, 0, "{health}");
            assert_eq!(room.total_bytes, 1 << 30);
        }
    }
}
