//! Removing an LV: its extents are zeroed before `lvremove` returns them to
//! the VG (see "No tenant reads another's data" in the module doc).

use super::data;
use super::index::Lv;
use super::LvmBackend;
use crate::error::{Error, Result};

impl LvmBackend {
    /// Zero an LV's extents, then remove it and forget it.
    pub(super) fn remove_lv(&self, lv: &Lv) -> Result<()> {
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
}
