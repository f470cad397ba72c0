//! Volume health on the LVM backend, for faults this host can make without
//! device-mapper: a volume whose PV went missing is reported partial by
//! ListVolumes, ControllerGetVolume and the `kennel_volume_condition` metric,
//! from the index the background refresh keeps (no lvm2 call per question).
//! Faults that need device-mapper (inactive LVs, a full thin pool) are in
//! tests/lvm_dm.rs.

mod lvm_support;

use std::path::PathBuf;
use std::process::Command;

use lvm_support::*;

/// A second PV for `vg`, on its own sparse file; detach it to make it go missing.
struct ExtraPv {
    image: PathBuf,
    device: String,
    _dir: tempfile::TempDir,
}

impl ExtraPv {
    fn add(vg: &TestVg, size: &str) -> ExtraPv {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("pv2.img");
        let out = Command::new("truncate")
            .args(["-s", size])
            .arg(&image)
            .output()
            .expect("truncate");
        assert!(out.status.success());
        let device = losetup(&image);
        lvm_ok("pvcreate", &["-y", &device]);
        lvm_ok("vgextend", &[&vg.name, &device]);
        ExtraPv {
            image,
            device,
            _dir: dir,
        }
    }

    /// The PV disappears, as a pulled disk does.
    fn pull(&self) {
        let out = Command::new("losetup")
            .args(["-d", &self.device])
            .output()
            .expect("losetup -d");
        assert!(out.status.success(), "{out:?}");
    }

    /// Put the disk back (for the VG's removal).
    fn plug_back(&mut self) {
        self.device = losetup(&self.image);
    }
}

impl Drop for ExtraPv {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.device]).output();
    }
}

fn losetup(image: &std::path::Path) -> String {
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(image)
        .output()
        .expect("losetup");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_volume_on_a_missing_pv_is_reported_partial() {
    if !can_run() {
        return;
    }
    // 16 MiB of extents on the first PV: a 24 MiB volume can only go on the second, which
    // then has 7 MiB left, so an 8 MiB volume can only go on the first, whichever PV lvm2
    // lists first (loop device numbers are reused between tests).
    let vg = TestVg::with_capacity(16 << 20);
    let mut extra = ExtraPv::add(&vg, "32M");
    let mut driver = LvmDriver::start_with_args(
        vec![vg.name.clone()],
        vec![],
        vec!["--lvm-refresh-seconds".into(), "1".into()],
    )
    .await;
    let on_second = driver
        .create(create_req("pvc-on-second", 24 * MIB, &[]))
        .await
        .volume_id;
    let on_first = driver
        .create(create_req("pvc-on-first", 8 * MIB, &[]))
        .await
        .volume_id;
    assert!(!driver.condition(&on_second).await.abnormal);
    if device_mapper() {
        // An active LV holds its PV open; a pulled disk is what is tested.
        lvm_ok("lvchange", &["-an", &format!("{}/{on_second}", vg.name)]);
    }

    extra.pull();
    let condition = driver.abnormal_condition(&on_second, 30).await;
    let name = format!("{}/{on_second}", vg.name);
    assert!(
        condition
            .message
            .contains(&format!("logical volume {name} is partial"))
            && condition.message.contains("physical volume"),
        "{condition:?}"
    );
    let first = driver.condition(&on_first).await;
    assert!(
        !first.abnormal,
        "a volume on the PV that is still there is healthy: {first:?}"
    );
    driver
        .assert_condition_metric(&on_second, &condition.message)
        .await;

    driver.kill();
    extra.plug_back();
}
