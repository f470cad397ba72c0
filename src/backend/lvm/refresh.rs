//! The index kept in step with lvm2: a change in progress keeps the
//! background refresh off, a reload after changes whose effect the driver
//! does not compute itself, the periodic refresh that notices changes made
//! by hand, and lookups that confirm a miss with one targeted `lvs`. A load
//! also keeps lvm2's `--devices` list following the VGs' PVs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::cli::{self, LvRow, Lvm};
use super::index::{self, Index, Lv};
use super::LvmBackend;
use crate::backend::VolumeRecord;
use crate::error::{Error, Result};
use crate::model::VolumeId;

/// Tells the background refresh whether the index changed under it.
#[derive(Debug, Default)]
pub(super) struct Changes {
    /// Bumped when a change starts and when it ends.
    generation: AtomicU64,
    /// Changes running now.
    running: AtomicUsize,
}

/// A change to the VGs in progress (see [`Changes`]).
pub(super) struct Changing<'a>(&'a Changes);

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.0.generation.fetch_add(1, Ordering::SeqCst);
        self.0.running.fetch_sub(1, Ordering::SeqCst);
    }
}

impl LvmBackend {
    /// The index as it stands, in comparable form.
    pub fn index_view(&self) -> index::View {
        self.index().view(!self.lvm.device_mapper())
    }

    /// The index as a fresh load from lvm2 would build it now.
    pub fn fresh_index_view(&self) -> Result<index::View> {
        Ok(load(&self.lvm, &self.vgs)?.view(!self.lvm.device_mapper()))
    }

    /// Mark a change to the VGs (keeps the background refresh off).
    pub(super) fn changing(&self) -> Changing<'_> {
        self.changes.running.fetch_add(1, Ordering::SeqCst);
        self.changes.generation.fetch_add(1, Ordering::SeqCst);
        Changing(&self.changes)
    }

    /// Reload the whole index now (after rare changes whose effect on the
    /// extent map the driver does not compute itself).
    pub(super) fn reload(&self) -> Result<()> {
        // Other volumes' changes may land while lvm2 is read: keep them.
        let before = self.index().clone();
        let fresh = load(&self.lvm, &self.vgs)?;
        self.index().merge_reload(&before, fresh);
        Ok(())
    }

    /// Reload every `interval`, off the request path, unless a change is
    /// running or ran meanwhile (its effect is already in the index).
    pub(super) fn start_refresh(&self, interval: Duration) {
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
    pub(super) fn lookup(&self, name: &str) -> Result<Option<Lv>> {
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
    pub(super) fn fetch(&self, vgs: &[String], name: &str) -> Result<Vec<Lv>> {
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

    pub(super) fn volume(&self, id: &VolumeId) -> Result<Option<(Lv, VolumeRecord)>> {
        Ok(self.lookup(id.as_str())?.and_then(|lv| {
            let record = lv.volume()?.clone();
            Some((lv, record))
        }))
    }

    /// Re-read one LV from lvm2 and index it.
    pub(super) fn lookup_fresh(&self, vg: &str, name: &str) -> Result<Option<Lv>> {
        self.reload()?;
        Ok(self.index().get(vg, name).cloned())
    }

    pub(super) fn extent_size(&self, vg: &str) -> Result<u64> {
        self.index()
            .vg(vg)
            .map(|v| v.extent_size)
            .ok_or_else(|| Error::Precondition(format!("volume group {vg:?} not found")))
    }
}

/// Load the index, and keep `--devices` following the VGs' PVs: a VG
/// extended (`vgextend`) with a PV the list lacks looks incomplete to lvm2,
/// so its PVs are looked for on every device once, and the list replaced.
pub(super) fn load(lvm: &Lvm, vgs: &[String]) -> Result<Index> {
    let scoped = read(lvm, vgs);
    let known = lvm.devices();
    if known.is_empty() {
        return scoped;
    }
    if let Ok(index) = &scoped {
        if !index.lacks_pvs() {
            let pvs = index.pv_names();
            if pvs != known {
                // A PV left the VG (`vgreduce`): stop scanning it.
                lvm.scope_to(pvs);
            }
            return scoped;
        }
    }
    let index = read(&lvm.unscoped(), vgs)?;
    let pvs = index.pv_names();
    tracing::info!(before = %known.join(","), now = %pvs.join(","), "the volume groups' PVs changed; lvm2 now scans these");
    lvm.scope_to(pvs);
    Ok(index)
}

/// Read the three reports of one index round.
fn read(lvm: &Lvm, vgs: &[String]) -> Result<Index> {
    let vg_rows = lvm.vgs(vgs)?;
    let pvsegs = lvm.pv_segments(vgs)?;
    let lvsegs = lvm.lv_segments(vgs, None)?;
    Ok(Index::build(vg_rows, pvsegs, lvsegs))
}
