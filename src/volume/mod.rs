//! The domain: what a request means and what to do about it.

pub mod capacity;
pub mod controller;
pub mod id;
pub mod limits;
pub mod locks;
pub mod node;
pub mod spec;
pub mod token;
pub mod work;

pub use id::{SnapshotId, VolumeId};
