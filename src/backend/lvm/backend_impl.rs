//! The `Backend` contract on LVM: each call checks its input and the index,
//! then uses the rooms of this module (allocation, copies, removal,
//! windows, capacity).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::PathBuf;

use super::activation::{lv_device, wait_for};
use super::allocation::New;
use super::copies::Quiesce;
use super::index::Lv;
use super::params::{Layout, LvmParams};
use super::{tags, LvmBackend};
use crate::backend::{Backend, ByteRange, PoolCapacity, SnapshotRecord, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::model::io_limits::IoLimits;
use crate::model::spec::FsType;
use crate::model::{SnapshotId, VolumeId};

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
        let name = record.id.as_str();
        let _change = self.changing();
        let Some((params, vg)) = self.to_create(record)? else {
            return Ok(());
        };
        // The record's chunks and, with limits, their tag: all in the one `lvcreate`.
        let tag_list = super::io_limits_tag::encode(record)?;
        super::metadata::ensure_room(&self.index, &self.lvm, &vg, &tag_list)?;
        match &record.source {
            Some(source) => {
                let source = self.source_lv(source)?;
                self.build_copy(
                    &vg,
                    name,
                    record.capacity_bytes,
                    &params,
                    (&source, Quiesce::Own),
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

    fn create_filled(
        &self,
        record: &VolumeRecord,
        fill: &mut dyn FnMut(&ByteRange) -> Result<()>,
    ) -> Result<()> {
        self.create_filled_lv(record, fill)
    }

    fn snapshot_bytes(&self, id: &SnapshotId) -> Result<Option<ByteRange>> {
        self.snapshot_lv_bytes(id)
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
        self.capacity_of(raw)
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
        super::metadata::ensure_room(&self.index, &self.lvm, &src.row.vg_name, &tag_list)?;
        self.cut_snapshot(snapshot, &src, &record, &tag_list, Quiesce::Own)
    }

    fn create_group_snapshot(&self, members: &[SnapshotRecord]) -> Result<()> {
        self.group_snapshot(members)
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
            .find(|s| s.name == name && s.group.is_none())
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

    fn set_io_limits(&self, id: &VolumeId, limits: IoLimits) -> Result<VolumeRecord> {
        self.store_io_limits(id, limits)
    }

    fn health(&self, record: &VolumeRecord) -> Option<String> {
        let index = self.index();
        let Some(lv) = index.find(record.id.as_str()) else {
            return Some(format!("logical volume {} is missing", record.id));
        };
        let pool = (!lv.row.pool_lv.is_empty())
            .then(|| index.get(&lv.row.vg_name, &lv.row.pool_lv))
            .flatten();
        let activation = self.activation_failure(lv);
        super::health::problem(lv, pool, self.lvm.device_mapper(), activation.as_deref())
    }

    fn default_fs_type(&self, record: &VolumeRecord) -> Option<FsType> {
        LvmParams::parse(&record.params.backend)
            .ok()
            .and_then(|p| p.fs_type)
    }
}
