//! Where an LV's bytes are: with device-mapper its `/dev/VG/LV` device;
//! without it a window (byte range) of its PV, exposed through a loop
//! device. Also whether an LV is attached (staged) on this node.

use std::fs;
use std::path::{Path, PathBuf};

use super::activation::{lv_device, wait_for};
use super::data::ByteRange;
use super::index::Lv;
use super::LvmBackend;
use crate::error::{Error, IoContext, Result};
use crate::node::loopdev::{self, Window};

impl LvmBackend {
    /// Run `work` with the LV's bytes reachable: its active device-mapper
    /// device (activated first if needed), or its PV range.
    pub(super) fn with_bytes<T>(
        &self,
        lv: &Lv,
        work: impl FnOnce(&ByteRange) -> Result<T>,
    ) -> Result<T> {
        work(&self.bytes_of(lv)?)
    }

    /// Where the LV's bytes are: its active device-mapper device (activated
    /// first if needed), or exactly its extents' range of its PV.
    pub(super) fn bytes_of(&self, lv: &Lv) -> Result<ByteRange> {
        if self.lvm.device_mapper() {
            if lv.row.lv_active != "active" {
                self.activate(lv)?;
            }
            let device = lv_device(&lv.row);
            wait_for(&device)?;
            Ok(ByteRange {
                device,
                offset: 0,
                len: lv.row.lv_size,
            })
        } else {
            let (device, window) = self.window(lv)?;
            Ok(ByteRange {
                device,
                offset: window.offset,
                len: window.size_limit,
            })
        }
    }

    /// The PV and byte window holding a contiguous linear LV.
    pub(super) fn window(&self, lv: &Lv) -> Result<(PathBuf, Window)> {
        if lv.missing {
            return Err(Error::Precondition(format!(
                "logical volume {}/{} is missing (removed outside Kennel)",
                lv.row.vg_name, lv.row.lv_name
            )));
        }
        let (pv, offset, len) = self.index().window(lv).map_err(|why| {
            Error::Precondition(format!(
                "{}/{} cannot be used without device-mapper: {why}",
                lv.row.vg_name, lv.row.lv_name
            ))
        })?;
        let device = fs::canonicalize(&pv).ctx("resolve", &pv)?;
        Ok((
            device,
            Window {
                offset,
                size_limit: len,
            },
        ))
    }

    pub(super) fn window_attachment(&self, lv: &Lv) -> Result<Option<PathBuf>> {
        let (pv, window) = self.window(lv)?;
        Ok(self
            .window_device(&pv, window.offset)
            .map(|(device, _)| device))
    }

    /// The loop device over `pv` at `offset`, and its current window.
    pub(super) fn window_device(&self, pv: &Path, offset: u64) -> Option<(PathBuf, Window)> {
        self.windows.find(pv).into_iter().find_map(|device| {
            let current = loopdev::window_of_node(&device)?;
            (current.offset == offset).then_some((device, current))
        })
    }

    /// The loop device already exposing the LV at `window.offset` of `pv`,
    /// its size limit brought up to date (the LV may have grown since).
    pub(super) fn current_window(&self, pv: &Path, window: Window) -> Result<Option<PathBuf>> {
        let Some((device, current)) = self.window_device(pv, window.offset) else {
            return Ok(None);
        };
        if current.size_limit != window.size_limit {
            loopdev::set_window(&device, window)?;
        }
        Ok(Some(device))
    }

    pub(super) fn staged_marker(&self, lv: &Lv) -> PathBuf {
        self.staged_dir
            .join(format!("{}_{}", lv.row.vg_name, lv.row.lv_name))
    }

    pub(super) fn attached_lv_device(&self, lv: &Lv) -> Result<Option<PathBuf>> {
        if self.lvm.device_mapper() {
            let device = lv_device(&lv.row);
            Ok((self.staged_marker(lv).exists() && device.exists()).then_some(device))
        } else {
            match self.window_attachment(lv) {
                Ok(found) => Ok(found),
                // An LV that cannot have a window has no attachment either.
                Err(Error::Precondition(_)) => Ok(None),
                Err(e) => Err(e),
            }
        }
    }
}
