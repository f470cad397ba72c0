//! Test harness: the real `kennel driver` binary on a temporary socket and
//! loop directory, driven over gRPC, with host state (mounts, loop devices)
//! inspected and cleaned up independently of the driver.

#![allow(dead_code)]

use std::collections::BTreeMap;
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

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;
pub const TOPOLOGY_KEY: &str = "topology.kennel.csi.dev/node";
pub const DRIVER_NAME: &str = "kennel.csi.dev";

/// Run a test body with a deadline, so a hung RPC fails the test instead of CI.
pub async fn with_timeout<F: Future>(secs: u64, body: F) -> F::Output {
    match tokio::time::timeout(Duration::from_secs(secs), body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {secs}s"),
    }
}

/// Tests that touch loop devices and mounts need root and loop support.
/// Returns false (after saying why) when the test must be skipped.
pub fn can_use_loop_devices() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: this test needs root (loop devices and mounts)");
        return false;
    }
    if !Path::new("/dev/loop-control").exists() {
        eprintln!("skipping: /dev/loop-control is missing");
        return false;
    }
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provisioning {
    Sparse,
    Preallocated,
}

/// Flags for one driver instance.
#[derive(Debug, Clone)]
pub struct DriverOpts {
    pub node_id: String,
    pub capacity: String,
    pub provisioning: Provisioning,
    pub max_volumes_per_node: Option<i64>,
}

impl Default for DriverOpts {
    fn default() -> Self {
        DriverOpts {
            node_id: "test-node-1".to_owned(),
            capacity: "512MiB".to_owned(),
            provisioning: Provisioning::Preallocated,
            max_volumes_per_node: None,
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

    pub fn preallocated(capacity: &str) -> Self {
        DriverOpts {
            capacity: capacity.to_owned(),
            provisioning: Provisioning::Preallocated,
            ..Default::default()
        }
    }
}

/// One running driver and everything it may have touched.
pub struct TestDriver {
    /// Canonical path of the temporary directory holding everything below.
    pub root: PathBuf,
    pub loop_dir: PathBuf,
    pub socket: PathBuf,
    pub endpoint: String,
    pub opts: DriverOpts,
    pub client: CsiClient,
    child: Option<Child>,
    log: PathBuf,
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
        let loop_dir = root.join("loop");
        let socket = root.join("run").join("csi.sock");
        for dir in ["staging", "pods"] {
            fs::create_dir_all(root.join(dir)).expect("create test dirs");
        }
        let endpoint = format!("unix://{}", socket.display());
        let log = root.join("driver.log");
        let mut child = spawn_driver(&opts, &endpoint, &loop_dir, &log);
        let client = wait_ready(&mut child, &endpoint, &log).await;
        TestDriver {
            root,
            loop_dir,
            socket,
            endpoint,
            opts,
            client,
            child: Some(child),
            log,
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
        let mut child = spawn_driver(&self.opts, &self.endpoint, &self.loop_dir, &self.log);
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
        spawn_driver(opts, endpoint, &self.loop_dir, &self.root.join("other.log"))
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

    pub fn image_path(&self, volume_id: &str) -> PathBuf {
        self.loop_dir.join(format!("{volume_id}.img"))
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
    }

    /// Remove every trace from the host: driver, mounts, loop devices.
    /// Returns whether the host is clean.
    fn clean_host(&mut self) -> bool {
        self.kill();
        unmount_everything_under(&self.root);
        detach_loops_under(&self.root);
        leaked_mounts(&self.root).is_empty() && leaked_loops(&self.root).is_empty()
    }
}

impl Drop for TestDriver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(60));
        }
        let clean = self.clean_host();
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
    let deadline = Instant::now() + Duration::from_secs(20);
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
                "driver did not answer Probe within 20s\n{}",
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

fn spawn_driver(opts: &DriverOpts, endpoint: &str, loop_dir: &Path, log: &Path) -> Child {
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
        .arg(&opts.node_id)
        .arg("--loop-dir")
        .arg(loop_dir)
        .arg("--capacity")
        .arg(&opts.capacity)
        .arg("--reserve")
        .arg("0")
        .arg("--provisioning")
        .arg(match opts.provisioning {
            Provisioning::Sparse => "sparse",
            Provisioning::Preallocated => "preallocated",
        });
    if let Some(max) = opts.max_volumes_per_node {
        cmd.arg("--max-volumes-per-node").arg(max.to_string());
    }
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
        .filter(|m| m.mount_point.starts_with(dir))
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

/// Loop devices whose backing file lies under `dir`.
pub fn leaked_loops(dir: &Path) -> Vec<LoopDevice> {
    loop_devices()
        .into_iter()
        .filter(|l| {
            // A deleted backing file shows as "<path> (deleted)".
            let raw = l.backing_file.to_string_lossy();
            Path::new(raw.trim_end_matches(" (deleted)")).starts_with(dir)
        })
        .collect()
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
