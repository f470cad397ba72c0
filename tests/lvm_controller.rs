//! Controller RPCs of `kennel driver --backend lvm` against a real VG.

mod lvm_support;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use kennel::csi::pb;
use lvm_support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn volumes_live_in_tagged_lvs_and_survive_restarts() {
    if !can_run() {
        return;
    }
    with_timeout(240, async {
        let vg = TestVg::new("2G");
        let mut driver = LvmDriver::start(&vg).await;
        let free_before = driver.capacity(BTreeMap::new()).await.unwrap();
        assert!(free_before > GIB, "{free_before}");

        let vol = driver.create(create_req("pvc-a", 100 * MIB, &[])).await;
        assert_eq!(vol.capacity_bytes, 100 * MIB);
        let lv = vg.lv(&vol.volume_id).expect("LV named after the volume");
        assert_eq!(lv.size, 100 << 20);
        assert!(lv.tags.iter().any(|t| t == OWNER_TAG), "{:?}", lv.tags);
        assert!(!lv.tags.iter().any(|t| t == PENDING_TAG), "{:?}", lv.tags);

        // Idempotent by name; a different size is a conflict.
        let again = driver.create(create_req("pvc-a", 100 * MIB, &[])).await;
        assert_eq!(again.volume_id, vol.volume_id);
        assert_code(
            driver
                .controller()
                .create_volume(create_req("pvc-a", 300 * MIB, &[]))
                .await,
            Code::AlreadyExists,
            "same name, other size",
        );
        assert_code(
            driver
                .controller()
                .create_volume(create_req("pvc-a", 100 * MIB, &[("fsType", "xfs")]))
                .await,
            Code::AlreadyExists,
            "same name, other parameters",
        );
        let free_after = driver.capacity(BTreeMap::new()).await.unwrap();
        assert_eq!(free_before - free_after, 100 * MIB);

        // Expansion: lvextend.
        let expanded = driver
            .controller()
            .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                volume_id: vol.volume_id.clone(),
                capacity_range: Some(pb::CapacityRange {
                    required_bytes: 150 * MIB,
                    limit_bytes: 0,
                }),
                ..Default::default()
            })
            .await
            .expect("expand")
            .into_inner();
        assert_eq!(
            expanded.capacity_bytes,
            152 * MIB,
            "rounded to 4MiB extents"
        );
        assert!(expanded.node_expansion_required);
        assert_eq!(vg.lv(&vol.volume_id).unwrap().size, 152 << 20);

        // Everything comes back from the tags after a crash.
        driver.restart().await;
        let listed = driver.list_all().await;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].volume_id, vol.volume_id);
        assert_eq!(listed[0].capacity_bytes, 152 * MIB);
        let got = driver
            .controller()
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            })
            .await
            .expect("ControllerGetVolume")
            .into_inner();
        assert_eq!(got.volume.unwrap().volume_id, vol.volume_id);
        let again = driver.create(create_req("pvc-a", 100 * MIB, &[])).await;
        assert_eq!(again.volume_id, vol.volume_id, "idempotent across restarts");

        let valid = driver
            .controller()
            .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                volume_id: vol.volume_id.clone(),
                volume_capabilities: vec![mount_cap("")],
                ..Default::default()
            })
            .await
            .expect("validate")
            .into_inner();
        assert!(valid.confirmed.is_some(), "{valid:?}");

        driver.delete(&vol.volume_id).await;
        driver.delete(&vol.volume_id).await;
        assert!(vg.lv(&vol.volume_id).is_none());
        assert!(driver.list_all().await.is_empty());
        assert_eq!(driver.capacity(BTreeMap::new()).await.unwrap(), free_before);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn lvs_without_the_kennel_tag_are_never_touched() {
    if !can_run() {
        return;
    }
    with_timeout(120, async {
        let vg = TestVg::new("1G");
        let lookalike = "kv-abcdefghijklmnopqrstuvwx";
        let path = vg.name.clone();
        lvm_ok(
            "lvcreate",
            &["-an", "-Zn", "-y", "-L", "8m", "-n", lookalike, &path],
        );
        lvm_ok(
            "lvcreate",
            &[
                "-an",
                "-Zn",
                "-y",
                "-L",
                "8m",
                "-n",
                "someone-else",
                "--addtag",
                "kennel.csi.dev/n=1",
                &path,
            ],
        );
        let driver = LvmDriver::start(&vg).await;
        assert!(driver.list_all().await.is_empty());
        driver.delete(lookalike).await;
        assert!(vg.lv(lookalike).is_some(), "a foreign LV was removed");
        assert_code(
            driver
                .controller()
                .controller_get_volume(pb::ControllerGetVolumeRequest {
                    volume_id: lookalike.to_owned(),
                })
                .await,
            Code::NotFound,
            "foreign LV is no volume",
        );
        assert_eq!(vg.lvs().len(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_the_right_codes() {
    if !can_run() {
        return;
    }
    with_timeout(180, async {
        let vg = TestVg::new("1G");
        let driver = LvmDriver::start(&vg).await;
        let c = driver.controller();

        assert_code(
            c.clone()
                .create_volume(create_req("too-big", 40 * GIB, &[]))
                .await,
            Code::ResourceExhausted,
            "bigger than the VG",
        );
        for (key, value) in [("stripes", "100000"), ("stripes", "0"), ("stripes", "x")] {
            let msg = assert_code(
                c.clone()
                    .create_volume(create_req("striped", 8 * MIB, &[(key, value)]))
                    .await,
                Code::InvalidArgument,
                "absurd stripes",
            );
            assert!(msg.contains("stripes"), "{msg}");
        }
        let msg = assert_code(
            c.clone()
                .create_volume(create_req("striped", 8 * MIB, &[("stripes", "4")]))
                .await,
            Code::InvalidArgument,
            "more stripes than PVs",
        );
        assert!(
            msg.contains("physical volumes"),
            "lvm2's message is kept: {msg}"
        );
        let msg = assert_code(
            c.clone()
                .create_volume(create_req("typo", 8 * MIB, &[("thinpool", "p")]))
                .await,
            Code::InvalidArgument,
            "unknown parameter",
        );
        assert!(msg.contains("thinpool"), "{msg}");
        let msg = assert_code(
            c.clone()
                .create_volume(create_req("class", 8 * MIB, &[("deviceClass", "nope")]))
                .await,
            Code::InvalidArgument,
            "unknown device class",
        );
        assert!(msg.contains("nope"), "{msg}");
        if !device_mapper() {
            let msg = assert_code(
                c.clone()
                    .create_volume(create_req(
                        "thin",
                        8 * MIB,
                        &[("type", "thin"), ("thinPool", "pool")],
                    ))
                    .await,
                Code::FailedPrecondition,
                "thin without device-mapper",
            );
            assert!(msg.contains("device-mapper"), "{msg}");
        }
        assert_code(
            c.clone()
                .get_capacity(pb::GetCapacityRequest {
                    parameters: [("stripez".to_owned(), "2".to_owned())].into(),
                    ..Default::default()
                })
                .await,
            Code::InvalidArgument,
            "GetCapacity with an unknown parameter",
        );

        // Shell metacharacters in names are data, nothing else.
        let canary = std::env::temp_dir().join(format!("kennel-pwned-{}", std::process::id()));
        let name = format!(
            "pvc-$(touch {0}); `touch {0}` | rm -rf / ; echo \"'",
            canary.display()
        );
        let vol = driver.create(create_req(&name, 8 * MIB, &[])).await;
        let again = driver.create(create_req(&name, 8 * MIB, &[])).await;
        assert_eq!(vol.volume_id, again.volume_id);
        assert!(!canary.exists(), "a name was run by a shell");
        driver.delete(&vol.volume_id).await;

        // Nothing failed half-way.
        assert!(vg.lvs().is_empty(), "{:?}", vg.lvs());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_volume_group_stops_the_driver_at_start() {
    if !can_run() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_kennel"))
        .args([
            "driver",
            "--backend",
            "lvm",
            "--volume-group",
            "kennel-no-such-vg",
            "--node-id",
            "n",
        ])
        .arg("--endpoint")
        .arg(format!("unix://{}/csi.sock", dir.path().display()))
        .arg("--lock-dir")
        .arg(dir.path().join("locks"))
        .output()
        .expect("run driver");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let all = format!("{stdout}{stderr}");
    assert!(all.contains("kennel-no-such-vg"), "{all}");
    assert!(!all.contains("panicked"), "{all}");
    assert!(!dir.path().join("csi.sock").exists());

    let out = Command::new(env!("CARGO_BIN_EXE_kennel"))
        .args(["driver", "--backend", "lvm", "--node-id", "n"])
        .arg("--endpoint")
        .arg(format!("unix://{}/csi.sock", dir.path().display()))
        .output()
        .expect("run driver");
    assert!(!out.status.success());
    let all =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(all.contains("--volume-group"), "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn device_classes_map_to_their_own_vgs() {
    if !can_run() {
        return;
    }
    with_timeout(180, async {
        let fast = TestVg::new("1G");
        let slow = TestVg::new("2G");
        let driver = LvmDriver::start_with(
            vec![format!("fast={}", fast.name), format!("slow={}", slow.name)],
            vec![],
        )
        .await;
        let class = |name: &str| BTreeMap::from([("deviceClass".to_owned(), name.to_owned())]);
        let fast_free = driver.capacity(class("fast")).await.unwrap();
        let slow_free = driver.capacity(class("slow")).await.unwrap();
        assert_eq!(fast_free as u64, fast.free());
        assert_eq!(slow_free as u64, slow.free());
        assert_eq!(
            driver.capacity(BTreeMap::new()).await.unwrap(),
            fast_free,
            "first class is the default"
        );

        let v = driver
            .create(create_req("on-slow", 16 * MIB, &[("deviceClass", "slow")]))
            .await;
        assert!(slow.lv(&v.volume_id).is_some());
        assert!(fast.lv(&v.volume_id).is_none());
        assert_eq!(
            driver.capacity(class("slow")).await.unwrap(),
            slow_free - 16 * MIB
        );
        assert_eq!(driver.capacity(class("fast")).await.unwrap(), fast_free);
        let d = driver.create(create_req("on-default", 16 * MIB, &[])).await;
        assert!(fast.lv(&d.volume_id).is_some());
        assert_eq!(driver.list_all().await.len(), 2);
        driver.delete(&v.volume_id).await;
        driver.delete(&d.volume_id).await;
        assert!(fast.lvs().is_empty() && slow.lvs().is_empty());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshots_and_clones_of_linear_volumes() {
    if !can_run() {
        return;
    }
    with_timeout(240, async {
        let vg = TestVg::new("1G");
        let driver = LvmDriver::start(&vg).await;
        let origin = driver.create(create_req("origin", 32 * MIB, &[])).await;
        let snap = driver.snapshot("snap-1", &origin.volume_id).await;
        assert!(snap.ready_to_use);
        assert_eq!(snap.size_bytes, 32 * MIB);
        assert_eq!(snap.source_volume_id, origin.volume_id);
        let again = driver.snapshot("snap-1", &origin.volume_id).await;
        assert_eq!(again.snapshot_id, snap.snapshot_id);
        // The CO's ID names the node; the LV is the bare ID.
        let (snap_lv, node) = snap.snapshot_id.split_once('@').expect("a node-named ID");
        assert_eq!(node, "lvm-test-node");
        let lv = vg.lv(snap_lv).expect("snapshot LV");
        assert!(lv.tags.iter().any(|t| t == OWNER_TAG));
        assert!(!lv.tags.iter().any(|t| t == PENDING_TAG));

        let listed = driver
            .controller()
            .list_snapshots(pb::ListSnapshotsRequest {
                source_volume_id: origin.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(listed.entries.len(), 1);

        let restored = driver
            .create(from_snapshot(
                create_req("restored", 64 * MIB, &[]),
                &snap.snapshot_id,
            ))
            .await;
        assert_eq!(restored.capacity_bytes, 64 * MIB);
        let clone = driver
            .create(from_volume(
                create_req("clone", MIB, &[]),
                &origin.volume_id,
            ))
            .await;
        assert_eq!(
            clone.capacity_bytes,
            32 * MIB,
            "a clone is at least its source"
        );
        assert_code(
            driver
                .controller()
                .create_volume(from_snapshot(
                    create_req("nothing", 8 * MIB, &[]),
                    "ks-000000000000000000000000",
                ))
                .await,
            Code::NotFound,
            "unknown snapshot",
        );
        // Snapshots are independent copies: deleting the origin keeps them.
        driver.delete(&origin.volume_id).await;
        assert!(vg.lv(snap_lv).is_some());
        driver
            .controller()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
        assert!(vg.lv(snap_lv).is_none());
        driver.delete(&restored.volume_id).await;
        driver.delete(&clone.volume_id).await;
        assert!(vg.lvs().is_empty(), "{:?}", vg.lvs());
    })
    .await;
}
