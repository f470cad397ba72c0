//! Loop devices through the kernel's ioctl interface (no `losetup`).
//!
//! One room per job: `ioctl` holds the kernel's ABI; `attach` binds a file to a free device
//! and unbinds it; `resize` changes an attached device's size or window; `sysfs` reads what
//! the kernel lists; `identity` tells which file a device really holds; `device_index` is the
//! [`LoopIndex`] an owner keeps of its devices; `numbered` adds and removes devices under
//! chosen numbers, for benchmarks.

mod attach;
mod device_index;
mod identity;
mod ioctl;
mod numbered;
mod resize;
mod sysfs;

pub use attach::{attach, attach_read_only, detach, Window};
pub use device_index::{device_nodes, LoopIndex};
pub use identity::is_backed_by;
pub use numbered::{add_device, attach_to, remove_device};
pub use resize::{device_size, refresh_capacity, set_window};
pub use sysfs::{
    attachments, backing_of, find_attached, sysfs_reads, window_of_node, Attachment, LOOP_MAJOR,
};

/// One log target for every room, the module's own (what `RUST_LOG` directives name).
const LOG_TARGET: &str = module_path!();
