//! The start-up sweep: LVs still pending are debris of interrupted calls
//! (by anyone but this process's running builds) and are zeroed and removed.

use super::index::{Kind, Lv};
use super::LvmBackend;
use crate::error::Result;

impl LvmBackend {
    /// Remove LVs whose creation was interrupted (pending, not being built).
    pub(super) fn sweep(&self) -> Result<()> {
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
}
