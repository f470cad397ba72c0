//! Volume group snapshots over gRPC (the GroupController): every staged member frozen
//! together for the cut, each member restorable, idempotency and the spec's codes, callers that
//! give up at any step, a driver restart, and a failed cut that leaves nothing behind.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::cancellation::{
    added, cut_at, objects, objects_per_snapshot, timed, Pauses, MAX_STEPS, T,
};
use crate::common::*;
use kennel::csi::pb;
use pb::volume_content_source::{SnapshotSource, Type};
use tonic::{Code, Status};

fn assert_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) {
    assert_code(result.map(tonic::Response::new), code, what)
}

/// The pause point where every member's filesystem is frozen and nothing is cut yet.
const ALL_FROZEN: &str = "group snapshot: all frozen";

fn group_req(name: &str, sources: &[&str]) -> pb::CreateVolumeGroupSnapshotRequest {
    pb::CreateVolumeGroupSnapshotRequest {
        name: name.to_owned(),
        source_volume_ids: sources.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

async fn create_group(
    td: &TestDriver,
    req: pb::CreateVolumeGroupSnapshotRequest,
    deadline: Duration,
) -> Result<pb::VolumeGroupSnapshot, Status> {
    // Deadlines long enough for the work stretch with the emulated VM lane; short ones are
    // callers meant to give up.
    let deadline = match deadline >= Duration::from_secs(10) {
        true => deadline * crate::common::vg::timeout_scale() as u32,
        false => deadline,
    };
    td.client
        .group
        .clone()
        .create_volume_group_snapshot(timed(req, deadline))
        .await
        .map(|r| r.into_inner().group_snapshot.expect("a group snapshot"))
}

async fn get_group(
    td: &TestDriver,
    id: &str,
    snapshot_ids: Vec<String>,
) -> Result<pb::VolumeGroupSnapshot, Status> {
    td.client
        .group
        .clone()
        .get_volume_group_snapshot(pb::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: id.to_owned(),
            snapshot_ids,
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().group_snapshot.expect("a group snapshot"))
}

async fn delete_group(td: &TestDriver, id: &str, snapshot_ids: Vec<String>) -> Result<(), Status> {
    td.client
        .group
        .clone()
        .delete_volume_group_snapshot(pb::DeleteVolumeGroupSnapshotRequest {
            group_snapshot_id: id.to_owned(),
            snapshot_ids,
            ..Default::default()
        })
        .await
        .map(|_| ())
}

fn member_ids(group: &pb::VolumeGroupSnapshot) -> Vec<String> {
    group
        .snapshots
        .iter()
        .map(|s| s.snapshot_id.clone())
        .collect()
}

fn sources(group: &pb::VolumeGroupSnapshot) -> BTreeSet<String> {
    group
        .snapshots
        .iter()
        .map(|s| s.source_volume_id.clone())
        .collect()
}

/// A staged, published ext4 volume holding `data.txt`.
async fn mounted_volume(td: &TestDriver, name: &str, contents: &[u8]) -> (String, PathBuf) {
    let vol = td.create(name, 32 * MIB, mount_cap("ext4")).await;
    td.stage(&vol.volume_id, mount_cap("ext4")).await;
    let target = td.publish(&vol.volume_id, mount_cap("ext4"), false).await;
    write_file(&target.join("data.txt"), contents);
    (vol.volume_id, target)
}

async fn release_volume(td: &TestDriver, id: &str) {
    td.unpublish(id, false).await;
    td.unstage(id).await;
    td.delete(id).await;
}

/// Restore `snapshot_id` into a new volume and read its `data.txt`.
async fn restored_data(td: &TestDriver, name: &str, snapshot_id: &str) -> (String, Vec<u8>) {
    let mut req = create_req(name, 32 * MIB, vec![mount_cap("ext4")]);
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(Type::Snapshot(SnapshotSource {
            snapshot_id: snapshot_id.to_owned(),
        })),
    });
    let vol = td
        .controller()
        .create_volume(req)
        .await
        .expect("CreateVolume from a member")
        .into_inner()
        .volume
        .expect("volume");
    td.stage(&vol.volume_id, mount_cap("ext4")).await;
    let target = td.publish(&vol.volume_id, mount_cap("ext4"), false).await;
    let data = read_file(&target.join("data.txt"));
    release_volume(td, &vol.volume_id).await;
    (vol.volume_id, data)
}

/// Hold the driver at `step` (by name): arm one step at a time and pass the others.
async fn hold_at(pauses: &Pauses, step: &str) {
    loop {
        let wait = Duration::from_secs(60 * crate::common::vg::timeout_scale());
        let held = tokio::time::timeout(wait, async {
            loop {
                if let Some(held) = pauses.held() {
                    return held;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the driver never reached {step:?}"));
        if held == step {
            return;
        }
        pauses.arm(1);
        pauses.release();
    }
}

/// A writer of `path`, on a thread of its own (a write to a frozen filesystem blocks).
fn writer(path: &Path, contents: &'static [u8]) -> std::thread::JoinHandle<()> {
    let path = path.to_owned();
    std::thread::spawn(move || write_file(&path, contents))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_is_one_instant_of_every_member_and_restores_each() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(300, async {
        let pauses = Pauses::new();
        let mut opts = pauses.opts("1GiB");
        // The test holds the freeze for a while: the budget must not run out meanwhile.
        opts.extra_args = vec!["--freeze-budget".into(), "120s".into()];
        let td = TestDriver::start_with(opts).await;

        let caps = td
            .identity()
            .get_plugin_capabilities(pb::GetPluginCapabilitiesRequest::default())
            .await
            .expect("GetPluginCapabilities")
            .into_inner();
        use pb::plugin_capability::{service::Type as Service, Type as Cap};
        assert!(caps.capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(Cap::Service(s)) if s.r#type == Service::GroupControllerService as i32
        )));
        let group_caps = td
            .client
            .group
            .clone()
            .group_controller_get_capabilities(pb::GroupControllerGetCapabilitiesRequest {})
            .await
            .expect("GroupControllerGetCapabilities")
            .into_inner();
        assert_eq!(group_caps.capabilities.len(), 1);

        let (db, db_mount) = mounted_volume(&td, "pvc-db", b"db: row 1").await;
        let (log, log_mount) = mounted_volume(&td, "pvc-log", b"log: row 1").await;
        // An unstaged member has nothing to freeze and is cut as it is.
        let idle = td.create("pvc-idle", 16 * MIB, block_cap()).await;
        let req = group_req("group-1", &[&db, &log, &idle.volume_id]);

        // Hold the cut where every member is frozen: no writer gets through until the cut is
        // made and all are thawed, so neither write can be in the group.
        pauses.arm(1);
        let creating = tokio::spawn({
            let client = td.client.group.clone();
            let req = req.clone();
            async move {
                client
                    .clone()
                    .create_volume_group_snapshot(req)
                    .await
                    .map(|r| r.into_inner().group_snapshot.expect("a group snapshot"))
            }
        });
        hold_at(&pauses, ALL_FROZEN).await;
        let writers = [
            writer(&db_mount.join("data.txt"), b"db: row 2"),
            writer(&log_mount.join("data.txt"), b"log: row 2"),
        ];
        tokio::time::sleep(Duration::from_millis(800)).await;
        for w in &writers {
            assert!(
                !w.is_finished(),
                "a member was written while the group is frozen"
            );
        }
        pauses.release();
        let group = creating.await.unwrap().expect("CreateVolumeGroupSnapshot");
        for w in writers {
            w.join().expect("the writer finishes once thawed");
        }
        write_file(&db_mount.join("after.txt"), b"thawed");

        assert!(group.group_snapshot_id.starts_with("kg-"));
        assert!(group.ready_to_use);
        assert!(group.creation_time.is_some());
        assert_eq!(
            sources(&group),
            BTreeSet::from([db.clone(), log.clone(), idle.volume_id.clone()])
        );
        for member in &group.snapshots {
            assert_eq!(member.group_snapshot_id, group.group_snapshot_id);
            assert!(member.ready_to_use);
        }

        // Idempotent by name (any order of sources); other sources are ALREADY_EXISTS.
        let mut reordered = req.clone();
        reordered.source_volume_ids.reverse();
        let again = create_group(&td, reordered, Duration::from_secs(60))
            .await
            .expect("repeat");
        assert_eq!(again, group);
        assert_status(
            create_group(&td, group_req("group-1", &[&db]), Duration::from_secs(60)).await,
            Code::AlreadyExists,
            "group name reused for other volumes",
        );
        // A volume this node does not have: another node's, which no node can freeze with ours.
        let elsewhere = create_group(
            &td,
            group_req("group-2", &[&db, "kv-000000000000000000000000"]),
            Duration::from_secs(60),
        )
        .await
        .expect_err("a member on another node");
        assert_eq!(elsewhere.code(), Code::FailedPrecondition, "{elsewhere:?}");
        assert!(elsewhere.message().contains("one node"), "{elsewhere:?}");
        for (what, bad) in [
            ("no name", group_req("", &[&db])),
            ("no sources", group_req("group-2", &[])),
            ("a source twice", group_req("group-2", &[&db, &db])),
        ] {
            assert_status(
                create_group(&td, bad, Duration::from_secs(60)).await,
                Code::InvalidArgument,
                what,
            );
        }
        assert_status(
            create_group(
                &td,
                group_req("group-2", &["../../etc"]),
                Duration::from_secs(60),
            )
            .await,
            Code::NotFound,
            "a hostile source ID",
        );

        // Members are listed with their group and cannot be deleted alone.
        let listed = td
            .controller()
            .list_snapshots(pb::ListSnapshotsRequest {
                source_volume_id: log.clone(),
                ..Default::default()
            })
            .await
            .expect("ListSnapshots")
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 1);
        let listed = listed[0].snapshot.clone().expect("snapshot");
        assert_eq!(listed.group_snapshot_id, group.group_snapshot_id);
        assert_code(
            td.controller()
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: listed.snapshot_id.clone(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "DeleteSnapshot of a group's member",
        );

        // Get checks the member IDs it is given.
        let ids = member_ids(&group);
        assert_eq!(
            get_group(&td, &group.group_snapshot_id, ids.clone())
                .await
                .expect("GetVolumeGroupSnapshot"),
            group
        );
        assert_status(
            get_group(&td, &group.group_snapshot_id, ids[..1].to_vec()).await,
            Code::InvalidArgument,
            "Get with a member missing",
        );
        assert_status(
            get_group(&td, "kg-000000000000000000000000", vec![]).await,
            Code::NotFound,
            "Get of an unknown group",
        );
        assert_status(
            get_group(&td, "", vec![]).await,
            Code::InvalidArgument,
            "Get without an ID",
        );

        // Each member restores the instant of the cut.
        for (member, want) in [(&db, &b"db: row 1"[..]), (&log, &b"log: row 1"[..])] {
            let snap = group
                .snapshots
                .iter()
                .find(|s| &s.source_volume_id == member)
                .expect("a member per source");
            let (_, data) =
                restored_data(&td, &format!("restore-{member}"), &snap.snapshot_id).await;
            assert_eq!(data, want, "restored {member}");
        }

        assert_status(
            delete_group(&td, &group.group_snapshot_id, ids[1..].to_vec()).await,
            Code::InvalidArgument,
            "Delete with a member missing",
        );
        delete_group(&td, &group.group_snapshot_id, ids.clone())
            .await
            .expect("DeleteVolumeGroupSnapshot");
        delete_group(&td, &group.group_snapshot_id, ids)
            .await
            .expect("a repeated delete succeeds");
        delete_group(&td, "kg-000000000000000000000000", vec![])
            .await
            .expect("deleting an unknown group succeeds");
        let left = td
            .controller()
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await
            .expect("ListSnapshots")
            .into_inner()
            .entries;
        assert!(left.is_empty(), "{left:?}");

        release_volume(&td, &db).await;
        release_volume(&td, &log).await;
        td.delete(&idle.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_abandoned_at_any_step_makes_exactly_one_group() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let pauses = Pauses::new();
        let mut opts = pauses.opts("1GiB");
        opts.extra_args = vec!["--freeze-budget".into(), "120s".into()];
        let td = TestDriver::start_with(opts).await;
        let (staged, _) = mounted_volume(&td, "pvc-staged", b"staged").await;
        let idle = td.create("pvc-idle", 16 * MIB, block_cap()).await;
        let mut steps_seen = 0;
        for step in 1..=MAX_STEPS {
            let req = group_req(&format!("group-{step}"), &[&staged, &idle.volume_id]);
            let before = objects(&td);
            let what = format!("CreateVolumeGroupSnapshot held at step {step}");
            let (id, held) = cut_at(&pauses, step, &what, |d| {
                let req = req.clone();
                let td = &td;
                async move { create_group(td, req, d).await.map(|g| g.group_snapshot_id) }
            })
            .await;
            let new = added(&before, &objects(&td));
            assert_eq!(
                new.len(),
                2 * objects_per_snapshot(&td),
                "{what}: objects made {new:?}"
            );
            // Asked again, the same group.
            let again = create_group(&td, req.clone(), Duration::from_secs(60))
                .await
                .unwrap();
            assert_eq!(
                again.group_snapshot_id, id,
                "{what}: a second group for one name"
            );
            for member in member_ids(&again) {
                // Objects are named by the bare ID; the CO's names the node after `@`.
                let bare = member.split('@').next().unwrap_or_default();
                assert!(new.iter().any(|o| o.contains(bare)), "{what}: {new:?}");
            }
            delete_group(&td, &id, member_ids(&again)).await.unwrap();
            assert_eq!(objects(&td), before, "{what}: delete left something");
            if !held {
                break;
            }
            steps_seen = step;
        }
        assert!(
            steps_seen >= 4,
            "CreateVolumeGroupSnapshot has {steps_seen} steps"
        );
        release_volume(&td, &staged).await;
        td.delete(&idle.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_survives_a_driver_restart() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(180, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("512MiB")).await;
        let a = td.create("pvc-a", 16 * MIB, block_cap()).await;
        let b = td.create("pvc-b", 16 * MIB, block_cap()).await;
        let req = group_req("group-1", &[&a.volume_id, &b.volume_id]);
        let group = create_group(&td, req.clone(), Duration::from_secs(60))
            .await
            .expect("CreateVolumeGroupSnapshot");
        td.restart().await;
        let ids = member_ids(&group);
        assert_eq!(
            get_group(&td, &group.group_snapshot_id, ids.clone())
                .await
                .expect("the group after a restart"),
            group
        );
        assert_eq!(
            create_group(&td, req, Duration::from_secs(60))
                .await
                .expect("repeat after a restart"),
            group
        );
        let listed = td
            .controller()
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await
            .expect("ListSnapshots")
            .into_inner()
            .entries;
        assert_eq!(listed.len(), 2);
        for entry in listed {
            assert_eq!(
                entry.snapshot.expect("snapshot").group_snapshot_id,
                group.group_snapshot_id
            );
        }
        delete_group(&td, &group.group_snapshot_id, ids)
            .await
            .expect("DeleteVolumeGroupSnapshot");
        td.delete(&a.volume_id).await;
        td.delete(&b.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_that_fails_leaves_no_member_and_no_frozen_filesystem() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(180, async {
        let mut opts = DriverOpts::sparse("1GiB");
        // No copy of these members fits in a millisecond of freeze.
        opts.extra_args = vec!["--freeze-budget".into(), "1ms".into()];
        let td = TestDriver::start_with(opts).await;
        let data: Vec<u8> = (0..24 * MIB as usize)
            .map(|i| (i * 7 + i / 4096) as u8)
            .collect();
        let (a, a_mount) = mounted_volume(&td, "pvc-a", b"a").await;
        let (b, b_mount) = mounted_volume(&td, "pvc-b", b"b").await;
        write_file(&a_mount.join("big.bin"), &data);
        write_file(&b_mount.join("big.bin"), &data);
        let before = objects(&td);
        let refused = create_group(
            &td,
            group_req("group-1", &[&a, &b]),
            Duration::from_secs(60),
        )
        .await
        .expect_err("a cut longer than the freeze budget");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert!(refused.message().contains("freeze budget"), "{refused:?}");
        assert_eq!(
            objects(&td),
            before,
            "the failed group left {:?}",
            added(&before, &objects(&td))
        );
        // Both workloads write again at once.
        write_file(&a_mount.join("after.txt"), b"not blocked");
        write_file(&b_mount.join("after.txt"), b"not blocked");
        let listed = td
            .controller()
            .list_snapshots(pb::ListSnapshotsRequest::default())
            .await
            .expect("ListSnapshots")
            .into_inner()
            .entries;
        assert!(listed.is_empty(), "{listed:?}");
        release_volume(&td, &a).await;
        release_volume(&td, &b).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_killed_at_any_step_of_a_group_snapshot_leaves_no_partial_group() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let pauses = Pauses::new();
        let mut opts = pauses.opts("1GiB");
        opts.extra_args = vec!["--freeze-budget".into(), "120s".into()];
        let mut td = TestDriver::start_with(opts).await;
        let (staged, mount) = mounted_volume(&td, "pvc-staged", b"staged").await;
        let idle = td.create("pvc-idle", 16 * MIB, block_cap()).await;
        let mut steps_seen = 0;
        for step in 1..=MAX_STEPS {
            let req = group_req(&format!("group-{step}"), &[&staged, &idle.volume_id]);
            let what = format!("driver killed at step {step} of CreateVolumeGroupSnapshot");
            let before = objects(&td);
            pauses.arm(step);
            let mut call = tokio::spawn({
                let mut client = td.client.group.clone();
                let req = req.clone();
                async move { client.create_volume_group_snapshot(req).await }
            });
            let held = loop {
                if pauses.held().is_some() {
                    break true;
                }
                if call.is_finished() {
                    break false;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            if !held {
                pauses.disarm();
                let group = (&mut call)
                    .await
                    .unwrap()
                    .unwrap_or_else(|s| panic!("{what}: {s:?}"))
                    .into_inner()
                    .group_snapshot
                    .expect("a group snapshot");
                delete_group(&td, &group.group_snapshot_id, member_ids(&group))
                    .await
                    .unwrap();
                break;
            }
            td.restart().await;
            pauses.release();
            call.abort();
            // The start-up thawed the member the dead driver left frozen.
            write_file(&mount.join("after.txt"), b"not blocked");
            // Never a part of a group: all of it, or nothing.
            let listed = td
                .controller()
                .list_snapshots(pb::ListSnapshotsRequest::default())
                .await
                .expect("ListSnapshots")
                .into_inner()
                .entries;
            let groups: BTreeSet<String> = listed
                .iter()
                .map(|e| e.snapshot.clone().expect("snapshot").group_snapshot_id)
                .collect();
            assert!(
                listed.is_empty() || (listed.len() == 2 && groups.len() == 1),
                "{what}: {listed:?}"
            );
            // The retry answers with one whole group.
            let group = create_group(&td, req.clone(), Duration::from_secs(60))
                .await
                .unwrap_or_else(|s| panic!("{what}: retry: {s:?}"));
            assert_eq!(
                sources(&group),
                BTreeSet::from([staged.clone(), idle.volume_id.clone()]),
                "{what}"
            );
            delete_group(&td, &group.group_snapshot_id, member_ids(&group))
                .await
                .unwrap();
            assert_eq!(objects(&td), before, "{what}: something was left");
            steps_seen = step;
        }
        assert!(
            steps_seen >= 4,
            "CreateVolumeGroupSnapshot has {steps_seen} steps"
        );
        release_volume(&td, &staged).await;
        td.delete(&idle.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}
