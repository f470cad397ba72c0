//! What a volume lifecycle reads from the host must not grow with the host:
//! the driver runs in this process, so its own counters of sysfs and
//! mountinfo reads are visible, on a clean node and on one crowded with loop
//! devices and mounts that are none of Kennel's.

#[path = "common/vg.rs"]
mod vg;

use vg::skip;

use std::path::Path;
use std::time::Duration;

use kennel::backend::loop_files::Provisioning;
use kennel::backend::lvm::params::DeviceClass;
use kennel::bench::crowd::Crowd;
use kennel::csi::client::CsiClient;
use kennel::csi::pb::{self, volume_capability as vc};
use kennel::driver::{BackendKind, DriverArgs, LocalDriver};
use kennel::node::shared_mount::SharedMount;
use kennel::node::{cleanup, loopdev, mount};

const MIB: i64 = 1 << 20;
const LIFECYCLES: usize = 3;
/// Enough that a scan of every device or mount would show.
const CROWD: usize = 24;

fn capability(block: bool) -> pb::VolumeCapability {
    let access_type = if block {
        vc::AccessType::Block(vc::BlockVolume {})
    } else {
        vc::AccessType::Mount(vc::MountVolume {
            fs_type: "ext4".to_owned(),
            ..Default::default()
        })
    };
    pb::VolumeCapability {
        access_type: Some(access_type),
        access_mode: Some(vc::AccessMode {
            mode: vc::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

/// Create, stage, publish (read-write and read-only), unpublish, unstage, delete.
async fn lifecycle(client: &CsiClient, kubelet: &Path, name: &str, block: bool) {
    let (mut controller, mut node) = (client.controller.clone(), client.node.clone());
    let cap = capability(block);
    let volume = controller
        .create_volume(pb::CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: 16 * MIB,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap.clone()],
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    let id = volume.volume_id;
    let staging = kubelet.join("staging").join(name);
    std::fs::create_dir_all(&staging).expect("staging dir");
    let staging = staging.display().to_string();
    node.node_stage_volume(pb::NodeStageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging.clone(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    })
    .await
    .expect("stage");
    for readonly in [false, true] {
        let target = kubelet
            .join("pods")
            .join(format!("{name}-{readonly}"))
            .join("volume")
            .display()
            .to_string();
        node.node_publish_volume(pb::NodePublishVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.clone(),
            target_path: target.clone(),
            volume_capability: Some(cap.clone()),
            readonly,
            ..Default::default()
        })
        .await
        .expect("publish");
        node.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.clone(),
            ..Default::default()
        })
        .await
        .expect("stats");
        node.node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target,
        })
        .await
        .expect("unpublish");
    }
    node.node_unstage_volume(pb::NodeUnstageVolumeRequest {
        volume_id: id.clone(),
        staging_target_path: staging,
    })
    .await
    .expect("unstage");
    controller
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .expect("delete");
}

/// sysfs and mountinfo reads of `LIFECYCLES` lifecycles of each kind.
async fn reads(client: &CsiClient, kubelet: &Path, round: &str) -> (u64, u64) {
    let (sysfs, mountinfo) = (loopdev::sysfs_reads(), mount::mountinfo_reads());
    for i in 0..LIFECYCLES {
        for block in [true, false] {
            lifecycle(client, kubelet, &format!("{round}-{i}-{block}"), block).await;
        }
    }
    (
        loopdev::sysfs_reads() - sysfs,
        mount::mountinfo_reads() - mountinfo,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_per_lifecycle_do_not_depend_on_the_hosts_devices_and_mounts() {
    if (!nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists())
        && skip::cannot_run("needs root and loop devices")
    {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("kennel-cost-")
        .tempdir()
        .expect("temp dir");
    let dir = std::fs::canonicalize(tmp.path()).expect("resolve");
    let args = DriverArgs::in_dir(&dir, "cost-node", 256 << 20, Provisioning::Sparse);
    assert_reads_do_not_grow(args, &dir).await;
}

/// The LVM backend without device-mapper exposes LVs through loop devices
/// over the PV: finding them must not scan the node's devices either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lvm_reads_per_lifecycle_do_not_depend_on_the_hosts_devices_and_mounts() {
    if !vg::can_run() {
        return;
    }
    let test_vg = vg::TestVg::new("512M");
    let tmp = tempfile::Builder::new()
        .prefix("kennel-cost-lvm-")
        .tempdir()
        .expect("temp dir");
    let dir = std::fs::canonicalize(tmp.path()).expect("resolve");
    let mut args = DriverArgs::in_dir(&dir, "cost-node", 256 << 20, Provisioning::Sparse);
    args.backend = BackendKind::Lvm;
    args.volume_groups = vec![DeviceClass {
        name: test_vg.name.clone(),
        vg: test_vg.name.clone(),
    }];
    assert_reads_do_not_grow(args, &dir).await;
}

/// The read counters are process-wide: one measurement at a time.
static MEASURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Lifecycles on a clean node, then on one crowded with loop devices and
/// mounts: the driver's sysfs and mountinfo reads must be the same.
async fn assert_reads_do_not_grow(args: DriverArgs, dir: &Path) {
    let _alone = MEASURING.lock().await;
    let kubelet = SharedMount::new(&args.kubelet_dir).expect("shared kubelet dir");
    let kubelet_dir = kubelet.path().to_owned();
    // In a task of its own: a failed call must still reach the cleanup below.
    let body = tokio::spawn(async move {
        let server = LocalDriver::start(&args).await.expect("start driver");
        let client = CsiClient::connect(&args.endpoint).await.expect("connect");
        // Warm up: first-use costs are not per lifecycle.
        reads(&client, &kubelet_dir, "warm").await;
        let clean = reads(&client, &kubelet_dir, "clean").await;
        let crowd = Crowd::create(CROWD).expect("crowd the node");
        let crowded = reads(&client, &kubelet_dir, "crowded").await;
        drop(crowd);
        server.stop().await.expect("stop driver");
        (clean, crowded)
    });
    let outcome = tokio::time::timeout(Duration::from_secs(120), body).await;
    let cleaned = cleanup::release_all_under(dir);
    drop(kubelet);
    let (clean, crowded) = match outcome {
        Ok(Ok(reads)) => reads,
        Ok(Err(failed)) => std::panic::resume_unwind(failed.into_panic()),
        Err(_) => panic!("lifecycles did not finish within 120 s"),
    };
    cleaned.expect("clean up");
    assert_eq!(
        crowded, clean,
        "(sysfs, mountinfo) reads of {LIFECYCLES} Block and Filesystem lifecycles: \
         {CROWD} more loop devices and mounts changed them"
    );
    // Each lifecycle checks its devices one by one, never the whole host.
    assert!(clean.0 > 0, "the attachment index is verified on use");
    // Mount checks go through statx on the path: only the health check of a
    // read-only view of a writable filesystem reads the mount table (once).
    assert!(
        clean.1 <= LIFECYCLES as u64,
        "{} mountinfo reads for {LIFECYCLES} lifecycles of each kind",
        clean.1
    );
}
