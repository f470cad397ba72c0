//! Snapshots and clones over gRPC: data copied at the
//! moment of the snapshot (even while mounted), idempotency, listing and the
//! spec's codes for unknown or incompatible sources.

use crate::common::*;
use kennel::csi::pb;
use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
use tonic::Code;

fn snapshot_req(name: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        name: name.to_owned(),
        source_volume_id: source.to_owned(),
        ..Default::default()
    }
}

fn from_snapshot(name: &str, bytes: i64, snapshot_id: &str) -> pb::CreateVolumeRequest {
    let mut req = create_req(name, bytes, vec![mount_cap("ext4")]);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snapshot_id.to_owned(),
        })),
    });
    req
}

fn from_volume(name: &str, bytes: i64, volume_id: &str) -> pb::CreateVolumeRequest {
    let mut req = create_req(name, bytes, vec![mount_cap("ext4")]);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(Type::Volume(VolumeSource {
            volume_id: volume_id.to_owned(),
        })),
    });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_a_mounted_volume_restores_its_data() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(60, async {
        let td = TestDriver::start_with(DriverOpts::sparse("1GiB")).await;
        let mut controller = td.controller();
        let origin = td.create("origin", 32 * MIB, mount_cap("ext4")).await;
        td.stage(&origin.volume_id, mount_cap("ext4")).await;
        let target = td
            .publish(&origin.volume_id, mount_cap("ext4"), false)
            .await;
        write_file(&target.join("hello.txt"), b"before the snapshot");

        // Taken while mounted: the filesystem is frozen for the copy.
        let snap = controller
            .create_snapshot(snapshot_req("snap-1", &origin.volume_id))
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        assert!(snap.ready_to_use);
        assert_eq!(snap.source_volume_id, origin.volume_id);
        assert_eq!(snap.size_bytes, 32 * MIB);
        assert!(snap.snapshot_id.starts_with("ks-"));
        write_file(&target.join("hello.txt"), b"after the snapshot");

        // Idempotent by name; the same name for another volume is ALREADY_EXISTS.
        let again = controller
            .create_snapshot(snapshot_req("snap-1", &origin.volume_id))
            .await
            .expect("repeat CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        assert_eq!(again.snapshot_id, snap.snapshot_id);
        let other = td.create("other", 16 * MIB, mount_cap("ext4")).await;
        assert_code(
            controller
                .create_snapshot(snapshot_req("snap-1", &other.volume_id))
                .await,
            Code::AlreadyExists,
            "snapshot name reused for another volume",
        );

        // Restore into a bigger volume and find the data as it was.
        let restored = controller
            .create_volume(from_snapshot("restored", 64 * MIB, &snap.snapshot_id))
            .await
            .expect("CreateVolume from snapshot")
            .into_inner()
            .volume
            .expect("volume");
        assert_eq!(restored.capacity_bytes, 64 * MIB);
        match restored.content_source.and_then(|s| s.r#type) {
            Some(Type::Snapshot(s)) => assert_eq!(s.snapshot_id, snap.snapshot_id),
            other => panic!("content source {other:?}"),
        }
        td.stage(&restored.volume_id, mount_cap("ext4")).await;
        let restored_target = td
            .publish(&restored.volume_id, mount_cap("ext4"), false)
            .await;
        assert_eq!(
            read_file(&restored_target.join("hello.txt")),
            b"before the snapshot"
        );
        // The restored filesystem grew to the new size on stage.
        assert!(fs_total_bytes(&restored_target) > 40 * MIB as u64);

        for id in [&restored.volume_id, &origin.volume_id] {
            td.unpublish(id, false).await;
            td.unstage(id).await;
        }
        td.assert_no_leaks();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clone_copies_the_source_volume() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(60, async {
        let td = TestDriver::start_with(DriverOpts::sparse("1GiB")).await;
        let mut controller = td.controller();
        let origin = td.create("origin", 16 * MIB, block_cap()).await;
        td.stage(&origin.volume_id, block_cap()).await;
        let dev = td.publish(&origin.volume_id, block_cap(), false).await;
        write_block(&dev, 4096, &pattern(7, 8192));
        td.unpublish(&origin.volume_id, true).await;
        td.unstage(&origin.volume_id).await;

        let mut req = from_volume("clone", 16 * MIB, &origin.volume_id);
        req.volume_capabilities = vec![block_cap()];
        let clone = controller
            .create_volume(req)
            .await
            .expect("clone")
            .into_inner()
            .volume
            .expect("volume");
        assert_ne!(clone.volume_id, origin.volume_id);
        td.stage(&clone.volume_id, block_cap()).await;
        let clone_dev = td.publish(&clone.volume_id, block_cap(), false).await;
        assert_eq!(read_block(&clone_dev, 4096, 8192), pattern(7, 8192));
        td.unpublish(&clone.volume_id, true).await;
        td.unstage(&clone.volume_id).await;

        // A clone smaller than its source cannot hold it.
        let mut small = from_volume("small", 0, &origin.volume_id);
        small.capacity_range = Some(pb::CapacityRange {
            required_bytes: 8 * MIB,
            limit_bytes: 8 * MIB,
        });
        assert_code(
            controller.create_volume(small).await,
            Code::OutOfRange,
            "clone below source size",
        );
        td.assert_no_leaks();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_sources_and_ids_get_the_spec_codes() {
    with_timeout(30, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let mut controller = td.controller();
        assert_code(
            controller
                .create_volume(from_snapshot("x", MIB, "ks-000000000000000000000000"))
                .await,
            Code::NotFound,
            "restore from unknown snapshot",
        );
        assert_code(
            controller
                .create_volume(from_snapshot("y", MIB, "../../etc/passwd"))
                .await,
            Code::NotFound,
            "restore from a hostile snapshot id",
        );
        assert_code(
            controller
                .create_volume(from_volume("z", MIB, UNKNOWN_ID))
                .await,
            Code::NotFound,
            "clone of unknown volume",
        );
        assert_code(
            controller
                .create_snapshot(snapshot_req("", UNKNOWN_ID))
                .await,
            Code::InvalidArgument,
            "snapshot without name",
        );
        assert_code(
            controller.create_snapshot(snapshot_req("s", "")).await,
            Code::InvalidArgument,
            "snapshot without source",
        );
        assert_code(
            controller
                .create_snapshot(snapshot_req("s", UNKNOWN_ID))
                .await,
            Code::NotFound,
            "snapshot of unknown volume",
        );
        let mut params = snapshot_req("s", UNKNOWN_ID);
        params.parameters.insert("bogus".into(), "1".into());
        assert_code(
            controller.create_snapshot(params).await,
            Code::InvalidArgument,
            "unknown snapshot class parameter",
        );
        assert_code(
            controller
                .delete_snapshot(pb::DeleteSnapshotRequest::default())
                .await,
            Code::InvalidArgument,
            "delete snapshot without id",
        );
        for id in ["ks-000000000000000000000000", "../etc", "not-a-snapshot"] {
            controller
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id.into(),
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|s| panic!("delete unknown snapshot {id}: {s:?}"));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_snapshots_filters_and_pages() {
    with_timeout(30, async {
        let td = TestDriver::start_with(DriverOpts::sparse("1GiB")).await;
        let mut controller = td.controller();
        let a = td.create("a", 4 * MIB, block_cap()).await;
        let b = td.create("b", 4 * MIB, block_cap()).await;
        let mut ids = Vec::new();
        for (i, source) in [&a, &a, &b, &b, &b].iter().enumerate() {
            let snap = controller
                .create_snapshot(snapshot_req(&format!("s{i}"), &source.volume_id))
                .await
                .expect("snapshot")
                .into_inner()
                .snapshot
                .expect("snapshot");
            ids.push(snap.snapshot_id);
        }
        let list =
            |snapshot_id: &str, source: &str, token: &str, max: i32| pb::ListSnapshotsRequest {
                max_entries: max,
                starting_token: token.to_owned(),
                source_volume_id: source.to_owned(),
                snapshot_id: snapshot_id.to_owned(),
                ..Default::default()
            };
        let of_b = controller
            .list_snapshots(list("", &b.volume_id, "", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(of_b.entries.len(), 3);
        let one = controller
            .list_snapshots(list(&ids[0], "", "", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.entries.len(), 1);
        let none = controller
            .list_snapshots(list("ks-000000000000000000000000", "", "", 0))
            .await
            .unwrap()
            .into_inner();
        assert!(none.entries.is_empty());

        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = controller
                .list_snapshots(list("", "", &token, 2))
                .await
                .unwrap()
                .into_inner();
            assert!(page.entries.len() <= 2);
            seen.extend(
                page.entries
                    .into_iter()
                    .filter_map(|e| e.snapshot)
                    .map(|s| s.snapshot_id),
            );
            if page.next_token.is_empty() {
                break;
            }
            token = page.next_token;
        }
        seen.sort();
        ids.sort();
        assert_eq!(seen, ids);
        assert_code(
            controller
                .list_snapshots(list("", "", "bogus-token", 0))
                .await,
            Code::Aborted,
            "bad snapshot token",
        );
        // Snapshots survive a restart: they live beside the volumes.
        let mut td = td;
        td.restart().await;
        let after = td
            .controller()
            .list_snapshots(list("", "", "", 0))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(after.entries.len(), 5);
    })
    .await;
}

/// Whether the filesystem at `path` is frozen: `fsfreeze --unfreeze` succeeds only then (and
/// thaws it, so call it once, at the end).
fn was_frozen(path: &std::path::Path) -> bool {
    std::process::Command::new("fsfreeze")
        .arg("--unfreeze")
        .arg(path)
        .output()
        .expect("run fsfreeze (util-linux)")
        .status
        .success()
}

/// A full copy under a freeze that outlives its budget is refused and the workload thawed. With
/// LVM under device-mapper no full copy runs under a freeze: the copy reads a point-in-time view
/// taken in an instant, so the same snapshot succeeds and holds the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_outlives_the_freeze_budget_is_refused_and_the_workload_thawed() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(120, async {
        let mut opts = DriverOpts::sparse("1GiB");
        opts.extra_args = vec!["--freeze-budget".into(), "1ms".into()];
        let view = opts.backend == Backend::Lvm && vg::device_mapper();
        let td = TestDriver::start_with(opts).await;
        let origin = td.create("origin", 128 * MIB, mount_cap("ext4")).await;
        td.stage(&origin.volume_id, mount_cap("ext4")).await;
        let target = td
            .publish(&origin.volume_id, mount_cap("ext4"), false)
            .await;
        // Enough data that no full copy fits in a millisecond.
        let data: Vec<u8> = (0..64 * MIB as usize)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        write_file(&target.join("big.bin"), &data);

        let call = td
            .controller()
            .create_snapshot(snapshot_req("snap-slow", &origin.volume_id))
            .await;
        if view {
            let snap = call
                .expect("a snapshot read from a point-in-time view needs no long freeze")
                .into_inner()
                .snapshot
                .expect("snapshot");
            write_file(&target.join("after.txt"), b"not blocked");
            let restored = td
                .controller()
                .create_volume(from_snapshot("restored", 128 * MIB, &snap.snapshot_id))
                .await
                .expect("restore")
                .into_inner()
                .volume
                .expect("volume");
            td.stage(&restored.volume_id, mount_cap("ext4")).await;
            let at = td
                .publish(&restored.volume_id, mount_cap("ext4"), false)
                .await;
            assert!(
                std::fs::read(at.join("big.bin")).unwrap() == data,
                "restored data differs"
            );
            assert!(!at.join("after.txt").exists(), "written after the snapshot");
            td.unpublish(&restored.volume_id, false).await;
            td.unstage(&restored.volume_id).await;
            td.delete(&restored.volume_id).await;
            td.controller()
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: snap.snapshot_id.clone(),
                    ..Default::default()
                })
                .await
                .expect("DeleteSnapshot");
        } else {
            let refused = call.expect_err("a full copy longer than the budget");
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(refused.message().contains("freeze budget"), "{refused:?}");
            // The workload writes again at once, and nothing half-made is listed.
            write_file(&target.join("after.txt"), b"not blocked");
            assert!(!was_frozen(&td.staging_path(&origin.volume_id)));
            let listed = td
                .controller()
                .list_snapshots(pb::ListSnapshotsRequest::default())
                .await
                .expect("ListSnapshots")
                .into_inner()
                .entries;
            assert!(listed.is_empty(), "{listed:?}");
        }

        td.unpublish(&origin.volume_id, false).await;
        td.unstage(&origin.volume_id).await;
        td.assert_no_leaks();
        td.delete(&origin.volume_id).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filesystem_left_frozen_is_thawed_when_the_driver_starts() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(120, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-frozen", 32 * MIB, mount_cap("ext4")).await;
        let staging = td.stage(&vol.volume_id, mount_cap("ext4")).await;
        // What a driver killed in the middle of a snapshot leaves behind.
        let frozen = std::process::Command::new("fsfreeze")
            .arg("--freeze")
            .arg(&staging)
            .status()
            .expect("run fsfreeze");
        assert!(frozen.success());
        td.restart().await;
        assert!(
            !was_frozen(&staging),
            "the restarted driver left the staged filesystem frozen"
        );
        td.unstage(&vol.volume_id).await;
        td.assert_no_leaks();
        td.delete(&vol.volume_id).await;
    })
    .await
}

/// Snapshot IDs name the node that holds them; IDs of before (bare) are this node's; another
/// node's snapshot is never restored, deleted or listed here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_ids_name_their_node() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(60, async {
        let td = TestDriver::start_with(DriverOpts::sparse("1GiB")).await;
        let mut controller = td.controller();
        let origin = td.create("origin", 16 * MIB, mount_cap("ext4")).await;
        let snap = controller
            .create_snapshot(snapshot_req("snap-1", &origin.volume_id))
            .await
            .expect("CreateSnapshot")
            .into_inner()
            .snapshot
            .expect("snapshot");
        let (bare, node) = snap
            .snapshot_id
            .split_once('@')
            .expect("the ID names a node");
        assert_eq!(node, td.opts.node_id);
        let listed = |id: &str| pb::ListSnapshotsRequest {
            snapshot_id: id.to_owned(),
            ..Default::default()
        };
        let list = |_: &mut _, id: &str| {
            let req = listed(id);
            let mut c = td.controller();
            async move {
                c.list_snapshots(req)
                    .await
                    .expect("ListSnapshots")
                    .into_inner()
                    .entries
                    .into_iter()
                    .filter_map(|e| e.snapshot)
                    .map(|s| s.snapshot_id)
                    .collect::<Vec<_>>()
            }
        };
        assert_eq!(
            list(&mut controller, &snap.snapshot_id).await,
            std::slice::from_ref(&snap.snapshot_id)
        );
        // The bare ID (as drivers before named snapshots handed out) is this node's.
        assert_eq!(
            list(&mut controller, bare).await,
            std::slice::from_ref(&snap.snapshot_id)
        );
        let legacy = controller
            .create_volume(from_snapshot("from-bare", 16 * MIB, bare))
            .await
            .expect("CreateVolume from a bare snapshot ID")
            .into_inner()
            .volume
            .expect("volume");

        // Another node's: not restorable here (RESOURCE_EXHAUSTED lets a provisioner pick
        // another node), not deleted here, and not listed here.
        let elsewhere = format!("{bare}@node-elsewhere");
        let status = controller
            .create_volume(from_snapshot("from-elsewhere", 16 * MIB, &elsewhere))
            .await
            .expect_err("another node's snapshot restored here");
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("node-elsewhere"), "{status:?}");
        let status = controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: elsewhere.clone(),
                ..Default::default()
            })
            .await
            .expect_err("another node's snapshot deleted here");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(list(&mut controller, &elsewhere).await.is_empty());
        assert_eq!(
            list(&mut controller, &snap.snapshot_id).await,
            std::slice::from_ref(&snap.snapshot_id)
        );
        for hostile in [
            format!("{bare}@"),
            format!("{bare}@../../etc"),
            format!("{bare}@Node_X"),
        ] {
            assert!(
                list(&mut controller, &hostile).await.is_empty(),
                "{hostile}"
            );
            assert_code(
                controller
                    .create_volume(from_snapshot("hostile", 16 * MIB, &hostile))
                    .await,
                Code::NotFound,
                "a snapshot ID no snapshot can have",
            );
        }

        // Deleted by its own ID; gone for the bare one too.
        controller
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
        assert!(list(&mut controller, bare).await.is_empty());
        for id in [&legacy.volume_id, &origin.volume_id] {
            td.delete(id).await;
        }
    })
    .await;
}
