//! Test harness: the real `kennel driver` binary on a temporary socket,
//! backed by a loop directory or a throwaway LVM volume group, driven over
//! gRPC, with host state (mounts, loop devices, LVs) inspected and cleaned
//! up independently of the driver.
//!
//! The backend comes from the including test target: its crate root
//! defines `FIXED_BACKEND` (`Some` to pin one, `None` to read
//! `KENNEL_TEST_BACKEND`, `loop` by default or `lvm`).

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kennel::csi::client::CsiClient;
use kennel::csi::pb::{
    self, controller_client::ControllerClient, identity_client::IdentityClient,
    node_client::NodeClient, volume_capability::access_mode::Mode, volume_capability::AccessMode,
    volume_capability::AccessType, volume_capability::BlockVolume, volume_capability::MountVolume,
};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

pub mod vg;
pub mod vm_lane;

pub use vg::skip::cannot_run;
use vg::TestVg;

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;
pub const TOPOLOGY_KEY: &str = "topology.kennel.csi.dev/node";
pub const DRIVER_NAME: &str = "kennel.csi.dev";

/// Run a test body with a deadline, so a hung RPC fails the test instead of CI.
/// Against LVM every test needs root, lvm2 and loop devices: without them
/// the test fails, or is skipped loudly under `KENNEL_ALLOW_SKIP=1`.
pub async fn with_timeout<F: Future<Output = ()>>(secs: u64, body: F) {
    if Backend::current() == Backend::Lvm && !vg::can_run() {
        return;
    }
    let secs = secs * vg::timeout_scale();
    match tokio::time::timeout(Duration::from_secs(secs), body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {secs}s"),
    }
}

/// Tests that touch loop devices and mounts need root and loop support.
/// Without them the test fails, or returns false under `KENNEL_ALLOW_SKIP=1`
/// after saying so on stdout.
pub fn can_use_loop_devices() -> bool {
    if Backend::current() == Backend::Lvm {
        return vg::can_run();
    }
    if !nix::unistd::geteuid().is_root() {
        return !cannot_run("this test needs root (loop devices and mounts)");
    }
    if !Path::new("/dev/loop-control").exists() {
        return !cannot_run("/dev/loop-control is missing");
    }
    true
}

/// The storage behind the driver under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Image files in a loop directory (`--backend loop`).
    Loop,
    /// Linear LVs in a throwaway volume group (`--backend lvm`).
    Lvm,
}

impl Backend {
    /// The backend of this test run: pinned by the test target, else
    /// `KENNEL_TEST_BACKEND`.
    pub fn current() -> Backend {
        crate::FIXED_BACKEND.unwrap_or_else(Backend::from_env)
    }

    /// `KENNEL_TEST_BACKEND`: `loop` (the default) or `lvm`.
    pub fn from_env() -> Backend {
        match std::env::var("KENNEL_TEST_BACKEND").as_deref() {
            Err(_) | Ok("") | Ok("loop") => Backend::Loop,
            Ok("lvm") => Backend::Lvm,
            Ok(other) => panic!("KENNEL_TEST_BACKEND={other:?}: expected loop or lvm"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    Sparse,
    Preallocated,
}

/// Flags for one driver instance.
#[derive(Debug, Clone)]
pub struct DriverOpts {
    pub backend: Backend,
    pub node_id: String,
    /// The pool size: the loop backend's `--capacity`, the size of the
    /// LVM test VG.
    pub capacity: String,
    /// Loop backend only.
    pub provisioning: Provisioning,
    pub max_volumes_per_node: Option<i64>,
    /// More flags for `kennel driver`.
    pub extra_args: Vec<String>,
    /// Environment of the driver process (e.g. a PATH with stand-in tools).
    pub env: Vec<(String, String)>,
    /// Loop backend: the images' directory, if not one in the test's own temp dir (a test
    /// that needs them on a filesystem of its choosing).
    pub loop_dir: Option<PathBuf>,
}

impl Default for DriverOpts {
    fn default() -> Self {
        DriverOpts {
            backend: Backend::current(),
            node_id: "test-node-1".to_owned(),
            capacity: "512MiB".to_owned(),
            provisioning: Provisioning::Preallocated,
            max_volumes_per_node: None,
            extra_args: Vec::new(),
            env: Vec::new(),
            loop_dir: None,
        }
    }
}

impl DriverOpts {
    pub fn sparse(capacity: &str) -> Self {
        DriverOpts {
            capacity: capacity.to_owned(),
            provisioning: Provisioning::Sparse,
            ..Default::default()
        }
    }

    /// The backend and, for loop, the provisioning mode, for messages.
    pub fn label(&self) -> String {
        match self.backend {
            Backend::Loop => format!("loop {:?}", self.provisioning),
            Backend::Lvm => "lvm".to_owned(),
        }
    }

    /// One driver per provisioning mode the backend has: sparse and
    /// preallocated loop images; LVM has only one.
    pub fn each_provisioning(capacity: &str) -> Vec<Self> {
        match Backend::current() {
            Backend::Loop => vec![
                DriverOpts::sparse(capacity),
                DriverOpts::preallocated(capacity),
            ],
            Backend::Lvm => vec![DriverOpts::preallocated(capacity)],
        }
    }

    pub fn preallocated(capacity: &str) -> Self {
        DriverOpts {
            capacity: capacity.to_owned(),
            provisioning: Provisioning::Preallocated,
            ..Default::default()
        }
    }
}

/// Mount IDs of the test directories made shared kubelet directories: the
/// harness's own mounts, never a leak.
/// Mount IDs are reused once a mount is gone, so an entry names the mount
/// point too.
static KUBELET_MOUNTS: std::sync::Mutex<BTreeSet<(u64, PathBuf)>> =
    std::sync::Mutex::new(BTreeSet::new());

/// Make `dir` a kubelet directory the driver accepts: a bind mount of itself,
/// shared, so it passes the driver's mount-propagation check. Unmounted when
/// the returned guard drops.
pub fn shared_kubelet_dir(dir: &Path) -> kennel::node::shared_mount::SharedMount {
    let shared = kennel::node::shared_mount::SharedMount::new(dir)
        .unwrap_or_else(|e| panic!("make {} a shared mount: {e}", dir.display()));
    // None if `dir` already lay on a shared mount and needed none of its own.
    let own = mountinfo()
        .into_iter()
        .filter(|m| m.mount_point == dir)
        .map(|m| m.id)
        .max();
    if let Some(id) = own {
        KUBELET_MOUNTS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((id, dir.to_owned()));
    }
    shared
}

fn is_harness_mount(m: &Mount) -> bool {
    KUBELET_MOUNTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .contains(&(m.id, m.mount_point.clone()))
}

/// One running driver and everything it may have touched.
pub struct TestDriver {
    /// Canonical path of the temporary directory holding everything below.
    pub root: PathBuf,
    pub loop_dir: PathBuf,
    /// The LVM backend's volume group, kept across restarts.
    pub vg: Option<TestVg>,
    pub socket: PathBuf,
    pub endpoint: String,
    pub opts: DriverOpts,
    pub client: CsiClient,
    child: Option<Child>,
    log: PathBuf,
    /// `root` as the driver's `--kubelet-dir`: a shared mount of itself.
    kubelet: Option<kennel::node::shared_mount::SharedMount>,
    tempdir: Option<tempfile::TempDir>,
}

impl TestDriver {
    pub async fn start() -> TestDriver {
        TestDriver::start_with(DriverOpts::default()).await
    }

    pub async fn start_with(opts: DriverOpts) -> TestDriver {
        let tempdir = tempfile::Builder::new()
            .prefix("kennel-test-")
            .tempdir()
            .expect("create temp dir");
        let root = fs::canonicalize(tempdir.path()).expect("resolve temp dir");
        let loop_dir = opts.loop_dir.clone().unwrap_or_else(|| root.join("loop"));
        let socket = root.join("run").join("csi.sock");
        for dir in ["staging", "pods"] {
            fs::create_dir_all(root.join(dir)).expect("create test dirs");
        }
        let endpoint = format!("unix://{}", socket.display());
        let log = root.join("driver.log");
        let vg = match opts.backend {
            Backend::Loop => None,
            Backend::Lvm => Some(TestVg::with_capacity(parse_size(&opts.capacity))),
        };
        let kubelet = shared_kubelet_dir(&root);
        let storage = Storage::of(&root, &loop_dir, vg.as_ref());
        let mut child = spawn_driver(&opts, &endpoint, &storage, &log, &root);
        let client = wait_ready(&mut child, &endpoint, &log).await;
        TestDriver {
            root,
            loop_dir,
            vg,
            socket,
            endpoint,
            opts,
            client,
            child: Some(child),
            log,
            kubelet: Some(kubelet),
            tempdir: Some(tempdir),
        }
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        self.client.controller.clone()
    }

    pub fn node(&self) -> NodeClient<Channel> {
        self.client.node.clone()
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        self.client.identity.clone()
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("driver is running").id() as i32
    }

    /// Start the binary again on the same directory and socket path.
    async fn spawn_again(&mut self) {
        let mut child = spawn_driver(
            &self.opts,
            &self.endpoint,
            &self.storage(),
            &self.log,
            &self.root,
        );
        let ready = wait_ready(&mut child, &self.endpoint, &self.log).await;
        self.child = Some(child);
        self.client = ready;
    }

    /// Crash the driver (SIGKILL) and start it again: state must come back
    /// from disk and the host. The killed driver leaves its socket file
    /// behind, which the new one must replace.
    pub async fn restart(&mut self) {
        self.kill();
        assert!(
            self.socket.exists(),
            "a SIGKILLed driver cannot remove its socket; expected a stale socket file"
        );
        self.spawn_again().await;
    }

    /// Stop the driver with SIGTERM; it must exit 0 and remove its socket.
    pub async fn stop_gracefully(&mut self) -> ExitStatus {
        let status = self.terminate().await;
        assert!(
            status.success(),
            "driver exited with {status:?} after SIGTERM\n{}",
            self.log_tail(40)
        );
        assert!(
            !self.socket.exists(),
            "driver left its socket {} behind after SIGTERM",
            self.socket.display()
        );
        status
    }

    /// Graceful stop, then start again.
    pub async fn restart_gracefully(&mut self) {
        self.stop_gracefully().await;
        self.spawn_again().await;
    }

    /// Send SIGTERM and wait (bounded) for the exit status.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal_and_wait(nix::sys::signal::Signal::SIGTERM)
            .await
    }

    /// Send `signal` and wait (bounded) for the exit status.
    pub async fn signal_and_wait(&mut self, signal: nix::sys::signal::Signal) -> ExitStatus {
        let mut child = self.child.take().expect("driver is running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("send signal");
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().expect("wait for driver") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "driver did not exit within 15s of {signal}\n{}",
                    self.log_tail(40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Start the driver again after it was stopped.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "driver is still running");
        self.spawn_again().await;
    }

    /// SIGKILL and reap the driver, if running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start the driver binary with these options against this test's
    /// directories; the caller owns the process.
    pub fn spawn_other(&self, opts: &DriverOpts, endpoint: &str) -> Child {
        spawn_driver(
            opts,
            endpoint,
            &self.storage(),
            &self.root.join("other.log"),
            &self.root,
        )
    }

    fn storage(&self) -> Storage {
        Storage::of(&self.root, &self.loop_dir, self.vg.as_ref())
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    // ---- paths, as the kubelet would choose them ----

    pub fn staging_path(&self, volume_id: &str) -> PathBuf {
        self.root.join("staging").join(volume_id)
    }

    /// A publish target: a directory for Filesystem volumes, a file for Block.
    pub fn target_path(&self, volume_id: &str, block: bool) -> PathBuf {
        self.root
            .join("pods")
            .join(volume_id)
            .join(if block { "dev" } else { "mount" })
    }

    /// The loop backend's image file of a volume.
    pub fn image_path(&self, volume_id: &str) -> PathBuf {
        assert_eq!(
            self.opts.backend,
            Backend::Loop,
            "image files are loop-only"
        );
        self.loop_dir.join(format!("{volume_id}.img"))
    }

    // ---- the volume's storage on the host, for either backend ----

    /// Whether the volume's storage (image file or LV) exists.
    pub fn stored(&self, volume_id: &str) -> bool {
        self.stored_size(volume_id).is_some()
    }

    /// Size of the volume's image file or LV.
    pub fn stored_size(&self, volume_id: &str) -> Option<u64> {
        match &self.vg {
            None => fs::metadata(self.image_path(volume_id))
                .ok()
                .map(|m| m.len()),
            Some(vg) => vg.lv(volume_id).map(|lv| lv.size),
        }
    }

    /// Every object the backend keeps for volumes on the host: files in
    /// the loop directory (not its lock file or subdirectories), LVs in the
    /// volume group.
    pub fn host_objects(&self) -> BTreeSet<String> {
        match &self.vg {
            None => fs::read_dir(&self.loop_dir)
                .map(|dir| {
                    dir.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|name| !name.starts_with('.'))
                        .collect()
                })
                .unwrap_or_default(),
            Some(vg) => vg.lvs().into_iter().map(|lv| lv.name).collect(),
        }
    }

    /// How many host objects one volume has: an image and its record for
    /// the loop backend, one tagged LV for LVM.
    pub fn objects_per_volume(&self) -> usize {
        match self.vg {
            None => 2,
            Some(_) => 1,
        }
    }

    /// Volumes with storage on the host: image files, or volume LVs.
    pub fn stored_volumes(&self) -> BTreeSet<String> {
        self.host_objects()
            .into_iter()
            .filter_map(|name| match self.vg {
                None => name.strip_suffix(".img").map(str::to_owned),
                Some(_) => name.starts_with("kv-").then_some(name),
            })
            .collect()
    }

    /// Loop devices exposing the volume: over its image file, or the
    /// window over the PV range of its LV.
    pub fn attachments(&self, volume_id: &str) -> Vec<PathBuf> {
        match &self.vg {
            None => loops_of(&self.image_path(volume_id))
                .into_iter()
                .map(|l| l.device)
                .collect(),
            // With device-mapper an LV is attached when it is active.
            Some(vg) if vg::device_mapper() => {
                vg.device_in_use_of_lv(volume_id).into_iter().collect()
            }
            Some(vg) => vg.windows_of_lv(volume_id),
        }
    }

    /// The volume's attachments once a detach has settled: a device that another process
    /// (an lvm2 or blkid scan of every device) still holds is cleared by the kernel when that
    /// process closes it, which under load can take longer than the driver's own 2 s wait.
    pub fn attachments_after_release(&self, volume_id: &str) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let left = self.attachments(volume_id);
            if left.is_empty() || Instant::now() > deadline {
                return left;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Attach the volume's loop device the way the driver does, as a
    /// driver killed right after attaching leaves it.
    pub fn attach_by_hand(&self, volume_id: &str) -> PathBuf {
        if let Some(vg) = self.vg.as_ref().filter(|_| vg::device_mapper()) {
            let lv = format!("{}/{volume_id}", vg.name);
            vg::lvm_ok("lvchange", &["-ay", "-K", &lv]);
            let device = vg
                .active_device_of_lv(volume_id)
                .expect("active after lvchange -ay");
            return fs::canonicalize(device).expect("resolve the LV's device");
        }
        let mut cmd = Command::new("losetup");
        cmd.args(["--find", "--show"]);
        match &self.vg {
            None => {
                cmd.arg(self.image_path(volume_id));
            }
            Some(vg) => {
                let offset = vg.lv_offset(volume_id).expect("LV offset");
                let size = vg.lv(volume_id).expect("LV").size;
                cmd.arg("--offset")
                    .arg(offset.to_string())
                    .arg("--sizelimit")
                    .arg(size.to_string())
                    .arg(&vg.pv);
            }
        }
        let out = cmd.output().expect("run losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
    }

    // ---- RPC shorthands that must succeed ----

    pub async fn create(&self, name: &str, bytes: i64, cap: pb::VolumeCapability) -> pb::Volume {
        self.controller()
            .create_volume(create_req(name, bytes, vec![cap]))
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {name}: {s:?}"))
            .into_inner()
            .volume
            .expect("CreateVolume returned no volume")
    }

    pub async fn delete(&self, volume_id: &str) {
        self.controller()
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: volume_id.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {volume_id}: {s:?}"));
    }

    pub fn stage_req(
        &self,
        volume_id: &str,
        cap: pb::VolumeCapability,
    ) -> pb::NodeStageVolumeRequest {
        pb::NodeStageVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: self.staging_path(volume_id).display().to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        }
    }

    pub async fn stage(&self, volume_id: &str, cap: pb::VolumeCapability) -> PathBuf {
        fs::create_dir_all(self.staging_path(volume_id)).expect("create staging dir");
        self.node()
            .node_stage_volume(self.stage_req(volume_id, cap))
            .await
            .unwrap_or_else(|s| {
                panic!("NodeStageVolume {volume_id}: {s:?}\n{}", self.log_tail(20))
            });
        self.staging_path(volume_id)
    }

    pub fn unstage_req(&self, volume_id: &str) -> pb::NodeUnstageVolumeRequest {
        pb::NodeUnstageVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: self.staging_path(volume_id).display().to_string(),
        }
    }

    pub async fn unstage(&self, volume_id: &str) {
        self.node()
            .node_unstage_volume(self.unstage_req(volume_id))
            .await
            .unwrap_or_else(|s| panic!("NodeUnstageVolume {volume_id}: {s:?}"));
    }

    pub fn publish_req(
        &self,
        volume_id: &str,
        cap: pb::VolumeCapability,
        readonly: bool,
    ) -> pb::NodePublishVolumeRequest {
        let block = is_block(&cap);
        pb::NodePublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            staging_target_path: self.staging_path(volume_id).display().to_string(),
            target_path: self.target_path(volume_id, block).display().to_string(),
            volume_capability: Some(cap),
            readonly,
            ..Default::default()
        }
    }

    pub async fn publish(
        &self,
        volume_id: &str,
        cap: pb::VolumeCapability,
        readonly: bool,
    ) -> PathBuf {
        let block = is_block(&cap);
        self.node()
            .node_publish_volume(self.publish_req(volume_id, cap, readonly))
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "NodePublishVolume {volume_id}: {s:?}\n{}",
                    self.log_tail(20)
                )
            });
        self.target_path(volume_id, block)
    }

    pub fn unpublish_req(&self, volume_id: &str, block: bool) -> pb::NodeUnpublishVolumeRequest {
        pb::NodeUnpublishVolumeRequest {
            volume_id: volume_id.to_owned(),
            target_path: self.target_path(volume_id, block).display().to_string(),
        }
    }

    pub async fn unpublish(&self, volume_id: &str, block: bool) {
        self.node()
            .node_unpublish_volume(self.unpublish_req(volume_id, block))
            .await
            .unwrap_or_else(|s| panic!("NodeUnpublishVolume {volume_id}: {s:?}"));
    }

    pub async fn list_all(&self) -> Vec<pb::Volume> {
        let resp = self
            .controller()
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner();
        resp.entries.into_iter().filter_map(|e| e.volume).collect()
    }

    pub async fn available_capacity(&self, segment: Option<BTreeMap<String, String>>) -> i64 {
        self.controller()
            .get_capacity(pb::GetCapacityRequest {
                accessible_topology: segment.map(|segments| pb::Topology { segments }),
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner()
            .available_capacity
    }

    pub fn own_segment(&self) -> BTreeMap<String, String> {
        segment(&self.opts.node_id)
    }

    /// Assert the driver left no mount and no loop device behind under this test's directory.
    pub fn assert_no_leaks(&self) {
        let mounts = leaked_mounts(&self.root);
        assert!(mounts.is_empty(), "leaked mounts: {mounts:#?}");
        let loops = leaked_loops(&self.root);
        assert!(loops.is_empty(), "leaked loop devices: {loops:#?}");
        if let Some(vg) = &self.vg {
            let windows = vg::windows_of(&vg.pv);
            assert!(windows.is_empty(), "leaked loop windows: {windows:#?}");
        }
    }

    /// Remove every trace from the host: driver, mounts, loop devices.
    /// Returns whether the host is clean.
    fn clean_host(&mut self) -> bool {
        self.kill();
        unmount_everything_under(&self.root);
        detach_loops_under(&self.root);
        if let Some(vg) = &self.vg {
            vg::detach_windows(&vg.pv);
        }
        leaked_mounts(&self.root).is_empty() && leaked_loops(&self.root).is_empty()
    }
}

impl Drop for TestDriver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(60));
        }
        let clean = self.clean_host();
        // Before the directory goes: a mount point cannot be removed.
        drop(self.kubelet.take());
        if let Some(dir) = self.tempdir.take() {
            if clean {
                drop(dir);
            } else {
                // Removing a directory that still has mounts in it would
                // delete through them: keep it and say so.
                let kept = dir.keep();
                eprintln!(
                    "warning: could not clean {} completely; left in place",
                    kept.display()
                );
            }
        }
    }
}

/// Wait until the driver answers Probe on `endpoint`; fail if it exits first.
pub async fn wait_ready(child: &mut Child, endpoint: &str, log: &Path) -> CsiClient {
    // A start sweeps and zeroes what a killed driver left: slow under emulation.
    let limit = Duration::from_secs(20 * vg::timeout_scale());
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("poll driver") {
            panic!(
                "driver exited with {status:?} before serving\n{}",
                log_tail(log, 40)
            );
        }
        if let Ok(client) = CsiClient::connect(endpoint).await {
            let mut identity = client.identity.clone();
            if let Ok(resp) = identity.probe(pb::ProbeRequest {}).await {
                if resp.into_inner().ready != Some(false) {
                    return client;
                }
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "driver did not answer Probe within {limit:?}\n{}",
                log_tail(log, 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!(
        "--- driver log {} (last {lines} lines) ---\n{}",
        log.display(),
        all[start..].join("\n")
    )
}

/// Where a driver keeps its volumes.
enum Storage {
    Loop { dir: PathBuf },
    Lvm { vg: String, lock_dir: PathBuf },
}

impl Storage {
    fn of(root: &Path, loop_dir: &Path, vg: Option<&TestVg>) -> Storage {
        match vg {
            None => Storage::Loop {
                dir: loop_dir.to_owned(),
            },
            Some(vg) => Storage::Lvm {
                vg: vg.name.clone(),
                lock_dir: root.join("locks"),
            },
        }
    }
}

/// A size as the driver's flags take it: bytes or a KiB/MiB/GiB suffix.
pub fn parse_size(size: &str) -> u64 {
    let (digits, unit) = size
        .find(|c: char| !c.is_ascii_digit())
        .map_or((size, ""), |i| size.split_at(i));
    let n: u64 = digits.parse().unwrap_or_else(|_| panic!("size {size:?}"));
    n * match unit {
        "" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => panic!("size {size:?}: unknown unit"),
    }
}

/// Start the driver binary; `kubelet_dir` stands in for the kubelet's directory.
fn spawn_driver(
    opts: &DriverOpts,
    endpoint: &str,
    storage: &Storage,
    log: &Path,
    kubelet_dir: &Path,
) -> Child {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open driver log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kennel"));
    cmd.arg("driver")
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--node-id")
        .arg(&opts.node_id);
    cmd.arg("--kubelet-dir").arg(kubelet_dir);
    match storage {
        Storage::Loop { dir } => {
            cmd.arg("--loop-dir")
                .arg(dir)
                .arg("--capacity")
                .arg(&opts.capacity)
                .arg("--reserve")
                .arg("0")
                .arg("--provisioning")
                .arg(match opts.provisioning {
                    Provisioning::Sparse => "sparse",
                    Provisioning::Preallocated => "preallocated",
                });
        }
        Storage::Lvm { vg, lock_dir } => {
            cmd.args(["--backend", "lvm", "--volume-group", vg])
                .arg("--lock-dir")
                .arg(lock_dir);
        }
    }
    if let Some(max) = opts.max_volumes_per_node {
        cmd.arg("--max-volumes-per-node").arg(max.to_string());
    }
    cmd.args(&opts.extra_args);
    cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
    cmd.env("RUST_LOG", "kennel=debug,info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup log"))
        .stderr(log_file)
        .spawn()
        .expect("spawn kennel driver")
}

// ---- request builders ----

pub fn segment(node: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(TOPOLOGY_KEY.to_owned(), node.to_owned())])
}

pub fn cap(access_type: AccessType, mode: Mode) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn mount_type(fs_type: &str) -> AccessType {
    AccessType::Mount(MountVolume {
        fs_type: fs_type.to_owned(),
        mount_flags: vec![],
        volume_mount_group: String::new(),
    })
}

pub fn block_type() -> AccessType {
    AccessType::Block(BlockVolume {})
}

/// SINGLE_NODE_WRITER Filesystem capability ("" = driver default fs).
pub fn mount_cap(fs_type: &str) -> pb::VolumeCapability {
    cap(mount_type(fs_type), Mode::SingleNodeWriter)
}

/// SINGLE_NODE_WRITER Block capability.
pub fn block_cap() -> pb::VolumeCapability {
    cap(block_type(), Mode::SingleNodeWriter)
}

pub fn is_block(cap: &pb::VolumeCapability) -> bool {
    matches!(cap.access_type, Some(AccessType::Block(_)))
}

pub fn create_req(
    name: &str,
    bytes: i64,
    caps: Vec<pb::VolumeCapability>,
) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: caps,
        ..Default::default()
    }
}

/// Assert an RPC failed with exactly `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<Response<T>, Status>,
    code: Code,
    what: &str,
) {
    match result {
        Ok(resp) => panic!("{what}: expected {code:?}, got OK: {:?}", resp.into_inner()),
        Err(status) => assert_eq!(
            status.code(),
            code,
            "{what}: expected {code:?}, got {:?}: {}",
            status.code(),
            status.message()
        ),
    }
}

/// A well-formed volume ID that no volume has.
pub const UNKNOWN_ID: &str = "kv-000000000000000000000000";

pub fn is_volume_id(id: &str) -> bool {
    id.len() == 27
        && id.starts_with("kv-")
        && id[3..]
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

// ---- host inspection, independent of the driver's own code ----

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone)]
pub struct Mount {
    pub id: u64,
    pub dev: String,
    pub root: String,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    pub source: String,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

fn unescape_octal(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn mountinfo() -> Vec<Mount> {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                id: f.first()?.parse().ok()?,
                dev: f.get(2)?.to_string(),
                root: unescape_octal(f.get(3)?),
                mount_point: PathBuf::from(unescape_octal(f.get(4)?)),
                options: f.get(5)?.to_string(),
                fs_type: r.first()?.to_string(),
                source: unescape_octal(r.get(1).unwrap_or(&"")),
            })
        })
        .collect()
}

/// Mounts exactly at `path`, oldest first (the last one is the visible one).
pub fn mounts_at(path: &Path) -> Vec<Mount> {
    mountinfo()
        .into_iter()
        .filter(|m| m.mount_point == path)
        .collect()
}

/// Mounts at or below `dir`.
pub fn leaked_mounts(dir: &Path) -> Vec<Mount> {
    mountinfo()
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir) && !is_harness_mount(m))
        .collect()
}

/// An attached loop device and its backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing_file: PathBuf,
}

pub fn loop_devices() -> Vec<LoopDevice> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return found;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        if let Ok(backing) = fs::read_to_string(entry.path().join("loop/backing_file")) {
            found.push(LoopDevice {
                device: PathBuf::from(format!("/dev/{name}")),
                backing_file: PathBuf::from(backing.trim_end_matches('\n')),
            });
        }
    }
    found.sort_by(|a, b| a.device.cmp(&b.device));
    found
}

/// Loop devices whose backing file lies under `dir`, preceded by the devices
/// stacked on them (read-only Block publications), so detaching in this
/// order frees every one.
pub fn leaked_loops(dir: &Path) -> Vec<LoopDevice> {
    let all = loop_devices();
    let direct: Vec<LoopDevice> = all
        .iter()
        .filter(|l| {
            // A deleted backing file shows as "<path> (deleted)".
            let raw = l.backing_file.to_string_lossy();
            Path::new(raw.trim_end_matches(" (deleted)")).starts_with(dir)
        })
        .cloned()
        .collect();
    let mut ordered: Vec<LoopDevice> = all
        .into_iter()
        .filter(|l| direct.iter().any(|d| d.device == l.backing_file))
        .collect();
    ordered.extend(direct);
    ordered
}

/// Loop devices backed by exactly this image.
pub fn loops_of(image: &Path) -> Vec<LoopDevice> {
    loop_devices()
        .into_iter()
        .filter(|l| l.backing_file == image)
        .collect()
}

fn unmount_everything_under(dir: &Path) {
    for _ in 0..32 {
        let mut mounts = leaked_mounts(dir);
        if mounts.is_empty() {
            return;
        }
        // Deepest first; among stacked mounts on one path, newest first.
        mounts.sort_by_key(|m| {
            (
                std::cmp::Reverse(m.mount_point.components().count()),
                std::cmp::Reverse(m.id),
            )
        });
        for m in mounts {
            if nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::empty()).is_err() {
                let _ = nix::mount::umount2(&m.mount_point, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

nix::ioctl_none_bad!(loop_clr_fd, 0x4C01);

fn detach_loops_under(dir: &Path) {
    for l in leaked_loops(dir) {
        if let Ok(dev) = File::open(&l.device) {
            // SAFETY: LOOP_CLR_FD takes no argument.
            let _ = unsafe { loop_clr_fd(dev.as_raw_fd()) };
        }
    }
    // A device still open somewhere detaches when closed; give it a moment.
    for _ in 0..50 {
        if leaked_loops(dir).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---- data helpers ----

pub fn write_file(path: &Path, contents: &[u8]) {
    let mut f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(contents).expect("write");
    f.sync_all().expect("fsync");
}

pub fn read_file(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Write bytes at `offset` of a published Block volume (the bind-mounted device file).
pub fn write_block(path: &Path, offset: u64, data: &[u8]) {
    let mut f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(data).expect("write block");
    f.sync_all().expect("fsync block device");
}

pub fn read_block(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len];
    f.read_exact(&mut buf).expect("read block");
    buf
}

/// Size of the block device behind a published Block volume.
pub fn block_size(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.seek(SeekFrom::End(0)).expect("seek to end")
}

/// Total bytes of the filesystem mounted at `path`.
pub fn fs_total_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks() as u64 * st.fragment_size() as u64
}

pub fn mode_of(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o7777
}

/// A recognisable pattern of `len` bytes.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Calls `call` again while the driver answers ABORTED (another operation on the same volume
/// is running), with a short backoff, as the kubelet and the sidecars do.
pub async fn retrying_aborted<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut pause = Duration::from_millis(20);
    loop {
        match call().await {
            Err(s) if s.code() == Code::Aborted => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// A line for the person running the tests (a measurement, not a result),
/// on the real stdout past cargo's capture; the VM lane relays these from
/// its guest.
pub fn report(line: &str) {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "KENNEL-REPORT {test}: {line}");
    let _ = out.flush();
}

/// A test this host cannot run, for a reason the VM lane's guest does not
/// have (`why`). A host that can run the lane runs it in the same
/// `cargo test` (tests/vm_lane.rs): the test says so here and leaves the
/// work to it. A host that cannot: the test cannot run anywhere, and fails
/// (`cannot_run`).
pub fn leave_to_vm_lane(why: &str) {
    match vm_lane::unavailable() {
        None => {
            let test = std::thread::current()
                .name()
                .unwrap_or("<unnamed test>")
                .to_owned();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "KENNEL-VM-LANE {test}: {why}; tests/vm_lane.rs runs it in a VM (conformance_lvm)"
            );
            let _ = out.flush();
        }
        Some(lane) => {
            cannot_run(&format!(
                "{why}, and the VM lane that runs it cannot run here: {lane}"
            ));
        }
    }
}
