//! Container images made from local files, as docker-archive tarballs
//! (`manifest.json`, an image config and one layer), so nothing is pulled.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::procs::run_ok;

pub const PAUSE_IMAGE: &str = "kennel.test/pause:3.9";
pub const BUSYBOX_IMAGE: &str = "kennel.test/busybox:1";

/// The pause image: the static pause binary as `/pause`.
pub fn pause_archive(work: &Path, pause_bin: &Path) -> PathBuf {
    let rootfs = work.join("pause-rootfs");
    std::fs::create_dir_all(&rootfs).expect("create rootfs");
    std::fs::copy(pause_bin, rootfs.join("pause")).expect("copy pause");
    archive(work, "pause", &rootfs, PAUSE_IMAGE, &["/pause"], &[])
}

/// A busybox image: Debian's static busybox and its applet links, with a
/// minimal passwd and group.
pub fn busybox_archive(work: &Path) -> PathBuf {
    let busybox = super::bins::which("busybox").expect("busybox is installed");
    let rootfs = work.join("busybox-rootfs");
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root"] {
        std::fs::create_dir_all(rootfs.join(dir)).expect("create rootfs dirs");
    }
    std::fs::copy(&busybox, rootfs.join("bin/busybox")).expect("copy busybox");
    let mut list = Command::new(&busybox);
    list.arg("--list-full");
    for applet in run_ok(list, 30).lines() {
        let link = rootfs.join(applet.trim_start_matches('/'));
        if applet.is_empty() || link.exists() {
            continue;
        }
        if let Some(parent) = link.parent() {
            std::fs::create_dir_all(parent).expect("create applet dir");
        }
        symlink("/bin/busybox", &link).expect("link applet");
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .expect("write passwd");
    std::fs::write(rootfs.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").expect("write group");
    archive(work, "busybox", &rootfs, BUSYBOX_IMAGE, &[], &["/bin/sh"])
}

/// An image of one static binary as `/<name>`, its entrypoint (as the
/// kubernetes-csi images are built).
pub fn binary_archive(work: &Path, name: &str, binary: &Path, tag: &str) -> PathBuf {
    let rootfs = work.join(format!("{name}-rootfs"));
    std::fs::create_dir_all(&rootfs).expect("create rootfs");
    std::fs::copy(binary, rootfs.join(name)).expect("copy binary");
    let entrypoint = format!("/{name}");
    archive(work, name, &rootfs, tag, &[&entrypoint], &[])
}

fn archive(
    work: &Path,
    name: &str,
    rootfs: &Path,
    tag: &str,
    entrypoint: &[&str],
    cmd: &[&str],
) -> PathBuf {
    let dir = work.join(format!("{name}-archive"));
    std::fs::create_dir_all(&dir).expect("create archive dir");
    let layer = dir.join("layer.tar");
    let mut tar = Command::new("tar");
    tar.arg("--numeric-owner")
        .arg("--owner=0")
        .arg("--group=0")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg(&layer)
        .arg(".");
    run_ok(tar, 60);
    let mut sum = Command::new("sha256sum");
    sum.arg(&layer);
    let digest = run_ok(sum, 60)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned();
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": if entrypoint.is_empty() { serde_json::Value::Null } else { serde_json::json!(entrypoint) },
            "Cmd": if cmd.is_empty() { serde_json::Value::Null } else { serde_json::json!(cmd) },
            "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{digest}")]},
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("write config");
    let manifest = serde_json::json!([{
        "Config": "config.json",
        "RepoTags": [tag],
        "Layers": ["layer.tar"],
    }]);
    std::fs::write(dir.join("manifest.json"), manifest.to_string()).expect("write manifest");
    let out = work.join(format!("{name}.tar"));
    let mut tar = Command::new("tar");
    tar.arg("-C").arg(&dir).arg("-cf").arg(&out).args([
        "manifest.json",
        "config.json",
        "layer.tar",
    ]);
    run_ok(tar, 60);
    out
}
