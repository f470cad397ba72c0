//! The Dockerfile cannot be built here (no container engine), so check it as text: every host
//! program the code runs, found by reading src/, and every helper lvm2 itself runs, found in
//! lvm2's configuration, is installed by the runtime stage.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "common/skip.rs"]
mod skip;

/// Which Debian package ships each program Kennel may run.
const PROVIDERS: &[(&str, &str)] = &[
    ("blkid", "util-linux"),
    ("losetup", "util-linux"),
    ("fsfreeze", "util-linux"),
    ("fallocate", "util-linux"),
    ("wipefs", "util-linux"),
    ("findmnt", "util-linux"),
    ("lsblk", "util-linux"),
    ("blockdev", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("mkfs.ext4", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("resize2fs", "e2fsprogs"),
    ("tune2fs", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    ("mkfs.xfs", "xfsprogs"),
    ("xfs_growfs", "xfsprogs"),
    ("xfs_admin", "xfsprogs"),
    ("xfs_repair", "xfsprogs"),
    ("xfs_io", "xfsprogs"),
    ("lvm", "lvm2"),
    ("lvs", "lvm2"),
    ("vgs", "lvm2"),
    ("pvs", "lvm2"),
    ("lvcreate", "lvm2"),
    ("lvremove", "lvm2"),
    ("lvextend", "lvm2"),
    ("lvresize", "lvm2"),
    ("lvchange", "lvm2"),
    ("lvconvert", "lvm2"),
    ("lvrename", "lvm2"),
    ("vgcreate", "lvm2"),
    ("vgchange", "lvm2"),
    ("vgremove", "lvm2"),
    ("pvcreate", "lvm2"),
    ("pvremove", "lvm2"),
    ("rm", "coreutils"),
    ("cp", "coreutils"),
    ("dd", "coreutils"),
    ("truncate", "coreutils"),
    ("sync", "coreutils"),
];

/// What the image needs for one of lvm2's own helper programs.
enum Helper {
    /// Installed from this Debian package.
    Package(&'static str),
    /// Not needed, and why.
    Unused(&'static str),
}

/// lvm2's helpers (its `*executable` settings), by program name.
const LVM2_HELPERS: &[(&str, Helper)] = &[
    // Run when lvm2 activates, checks or repairs a thin pool (Kennel's thin layout).
    ("thin_check", Helper::Package("thin-provisioning-tools")),
    ("thin_repair", Helper::Package("thin-provisioning-tools")),
    ("thin_dump", Helper::Package("thin-provisioning-tools")),
    // Same package; run for cache LVs another tool may keep in a VG Kennel shares.
    ("cache_check", Helper::Package("thin-provisioning-tools")),
    ("cache_repair", Helper::Package("thin-provisioning-tools")),
    ("cache_dump", Helper::Package("thin-provisioning-tools")),
    // Monitors thin pools (autoextend) when monitoring is on.
    ("dmeventd", Helper::Package("dmeventd")),
    ("fsadm", Helper::Package("lvm2")),
    ("lvresize_fs_helper", Helper::Package("lvm2")),
    ("vdoformat", Helper::Unused("Kennel never creates VDO LVs")),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literal right after `call` (skipping whitespace and `&[`), if any.
fn literal_after(text: &str, call: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices(call) {
        let rest = text[at + call.len()..].trim_start();
        let rest = rest.strip_prefix("&[").unwrap_or(rest).trim_start();
        if let Some(body) = rest.strip_prefix('"') {
            if let Some(end) = body.find('"') {
                found.push(body[..end].to_owned());
            }
        }
    }
    found
}

/// Every program named by a literal passed to the ways the code starts processes:
/// the one runner's `Tool::read_only`, `Tool::changes_metadata` and `Tool::new` (and
/// `cmd::failure`, which names the program that failed), `Command::new`, the benchmark's
/// `tool(&[...])`, and the lvm2 command builder's `.cmd("...")`.
fn programs_in_source() -> BTreeMap<String, Vec<String>> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        // A file's unit tests run stand-in programs the image never needs.
        let text = match text.find("#[cfg(test)]\nmod tests") {
            Some(end) => &text[..end],
            None => &text[..],
        };
        let rel = file.strip_prefix(root()).unwrap().display().to_string();
        for call in [
            "Tool::read_only(",
            "Tool::changes_metadata(",
            "Tool::new(",
            "cmd::failure(",
            "Command::new(",
            "tool(&[",
            ".cmd(",
        ] {
            for program in literal_after(text, call) {
                out.entry(program).or_default().push(rel.clone());
            }
        }
    }
    out
}

/// (image, stage name) of each FROM.
type Stages = Vec<(String, Option<String>)>;

/// The stages, the packages apt-get installs in the last stage, and the last stage's text.
fn dockerfile() -> (Stages, BTreeSet<String>, String) {
    let text = std::fs::read_to_string(root().join("Dockerfile")).expect("Dockerfile");
    // Join continuation lines.
    let joined = text.replace("\\\n", " ");
    let mut stages = Vec::new();
    let mut packages = BTreeSet::new();
    let mut last_stage = String::new();
    for line in joined.lines().map(str::trim) {
        if line.starts_with('#') {
            continue;
        }
        if let Some(from) = line.strip_prefix("FROM ") {
            let mut words = from.split_whitespace();
            let image = words.next().unwrap().to_owned();
            let name = match (words.next(), words.next()) {
                (Some(a), Some(n)) if a.eq_ignore_ascii_case("as") => Some(n.to_owned()),
                _ => None,
            };
            stages.push((image, name));
            packages.clear();
            last_stage.clear();
        }
        last_stage.push_str(line);
        last_stage.push('\n');
        for command in line.split("&&") {
            let words: Vec<&str> = command.split_whitespace().collect();
            if let Some(i) = words.iter().position(|w| *w == "install") {
                if words[..i].contains(&"apt-get") {
                    packages.extend(
                        words[i + 1..]
                            .iter()
                            .filter(|w| !w.starts_with('-'))
                            .map(|w| w.to_string()),
                    );
                }
            }
        }
    }
    (stages, packages, last_stage)
}

#[test]
fn source_scan_finds_the_known_programs() {
    let found = programs_in_source();
    for program in [
        "blkid",
        "mkfs.ext4",
        "mkfs.xfs",
        "resize2fs",
        "xfs_growfs",
        "e2fsck",
        "lvcreate",
        "lvs",
        "lvchange",
    ] {
        assert!(
            found.contains_key(program),
            "{program} not found in src/: {found:?}"
        );
    }
}

#[test]
fn runtime_image_installs_every_program_the_code_runs() {
    let providers: BTreeMap<&str, &str> = PROVIDERS.iter().copied().collect();
    let (_, installed, _) = dockerfile();
    for base in ["e2fsprogs", "xfsprogs", "lvm2", "util-linux", "mount"] {
        assert!(
            installed.contains(base),
            "runtime stage must install {base}"
        );
    }
    for (program, files) in programs_in_source() {
        let package = providers.get(program.as_str()).unwrap_or_else(|| {
            panic!("{program} (run in {files:?}) has no package in tests/dockerfile.rs PROVIDERS")
        });
        assert!(
            installed.contains(*package),
            "{program} (run in {files:?}) needs {package}, which the Dockerfile does not install"
        );
    }
}

/// Every helper program lvm2 may run, read from its defaults (`lvmconfig --type default`):
/// (setting, program path) for each `...executable` setting. None without lvm2.
fn lvm2_helpers() -> Option<Vec<(String, String)>> {
    let out = Command::new("lvmconfig")
        .args(["--type", "default"])
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env("LC_ALL", "C")
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let mut section: Vec<String> = Vec::new();
    let mut found = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // Settings left at their default are printed commented out.
        let line = line.trim().trim_start_matches('#').trim();
        if let Some(name) = line.strip_suffix('{') {
            section.push(name.trim().to_owned());
        } else if line == "}" {
            section.pop();
        } else if let Some((key, value)) = line.split_once('=') {
            let value = value.trim().trim_matches('"');
            if key.trim().ends_with("executable") && value.starts_with('/') {
                let mut setting = section.clone();
                setting.push(key.trim().to_owned());
                found.push((setting.join("/"), value.to_owned()));
            }
        }
    }
    Some(found)
}

#[test]
fn runtime_image_installs_what_lvm2_itself_runs() {
    let Some(helpers) = lvm2_helpers() else {
        skip::cannot_run("lvmconfig (lvm2) is not installed (hack/setup.sh installs it)");
        return;
    };
    assert!(
        helpers
            .iter()
            .any(|(setting, _)| setting == "global/thin_check_executable"),
        "lvmconfig's defaults were not understood: {helpers:?}"
    );
    let known: BTreeMap<&str, &Helper> = LVM2_HELPERS.iter().map(|(p, h)| (*p, h)).collect();
    let (_, installed, _) = dockerfile();
    for (setting, path) in helpers {
        let program = path.rsplit('/').next().unwrap_or(&path);
        match known.get(program) {
            Some(Helper::Package(package)) => assert!(
                installed.contains(*package),
                "lvm2 runs {path} ({setting}): the Dockerfile must install {package}"
            ),
            Some(Helper::Unused(why)) => eprintln!("{path} ({setting}) not installed: {why}"),
            None => panic!(
                "lvm2 runs {path} ({setting}): say in tests/dockerfile.rs LVM2_HELPERS which \
                 package ships it, or why the image needs none"
            ),
        }
    }
}

#[test]
fn dockerfile_is_multi_stage_with_pinned_bases() {
    let (stages, _, last) = dockerfile();
    assert!(stages.len() >= 2, "multi-stage build expected: {stages:?}");
    let names: BTreeSet<&str> = stages.iter().filter_map(|(_, n)| n.as_deref()).collect();
    for (image, _) in &stages {
        // Not a base image: scratch, an earlier stage, or the build argument naming one
        // (KENNEL_BINARY_FROM: `build`, or `prebuilt` for a binary built outside).
        if image == "scratch" || names.contains(image.as_str()) || image.starts_with("${") {
            continue;
        }
        let (_, tag) = image
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{image}: no tag"));
        assert!(
            tag != "latest" && !tag.is_empty(),
            "{image}: pin the base image"
        );
    }
    let build = stages[..stages.len() - 1]
        .iter()
        .find(|(image, _)| image.starts_with("rust:"))
        .expect("a rust build stage");
    // The toolchain is at least the crate's rust-version.
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    let wanted = cargo
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .map(|v| v.trim_matches('"').to_owned())
        .expect("rust-version");
    let version = |s: &str| -> Vec<u32> { s.split('.').filter_map(|p| p.parse().ok()).collect() };
    let tag = build.0.split_once(':').unwrap().1;
    let toolchain = version(tag.split('-').next().unwrap());
    assert!(
        toolchain >= version(&wanted),
        "{tag} is older than rust-version {wanted}"
    );
    assert!(
        last.contains("COPY --from="),
        "runtime stage copies the binary from the build"
    );
    assert!(last.contains("ENTRYPOINT [\"/usr/local/bin/kennel\"]"));
    assert!(
        !stages.last().unwrap().0.starts_with("rust:"),
        "runtime is not the build image"
    );
}
