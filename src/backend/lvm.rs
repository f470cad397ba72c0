//! The LVM backend: one LV per volume in a volume group (one VG per device
//! class), driven through lvm2's own tools.
//!
//! All state is in LV tags (see `tags`): listing, lookups by name, capacity
//! and recovery after a restart read `lvs`/`vgs`; Kennel keeps no other copy
//! and never touches an LV without its owner tag.
//!
//! With device-mapper, the node side activates the LV (`lvchange -ay`) and
//! uses `/dev/VG/LV`. Without it (`--lvm-activation loop`, automatic when
//! `/dev/mapper/control` cannot be opened), lvm2 runs with `--driverloaded n` and
//! only edits metadata; a linear LV is then allocated contiguously and exposed
//! through a loop device over its byte range of the PV. Thin LVs and scattered
//! or striped LVs need device-mapper.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use super::{Backend, ContentSource, PoolCapacity, SnapshotRecord, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::node::loopdev::{self, Window};
use crate::node::{freeze, mount};
use crate::volume::spec::FsType;
use crate::volume::{SnapshotId, VolumeId};

pub mod cli;
pub mod data;
pub mod params;
pub mod tags;

use cli::{LvRow, Lvm};
use data::ByteRange;
use params::{DeviceClass, Layout, LvmParams};
use tags::Decoded;

/// How the node side reaches an LV's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Activation {
    /// `dm` when the kernel has device-mapper, `loop` otherwise.
    Auto,
    /// device-mapper: `lvchange -ay`, `/dev/VG/LV`.
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
    /// Where the per-VG lock files live.
    pub lock_dir: PathBuf,
}

pub struct LvmBackend {
    lvm: Lvm,
    classes: Vec<DeviceClass>,
    vgs: Vec<String>,
    granularity: u64,
    ratio: f64,
    /// LVs this process is building right now (pending on purpose).
    in_flight: Mutex<HashSet<String>>,
    /// The last full listing, for health checks in bulk (ListVolumes).
    recent: Mutex<Option<(Instant, Vec<LvRow>)>>,
    _locks: Vec<Flock<File>>,
}

const HEALTH_CACHE: Duration = Duration::from_secs(2);

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
        vgs.dedup();
        let rows = lvm.vgs(&vgs).map_err(|e| {
            Error::Precondition(format!("volume group(s) {} unusable: {e}", vgs.join(", ")))
        })?;
        for vg in &vgs {
            if !rows.iter().any(|r| &r.vg_name == vg) {
                return Err(Error::Precondition(format!(
                    "volume group {vg:?} not found"
                )));
            }
        }
        let granularity = rows
            .iter()
            .map(|r| r.vg_extent_size)
            .max()
            .unwrap_or(4 << 20)
            .max(crate::volume::capacity::MIB);
        if !granularity.is_power_of_two() {
            return Err(Error::Precondition(format!(
                "extent size {granularity} is not a power of two"
            )));
        }
        let locks = vgs
            .iter()
            .map(|vg| lock_vg(&config.lock_dir, vg))
            .collect::<Result<Vec<_>>>()?;
        let backend = LvmBackend {
            lvm,
            classes: config.classes,
            vgs,
            granularity,
            ratio: config.thin_overprovision_ratio,
            in_flight: Mutex::new(HashSet::new()),
            recent: Mutex::new(None),
            _locks: locks,
        };
        tracing::info!(
            vgs = %backend.vgs.join(","),
            device_mapper = backend.lvm.device_mapper(),
            "lvm backend ready"
        );
        backend.sweep()?;
        Ok(backend)
    }

    fn rows(&self) -> Result<Vec<LvRow>> {
        let rows = self.lvm.lvs(&self.vgs)?;
        *self.recent.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), rows.clone()));
        Ok(rows)
    }

    fn row(&self, name: &str) -> Result<Option<LvRow>> {
        Ok(self.rows()?.into_iter().find(|r| r.lv_name == name))
    }

    /// Remove LVs whose creation was interrupted (pending, not being built).
    fn sweep(&self) -> Result<()> {
        let busy = self
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for row in self.rows()? {
            if tags::is_owned(&row.lv_tags)
                && row.lv_tags.iter().any(|t| t == tags::PENDING)
                && !busy.contains(&row.lv_name)
            {
                tracing::warn!(lv = %row.lv_name, vg = %row.vg_name, "removing the LV of an interrupted operation");
                self.remove_lv(&row)?;
            }
        }
        Ok(())
    }

    fn remove_lv(&self, row: &LvRow) -> Result<()> {
        self.lvm.change(
            self.lvm
                .cmd("lvremove")
                .args(["-y", "--"])
                .arg(format!("{}/{}", row.vg_name, row.lv_name)),
        )?;
        Ok(())
    }

    fn volumes(&self) -> Result<Vec<(LvRow, VolumeRecord)>> {
        Ok(self.rows()?.into_iter().filter_map(volume_of).collect())
    }

    fn volume(&self, id: &VolumeId) -> Result<Option<(LvRow, VolumeRecord)>> {
        Ok(self.row(id.as_str())?.and_then(volume_of))
    }

    fn snapshots(&self) -> Result<Vec<(LvRow, SnapshotRecord)>> {
        Ok(self.rows()?.into_iter().filter_map(snapshot_of).collect())
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
    fn pool(&self, vg: &str, pool: &str, rows: &[LvRow]) -> Result<LvRow> {
        rows.iter()
            .find(|r| r.vg_name == vg && r.lv_name == pool && r.is_thin_pool())
            .cloned()
            .ok_or_else(|| {
                Error::invalid(format!(
                    "parameter {:?}: no thin pool {pool:?} in volume group {vg:?}",
                    params::THIN_POOL
                ))
            })
    }

    /// Room for `extra` more bytes of thin volumes in `pool`.
    fn thin_room(&self, pool: &LvRow, rows: &[LvRow]) -> PoolCapacity {
        let provisioned: u64 = rows
            .iter()
            .filter(|r| r.vg_name == pool.vg_name && r.pool_lv == pool.lv_name && r.is_thin())
            .map(|r| r.lv_size)
            .sum();
        let used = pool.data_percent.unwrap_or(0.0).clamp(0.0, 100.0);
        let physical_free = (pool.lv_size as f64 * (100.0 - used) / 100.0) as u64;
        let promise_limit = (pool.lv_size as f64 * self.ratio) as u64;
        PoolCapacity {
            total_bytes: pool.lv_size,
            available_bytes: round_down(
                physical_free.min(promise_limit.saturating_sub(provisioned)),
                self.granularity,
            ),
            provisioned_bytes: provisioned,
        }
    }

    fn check_thin_room(&self, pool: &LvRow, rows: &[LvRow], extra: u64) -> Result<()> {
        let room = self.thin_room(pool, rows);
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

    /// `lvcreate` of a new, inactive LV with `tags` (and `pending` if asked).
    fn lvcreate_new(
        &self,
        vg: &str,
        name: &str,
        size: u64,
        params: &LvmParams,
        tags: &[String],
        pending: bool,
    ) -> Result<()> {
        let mut cmd = self.lvm.cmd("lvcreate").args(["-an", "-Wn", "-y"]);
        match &params.layout {
            Layout::Linear => {
                // An inactive LV cannot be zeroed; lvm2 refuses -Z on thin volumes.
                cmd = cmd.arg("-Zn").arg("-L").arg(format!("{size}b"));
                if let Some(stripes) = params.stripes {
                    cmd = cmd.arg("-i").arg(stripes.to_string());
                }
                if let Some(stripe_size) = params.stripe_size {
                    cmd = cmd.arg("-I").arg(format!("{}k", stripe_size / 1024));
                }
                if !self.lvm.device_mapper() && !params.striped() {
                    cmd = cmd.args(["--alloc", "contiguous"]);
                }
                cmd = cmd.arg("-n").arg(name);
                cmd = cmd.arg(vg);
            }
            Layout::Thin { pool } => {
                cmd = cmd
                    .arg("-V")
                    .arg(format!("{size}b"))
                    .arg("-T")
                    .arg(format!("{vg}/{pool}"))
                    .arg("-n")
                    .arg(name);
            }
        }
        self.lvm.change(add_tags(cmd, tags, pending))?;
        Ok(())
    }

    fn commit(&self, vg: &str, name: &str) -> Result<()> {
        self.lvm.change(
            self.lvm
                .cmd("lvchange")
                .args(["--deltag", tags::PENDING, "--"])
                .arg(format!("{vg}/{name}")),
        )?;
        Ok(())
    }

    /// Run `work` with the LV's bytes reachable: device-mapper activation
    /// (undone afterwards if it was inactive), or its PV range.
    fn with_bytes<T>(&self, row: &LvRow, work: impl FnOnce(&ByteRange) -> Result<T>) -> Result<T> {
        if self.lvm.device_mapper() {
            let was_active = row.lv_active == "active";
            if !was_active {
                self.activate(row)?;
            }
            let device = lv_device(row);
            let result = wait_for(&device).and_then(|()| {
                work(&ByteRange {
                    device: device.clone(),
                    offset: 0,
                    len: row.lv_size,
                })
            });
            if !was_active {
                let deactivated = self.deactivate(row);
                if result.is_ok() {
                    deactivated?;
                }
            }
            result
        } else {
            let window = self.window(row)?;
            work(&ByteRange {
                device: window.0,
                offset: window.1.offset,
                len: window.1.size_limit,
            })
        }
    }

    fn activate(&self, row: &LvRow) -> Result<()> {
        self.lvm
            .cmd("lvchange")
            .args(["-ay", "-K", "--"])
            .arg(format!("{}/{}", row.vg_name, row.lv_name))
            .run()?;
        Ok(())
    }

    fn deactivate(&self, row: &LvRow) -> Result<()> {
        self.lvm
            .cmd("lvchange")
            .args(["-an", "--"])
            .arg(format!("{}/{}", row.vg_name, row.lv_name))
            .run()?;
        Ok(())
    }

    /// The PV and byte window holding a contiguous linear LV.
    fn window(&self, row: &LvRow) -> Result<(PathBuf, Window)> {
        let segments = self.lvm.segments(&row.vg_name, &row.lv_name)?;
        let range = data::contiguous_range(&segments).map_err(|why| {
            Error::Precondition(format!(
                "{}/{} cannot be used without device-mapper: {why}",
                row.vg_name, row.lv_name
            ))
        })?;
        let pv = self
            .lvm
            .pvs(&row.vg_name)?
            .into_iter()
            .find(|p| Path::new(&p.pv_name) == range.pv)
            .ok_or_else(|| Error::Internal(format!("PV {} not reported", range.pv.display())))?;
        let extent = self
            .lvm
            .vgs(std::slice::from_ref(&row.vg_name))?
            .first()
            .map(|v| v.vg_extent_size)
            .ok_or_else(|| Error::Internal(format!("VG {} not reported", row.vg_name)))?;
        let device = fs::canonicalize(&range.pv).ctx("resolve", &range.pv)?;
        Ok((
            device,
            Window {
                offset: pv.pe_start + range.first * extent,
                size_limit: range.count * extent,
            },
        ))
    }

    fn window_attachment(&self, row: &LvRow) -> Result<Option<PathBuf>> {
        let (pv, window) = self.window(row)?;
        Ok(loopdev::find_attached(&pv)?
            .into_iter()
            .find(|a| a.offset == window.offset)
            .map(|a| a.device))
    }

    /// Copy a source LV's data into `dst`; a mounted source volume is
    /// frozen meanwhile so the copy is consistent.
    fn copy_into(&self, src: &LvRow, dst: &LvRow) -> Result<()> {
        let mounted = if VolumeId::parse(&src.lv_name).is_some() {
            match self.attached_row_device(src)? {
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
                    data::zero_from(to, from.len)
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

    fn attached_row_device(&self, row: &LvRow) -> Result<Option<PathBuf>> {
        if self.lvm.device_mapper() {
            let device = lv_device(row);
            Ok((row.lv_active == "active" && device.exists()).then_some(device))
        } else {
            match self.window_attachment(row) {
                Ok(found) => Ok(found),
                // An LV that cannot have a window has no attachment either.
                Err(Error::Precondition(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
    }

    /// The LV a content source names (Kennel's, complete).
    fn source_row(&self, source: &ContentSource, rows: &[LvRow]) -> Result<LvRow> {
        let (name, missing) = match source {
            ContentSource::Snapshot(id) => (
                id.as_str(),
                Error::NotFound(format!("snapshot {id} not found")),
            ),
            ContentSource::Volume(id) => (id.as_str(), Error::VolumeNotFound(id.to_string())),
        };
        rows.iter()
            .find(|r| {
                r.lv_name == name
                    && tags::is_owned(&r.lv_tags)
                    && !r.lv_tags.iter().any(|t| t == tags::PENDING)
            })
            .cloned()
            .ok_or(missing)
    }

    /// Build a new LV `name` of `size` bytes: empty, or a copy of `source`.
    /// Afterwards it exists completely (tags without `pending`) or not at all.
    fn build(
        &self,
        vg: &str,
        name: &str,
        size: u64,
        params: &LvmParams,
        source: Option<&LvRow>,
        tag_list: &[String],
    ) -> Result<()> {
        if let Layout::Thin { .. } = params.layout {
            self.require_device_mapper("a thin volume")?;
        }
        if source.is_some_and(|s| s.is_thin()) {
            self.require_device_mapper("copying a thin volume or snapshot")?;
        }
        let _building = self.building(name);
        self.sweep()?;
        let rows = self.rows()?;
        if let Layout::Thin { pool } = &params.layout {
            let pool_row = self.pool(vg, pool, &rows)?;
            self.check_thin_room(&pool_row, &rows, size)?;
        }
        // Thin origin in the same pool: a thin snapshot shares its blocks.
        if let (Some(src), Layout::Thin { pool }) = (source, &params.layout) {
            if src.is_thin() && src.vg_name == vg && &src.pool_lv == pool {
                let grow = size > src.lv_size;
                let cmd = self
                    .lvm
                    .cmd("lvcreate")
                    .args(["-s", "-kn", "-an", "-y", "-n"])
                    .arg(name)
                    .arg(format!("{}/{}", src.vg_name, src.lv_name));
                self.lvm.change(add_tags(cmd, tag_list, grow))?;
                if grow {
                    return self.finish(vg, name, |row| {
                        self.lvm.change(
                            self.lvm
                                .cmd("lvextend")
                                .arg("-L")
                                .arg(format!("{size}b"))
                                .arg("--")
                                .arg(format!("{}/{}", row.vg_name, row.lv_name)),
                        )?;
                        Ok(())
                    });
                }
                return Ok(());
            }
        }
        // A new thin LV reads as zeros: nothing to wipe, one command.
        if source.is_none() && matches!(params.layout, Layout::Thin { .. }) {
            return self.lvcreate_new(vg, name, size, params, tag_list, false);
        }
        if let Some(src) = source {
            if !self.lvm.device_mapper() {
                // Fail before allocating anything.
                self.window(src)?;
            }
        }
        self.lvcreate_new(vg, name, size, params, tag_list, true)?;
        self.finish(vg, name, |row| match source {
            Some(src) => self.copy_into(src, row),
            None => {
                self.with_bytes(row, |bytes| data::zero_from(bytes, 0))?;
                self.lvm.step();
                Ok(())
            }
        })
    }

    /// Fill a pending LV with `fill`, then commit it; remove it on failure.
    fn finish(&self, vg: &str, name: &str, fill: impl FnOnce(&LvRow) -> Result<()>) -> Result<()> {
        let row = self
            .row(name)?
            .filter(|r| r.vg_name == vg)
            .ok_or_else(|| Error::Internal(format!("{vg}/{name} vanished after lvcreate")))?;
        let done = fill(&row).and_then(|()| self.commit(vg, name));
        if let Err(e) = &done {
            tracing::warn!(lv = name, error = %e, "removing a partly built LV");
            if let Err(cleanup) = self.remove_lv(&row) {
                tracing::error!(lv = name, error = %cleanup, "cannot remove a partly built LV; the next start will");
            }
        }
        done
    }
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

fn volume_of(row: LvRow) -> Option<(LvRow, VolumeRecord)> {
    let id = VolumeId::parse(&row.lv_name)?;
    match tags::decode::<VolumeRecord>(&row.lv_tags) {
        Ok(Decoded::Record(mut record)) if record.id == id => {
            record.capacity_bytes = row.lv_size;
            Some((row, record))
        }
        Ok(Decoded::Record(_)) | Err(_) => {
            tracing::error!(lv = %row.lv_name, vg = %row.vg_name, "Kennel LV with unreadable tags; ignored");
            None
        }
        Ok(Decoded::Foreign | Decoded::Pending) => None,
    }
}

fn snapshot_of(row: LvRow) -> Option<(LvRow, SnapshotRecord)> {
    let id = SnapshotId::parse(&row.lv_name)?;
    match tags::decode::<SnapshotRecord>(&row.lv_tags) {
        Ok(Decoded::Record(record)) if record.id == id => Some((row, record)),
        Ok(Decoded::Record(_)) | Err(_) => {
            tracing::error!(lv = %row.lv_name, vg = %row.vg_name, "Kennel snapshot LV with unreadable tags; ignored");
            None
        }
        Ok(Decoded::Foreign | Decoded::Pending) => None,
    }
}

fn lv_device(row: &LvRow) -> PathBuf {
    if row.lv_path.is_empty() {
        PathBuf::from(format!("/dev/{}/{}", row.vg_name, row.lv_name))
    } else {
        PathBuf::from(&row.lv_path)
    }
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

fn round_down(bytes: u64, granularity: u64) -> u64 {
    bytes / granularity * granularity
}

/// One driver per VG on a host: the pending-LV sweep assumes it.
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
        let mut all: Vec<VolumeRecord> = self.volumes()?.into_iter().map(|(_, r)| r).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn get(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        Ok(self.volume(id)?.map(|(_, r)| r))
    }

    fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        Ok(self
            .volumes()?
            .into_iter()
            .map(|(_, r)| r)
            .find(|r| r.name == name))
    }

    fn create(&self, record: &VolumeRecord) -> Result<()> {
        let params = LvmParams::parse(&record.params.backend)?;
        let vg = self.class(&params)?.vg.clone();
        let source = match &record.source {
            Some(source) => Some(self.source_row(source, &self.rows()?)?),
            None => None,
        };
        let tag_list = tags::encode(record)?;
        self.build(
            &vg,
            record.id.as_str(),
            record.capacity_bytes,
            &params,
            source.as_ref(),
            &tag_list,
        )?;
        if let Some(limit) = Some(record.requested.limit).filter(|l| *l != 0) {
            // Stripes round sizes up to whole stripes.
            if let Some((row, _)) = self.volume(&record.id)? {
                if row.lv_size > limit {
                    let _ = self.remove_lv(&row);
                    return Err(Error::OutOfRange(format!(
                        "the layout rounds the volume up to {} bytes, above the limit of {limit} bytes",
                        row.lv_size
                    )));
                }
            }
        }
        Ok(())
    }

    fn delete(&self, id: &VolumeId) -> Result<()> {
        let Some((row, _)) = self.volume(id)? else {
            // Absent, foreign or pending (swept at the next start or create).
            return Ok(());
        };
        if let Some(device) = self.attached_row_device(&row)? {
            return Err(Error::Precondition(format!(
                "volume {id} is staged on this node ({}); unstage it first",
                device.display()
            )));
        }
        self.remove_lv(&row)
    }

    fn expand(&self, id: &VolumeId, new_size: u64) -> Result<VolumeRecord> {
        let (row, record) = self
            .volume(id)?
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if new_size <= row.lv_size {
            return Ok(record);
        }
        if row.is_thin() {
            let rows = self.rows()?;
            let pool = self.pool(&row.vg_name, &row.pool_lv, &rows)?;
            self.check_thin_room(&pool, &rows, new_size - row.lv_size)?;
        }
        let mut cmd = self
            .lvm
            .cmd("lvextend")
            .arg("-L")
            .arg(format!("{new_size}b"));
        if !self.lvm.device_mapper() && row.segtype == "linear" {
            // Keep the LV in one PV range, or it could not be attached here.
            cmd = cmd.args(["--alloc", "contiguous"]);
        }
        let cmd = cmd
            .arg("--")
            .arg(format!("{}/{}", row.vg_name, row.lv_name));
        self.lvm.change(cmd).map_err(|e| match e {
            Error::Exhausted(msg) if !self.lvm.device_mapper() => Error::Exhausted(format!(
                "{msg} (without device-mapper a volume grows only into the free extents right after it)"
            )),
            other => other,
        })?;
        self.volume(id)?
            .map(|(_, r)| r)
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))
    }

    fn capacity(&self, raw: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        let params = LvmParams::parse(raw)?;
        let vg = self.class(&params)?.vg.clone();
        match &params.layout {
            Layout::Linear => {
                let row = self
                    .lvm
                    .vgs(std::slice::from_ref(&vg))?
                    .into_iter()
                    .next()
                    .ok_or_else(|| Error::Precondition(format!("volume group {vg:?} not found")))?;
                Ok(PoolCapacity {
                    total_bytes: row.vg_size,
                    available_bytes: round_down(row.vg_free, self.granularity),
                    provisioned_bytes: row.vg_size - row.vg_free,
                })
            }
            Layout::Thin { pool } => {
                let rows = self.rows()?;
                let pool = self.pool(&vg, pool, &rows)?;
                Ok(self.thin_room(&pool, &rows))
            }
        }
    }

    fn check_params(&self, raw: &BTreeMap<String, String>) -> Result<()> {
        let params = LvmParams::parse(raw)?;
        self.class(&params)?;
        Ok(())
    }

    fn create_snapshot(&self, snapshot: &SnapshotRecord) -> Result<()> {
        let rows = self.rows()?;
        if rows.iter().any(|r| r.lv_name == snapshot.id.as_str()) {
            return Ok(());
        }
        let (src, record) = self
            .volume(&snapshot.source_volume)?
            .ok_or_else(|| Error::VolumeNotFound(snapshot.source_volume.to_string()))?;
        let tag_list = tags::encode(snapshot)?;
        let name = snapshot.id.as_str();
        if src.is_thin() {
            let _building = self.building(name);
            let cmd = self
                .lvm
                .cmd("lvcreate")
                .args(["-s", "-y", "-n"])
                .arg(name)
                .arg(format!("{}/{}", src.vg_name, src.lv_name));
            self.lvm.change(add_tags(cmd, &tag_list, false))?;
            return Ok(());
        }
        // A linear volume: a full copy into a linear LV of its size.
        let mut params = LvmParams::parse(&record.params.backend)?;
        params.layout = Layout::Linear;
        self.build(
            &src.vg_name.clone(),
            name,
            src.lv_size,
            &params,
            Some(&src),
            &tag_list,
        )
    }

    fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        match self.row(id.as_str())?.and_then(snapshot_of) {
            Some((row, _)) => self.remove_lv(&row),
            None => Ok(()),
        }
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        let mut all: Vec<SnapshotRecord> = self.snapshots()?.into_iter().map(|(_, s)| s).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(all)
    }

    fn attach(&self, id: &VolumeId) -> Result<PathBuf> {
        let (row, _) = self
            .volume(id)?
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if self.lvm.device_mapper() {
            self.activate(&row)?;
            let device = lv_device(&row);
            wait_for(&device)?;
            return Ok(device);
        }
        let (pv, window) = self.window(&row)?;
        match current_window(&pv, window)? {
            Some(device) => Ok(device),
            None => loopdev::attach(&pv, window),
        }
    }

    fn detach(&self, id: &VolumeId) -> Result<()> {
        let Some((row, _)) = self.volume(id)? else {
            return Ok(());
        };
        if self.lvm.device_mapper() {
            return self.deactivate(&row);
        }
        if let Some(device) = self.attached_row_device(&row)? {
            loopdev::detach(&device)?;
        }
        Ok(())
    }

    fn attached_device(&self, id: &VolumeId) -> Result<Option<PathBuf>> {
        match self.volume(id)? {
            Some((row, _)) => self.attached_row_device(&row),
            None => Ok(None),
        }
    }

    fn refresh_device(&self, id: &VolumeId) -> Result<()> {
        if self.lvm.device_mapper() {
            // device-mapper devices change size with the LV.
            return Ok(());
        }
        let Some((row, _)) = self.volume(id)? else {
            return Ok(());
        };
        let (pv, window) = self.window(&row)?;
        current_window(&pv, window).map(drop)
    }

    fn health(&self, record: &VolumeRecord) -> Option<String> {
        let cached = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|(at, _)| at.elapsed() < HEALTH_CACHE)
            .map(|(_, rows)| rows.clone());
        let rows = match cached {
            Some(rows) => rows,
            None => match self.rows() {
                Ok(rows) => rows,
                Err(e) => return Some(format!("cannot read LVM state: {e}")),
            },
        };
        let Some(row) = rows.iter().find(|r| r.lv_name == record.id.as_str()) else {
            return Some(format!("logical volume {} is missing", record.id));
        };
        if !row.lv_health_status.is_empty() {
            return Some(format!(
                "logical volume {}/{} reports {}",
                row.vg_name, row.lv_name, row.lv_health_status
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

/// The loop device already exposing the LV at `window.offset` of `pv`, its
/// size limit brought up to date (the LV may have grown since it was attached).
fn current_window(pv: &Path, window: Window) -> Result<Option<PathBuf>> {
    let Some(found) = loopdev::find_attached(pv)?
        .into_iter()
        .find(|a| a.offset == window.offset)
    else {
        return Ok(None);
    };
    if found.size_limit != window.size_limit {
        loopdev::set_window(&found.device, window)?;
    }
    Ok(Some(found.device))
}
