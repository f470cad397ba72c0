//! The loop backend: one image file per volume plus its record as JSON.
//!
//! `<dir>/<id>.img` holds the data, `<dir>/<id>.json` describes it. The JSON
//! file is the commit point: it is written (temp file, fsync, rename, fsync
//! dir) only after the image is fully allocated, and removed before the image
//! on delete. An image without a record is debris from an interrupted call and
//! is removed when the backend opens.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags, Flock, FlockArg};

use super::{Backend, PoolCapacity, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::node::loopdev::{self, Window};
use crate::volume::capacity::MIB;
use crate::volume::VolumeId;

const IMAGE_EXT: &str = "img";
const RECORD_EXT: &str = "json";
const TEMP_SUFFIX: &str = ".tmp";
const LOCK_FILE: &str = ".kennel.lock";

/// How images take space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Provisioning {
    /// Every byte allocated at creation: a volume can never hit ENOSPC later.
    Preallocated,
    /// Sparse images: the pool may be overcommitted; blocks are allocated on write.
    Sparse,
}

#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub dir: PathBuf,
    /// Pool size; `None`: the directory's free space (plus existing images) minus the reserve.
    pub capacity: Option<u64>,
    /// Space always left free on the directory's filesystem.
    pub reserve: Option<u64>,
    pub provisioning: Provisioning,
}

pub struct LoopBackend {
    dir: PathBuf,
    pool_bytes: u64,
    reserve_bytes: u64,
    provisioning: Provisioning,
    /// Mirror of the records on disk; this process is their only writer (the lock file).
    records: Mutex<BTreeMap<VolumeId, VolumeRecord>>,
    _lock: Flock<File>,
}

impl LoopBackend {
    pub fn open(config: LoopConfig) -> Result<Self> {
        fs::create_dir_all(&config.dir).ctx("create", &config.dir)?;
        let dir = fs::canonicalize(&config.dir).ctx("resolve", &config.dir)?;
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .ctx("chmod", &dir)?;
        let lock_path = dir.join(LOCK_FILE);
        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .ctx("open", &lock_path)?;
        let lock =
            Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
                Error::Precondition(format!(
                    "{} is in use by another Kennel driver ({errno})",
                    dir.display()
                ))
            })?;

        let records = recover(&dir)?;
        let free = filesystem_free(&dir)?;
        let fs_total = filesystem_total(&dir)?;
        let reserve_bytes = config.reserve.unwrap_or_else(|| default_reserve(fs_total));
        let allocated: u64 = match config.provisioning {
            Provisioning::Preallocated => records.values().map(|r| r.capacity_bytes).sum(),
            Provisioning::Sparse => 0,
        };
        let pool_bytes = config
            .capacity
            .unwrap_or_else(|| (free + allocated).saturating_sub(reserve_bytes));
        Ok(LoopBackend {
            dir,
            pool_bytes,
            reserve_bytes,
            provisioning: config.provisioning,
            records: Mutex::new(records),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn image_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.{IMAGE_EXT}"))
    }

    fn record_path(&self, id: &VolumeId) -> PathBuf {
        self.dir.join(format!("{id}.{RECORD_EXT}"))
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<VolumeId, VolumeRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn provisioned(&self) -> u64 {
        self.records().values().map(|r| r.capacity_bytes).sum()
    }

    /// Bytes a new allocation of `extra` bytes may take, or why not.
    fn check_room(&self, extra: u64) -> Result<()> {
        let cap = self.capacity()?;
        if extra > cap.available_bytes {
            return Err(Error::Exhausted(format!(
                "{extra} bytes requested, {} bytes available in {}",
                cap.available_bytes,
                self.dir.display()
            )));
        }
        Ok(())
    }

    fn allocate(&self, file: &File, path: &Path, size: u64) -> Result<()> {
        match self.provisioning {
            Provisioning::Sparse => file.set_len(size).ctx("resize", path),
            Provisioning::Preallocated => {
                match fallocate(file, FallocateFlags::empty(), 0, size as i64) {
                    Ok(()) => Ok(()),
                    Err(Errno::ENOSPC) => Err(Error::Exhausted(format!(
                        "no space left for {size} bytes in {}",
                        self.dir.display()
                    ))),
                    Err(Errno::EOPNOTSUPP) => Err(Error::Precondition(format!(
                        "the filesystem of {} cannot preallocate; use --provisioning sparse",
                        self.dir.display()
                    ))),
                    Err(e) => Err(Error::io("fallocate", path, e.into())),
                }
            }
        }
    }

    fn write_record(&self, record: &VolumeRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| Error::Internal(format!("encode record: {e}")))?;
        write_atomically(&self.dir, &self.record_path(&record.id), &json)
    }
}

impl Backend for LoopBackend {
    fn kind(&self) -> &'static str {
        "loop"
    }

    fn granularity(&self) -> u64 {
        MIB
    }

    fn list(&self) -> Result<Vec<VolumeRecord>> {
        Ok(self.records().values().cloned().collect())
    }

    fn get(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        Ok(self.records().get(id).cloned())
    }

    fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.records().values().find(|r| r.name == name).cloned())
    }

    fn create(&self, record: &VolumeRecord) -> Result<()> {
        self.check_room(record.capacity_bytes)?;
        let image = self.image_path(&record.id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&image)
            .ctx("create image", &image)?;
        let written = self
            .allocate(&file, &image, record.capacity_bytes)
            .and_then(|()| file.sync_all().ctx("fsync", &image))
            .and_then(|()| self.write_record(record));
        if let Err(e) = written {
            let _ = fs::remove_file(&image);
            return Err(e);
        }
        self.records().insert(record.id.clone(), record.clone());
        Ok(())
    }

    fn delete(&self, id: &VolumeId) -> Result<()> {
        let image = self.image_path(id);
        if let Some(attached) = loopdev::find_attached(&image)?.first() {
            return Err(Error::Precondition(format!(
                "volume {id} is staged on this node ({}); unstage it first",
                attached.device.display()
            )));
        }
        // Record first: once it is gone the volume is gone, even if we crash
        // before the image is removed (the image is then debris for recover()).
        remove_if_exists(&self.record_path(id))?;
        sync_dir(&self.dir)?;
        remove_if_exists(&image)?;
        self.records().remove(id);
        Ok(())
    }

    fn expand(&self, id: &VolumeId, new_size: u64) -> Result<VolumeRecord> {
        let mut record = self
            .get(id)?
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if new_size <= record.capacity_bytes {
            return Ok(record);
        }
        self.check_room(new_size - record.capacity_bytes)?;
        let image = self.image_path(id);
        let file = OpenOptions::new()
            .write(true)
            .open(&image)
            .ctx("open image", &image)?;
        self.allocate(&file, &image, new_size)?;
        file.sync_all().ctx("fsync", &image)?;
        record.capacity_bytes = new_size;
        self.write_record(&record)?;
        self.records().insert(id.clone(), record.clone());
        Ok(record)
    }

    fn capacity(&self) -> Result<PoolCapacity> {
        let provisioned = self.provisioned();
        let under_pool = self.pool_bytes.saturating_sub(provisioned);
        let available = match self.provisioning {
            // Allocation is real: the filesystem's free space is the hard limit too.
            Provisioning::Preallocated => {
                under_pool.min(filesystem_free(&self.dir)?.saturating_sub(self.reserve_bytes))
            }
            Provisioning::Sparse => under_pool,
        };
        Ok(PoolCapacity {
            total_bytes: self.pool_bytes,
            available_bytes: available / MIB * MIB,
            provisioned_bytes: provisioned,
        })
    }

    fn attach(&self, id: &VolumeId) -> Result<PathBuf> {
        if let Some(device) = self.attached_device(id)? {
            return Ok(device);
        }
        let image = self.image_path(id);
        if !image.exists() {
            return Err(Error::VolumeNotFound(id.to_string()));
        }
        loopdev::attach(&image, Window::default())
    }

    fn detach(&self, id: &VolumeId) -> Result<()> {
        for attachment in loopdev::find_attached(&self.image_path(id))? {
            loopdev::detach(&attachment.device)?;
        }
        Ok(())
    }

    fn attached_device(&self, id: &VolumeId) -> Result<Option<PathBuf>> {
        Ok(loopdev::find_attached(&self.image_path(id))?
            .into_iter()
            .next()
            .map(|a| a.device))
    }

    fn refresh_device(&self, id: &VolumeId) -> Result<()> {
        match self.attached_device(id)? {
            Some(device) => loopdev::refresh_capacity(&device),
            None => Ok(()),
        }
    }

    fn health(&self, record: &VolumeRecord) -> Option<String> {
        let image = self.image_path(&record.id);
        match fs::metadata(&image) {
            Err(e) => Some(format!("image {} unreadable: {e}", image.display())),
            Ok(meta) if meta.len() < record.capacity_bytes => Some(format!(
                "image {} is {} bytes, expected {}",
                image.display(),
                meta.len(),
                record.capacity_bytes
            )),
            Ok(_) => None,
        }
    }
}

/// Load every committed record and remove debris of interrupted calls.
fn recover(dir: &Path) -> Result<BTreeMap<VolumeId, VolumeRecord>> {
    let mut records = BTreeMap::new();
    let mut images = Vec::new();
    for entry in fs::read_dir(dir).ctx("read", dir)?.flatten() {
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if file_name.ends_with(TEMP_SUFFIX) {
            remove_if_exists(&path)?;
            continue;
        }
        let Some((stem, ext)) = file_name.rsplit_once('.') else {
            continue;
        };
        let Some(id) = VolumeId::parse(stem) else {
            continue;
        };
        match ext {
            RECORD_EXT => {
                let bytes = fs::read(&path).ctx("read", &path)?;
                let record: VolumeRecord = serde_json::from_slice(&bytes).map_err(|e| {
                    Error::Internal(format!("corrupt record {}: {e}", path.display()))
                })?;
                if record.id != id {
                    return Err(Error::Internal(format!(
                        "{} describes volume {}",
                        path.display(),
                        record.id
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

fn filesystem_free(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ctx("statvfs", dir)?;
    Ok(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn filesystem_total(dir: &Path) -> Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ctx("statvfs", dir)?;
    Ok(st.blocks() as u64 * st.fragment_size() as u64)
}

/// 5% of the filesystem, at most 10 GiB: room for the node's own needs.
fn default_reserve(fs_total: u64) -> u64 {
    (fs_total / 20).min(10 << 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::capacity::CapacityRange;

    fn record(name: &str, size: u64) -> VolumeRecord {
        VolumeRecord {
            id: VolumeId::generate(),
            name: name.to_owned(),
            capacity_bytes: size,
            requested: CapacityRange::default(),
            capabilities: vec![],
            params: Default::default(),
            node_id: "n".into(),
            machine_id: "m".into(),
            created_unix: 0,
        }
    }

    fn open(dir: &Path, capacity: u64, provisioning: Provisioning) -> LoopBackend {
        LoopBackend::open(LoopConfig {
            dir: dir.to_owned(),
            capacity: Some(capacity),
            reserve: Some(0),
            provisioning,
        })
        .unwrap()
    }

    #[test]
    fn create_persists_and_reopen_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let rec = record("a", 4 * MIB);
        {
            let backend = open(dir.path(), 64 * MIB, Provisioning::Preallocated);
            backend.create(&rec).unwrap();
            let meta = fs::metadata(backend.image_path(&rec.id)).unwrap();
            assert_eq!(meta.len(), 4 * MIB);
            // Preallocated: the blocks are really there.
            use std::os::unix::fs::MetadataExt;
            assert!(meta.blocks() * 512 >= 4 * MIB);
        }
        let backend = open(dir.path(), 64 * MIB, Provisioning::Preallocated);
        assert_eq!(backend.find_by_name("a").unwrap(), Some(rec.clone()));
        assert_eq!(backend.capacity().unwrap().available_bytes, 60 * MIB);
        backend.delete(&rec.id).unwrap();
        backend.delete(&rec.id).unwrap();
        assert!(!backend.image_path(&rec.id).exists());
        assert_eq!(backend.list().unwrap(), vec![]);
    }

    #[test]
    fn only_one_driver_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path(), 64 * MIB, Provisioning::Sparse);
        let second = LoopBackend::open(LoopConfig {
            dir: dir.path().to_owned(),
            capacity: Some(MIB),
            reserve: Some(0),
            provisioning: Provisioning::Sparse,
        });
        assert!(matches!(second, Err(Error::Precondition(_))));
    }

    #[test]
    fn debris_of_interrupted_calls_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let orphan = VolumeId::generate();
        fs::write(dir.path().join(format!("{orphan}.img")), b"x").unwrap();
        fs::write(dir.path().join(format!("{orphan}.json.tmp")), b"{").unwrap();
        fs::write(dir.path().join("unrelated.txt"), b"keep").unwrap();
        let backend = open(dir.path(), 64 * MIB, Provisioning::Sparse);
        assert!(backend.list().unwrap().is_empty());
        assert!(!dir.path().join(format!("{orphan}.img")).exists());
        assert!(!dir.path().join(format!("{orphan}.json.tmp")).exists());
        assert!(dir.path().join("unrelated.txt").exists());
    }

    #[test]
    fn pool_limits_creation_and_expansion() {
        let dir = tempfile::tempdir().unwrap();
        let backend = open(dir.path(), 10 * MIB, Provisioning::Sparse);
        let a = record("a", 8 * MIB);
        backend.create(&a).unwrap();
        assert!(matches!(
            backend.create(&record("b", 4 * MIB)),
            Err(Error::Exhausted(_))
        ));
        // The failed create left nothing behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 3);
        assert!(matches!(
            backend.expand(&a.id, 12 * MIB),
            Err(Error::Exhausted(_))
        ));
        let grown = backend.expand(&a.id, 10 * MIB).unwrap();
        assert_eq!(grown.capacity_bytes, 10 * MIB);
        assert_eq!(
            fs::metadata(backend.image_path(&a.id)).unwrap().len(),
            10 * MIB
        );
        let reopened_records = recover(dir.path()).unwrap();
        assert_eq!(reopened_records[&a.id].capacity_bytes, 10 * MIB);
        assert_eq!(backend.capacity().unwrap().available_bytes, 0);
    }
}
