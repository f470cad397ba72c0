//! Test harness for the LVM backend: a throwaway volume group on a loop
//! device (removed on drop, also when the test panics) and the real
//! `kennel driver --backend lvm` on a temporary socket.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kennel::csi::client::CsiClient;
use kennel::csi::pb::{
    self, controller_client::ControllerClient, node_client::NodeClient,
    volume_capability::access_mode::Mode, volume_capability::AccessMode,
    volume_capability::AccessType, volume_capability::BlockVolume, volume_capability::MountVolume,
};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

pub const MIB: i64 = 1 << 20;
pub const GIB: i64 = 1 << 30;
pub const OWNER_TAG: &str = "kennel.csi.dev";
pub const PENDING_TAG: &str = "kennel.csi.dev/pending";
#[path = "../common/vg.rs"]
mod vg;
pub use vg::*;

/// Mounts below `dir` (one at `dir` itself is the harness's shared kubelet mount).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(4).map(PathBuf::from))
        .filter(|p| p.starts_with(dir) && p != dir)
        .collect()
}

/// The driver binary on a temporary socket, backed by LVM.
pub struct LvmDriver {
    pub root: PathBuf,
    /// Where the driver serves /metrics.
    pub metrics: std::net::SocketAddr,
    pub endpoint: String,
    pub volume_groups: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Extra `kennel driver` flags.
    pub args: Vec<String>,
    pub client: CsiClient,
    child: Option<Child>,
    log: PathBuf,
    /// `root` as the driver's `--kubelet-dir`, on a shared mount.
    _kubelet: kennel::node::shared_mount::SharedMount,
    _dir: tempfile::TempDir,
}

impl LvmDriver {
    pub async fn start(vg: &TestVg) -> LvmDriver {
        LvmDriver::start_with(vec![vg.name.clone()], vec![]).await
    }

    pub async fn start_with(volume_groups: Vec<String>, env: Vec<(String, String)>) -> LvmDriver {
        LvmDriver::start_with_args(volume_groups, env, vec![]).await
    }

    pub async fn start_with_args(
        volume_groups: Vec<String>,
        env: Vec<(String, String)>,
        args: Vec<String>,
    ) -> LvmDriver {
        let dir = tempfile::Builder::new()
            .prefix("kennel-lvm-test-")
            .tempdir()
            .expect("temp dir");
        let root = fs::canonicalize(dir.path()).expect("resolve");
        let endpoint = format!("unix://{}", root.join("csi.sock").display());
        let log = root.join("driver.log");
        let metrics = free_local_port();
        let kubelet =
            kennel::node::shared_mount::SharedMount::new(&root).expect("shared kubelet dir");
        let mut child = spawn(&root, &endpoint, metrics, &volume_groups, &env, &args, &log);
        let client = wait_ready(&mut child, &endpoint, &log).await;
        LvmDriver {
            root,
            metrics,
            endpoint,
            volume_groups,
            env,
            args,
            client,
            child: Some(child),
            log,
            _kubelet: kubelet,
            _dir: dir,
        }
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        self.client.controller.clone()
    }

    pub fn node(&self) -> NodeClient<Channel> {
        self.client.node.clone()
    }

    /// SIGKILL the driver and start it again with `env`.
    pub async fn restart_with(&mut self, env: Vec<(String, String)>) {
        self.kill();
        self.env = env;
        let mut child = spawn(
            &self.root,
            &self.endpoint,
            self.metrics,
            &self.volume_groups,
            &self.env,
            &self.args,
            &self.log,
        );
        self.client = wait_ready(&mut child, &self.endpoint, &self.log).await;
        self.child = Some(child);
    }

    pub async fn restart(&mut self) {
        self.restart_with(vec![]).await;
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("driver is running").id() as i32
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Wait (bounded) for the driver to exit on its own.
    pub fn wait_exit(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.log, lines)
    }

    /// lvm2 commands the driver has run so far, by command
    /// (`kennel_lvm_commands_total`).
    pub async fn lvm_commands(&self) -> BTreeMap<String, u64> {
        let body = scrape(self.metrics).await;
        body.lines()
            .filter_map(|line| line.strip_prefix("kennel_lvm_commands_total{command=\""))
            .filter_map(|rest| {
                let (command, value) = rest.split_once("\"} ")?;
                Some((command.to_owned(), value.trim().parse().ok()?))
            })
            .collect()
    }

    /// lvm2 commands run while `work` ran, by command (zeros left out).
    pub async fn lvm_commands_during<F: std::future::Future>(
        &self,
        work: F,
    ) -> (F::Output, BTreeMap<String, u64>) {
        let before = self.lvm_commands().await;
        let out = work.await;
        let after = self.lvm_commands().await;
        let diff = after
            .into_iter()
            .map(|(k, v)| {
                let was = before.get(&k).copied().unwrap_or(0);
                (k, v - was)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        (out, diff)
    }

    pub fn staging_path(&self, id: &str) -> PathBuf {
        self.root.join("staging").join(id)
    }

    pub fn target_path(&self, id: &str, block: bool) -> PathBuf {
        self.root
            .join("pods")
            .join(id)
            .join(if block { "dev" } else { "mount" })
    }

    pub async fn create(&self, req: pb::CreateVolumeRequest) -> pb::Volume {
        let name = req.name.clone();
        self.controller()
            .create_volume(req)
            .await
            .unwrap_or_else(|s| panic!("CreateVolume {name}: {s:?}\n{}", self.log_tail(30)))
            .into_inner()
            .volume
            .expect("volume")
    }

    pub async fn delete(&self, id: &str) {
        self.controller()
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: id.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("DeleteVolume {id}: {s:?}"));
    }

    pub async fn list_all(&self) -> Vec<pb::Volume> {
        self.controller()
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries
            .into_iter()
            .filter_map(|e| e.volume)
            .collect()
    }

    pub async fn capacity(&self, params: BTreeMap<String, String>) -> Result<i64, Status> {
        Ok(self
            .controller()
            .get_capacity(pb::GetCapacityRequest {
                parameters: params.into_iter().collect(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .available_capacity)
    }

    pub async fn snapshot(&self, name: &str, source: &str) -> pb::Snapshot {
        self.controller()
            .create_snapshot(pb::CreateSnapshotRequest {
                name: name.to_owned(),
                source_volume_id: source.to_owned(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("CreateSnapshot {name}: {s:?}\n{}", self.log_tail(30)))
            .into_inner()
            .snapshot
            .expect("snapshot")
    }

    pub async fn stage(&self, id: &str, cap: pb::VolumeCapability) -> PathBuf {
        let staging = self.staging_path(id);
        fs::create_dir_all(&staging).expect("staging dir");
        self.node()
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: id.to_owned(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("NodeStageVolume {id}: {s:?}\n{}", self.log_tail(30)));
        staging
    }

    pub async fn unstage(&self, id: &str) {
        self.node()
            .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                volume_id: id.to_owned(),
                staging_target_path: self.staging_path(id).display().to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("NodeUnstageVolume {id}: {s:?}"));
    }

    pub async fn publish(&self, id: &str, cap: pb::VolumeCapability) -> PathBuf {
        let block = matches!(cap.access_type, Some(AccessType::Block(_)));
        let target = self.target_path(id, block);
        self.node()
            .node_publish_volume(pb::NodePublishVolumeRequest {
                volume_id: id.to_owned(),
                staging_target_path: self.staging_path(id).display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(cap),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("NodePublishVolume {id}: {s:?}\n{}", self.log_tail(30)));
        target
    }

    /// The driver's /metrics text.
    pub async fn metrics_text(&self) -> String {
        scrape(self.metrics).await
    }

    /// A volume's condition as ListVolumes and ControllerGetVolume report it
    /// (they must agree; a refresh of the index between the two calls gets
    /// one more try).
    pub async fn condition(&self, id: &str) -> pb::VolumeCondition {
        let (listed, got) = self.conditions(id).await;
        if listed == got {
            return listed;
        }
        let (listed, got) = self.conditions(id).await;
        assert_eq!(listed, got, "ListVolumes and ControllerGetVolume disagree");
        listed
    }

    async fn conditions(&self, id: &str) -> (pb::VolumeCondition, pb::VolumeCondition) {
        let listed = self
            .controller()
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .expect("ListVolumes")
            .into_inner()
            .entries
            .into_iter()
            .find(|e| e.volume.as_ref().is_some_and(|v| v.volume_id == id))
            .and_then(|e| e.status?.volume_condition)
            .unwrap_or_else(|| panic!("ListVolumes has no condition for {id}"));
        let got = self
            .controller()
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: id.to_owned(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner()
            .status
            .and_then(|s| s.volume_condition)
            .expect("ControllerGetVolume condition");
        (listed, got)
    }

    /// Wait (bounded) until the volume's condition is abnormal, for the index
    /// refresh to notice a fault; the condition then.
    pub async fn abnormal_condition(&self, id: &str, secs: u64) -> pb::VolumeCondition {
        let deadline = Instant::now() + Duration::from_secs(secs * timeout_scale());
        loop {
            let condition = self.condition(id).await;
            if condition.abnormal {
                return condition;
            }
            assert!(
                Instant::now() < deadline,
                "{id} still reported healthy: {condition:?}\n{}",
                self.log_tail(20)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Wait (bounded) until /metrics shows `kennel_volume_condition` of `id`
    /// as 1 with `message`. A no-op DeleteVolume prompts a new observation.
    pub async fn assert_condition_metric(&self, id: &str, message: &str) {
        let series = format!(
            "volume_id=\"{id}\",claim=\"\",message=\"{}\"}} 1",
            message.replace('\\', "\\\\").replace('"', "\\\"")
        );
        let deadline = Instant::now() + Duration::from_secs(20 * timeout_scale());
        loop {
            let _ = self
                .controller()
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: "kv-000000000000000000000000".to_owned(),
                    secrets: Default::default(),
                })
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
            let text = self.metrics_text().await;
            if text.contains(&series) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no kennel_volume_condition series ending {series} in\n{text}"
            );
        }
    }

    pub async fn unpublish(&self, id: &str, block: bool) {
        self.node()
            .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                volume_id: id.to_owned(),
                target_path: self.target_path(id, block).display().to_string(),
            })
            .await
            .unwrap_or_else(|s| panic!("NodeUnpublishVolume {id}: {s:?}"));
    }
}

impl Drop for LvmDriver {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail(60));
        }
        self.kill();
        let mut mounts = mounts_under(&self.root);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            let _ = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// GET /metrics (plain HTTP/1.1, connection closed by the server).
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(
            format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("send");
    let mut raw = String::new();
    stream
        .read_to_string(&mut raw)
        .await
        .expect("read /metrics");
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    raw
}

/// A local TCP port nobody listens on (for the driver's metrics).
fn free_local_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free local port")
}

fn spawn(
    root: &Path,
    endpoint: &str,
    metrics: std::net::SocketAddr,
    volume_groups: &[String],
    env: &[(String, String)],
    args: &[String],
    log: &Path,
) -> Child {
    let log_file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kennel"));
    cmd.args(["driver", "--backend", "lvm", "--node-id", "lvm-test-node"])
        .arg("--endpoint")
        .arg(endpoint)
        .arg("--lock-dir")
        .arg(root.join("locks"))
        .arg("--metrics-addr")
        .arg(metrics.to_string())
        .arg("--kubelet-dir")
        .arg(root);
    for vg in volume_groups {
        cmd.arg("--volume-group").arg(vg);
    }
    cmd.args(args);
    // The budget guards a workload frozen for a copy; under emulation (the device-mapper VM
    // lane) a 64 MiB copy alone can take longer than the default 5 s. These tests check what
    // is copied; conformance/snapshots.rs checks the budget itself.
    if !args.iter().any(|a| a == "--freeze-budget") {
        cmd.args(["--freeze-budget", "60s"]);
    }
    cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "kennel=debug,info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup"))
        .stderr(log_file)
        .spawn()
        .expect("spawn kennel driver")
}

async fn wait_ready(child: &mut Child, endpoint: &str, log: &Path) -> CsiClient {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("poll driver") {
            panic!(
                "driver exited with {status:?} before serving\n{}",
                log_tail(log, 40)
            );
        }
        if let Ok(client) = CsiClient::connect(endpoint).await {
            let mut identity = client.identity.clone();
            if identity.probe(pb::ProbeRequest {}).await.is_ok() {
                return client;
            }
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("driver did not answer within 30s\n{}", log_tail(log, 40));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn log_tail(log: &Path, lines: usize) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    format!(
        "--- driver log (last {lines} lines) ---\n{}",
        all[start..].join("\n")
    )
}

// ---- requests ----

pub fn mount_cap(fs_type: &str) -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs_type.to_owned(),
            ..Default::default()
        })),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn block_cap() -> pb::VolumeCapability {
    pb::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
    }
}

pub fn create_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap("")],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    }
}

pub fn from_snapshot(
    mut req: pb::CreateVolumeRequest,
    snapshot_id: &str,
) -> pb::CreateVolumeRequest {
    use pb::volume_content_source::{SnapshotSource, Type};
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snapshot_id.to_owned(),
        })),
    });
    req
}

pub fn from_volume(mut req: pb::CreateVolumeRequest, volume_id: &str) -> pb::CreateVolumeRequest {
    use pb::volume_content_source::{Type, VolumeSource};
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: volume_id.to_owned(),
        })),
    });
    req
}

#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<Response<T>, Status>,
    code: Code,
    what: &str,
) -> String {
    match result {
        Ok(resp) => panic!("{what}: expected {code:?}, got OK: {:?}", resp.into_inner()),
        Err(status) => {
            assert_eq!(
                status.code(),
                code,
                "{what}: expected {code:?}, got {:?}: {}",
                status.code(),
                status.message()
            );
            status.message().to_owned()
        }
    }
}

pub async fn with_timeout<F: std::future::Future>(secs: u64, body: F) -> F::Output {
    let secs = secs * vg::timeout_scale();
    match tokio::time::timeout(Duration::from_secs(secs), body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {secs}s"),
    }
}

/// The LV of a snapshot: the CO's ID names the node after `@`; the LV is the bare ID.
pub fn snapshot_lv(csi_id: &str) -> String {
    csi_id.split('@').next().unwrap_or_default().to_owned()
}
