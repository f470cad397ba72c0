//! The start-up sweep: LVs still pending are debris of interrupted calls
//! (by anyone but this process's running builds) and are zeroed and removed.
//! It runs at start-up (after activation) and before each copy is built.

use super::index::{Kind, Lv};
use super::LvmBackend;

impl LvmBackend {
    /// Remove LVs whose creation was interrupted (pending, not being built).
    /// One that cannot be removed (nor zeroed) stays, reported; it is never
    /// served, and the next sweep tries again.
    pub(super) fn sweep(&self) {
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
            if let Err(e) = self.remove_lv(&lv) {
                tracing::error!(lv = %lv.row.lv_name, vg = %lv.row.vg_name, error = %e, "cannot remove the LV of an interrupted operation; it stays until the next sweep");
            }
        }
    }
}
