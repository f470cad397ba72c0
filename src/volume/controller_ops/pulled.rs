//! Volumes whose bytes come from elsewhere (a snapshot held by another node): made blank,
//! filled by the caller's copy, and a volume only once the copy is complete and verified. A
//! retry of the same name while the copy runs waits for it (or answers ABORTED), and one after
//! it finds the finished volume; a failed or interrupted copy leaves nothing.
//!
//! The serving side registers a read of a snapshot for as long as its bytes are sent: a
//! DeleteSnapshot meanwhile answers ABORTED, so its extents are never reused under a reader,
//! and several nodes may read one snapshot at once.

use super::{check_same_volume, run_blocking, Controller};
use crate::backend::{ByteRange, SnapshotRecord, VolumeRecord};
use crate::error::{Error, Result};
use crate::model::spec::CreateRequest;
use crate::model::SnapshotId;
use crate::volume::readers::ReadGuard;

/// A snapshot's bytes, held against deletion until dropped.
pub struct HeldSnapshot {
    pub record: SnapshotRecord,
    pub bytes: ByteRange,
    pub guard: ReadGuard,
}

impl Controller {
    /// Create `req` (whose `source` must be None: the copy is the caller's) holding at least
    /// `content_bytes`, filled by `fill` on the blocking pool.
    pub async fn create_filled<F>(
        &self,
        req: CreateRequest,
        content_bytes: u64,
        fill: F,
    ) -> Result<VolumeRecord>
    where
        F: FnOnce(&ByteRange) -> Result<()> + Send + 'static,
    {
        if req.source.is_some() {
            return Err(Error::Internal(
                "a filled volume names no local content source".to_owned(),
            ));
        }
        let keys = vec![format!("name:{}", req.name)];
        let this = self.clone();
        self.work
            .run(keys, async move {
                this.create_filled_locked(req, content_bytes, fill).await
            })
            .await
    }

    async fn create_filled_locked<F>(
        &self,
        req: CreateRequest,
        content_bytes: u64,
        fill: F,
    ) -> Result<VolumeRecord>
    where
        F: FnOnce(&ByteRange) -> Result<()> + Send + 'static,
    {
        self.check_requisite(&req)?;
        let name = req.name.clone();
        let backend_params = req.params.backend.clone();
        let existing = self
            .blocking(move |b| {
                b.check_params(&backend_params)?;
                b.find_by_name(&name)
            })
            .await?;
        if let Some(existing) = existing {
            return check_same_volume(existing, &req);
        }
        let record = self.new_record(req, content_bytes)?;
        let stored = record.clone();
        run_blocking(self.backend.clone(), move |b| {
            let mut fill = Some(fill);
            b.create_filled(&stored, &mut |range| match fill.take() {
                Some(fill) => fill(range),
                None => Err(Error::Internal("a volume filled twice".to_owned())),
            })
        })
        .await?;
        tracing::debug!(volume_id = %record.id, volume_name = %record.name, bytes = record.capacity_bytes, "volume created and filled");
        Ok(record)
    }

    /// Snapshot `id`'s bytes, held against deletion until the result drops; None if this
    /// node holds no such snapshot.
    pub async fn hold_snapshot(&self, id: &SnapshotId) -> Result<Option<HeldSnapshot>> {
        // Under the snapshot's lock, as a deletion: it either ran before (nothing is found)
        // or sees the read registered.
        let lock = self.work.lock(id.as_str()).await?;
        let lookup = id.clone();
        let found = self
            .blocking(move |b| {
                let Some(record) = b.get_snapshot(&lookup)? else {
                    return Ok(None);
                };
                Ok(b.snapshot_bytes(&lookup)?.map(|bytes| (record, bytes)))
            })
            .await?;
        let held = found.map(|(record, bytes)| HeldSnapshot {
            record,
            bytes,
            guard: self.readers.start(id),
        });
        drop(lock);
        Ok(held)
    }
}
