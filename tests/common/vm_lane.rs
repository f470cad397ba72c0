//! The VM lane (`hack/vm/`, `tests/vm_lane.rs`): whether this host can run
//! it, and whether this process runs inside it.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Set (to `1`) in the guest for every suite the lane runs.
pub const LANE_ENV: &str = "KENNEL_VM_LANE";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Whether this process runs inside the lane's guest.
pub fn inside() -> bool {
    std::env::var(LANE_ENV).as_deref() == Ok("1")
}

/// Why this host cannot run the VM lane, if it cannot.
pub fn unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("the VM lane needs root".to_owned());
    }
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_err()
    {
        return Some("qemu-system-x86_64 is not installed (run hack/setup-vm.sh)".to_owned());
    }
    let kernel = repo().join("target/vm/debs/kernel-package");
    if !Path::new(&kernel).exists() {
        return Some(format!(
            "the guest kernel is not downloaded ({} is missing; run hack/setup-vm.sh)",
            kernel.display()
        ));
    }
    None
}
