//! The volume model every layer speaks: identifiers, what a volume is asked to be (access,
//! filesystem, parameters, size, I/O limits, content source). A leaf: it depends on nothing
//! of Kennel's but its error type, so `volume`, `backend` and `node` all use it and none of
//! them reaches back into another for it.

pub mod id;
pub mod io_limits;
pub mod spec;
pub mod volume_size;

pub use id::{GroupSnapshotId, SnapshotId, VolumeId};
pub use spec::ContentSource;
