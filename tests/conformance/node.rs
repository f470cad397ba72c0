//! Node service against the real driver: real loop devices, real mkfs, real
//! mounts. Host state is checked through /proc/self/mountinfo and
//! /sys/block/loop*/loop, not through the driver.

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;

use crate::common::*;
use kennel::csi::pb::{
    self, node_service_capability, volume_capability::access_mode::Mode, volume_usage::Unit,
};
use tonic::Code;

const T: u64 = 180;

fn expand_req(
    td: &TestDriver,
    id: &str,
    volume_path: &Path,
    bytes: i64,
    cap: pb::VolumeCapability,
) -> pb::NodeExpandVolumeRequest {
    pb::NodeExpandVolumeRequest {
        volume_id: id.to_owned(),
        volume_path: volume_path.display().to_string(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        staging_target_path: td.staging_path(id).display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

async fn controller_expand(
    td: &TestDriver,
    id: &str,
    bytes: i64,
) -> pb::ControllerExpandVolumeResponse {
    td.controller()
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.to_owned(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("ControllerExpandVolume {id}: {s:?}"))
        .into_inner()
}

fn stats_req(id: &str, path: &Path) -> pb::NodeGetVolumeStatsRequest {
    pb::NodeGetVolumeStatsRequest {
        volume_id: id.to_owned(),
        volume_path: path.display().to_string(),
        staging_target_path: String::new(),
    }
}

/// The one visible mount at `path`, which must exist.
fn the_mount(path: &Path) -> Mount {
    let mut at = mounts_at(path);
    assert_eq!(
        at.len(),
        1,
        "expected exactly one mount at {}: {at:#?}",
        path.display()
    );
    at.pop().unwrap()
}

fn assert_erofs(result: std::io::Result<()>, what: &str) {
    match result {
        Ok(()) => panic!("{what}: write succeeded on a read-only publish"),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(libc::EROFS),
            "{what}: expected EROFS, got {e}"
        ),
    }
}

fn try_write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

// ------------------------------------------------------ capabilities/info

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_capabilities() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        let resp = td
            .node()
            .node_get_capabilities(pb::NodeGetCapabilitiesRequest {})
            .await
            .expect("NodeGetCapabilities")
            .into_inner();
        let rpcs: BTreeSet<i32> = resp
            .capabilities
            .iter()
            .filter_map(|c| match &c.r#type {
                Some(node_service_capability::Type::Rpc(r)) => Some(r.r#type),
                _ => None,
            })
            .collect();
        use node_service_capability::rpc::Type as R;
        for wanted in [
            R::StageUnstageVolume,
            R::GetVolumeStats,
            R::ExpandVolume,
            R::VolumeCondition,
            R::VolumeMountGroup,
        ] {
            assert!(
                rpcs.contains(&(wanted as i32)),
                "{wanted:?} missing: {resp:?}"
            );
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_info_reports_id_topology_and_limit() {
    with_timeout(T, async {
        let opts = DriverOpts {
            node_id: "worker-7".into(),
            max_volumes_per_node: Some(7),
            ..DriverOpts::sparse("64MiB")
        };
        let td = TestDriver::start_with(opts).await;
        let info = td
            .node()
            .node_get_info(pb::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        assert_eq!(info.node_id, "worker-7");
        assert_eq!(info.max_volumes_per_node, 7);
        assert_eq!(
            info.accessible_topology,
            Some(pb::Topology {
                segments: segment("worker-7")
            })
        );
        drop(td);

        // No limit given: 0 (unlimited).
        let td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        let info = td
            .node()
            .node_get_info(pb::NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner();
        assert_eq!(info.node_id, td.opts.node_id);
        assert_eq!(info.max_volumes_per_node, 0);
    })
    .await
}

// ------------------------------------------------------------ lifecycles

async fn filesystem_lifecycle(opts: DriverOpts, fs_type: &str, bytes: i64, expect_fs: &str) {
    let td = TestDriver::start_with(opts).await;
    let vol = td.create("pvc-fs", bytes, mount_cap(fs_type)).await;
    let id = vol.volume_id.as_str();
    let capability = pb::VolumeCapability {
        access_type: Some(pb::volume_capability::AccessType::Mount(
            pb::volume_capability::MountVolume {
                fs_type: fs_type.to_owned(),
                mount_flags: vec!["noatime".to_owned()],
                volume_mount_group: String::new(),
            },
        )),
        ..mount_cap(fs_type)
    };

    // Stage twice: one mount.
    let staging = td.stage(id, capability.clone()).await;
    td.stage(id, capability.clone()).await;
    let staged = the_mount(&staging);
    assert_eq!(staged.fs_type, expect_fs);
    assert!(!staged.read_only());
    assert!(
        staged.options.split(',').any(|o| o == "noatime"),
        "mount_flags not applied: {staged:?}"
    );
    assert_eq!(
        td.attachments(id).len(),
        1,
        "one loop device for the volume"
    );

    // Publish twice: one bind mount of the same filesystem.
    let target = td.publish(id, capability.clone(), false).await;
    td.publish(id, capability.clone(), false).await;
    let published = the_mount(&target);
    assert_eq!(published.dev, staged.dev);
    assert!(!published.read_only());

    write_file(&target.join("hello.txt"), b"hello from webserver-2");
    assert_eq!(
        read_file(&staging.join("hello.txt")),
        b"hello from webserver-2"
    );

    // Unpublish twice.
    td.unpublish(id, false).await;
    td.unpublish(id, false).await;
    assert!(mounts_at(&target).is_empty());
    // Unstage twice.
    td.unstage(id).await;
    td.unstage(id).await;
    assert!(mounts_at(&staging).is_empty());
    assert!(
        td.attachments(id).is_empty(),
        "loop device left after unstage"
    );
    td.delete(id).await;
    td.delete(id).await;
    td.assert_no_leaks();
    assert!(!td.stored(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_ext4_lifecycle_is_idempotent() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(
        T,
        filesystem_lifecycle(DriverOpts::preallocated("256MiB"), "ext4", 32 * MIB, "ext4"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_default_fs_is_ext4() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(
        T,
        filesystem_lifecycle(DriverOpts::sparse("256MiB"), "", 16 * MIB, "ext4"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_xfs_lifecycle_is_idempotent() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(
        T,
        filesystem_lifecycle(DriverOpts::sparse("1GiB"), "xfs", 300 * MIB, "xfs"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_lifecycle_reads_back_written_bytes() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::preallocated("256MiB")).await;
        let vol = td.create("pvc-block", 64 * MIB, block_cap()).await;
        let id = vol.volume_id.as_str();

        let staging = td.stage(id, block_cap()).await;
        td.stage(id, block_cap()).await;
        let staged_file = staging.join("device");
        let staged = the_mount(&staged_file);
        assert_eq!(td.attachments(id).len(), 1);
        // The bind shows the loop device node as its root.
        let device = &td.attachments(id)[0];
        assert_eq!(
            Path::new(&staged.root).file_name(),
            device.file_name(),
            "staging bind is not of the volume's loop device: {staged:?}"
        );
        assert!(
            mounts_at(&staging).is_empty(),
            "Block staging must not mount a filesystem"
        );

        let target = td.publish(id, block_cap(), false).await;
        td.publish(id, block_cap(), false).await;
        assert_eq!(mounts_at(&target).len(), 1);
        assert!(!target.is_dir(), "Block target must not be a directory");
        assert_eq!(block_size(&target), 64 * MIB as u64);

        let data = pattern(7, 8192);
        write_block(&target, MIB as u64, &data);
        assert_eq!(read_block(&target, MIB as u64, data.len()), data);
        let tail = pattern(9, 4096);
        write_block(&target, 64 * MIB as u64 - 4096, &tail);

        // Down and up again: the bytes are still there.
        td.unpublish(id, true).await;
        td.unpublish(id, true).await;
        assert!(mounts_at(&target).is_empty());
        td.unstage(id).await;
        td.unstage(id).await;
        assert!(
            td.attachments(id).is_empty(),
            "loop device left after unstage"
        );
        assert!(leaked_mounts(&td.root).is_empty());

        td.stage(id, block_cap()).await;
        let target = td.publish(id, block_cap(), false).await;
        assert_eq!(read_block(&target, MIB as u64, data.len()), data);
        assert_eq!(
            read_block(&target, 64 * MIB as u64 - 4096, tail.len()),
            tail
        );

        td.unpublish(id, true).await;
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filesystem_data_survives_unpublish_unstage_stage_publish() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::preallocated("256MiB")).await;
        let vol = td
            .create("www-webserver-2", 32 * MIB, mount_cap("ext4"))
            .await;
        let id = vol.volume_id.as_str();
        td.stage(id, mount_cap("ext4")).await;
        let target = td.publish(id, mount_cap("ext4"), false).await;
        let big = pattern(3, 3 * MIB as usize);
        fs::create_dir(target.join("html")).unwrap();
        write_file(&target.join("html/hello.txt"), b"hello");
        write_file(&target.join("big.bin"), &big);
        td.unpublish(id, false).await;
        td.unstage(id).await;
        assert!(td.attachments(id).is_empty());

        td.stage(id, mount_cap("ext4")).await;
        let target = td.publish(id, mount_cap("ext4"), false).await;
        assert_eq!(read_file(&target.join("html/hello.txt")), b"hello");
        assert_eq!(read_file(&target.join("big.bin")), big);
        td.unpublish(id, false).await;
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

// ------------------------------------------------------ never reformat

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_never_reformats_existing_data() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-keep", 32 * MIB, mount_cap("ext4")).await;
        let id = vol.volume_id.as_str();
        let staging = td.stage(id, mount_cap("ext4")).await;
        write_file(&staging.join("precious"), b"data");
        td.unstage(id).await;

        // Same filesystem again: same data.
        td.stage(id, mount_cap("ext4")).await;
        assert_eq!(read_file(&staging.join("precious")), b"data");
        td.unstage(id).await;

        // Another filesystem requested: refused, not reformatted.
        let other = td
            .node()
            .node_stage_volume(td.stage_req(id, mount_cap("xfs")))
            .await;
        assert!(
            other.is_err(),
            "staging ext4 data as xfs must fail, got {other:?}"
        );
        assert!(mounts_at(&staging).is_empty(), "failed stage left a mount");
        assert!(
            td.attachments(id).is_empty(),
            "failed stage left a loop device"
        );

        // No fs_type: the existing filesystem is used.
        td.stage(id, mount_cap("")).await;
        assert_eq!(the_mount(&staging).fs_type, "ext4");
        assert_eq!(read_file(&staging.join("precious")), b"data");
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

// -------------------------------------------------------------- read-only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_publish_is_really_read_only() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-ro", 16 * MIB, mount_cap("ext4")).await;
        let id = vol.volume_id.as_str();
        let staging = td.stage(id, mount_cap("ext4")).await;
        write_file(&staging.join("existing"), b"before");

        let target = td.publish(id, mount_cap("ext4"), true).await;
        td.publish(id, mount_cap("ext4"), true).await;
        assert!(the_mount(&target).read_only());
        assert_eq!(read_file(&target.join("existing")), b"before");
        assert_erofs(
            try_write(&target.join("new"), b"x"),
            "create in read-only publish",
        );
        assert_erofs(
            try_write(&target.join("existing"), b"x"),
            "overwrite in read-only publish",
        );
        assert_erofs(
            fs::create_dir(target.join("dir")),
            "mkdir in read-only publish",
        );
        // The same target asked read-write now: incompatible.
        assert_code(
            td.node()
                .node_publish_volume(td.publish_req(id, mount_cap("ext4"), false))
                .await,
            Code::AlreadyExists,
            "republish read-write over a read-only publish",
        );
        td.unpublish(id, false).await;
        td.unstage(id).await;

        // SINGLE_NODE_READER_ONLY: read-only at every level.
        let reader = cap(mount_type("ext4"), Mode::SingleNodeReaderOnly);
        td.stage(id, reader.clone()).await;
        assert!(the_mount(&staging).read_only());
        let target = td.publish(id, reader.clone(), false).await;
        assert!(the_mount(&target).read_only());
        assert_eq!(read_file(&target.join("existing")), b"before");
        assert_erofs(
            try_write(&target.join("new"), b"x"),
            "SINGLE_NODE_READER_ONLY publish",
        );
        td.unpublish(id, false).await;
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readonly_block_publish_rejects_writes() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-ro-block", 16 * MIB, block_cap()).await;
        let id = vol.volume_id.as_str();
        td.stage(id, block_cap()).await;
        let rw = td.publish(id, block_cap(), false).await;
        let data = pattern(1, 4096);
        write_block(&rw, 0, &data);
        td.unpublish(id, true).await;

        let target = td.publish(id, block_cap(), true).await;
        assert!(the_mount(&target).read_only());
        assert_eq!(read_block(&target, 0, 4096), data);
        let write = fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .and_then(|mut f| {
                use std::io::Write;
                f.write_all(&pattern(2, 4096))?;
                f.sync_all()
            });
        assert!(
            write.is_err(),
            "opening and writing a read-only Block publish succeeded"
        );
        assert_eq!(
            read_block(&target, 0, 4096),
            data,
            "read-only Block publish was modified"
        );
        td.unpublish(id, true).await;
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

// ------------------------------------------------------ argument checks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_calls_missing_arguments_are_invalid() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-args", 16 * MIB, mount_cap("")).await;
        let id = vol.volume_id.as_str();
        let mut node = td.node();

        let mut r = td.stage_req(id, mount_cap(""));
        r.volume_id.clear();
        assert_code(
            node.node_stage_volume(r).await,
            Code::InvalidArgument,
            "stage: no volume id",
        );
        let mut r = td.stage_req(id, mount_cap(""));
        r.staging_target_path.clear();
        assert_code(
            node.node_stage_volume(r).await,
            Code::InvalidArgument,
            "stage: no staging path",
        );
        let mut r = td.stage_req(id, mount_cap(""));
        r.volume_capability = None;
        assert_code(
            node.node_stage_volume(r).await,
            Code::InvalidArgument,
            "stage: no capability",
        );

        let mut r = td.unstage_req(id);
        r.volume_id.clear();
        assert_code(
            node.node_unstage_volume(r).await,
            Code::InvalidArgument,
            "unstage: no volume id",
        );
        let mut r = td.unstage_req(id);
        r.staging_target_path.clear();
        assert_code(
            node.node_unstage_volume(r).await,
            Code::InvalidArgument,
            "unstage: no staging path",
        );

        let mut r = td.publish_req(id, mount_cap(""), false);
        r.volume_id.clear();
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish: no volume id",
        );
        let mut r = td.publish_req(id, mount_cap(""), false);
        r.target_path.clear();
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish: no target path",
        );
        let mut r = td.publish_req(id, mount_cap(""), false);
        r.staging_target_path.clear();
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish: no staging path",
        );
        let mut r = td.publish_req(id, mount_cap(""), false);
        r.volume_capability = None;
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish: no capability",
        );

        let mut r = td.unpublish_req(id, false);
        r.volume_id.clear();
        assert_code(
            node.node_unpublish_volume(r).await,
            Code::InvalidArgument,
            "unpublish: no volume id",
        );
        let mut r = td.unpublish_req(id, false);
        r.target_path.clear();
        assert_code(
            node.node_unpublish_volume(r).await,
            Code::InvalidArgument,
            "unpublish: no target path",
        );

        assert_code(
            node.node_get_volume_stats(stats_req("", &td.root)).await,
            Code::InvalidArgument,
            "stats: no volume id",
        );
        assert_code(
            node.node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.to_owned(),
                ..Default::default()
            })
            .await,
            Code::InvalidArgument,
            "stats: no volume path",
        );
        let mut r = expand_req(&td, id, &td.target_path(id, false), 32 * MIB, mount_cap(""));
        r.volume_id.clear();
        assert_code(
            node.node_expand_volume(r).await,
            Code::InvalidArgument,
            "expand: no volume id",
        );
        let mut r = expand_req(&td, id, &td.target_path(id, false), 32 * MIB, mount_cap(""));
        r.volume_path.clear();
        assert_code(
            node.node_expand_volume(r).await,
            Code::InvalidArgument,
            "expand: no volume path",
        );

        // A MULTI_NODE capability is refused on the node too.
        let multi = cap(mount_type(""), Mode::MultiNodeMultiWriter);
        assert_code(
            node.node_stage_volume(td.stage_req(id, multi.clone()))
                .await,
            Code::InvalidArgument,
            "stage: MULTI_NODE capability",
        );
        assert_code(
            node.node_publish_volume(td.publish_req(id, multi, false))
                .await,
            Code::InvalidArgument,
            "publish: MULTI_NODE capability",
        );
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_calls_on_unknown_volume_are_not_found() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        let mut node = td.node();
        for id in [UNKNOWN_ID, "../../etc", "kv-AAAAAAAAAAAAAAAAAAAAAAAA"] {
            let mut r = td.stage_req(UNKNOWN_ID, mount_cap(""));
            r.volume_id = id.to_owned();
            assert_code(
                node.node_stage_volume(r).await,
                Code::NotFound,
                &format!("stage {id}"),
            );
            let mut r = td.stage_req(UNKNOWN_ID, block_cap());
            r.volume_id = id.to_owned();
            assert_code(
                node.node_stage_volume(r).await,
                Code::NotFound,
                &format!("stage block {id}"),
            );
            let mut r = td.publish_req(UNKNOWN_ID, mount_cap(""), false);
            r.volume_id = id.to_owned();
            assert_code(
                node.node_publish_volume(r).await,
                Code::NotFound,
                &format!("publish {id}"),
            );
            let mut r = td.unstage_req(UNKNOWN_ID);
            r.volume_id = id.to_owned();
            assert_code(
                node.node_unstage_volume(r).await,
                Code::NotFound,
                &format!("unstage {id}"),
            );
            let mut r = td.unpublish_req(UNKNOWN_ID, false);
            r.volume_id = id.to_owned();
            assert_code(
                node.node_unpublish_volume(r).await,
                Code::NotFound,
                &format!("unpublish {id}"),
            );
            assert_code(
                node.node_get_volume_stats(stats_req(id, &td.root)).await,
                Code::NotFound,
                &format!("stats {id}"),
            );
            assert_code(
                node.node_expand_volume(expand_req(&td, id, &td.root, 32 * MIB, mount_cap("")))
                    .await,
                Code::NotFound,
                &format!("expand {id}"),
            );
        }
        td.assert_no_leaks();
        assert!(!td.staging_path(UNKNOWN_ID).join("device").exists());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_before_stage_is_failed_precondition() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let fs_vol = td.create("pvc-fs", 16 * MIB, mount_cap("")).await;
        let block_vol = td.create("pvc-block", 16 * MIB, block_cap()).await;
        assert_code(
            td.node()
                .node_publish_volume(td.publish_req(&fs_vol.volume_id, mount_cap(""), false))
                .await,
            Code::FailedPrecondition,
            "publish Filesystem before stage",
        );
        assert_code(
            td.node()
                .node_publish_volume(td.publish_req(&block_vol.volume_id, block_cap(), false))
                .await,
            Code::FailedPrecondition,
            "publish Block before stage",
        );
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_from_wrong_staging_path_is_failed_precondition() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let a = td.create("pvc-a", 16 * MIB, mount_cap("")).await;
        let b = td.create("pvc-b", 16 * MIB, mount_cap("")).await;
        td.stage(&a.volume_id, mount_cap("")).await;
        // b is not staged; pointing it at a's staging path must not publish a's data.
        let mut r = td.publish_req(&b.volume_id, mount_cap(""), false);
        r.staging_target_path = td.staging_path(&a.volume_id).display().to_string();
        assert_code(
            td.node().node_publish_volume(r).await,
            Code::FailedPrecondition,
            "publish b from a's staging path",
        );
        td.unstage(&a.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_traversal_is_invalid_argument() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-trav", 16 * MIB, mount_cap("")).await;
        let id = vol.volume_id.as_str();
        let mut node = td.node();
        let escape = td.root.join("escape");

        // An unknown volume cannot be mounted anywhere, so this literal is harmless.
        let mut r = td.stage_req(UNKNOWN_ID, mount_cap(""));
        r.staging_target_path = "/tmp/../etc".into();
        assert_code(
            node.node_stage_volume(r).await,
            Code::InvalidArgument,
            "stage at /tmp/../etc",
        );
        // A real volume, with a traversal that would land inside the test directory.
        for path in [
            format!("{}/staging/../escape", td.root.display()),
            "staging/relative".to_owned(),
        ] {
            let mut r = td.stage_req(id, mount_cap(""));
            r.staging_target_path = path.clone();
            assert_code(
                node.node_stage_volume(r).await,
                Code::InvalidArgument,
                &format!("stage at {path}"),
            );
        }
        assert!(leaked_mounts(&td.root).is_empty());
        assert!(!escape.exists());

        // Unstaged volume, literal traversal as target: refused before anything.
        let mut r = td.publish_req(id, mount_cap(""), false);
        r.target_path = "/tmp/../etc".into();
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish to /tmp/../etc",
        );

        td.stage(id, mount_cap("")).await;
        let mut r = td.publish_req(id, mount_cap(""), false);
        r.target_path = format!("{}/pods/../escape", td.root.display());
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish to <root>/pods/../escape",
        );
        let mut r = td.publish_req(id, mount_cap(""), false);
        r.staging_target_path = format!("{}/staging/../staging/{id}", td.root.display());
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish from a traversing staging path",
        );
        assert!(!escape.exists());
        let mut r = td.unstage_req(id);
        r.staging_target_path = format!("{}/pods/../staging/{id}", td.root.display());
        assert_code(
            node.node_unstage_volume(r).await,
            Code::InvalidArgument,
            "unstage traversing path",
        );
        let mut r = td.unpublish_req(id, false);
        r.target_path = format!("{}/pods/../staging/{id}", td.root.display());
        assert_code(
            node.node_unpublish_volume(r).await,
            Code::InvalidArgument,
            "unpublish traversing path",
        );
        // A path that cannot hold the volume is NOT_FOUND for stats (as csi-sanity expects).
        assert_code(
            node.node_get_volume_stats(stats_req(id, Path::new("/tmp/../etc")))
                .await,
            Code::NotFound,
            "stats at /tmp/../etc",
        );
        // Still staged: the refused unstage did nothing.
        assert_eq!(mounts_at(&td.staging_path(id)).len(), 1);
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_staged_volume_is_refused_until_unstaged() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-busy", 16 * MIB, mount_cap("")).await;
        let id = vol.volume_id.as_str();
        let staging = td.stage(id, mount_cap("")).await;
        write_file(&staging.join("f"), b"still here");
        assert_code(
            td.controller()
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id.to_owned(),
                    ..Default::default()
                })
                .await,
            Code::FailedPrecondition,
            "delete a staged volume",
        );
        assert_eq!(read_file(&staging.join("f")), b"still here");
        assert!(td.stored(id));
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

// -------------------------------------------------------------- expansion

/// Online ext4 growth needs CAP_SYS_RESOURCE, which some containers drop
/// even for root. The driver shares this process's capabilities.
fn has_cap_sys_resource() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

async fn node_expand(td: &TestDriver, id: &str, path: &Path, to: i64, cap: pb::VolumeCapability) {
    let grown = td
        .node()
        .node_expand_volume(expand_req(td, id, path, to, cap))
        .await
        .unwrap_or_else(|s| panic!("NodeExpandVolume: {s:?}\n{}", td.log_tail(20)))
        .into_inner();
    assert!(grown.capacity_bytes >= to, "{grown:?}");
}

async fn filesystem_expansion(opts: DriverOpts, fs_type: &str, from: i64, to: i64) {
    let td = TestDriver::start_with(opts).await;
    let vol = td.create("pvc-grow", from, mount_cap(fs_type)).await;
    let id = vol.volume_id.as_str();
    td.stage(id, mount_cap(fs_type)).await;
    let mut target = td.publish(id, mount_cap(fs_type), false).await;
    write_file(&target.join("keep"), b"kept");
    let before = fs_total_bytes(&target);
    assert!(before <= from as u64);

    let resp = controller_expand(&td, id, to).await;
    assert!(resp.capacity_bytes >= to);
    assert!(resp.node_expansion_required);
    let online = td
        .node()
        .node_expand_volume(expand_req(&td, id, &target, to, mount_cap(fs_type)))
        .await;
    match online {
        Ok(resp) => {
            assert!(resp.into_inner().capacity_bytes >= to);
            // Again: the second call finds nothing left to do.
            node_expand(&td, id, &target, to, mount_cap(fs_type)).await;
        }
        // Without CAP_SYS_RESOURCE (some containers drop it even for root)
        // the kernel cannot grow a mounted ext4; the driver says so and
        // grows it on the next stage instead.
        Err(status)
            if fs_type == "ext4"
                && !has_cap_sys_resource()
                && status.code() == Code::FailedPrecondition =>
        {
            eprintln!("note: no CAP_SYS_RESOURCE, checking ext4 growth on the next stage");
            td.unpublish(id, false).await;
            td.unstage(id).await;
            td.stage(id, mount_cap(fs_type)).await;
            target = td.publish(id, mount_cap(fs_type), false).await;
        }
        Err(status) => panic!(
            "NodeExpandVolume {fs_type}: {status:?}\n{}",
            td.log_tail(20)
        ),
    }
    let after = fs_total_bytes(&target);
    let growth = (to - from) as u64;
    assert!(
        after >= before + growth * 3 / 4,
        "{fs_type} grew from {before} to {after} bytes; expected about {growth} more"
    );
    assert_eq!(fs_total_bytes(&td.staging_path(id)), after);
    assert_eq!(read_file(&target.join("keep")), b"kept");
    // Stats see the new size too.
    let stats = td
        .node()
        .node_get_volume_stats(stats_req(id, &target))
        .await
        .expect("stats")
        .into_inner();
    let bytes = stats
        .usage
        .iter()
        .find(|u| u.unit == Unit::Bytes as i32)
        .unwrap();
    assert_eq!(bytes.total as u64, after);

    td.unpublish(id, false).await;
    td.unstage(id).await;
    td.delete(id).await;
    td.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_is_visible_in_ext4() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(
        T,
        filesystem_expansion(
            DriverOpts::preallocated("256MiB"),
            "ext4",
            32 * MIB,
            96 * MIB,
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_is_visible_in_xfs() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(
        T,
        filesystem_expansion(DriverOpts::sparse("1GiB"), "xfs", 300 * MIB, 400 * MIB),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_is_visible_on_block_device() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::preallocated("256MiB")).await;
        let vol = td.create("pvc-grow-block", 32 * MIB, block_cap()).await;
        let id = vol.volume_id.as_str();
        td.stage(id, block_cap()).await;
        let target = td.publish(id, block_cap(), false).await;
        let data = pattern(5, 4096);
        write_block(&target, 0, &data);
        assert_eq!(block_size(&target), 32 * MIB as u64);

        let resp = controller_expand(&td, id, 64 * MIB).await;
        assert_eq!(resp.capacity_bytes, 64 * MIB);
        let grown = td
            .node()
            .node_expand_volume(expand_req(&td, id, &target, 64 * MIB, block_cap()))
            .await
            .unwrap_or_else(|s| panic!("NodeExpandVolume block: {s:?}"))
            .into_inner();
        assert!(grown.capacity_bytes >= 64 * MIB);
        assert_eq!(block_size(&target), 64 * MIB as u64);
        assert_eq!(read_block(&target, 0, 4096), data);
        // The new space is usable.
        write_block(&target, 64 * MIB as u64 - 4096, &data);
        assert_eq!(read_block(&target, 64 * MIB as u64 - 4096, 4096), data);

        td.unpublish(id, true).await;
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_while_unstaged_reaches_the_filesystem() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-offline", 32 * MIB, mount_cap("ext4")).await;
        let id = vol.volume_id.as_str();
        let staging = td.stage(id, mount_cap("ext4")).await;
        write_file(&staging.join("keep"), b"kept");
        let before = fs_total_bytes(&staging);
        td.unstage(id).await;

        controller_expand(&td, id, 96 * MIB).await;
        // As the kubelet does: stage, publish, then NodeExpandVolume, which
        // must succeed whether or not the growth already happened.
        td.stage(id, mount_cap("ext4")).await;
        let target = td.publish(id, mount_cap("ext4"), false).await;
        node_expand(&td, id, &target, 96 * MIB, mount_cap("ext4")).await;
        node_expand(&td, id, &target, 96 * MIB, mount_cap("ext4")).await;
        let after = fs_total_bytes(&target);
        assert!(after >= before + 48 * MIB as u64, "{before} -> {after}");
        assert_eq!(read_file(&target.join("keep")), b"kept");
        td.unpublish(id, false).await;
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

// ------------------------------------------------------------------ stats

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_get_volume_stats_filesystem_and_block() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let fs_vol = td.create("pvc-stats-fs", 32 * MIB, mount_cap("ext4")).await;
        let block_vol = td.create("pvc-stats-block", 16 * MIB, block_cap()).await;
        let fid = fs_vol.volume_id.as_str();
        let bid = block_vol.volume_id.as_str();
        td.stage(fid, mount_cap("ext4")).await;
        let fs_target = td.publish(fid, mount_cap("ext4"), false).await;
        td.stage(bid, block_cap()).await;
        let block_target = td.publish(bid, block_cap(), false).await;

        let stats = td
            .node()
            .node_get_volume_stats(stats_req(fid, &fs_target))
            .await
            .expect("stats fs")
            .into_inner();
        let units: Vec<i32> = stats.usage.iter().map(|u| u.unit).collect();
        assert_eq!(units.len(), 2, "{stats:?}");
        assert!(units.contains(&(Unit::Bytes as i32)) && units.contains(&(Unit::Inodes as i32)));
        for u in &stats.usage {
            assert!(u.total > 0, "{u:?}");
            assert!(u.used >= 0 && u.available >= 0, "{u:?}");
            assert!(u.used <= u.total && u.available <= u.total, "{u:?}");
        }
        let bytes = stats
            .usage
            .iter()
            .find(|u| u.unit == Unit::Bytes as i32)
            .unwrap();
        assert_eq!(bytes.total as u64, fs_total_bytes(&fs_target));
        let condition = stats.volume_condition.expect("volume condition");
        assert!(!condition.abnormal, "{condition:?}");

        // Usage follows writes.
        write_file(&fs_target.join("four-mib"), &vec![1u8; 4 * MIB as usize]);
        let later = td
            .node()
            .node_get_volume_stats(stats_req(fid, &fs_target))
            .await
            .expect("stats fs")
            .into_inner();
        let bytes_later = later
            .usage
            .iter()
            .find(|u| u.unit == Unit::Bytes as i32)
            .unwrap();
        assert!(
            bytes_later.used >= bytes.used + 4 * MIB - MIB,
            "{bytes:?} -> {bytes_later:?}"
        );

        // The staging path answers too.
        td.node()
            .node_get_volume_stats(stats_req(fid, &td.staging_path(fid)))
            .await
            .expect("stats on the staging path");

        let stats = td
            .node()
            .node_get_volume_stats(stats_req(bid, &block_target))
            .await
            .expect("stats block")
            .into_inner();
        assert_eq!(stats.usage.len(), 1, "{stats:?}");
        assert_eq!(stats.usage[0].unit, Unit::Bytes as i32);
        assert_eq!(stats.usage[0].total, 16 * MIB);
        assert!(!stats.volume_condition.expect("volume condition").abnormal);

        assert_code(
            td.node()
                .node_get_volume_stats(stats_req(UNKNOWN_ID, &fs_target))
                .await,
            Code::NotFound,
            "stats of an unknown volume",
        );
        assert_code(
            td.node()
                .node_get_volume_stats(stats_req(fid, &td.root.join("no/such/path")))
                .await,
            Code::NotFound,
            "stats on a path that does not exist",
        );
        // The other volume's path is not this volume.
        assert_code(
            td.node()
                .node_get_volume_stats(stats_req(fid, &block_target))
                .await,
            Code::NotFound,
            "stats on another volume's path",
        );

        td.unpublish(fid, false).await;
        td.unpublish(bid, true).await;
        td.unstage(fid).await;
        td.unstage(bid).await;
        td.delete(fid).await;
        td.delete(bid).await;
        td.assert_no_leaks();
    })
    .await
}

/// Symlinked staging and target paths are refused, never followed: a mount
/// made or removed through a symlink lands somewhere the request did not
/// name (and before, an unpublish through one left the mount in place and
/// answered OK).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinked_paths_are_invalid_and_never_followed() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let mut node = td.node();
        for cap in [mount_cap("ext4"), block_cap()] {
            let block = is_block(&cap);
            let vol = td
                .create(&format!("pvc-link-{block}"), 16 * MIB, cap.clone())
                .await;
            let id = vol.volume_id.as_str();

            // Staging through a symlinked directory: refused, nothing mounted behind it.
            let elsewhere = td.root.join(format!("elsewhere-{block}"));
            fs::create_dir_all(&elsewhere).unwrap();
            let linked_staging = td.root.join(format!("staging/link-{block}"));
            std::os::unix::fs::symlink(&elsewhere, &linked_staging).unwrap();
            let mut r = td.stage_req(id, cap.clone());
            r.staging_target_path = linked_staging.display().to_string();
            assert_code(
                node.node_stage_volume(r).await,
                Code::InvalidArgument,
                "stage at a symlink",
            );
            assert!(
                leaked_mounts(&td.root).is_empty(),
                "{:#?}",
                leaked_mounts(&td.root)
            );

            let staging = td.stage(id, cap.clone()).await;
            // Publishing to a symlink, or below a symlinked parent: refused.
            let pod = td.root.join(format!("pods/linked-{block}"));
            fs::create_dir_all(&pod).unwrap();
            let link_target = pod.join("target");
            std::os::unix::fs::symlink(&elsewhere, &link_target).unwrap();
            let linked_parent = td.root.join(format!("pods/parent-link-{block}"));
            std::os::unix::fs::symlink(&pod, &linked_parent).unwrap();
            for target in [link_target.clone(), linked_parent.join("volume")] {
                let mut r = td.publish_req(id, cap.clone(), false);
                r.target_path = target.display().to_string();
                assert_code(
                    node.node_publish_volume(r).await,
                    Code::InvalidArgument,
                    &format!("publish to {}", target.display()),
                );
            }
            assert_eq!(leaked_mounts(&td.root).len(), 1, "only the staging mount");

            // Published at its real path; an unpublish naming a symlink to it
            // must not answer OK and leave the mount behind.
            let target = td.publish(id, cap.clone(), false).await;
            let alias = td.root.join(format!("pods/alias-{block}"));
            std::os::unix::fs::symlink(&target, &alias).unwrap();
            let mut r = td.unpublish_req(id, block);
            r.target_path = alias.display().to_string();
            assert_code(
                node.node_unpublish_volume(r).await,
                Code::InvalidArgument,
                "unpublish through a symlink",
            );
            assert_eq!(mounts_at(&target).len(), 1, "the publication is untouched");
            let mut r = td.unstage_req(id);
            r.staging_target_path = linked_staging.display().to_string();
            assert_code(
                node.node_unstage_volume(r).await,
                Code::InvalidArgument,
                "unstage through a symlink",
            );
            td.unpublish(id, block).await;
            td.unstage(id).await;
            assert!(!staging.join("device").exists());
            td.delete(id).await;
        }
        td.assert_no_leaks();
    })
    .await
}

/// Staging and target paths must lie below `--kubelet-dir`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_kubelet_dir_are_invalid() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let outside = tempfile::Builder::new()
            .prefix("kennel-outside-")
            .tempdir()
            .unwrap();
        let outside = fs::canonicalize(outside.path()).unwrap();
        let vol = td.create("pvc-outside", 16 * MIB, mount_cap("ext4")).await;
        let id = vol.volume_id.as_str();
        let mut node = td.node();
        let mut r = td.stage_req(id, mount_cap("ext4"));
        r.staging_target_path = outside.join("staging").display().to_string();
        assert_code(
            node.node_stage_volume(r).await,
            Code::InvalidArgument,
            "stage outside the kubelet dir",
        );
        // The kubelet directory itself is no staging path either.
        let mut r = td.stage_req(id, mount_cap("ext4"));
        r.staging_target_path = td.root.display().to_string();
        assert_code(
            node.node_stage_volume(r).await,
            Code::InvalidArgument,
            "stage at the kubelet dir itself",
        );
        assert!(leaked_mounts(&outside).is_empty());
        assert!(leaked_loops(&td.root).is_empty());

        td.stage(id, mount_cap("ext4")).await;
        let mut r = td.publish_req(id, mount_cap("ext4"), false);
        r.target_path = outside.join("mount").display().to_string();
        assert_code(
            node.node_publish_volume(r).await,
            Code::InvalidArgument,
            "publish outside the kubelet dir",
        );
        assert!(!outside.join("mount").exists());
        let mut r = td.unpublish_req(id, false);
        r.target_path = outside.join("mount").display().to_string();
        assert_code(
            node.node_unpublish_volume(r).await,
            Code::InvalidArgument,
            "unpublish outside the kubelet dir",
        );
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

// -------------------------------------------------------------- busy mounts

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_waits_out_a_brief_holder_and_reports_a_lasting_one() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-busy", 16 * MIB, mount_cap("ext4")).await;
        let id = vol.volume_id.as_str();
        td.stage(id, mount_cap("ext4")).await;
        let target = td.publish(id, mount_cap("ext4"), false).await;
        write_file(&target.join("data"), b"kept");

        // A descriptor under the target, closed a moment after the call starts:
        // the way a forked child holds one until it execs.
        let held = fs::File::open(target.join("data")).expect("open under target");
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(150));
            drop(held);
        });
        td.unpublish(id, false).await;
        releaser.join().expect("releaser");
        assert!(!target.exists(), "target left after unpublish");

        // A holder that stays: the call fails, names the cause, and loses nothing.
        let target = td.publish(id, mount_cap("ext4"), false).await;
        let held = fs::File::open(target.join("data")).expect("open under target");
        let status = td
            .node()
            .node_unpublish_volume(td.unpublish_req(id, false))
            .await
            .expect_err("unpublish while a file stays open");
        assert!(
            status.message().contains("busy"),
            "unexpected error: {status:?}"
        );
        assert_eq!(read_file(&target.join("data")), b"kept");
        drop(held);
        td.unpublish(id, false).await;
        td.unstage(id).await;
        td.delete(id).await;
        td.assert_no_leaks();
    })
    .await
}

/// Make ext4 on the device mounted at `staging` record an error, the way the
/// kernel does when it finds damaged metadata (its own sysfs test hook).
fn trigger_ext4_error(staging: &Path) {
    let mount = mounts_at(staging).pop().expect("staged mount");
    assert_eq!(mount.fs_type, "ext4");
    let device = fs::canonicalize(format!("/sys/dev/block/{}", mount.dev)).expect("sysfs device");
    let name = device.file_name().expect("device name").to_owned();
    let hook = Path::new("/sys/fs/ext4")
        .join(name)
        .join("trigger_fs_error");
    fs::write(&hook, "kennel test: damaged metadata").expect("trigger an ext4 error");
}

/// A filesystem that hit errors is an abnormal volume: read-only after them
/// (`errors=remount-ro`), or still writable with errors recorded (ext4's
/// default, `errors=continue`). The messages say what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_that_hit_errors_is_abnormal() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start().await;
        let mut remount_ro = mount_cap("ext4");
        if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut remount_ro.access_type {
            m.mount_flags = vec!["errors=remount-ro".to_owned()];
        }
        for (name, cap, expect) in [
            ("pvc-errors-ro", remount_ro, "went read-only after errors ("),
            (
                "pvc-errors-continue",
                mount_cap("ext4"),
                "recorded 1 error(s)",
            ),
        ] {
            let id = td.create(name, 32 * MIB, cap.clone()).await.volume_id;
            let staging = td.stage(&id, cap.clone()).await;
            let target = td.publish(&id, cap.clone(), false).await;
            let healthy = td
                .node()
                .node_get_volume_stats(stats_req(&id, &target))
                .await
                .expect("stats")
                .into_inner();
            assert!(!healthy.volume_condition.expect("condition").abnormal);

            trigger_ext4_error(&staging);
            for path in [&target, &staging] {
                // ext4 records the error, and on some kernels goes read-only, from a work queue.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
                let condition = loop {
                    let condition = td
                        .node()
                        .node_get_volume_stats(stats_req(&id, path))
                        .await
                        .expect("stats")
                        .into_inner()
                        .volume_condition
                        .expect("condition");
                    if condition.message.contains(expect) || std::time::Instant::now() > deadline {
                        break condition;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                };
                assert!(condition.abnormal, "{name}: {condition:?}");
                assert!(condition.message.contains(expect), "{name}: {condition:?}");
                assert!(
                    condition.message.contains("e2fsck"),
                    "{name}: {condition:?}"
                );
            }
            let write = fs::write(target.join("after-the-error"), b"x");
            assert_eq!(
                write.is_err(),
                name == "pvc-errors-ro",
                "{name}: writes after the error: {write:?}"
            );
            td.unpublish(&id, false).await;
            td.unstage(&id).await;
            td.delete(&id).await;
        }
    })
    .await
}

/// A Filesystem capability with these mount flags and mount group.
fn mount_cap_with(flags: &[&str], group: &str) -> pb::VolumeCapability {
    let mut cap = mount_cap("ext4");
    if let Some(pb::volume_capability::AccessType::Mount(m)) = &mut cap.access_type {
        m.mount_flags = flags.iter().map(|f| f.to_string()).collect();
        m.volume_mount_group = group.to_owned();
    }
    cap
}

/// The kubelet's SELinux label (`seLinuxMount: true`) reaches the mount call
/// whole, categories and all: where SELinux runs the filesystem carries it;
/// on a node without SELinux the kernel refuses the option and the answer
/// names it. A label that could smuggle other options in is refused first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selinux_context_reaches_the_mount_call() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start().await;
        let label = "context=\"system_u:object_r:container_file_t:s0:c1,c2\"";
        let labelled = mount_cap_with(&["noatime", label], "");
        let id = td
            .create("pvc-selinux", 32 * MIB, labelled.clone())
            .await
            .volume_id;
        fs::create_dir_all(td.staging_path(&id)).unwrap();

        let smuggled = mount_cap_with(&["context=\"system_u:object_r:t:s0:c1,exec\""], "");
        let refused = td
            .node()
            .node_stage_volume(td.stage_req(&id, smuggled))
            .await;
        let status = refused.expect_err("a label with an option in it");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("c1,exec"), "{status:?}");

        let selinux = Path::new("/sys/fs/selinux/enforce").exists();
        let staged = td
            .node()
            .node_stage_volume(td.stage_req(&id, labelled.clone()))
            .await;
        if selinux {
            staged.expect("stage with the pod's label");
            let mount = the_mount(&td.staging_path(&id));
            let super_options = fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(
                super_options.contains("container_file_t:s0:c1,c2"),
                "label not on the mount {mount:?}"
            );
        } else {
            let status = staged.expect_err("no SELinux here: the kernel refuses the option");
            assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
            assert!(
                status.message().contains(label) && status.message().contains("SELinux"),
                "{status:?}"
            );
            assert!(mounts_at(&td.staging_path(&id)).is_empty());
            // Without the label the volume stages; publishing with it binds the same mount.
            td.stage(&id, mount_cap_with(&["noatime"], "")).await;
        }
        let target = td.publish(&id, labelled.clone(), false).await;
        assert_eq!(the_mount(&target).dev, the_mount(&td.staging_path(&id)).dev);
        td.unpublish(&id, false).await;
        td.unstage(&id).await;
        td.delete(&id).await;
        td.assert_no_leaks();
    })
    .await
}

/// NodePublish with `volume_mount_group` (the pod's fsGroup, delegated by the
/// kubelet): the volume's files and directories become the group's, readable
/// and writable by it, and new files inherit the group (setgid directories).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_mount_group_gives_the_files_to_the_pods_group() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let td = TestDriver::start().await;
        let plain = mount_cap_with(&[], "");
        let id = td
            .create("pvc-fsgroup", 32 * MIB, plain.clone())
            .await
            .volume_id;
        let staging = td.stage(&id, mount_cap_with(&[], "4321")).await;
        // Data written before: root's, private.
        fs::create_dir(staging.join("db")).unwrap();
        write_file(&staging.join("db/table"), b"rows");
        fs::set_permissions(staging.join("db/table"), PermissionsExt::from_mode(0o600)).unwrap();

        let bad = td
            .node()
            .node_publish_volume(td.publish_req(&id, mount_cap_with(&[], "staff"), false))
            .await;
        let status = bad.expect_err("a group name is no GID");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("staff"), "{status:?}");

        let target = td.publish(&id, mount_cap_with(&[], "4321"), false).await;
        for (path, bits) in [
            (target.clone(), 0o2070),
            (target.join("db"), 0o2070),
            (target.join("db/table"), 0o060),
        ] {
            let meta = fs::metadata(&path).unwrap();
            assert_eq!(meta.gid(), 4321, "{}", path.display());
            assert_eq!(
                meta.mode() & bits,
                bits,
                "{}: {:o}",
                path.display(),
                meta.mode()
            );
        }
        write_file(&target.join("db/new"), b"later");
        assert_eq!(fs::metadata(target.join("db/new")).unwrap().gid(), 4321);
        td.unpublish(&id, false).await;
        td.unstage(&id).await;
        td.delete(&id).await;
        td.assert_no_leaks();
    })
    .await
}
