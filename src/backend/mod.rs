//! Where volumes live. Each backend stores its own state (files beside the
//! images, LV tags), so a restarted driver rebuilds everything from it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::io_limits::IoLimits;
use crate::model::spec::{Capability, FsType, VolumeParams};
use crate::model::volume_size::CapacityRange;
use crate::model::{ContentSource, GroupSnapshotId, SnapshotId, VolumeId};

pub mod image_store;
pub mod loop_files;
pub mod lvm;

/// Everything Kennel knows about one volume; persisted by the backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub capacity_bytes: u64,
    pub requested: CapacityRange,
    pub capabilities: Vec<Capability>,
    pub params: VolumeParams,
    /// Node and machine that hold the data: a node re-created under the same
    /// name on another machine does not have it.
    pub node_id: String,
    pub machine_id: String,
    pub created_unix: u64,
    /// What the volume's data was copied from, if anything.
    #[serde(default)]
    pub source: Option<ContentSource>,
}

/// A point-in-time copy of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: SnapshotId,
    /// The CSI name; a group's members all carry the group's name.
    pub name: String,
    pub source_volume: VolumeId,
    pub size_bytes: u64,
    pub created_unix: u64,
    /// Set on the members of a volume group snapshot: the group is stored
    /// nowhere else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupMembership>,
}

/// Which group a snapshot belongs to, and how many members the group was cut
/// with: fewer found means an interrupted creation (or deletion).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupMembership {
    pub id: GroupSnapshotId,
    pub members: u32,
}

impl SnapshotRecord {
    pub fn group_id(&self) -> Option<&GroupSnapshotId> {
        self.group.as_ref().map(|g| &g.id)
    }

    /// Whether the snapshot stands whole among `all` (the backend's snapshots): a group's
    /// member counts only while its group is complete.
    pub fn whole_among(&self, all: &[SnapshotRecord]) -> bool {
        self.group_id()
            .is_none_or(|g| !incomplete_groups(all).contains(g))
    }
}

/// Group snapshot IDs of the incomplete groups: fewer members than the group was cut with
/// (debris of a cut or a deletion that never finished).
pub fn incomplete_groups(snapshots: &[SnapshotRecord]) -> BTreeSet<GroupSnapshotId> {
    let mut counts: BTreeMap<&GroupSnapshotId, (usize, u32)> = BTreeMap::new();
    for s in snapshots {
        if let Some(g) = &s.group {
            let entry = counts.entry(&g.id).or_insert((0, g.members));
            entry.0 += 1;
        }
    }
    counts
        .into_iter()
        .filter(|(_, (found, cut))| *found != *cut as usize)
        .map(|(id, _)| id.clone())
        .collect()
}

/// Bytes `[offset, offset + len)` of a file or block device: a volume's or a
/// snapshot's bytes where a caller outside the backend reads or writes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteRange {
    pub device: PathBuf,
    pub offset: u64,
    pub len: u64,
}

/// `create_filled` makes blank volumes only: their bytes come from the caller.
fn refuse_source(record: &VolumeRecord) -> Result<()> {
    match &record.source {
        None => Ok(()),
        Some(source) => Err(Error::Internal(format!(
            "volume {} is filled by its caller and cannot also be copied from {source:?}",
            record.id
        ))),
    }
}

/// Room left in a backend's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolCapacity {
    pub total_bytes: u64,
    pub available_bytes: u64,
    /// Bytes promised to existing volumes.
    pub provisioned_bytes: u64,
}

/// A pool of volumes on this node. Methods block (file I/O, ioctls, lvm2);
/// callers run them off the async runtime.
pub trait Backend: Send + Sync + 'static {
    fn kind(&self) -> &'static str;
    /// Volume sizes are multiples of this.
    fn granularity(&self) -> u64;

    /// All volumes, sorted by ID.
    fn list(&self) -> Result<Vec<VolumeRecord>>;
    fn get(&self, id: &VolumeId) -> Result<Option<VolumeRecord>>;
    fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>>;

    /// Allocate storage for `record` (filled from `record.source` when set) and
    /// persist it in one step: afterwards the volume fully exists or not at all.
    fn create(&self, record: &VolumeRecord) -> Result<()>;
    /// Remove a volume; an unknown ID is not an error.
    fn delete(&self, id: &VolumeId) -> Result<()>;
    /// Grow a volume's storage to `new_size` bytes.
    fn expand(&self, id: &VolumeId, new_size: u64) -> Result<VolumeRecord>;
    /// Store a volume's new I/O limits durably (idempotent).
    fn set_io_limits(&self, id: &VolumeId, limits: IoLimits) -> Result<VolumeRecord>;
    /// Room for a new volume with these backend-specific parameters.
    fn capacity(&self, params: &BTreeMap<String, String>) -> Result<PoolCapacity>;
    /// Refuse backend-specific StorageClass keys this backend does not know.
    fn check_params(&self, params: &BTreeMap<String, String>) -> Result<()>;

    /// Copy a volume's data as it is now into a new snapshot (idempotent by ID).
    fn create_snapshot(&self, snapshot: &SnapshotRecord) -> Result<()>;
    /// Remove a snapshot; an unknown ID is not an error.
    fn delete_snapshot(&self, id: &SnapshotId) -> Result<()>;
    /// All snapshots, sorted by ID.
    fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>>;

    /// Cut every member (all of one group, each `group` set) at one instant: the
    /// filesystems of the staged sources are frozen together for the cut. All or nothing:
    /// on failure whatever was made is removed again. Idempotent by the members' IDs.
    fn create_group_snapshot(&self, members: &[SnapshotRecord]) -> Result<()>;

    fn get_snapshot(&self, id: &SnapshotId) -> Result<Option<SnapshotRecord>> {
        Ok(self.list_snapshots()?.into_iter().find(|s| &s.id == id))
    }

    /// The snapshot CreateSnapshot made under `name` (never a group's member).
    fn find_snapshot_by_name(&self, name: &str) -> Result<Option<SnapshotRecord>> {
        Ok(self
            .list_snapshots()?
            .into_iter()
            .find(|s| s.name == name && s.group.is_none()))
    }

    /// Create `record` (its `source` must be None) blank, let `fill` write its bytes, and only
    /// then make it a volume: until `fill` returns Ok it is never found by get/find_by_name/list;
    /// if `fill` fails it is removed; after a crash mid-fill it is debris the next start sweeps.
    /// The range covers the whole volume (`len` = capacity), reads as zeros wherever `fill`
    /// does not write, is writable by opening `device` for writing, and holds no byte of
    /// anything else; `fill` must stay inside it. Idempotent: a committed volume with this ID
    /// is left as it is and `fill` is not called.
    fn create_filled(
        &self,
        record: &VolumeRecord,
        fill: &mut dyn FnMut(&ByteRange) -> Result<()>,
    ) -> Result<()>;

    /// Where snapshot `id`'s bytes can be read on this node (its first `len` bytes are the
    /// snapshot's content), or None if this node holds no such snapshot (or only part of an
    /// unfinished one: a pending snapshot, a member of an incomplete group).
    fn snapshot_bytes(&self, id: &SnapshotId) -> Result<Option<ByteRange>>;

    /// The block device holding the volume, made available on this node (idempotent).
    fn attach(&self, id: &VolumeId) -> Result<PathBuf>;
    /// Release the block device (idempotent).
    fn detach(&self, id: &VolumeId) -> Result<()>;
    /// The block device if the volume is attached now.
    fn attached_device(&self, id: &VolumeId) -> Result<Option<PathBuf>>;
    /// Make an attached device see the volume's new size.
    fn refresh_device(&self, id: &VolumeId) -> Result<()>;
    /// Why the volume's storage is unhealthy, if it is.
    fn health(&self, record: &VolumeRecord) -> Option<String>;

    /// The filesystem a volume gets when neither the stage request nor its
    /// creation named one (a backend parameter such as `fsType`).
    fn default_fs_type(&self, _record: &VolumeRecord) -> Option<FsType> {
        None
    }
}
