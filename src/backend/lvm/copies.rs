//! Clones, restores and full-copy snapshots: an LV created `pending`,
//! filled from its source (frozen if mounted), then committed by removing
//! the tag; removed again if the fill fails.

use super::allocation::New;
use super::data;
use super::index::{Kind, Lv};
use super::params::{Layout, LvmParams};
use super::{tags, LvmBackend};
use crate::error::{Error, Result};
use crate::model::ContentSource;
use crate::node::{freeze, mount};

/// Who keeps a mounted source still during a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Quiesce {
    /// The copy freezes a mounted source itself.
    Own,
    /// The caller holds the freeze (a group snapshot freezes all its sources together).
    Held,
}

impl LvmBackend {
    /// Remove the `pending` tag: the LV is complete.
    pub(super) fn commit(&self, lv: &Lv) -> Result<()> {
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

    /// Where a volume LV's filesystem is mounted on this node, if it is.
    pub(super) fn mounted_at(&self, lv: &Lv) -> Result<Option<std::path::PathBuf>> {
        if lv.volume().is_none() {
            return Ok(None);
        }
        match self.attached_lv_device(lv)? {
            Some(device) => mount::mount_point_of(&device),
            None => Ok(None),
        }
    }

    /// Copy a source LV's data into `dst`. A source volume in use (staged) is
    /// read from a point-in-time view of it under device-mapper; otherwise a
    /// mounted one is frozen meanwhile (by the caller, if it holds the freeze),
    /// so the copy is consistent either way.
    pub(super) fn copy_into(&self, src: &Lv, dst: &Lv, quiesce: Quiesce) -> Result<()> {
        let fill = |from: &data::ByteRange| {
            self.with_bytes(dst, |to| {
                data::copy(from, to)?;
                data::wipe_signatures(to, from.len)
            })
        };
        let in_use = quiesce == Quiesce::Own
            && src.volume().is_some()
            && self.attached_lv_device(src)?.is_some();
        // The workload waits only while the view is taken.
        let from_view = in_use
            && self.cow_possible(src)
            && self.read_from_cow(src, &dst.row.lv_name, fill)?.is_some();
        if !from_view {
            let mounted = match quiesce {
                Quiesce::Own => self.mounted_at(src)?,
                Quiesce::Held => None,
            };
            match mounted {
                Some(point) => freeze::while_frozen(&point, || self.with_bytes(src, fill)),
                None => self.with_bytes(src, fill),
            }?;
        }
        self.lvm.step();
        Ok(())
    }

    /// The LV a content source names (Kennel's, complete).
    pub(super) fn source_lv(&self, source: &ContentSource) -> Result<Lv> {
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

    /// Build a new LV `name` of `size` bytes as a copy of `source`, kept still as `quiesce`
    /// says. Afterwards it exists completely (tags without `pending`) or not at all.
    pub(super) fn build_copy(
        &self,
        vg: &str,
        name: &str,
        size: u64,
        params: &LvmParams,
        (source, quiesce): (&Lv, Quiesce),
        tag_list: &[String],
    ) -> Result<()> {
        if let Layout::Thin { .. } = params.layout {
            self.require_device_mapper("a thin volume")?;
        }
        if source.row.is_thin() {
            self.require_device_mapper("copying a thin volume or snapshot")?;
        }
        let _building = self.building(name);
        self.sweep();
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
        self.finish(&lv, |dst| self.copy_into(source, dst, quiesce))
    }

    /// Fill a pending LV with `fill`, then commit it; remove it on failure.
    pub(super) fn finish(&self, lv: &Lv, fill: impl FnOnce(&Lv) -> Result<()>) -> Result<()> {
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
