//! Volumes filled by the caller (a snapshot pulled from another node) and the
//! bytes of a local snapshot for such a caller to read.
//!
//! A filled volume follows the store's commit protocol: its image is created
//! sparse (reads as zeros where nothing is written), handed to the caller,
//! and committed only once the caller is done. A crash meanwhile leaves an
//! image without a record, which the next start removes.

use std::fs;

use super::LoopBackend;
use crate::backend::{ByteRange, SnapshotRecord, VolumeRecord};
use crate::error::{Error, IoContext, Result};
use crate::model::SnapshotId;

impl LoopBackend {
    /// See [`crate::backend::Backend::create_filled`].
    pub(super) fn create_filled_image(
        &self,
        record: &VolumeRecord,
        fill: &mut dyn FnMut(&ByteRange) -> Result<()>,
    ) -> Result<()> {
        crate::backend::refuse_source(record)?;
        if self.volumes.get(&record.id).is_some() {
            return Ok(());
        }
        let _room = self.reserve(record.capacity_bytes)?;
        let file = self.volumes.create_image(&record.id)?;
        let image = self.volumes.image_path(&record.id);
        let done = file
            .set_len(record.capacity_bytes)
            .ctx("resize", &image)
            .and_then(|()| {
                fill(&ByteRange {
                    device: image.clone(),
                    offset: 0,
                    len: record.capacity_bytes,
                })
            })
            .and_then(|()| {
                // A write past the range grew the image: that is no volume of this size.
                let len = file.metadata().ctx("stat", &image)?.len();
                if len != record.capacity_bytes {
                    return Err(Error::Internal(format!(
                        "filling volume {} left its image at {len} bytes, not {}",
                        record.id, record.capacity_bytes
                    )));
                }
                // Preallocated pools allocate what the fill left as holes.
                self.allocate(&file, &image, record.capacity_bytes)?;
                file.sync_all().ctx("fsync", &image)
            })
            .and_then(|()| self.volumes.commit(record));
        if done.is_err() {
            self.volumes.discard_image(&record.id);
        }
        done
    }

    /// See [`crate::backend::Backend::snapshot_bytes`].
    pub(super) fn snapshot_image_bytes(&self, id: &SnapshotId) -> Result<Option<ByteRange>> {
        // Only committed records are listed: an image still being cut is not.
        let all: Vec<SnapshotRecord> = self.snapshots.list();
        let Some(snapshot) = all.iter().find(|s| &s.id == id) else {
            return Ok(None);
        };
        if !snapshot.whole_among(&all) {
            return Ok(None);
        }
        let image = self.snapshots.image_path(id);
        let len = match fs::metadata(&image) {
            Ok(meta) => meta.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::Precondition(format!(
                    "snapshot {id} has a record but its image {} is gone (deleted outside Kennel)",
                    image.display()
                )))
            }
            Err(e) => return Err(Error::io("stat", image, e)),
        };
        Ok(Some(ByteRange {
            device: image,
            offset: 0,
            len,
        }))
    }
}
