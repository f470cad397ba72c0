//! The image users build from `Dockerfile`, built here without a registry by `hack/image.sh`
//! (buildah, a Debian base made by debootstrap) from the binary the tests use: it is written as a
//! docker-archive a containerd imports, it runs `kennel`, and every host tool the node side runs
//! is in it.

#[path = "common/skip.rs"]
mod skip;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

fn image_tag() -> String {
    format!("localhost/kennel:{}", env!("CARGO_PKG_VERSION"))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("start {program}: {e}"))
}

#[track_caller]
fn run_ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn installed(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
}

/// Print past cargo's output capture.
fn report(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "image: {line}");
}

/// A buildah working container of the image, removed on drop.
struct Container(String);

impl Container {
    fn of(image: &str) -> Container {
        let id = run_ok("buildah", &["from", "--pull=never", "--quiet", image]);
        Container(id.trim().to_owned())
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut all = vec!["run", "--isolation=chroot", &self.0, "--"];
        all.extend_from_slice(args);
        run("buildah", &all)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = run("buildah", &["rm", &self.0]);
    }
}

#[test]
fn the_dockerfile_builds_offline_into_a_working_image() {
    if !nix::unistd::geteuid().is_root() && skip::cannot_run("building the image needs root") {
        return;
    }
    for tool in ["buildah", "debootstrap", "strip"] {
        if !installed(tool)
            && skip::cannot_run(&format!(
                "{tool} is not installed (hack/setup-cluster.sh installs it)"
            ))
        {
            return;
        }
    }
    let archive = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kennel-image.tar");
    let archive_arg = archive.to_str().expect("utf-8 path");
    let started = Instant::now();
    let script = Path::new(REPO).join("hack/image.sh");
    let out = run(
        script.to_str().expect("utf-8 path"),
        &[
            "--binary",
            env!("CARGO_BIN_EXE_kennel"),
            "--output",
            archive_arg,
        ],
    );
    assert!(
        out.status.success(),
        "hack/image.sh failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        report(line.trim_start_matches("image: "));
    }
    report(&format!(
        "hack/image.sh took {:.1}s",
        started.elapsed().as_secs_f64()
    ));

    // A docker-archive naming the image, as `ctr images import` reads it.
    let manifest: serde_json::Value =
        serde_json::from_str(&run_ok("tar", &["-xOf", archive_arg, "manifest.json"]))
            .expect("manifest.json");
    assert_eq!(
        manifest[0]["RepoTags"][0],
        image_tag().as_str(),
        "{manifest}"
    );

    let tag = image_tag();
    let entrypoint = run_ok(
        "buildah",
        &[
            "inspect",
            "--type",
            "image",
            "--format",
            "{{.OCIv1.Config.Entrypoint}}",
            &tag,
        ],
    );
    assert_eq!(entrypoint.trim(), "[/usr/local/bin/kennel]");
    let container = Container::of(&tag);
    let version = container.run(&["/usr/local/bin/kennel", "--version"]);
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("kennel {}", env!("CARGO_PKG_VERSION")),
        "{}",
        String::from_utf8_lossy(&version.stderr)
    );
    // The tools the node side runs (tests/dockerfile.rs ties them to the source).
    let tools = [
        "blkid",
        "mkfs.ext4",
        "mkfs.xfs",
        "e2fsck",
        "resize2fs",
        "xfs_growfs",
        "lvcreate",
        "lvs",
        "lvchange",
        "losetup",
        "mount",
        "umount",
    ];
    let mut which = vec!["which"];
    which.extend(tools);
    let found = container.run(&which);
    assert!(
        found.status.success(),
        "missing from the image: {:?}",
        tools
            .iter()
            .filter(|t| !String::from_utf8_lossy(&found.stdout).contains(&format!("/{t}\n")))
            .collect::<Vec<_>>()
    );
    // lvm2 in a container must not wait for udev.
    let udev = container.run(&["lvmconfig", "activation/udev_sync", "activation/udev_rules"]);
    let udev = String::from_utf8_lossy(&udev.stdout);
    assert!(
        udev.contains("udev_sync=0") && udev.contains("udev_rules=0"),
        "{udev}"
    );
    let size = std::fs::metadata(&archive).expect("archive").len();
    report(&format!("{tag}: {} MiB as a docker-archive", size >> 20));
}
