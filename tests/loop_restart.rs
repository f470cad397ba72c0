//! A driver restarted in a new container finds the loop devices its predecessor attached. The
//! predecessor opened each image through its own bind mount of the image directory; once that
//! mount namespace is gone, sysfs names the backing file relative to a mount that no longer
//! exists, so only the file's device and inode identify it.

#[path = "common/vg.rs"]
mod vg;

use std::path::{Path, PathBuf};
use std::process::Command;

use kennel::node::loopdev::{self, LoopIndex};
use vg::skip;

struct Detach(PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = loopdev::detach(&self.0);
    }
}

#[test]
fn devices_attached_through_a_vanished_bind_mount_are_found_by_their_file() {
    if !nix::unistd::geteuid().is_root() {
        skip::cannot_run("attaching loop devices needs root");
        return;
    }
    if !Path::new("/dev/loop-control").exists() {
        skip::cannot_run("/dev/loop-control is missing");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let (real, view) = (dir.path().join("real"), dir.path().join("view"));
    std::fs::create_dir_all(&real).expect("real dir");
    std::fs::create_dir_all(&view).expect("view dir");
    let image = real.join("kv-a.img");
    let other = real.join("kv-b.img");
    for file in [&image, &other] {
        std::fs::File::create(file)
            .and_then(|f| f.set_len(16 << 20))
            .expect("image");
    }
    // As a driver container does: the directory bind-mounted in a private mount namespace,
    // the image attached through that mount, then the namespace gone.
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" && losetup --find --show "$2/kv-a.img""#)
        .arg("sh")
        .arg(&real)
        .arg(&view)
        .output()
        .expect("run unshare");
    assert!(
        out.status.success(),
        "attach in a private namespace: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let _detach = Detach(device.clone());
    let name = device.file_name().expect("device name");
    let sysfs =
        std::fs::read_to_string(Path::new("/sys/block").join(name).join("loop/backing_file"))
            .expect("sysfs backing_file");
    assert_ne!(
        Path::new(sysfs.trim()),
        image,
        "sysfs names the file where this process sees it: nothing to check here"
    );

    let index = LoopIndex::scan([image.clone(), other.clone()]).expect("scan");
    assert_eq!(index.find(&image), vec![device.clone()]);
    assert!(index.find(&other).is_empty());
    assert!(loopdev::is_backed_by(&device, &image));
    assert!(!loopdev::is_backed_by(&device, &other));
}
