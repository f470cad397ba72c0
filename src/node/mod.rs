//! Host plumbing: loop devices, mounts, filesystems. No protobuf here.

pub mod cleanup;
pub mod cmd;
pub mod copy;
pub mod freeze;
pub mod fs;
pub mod fs_group;
pub mod fs_health;
pub mod host_identity;
pub mod host_path;
pub mod io_throttle;
pub mod loopdev;
pub mod mount;
pub mod selinux;
pub mod shared_mount;
