//! What only device-mapper allows: thin pools, thin volumes and thin
//! snapshots, activation, growth into scattered extents, and that a new LV
//! never shows a deleted volume's bytes. These tests need a kernel with
//! device-mapper; the VM lane (`tests/vm_lane.rs`, `hack/vm/`) runs them in
//! a guest that has one. See `dm_can_run` for what happens elsewhere.

mod lvm_support;
#[path = "common/vm_lane.rs"]
mod vm_lane;

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use kennel::csi::pb;
use lvm_support::*;
use tonic::Code;

/// Whether this test runs here. With device-mapper: yes. Inside the VM lane
/// without it: a failure. On a host without it, the VM lane runs this
/// target: if the lane can run on this host (and so runs in this same
/// `cargo test`), the test says so and passes here; if it cannot, the test
/// cannot run anywhere and fails (or, with `KENNEL_ALLOW_SKIP=1`, skips).
fn dm_can_run() -> bool {
    if !can_run() {
        return false;
    }
    if device_mapper() {
        return true;
    }
    if vm_lane::inside() {
        panic!("the VM lane's guest has no device-mapper (/dev/mapper/control)");
    }
    match vm_lane::unavailable() {
        None => {
            let test = std::thread::current().name().unwrap_or("?").to_owned();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "KENNEL-VM-LANE {test}: no device-mapper here; tests/vm_lane.rs runs it in a VM"
            );
            false
        }
        Some(why) => !skip::cannot_run(&format!(
            "needs device-mapper, and the VM lane that provides it cannot run: {why}"
        )),
    }
}

const POOL: &str = "pool";

/// A thin pool of `size` (an lvm2 size) in `vg`.
fn thin_pool(vg: &TestVg, size: &str) {
    lvm_ok(
        "lvcreate",
        &["-y", "-L", size, "-T", &format!("{}/{POOL}", vg.name)],
    );
}

fn thin_params() -> Vec<(&'static str, &'static str)> {
    vec![("type", "thin"), ("thinPool", POOL)]
}

fn thin_map() -> BTreeMap<String, String> {
    thin_params()
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn lv_active(vg: &TestVg, lv: &str) -> bool {
    vg.lv_field(lv, "lv_active") == "active"
}

/// device-mapper's name for `vg/lv` (each `-` doubled).
fn dm_name(vg: &TestVg, lv: &str) -> String {
    format!("{}-{}", vg.name.replace('-', "--"), lv.replace('-', "--"))
}

/// Whether the kernel has a device-mapper device for `vg/lv`.
fn dm_device_exists(vg: &TestVg, lv: &str) -> bool {
    Command::new("dmsetup")
        .args(["info", &dm_name(vg, lv)])
        .output()
        .expect("dmsetup")
        .status
        .success()
}

fn pool_size(vg: &TestVg) -> u64 {
    vg.lv_field(POOL, "lv_size").parse().expect("pool size")
}

fn block_req(name: &str, bytes: i64, params: &[(&str, &str)]) -> pb::CreateVolumeRequest {
    let mut req = create_req(name, bytes, params);
    req.volume_capabilities = vec![block_cap()];
    req
}

fn fs_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks() as u64 * st.fragment_size() as u64
}

/// Fill the first `bytes` of a block device with `byte`, durably.
fn fill(device: &Path, bytes: u64, byte: u8) {
    let mut f = OpenOptions::new().write(true).open(device).expect("open");
    let chunk = vec![byte; 1 << 20];
    for _ in 0..bytes / chunk.len() as u64 {
        f.write_all(&chunk).expect("write");
    }
    f.sync_all().expect("sync");
}

/// Offsets of the first non-zero bytes in the first `bytes` of a device.
fn non_zero(device: &Path, bytes: u64) -> Option<u64> {
    let mut f = fs::File::open(device).expect("open");
    f.seek(SeekFrom::Start(0)).expect("seek");
    let mut chunk = vec![0u8; 1 << 20];
    let mut at = 0u64;
    while at < bytes {
        let n = f.read(&mut chunk).expect("read");
        if n == 0 {
            break;
        }
        if let Some(i) = chunk[..n].iter().position(|b| *b != 0) {
            return Some(at + i as u64);
        }
        at += n as u64;
    }
    None
}

async fn expand(driver: &LvmDriver, id: &str, bytes: i64, path: &Path) {
    driver
        .controller()
        .controller_expand_volume(pb::ControllerExpandVolumeRequest {
            volume_id: id.to_owned(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| {
            panic!(
                "ControllerExpandVolume {id}: {s:?}\n{}",
                driver.log_tail(30)
            )
        });
    let resp = driver
        .node()
        .node_expand_volume(pb::NodeExpandVolumeRequest {
            volume_id: id.to_owned(),
            volume_path: path.display().to_string(),
            capacity_range: Some(pb::CapacityRange {
                required_bytes: bytes,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("NodeExpandVolume {id}: {s:?}\n{}", driver.log_tail(30)))
        .into_inner();
    assert_eq!(resp.capacity_bytes, bytes);
}

#[tokio::test(flavor = "multi_thread")]
async fn thin_volumes_overprovision_within_the_ratio_and_capacity_is_honest() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(1 << 30);
        thin_pool(&vg, "256m");
        let pool = pool_size(&vg);
        let driver = LvmDriver::start_with_args(
            vec![vg.name.clone()],
            vec![],
            vec!["--thin-overprovision-ratio".into(), "2".into()],
        )
        .await;

        // An empty pool: all of it, physically and by promise.
        assert_eq!(driver.capacity(thin_map()).await.unwrap() as u64, pool);

        // Two thin volumes promising more than the pool holds.
        let a = driver
            .create(block_req("thin-a", 200 * MIB, &thin_params()))
            .await;
        let b = driver
            .create(create_req("thin-b", 200 * MIB, &thin_params()))
            .await;
        for vol in [&a, &b] {
            assert_eq!(vg.lv_field(&vol.volume_id, "segtype"), "thin");
            assert_eq!(vg.lv_field(&vol.volume_id, "pool_lv"), POOL);
            assert_eq!(vol.capacity_bytes, 200 * MIB);
        }
        // What is left to promise: 2 x pool - 400 MiB.
        let promise_left = 2 * pool - 400 * MIB as u64;
        assert_eq!(
            driver.capacity(thin_map()).await.unwrap() as u64,
            promise_left
        );
        // The VG's free space for linear volumes does not count thin promises.
        assert_eq!(
            driver.capacity(BTreeMap::new()).await.unwrap() as u64,
            vg.free()
        );

        // Beyond the ratio: RESOURCE_EXHAUSTED, and nothing created.
        let lvs_before = vg.lvs().len();
        assert_code(
            driver
                .controller()
                .create_volume(create_req("thin-c", 200 * MIB, &thin_params()))
                .await,
            Code::ResourceExhausted,
            "thin volume beyond the overprovision ratio",
        );
        assert_eq!(vg.lvs().len(), lvs_before, "{:#?}", vg.lvs());
        // Nor may a volume grow beyond it.
        assert_code(
            driver
                .controller()
                .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                    volume_id: b.volume_id.clone(),
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: 400 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            Code::ResourceExhausted,
            "thin growth beyond the overprovision ratio",
        );

        // Data written takes physical room: capacity follows the pool's fill.
        driver.stage(&a.volume_id, block_cap()).await;
        let device = driver.publish(&a.volume_id, block_cap()).await;
        fill(&device, 200 << 20, 0x5a);
        let data_percent: f64 = vg.lv_field(POOL, "data_percent").parse().unwrap();
        assert!(data_percent > 70.0, "pool {data_percent}% full");
        let physical_left = driver.capacity(thin_map()).await.unwrap() as u64;
        assert!(
            physical_left < promise_left && physical_left <= pool - (200 << 20) + (1 << 20),
            "capacity {physical_left} with {data_percent}% of a {pool}-byte pool used"
        );

        // Deleting returns both the promise and the blocks.
        driver.unpublish(&a.volume_id, true).await;
        driver.unstage(&a.volume_id).await;
        driver.delete(&a.volume_id).await;
        driver.delete(&b.volume_id).await;
        assert_eq!(driver.capacity(thin_map()).await.unwrap() as u64, pool);
        let names: Vec<String> = vg.lvs().into_iter().map(|lv| lv.name).collect();
        assert_eq!(names, vec![POOL.to_owned()], "only the pool is left");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thin_snapshots_restore_and_clone_old_content_and_outlive_their_origin() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(1 << 30);
        thin_pool(&vg, "512m");
        let driver = LvmDriver::start_with_args(
            vec![vg.name.clone()],
            vec![],
            vec!["--thin-overprovision-ratio".into(), "4".into()],
        )
        .await;
        let origin = driver
            .create(create_req("origin", 64 * MIB, &thin_params()))
            .await;
        let id = origin.volume_id.clone();
        driver.stage(&id, mount_cap("ext4")).await;
        let target = driver.publish(&id, mount_cap("ext4")).await;
        fs::write(target.join("file"), b"version 1").unwrap();

        // A snapshot of the mounted volume is a thin snapshot of its LV.
        let snap = driver.snapshot("snap", &id).await;
        let snap_lv = snapshot_lv(&snap.snapshot_id);
        assert_eq!(vg.lv_field(&snap_lv, "segtype"), "thin");
        assert_eq!(vg.lv_field(&snap_lv, "origin"), id);
        assert_eq!(vg.lv_field(&snap_lv, "pool_lv"), POOL);
        assert!(snap.ready_to_use);
        fs::write(target.join("file"), b"version 2").unwrap();

        // Restore (same size and larger) and clone: thin snapshots again.
        let restored = driver
            .create(from_snapshot(
                create_req("restored", 64 * MIB, &thin_params()),
                &snap.snapshot_id,
            ))
            .await;
        let bigger = driver
            .create(from_snapshot(
                create_req("restored-bigger", 96 * MIB, &thin_params()),
                &snap.snapshot_id,
            ))
            .await;
        let clone = driver
            .create(from_volume(
                create_req("clone", 64 * MIB, &thin_params()),
                &id,
            ))
            .await;
        assert_eq!(bigger.capacity_bytes, 96 * MIB);
        for (vol, from) in [(&restored, &snap_lv), (&bigger, &snap_lv), (&clone, &id)] {
            assert_eq!(vg.lv_field(&vol.volume_id, "segtype"), "thin");
            assert_eq!(vg.lv_field(&vol.volume_id, "origin"), *from);
        }
        assert_eq!(
            vg.lv_field(&bigger.volume_id, "lv_size"),
            (96 * MIB).to_string()
        );
        let read_back = |vol: &pb::Volume| {
            let vol = vol.clone();
            let driver = &driver;
            async move {
                driver.stage(&vol.volume_id, mount_cap("ext4")).await;
                let t = driver.publish(&vol.volume_id, mount_cap("ext4")).await;
                let content = fs::read(t.join("file")).unwrap();
                // Writes to a copy stay there.
                fs::write(t.join("file"), b"changed in a copy").unwrap();
                driver.unpublish(&vol.volume_id, false).await;
                driver.unstage(&vol.volume_id).await;
                content
            }
        };
        assert_eq!(read_back(&restored).await, b"version 1");
        assert_eq!(read_back(&bigger).await, b"version 1");
        // The clone was taken of the mounted volume; data written through
        // its mount must be in the clone (frozen or synced first).
        assert_eq!(read_back(&clone).await, b"version 2");
        assert_eq!(fs::read(target.join("file")).unwrap(), b"version 2");

        // The origin goes; its snapshot stays usable.
        driver.unpublish(&id, false).await;
        driver.unstage(&id).await;
        driver.delete(&id).await;
        assert_eq!(vg.lv_field(&id, "lv_name"), "");
        let late = driver
            .create(from_snapshot(
                create_req("late", 64 * MIB, &thin_params()),
                &snap.snapshot_id,
            ))
            .await;
        assert_eq!(read_back(&late).await, b"version 1");

        for vol in [&restored, &bigger, &clone, &late] {
            driver.delete(&vol.volume_id).await;
        }
        driver
            .controller()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
        let names: Vec<String> = vg.lvs().into_iter().map(|lv| lv.name).collect();
        assert_eq!(names, vec![POOL.to_owned()], "only the pool is left");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn staged_volumes_are_active_and_come_back_after_a_reboot() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(1 << 30);
        thin_pool(&vg, "256m");
        let mut driver = LvmDriver::start(&vg).await;
        let linear = driver.create(create_req("linear", 32 * MIB, &[])).await;
        let thin = driver
            .create(create_req("thin", 32 * MIB, &thin_params()))
            .await;
        let vols = [linear.volume_id.clone(), thin.volume_id.clone()];
        for id in &vols {
            // Active from creation: staging needs no lvm2 command.
            assert!(lv_active(&vg, id), "{id} is active once created");
            assert!(dm_device_exists(&vg, id));
        }
        let mut targets = Vec::new();
        for id in &vols {
            driver.stage(id, mount_cap("ext4")).await;
            let target = driver.publish(id, mount_cap("ext4")).await;
            fs::write(target.join("file"), id.as_bytes()).unwrap();
            assert!(lv_active(&vg, id), "{id} is active while staged");
            assert!(dm_device_exists(&vg, id));
            targets.push(target);
        }

        // A driver restart changes nothing for staged volumes.
        driver.restart().await;
        for (id, target) in vols.iter().zip(&targets) {
            assert!(lv_active(&vg, id), "{id} stays active across a restart");
            assert_eq!(fs::read(target.join("file")).unwrap(), id.as_bytes());
            driver
                .node()
                .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                    volume_id: id.clone(),
                    volume_path: target.display().to_string(),
                    staging_target_path: String::new(),
                })
                .await
                .unwrap_or_else(|s| panic!("NodeGetVolumeStats {id}: {s:?}"));
        }

        // A reboot: mounts gone, every LV inactive, the driver starts again.
        driver.kill();
        let mut mounts = mounts_under(&driver.root);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
        for m in mounts {
            nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH).expect("umount");
        }
        lvm_ok("vgchange", &["-an", &vg.name]);
        for id in &vols {
            assert!(!lv_active(&vg, id));
            assert!(!dm_device_exists(&vg, id));
        }
        driver.restart().await;
        for id in &vols {
            // The driver reactivates its LVs when it starts, before any stage.
            assert!(lv_active(&vg, id), "{id} is active again after the restart");
            assert!(dm_device_exists(&vg, id));
        }
        // The kubelet stages and publishes again; the data is there.
        for id in &vols {
            driver.stage(id, mount_cap("ext4")).await;
            let target = driver.publish(id, mount_cap("ext4")).await;
            assert_eq!(fs::read(target.join("file")).unwrap(), id.as_bytes());
            assert!(lv_active(&vg, id));
        }

        // Delete leaves neither the LV nor a device-mapper device.
        for id in &vols {
            driver.unpublish(id, false).await;
            driver.unstage(id).await;
            driver.delete(id).await;
            assert_eq!(vg.lv_field(id, "lv_name"), "", "{id} removed");
            assert!(!dm_device_exists(&vg, id), "{id} has no dm device left");
        }
        // The pool itself was never touched beyond its use.
        assert_eq!(vg.lv_field(POOL, "lv_name"), POOL);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mounted_volumes_grow_online_into_scattered_extents_and_thin_xfs() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(1 << 30);
        thin_pool(&vg, "128m");
        let driver = LvmDriver::start_with_args(
            vec![vg.name.clone()],
            vec![],
            vec!["--thin-overprovision-ratio".into(), "8".into()],
        )
        .await;

        // Linear ext4, hemmed in by another LV: it grows into extents
        // elsewhere, which only device-mapper can map.
        let linear = driver.create(create_req("linear", 64 * MIB, &[])).await;
        lvm_ok(
            "lvcreate",
            &["-y", "-an", "-Zn", "-L", "16m", "-n", "neighbour", &vg.name],
        );
        // xfs needs 300 MiB; a thin volume promises it without holding it.
        let thin = driver.create(create_req("thin", 320 * MIB, &thin_params())).await;
        let cases = [
            (linear.volume_id.clone(), "ext4", 128 * MIB),
            (thin.volume_id.clone(), "xfs", 512 * MIB),
        ];
        for (id, fs_type, new_size) in &cases {
            driver.stage(id, mount_cap(fs_type)).await;
            let target = driver.publish(id, mount_cap(fs_type)).await;
            fs::write(target.join("file"), b"before growth").unwrap();
            let before = fs_bytes(&target);
            expand(&driver, id, *new_size, &target).await;
            let after = fs_bytes(&target);
            assert!(
                after > before + (*new_size as u64 - before) / 2,
                "{id} ({fs_type}): filesystem {before} -> {after} bytes for a {new_size}-byte volume"
            );
            assert_eq!(fs::read(target.join("file")).unwrap(), b"before growth");
            assert_eq!(vg.lv_field(id, "lv_size"), new_size.to_string());
            driver.unpublish(id, false).await;
            driver.unstage(id).await;
        }
        let segments = lvm_ok(
            "lvs",
            &[
                "--noheadings",
                "--segments",
                "-o",
                "seg_pe_ranges",
                &format!("{}/{}", vg.name, linear.volume_id),
            ],
        );
        assert!(
            segments.lines().filter(|l| !l.trim().is_empty()).count() >= 2,
            "the linear LV grew past its neighbour: {segments}"
        );
        for (id, _, _) in &cases {
            driver.delete(id).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_volume_never_shows_a_deleted_volumes_bytes() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(512 << 20);
        thin_pool(&vg, "128m");
        let driver = LvmDriver::start(&vg).await;
        for (layout, params) in [("linear", vec![]), ("thin", thin_params())] {
            let size = 48 * MIB;
            let old = driver
                .create(block_req(&format!("{layout}-old"), size, &params))
                .await;
            let extents = vg.lv_field(&old.volume_id, "seg_pe_ranges");
            driver.stage(&old.volume_id, block_cap()).await;
            let device = driver.publish(&old.volume_id, block_cap()).await;
            fill(&device, size as u64, 0xa5);
            driver.unpublish(&old.volume_id, true).await;
            driver.unstage(&old.volume_id).await;
            driver.delete(&old.volume_id).await;

            let new = driver
                .create(block_req(&format!("{layout}-new"), size, &params))
                .await;
            if layout == "linear" {
                // Same extents, or the test would prove nothing.
                assert_eq!(vg.lv_field(&new.volume_id, "seg_pe_ranges"), extents);
            }
            driver.stage(&new.volume_id, block_cap()).await;
            let device = driver.publish(&new.volume_id, block_cap()).await;
            assert_eq!(
                non_zero(&device, size as u64),
                None,
                "a new {layout} volume shows a deleted volume's bytes"
            );
            driver.unpublish(&new.volume_id, true).await;
            driver.unstage(&new.volume_id).await;
            driver.delete(&new.volume_id).await;
        }
    })
    .await;
}

/// A stage that ends at once (a block volume) and the device's first
/// non-zero byte, if any.
async fn first_non_zero(driver: &LvmDriver, id: &str, bytes: u64) -> Option<u64> {
    driver.stage(id, block_cap()).await;
    let device = driver.publish(id, block_cap()).await;
    let found = non_zero(&device, bytes);
    driver.unpublish(id, true).await;
    driver.unstage(id).await;
    found
}

/// Fill all of the VG's free space with new Block volumes of `size` (at least `at_least` of
/// them) and check that each reads as zeros: no deleted tenant's byte is left in free space.
async fn assert_free_space_reads_zeros(driver: &LvmDriver, size: i64, at_least: usize) {
    let mut made = Vec::new();
    loop {
        let req = block_req(&format!("next-{}", made.len()), size, &[]);
        match driver.controller().create_volume(req).await {
            Ok(resp) => made.push(resp.into_inner().volume.expect("volume").volume_id),
            Err(s) if s.code() == Code::ResourceExhausted => break,
            Err(s) => panic!("CreateVolume: {s:?}\n{}", driver.log_tail(30)),
        }
    }
    assert!(
        made.len() >= at_least,
        "the freed space holds {at_least} volumes: {made:?}"
    );
    for next in &made {
        assert_eq!(
            first_non_zero(driver, next, size as u64).await,
            None,
            "{next} shows a deleted tenant's bytes"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_reboot_deleted_volumes_snapshots_and_half_built_clones_return_zeroed() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        const SIZE: i64 = 32 * MIB;
        let vg = TestVg::with_capacity(256 << 20);
        let mut driver = LvmDriver::start(&vg).await;

        // A tenant's volume full of a pattern, and a full copy of it.
        let id = driver
            .create(block_req("tenant", SIZE, &[]))
            .await
            .volume_id;
        driver.stage(&id, block_cap()).await;
        let device = driver.publish(&id, block_cap()).await;
        fill(&device, SIZE as u64, 0xa5);
        driver.unpublish(&id, true).await;
        driver.unstage(&id).await;
        let snap = driver.snapshot("tenant-snap", &id).await.snapshot_id;
        assert_eq!(
            vg.lv_field(&snapshot_lv(&snap), "segtype"),
            "linear",
            "a full copy"
        );

        // A clone left half-built: the driver dies after its copy (step 2),
        // before the pending tag goes.
        driver
            .restart_with(vec![(
                kennel::backend::lvm::cli::ABORT_AFTER_STEP_ENV.to_owned(),
                "2".to_owned(),
            )])
            .await;
        let call = driver
            .controller()
            .create_volume(from_volume(block_req("half", SIZE, &[]), &id))
            .await;
        assert!(call.is_err(), "{call:?}");
        assert!(driver.wait_exit(20).is_some(), "the driver died mid-clone");
        let half: Vec<String> = vg
            .lvs()
            .into_iter()
            .filter(|lv| lv.tags.iter().any(|t| t == PENDING_TAG))
            .map(|lv| lv.name)
            .collect();
        assert_eq!(half.len(), 1, "one half-built clone: {:#?}", vg.lvs());

        // A reboot: every LV inactive; then the driver starts again.
        lvm_ok("vgchange", &["-an", &vg.name]);
        for lv in [&id, &snap, &half[0]] {
            assert!(!lv_active(&vg, lv), "{lv} inactive after the reboot");
        }
        driver.restart().await;
        assert_eq!(
            vg.lv_field(&half[0], "lv_name"),
            "",
            "the half-built clone is swept"
        );
        assert!(
            lv_active(&vg, &snapshot_lv(&snap)),
            "the full-copy snapshot is active again"
        );

        // The tenant leaves.
        driver
            .controller()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
        driver.delete(&id).await;
        assert!(vg.lvs().is_empty(), "{:#?}", vg.lvs());

        // The next tenants, in all of the freed space, read zeros.
        assert_free_space_reads_zeros(&driver, SIZE, 3).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thin_pool_that_does_not_zero_new_blocks_is_refused() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(256 << 20);
        lvm_ok(
            "lvcreate",
            &[
                "-y",
                "-Zn",
                "-L",
                "64m",
                "-T",
                &format!("{}/{POOL}", vg.name),
            ],
        );
        let driver = LvmDriver::start(&vg).await;
        let msg = assert_code(
            driver
                .controller()
                .create_volume(block_req("thin", 16 * MIB, &thin_params()))
                .await,
            Code::FailedPrecondition,
            "a thin pool made with -Zn",
        );
        assert!(msg.contains(POOL) && msg.contains("-Zn"), "{msg}");
        assert_eq!(vg.lvs().len(), 1, "nothing created: {:#?}", vg.lvs());

        // Once the pool zeroes, it is used (no restart needed).
        lvm_ok("lvchange", &["-Zy", &format!("{}/{POOL}", vg.name)]);
        let vol = driver
            .create(block_req("thin", 16 * MIB, &thin_params()))
            .await;
        assert_eq!(vg.lv_field(&vol.volume_id, "pool_lv"), POOL);
        driver.delete(&vol.volume_id).await;
    })
    .await;
}

/// A device-mapper device squatting an LV's name, so lvm2 cannot activate
/// the LV; removed when dropped.
struct Squatter(String);

impl Squatter {
    fn new(vg: &TestVg, lv: &str) -> Squatter {
        let squatter = Squatter(dm_name(vg, lv));
        // The `error` target is built into device-mapper (no module to load).
        let out = Command::new("dmsetup")
            .args(["create", &squatter.0, "--table", "0 2048 error"])
            .output()
            .expect("dmsetup");
        assert!(
            out.status.success(),
            "dmsetup create {}: {out:?}",
            squatter.0
        );
        squatter
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = Command::new("dmsetup").args(["remove", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_lv_that_cannot_be_activated_makes_its_volume_unhealthy_not_the_driver() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(256 << 20);
        let mut driver = LvmDriver::start(&vg).await;
        let good = driver
            .create(block_req("good", 16 * MIB, &[]))
            .await
            .volume_id;
        let bad = driver
            .create(block_req("bad", 16 * MIB, &[]))
            .await
            .volume_id;

        // A reboot, after which one LV cannot be activated.
        driver.kill();
        lvm_ok("vgchange", &["-an", &vg.name]);
        let squatter = Squatter::new(&vg, &bad);
        driver.restart().await;

        // The driver serves the healthy volume.
        assert!(lv_active(&vg, &good));
        assert!(!driver.condition(&good).await.abnormal);
        driver.stage(&good, block_cap()).await;
        driver.unstage(&good).await;

        // The other one reports why, and its calls fail naming it.
        let bad_condition = driver.condition(&bad).await;
        assert!(bad_condition.abnormal, "{bad_condition:?}");
        assert!(
            bad_condition.message.contains(&bad)
                && bad_condition.message.contains("cannot be activated"),
            "{bad_condition:?}"
        );
        driver
            .assert_condition_metric(&bad, &bad_condition.message)
            .await;
        let staging = driver.staging_path(&bad);
        fs::create_dir_all(&staging).unwrap();
        let status = driver
            .node()
            .node_stage_volume(pb::NodeStageVolumeRequest {
                volume_id: bad.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(block_cap()),
                ..Default::default()
            })
            .await
            .expect_err("NodeStageVolume of an LV that cannot be activated");
        assert!(status.message().contains(&bad), "{status:?}");
        // Nor is it removed unzeroed.
        let status = driver
            .controller()
            .delete_volume(pb::DeleteVolumeRequest {
                volume_id: bad.clone(),
                ..Default::default()
            })
            .await
            .expect_err("DeleteVolume of an LV that cannot be zeroed");
        assert!(status.message().contains(&bad), "{status:?}");
        assert_eq!(vg.lv_field(&bad, "lv_name"), bad, "the LV stays");

        // Once it can be activated, it is used again without a restart.
        drop(squatter);
        driver.stage(&bad, block_cap()).await;
        assert!(lv_active(&vg, &bad));
        assert!(!driver.condition(&bad).await.abnormal);
        driver.unstage(&bad).await;
        driver.delete(&bad).await;
        driver.delete(&good).await;
    })
    .await;
}

/// The driver with a fast index refresh, for faults made by hand.
async fn watching_driver(vg: &TestVg) -> LvmDriver {
    LvmDriver::start_with_args(
        vec![vg.name.clone()],
        vec![],
        vec!["--lvm-refresh-seconds".into(), "1".into()],
    )
    .await
}

/// An LV deactivated behind the driver's back is an abnormal volume whose
/// message says how to bring it back; once active again it is healthy.
#[tokio::test(flavor = "multi_thread")]
async fn an_inactive_lv_is_abnormal_until_activated() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(256 << 20);
        let driver = watching_driver(&vg).await;
        let id = driver
            .create(create_req("inactive", 16 * MIB, &[]))
            .await
            .volume_id;
        assert!(!driver.condition(&id).await.abnormal);
        let name = format!("{}/{id}", vg.name);
        lvm_ok("lvchange", &["-an", &name]);
        let condition = driver.abnormal_condition(&id, 30).await;
        assert!(
            condition.message.contains(&format!("{name} is inactive"))
                && condition.message.contains(&format!("lvchange -ay {name}")),
            "{condition:?}"
        );
        driver
            .assert_condition_metric(&id, &condition.message)
            .await;
        lvm_ok("lvchange", &["-ay", &name]);
        let deadline =
            std::time::Instant::now() + std::time::Duration::from_secs(30 * timeout_scale());
        while driver.condition(&id).await.abnormal {
            assert!(
                std::time::Instant::now() < deadline,
                "still abnormal once active"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        driver.delete(&id).await;
    })
    .await;
}

/// A thin pool that ran out of data space makes its volumes abnormal, in
/// ListVolumes, ControllerGetVolume and NodeGetVolumeStats alike.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_thin_pool_makes_its_volumes_abnormal() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::with_capacity(256 << 20);
        thin_pool(&vg, "8m");
        // Fail writes at once when full instead of queueing them for 60 s.
        lvm_ok(
            "lvchange",
            &["--errorwhenfull", "y", &format!("{}/{POOL}", vg.name)],
        );
        let driver = LvmDriver::start_with_args(
            vec![vg.name.clone()],
            vec![],
            vec![
                "--lvm-refresh-seconds".into(),
                "1".into(),
                "--thin-overprovision-ratio".into(),
                "10".into(),
            ],
        )
        .await;
        let id = driver
            .create(block_req("thin-full", 32 * MIB, &thin_params()))
            .await
            .volume_id;
        assert!(!driver.condition(&id).await.abnormal);
        driver.stage(&id, block_cap()).await;
        let target = driver.publish(&id, block_cap()).await;
        // More than the pool holds: the writes past its end fail.
        let filled = std::panic::catch_unwind(|| fill(&target, 16 << 20, 0xab));
        assert!(filled.is_err(), "16 MiB fit in an 8 MiB pool");
        let condition = driver.abnormal_condition(&id, 30).await;
        let pool = format!("{}/{POOL}", vg.name);
        assert!(
            condition
                .message
                .contains(&format!("thin pool {pool} is out of data space")),
            "{condition:?}"
        );
        let stats = driver
            .node()
            .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                volume_id: id.clone(),
                volume_path: target.display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .expect("NodeGetVolumeStats")
            .into_inner();
        assert_eq!(stats.volume_condition, Some(condition.clone()));
        driver
            .assert_condition_metric(&id, &condition.message)
            .await;
        driver.unpublish(&id, true).await;
        driver.unstage(&id).await;
        driver.delete(&id).await;
    })
    .await;
}

/// A workload on a mounted volume: writes 4 KiB and syncs, over and over,
/// until stopped. The longest single write is how long it was held.
struct Workload {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<(std::time::Duration, u64)>>,
}

impl Workload {
    fn start(path: std::path::PathBuf) -> Workload {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut f = fs::File::create(&path).expect("workload file");
            let block = vec![0x77u8; 4096];
            let (mut longest, mut writes) = (std::time::Duration::ZERO, 0u64);
            while !stopped.load(Ordering::Relaxed) {
                let began = std::time::Instant::now();
                f.write_all(&block).expect("workload write");
                f.sync_data().expect("workload sync");
                longest = longest.max(began.elapsed());
                writes += 1;
            }
            (longest, writes)
        });
        Workload {
            stop,
            thread: Some(thread),
        }
    }

    /// The longest write and how many writes were made.
    fn stop(mut self) -> (std::time::Duration, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("workload thread")
    }
}

fn views_left(vg: &TestVg) -> Vec<String> {
    vg.lvs()
        .into_iter()
        .map(|lv| lv.name)
        .filter(|name| name.ends_with(".cow"))
        .collect()
}

/// Sizes of the in-use volumes snapshotted: 64 MiB, or `KENNEL_VIEW_SIZES_MIB`
/// (e.g. `64,4096`) for a measurement of larger ones.
fn view_sizes() -> Vec<i64> {
    std::env::var("KENNEL_VIEW_SIZES_MIB")
        .ok()
        .map(|raw| {
            raw.split(',')
                .map(|s| s.trim().parse::<i64>().expect("KENNEL_VIEW_SIZES_MIB") * MIB)
                .collect()
        })
        .unwrap_or_else(|| vec![64 * MIB])
}

#[tokio::test(flavor = "multi_thread")]
async fn in_use_linear_volumes_are_copied_from_a_point_in_time_view() {
    if !dm_can_run() {
        return;
    }
    with_timeout(1800, async {
        for size in view_sizes() {
            let vg = TestVg::with_capacity(5 * size as u64 + (256 << 20));
            // A freeze budget no full copy fits in: only the view lets these calls succeed.
            let driver = LvmDriver::start_with_args(
                vec![vg.name.clone()],
                vec![],
                vec!["--freeze-budget".into(), "1ms".into()],
            )
            .await;
            let id = driver.create(create_req("in-use", size, &[])).await.volume_id;
            driver.stage(&id, mount_cap("ext4")).await;
            let target = driver.publish(&id, mount_cap("ext4")).await;
            // Half the volume in data, and a last write still in the page cache: the
            // view must show it (lvm2 freezes the filesystem while it takes the view).
            let bulk_len = (size / 2).min(256 * MIB) as usize;
            let bulk: Vec<u8> = (0..bulk_len).map(|i| (i % 251) as u8).collect();
            fs::write(target.join("bulk"), &bulk).unwrap();
            fs::write(target.join("hello.txt"), b"written before the snapshot").unwrap();

            let workload = Workload::start(target.join("log"));
            let began = std::time::Instant::now();
            let snap = driver.snapshot("view", &id).await.snapshot_id;
            let call = began.elapsed();
            let began = std::time::Instant::now();
            let clone = driver
                .create(from_volume(create_req("clone", size, &[]), &id))
                .await
                .volume_id;
            let clone_call = began.elapsed();
            let (longest, writes) = workload.stop();
            for line in driver.log_tail(400).lines() {
                if line.contains("point-in-time view taken") {
                    println!("{line}");
                }
            }
            println!(
                "in-use {} MiB volume: CreateSnapshot {call:?}, clone {clone_call:?}; the workload made {writes} synced writes meanwhile, the longest {longest:?}",
                size / MIB
            );
            assert!(views_left(&vg).is_empty(), "views left: {:#?}", vg.lvs());
            assert_eq!(vg.lv_field(&snapshot_lv(&snap), "segtype"), "linear", "a full copy");
            assert_eq!(vg.lv_field(&id, "origin"), "", "the volume is no origin any more");

            // Both copies hold the volume as it was when each was taken.
            let restored = driver
                .create(from_snapshot(create_req("restored", size, &[]), &snap))
                .await
                .volume_id;
            for copy in [&restored, &clone] {
                driver.stage(copy, mount_cap("ext4")).await;
                let at = driver.publish(copy, mount_cap("ext4")).await;
                assert_eq!(
                    fs::read(at.join("hello.txt")).unwrap(),
                    b"written before the snapshot"
                );
                assert!(fs::read(at.join("bulk")).unwrap() == bulk, "{copy}: bulk differs");
                driver.unpublish(copy, false).await;
                driver.unstage(copy).await;
                driver.delete(copy).await;
            }
            driver.unpublish(&id, false).await;
            driver.unstage(&id).await;
            driver
                .controller()
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: snap.clone(),
                    ..Default::default()
                })
                .await
                .expect("DeleteSnapshot");
            driver.delete(&id).await;
            assert!(vg.lvs().is_empty(), "{:#?}", vg.lvs());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_view_left_by_a_crash_is_split_zeroed_and_removed() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        const SIZE: i64 = 32 * MIB;
        let vg = TestVg::with_capacity(256 << 20);
        let mut driver = LvmDriver::start(&vg).await;
        let id = driver
            .create(block_req("tenant", SIZE, &[]))
            .await
            .volume_id;
        driver.stage(&id, block_cap()).await;
        let device = driver.publish(&id, block_cap()).await;
        fill(&device, SIZE as u64, 0xa5);

        // The driver dies once the view is taken (step 2: the snapshot's LV, then the view).
        driver
            .restart_with(vec![(
                kennel::backend::lvm::cli::ABORT_AFTER_STEP_ENV.to_owned(),
                "2".to_owned(),
            )])
            .await;
        let call = driver
            .controller()
            .create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: id.clone(),
                name: "interrupted".into(),
                ..Default::default()
            })
            .await;
        assert!(call.is_err(), "{call:?}");
        assert!(
            driver.wait_exit(20).is_some(),
            "the driver died mid-snapshot"
        );
        let views = views_left(&vg);
        assert_eq!(views.len(), 1, "one view left: {:#?}", vg.lvs());
        assert_eq!(vg.lv_field(&views[0], "origin"), id);

        // The tenant keeps writing: every old block moves into the view's store.
        fill(&device, SIZE as u64, 0x5a);
        driver.restart().await;
        assert!(
            views_left(&vg).is_empty(),
            "the view is swept: {:#?}",
            vg.lvs()
        );
        let lvs = vg.lvs();
        assert!(
            lvs.len() == 1 && lvs[0].name == id,
            "only the volume is left: {lvs:#?}"
        );
        let mut head = vec![0u8; 1 << 20];
        fs::File::open(&device)
            .unwrap()
            .read_exact(&mut head)
            .unwrap();
        assert!(head.iter().all(|b| *b == 0x5a), "the volume keeps its data");

        driver.unpublish(&id, true).await;
        driver.unstage(&id).await;
        driver.delete(&id).await;
        // The next tenants, in all of the freed space, read zeros: neither the
        // volume's bytes nor the old ones its view held.
        assert_free_space_reads_zeros(&driver, SIZE, 5).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_room_for_a_view_an_in_use_volume_is_copied_under_a_freeze() {
    if !dm_can_run() {
        return;
    }
    with_timeout(600, async {
        // Room for the volume and its copy, not for a view of the volume as well.
        let vg = TestVg::with_capacity(192 << 20);
        let driver = LvmDriver::start(&vg).await;
        let id = driver
            .create(create_req("in-use", 64 * MIB, &[]))
            .await
            .volume_id;
        driver.stage(&id, mount_cap("ext4")).await;
        let target = driver.publish(&id, mount_cap("ext4")).await;
        fs::write(target.join("hello.txt"), b"frozen and copied").unwrap();
        let snap = driver.snapshot("no-room", &id).await.snapshot_id;
        assert!(
            !driver.log_tail(400).contains("point-in-time view taken"),
            "no view fits in this VG"
        );
        assert!(views_left(&vg).is_empty(), "{:#?}", vg.lvs());
        driver.unpublish(&id, false).await;
        driver.unstage(&id).await;
        driver.delete(&id).await;
        let restored = driver
            .create(from_snapshot(create_req("restored", 64 * MIB, &[]), &snap))
            .await
            .volume_id;
        driver.stage(&restored, mount_cap("ext4")).await;
        let at = driver.publish(&restored, mount_cap("ext4")).await;
        assert_eq!(
            fs::read(at.join("hello.txt")).unwrap(),
            b"frozen and copied"
        );
        driver.unpublish(&restored, false).await;
        driver.unstage(&restored).await;
        driver.delete(&restored).await;
    })
    .await;
}
