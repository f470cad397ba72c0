//! Concurrent calls: one name gives one volume, the pool is never
//! overcommitted, and different volumes go through their lifecycles side by side.

use std::collections::BTreeSet;
use std::fs;

use crate::common::*;
use futures::future::join_all;
use kennel::csi::pb;
use tonic::Code;

const T: u64 = 240;

fn the_fs_type(path: &std::path::Path) -> String {
    let at = mounts_at(path);
    assert_eq!(at.len(), 1, "{at:#?}");
    at[0].fs_type.clone()
}

fn volumes_in(td: &TestDriver) -> usize {
    td.stored_volumes().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_with_one_name_make_one_volume() {
    with_timeout(T, async {
        for opts in DriverOpts::each_provisioning("512MiB") {
            let td = TestDriver::start_with(opts).await;
            let req = create_req("pvc-race", 32 * MIB, vec![mount_cap("ext4")]);
            let calls = (0..8).map(|_| {
                let c = td.controller();
                let req = req.clone();
                async move {
                    retrying_aborted(|| {
                        let (mut c, req) = (c.clone(), req.clone());
                        async move { c.create_volume(req).await }
                    })
                    .await
                }
            });
            let results = join_all(calls).await;
            let ids: BTreeSet<String> = results
                .into_iter()
                .map(|r| {
                    r.expect("concurrent CreateVolume")
                        .into_inner()
                        .volume
                        .unwrap()
                        .volume_id
                })
                .collect();
            assert_eq!(ids.len(), 1, "one name gave several volumes: {ids:?}");
            let listed = td.list_all().await;
            assert_eq!(listed.len(), 1, "{listed:?}");
            assert_eq!(Some(&listed[0].volume_id), ids.iter().next());
            assert_eq!(volumes_in(&td), 1);
            assert_eq!(td.available_capacity(None).await, 512 * MIB - 32 * MIB);
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_never_overcommit_the_pool() {
    with_timeout(T, async {
        for opts in DriverOpts::each_provisioning("64MiB") {
            let what = opts.label();
            let td = TestDriver::start_with(opts).await;
            let calls = (0..8).map(|i| {
                let mut c = td.controller();
                async move {
                    c.create_volume(create_req(&format!("pvc-{i}"), 16 * MIB, vec![block_cap()]))
                        .await
                }
            });
            let results = join_all(calls).await;
            let mut ok = 0;
            for r in results {
                match r {
                    Ok(_) => ok += 1,
                    Err(s) => assert_eq!(s.code(), Code::ResourceExhausted, "{what}: {s:?}"),
                }
            }
            assert_eq!(
                ok, 4,
                "{what}: a 64 MiB pool holds exactly four 16 MiB volumes"
            );
            let listed = td.list_all().await;
            let total: i64 = listed.iter().map(|v| v.capacity_bytes).sum();
            assert!(
                total <= 64 * MIB,
                "{what}: {total} bytes provisioned in a 64 MiB pool"
            );
            assert_eq!(listed.len(), 4);
            assert_eq!(volumes_in(&td), 4);
            assert_eq!(td.available_capacity(None).await, 0);
        }
    })
    .await
}

async fn lifecycle(td: &TestDriver, i: usize) {
    let block = i % 2 == 1;
    let capability = if block {
        block_cap()
    } else {
        mount_cap("ext4")
    };
    let vol = td
        .create(&format!("pvc-par-{i}"), 32 * MIB, capability.clone())
        .await;
    let id = vol.volume_id.as_str();
    td.stage(id, capability.clone()).await;
    let target = td.publish(id, capability.clone(), false).await;
    let data = pattern(i as u8, 128 * 1024);
    if block {
        write_block(&target, 0, &data);
        assert_eq!(read_block(&target, 0, data.len()), data);
    } else {
        write_file(&target.join("data"), &data);
        assert_eq!(read_file(&target.join("data")), data);
    }
    td.node()
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.to_owned(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats");
    td.unpublish(id, block).await;
    td.unstage(id).await;
    assert!(td.attachments(id).is_empty(), "volume {i}: loop left");
    td.delete(id).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lifecycles_on_different_volumes_all_succeed() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::preallocated("512MiB")).await;
        for round in 0..2 {
            join_all((0..6).map(|i| lifecycle(&td, round * 10 + i))).await;
            assert!(td.list_all().await.is_empty());
            td.assert_no_leaks();
        }
        assert_eq!(td.available_capacity(None).await, 512 * MIB);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_node_calls_on_one_volume_stay_consistent() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        for (name, capability) in [("pvc-fs", mount_cap("ext4")), ("pvc-block", block_cap())] {
            let block = is_block(&capability);
            let vol = td.create(name, 16 * MIB, capability.clone()).await;
            let id = vol.volume_id.as_str();
            fs::create_dir_all(td.staging_path(id)).unwrap();

            let stages = (0..4).map(|_| {
                let n = td.node();
                let req = td.stage_req(id, capability.clone());
                async move {
                    retrying_aborted(|| {
                        let (mut n, req) = (n.clone(), req.clone());
                        async move { n.node_stage_volume(req).await }
                    })
                    .await
                }
            });
            for r in join_all(stages).await {
                r.expect("concurrent NodeStageVolume");
            }
            let staged_at = if block {
                td.staging_path(id).join("device")
            } else {
                td.staging_path(id)
            };
            assert_eq!(
                mounts_at(&staged_at).len(),
                1,
                "{name}: concurrent stages stacked mounts"
            );
            assert_eq!(td.attachments(id).len(), 1, "{name}: several loop devices");

            let publishes = (0..4).map(|_| {
                let n = td.node();
                let req = td.publish_req(id, capability.clone(), false);
                async move {
                    retrying_aborted(|| {
                        let (mut n, req) = (n.clone(), req.clone());
                        async move { n.node_publish_volume(req).await }
                    })
                    .await
                }
            });
            for r in join_all(publishes).await {
                r.expect("concurrent NodePublishVolume");
            }
            let target = td.target_path(id, block);
            assert_eq!(
                mounts_at(&target).len(),
                1,
                "{name}: concurrent publishes stacked mounts"
            );

            let unpublishes = (0..4).map(|_| {
                let n = td.node();
                let req = td.unpublish_req(id, block);
                async move {
                    retrying_aborted(|| {
                        let (mut n, req) = (n.clone(), req.clone());
                        async move { n.node_unpublish_volume(req).await }
                    })
                    .await
                }
            });
            for r in join_all(unpublishes).await {
                r.expect("concurrent NodeUnpublishVolume");
            }
            let unstages = (0..4).map(|_| {
                let n = td.node();
                let req = td.unstage_req(id);
                async move {
                    retrying_aborted(|| {
                        let (mut n, req) = (n.clone(), req.clone());
                        async move { n.node_unstage_volume(req).await }
                    })
                    .await
                }
            });
            for r in join_all(unstages).await {
                r.expect("concurrent NodeUnstageVolume");
            }
            td.assert_no_leaks();
            td.delete(id).await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_volumes_are_served_while_one_is_formatted() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("2GiB")).await;
        // A large xfs volume: its mkfs is the slowest step Kennel has.
        let big = td.create("pvc-big", 1024 * MIB, mount_cap("xfs")).await;
        let small = td.create("pvc-small", 8 * MIB, block_cap()).await;
        fs::create_dir_all(td.staging_path(&big.volume_id)).unwrap();
        let mut node = td.node();
        let big_stage = node.node_stage_volume(td.stage_req(&big.volume_id, mount_cap("xfs")));
        let others = async {
            // Calls on other volumes (and other RPCs) proceed meanwhile.
            for i in 0..3 {
                td.create(&format!("pvc-during-{i}"), 4 * MIB, block_cap())
                    .await;
                td.stage(&small.volume_id, block_cap()).await;
                td.unstage(&small.volume_id).await;
            }
        };
        let (staged, ()) = tokio::join!(big_stage, others);
        staged.expect("stage the big xfs volume");
        assert_eq!(the_fs_type(&td.staging_path(&big.volume_id)), "xfs");
        td.unstage(&big.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}
