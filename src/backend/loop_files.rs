//! The loop backend: one image file per volume, attached as a loop device.
//!
//! `<dir>/<id>.img` + `<id>.json` per volume, `<dir>/snapshots/<id>.img` +
//! `<id>.json` per snapshot (see `image_store` for the commit protocol).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{fallocate, FallocateFlags, Flock, FlockArg};

use super::image_store::ImageStore;
use super::{Backend, ByteRange, PoolCapacity, SnapshotRecord, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::model::io_limits::IoLimits;
use crate::model::spec::unknown_param;
use crate::model::volume_size::MIB;
use crate::model::ContentSource;
use crate::model::{SnapshotId, VolumeId};
use crate::node::loopdev::{self, LoopIndex, Window};
use crate::node::{copy, freeze, mount};

mod fill;

const LOCK_FILE: &str = ".kennel.lock";
const SNAPSHOT_DIR: &str = "snapshots";

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
    volumes: ImageStore<VolumeRecord>,
    snapshots: ImageStore<SnapshotRecord>,
    /// Bytes promised to allocations in flight, so concurrent creates of
    /// different volumes cannot overcommit the pool.
    reserved: Mutex<u64>,
    /// Which loop device holds which image: no call lists every loop device.
    attachments: LoopIndex,
    _lock: Flock<File>,
}

/// Room held for one allocation until it is committed or abandoned.
struct Reservation<'a> {
    backend: &'a LoopBackend,
    bytes: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        *self.backend.reserved() -= self.bytes;
    }
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

        // After the lock (no other driver attaches our images meanwhile), before the store drops
        // images without a record: every file here, so a volume whose record is lost is still
        // taken down where it is attached.
        let files = fs::read_dir(&dir).ctx("read", &dir)?;
        let attachments = LoopIndex::scan(files.flatten().map(|e| e.path()))?;
        let volumes = ImageStore::<VolumeRecord>::open(&dir)?;
        let snapshots = ImageStore::<SnapshotRecord>::open(&dir.join(SNAPSHOT_DIR))?;
        let free = filesystem_free(&dir)?;
        let reserve_bytes = config
            .reserve
            .unwrap_or_else(|| default_reserve(filesystem_total(&dir).unwrap_or(0)));
        let allocated: u64 = match config.provisioning {
            Provisioning::Preallocated => {
                volumes.list().iter().map(|r| r.capacity_bytes).sum::<u64>()
                    + snapshots.list().iter().map(|s| s.size_bytes).sum::<u64>()
            }
            Provisioning::Sparse => 0,
        };
        let pool_bytes = config
            .capacity
            .unwrap_or_else(|| (free + allocated).saturating_sub(reserve_bytes));
        Ok(LoopBackend {
            attachments,
            dir,
            pool_bytes,
            reserve_bytes,
            provisioning: config.provisioning,
            volumes,
            snapshots,
            reserved: Mutex::new(0),
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn provisioned(&self) -> u64 {
        self.volumes
            .list()
            .iter()
            .map(|r| r.capacity_bytes)
            .sum::<u64>()
            + self
                .snapshots
                .list()
                .iter()
                .map(|s| s.size_bytes)
                .sum::<u64>()
    }

    fn reserved(&self) -> std::sync::MutexGuard<'_, u64> {
        self.reserved.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hold `extra` bytes of the pool for an allocation, or refuse.
    fn reserve(&self, extra: u64) -> Result<Reservation<'_>> {
        let mut reserved = self.reserved();
        let available = self.available(*reserved)?;
        if extra > available {
            return Err(Error::Exhausted(format!(
                "{extra} bytes requested, {available} bytes available in {}",
                self.dir.display()
            )));
        }
        *reserved += extra;
        Ok(Reservation {
            backend: self,
            bytes: extra,
        })
    }

    fn pool(&self) -> Result<PoolCapacity> {
        let reserved = *self.reserved();
        Ok(PoolCapacity {
            total_bytes: self.pool_bytes,
            available_bytes: self.available(reserved)?,
            provisioned_bytes: self.provisioned(),
        })
    }

    /// Bytes a new allocation may take, with `reserved` already promised.
    fn available(&self, reserved: u64) -> Result<u64> {
        let under_pool = self
            .pool_bytes
            .saturating_sub(self.provisioned() + reserved);
        let available = match self.provisioning {
            // Allocation is real: the filesystem's free space is a hard limit too.
            Provisioning::Preallocated => {
                under_pool.min(filesystem_free(&self.dir)?.saturating_sub(self.reserve_bytes))
            }
            Provisioning::Sparse => under_pool,
        };
        Ok(available / MIB * MIB)
    }

    /// Give `file` its full `size`, allocated up front unless sparse.
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

    /// The image holding a content source's data.
    fn source_image(&self, source: &ContentSource) -> Result<PathBuf> {
        match source {
            ContentSource::Snapshot(id) => {
                self.snapshots
                    .get(id)
                    .ok_or_else(|| Error::NotFound(format!("snapshot {id} not found")))?;
                Ok(self.snapshots.image_path(id))
            }
            ContentSource::Volume(id) => {
                self.volumes
                    .get(id)
                    .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
                Ok(self.volumes.image_path(id))
            }
        }
    }

    /// Where the volume's filesystem is mounted on this node, if it is.
    fn mounted_at(&self, id: &VolumeId) -> Result<Option<PathBuf>> {
        match self.attached_device(id)? {
            Some(device) => mount::mount_point_of(&device),
            None => Ok(None),
        }
    }

    /// Copy a volume's image; if its filesystem is mounted, freeze it meanwhile
    /// so the copy is consistent.
    fn copy_volume_image(
        &self,
        id: &VolumeId,
        dst: &mut File,
        dst_path: &Path,
    ) -> Result<copy::CopyKind> {
        let src = self.volumes.image_path(id);
        match self.mounted_at(id)? {
            Some(point) => {
                freeze::while_frozen(&point, || copy::clone_or_copy(&src, dst, dst_path))
            }
            None => copy::clone_or_copy(&src, dst, dst_path),
        }
    }

    /// The images of a group's members: created first, filled while every mounted source is
    /// frozen (reflinks where the filesystem has them, so the freeze is short), committed
    /// after the thaw.
    fn cut_group(&self, members: &[SnapshotRecord]) -> Result<()> {
        let mut images = Vec::with_capacity(members.len());
        for member in members {
            let file = self.snapshots.create_image(&member.id)?;
            images.push((file, self.snapshots.image_path(&member.id)));
        }
        let mut mounted = Vec::new();
        for member in members {
            mounted.extend(self.mounted_at(&member.source_volume)?);
        }
        freeze::while_all_frozen(&mounted, || {
            crate::faults::step("group snapshot: all frozen");
            for (member, (file, image)) in members.iter().zip(images.iter_mut()) {
                copy::clone_or_copy(&self.volumes.image_path(&member.source_volume), file, image)?;
            }
            crate::faults::step("group snapshot: all copied, still frozen");
            Ok(())
        })?;
        for (file, image) in &images {
            file.sync_all().ctx("fsync", image)?;
        }
        for member in members {
            self.snapshots.commit(member)?;
        }
        Ok(())
    }

    fn fill_volume(&self, record: &VolumeRecord, file: &mut File, image: &Path) -> Result<()> {
        if let Some(source) = &record.source {
            match source {
                ContentSource::Volume(id) => {
                    self.copy_volume_image(id, file, image)?;
                }
                ContentSource::Snapshot(_) => {
                    copy::clone_or_copy(&self.source_image(source)?, file, image)?;
                }
            }
        }
        self.allocate(file, image, record.capacity_bytes)?;
        file.sync_all().ctx("fsync", image)
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
        Ok(self.volumes.list())
    }

    fn get(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        Ok(self.volumes.get(id))
    }

    fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        Ok(self.volumes.find_by_name(name))
    }

    fn create(&self, record: &VolumeRecord) -> Result<()> {
        if let Some(source) = &record.source {
            self.source_image(source)?;
        }
        let _room = self.reserve(record.capacity_bytes)?;
        let mut file = self.volumes.create_image(&record.id)?;
        let image = self.volumes.image_path(&record.id);
        let done = self
            .fill_volume(record, &mut file, &image)
            .and_then(|()| self.volumes.commit(record));
        if done.is_err() {
            self.volumes.discard_image(&record.id);
        }
        done
    }

    fn create_filled(
        &self,
        record: &VolumeRecord,
        fill: &mut dyn FnMut(&ByteRange) -> Result<()>,
    ) -> Result<()> {
        self.create_filled_image(record, fill)
    }

    fn snapshot_bytes(&self, id: &SnapshotId) -> Result<Option<ByteRange>> {
        self.snapshot_image_bytes(id)
    }

    fn delete(&self, id: &VolumeId) -> Result<()> {
        if let Some(device) = self.attached_device(id)? {
            return Err(Error::Precondition(format!(
                "volume {id} is staged on this node ({}); unstage it first",
                device.display()
            )));
        }
        self.volumes.remove(id)
    }

    fn expand(&self, id: &VolumeId, new_size: u64) -> Result<VolumeRecord> {
        let mut record = self
            .volumes
            .get(id)
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if new_size <= record.capacity_bytes {
            return Ok(record);
        }
        let _room = self.reserve(new_size - record.capacity_bytes)?;
        let image = self.volumes.image_path(id);
        let file = OpenOptions::new()
            .write(true)
            .open(&image)
            .ctx("open image", &image)?;
        self.allocate(&file, &image, new_size)?;
        file.sync_all().ctx("fsync", &image)?;
        record.capacity_bytes = new_size;
        self.volumes.commit(&record)?;
        Ok(record)
    }

    fn set_io_limits(&self, id: &VolumeId, limits: IoLimits) -> Result<VolumeRecord> {
        let mut record = self
            .volumes
            .get(id)
            .ok_or_else(|| Error::VolumeNotFound(id.to_string()))?;
        if record.params.io_limits != limits {
            record.params.io_limits = limits;
            self.volumes.commit(&record)?;
        }
        Ok(record)
    }

    fn capacity(&self, _params: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        self.pool()
    }

    fn check_params(&self, params: &BTreeMap<String, String>) -> Result<()> {
        match params.keys().next() {
            Some(key) => Err(unknown_param(key, "loop", &[])),
            None => Ok(()),
        }
    }

    fn create_snapshot(&self, snapshot: &SnapshotRecord) -> Result<()> {
        if self.snapshots.get(&snapshot.id).is_some() {
            return Ok(());
        }
        self.volumes
            .get(&snapshot.source_volume)
            .ok_or_else(|| Error::VolumeNotFound(snapshot.source_volume.to_string()))?;
        let _room = self.reserve(snapshot.size_bytes)?;
        let mut file = self.snapshots.create_image(&snapshot.id)?;
        let image = self.snapshots.image_path(&snapshot.id);
        let done = self
            .copy_volume_image(&snapshot.source_volume, &mut file, &image)
            .and_then(|_| file.sync_all().ctx("fsync", &image))
            .and_then(|()| self.snapshots.commit(snapshot));
        if done.is_err() {
            self.snapshots.discard_image(&snapshot.id);
        }
        done
    }

    fn create_group_snapshot(&self, members: &[SnapshotRecord]) -> Result<()> {
        if members.iter().all(|m| self.snapshots.get(&m.id).is_some()) {
            return Ok(());
        }
        for member in members {
            self.volumes
                .get(&member.source_volume)
                .ok_or_else(|| Error::VolumeNotFound(member.source_volume.to_string()))?;
        }
        let _room = self.reserve(members.iter().map(|m| m.size_bytes).sum())?;
        let done = self.cut_group(members);
        if done.is_err() {
            for member in members {
                if let Err(e) = self.snapshots.remove(&member.id) {
                    tracing::error!(snapshot_id = %member.id, error = %e, "cannot remove a member of a failed group snapshot");
                }
            }
        }
        done
    }

    fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.snapshots.remove(id)
    }

    fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        Ok(self.snapshots.list())
    }

    fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>> {
        Ok(self.snapshots.get(id))
    }

    fn find_snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        match self.snapshots.find_by_name(name) {
            Some(s) if s.group.is_some() => Ok(self
                .snapshots
                .list()
                .into_iter()
                .find(|s| s.name == name && s.group.is_none())),
            found => Ok(found),
        }
    }

    fn attach(&self, id: &VolumeId) -> Result<PathBuf> {
        if let Some(device) = self.attached_device(id)? {
            return Ok(device);
        }
        let image = self.volumes.image_path(id);
        if !image.exists() {
            return Err(Error::VolumeNotFound(id.to_string()));
        }
        self.attachments.attach(&image, Window::default())
    }

    fn detach(&self, id: &VolumeId) -> Result<()> {
        self.attachments.detach_all(&self.volumes.image_path(id))
    }

    fn attached_device(&self, id: &VolumeId) -> Result<Option<PathBuf>> {
        Ok(self
            .attachments
            .find(&self.volumes.image_path(id))
            .into_iter()
            .next())
    }

    fn refresh_device(&self, id: &VolumeId) -> Result<()> {
        match self.attached_device(id)? {
            Some(device) => loopdev::refresh_capacity(&device),
            None => Ok(()),
        }
    }

    fn health(&self, record: &VolumeRecord) -> Option<String> {
        let image = self.volumes.image_path(&record.id);
        match fs::metadata(&image) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(format!(
                "image file {} is gone (deleted outside Kennel): a staged volume's data is \
                 still readable through its loop device until it is unstaged, so copy it off \
                 now; otherwise the data is lost unless the file is restored",
                image.display()
            )),
            Err(e) => Some(format!(
                "image file {} cannot be read: {e}",
                image.display()
            )),
            Ok(meta) if meta.len() < record.capacity_bytes => Some(format!(
                "image file {} is {} bytes, not {}: it was truncated outside Kennel and the \
                 data past its end is lost; restore the image from a backup",
                image.display(),
                meta.len(),
                record.capacity_bytes
            )),
            Ok(_) => None,
        }
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
mod tests;
