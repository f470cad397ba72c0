//! Creating an LV: one `lvcreate` carrying its record, on free extents the
//! driver picks itself without device-mapper, indexed on success; and the
//! set of LVs this process is building right now (pending on purpose, so
//! the sweep leaves them alone).

use std::collections::HashSet;
use std::fs::File;
use std::path::Path;
use std::sync::Mutex;

use super::activation::{lv_device, wait_for};
use super::cli::{self, LvRow};
use super::data::PeRange;
use super::index::Lv;
use super::params::Layout;
use super::{tags, LvmBackend};
use crate::error::{Error, IoContext, Result};

impl LvmBackend {
    /// Mark an LV name as being built by this process until the guard drops.
    pub(super) fn building(&self, name: &str) -> InFlight<'_> {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned());
        InFlight {
            set: &self.in_flight,
            name: name.to_owned(),
        }
    }

    /// One `lvcreate` of a new LV carrying `tags` (and `pending` if asked),
    /// indexed on success. Without device-mapper a linear LV goes on a free
    /// run of extents picked here, so its place is known without asking
    /// lvm2; with it, the LV is created active and its size read from the
    /// device.
    pub(super) fn lvcreate(&self, vg: &str, name: &str, size: u64, new: &New<'_>) -> Result<Lv> {
        let _one_at_a_time = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        match self.try_lvcreate(vg, name, size, new) {
            // The extent map was stale (an LV made by hand, a PV added): reload, retry once.
            Err(Error::Exhausted(_)) if !self.lvm.device_mapper() => {
                self.reload()?;
                self.try_lvcreate(vg, name, size, new)
            }
            // lvm2 places LVs itself, but refuses a VG with a PV `--devices` lacks
            // (`vgextend` since the list was made): retry once if a reload finds one.
            Err(e @ (Error::Exhausted(_) | Error::Command { .. })) => {
                let devices = self.lvm.devices();
                self.reload()?;
                if self.lvm.devices() == devices {
                    return Err(e);
                }
                self.try_lvcreate(vg, name, size, new)
            }
            other => other,
        }
    }

    pub(super) fn try_lvcreate(
        &self,
        vg: &str,
        name: &str,
        size: u64,
        new: &New<'_>,
    ) -> Result<Lv> {
        let dm = self.lvm.device_mapper();
        // lvm2 accepts --zero only for linear LVs and thin pools: a thin volume or thin
        // snapshot given -Zn is refused, so -Zn goes on the linear layouts alone.
        let mut cmd = self
            .lvm
            .cmd("lvcreate")
            .args([if dm { "-ay" } else { "-an" }, "-y"]);
        let mut placed: Option<PeRange> = None;
        let mut segtype = "linear";
        let mut pool_lv = String::new();
        // A new LV is blank: no signatures to wipe (lvm2 refuses -Wn on snapshots).
        if new.origin.is_none() {
            cmd = cmd.arg("-Wn");
        }
        match (&new.layout, new.origin) {
            (_, Some(origin)) => {
                // A thin snapshot of a thin origin (shares its blocks).
                cmd = cmd
                    .args(["-s", "-kn", "-n"])
                    .arg(name)
                    .arg(format!("{}/{}", origin.row.vg_name, origin.row.lv_name));
                segtype = "thin";
                pool_lv = origin.row.pool_lv.clone();
            }
            (Layout::Thin { pool }, None) => {
                cmd = cmd
                    .arg("-V")
                    .arg(format!("{size}b"))
                    .arg("-T")
                    .arg(format!("{vg}/{pool}"))
                    .arg("-n")
                    .arg(name);
                segtype = "thin";
                pool_lv = pool.clone();
            }
            (Layout::Linear, None) if !dm && new.stripes.is_none_or(|n| n == 1) => {
                let extent = self.extent_size(vg)?;
                let count = size.div_ceil(extent);
                let range = self.index().take_contiguous(vg, count).ok_or_else(|| {
                    Error::Exhausted(format!(
                        "volume group {vg} has no free run of {count} extents (without device-mapper a volume needs contiguous space)"
                    ))
                })?;
                cmd = cmd
                    .arg("-Zn")
                    .arg("-l")
                    .arg(count.to_string())
                    .args(["--alloc", "contiguous", "-n"])
                    .arg(name)
                    .arg(vg)
                    .arg(format!(
                        "{}:{}-{}",
                        range.pv.display(),
                        range.first,
                        range.first + count - 1
                    ));
                placed = Some(range);
            }
            (Layout::Linear, None) => {
                cmd = cmd.arg("-Zn").arg("-L").arg(format!("{size}b"));
                if let Some(stripes) = new.stripes {
                    cmd = cmd.arg("-i").arg(stripes.to_string());
                    if stripes > 1 {
                        segtype = "striped";
                    }
                }
                if let Some(stripe_size) = new.stripe_size {
                    cmd = cmd.arg("-I").arg(format!("{}k", stripe_size / 1024));
                }
                cmd = cmd.arg("-n").arg(name).arg(vg);
            }
        }
        let cmd = add_tags(cmd, new.tags, new.pending);
        if let Err(e) = self.lvm.change(cmd) {
            if let Some(range) = &placed {
                self.index().give_back(vg, range);
            }
            return Err(e);
        }
        let mut lv_tags = new.tags.to_vec();
        if new.pending {
            lv_tags.push(tags::PENDING.to_owned());
        }
        let mut row = LvRow {
            lv_name: name.to_owned(),
            vg_name: vg.to_owned(),
            lv_size: size,
            lv_tags,
            lv_attr: String::new(),
            segtype: segtype.to_owned(),
            pool_lv,
            origin: new
                .origin
                .map(|o| o.row.lv_name.clone())
                .unwrap_or_default(),
            lv_active: if dm { "active" } else { "" }.to_owned(),
            lv_path: format!("/dev/{vg}/{name}"),
            data_percent: None,
            lv_health_status: String::new(),
        };
        let lv = match placed {
            Some(range) => {
                row.lv_size = range.count * self.extent_size(vg)?;
                let mut lv = Lv::new(row, &[]);
                lv.place = Ok(range);
                lv
            }
            None if dm && new.origin.is_some_and(|o| o.row.is_thin()) => {
                // Thin snapshots skip activation unless asked; the size is the origin's.
                row.lv_size = new.origin.map_or(size, |o| o.row.lv_size);
                row.lv_active = "active".to_owned();
                let mut lv = Lv::new(row, &[]);
                lv.place = Err("a thin LV".to_owned());
                lv
            }
            None if dm => {
                let device = lv_device(&row);
                wait_for(&device)?;
                row.lv_size = device_size(&device)?;
                let mut lv = Lv::new(row, &[]);
                lv.place = Err("placed by lvm2".to_owned());
                lv
            }
            None => {
                // Placed by lvm2 without device-mapper (striped): ask where.
                return self.lookup_fresh(vg, name)?.ok_or_else(|| {
                    Error::Internal(format!("{vg}/{name} vanished after lvcreate"))
                });
            }
        };
        let mut index = self.index();
        if placed_by_lvm(&lv) && !lv.row.is_thin() {
            let extent = index.vg(vg).map_or(1, |v| v.extent_size);
            index.take_extents(vg, lv.row.lv_size.div_ceil(extent));
        }
        index.insert(lv.clone());
        Ok(lv)
    }
}

/// What a new LV is made of.
pub(super) struct New<'a> {
    pub(super) layout: Layout,
    pub(super) stripes: Option<u32>,
    pub(super) stripe_size: Option<u64>,
    pub(super) tags: &'a [String],
    pub(super) pending: bool,
    /// A thin snapshot of this thin LV.
    pub(super) origin: Option<&'a Lv>,
}

fn placed_by_lvm(lv: &Lv) -> bool {
    lv.place.is_err()
}

/// Removes an LV name from the in-flight set when the build ends.
pub(super) struct InFlight<'a> {
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

pub(super) fn add_tags(mut cmd: cli::LvmCmd, tag_list: &[String], pending: bool) -> cli::LvmCmd {
    for tag in tag_list {
        cmd = cmd.arg("--addtag").arg(tag);
    }
    if pending {
        cmd = cmd.arg("--addtag").arg(tags::PENDING);
    }
    cmd
}

/// A block device's size in bytes.
fn device_size(device: &Path) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut file = File::open(device).ctx("open", device)?;
    file.seek(SeekFrom::End(0)).ctx("size", device)
}
