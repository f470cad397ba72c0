//! Snapshots being read by peers. A read can last as long as a transfer over a slow network,
//! and several restores may read one snapshot at once, so a read does not hold the snapshot's
//! lock; it registers here instead, under that lock, and a deletion (also under it) refuses
//! while any read is registered: the snapshot's extents are never freed under a reader.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::model::SnapshotId;

/// Cheap to clone: clones share the registry.
#[derive(Clone, Default)]
pub struct Readers {
    counts: Arc<Mutex<HashMap<SnapshotId, usize>>>,
}

/// One registered read; it ends when this drops.
pub struct ReadGuard {
    readers: Readers,
    id: SnapshotId,
}

impl Readers {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<SnapshotId, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a read of `id`. Call it holding the snapshot's lock, as deletions check.
    pub fn start(&self, id: &SnapshotId) -> ReadGuard {
        *self.counts().entry(id.clone()).or_default() += 1;
        ReadGuard {
            readers: self.clone(),
            id: id.clone(),
        }
    }

    /// ABORTED (retry later) while `id` is being read.
    pub fn check_unread(&self, id: &SnapshotId) -> Result<()> {
        match self.counts().get(id) {
            Some(n) if *n > 0 => Err(Error::Busy(format!(
                "snapshot {id} is being read by {n} other node(s) restoring it; retry when done"
            ))),
            _ => Ok(()),
        }
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut counts = self.readers.counts();
        if let Some(n) = counts.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_is_unread_only_when_every_read_ended() {
        let readers = Readers::default();
        let (a, b) = (SnapshotId::generate(), SnapshotId::generate());
        assert!(readers.check_unread(&a).is_ok());
        let first = readers.start(&a);
        let second = readers.start(&a);
        assert!(matches!(readers.check_unread(&a), Err(Error::Busy(_))));
        assert!(readers.check_unread(&b).is_ok(), "other snapshots are free");
        drop(first);
        assert!(matches!(readers.check_unread(&a), Err(Error::Busy(_))));
        drop(second);
        assert!(readers.check_unread(&a).is_ok());
        assert!(readers.counts().is_empty(), "nothing left behind");
    }
}
