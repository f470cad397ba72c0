//! A throwaway LVM volume group on a loop device, removed on drop (also
//! when the test panics), and host inspection for LVM: the lvm2 tools run
//! the way the driver runs them, LVs, and loop windows over the PV.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

#[path = "skip.rs"]
pub mod skip;
use skip::cannot_run;

const VG_PREFIX: &str = "kennel-t";

/// LVM tests need root, lvm2 and loop devices. When they cannot run, the
/// test fails (or, with `KENNEL_ALLOW_SKIP=1`, is skipped loudly).
pub fn can_run() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return !cannot_run("LVM tests need root");
    }
    if Command::new("lvm").arg("version").output().is_err() {
        return !cannot_run("lvm2 is not installed (hack/setup.sh installs it)");
    }
    if !Path::new("/dev/loop-control").exists() {
        return !cannot_run("/dev/loop-control is missing");
    }
    true
}

/// Test deadlines are multiplied by `KENNEL_TEST_TIMEOUT_SCALE` (default 1):
/// the VM lane runs under software emulation, several times slower.
pub fn timeout_scale() -> u64 {
    std::env::var("KENNEL_TEST_TIMEOUT_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
}

pub fn device_mapper() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .is_ok()
}

/// Run an lvm2 tool the way the driver does on this host.
pub fn lvm(tool: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(tool);
    if !device_mapper() {
        cmd.args(["--driverloaded", "n"]);
    }
    if !device_mapper() || !Path::new("/run/udev/control").exists() {
        cmd.arg("--config=activation{udev_sync=0 udev_rules=0 monitoring=0} devices{obtain_device_list_from_udev=0}");
    }
    cmd.args(args)
        .env("LVM_SUPPRESS_FD_WARNINGS", "1")
        .env("LC_ALL", "C")
        .output()
        .unwrap_or_else(|e| panic!("run {tool}: {e}"))
}

#[track_caller]
pub fn lvm_ok(tool: &str, args: &[&str]) -> String {
    let out = lvm(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One LV as the test sees it, straight from `lvs`.
#[derive(Debug, Clone)]
pub struct Lv {
    pub name: String,
    pub size: u64,
    pub tags: Vec<String>,
}

/// A volume group on a sparse file behind a loop device.
pub struct TestVg {
    pub name: String,
    pub pv: PathBuf,
    _dir: tempfile::TempDir,
}

static VG_COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestVg {
    /// A VG on a sparse PV of `size` (a `truncate -s` size), lvm2's
    /// default extent size.
    pub fn new(size: &str) -> TestVg {
        TestVg::create(size, &[])
    }

    /// A VG with 1 MiB extents on a PV holding exactly `bytes` of extents,
    /// so sizes and capacity behave like a loop pool of `bytes`.
    pub fn with_capacity(bytes: u64) -> TestVg {
        // The first MiB of the PV holds its label and metadata.
        TestVg::create(&(bytes + (1 << 20)).to_string(), &["-s", "1m"])
    }

    fn create(size: &str, vgcreate_args: &[&str]) -> TestVg {
        remove_stale_vgs();
        let dir = tempfile::Builder::new()
            .prefix("kennel-vg-")
            .tempdir()
            .expect("temp dir");
        let image = dir.path().join("pv.img");
        let out = Command::new("truncate")
            .args(["-s", size])
            .arg(&image)
            .output()
            .expect("truncate");
        assert!(out.status.success());
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        let pv = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let name = format!(
            "{VG_PREFIX}-{}-{}",
            std::process::id(),
            VG_COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let vg = TestVg {
            name,
            pv,
            _dir: dir,
        };
        let pv = vg.pv.to_string_lossy().into_owned();
        lvm_ok("pvcreate", &["-y", &pv]);
        let mut args = vgcreate_args.to_vec();
        args.extend([vg.name.as_str(), pv.as_str()]);
        lvm_ok("vgcreate", &args);
        vg
    }

    /// Every LV of the VG.
    pub fn lvs(&self) -> Vec<Lv> {
        let json = lvm_ok(
            "lvs",
            &[
                "--reportformat",
                "json",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "lv_name,lv_size,lv_tags",
                &self.name,
            ],
        );
        let doc: serde_json::Value = serde_json::from_str(&json).expect("lvs json");
        doc["report"][0]["lv"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|lv| Lv {
                name: lv["lv_name"].as_str().unwrap_or_default().to_owned(),
                size: lv["lv_size"].as_str().unwrap_or("0").parse().unwrap_or(0),
                tags: lv["lv_tags"]
                    .as_str()
                    .unwrap_or_default()
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect(),
            })
            .collect()
    }

    pub fn lv(&self, name: &str) -> Option<Lv> {
        self.lvs().into_iter().find(|lv| lv.name == name)
    }

    /// The byte offset on the PV where `lv` starts, if it is a single
    /// contiguous range (what the driver exposes through a loop window).
    pub fn lv_offset(&self, lv: &str) -> Option<u64> {
        let out = lvm(
            "lvs",
            &[
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "seg_pe_ranges,vg_extent_size",
                &format!("{}/{lv}", self.name),
            ],
        );
        if !out.status.success() {
            return None;
        }
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut fields = text.split_whitespace();
        // "/dev/loopN:FIRST-LAST"
        let first: u64 = fields
            .next()?
            .rsplit(':')
            .next()?
            .split('-')
            .next()?
            .parse()
            .ok()?;
        let extent: u64 = fields.next()?.parse().ok()?;
        let pv = self.pv.to_string_lossy().into_owned();
        let out = lvm(
            "pvs",
            &[
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "pe_start",
                &pv,
            ],
        );
        let pe_start: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
        Some(pe_start + first * extent)
    }

    /// Loop windows over the PV exposing `lv`.
    pub fn windows_of_lv(&self, lv: &str) -> Vec<PathBuf> {
        let Some(offset) = self.lv_offset(lv) else {
            return Vec::new();
        };
        windows_of(&self.pv)
            .into_iter()
            .filter(|device| {
                let name = device.file_name().unwrap_or_default().to_string_lossy();
                fs::read_to_string(format!("/sys/block/{name}/loop/offset"))
                    .ok()
                    .and_then(|o| o.trim().parse::<u64>().ok())
                    == Some(offset)
            })
            .collect()
    }

    /// One `lvs` field of `lv` in bytes where it is a size, trimmed ("" when
    /// the LV does not exist).
    pub fn lv_field(&self, lv: &str, field: &str) -> String {
        let out = lvm(
            "lvs",
            &[
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                field,
                &format!("{}/{lv}", self.name),
            ],
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// The device-mapper device of `lv`, if it is active.
    pub fn active_device_of_lv(&self, lv: &str) -> Option<PathBuf> {
        let active = self.lv_field(lv, "lv_active") == "active";
        let device = PathBuf::from(format!("/dev/{}/{lv}", self.name));
        (active && device.exists()).then_some(device)
    }

    /// With device-mapper an LV stays active from creation to deletion, so
    /// it is attached on this node while its device is in use here: mounted,
    /// bound (the block staging file) or under a loop device. The device's
    /// own node (`/dev/mapper/...`, what a bind shows as its root).
    pub fn device_in_use_of_lv(&self, lv: &str) -> Option<PathBuf> {
        use std::os::unix::fs::MetadataExt;
        let device = fs::canonicalize(self.active_device_of_lv(lv)?).ok()?;
        let rdev = fs::metadata(&device).ok()?.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let number = format!("{major}:{minor}");
        let below_dev = device.strip_prefix("/dev").ok()?.to_owned();
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mounted = mountinfo.lines().any(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            fields.len() > 4
                && (fields[2] == number || Path::new("/").join(&below_dev) == Path::new(fields[3]))
        });
        let looped = fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                fs::read_to_string(entry.path().join("loop/backing_file"))
                    .is_ok_and(|b| Path::new(b.trim_end()) == device)
            });
        (mounted || looped).then_some(device)
    }

    /// Free bytes in the VG.
    pub fn free(&self) -> u64 {
        let out = lvm_ok(
            "vgs",
            &[
                "--noheadings",
                "--units",
                "b",
                "--nosuffix",
                "-o",
                "vg_free",
                &self.name,
            ],
        );
        out.trim().parse().expect("vg_free")
    }
}

impl Drop for TestVg {
    fn drop(&mut self) {
        detach_windows(&self.pv);
        if device_mapper() {
            let _ = lvm("vgchange", &["-an", &self.name]);
        }
        let _ = lvm("vgremove", &["-ff", "-y", &self.name]);
        let pv = self.pv.to_string_lossy().into_owned();
        let _ = lvm("pvremove", &["-ff", "-y", &pv]);
        let _ = Command::new("losetup").arg("-d").arg(&self.pv).output();
    }
}

/// Remove VGs left by test processes that no longer exist (killed runs).
fn remove_stale_vgs() {
    let out = lvm("vgs", &["--noheadings", "-o", "vg_name,pv_name"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let mut fields = line.split_whitespace();
        let (Some(vg), Some(pv)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some(rest) = vg.strip_prefix(&format!("{VG_PREFIX}-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        detach_windows(Path::new(pv));
        let _ = lvm("vgremove", &["-ff", "-y", vg]);
        let _ = lvm("pvremove", &["-ff", "-y", pv]);
        let _ = Command::new("losetup").arg("-d").arg(pv).output();
    }
}

nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);

/// Loop devices over ranges of `pv` (the driver's no-device-mapper attach).
pub fn windows_of(pv: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) {
            if Path::new(backing.trim_end()) == pv {
                found.push(PathBuf::from(format!("/dev/{name}")));
            }
        }
    }
    found
}

pub fn detach_windows(pv: &Path) {
    for device in windows_of(pv) {
        for m in mounts_of_device(&device) {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Ok(dev) = File::open(&device) {
            // SAFETY: LOOP_CLR_FD takes no argument.
            let _ = unsafe { loop_clr_fd(dev.as_raw_fd()) };
        }
    }
}

/// Mount points whose source is `device`.
pub fn mounts_of_device(device: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let source = right.split(' ').nth(1)?;
            let point = left.split(' ').nth(4)?;
            (Path::new(source) == device).then(|| PathBuf::from(point))
        })
        .collect()
}
