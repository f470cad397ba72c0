//! The official CSI conformance suite, kubernetes-csi's csi-sanity
//! (`KENNEL_K8S_BIN`/csi-sanity), against `kennel driver` on both backends
//! and both access types. Any failed spec fails the test.

mod cluster_support;

use std::path::Path;
use std::time::Duration;

use cluster_support::node_plugin::{driver_command, Backend, Storage};
use cluster_support::procs::{run, wait_for, Daemon};
use cluster_support::{bins, cannot_run, host, report};

#[test]
fn csi_sanity_loop_mount() {
    sanity(Backend::Loop, "mount");
}

#[test]
fn csi_sanity_loop_block() {
    sanity(Backend::Loop, "block");
}

#[test]
fn csi_sanity_lvm_mount() {
    sanity(Backend::Lvm, "mount");
}

#[test]
fn csi_sanity_lvm_block() {
    sanity(Backend::Lvm, "block");
}

fn can_run(backend: Backend) -> bool {
    if !nix::unistd::geteuid().is_root() {
        return !cannot_run("csi-sanity against the driver needs root (loop devices, mounts)");
    }
    if let Some(why) = bins::missing(bins::K8s::default(), &["csi-sanity"]) {
        return !cannot_run(&why);
    }
    if !Path::new("/dev/loop-control").exists() {
        return !cannot_run("/dev/loop-control is missing");
    }
    backend == Backend::Loop || cluster_support::vg::can_run()
}

/// Everything one run made, removed on drop (also after a failure).
struct Run {
    root: tempfile::TempDir,
    driver: Option<Daemon>,
    storage: Option<Storage>,
    /// The kubelet directory, on a shared mount as the driver demands.
    kubelet: Option<kennel::node::shared_mount::SharedMount>,
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(mut driver) = self.driver.take() {
            driver.stop(Duration::from_secs(10));
        }
        self.kubelet.take();
        for mount in host::mounts_under(self.root.path()) {
            let _ = nix::mount::umount2(&mount, nix::mount::MntFlags::MNT_DETACH);
        }
        let root = self.root.path().to_string_lossy().into_owned();
        for dev in host::loop_devices() {
            if dev.back_file.starts_with(&root) {
                let mut cmd = std::process::Command::new("losetup");
                cmd.args(["-d", &dev.name]);
                let _ = run(cmd, 30);
            }
        }
        // The volume group (if any) goes after its loop windows' users.
        self.storage.take();
    }
}

fn sanity(backend: Backend, access: &str) {
    if !can_run(backend) {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("kennel-sanity-")
        .tempdir()
        .expect("temp dir");
    let root = std::fs::canonicalize(dir.path()).expect("resolve temp dir");
    let mut run_state = Run {
        root: dir,
        driver: None,
        storage: None,
        kubelet: None,
    };
    let bin = bins::install(bins::K8s::default(), &["csi-sanity"], &root.join("bin"))["csi-sanity"]
        .clone();
    let kubelet = root.join("kubelet");
    run_state.kubelet = Some(
        kennel::node::shared_mount::SharedMount::new(&kubelet)
            .expect("kubelet dir on a shared mount"),
    );
    // Staging and publish paths where the kubelet would put them.
    let staging = kubelet.join("plugins/kubernetes.io/csi/kennel.csi.dev/sanity/globalmount");
    let target = kubelet.join("pods/sanity/volumes/kubernetes.io~csi/sanity/mount");
    std::fs::create_dir_all(kubelet.join("pods/sanity/volumes/kubernetes.io~csi/sanity"))
        .expect("dirs");
    std::fs::create_dir_all(kubelet.join("plugins/kubernetes.io/csi/kennel.csi.dev/sanity"))
        .expect("dirs");
    let socket = root.join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let storage = run_state
        .storage
        .insert(Storage::create(backend, &root, "sanity-node"));
    let logs = root.join("logs");
    let driver = run_state.driver.insert(Daemon::spawn(
        "kennel-driver",
        driver_command(&endpoint, "sanity-node", storage, &kubelet, None),
        &logs,
    ));
    wait_for(
        "the driver's socket",
        30,
        || {
            driver.assert_running();
            socket.exists().then_some(())
        },
        String::new,
    );
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg(format!("--csi.endpoint={}", socket.display()))
        .arg(format!("--csi.stagingdir={}", staging.display()))
        .arg(format!("--csi.mountdir={}", target.display()))
        .arg(format!("--csi.testvolumeaccesstype={access}"))
        .arg(format!("--csi.testvolumesize={}", 64 << 20))
        .arg(format!("--csi.testvolumeexpandsize={}", 128 << 20))
        .arg(format!(
            "--csi.testvolumemutableparameters={}/tests/csi-sanity/mutable-parameters.yaml",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.timeout=8m");
    let started = std::time::Instant::now();
    let out = run(cmd, 600);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .filter(|l| l.starts_with("Ran ") || l.contains("Passed") && l.contains("Failed"))
        .collect::<Vec<_>>()
        .join(" / ");
    report(&format!(
        "csi-sanity {backend:?} {access}: {summary} in {:.1}s",
        started.elapsed().as_secs_f64()
    ));
    let failed = !out.status.success() || !stdout.contains(" 0 Failed");
    if failed {
        let driver_log = run_state
            .driver
            .as_ref()
            .map(|d| d.tail(60))
            .unwrap_or_default();
        panic!(
            "csi-sanity {backend:?} {access} failed ({}):\n{}\n{}\n---- driver ----\n{driver_log}",
            out.status,
            failures(&stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ran: u32 = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Ran ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("csi-sanity reports how many specs ran");
    // All 92 but the 10 ControllerPublish specs and the one pending upstream.
    assert!(ran >= 81, "csi-sanity ran only {ran} specs: {summary}");
}

/// The summary section of a ginkgo run (the failed specs), or the tail.
fn failures(stdout: &str) -> String {
    match stdout.find("Summarizing") {
        Some(at) => stdout[at..].to_owned(),
        None => {
            let lines: Vec<&str> = stdout.lines().collect();
            lines[lines.len().saturating_sub(80)..].join("\n")
        }
    }
}
