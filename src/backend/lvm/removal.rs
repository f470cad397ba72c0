//! Removing an LV: its extents are zeroed before `lvremove` returns them to
//! the VG (see "No tenant reads another's data" in the module doc). An LV
//! that cannot be zeroed is not removed: it keeps its extents, and the call
//! fails naming it, until it can be.

use std::fs;

use super::activation::{lv_device, wait_for};
use super::data::{self, ByteRange};
use super::index::Lv;
use super::LvmBackend;
use crate::error::{Error, IoContext, Result};

impl LvmBackend {
    /// Zero an LV's extents, then remove it and forget it.
    pub(super) fn remove_lv(&self, lv: &Lv) -> Result<()> {
        if !lv.missing && lv.row.is_cow() {
            // Its exception store holds the origin's old blocks: split it off to zero it.
            let split = self.split_cow(lv)?;
            if split.row.is_cow() {
                return Err(Error::Internal(format!(
                    "{}/{} is still a snapshot after its split; it is kept, not removed unzeroed",
                    lv.row.vg_name, lv.row.lv_name
                )));
            }
            return self.remove_lv(&split);
        }
        if !lv.missing {
            // A view of this LV left by an interrupted copy goes first (zeroed), not with it.
            for view in self.cow_views_of(lv) {
                self.remove_lv(&view)?;
            }
            self.zero_lv(lv).map_err(|e| {
                Error::Internal(format!(
                    "logical volume {}/{} is not removed: its extents cannot be zeroed, and they must be before they return to the volume group ({e})",
                    lv.row.vg_name, lv.row.lv_name
                ))
            })?;
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

    /// Kennel's CoW snapshots of `lv`.
    fn cow_views_of(&self, lv: &Lv) -> Vec<Lv> {
        self.index()
            .lvs()
            .filter(|v| {
                v.row.vg_name == lv.row.vg_name
                    && v.row.origin == lv.row.lv_name
                    && v.row.is_cow()
                    && v.is_owned()
                    && !v.missing
            })
            .cloned()
            .collect()
    }

    /// Write zeros over every extent the LV holds. A thin LV holds none of
    /// its own: its pool zeroes a block when it is provisioned again (Kennel
    /// uses only pools that do, see `capacity`).
    fn zero_lv(&self, lv: &Lv) -> Result<()> {
        if lv.row.is_thin() {
            return Ok(());
        }
        if self.lvm.device_mapper() {
            // Inactive after a reboot, or deactivated by hand: activate it to reach its bytes.
            let device = lv_device(&lv.row);
            if lv.row.lv_active != "active" || !device.exists() {
                self.activate(lv)?;
            }
            wait_for(&device)?;
            return data::zero_out(&ByteRange {
                device,
                offset: 0,
                len: lv.row.lv_size,
            });
        }
        if lv.place.is_ok() {
            let (device, window) = self.window(lv)?;
            return data::zero_out(&ByteRange {
                device,
                offset: window.offset,
                len: window.size_limit,
            });
        }
        // Placed by lvm2 (striped): zero each of its PV ranges.
        for range in self.pv_byte_ranges(lv)? {
            data::zero_out(&range)?;
        }
        Ok(())
    }

    /// The byte ranges of the PVs an LV's segments occupy, asked of lvm2.
    fn pv_byte_ranges(&self, lv: &Lv) -> Result<Vec<ByteRange>> {
        let (vg, name) = (&lv.row.vg_name, &lv.row.lv_name);
        let segments: Vec<_> = self
            .lvm
            .lv_segments(std::slice::from_ref(vg), Some(name))?
            .into_iter()
            .filter(|row| &row.vg_name == vg && &row.lv_name == name)
            .map(|row| row.split().1)
            .collect();
        let ranges = data::pv_ranges(&segments)
            .map_err(|why| Error::Internal(format!("the extents of {vg}/{name}: {why}")))?;
        let index = self.index();
        let v = index
            .vg(vg)
            .ok_or_else(|| Error::Precondition(format!("volume group {vg:?} not found")))?;
        ranges
            .into_iter()
            .map(|range| {
                let pv_name = range.pv.to_string_lossy();
                let pv = v
                    .pvs
                    .iter()
                    .find(|p| p.name == pv_name)
                    .ok_or_else(|| Error::Internal(format!("PV {pv_name} is not indexed")))?;
                Ok(ByteRange {
                    device: fs::canonicalize(&range.pv).ctx("resolve", &range.pv)?,
                    offset: pv.pe_start + range.first * v.extent_size,
                    len: range.count * v.extent_size,
                })
            })
            .collect()
    }
}
