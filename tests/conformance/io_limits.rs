//! I/O limits (CreateVolume's mutable parameters, ControllerModifyVolume)
//! on the cgroup of the pod a volume is published to, against the kernel:
//! cgroup v1 blkio throttles where the host has blkio on v1 (this
//! project's CI host), cgroup v2 `io.max` where the io controller is free
//! for cgroup v2 (the VM lane's guest, which mounts no cgroups of its own).
//! Both end with a direct write from the pod's cgroup held to the limit.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use kennel::csi::pb;
use tonic::Code;

const T: u64 = 180;

/// blk-throttle lets one throttle slice (100 ms) of a limit through ahead
/// of time, so `N` bytes at `bps` take at least `N / bps` minus this.
const SLICE: Duration = Duration::from_millis(100);

/// Write `bytes` with O_DIRECT to `file` from a child process that moves
/// itself into `cgroup` (its `cgroup.procs`) first; how long it took.
fn direct_write_from(cgroup: &Path, file: &Path, bytes: i64) -> Duration {
    const BLOCK: i64 = 64 << 10;
    let started = Instant::now();
    let out = Command::new("sh")
        .arg("-c")
        .arg("echo $$ > \"$1\" && exec dd if=/dev/zero of=\"$2\" bs=64k count=\"$3\" oflag=direct status=none")
        .arg("sh")
        .arg(cgroup.join("cgroup.procs"))
        .arg(file)
        .arg((bytes / BLOCK).to_string())
        .output()
        .expect("dd");
    assert!(out.status.success(), "{out:?}");
    started.elapsed()
}

/// A direct write of `bytes` from `cgroup` is held to `bps`; the rate it
/// got is reported.
fn held_to(cgroup: &Path, file: &Path, bytes: i64, bps: i64, what: &str) {
    let took = direct_write_from(cgroup, file, bytes);
    let least = Duration::from_secs_f64(bytes as f64 / bps as f64).saturating_sub(SLICE);
    report(&format!(
        "{what}: {} MiB written with O_DIRECT in {:.2} s = {:.3} MiB/s against a limit of {:.3} MiB/s",
        bytes / MIB,
        took.as_secs_f64(),
        bytes as f64 / MIB as f64 / took.as_secs_f64(),
        bps as f64 / MIB as f64
    ));
    assert!(
        took >= least,
        "{what}: {bytes} bytes at {bps} B/s took {took:?}, less than {least:?}"
    );
}

fn parameters(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// Where the kubelet publishes a pod's CSI volume: the pod's UID is the
/// only link from a target path to the pod's cgroup.
fn pod_target(td: &TestDriver, uid: &str, pv: &str) -> PathBuf {
    let dir = td
        .root
        .join(format!("pods/{uid}/volumes/kubernetes.io~csi/{pv}"));
    fs::create_dir_all(&dir).unwrap();
    dir.join("mount")
}

/// A volume created with `limits`, staged; its `major:minor`.
async fn throttled_volume(
    td: &TestDriver,
    name: &str,
    limits: &[(&str, &str)],
) -> (String, pb::VolumeCapability, String) {
    let cap = mount_cap("ext4");
    let mut req = create_req(name, 32 * MIB, vec![cap.clone()]);
    req.mutable_parameters = parameters(limits);
    let id = td
        .controller()
        .create_volume(req)
        .await
        .expect("create")
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = td.stage(&id, cap.clone()).await;
    let dev = mounts_at(&staging).pop().expect("staged").dev;
    (id, cap, dev)
}

async fn modify_volume(td: &TestDriver, id: &str, pairs: &[(&str, &str)]) {
    td.controller()
        .controller_modify_volume(pb::ControllerModifyVolumeRequest {
            volume_id: id.to_owned(),
            mutable_parameters: parameters(pairs),
            ..Default::default()
        })
        .await
        .expect("modify");
}

async fn unpublish_and_delete(td: &TestDriver, id: &str, target: &Path) {
    td.node()
        .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.to_owned(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("unpublish");
    td.unstage(id).await;
    td.delete(id).await;
}

fn driver_for(hierarchy: &Path) -> DriverOpts {
    DriverOpts {
        extra_args: vec![
            "--blkio-cgroup-dir".to_owned(),
            hierarchy.display().to_string(),
        ],
        ..DriverOpts::default()
    }
}

/// A real blkio cgroup hierarchy for a test, with one pod's cgroup in it the
/// way the kubelet's cgroupfs driver lays it out; removed on drop.
struct BlkioCgroup {
    root: PathBuf,
    pod: PathBuf,
}

impl BlkioCgroup {
    fn new(uid: &str) -> Option<BlkioCgroup> {
        let blkio = Path::new("/sys/fs/cgroup/blkio");
        // The VM lane's guest binds the io controller to cgroup v2 (the test
        // below); the host lane runs this one.
        if vm_lane::inside() {
            return None;
        }
        if !blkio.join("blkio.throttle.write_bps_device").exists() {
            cannot_run("cgroup v1 blkio is not mounted at /sys/fs/cgroup/blkio");
            return None;
        }
        let root = blkio.join(format!("kennel-test-{}-{uid}", std::process::id()));
        let pod = root.join(format!("kubepods/burstable/pod{uid}"));
        fs::create_dir_all(&pod).expect("create a blkio cgroup");
        Some(BlkioCgroup { root, pod })
    }

    /// The rule for `dev` ("major:minor") in one throttle file of the pod's cgroup, if any.
    fn rule(&self, file: &str, dev: &str) -> Option<u64> {
        rule_in(&self.pod, file, dev)
    }

    /// A container's cgroup below the pod's, made as the kubelet makes one: after the pod's
    /// volumes are published.
    fn container(&self) -> PathBuf {
        let dir = self.pod.join(CONTAINER);
        fs::create_dir_all(&dir).expect("create a container cgroup");
        dir
    }
}

/// A container ID as the kubelet's cgroupfs driver names its cgroup.
const CONTAINER: &str = "5e0c7a1f9d3b2c4a6e8f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d";

fn rule_in(cgroup: &Path, file: &str, dev: &str) -> Option<u64> {
    let text = fs::read_to_string(cgroup.join(file)).expect("read throttle file");
    text.lines().find_map(|l| {
        let (d, v) = l.split_once(' ')?;
        (d == dev).then(|| v.parse().expect("a number"))
    })
}

impl Drop for BlkioCgroup {
    fn drop(&mut self) {
        for dir in [
            self.pod.join(CONTAINER),
            self.pod.clone(),
            self.root.join("kubepods/burstable"),
            self.root.join("kubepods"),
            self.root.clone(),
        ] {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// I/O limits reach the blkio cgroups of the pod a volume is published to:
/// set on NodePublish from the limits given at creation, given to a container
/// started after the publish (cgroup v1 throttles are not hierarchical),
/// changed by ControllerModifyVolume, cleared by 0; and a direct write from
/// the container's cgroup is held to the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_limits_reach_the_pods_blkio_cgroup() {
    if !can_use_loop_devices() {
        return;
    }
    let uid = "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
    let Some(cgroup) = BlkioCgroup::new(uid) else {
        return;
    };
    with_timeout(T, async {
        let td = TestDriver::start_with(driver_for(&cgroup.root)).await;
        let (id, cap, dev) =
            throttled_volume(&td, "pvc-throttled", &[("writeBytesPerSecond", "1Mi")]).await;
        let target = pod_target(&td, uid, "pv-throttled");
        let mut publish = td.publish_req(&id, cap.clone(), false);
        publish.target_path = target.display().to_string();
        td.node()
            .node_publish_volume(publish)
            .await
            .expect("publish into the pod");
        assert_eq!(
            cgroup.rule("blkio.throttle.write_bps_device", &dev),
            Some(1 << 20)
        );
        assert_eq!(cgroup.rule("blkio.throttle.read_iops_device", &dev), None);
        held_to(
            &cgroup.pod,
            &target.join("data"),
            3 * MIB,
            MIB,
            "blkio write_bps 1Mi",
        );
        // The container the kubelet starts after the publish gets its pod's rules.
        let container = cgroup.container();
        let deadline = Instant::now() + Duration::from_secs(10);
        while rule_in(&container, "blkio.throttle.write_bps_device", &dev).is_none()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            rule_in(&container, "blkio.throttle.write_bps_device", &dev),
            Some(1 << 20),
            "a container started after the publish has its pod's limit"
        );
        held_to(
            &container,
            &target.join("data"),
            3 * MIB,
            MIB,
            "blkio write_bps 1Mi, from a container's cgroup",
        );

        modify_volume(
            &td,
            &id,
            &[("writeBytesPerSecond", "0"), ("readIOPS", "100")],
        )
        .await;
        assert_eq!(cgroup.rule("blkio.throttle.write_bps_device", &dev), None);
        assert_eq!(
            cgroup.rule("blkio.throttle.read_iops_device", &dev),
            Some(100)
        );
        // The running container follows at once.
        assert_eq!(
            rule_in(&container, "blkio.throttle.write_bps_device", &dev),
            None
        );
        assert_eq!(
            rule_in(&container, "blkio.throttle.read_iops_device", &dev),
            Some(100)
        );
        unpublish_and_delete(&td, &id, &target).await;
    })
    .await
}

/// A cgroup v2 hierarchy mounted for a test, with one pod's cgroup below
/// `root` the way the kubelet's systemd driver lays it out
/// (`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice`).
/// The io controller is enabled down to `kubepods.slice`; the QoS slice
/// (`qos`) is left for the test to enable. Removed and unmounted on drop.
struct UnifiedCgroup {
    mount: tempfile::TempDir,
    root: PathBuf,
    qos: PathBuf,
    pod: PathBuf,
}

impl UnifiedCgroup {
    /// `None` where the io controller cannot be had on cgroup v2 (said by
    /// `not_here`).
    fn new(uid: &str) -> Option<UnifiedCgroup> {
        let mount = tempfile::Builder::new()
            .prefix("kennel-cgroup2-")
            .tempdir()
            .expect("temp dir");
        let out = Command::new("mount")
            .args(["-t", "cgroup2", "cgroup2"])
            .arg(mount.path())
            .output()
            .expect("run mount");
        if !out.status.success() {
            return not_here(&format!(
                "cannot mount cgroup2: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let controllers = fs::read_to_string(mount.path().join("cgroup.controllers"))
            .expect("read cgroup.controllers");
        if !controllers.split_whitespace().any(|c| c == "io") {
            let _ = Command::new("umount").arg(mount.path()).status();
            return not_here(&format!(
                "the io controller is not available to cgroup v2 here (its root offers \
                 `{}`): cgroup v1 blkio holds it",
                controllers.trim()
            ));
        }
        let root = mount
            .path()
            .join(format!("kennel-test-{}", std::process::id()));
        let kubepods = root.join("kubepods.slice");
        let qos = kubepods.join("kubepods-burstable.slice");
        let pod = qos.join(format!(
            "kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        ));
        let cgroup = UnifiedCgroup {
            root: root.clone(),
            qos,
            pod,
            mount,
        };
        fs::create_dir_all(&cgroup.pod).expect("create the pod's cgroup");
        for dir in [cgroup.mount.path(), &root, &kubepods] {
            enable_io(dir);
        }
        Some(cgroup)
    }

    /// The `io.max` keys for `dev` ("major:minor"), if it has a line.
    fn io_max(&self, dev: &str) -> Option<String> {
        let text = fs::read_to_string(self.pod.join("io.max")).expect("read io.max");
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{dev} ")).map(str::to_owned))
    }
}

/// The io controller for `dir`'s children.
fn enable_io(dir: &Path) {
    fs::write(dir.join("cgroup.subtree_control"), "+io")
        .unwrap_or_else(|e| panic!("enable io in {}: {e}", dir.display()));
}

/// This host cannot give the test cgroup v2 with the io controller. The VM
/// lane's guest must (there it is a failure); a host that can run the lane
/// runs it in the same `cargo test`, so the test says so and leaves it to
/// the lane; a host that cannot, cannot run it anywhere.
fn not_here(why: &str) -> Option<UnifiedCgroup> {
    if vm_lane::inside() {
        panic!("the VM lane's guest must run this test: {why}");
    }
    leave_to_vm_lane(why);
    None
}

impl Drop for UnifiedCgroup {
    fn drop(&mut self) {
        let kubepods = self.root.join("kubepods.slice");
        for dir in [&self.pod, &self.qos, &kubepods, &self.root] {
            // A process that just exited may leave its cgroup busy a moment.
            for _ in 0..50 {
                if fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = Command::new("umount").arg(self.mount.path()).status();
    }
}

/// cgroup v2: limits given at creation reach the pod's `io.max` on
/// NodePublish, refused with what to enable while the io controller is off
/// for the pod; ControllerModifyVolume changes them and clears them; a
/// direct write from the pod's cgroup is held to each limit and runs free
/// once they are cleared. Driven through `--blkio-cgroup-dir`, the systemd
/// pod layout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_limits_reach_the_pods_io_max() {
    if !can_use_loop_devices() {
        return;
    }
    let uid = "7a2b3c4d-5e6f-4a7b-9c8d-0e1f2a3b4c5d";
    let Some(cgroup) = UnifiedCgroup::new(uid) else {
        return;
    };
    with_timeout(T, async {
        let td = TestDriver::start_with(driver_for(&cgroup.root)).await;
        let (id, cap, dev) = throttled_volume(
            &td,
            "pvc-io-max",
            &[("writeBytesPerSecond", "1Mi"), ("readIOPS", "200")],
        )
        .await;
        let target = pod_target(&td, uid, "pv-io-max");
        let mut publish = td.publish_req(&id, cap.clone(), false);
        publish.target_path = target.display().to_string();

        let refused = td
            .node()
            .node_publish_volume(publish.clone())
            .await
            .expect_err("limits the pod's cgroup cannot take");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        let message = refused.message();
        assert!(
            message.contains(&cgroup.pod.display().to_string()) && message.contains("+io"),
            "{message}"
        );
        enable_io(&cgroup.qos);
        td.node()
            .node_publish_volume(publish)
            .await
            .expect("publish into the pod, retried");
        assert_eq!(
            cgroup.io_max(&dev).as_deref(),
            Some("rbps=max wbps=1048576 riops=200 wiops=max")
        );
        let data = target.join("data");
        held_to(&cgroup.pod, &data, 4 * MIB, MIB, "io.max wbps 1Mi");

        modify_volume(
            &td,
            &id,
            &[
                ("writeBytesPerSecond", "2Mi"),
                ("readIOPS", "0"),
                ("writeIOPS", "500"),
            ],
        )
        .await;
        assert_eq!(
            cgroup.io_max(&dev).as_deref(),
            Some("rbps=max wbps=2097152 riops=max wiops=500")
        );
        held_to(&cgroup.pod, &data, 4 * MIB, 2 * MIB, "io.max wbps 2Mi");

        modify_volume(
            &td,
            &id,
            &[("writeBytesPerSecond", "0"), ("writeIOPS", "unlimited")],
        )
        .await;
        assert_eq!(cgroup.io_max(&dev), None, "every limit cleared");
        // Held to the last limit (2 MiB/s), 8 MiB would take 4 s.
        let free = direct_write_from(&cgroup.pod, &data, 8 * MIB);
        report(&format!(
            "io.max cleared: 8 MiB written with O_DIRECT in {:.2} s = {:.3} MiB/s",
            free.as_secs_f64(),
            8.0 / free.as_secs_f64()
        ));
        assert!(
            free < Duration::from_secs(3),
            "8 MiB took {free:?} with no limit: is the last one still held?"
        );
        unpublish_and_delete(&td, &id, &target).await;
    })
    .await
}
