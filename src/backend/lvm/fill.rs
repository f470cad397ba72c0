//! Volumes filled by the caller (a snapshot pulled from another node), and
//! the bytes of a local snapshot for such a caller to read.
//!
//! A filled volume is built like a copy (see `copies`): `lvcreate (pending)`
//! of a blank LV → the caller writes its bytes → `lvchange --deltag pending`.
//! The blank LV reads as zeros wherever the caller does not write: a linear
//! one is made of free extents, which read as zeros (see the module notes), a
//! thin one of blocks its pool zeroes when it provisions them. A pending LV is
//! never listed or served, a failed fill removes it (zeroed), and one left by
//! a crash is swept at the next start.

use super::allocation::New;
use super::index::Lv;
use super::params::{Layout, LvmParams};
use super::LvmBackend;
use crate::backend::{ByteRange, SnapshotRecord, VolumeRecord};
use crate::error::{Error, Result};
use crate::model::SnapshotId;

impl LvmBackend {
    /// The parameters and volume group of a volume to create, or None when it already exists
    /// complete (a create repeated after it succeeded). Call it holding `changing()`.
    pub(super) fn to_create(&self, record: &VolumeRecord) -> Result<Option<(LvmParams, String)>> {
        let params = LvmParams::parse(&record.params.backend)?;
        let vg = self.class(&params)?.vg.clone();
        let exists = self
            .index()
            .get(&vg, record.id.as_str())
            .is_some_and(|lv| lv.volume().is_some());
        Ok((!exists).then_some((params, vg)))
    }

    /// See [`crate::backend::Backend::create_filled`].
    pub(super) fn create_filled_lv(
        &self,
        record: &VolumeRecord,
        fill: &mut dyn FnMut(&ByteRange) -> Result<()>,
    ) -> Result<()> {
        crate::backend::refuse_source(record)?;
        let name = record.id.as_str();
        let _change = self.changing();
        let Some((params, vg)) = self.to_create(record)? else {
            return Ok(());
        };
        // The caller writes through the bytes: refuse what cannot have them here before
        // allocating anything.
        match &params.layout {
            Layout::Thin { .. } => self.require_device_mapper("a thin volume")?,
            Layout::Linear if params.stripes.is_some_and(|n| n > 1) => {
                self.require_device_mapper("filling a striped volume")?
            }
            Layout::Linear => {}
        }
        let tag_list = super::io_limits_tag::encode(record)?;
        super::metadata::ensure_room(&self.index, &self.lvm, &vg, &tag_list)?;
        let _building = self.building(name);
        if let Layout::Thin { pool } = &params.layout {
            let pool = self.pool(&vg, pool)?;
            self.check_thin_room(&pool, record.capacity_bytes)?;
        }
        let lv = self.lvcreate(
            &vg,
            name,
            record.capacity_bytes,
            &New {
                layout: params.layout.clone(),
                stripes: params.stripes,
                stripe_size: params.stripe_size,
                tags: &tag_list,
                pending: true,
                origin: None,
            },
        )?;
        self.finish(&lv, |lv| {
            let limit = record.requested.limit;
            if limit != 0 && lv.row.lv_size > limit {
                // Stripes round sizes up to whole stripes.
                return Err(Error::OutOfRange(format!(
                    "the layout rounds the volume up to {} bytes, above the limit of {limit} bytes",
                    lv.row.lv_size
                )));
            }
            self.with_bytes(lv, |range| fill(range))
        })
    }

    /// See [`crate::backend::Backend::snapshot_bytes`].
    pub(super) fn snapshot_lv_bytes(&self, id: &SnapshotId) -> Result<Option<ByteRange>> {
        // A pending LV (a snapshot still being cut) decodes as no snapshot at all.
        let Some(lv) = self.lookup(id.as_str())? else {
            return Ok(None);
        };
        let Some(snapshot) = lv.snapshot() else {
            return Ok(None);
        };
        if snapshot.group.is_some() {
            let all: Vec<SnapshotRecord> = self
                .index()
                .lvs()
                .filter_map(Lv::snapshot)
                .cloned()
                .collect();
            if !snapshot.whole_among(&all) {
                return Ok(None);
            }
        }
        if lv.missing {
            return Err(Error::Precondition(format!(
                "logical volume {}/{} of snapshot {id} is missing (removed outside Kennel)",
                lv.row.vg_name, lv.row.lv_name
            )));
        }
        if lv.row.is_thin() {
            self.require_device_mapper("reading a thin snapshot")?;
        }
        self.bytes_of(&lv).map(Some)
    }
}
