//! The LVM backend's in-memory index: a volume's life costs one `lvcreate`
//! and one `lvremove`, reads cost no lvm2 command, a restart rebuilds the
//! same index, and LVs changed behind the driver's back are reported, never
//! fatal. Also: a new LV never shows a deleted volume's bytes.

mod lvm_support;

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use kennel::backend::lvm::params::DeviceClass;
use kennel::backend::lvm::{Activation, LvmBackend, LvmConfig};
use kennel::backend::{Backend, VolumeRecord};
use kennel::csi::pb;
use kennel::model::io_limits::IoLimits;
use kennel::model::volume_size::CapacityRange;
use kennel::model::VolumeId;
use lvm_support::*;

fn counts(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// One lifecycle, counting lvm2 commands per step.
async fn lifecycle_counts(
    driver: &LvmDriver,
    name: &str,
    params: &[(&str, &str)],
    cap: pb::VolumeCapability,
) {
    let block = matches!(
        cap.access_type,
        Some(pb::volume_capability::AccessType::Block(_))
    );
    let mut req = create_req(name, 64 * MIB, params);
    req.volume_capabilities = vec![cap.clone()];
    let (volume, created) = driver.lvm_commands_during(driver.create(req)).await;
    assert_eq!(created, counts(&[("lvcreate", 1)]), "CreateVolume");
    let id = volume.volume_id.clone();

    let (_, staged) = driver
        .lvm_commands_during(async {
            driver.stage(&id, cap.clone()).await;
            driver.publish(&id, cap.clone()).await
        })
        .await;
    assert_eq!(staged, counts(&[]), "stage and publish");

    let (_, reads) = driver
        .lvm_commands_during(async {
            let target = driver.target_path(&id, block);
            for _ in 0..3 {
                driver
                    .node()
                    .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
                        volume_id: id.clone(),
                        volume_path: target.display().to_string(),
                        staging_target_path: String::new(),
                    })
                    .await
                    .expect("NodeGetVolumeStats");
            }
            assert!(driver.list_all().await.iter().any(|v| v.volume_id == id));
            driver
                .controller()
                .controller_get_volume(pb::ControllerGetVolumeRequest {
                    volume_id: id.clone(),
                })
                .await
                .expect("ControllerGetVolume");
            driver
                .controller()
                .validate_volume_capabilities(pb::ValidateVolumeCapabilitiesRequest {
                    volume_id: id.clone(),
                    volume_capabilities: vec![cap.clone()],
                    ..Default::default()
                })
                .await
                .expect("ValidateVolumeCapabilities");
            driver.capacity(BTreeMap::new()).await.expect("GetCapacity");
        })
        .await;
    assert_eq!(
        reads,
        counts(&[]),
        "stats, listing, get, validate and capacity read the index"
    );

    let (_, torn_down) = driver
        .lvm_commands_during(async {
            driver.unpublish(&id, block).await;
            driver.unstage(&id).await;
            driver.delete(&id).await;
        })
        .await;
    assert_eq!(torn_down, counts(&[("lvremove", 1)]), "teardown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lifecycle_costs_one_lvcreate_and_one_lvremove() {
    if !can_run() {
        return;
    }
    with_timeout(240, async {
        let vg = TestVg::new("1G");
        let driver = LvmDriver::start(&vg).await;
        lifecycle_counts(&driver, "counted-block", &[], block_cap()).await;
        lifecycle_counts(&driver, "counted-fs", &[], mount_cap("ext4")).await;
        assert!(vg.lvs().is_empty(), "{:?}", vg.lvs());
        if device_mapper() {
            // Thin volumes keep the promise too (only device-mapper has them).
            lvm_ok(
                "lvcreate",
                &["-y", "-L", "256m", "-T", &format!("{}/pool", vg.name)],
            );
            let thin = [("type", "thin"), ("thinPool", "pool")];
            // A pool made after the driver started is found on first use.
            let thin_class: BTreeMap<String, String> = thin
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let (room, asked) = driver
                .lvm_commands_during(driver.capacity(thin_class))
                .await;
            assert_eq!(room.expect("GetCapacity of the new pool"), 256 * MIB);
            assert_eq!(asked, counts(&[("lvs", 2)]), "find the pool, read its fill");
            lifecycle_counts(&driver, "counted-thin-block", &thin, block_cap()).await;
            lifecycle_counts(&driver, "counted-thin-fs", &thin, mount_cap("ext4")).await;
            let left: Vec<String> = vg.lvs().into_iter().map(|lv| lv.name).collect();
            assert_eq!(left, vec!["pool".to_owned()]);
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_volume_never_shows_a_deleted_volumes_bytes() {
    if !can_run() {
        return;
    }
    with_timeout(240, async {
        let vg = TestVg::new("1G");
        let driver = LvmDriver::start(&vg).await;
        let size = 16 * MIB;
        let pattern: Vec<u8> = (0..size as usize).map(|i| (i % 251) as u8 | 1).collect();

        let mut req = create_req("tenant-a", size, &[]);
        req.volume_capabilities = vec![block_cap()];
        let a = driver.create(req).await.volume_id;
        let a_offset = vg.lv_offset(&a).expect("contiguous LV");
        driver.stage(&a, block_cap()).await;
        let dev = driver.publish(&a, block_cap()).await;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&dev)
            .expect("open the published device");
        file.write_all_at(&pattern, 0).expect("write a pattern");
        file.sync_all().expect("sync");
        drop(file);
        driver.unpublish(&a, true).await;
        driver.unstage(&a).await;
        driver.delete(&a).await;

        let mut req = create_req("tenant-b", size, &[]);
        req.volume_capabilities = vec![block_cap()];
        let b = driver.create(req).await.volume_id;
        assert_eq!(
            vg.lv_offset(&b),
            Some(a_offset),
            "the new volume reuses the deleted one's extents"
        );
        driver.stage(&b, block_cap()).await;
        let dev = driver.publish(&b, block_cap()).await;
        let mut seen = vec![0xffu8; size as usize];
        std::fs::File::open(&dev)
            .expect("open the new volume")
            .read_exact_at(&mut seen, 0)
            .expect("read it whole");
        let leaked = seen.iter().filter(|&&b| b != 0).count();
        assert_eq!(
            leaked, 0,
            "{leaked} bytes of the deleted volume are readable"
        );
        driver.unpublish(&b, true).await;
        driver.unstage(&b).await;
        driver.delete(&b).await;
    })
    .await;
}

fn config(vg: &TestVg, locks: &std::path::Path, refresh: Duration) -> LvmConfig {
    LvmConfig {
        classes: vec![DeviceClass::parse(&vg.name).expect("VG name")],
        activation: Activation::Auto,
        thin_overprovision_ratio: 1.0,
        lock_dir: locks.to_owned(),
        refresh_interval: refresh,
    }
}

fn record(name: &str, bytes: u64) -> VolumeRecord {
    VolumeRecord {
        id: VolumeId::generate(),
        name: name.to_owned(),
        capacity_bytes: bytes,
        requested: CapacityRange {
            required: bytes,
            limit: 0,
        },
        capabilities: vec![],
        params: Default::default(),
        node_id: "index-test".into(),
        machine_id: "m".into(),
        created_unix: 1,
        source: None,
    }
}

#[test]
fn a_restart_rebuilds_the_same_index() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let backend = LvmBackend::open(config(&vg, locks.path(), Duration::from_secs(3600)))
        .expect("open the backend");
    // Holes and neighbours: create five, delete two in the middle, grow one.
    let records: Vec<VolumeRecord> = (0..5)
        .map(|i| record(&format!("pvc-{i}"), (8 + 4 * i) << 20))
        .collect();
    for r in &records {
        backend.create(r).expect("create");
    }
    backend.delete(&records[1].id).expect("delete");
    backend.delete(&records[3].id).expect("delete");
    backend.expand(&records[4].id, 40 << 20).expect("expand");
    backend
        .create(&record("pvc-5", 4 << 20))
        .expect("create into a hole");
    let kept = backend.index_view();
    assert_eq!(
        kept,
        backend.fresh_index_view().expect("load"),
        "the index kept by the driver matches lvm2"
    );
    let listed = backend.list().expect("list");
    drop(backend);

    let again = LvmBackend::open(config(&vg, locks.path(), Duration::from_secs(3600)))
        .expect("reopen the backend");
    assert_eq!(
        again.index_view(),
        kept,
        "a restart rebuilds the same index"
    );
    assert_eq!(again.list().expect("list"), listed);
}

#[test]
fn an_lv_removed_by_hand_is_reported_not_fatal() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let backend = LvmBackend::open(config(&vg, locks.path(), Duration::from_millis(200)))
        .expect("open the backend");
    let gone = record("pvc-gone", 8 << 20);
    let kept = record("pvc-kept", 8 << 20);
    backend.create(&gone).expect("create");
    backend.create(&kept).expect("create");
    assert_eq!(backend.health(&gone), None);
    lvm_ok("lvremove", &["-y", &format!("{}/{}", vg.name, gone.id)]);

    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        if let Some(why) = backend.health(&gone) {
            break why;
        }
        assert!(Instant::now() < deadline, "the refresh never noticed");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(why.contains("missing"), "{why}");
    assert_eq!(backend.health(&kept), None);
    let ids: Vec<VolumeId> = backend
        .list()
        .expect("listing still works")
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert!(ids.contains(&gone.id) && ids.contains(&kept.id), "{ids:?}");
    match backend.attach(&gone.id) {
        Err(kennel::error::Error::Precondition(msg)) => assert!(msg.contains("missing"), "{msg}"),
        other => panic!("attach of a removed LV: {other:?}"),
    }
    backend.delete(&gone.id).expect("deleting it is fine");
    assert_eq!(backend.get(&gone.id).expect("get"), None);
    assert!(backend.get(&kept.id).expect("get").is_some());
}

/// Tags as the driver wrote them before its compact format (hex of the
/// record's JSON), for volume `kv-3f9a0c2b7d1e4f5a6b8c9d0e`.
const LEGACY_TAGS: [&str; 15] = [
    "kennel.csi.dev",
    "kennel.csi.dev/n=13",
    "kennel.csi.dev/r0=7b226964223a226b762d336639613063326237643165346635613662386339643065222c226e616d65223a227076632d",
    "kennel.csi.dev/r1=38663065336332612d316232632d346435652d396630302d313233343536373839616263222c2263617061636974795f",
    "kennel.csi.dev/r2=6279746573223a313037333734313832342c22726571756573746564223a7b227265717569726564223a313037333734",
    "kennel.csi.dev/r3=313832342c226c696d6974223a307d2c226361706162696c6974696573223a5b7b226163636573735f74797065223a7b",
    "kennel.csi.dev/r4=226b696e64223a226d6f756e74222c2266735f74797065223a2265787434222c226d6f756e745f666c616773223a5b22",
    "kennel.csi.dev/r5=6e6f6174696d65225d7d2c226163636573735f6d6f6465223a2253696e676c654e6f6465577269746572227d5d2c2270",
    "kennel.csi.dev/r6=6172616d73223a7b226d6b66735f64697363617264223a66616c73652c227076635f6e616d65223a22646174612d7765",
    "kennel.csi.dev/r7=622d30222c227076635f6e616d657370616365223a2264656661756c74222c2270765f6e616d65223a227076632d3866",
    "kennel.csi.dev/r8=3065336332612d316232632d346435652d396630302d313233343536373839616263222c226261636b656e64223a7b22",
    "kennel.csi.dev/r9=646576696365436c617373223a2266617374227d7d2c226e6f64655f6964223a22776f726b65722d31222c226d616368",
    "kennel.csi.dev/r10=696e655f6964223a223031323334353637383961626364656630313233343536373839616263646566222c2263726561",
    "kennel.csi.dev/r11=7465645f756e6978223a313739363235303837352c22736f75726365223a7b22736e617073686f74223a226b732d3061",
    "kennel.csi.dev/r12=31623263336434653566366737683869396a306b316c227d7d",
];

#[test]
fn volumes_written_by_earlier_drivers_are_still_served() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let id = "kv-3f9a0c2b7d1e4f5a6b8c9d0e";
    let mut args = vec!["-an", "-Zn", "-Wn", "-y", "-L", "8m", "-n", id];
    for tag in LEGACY_TAGS {
        args.extend(["--addtag", tag]);
    }
    args.push(&vg.name);
    lvm_ok("lvcreate", &args);
    let backend = LvmBackend::open(config(&vg, locks.path(), Duration::from_secs(3600)))
        .expect("open the backend");
    let name = "pvc-8f0e3c2a-1b2c-4d5e-9f00-123456789abc";
    let old = backend
        .find_by_name(name)
        .expect("find")
        .expect("the old volume is found by its name");
    assert_eq!(old.id.as_str(), id);
    assert_eq!(old.capacity_bytes, 8 << 20, "the LV's size");
    assert_eq!(old.params.pvc_name.as_deref(), Some("data-web-0"));
    assert_eq!(old.node_id, "worker-1");
    // A new volume beside it gets the compact tags; both are listed.
    let fresh = record("pvc-new", 8 << 20);
    backend.create(&fresh).expect("create");
    let tags = vg.lv(fresh.id.as_str()).expect("new LV").tags;
    assert!(
        tags.iter().all(|t| !t.starts_with("kennel.csi.dev/r")),
        "{tags:?}"
    );
    assert_eq!(backend.list().expect("list").len(), 2);
    assert_eq!(
        vg.lv(id).expect("old LV").tags.len(),
        LEGACY_TAGS.len(),
        "old tags are left as they are"
    );
    backend.delete(&old.id).expect("delete the old volume");
    assert!(vg.lv(id).is_none());
}

/// I/O limits live in one `kio=` tag beside the record, compact or written
/// by an earlier driver: lvm2 takes it, a restart reads it back, a change
/// swaps it and the record's tags stay as they are.
#[test]
fn io_limits_are_a_tag_beside_compact_and_earlier_records() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let open = || {
        LvmBackend::open(config(&vg, locks.path(), Duration::from_secs(3600)))
            .expect("open the backend")
    };
    let old_id = "kv-3f9a0c2b7d1e4f5a6b8c9d0e";
    let mut args = vec!["-an", "-Zn", "-Wn", "-y", "-L", "8m", "-n", old_id];
    for tag in LEGACY_TAGS {
        args.extend(["--addtag", tag]);
    }
    args.push(&vg.name);
    lvm_ok("lvcreate", &args);
    let limited = IoLimits {
        read_bps: Some(10 << 20),
        write_iops: Some(100),
        ..Default::default()
    };
    let mut fresh = record("pvc-limited", 8 << 20);
    fresh.params.io_limits = limited;
    let backend = open();
    backend.create(&fresh).expect("create with limits");
    let io_tags = |id: &str| -> Vec<String> {
        let tags = vg.lv(id).expect("the LV").tags;
        tags.into_iter().filter(|t| t.starts_with("kio=")).collect()
    };
    assert_eq!(io_tags(fresh.id.as_str()), vec!["kio=rb10m+wi100"]);
    let old = VolumeId::parse(old_id).expect("an ID");
    let other = IoLimits {
        write_bps: Some(5_000_000),
        ..Default::default()
    };
    backend
        .set_io_limits(&old, other)
        .expect("limit the old volume");
    assert_eq!(io_tags(old_id), vec!["kio=wb5000000"]);
    drop(backend);

    let backend = open();
    let got = |id: &VolumeId| backend.get(id).expect("get").expect("the volume");
    assert_eq!(got(&fresh.id).params.io_limits, limited);
    let old_record = got(&old);
    assert_eq!(old_record.params.io_limits, other);
    assert_eq!(old_record.params.pvc_name.as_deref(), Some("data-web-0"));
    // Lifted: the tag goes, the record's tags stay.
    backend
        .set_io_limits(&old, IoLimits::default())
        .expect("lift the limits");
    assert!(io_tags(old_id).is_empty());
    assert_eq!(vg.lv(old_id).expect("old LV").tags.len(), LEGACY_TAGS.len());
    drop(backend);
    let again = open().get(&old).expect("get").expect("the volume");
    assert_eq!(again.params.io_limits, IoLimits::default());
}

#[test]
fn hostile_tags_never_abort_listing() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let good = record("pvc-good", 8 << 20);
    {
        let backend = LvmBackend::open(config(&vg, locks.path(), Duration::from_secs(3600)))
            .expect("open the backend");
        backend.create(&good).expect("create");
    }
    let huge = VolumeId::generate();
    let garbage = VolumeId::generate();
    for (name, tags) in [
        (
            huge.as_str(),
            vec![
                OWNER_TAG,
                "kennel.csi.dev/n=18446744073709551615",
                "kennel.csi.dev/r0=7b",
            ],
        ),
        (
            garbage.as_str(),
            vec![OWNER_TAG, "kennel.csi.dev/n=1", "kennel.csi.dev/r0=zz"],
        ),
    ] {
        let mut args = vec!["-an", "-Zn", "-Wn", "-y", "-L", "4m", "-n", name];
        for tag in &tags {
            args.extend(["--addtag", tag]);
        }
        args.push(&vg.name);
        lvm_ok("lvcreate", &args);
    }
    let backend = LvmBackend::open(config(&vg, locks.path(), Duration::from_secs(3600)))
        .expect("hostile tags do not stop the backend");
    let listed = backend.list().expect("listing works");
    assert_eq!(
        listed.into_iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![good.id.clone()]
    );
    assert_eq!(backend.get(&huge).expect("get"), None);
    // Skipped, not adopted: deleting by its ID leaves the LV alone.
    backend.delete(&garbage).expect("delete");
    assert!(vg.lv(garbage.as_str()).is_some());
}

/// A second PV (a loop device over a sparse file), removed when dropped.
struct SparePv {
    device: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl SparePv {
    fn new(bytes: u64) -> SparePv {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("pv2.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(bytes))
            .expect("sparse image");
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&image)
            .output()
            .expect("losetup");
        assert!(out.status.success(), "losetup: {out:?}");
        let device = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        lvm_ok("pvcreate", &["-y", &device.to_string_lossy()]);
        SparePv { device, _dir: dir }
    }
}

impl Drop for SparePv {
    fn drop(&mut self) {
        detach_windows(&self.device);
        let _ = lvm("pvremove", &["-ff", "-y", &self.device.to_string_lossy()]);
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.device)
            .output();
    }
}

#[test]
fn a_pv_added_to_the_vg_is_used_without_a_restart() {
    if !can_run() {
        return;
    }
    // Dropped last: the VG goes first, then the PV it was extended with.
    let spare = SparePv::new(65 << 20);
    let vg = TestVg::with_capacity(32 << 20);
    let locks = tempfile::tempdir().expect("temp dir");
    let backend = LvmBackend::open(config(&vg, locks.path(), Duration::from_secs(3600)))
        .expect("open the backend");
    lvm_ok("vgextend", &[&vg.name, &spare.device.to_string_lossy()]);

    // More than the first PV holds: only the added one has room.
    let big = record("big", 48 << 20);
    backend
        .create(&big)
        .expect("a volume on the PV added since the start");
    let devices = vg.lv_field(big.id.as_str(), "devices");
    assert!(
        devices.contains(&*spare.device.to_string_lossy()),
        "placed on the added PV: {devices}"
    );
    let small = record("small", 8 << 20);
    backend.create(&small).expect("a volume on the first PV");
    for r in [&big, &small] {
        backend.delete(&r.id).expect("delete");
    }
    assert_eq!(
        backend.index_view(),
        backend.fresh_index_view().expect("reload"),
        "the index knows both PVs"
    );
}
