//! A directory of `<id>.img` files, each described by `<id>.json`.
//!
//! The JSON record is the commit point: it is written (temp file, fsync,
//! rename, fsync dir) only after the image is complete, and removed before the
//! image. An image without a record is debris of an interrupted call and is
//! removed when the store opens. Records are mirrored in memory; the loop
//! backend's lock file makes this process their only writer.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::{SnapshotRecord, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::model::{SnapshotId, VolumeId};

const IMAGE_EXT: &str = "img";
const RECORD_EXT: &str = "json";
const TEMP_SUFFIX: &str = ".tmp";

/// A record stored beside its image.
pub trait Stored: Serialize + DeserializeOwned + Clone {
    type Id: Ord + Clone + Display;
    fn id(&self) -> &Self::Id;
    fn parse_id(raw: &str) -> Option<Self::Id>;
    fn name(&self) -> &str;
}

impl Stored for VolumeRecord {
    type Id = VolumeId;
    fn id(&self) -> &VolumeId {
        &self.id
    }
    fn parse_id(raw: &str) -> Option<VolumeId> {
        VolumeId::parse(raw)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Stored for SnapshotRecord {
    type Id = SnapshotId;
    fn id(&self) -> &SnapshotId {
        &self.id
    }
    fn parse_id(raw: &str) -> Option<SnapshotId> {
        SnapshotId::parse(raw)
    }
    fn name(&self) -> &str {
        &self.name
    }
}

pub struct ImageStore<R: Stored> {
    dir: PathBuf,
    records: Mutex<BTreeMap<R::Id, R>>,
}

impl<R: Stored> ImageStore<R> {
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).ctx("create", dir)?;
        let records = recover::<R>(dir)?;
        Ok(ImageStore {
            dir: dir.to_owned(),
            records: Mutex::new(records),
        })
    }

    pub fn image_path(&self, id: &R::Id) -> PathBuf {
        self.dir.join(format!("{id}.{IMAGE_EXT}"))
    }

    fn record_path(&self, id: &R::Id) -> PathBuf {
        self.dir.join(format!("{id}.{RECORD_EXT}"))
    }

    fn records(&self) -> MutexGuard<'_, BTreeMap<R::Id, R>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<R> {
        self.records().values().cloned().collect()
    }

    pub fn get(&self, id: &R::Id) -> Option<R> {
        self.records().get(id).cloned()
    }

    pub fn find_by_name(&self, name: &str) -> Option<R> {
        self.records().values().find(|r| r.name() == name).cloned()
    }

    /// Create the image file exclusively; the caller fills it, then commits.
    pub fn create_image(&self, id: &R::Id) -> Result<File> {
        let image = self.image_path(id);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&image)
            .ctx("create image", &image)
            .inspect(|_| crate::faults::step("image created"))
    }

    /// Drop an image whose record was never committed.
    pub fn discard_image(&self, id: &R::Id) {
        let _ = fs::remove_file(self.image_path(id));
    }

    /// Persist `record` atomically: from here on it exists.
    pub fn commit(&self, record: &R) -> Result<()> {
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::Internal(format!("encode record: {e}")))?;
        crate::faults::step("image filled, record not yet written");
        write_atomically(&self.dir, &self.record_path(record.id()), &json)?;
        self.records().insert(record.id().clone(), record.clone());
        Ok(())
    }

    /// Remove record, then image. Unknown IDs are fine.
    pub fn remove(&self, id: &R::Id) -> Result<()> {
        remove_if_exists(&self.record_path(id))?;
        sync_dir(&self.dir)?;
        crate::faults::step("record removed, image not yet");
        remove_if_exists(&self.image_path(id))?;
        self.records().remove(id);
        Ok(())
    }
}

/// Load every committed record and remove debris of interrupted calls.
fn recover<R: Stored>(dir: &Path) -> Result<BTreeMap<R::Id, R>> {
    let mut records = BTreeMap::new();
    let mut images = Vec::new();
    for entry in fs::read_dir(dir).ctx("read", dir)?.flatten() {
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((stem, ext)) = file_name.split_once('.') else {
            continue;
        };
        let Some(id) = R::parse_id(stem) else {
            continue;
        };
        if file_name.ends_with(TEMP_SUFFIX) {
            remove_if_exists(&path)?;
            continue;
        }
        match ext {
            RECORD_EXT => {
                let bytes = fs::read(&path).ctx("read", &path)?;
                let record: R = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Internal(format!("corrupt record {}: {e}", path.display()))
                })?;
                if record.id() != &id {
                    return Err(Error::Internal(format!(
                        "{} describes {}",
                        path.display(),
                        record.id()
                    )));
                }
                records.insert(id, record);
            }
            IMAGE_EXT => images.push((id, path)),
            _ => {}
        }
    }
    for (id, image) in images {
        if !records.contains_key(&id) {
            tracing::warn!(image = %image.display(), "removing image of an interrupted create or delete");
            remove_if_exists(&image)?;
        }
    }
    Ok(records)
}

/// temp file, write, fsync, rename, fsync directory.
fn write_atomically(dir: &Path, path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(TEMP_SUFFIX);
    let tmp = PathBuf::from(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .ctx("create", &tmp)?;
    file.write_all(bytes).ctx("write", &tmp)?;
    file.sync_all().ctx("fsync", &tmp)?;
    fs::rename(&tmp, path).ctx("rename", path)?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).ctx("fsync", dir)
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debris_of_interrupted_calls_is_removed() {
        let dir = tempfile::tempdir().expect("test setup");
        let orphan = VolumeId::generate();
        fs::write(dir.path().join(format!("{orphan}.img")), b"x").expect("test setup");
        fs::write(dir.path().join(format!("{orphan}.json.tmp")), b"{").expect("test setup");
        fs::write(dir.path().join("unrelated.txt"), b"keep").expect("test setup");
        let store = ImageStore::<VolumeRecord>::open(dir.path()).expect("test setup");
        assert!(store.list().is_empty());
        assert!(!dir.path().join(format!("{orphan}.img")).exists());
        assert!(!dir.path().join(format!("{orphan}.json.tmp")).exists());
        assert!(dir.path().join("unrelated.txt").exists());
    }

    #[test]
    fn corrupt_records_stop_the_store_instead_of_losing_volumes() {
        let dir = tempfile::tempdir().expect("test setup");
        let id = VolumeId::generate();
        fs::write(dir.path().join(format!("{id}.json")), b"{not json").expect("test setup");
        assert!(ImageStore::<VolumeRecord>::open(dir.path()).is_err());
    }
}
