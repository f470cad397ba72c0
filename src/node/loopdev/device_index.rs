//! [`LoopIndex`]: which loop device holds which backing file for one owner's files, scanned once
//! at start-up and kept up to date by attaching and detaching through it.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::attach::{attach, attach_read_only, detach, Window};
use super::identity::{backing_id, file_id, FileId};
use super::sysfs::attachments;
use crate::error::{Error, IoContext, Result};

/// The block device nodes directly in `dir` (e.g. `/dev`), as candidates for [`LoopIndex::scan`].
pub fn device_nodes(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(fs::read_dir(dir)
        .ctx("read", dir)?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_block_device()))
        .map(|e| e.path())
        .collect())
}

/// Which loop device holds which backing file, for the files one owner
/// cares about: built with one scan of the attached devices at start-up
/// (matched by device and inode, not by sysfs's path), kept up to date by
/// attaching and detaching through it, and checked on every use against
/// that device's status (a device detached and reused by someone else is
/// dropped, never trusted).
#[derive(Default)]
pub struct LoopIndex {
    devices: Mutex<BTreeMap<PathBuf, Attached>>,
}

/// The devices over one backing file, and that file's identity when it was indexed: a file
/// removed while attached (a volume whose record was lost) is still recognised.
#[derive(Clone)]
struct Attached {
    file: FileId,
    devices: Vec<PathBuf>,
}

impl LoopIndex {
    /// Index the attached devices over any of `files`.
    pub fn scan(files: impl IntoIterator<Item = PathBuf>) -> Result<Self> {
        let wanted: BTreeMap<FileId, PathBuf> = files
            .into_iter()
            .filter_map(|path| Some((file_id(&path)?, path)))
            .collect();
        // sysfs keeps the backing file's own name even when its directory reads wrong: opening
        // only the devices whose name matches keeps this scan from holding other owners'
        // devices open while they detach them.
        let names: BTreeSet<&OsStr> = wanted.values().filter_map(|p| p.file_name()).collect();
        let mut devices: BTreeMap<PathBuf, Attached> = BTreeMap::new();
        if !wanted.is_empty() {
            for attachment in attachments()? {
                let named = attachment.backing_file.file_name();
                if !named.is_some_and(|n| names.contains(n)) {
                    continue;
                }
                let Some(file) = backing_id(&attachment.device) else {
                    continue;
                };
                if let Some(path) = wanted.get(&file) {
                    devices
                        .entry(path.clone())
                        .or_insert_with(|| Attached {
                            file,
                            devices: Vec::new(),
                        })
                        .devices
                        .push(attachment.device);
                }
            }
        }
        Ok(LoopIndex {
            devices: Mutex::new(devices),
        })
    }

    fn devices(&self) -> MutexGuard<'_, BTreeMap<PathBuf, Attached>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The devices over `backing`, each verified against the kernel.
    pub fn find(&self, backing: &Path) -> Vec<PathBuf> {
        let Some(listed) = self.devices().get(backing).cloned() else {
            return Vec::new();
        };
        let verified: Vec<PathBuf> = listed
            .devices
            .iter()
            .filter(|device| backing_id(device) == Some(listed.file))
            .cloned()
            .collect();
        if verified.len() != listed.devices.len() {
            let mut devices = self.devices();
            match verified.is_empty() {
                true => devices.remove(backing),
                false => devices.insert(
                    backing.to_owned(),
                    Attached {
                        file: listed.file,
                        devices: verified.clone(),
                    },
                ),
            };
        }
        verified
    }

    /// Attach `backing` (see [`attach`]) and remember the device.
    pub fn attach(&self, backing: &Path, window: Window) -> Result<PathBuf> {
        self.remember(backing, attach(backing, window)?)
    }

    /// Attach `backing` read-only (see [`attach_read_only`]) and remember the device.
    pub fn attach_read_only(&self, backing: &Path) -> Result<PathBuf> {
        self.remember(backing, attach_read_only(backing)?)
    }

    fn remember(&self, backing: &Path, device: PathBuf) -> Result<PathBuf> {
        let file = backing_id(&device)
            .or_else(|| file_id(backing))
            .ok_or_else(|| Error::NotFound(format!("{} is not attached", device.display())))?;
        let mut devices = self.devices();
        let entry = devices.entry(backing.to_owned()).or_insert(Attached {
            file,
            devices: Vec::new(),
        });
        // A new file at the same path: the old one's devices are not this file's.
        if entry.file != file {
            *entry = Attached {
                file,
                devices: Vec::new(),
            };
        }
        entry.devices.push(device.clone());
        Ok(device)
    }

    /// Detach one device over `backing` and forget it.
    pub fn detach(&self, backing: &Path, device: &Path) -> Result<()> {
        detach(device)?;
        let mut devices = self.devices();
        if let Some(entry) = devices.get_mut(backing) {
            entry.devices.retain(|d| d != device);
            if entry.devices.is_empty() {
                devices.remove(backing);
            }
        }
        Ok(())
    }

    /// Detach every device over `backing`.
    pub fn detach_all(&self, backing: &Path) -> Result<()> {
        for device in self.find(backing) {
            self.detach(backing, &device)?;
        }
        Ok(())
    }
}
