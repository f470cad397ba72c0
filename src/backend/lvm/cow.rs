//! Instant point-in-time views of in-use linear LVs under device-mapper.
//!
//! A full copy of a staged volume used to run under a filesystem freeze, so
//! only volumes small enough to copy within the freeze budget could be
//! snapshotted or cloned while in use. With device-mapper the copy reads from
//! a short-lived copy-on-write snapshot of the volume instead (`lvcreate -s`):
//! the workload waits only while lvm2 suspends the origin to load it (lvm2
//! freezes the mounted filesystem for that instant, so the view is
//! consistent), then keeps writing while the copy runs at its own pace.
//!
//! The CoW LV carries Kennel's owner and `pending` tags and a name that is no
//! Kennel ID, so an interrupted copy leaves debris the sweep removes. Its
//! exception store holds the origin's old blocks, a tenant's bytes: before it
//! is zeroed and removed like any LV it is split from its origin
//! (`lvconvert --splitsnapshot`), which makes it a plain LV that no later
//! origin write can add to.

use super::activation::{lv_device, wait_for};
use super::data::ByteRange;
use super::index::Lv;
use super::{tags, LvmBackend};
use crate::error::{Error, Result};

/// Suffix of a CoW LV's name: `<LV being built>.cow` (never a Kennel ID).
const SUFFIX: &str = ".cow";

impl LvmBackend {
    /// Whether a copy of `src` can read from a CoW snapshot of it: it needs
    /// device-mapper, an LV that holds its own extents (thin LVs snapshot
    /// instantly already), and room in the VG for the snapshot's exception
    /// store, sized so it can never overflow during the copy.
    pub(super) fn cow_possible(&self, src: &Lv) -> bool {
        if !self.lvm.device_mapper() || src.row.is_thin() || src.row.is_cow() {
            return false;
        }
        let index = self.index();
        let Some(vg) = index.vg(&src.row.vg_name) else {
            return false;
        };
        vg.free_extents.saturating_mul(vg.extent_size) >= cow_size(src.row.lv_size)
    }

    /// Run `read` against a point-in-time view of `src` taken now, for the
    /// LV `building` that is being filled from it. The view is dropped
    /// (split, zeroed, removed) afterwards, whatever `read` returned.
    /// `None` if lvm2 could not take the view (a kernel without the
    /// snapshot target, for one): the caller copies another way.
    pub(super) fn read_from_cow<T>(
        &self,
        src: &Lv,
        building: &str,
        read: impl FnOnce(&ByteRange) -> Result<T>,
    ) -> Result<Option<T>> {
        let name = format!("{building}{SUFFIX}");
        let _building = self.building(&name);
        let took = std::time::Instant::now();
        let taken = self.lvm.change(
            self.lvm
                .cmd("lvcreate")
                .args(["-ay", "-y", "-s", "-L"])
                .arg(format!("{}b", cow_size(src.row.lv_size)))
                .args(["--addtag", tags::OWNER, "--addtag", tags::PENDING, "-n"])
                .arg(&name)
                .arg("--")
                .arg(format!("{}/{}", src.row.vg_name, src.row.lv_name)),
        );
        if let Err(e) = taken {
            // Anything half-made is pending debris for the sweep.
            tracing::warn!(lv = %src.row.lv_name, error = %e, "cannot take a point-in-time view; copying under a freeze instead");
            return Ok(None);
        }
        tracing::info!(
            lv = %src.row.lv_name,
            cow = %name,
            took_ms = took.elapsed().as_millis() as u64,
            "point-in-time view taken; the copy reads from it while the volume stays in use"
        );
        let cow = self.lookup_fresh(&src.row.vg_name, &name)?.ok_or_else(|| {
            Error::Internal(format!(
                "{}/{name} vanished after lvcreate",
                src.row.vg_name
            ))
        })?;
        let device = lv_device(&cow.row);
        let done = wait_for(&device).and_then(|()| {
            read(&ByteRange {
                device,
                offset: 0,
                len: src.row.lv_size,
            })
        });
        if let Err(e) = self.remove_lv(&cow) {
            // The copy stands; the view is pending debris the next sweep removes.
            tracing::error!(cow = %name, error = %e, "cannot drop a point-in-time view; the next sweep will");
        }
        done.map(Some)
    }

    /// Split a CoW LV from its origin: afterwards it is a plain LV holding
    /// its exception store, ready to be zeroed, and no origin write reaches it.
    pub(super) fn split_cow(&self, cow: &Lv) -> Result<Lv> {
        let (vg, name) = (&cow.row.vg_name, &cow.row.lv_name);
        self.lvm.change(
            self.lvm
                .cmd("lvconvert")
                .args(["-y", "--splitsnapshot", "--"])
                .arg(format!("{vg}/{name}")),
        )?;
        self.lookup_fresh(vg, name)?
            .ok_or_else(|| Error::Internal(format!("{vg}/{name} vanished after its split")))
    }
}

/// An exception store that holds every chunk of an origin of `origin_bytes`:
/// the data, one 16-byte entry per 4 KiB chunk in its tables, and its header.
/// lvm2 trims a store larger than the origin can ever need.
fn cow_size(origin_bytes: u64) -> u64 {
    origin_bytes + origin_bytes / 128 + (1 << 20)
}
