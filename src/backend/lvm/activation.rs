//! device-mapper activation: which mode the node side uses, activating
//! Kennel's LVs at start-up (after a reboot) and one LV on demand, the LVs
//! that failed to activate (one such LV makes its volume unhealthy, never
//! the driver), and the device nodes of active LVs.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::cli::LvRow;
use super::index::{Kind, Lv};
use super::LvmBackend;
use crate::error::{Error, Result};

/// How the node side reaches an LV's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Activation {
    /// `dm` when the kernel has device-mapper, `loop` otherwise.
    Auto,
    /// device-mapper: LVs active from creation to removal, `/dev/VG/LV`.
    Dm,
    /// No device-mapper: lvm2 with `--driverloaded n`, linear LVs allocated
    /// contiguously and exposed as a loop device over their PV range.
    Loop,
}

impl Activation {
    pub fn resolve(self) -> Activation {
        match self {
            Activation::Auto if device_mapper_available() => Activation::Dm,
            Activation::Auto => Activation::Loop,
            other => other,
        }
    }
}

/// Whether the kernel answers on `/dev/mapper/control` (the node alone
/// proves nothing: lvm2 creates it even where the kernel lacks the driver).
pub fn device_mapper_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .is_ok()
}

impl LvmBackend {
    /// device-mapper mode after a reboot: Kennel's LVs are active from
    /// creation to removal, so activate the ones that are not (one command).
    /// That covers full-copy snapshots and half-built LVs too, whose bytes
    /// must be reachable to be zeroed when they are removed. An LV that
    /// fails to activate is noted (its volume reports it in `health`, its
    /// calls retry the activation and fail naming it); the others are
    /// served as usual.
    pub(super) fn activate_all(&self) {
        if !self.lvm.device_mapper() {
            return;
        }
        let inactive: Vec<Lv> = self
            .index()
            .lvs()
            .filter(|lv| !lv.missing && lv.row.lv_active != "active" && kept_active(lv))
            .cloned()
            .collect();
        if inactive.is_empty() {
            return;
        }
        let _change = self.changing();
        let all = self
            .lvm
            .cmd("lvchange")
            .args(["-ay", "-K", "--"])
            .args(inactive.iter().map(full_name))
            .run();
        match all {
            Ok(_) => {
                for lv in &inactive {
                    self.activated(lv);
                }
            }
            Err(e) => {
                // lvm2 activates what it can and fails as a whole: find which, one by one.
                tracing::warn!(error = %e, "not every LV could be activated; activating them one by one");
                for lv in &inactive {
                    if let Err(e) = self.activate(lv) {
                        tracing::error!(lv = %full_name(lv), error = %e, "an LV cannot be activated; its volume is unusable until it can");
                    }
                }
            }
        }
    }

    /// Activate one LV. A failure is noted for `health` and names the LV.
    pub(super) fn activate(&self, lv: &Lv) -> Result<()> {
        let done = self
            .lvm
            .cmd("lvchange")
            .args(["-ay", "-K", "--"])
            .arg(full_name(lv))
            .run();
        match done {
            Ok(_) => {
                self.activated(lv);
                Ok(())
            }
            Err(e) => {
                let why = e.to_string();
                self.not_activated
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(full_name(lv), why.clone());
                Err(Error::Internal(format!(
                    "logical volume {} cannot be activated: {why}",
                    full_name(lv)
                )))
            }
        }
    }

    fn activated(&self, lv: &Lv) {
        self.not_activated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&full_name(lv));
        if let Some(indexed) = self.index().get_mut(&lv.row.vg_name, &lv.row.lv_name) {
            indexed.row.lv_active = "active".to_owned();
        }
    }

    /// Why an LV could not be activated, if its last activation failed.
    pub(super) fn activation_failure(&self, lv: &Lv) -> Option<String> {
        self.not_activated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&full_name(lv))
            .cloned()
    }
}

fn full_name(lv: &Lv) -> String {
    format!("{}/{}", lv.row.vg_name, lv.row.lv_name)
}

/// Whether Kennel keeps this LV active: its volumes, and its snapshots and
/// half-built LVs that hold their own extents. Thin snapshots are created
/// inactive (lvm2's activation skip) and hold nothing to zero.
fn kept_active(lv: &Lv) -> bool {
    match lv.kind {
        Kind::Volume(_) => true,
        Kind::Snapshot(_) | Kind::Pending => !lv.row.is_thin(),
        Kind::Corrupt(_) | Kind::Foreign => false,
    }
}

pub(super) fn lv_device(row: &LvRow) -> PathBuf {
    if row.lv_path.is_empty() {
        PathBuf::from(format!("/dev/{}/{}", row.vg_name, row.lv_name))
    } else {
        PathBuf::from(&row.lv_path)
    }
}

/// Wait (briefly) for a device node lvm2 or udev is creating.
pub(super) fn wait_for(device: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !device.exists() {
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "{} did not appear after activation",
                device.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
