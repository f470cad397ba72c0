//! Scale of one volume group: lvm2's default metadata area (1020 KiB) holds at
//! least 1,000 Kennel volumes as Kubernetes asks for them, and past that the
//! driver refuses with RESOURCE_EXHAUSTED naming the metadata area before
//! lvm2 itself fails. Opt-in (`KENNEL_SCALE_TEST=1`): it creates over a
//! thousand LVs one by one, a few minutes here.

mod lvm_support;

use std::time::{Duration, Instant};

use kennel::backend::lvm::params::DeviceClass;
use kennel::backend::lvm::{Activation, LvmBackend, LvmConfig};
use kennel::backend::{Backend, VolumeRecord};
use kennel::error::Error;
use kennel::model::spec::{AccessMode, AccessType, Capability, FsType, VolumeParams};
use kennel::model::volume_size::CapacityRange;
use kennel::model::VolumeId;
use lvm_support::*;

/// A volume as csi-provisioner (with --extra-create-metadata) asks for one on
/// this node.
fn k8s_record(i: usize) -> VolumeRecord {
    let name = format!("pvc-8f0e3c2a-1b2c-4d5e-9f00-{i:012x}");
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    VolumeRecord {
        id: VolumeId::generate(),
        name: name.clone(),
        capacity_bytes: 4 << 20,
        requested: CapacityRange {
            required: 4 << 20,
            limit: 0,
        },
        capabilities: vec![Capability {
            access_type: AccessType::Mount {
                fs_type: Some(FsType::Ext4),
                mount_flags: vec![],
            },
            access_mode: AccessMode::SingleNodeWriter,
        }],
        params: VolumeParams {
            mkfs_discard: false,
            pvc_name: Some(format!("data-web-{i}")),
            pvc_namespace: Some("default".into()),
            pv_name: Some(name),
            backend: Default::default(),
            ..Default::default()
        },
        node_id: host,
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        created_unix: 1_796_250_875,
        source: None,
    }
}

fn mda_free(vg: &TestVg) -> u64 {
    lvm_ok(
        "vgs",
        &[
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "vg_mda_free",
            &vg.name,
        ],
    )
    .trim()
    .parse()
    .expect("vg_mda_free")
}

#[test]
fn the_default_metadata_area_holds_a_thousand_volumes_then_refuses_before_lvm2_does() {
    if std::env::var("KENNEL_SCALE_TEST").as_deref() != Ok("1") {
        println!("opt-in: set KENNEL_SCALE_TEST=1 to create over 1,000 LVs");
        return;
    }
    if !can_run() {
        return;
    }
    // 4 MiB extents: 2,000 one-extent volumes fit in the space.
    let vg = TestVg::new("8200M");
    let locks = tempfile::tempdir().expect("temp dir");
    let backend = LvmBackend::open(LvmConfig {
        classes: vec![DeviceClass::parse(&vg.name).expect("VG name")],
        activation: Activation::Auto,
        thin_overprovision_ratio: 1.0,
        lock_dir: locks.path().to_owned(),
        refresh_interval: Duration::from_secs(3600),
    })
    .expect("open the backend");
    let empty = mda_free(&vg);
    let started = Instant::now();
    let mut created = Vec::new();
    let refusal = loop {
        let record = k8s_record(created.len());
        match backend.create(&record) {
            Ok(()) => created.push(record.id),
            Err(e) => break e,
        }
        assert!(created.len() < 2000, "never refused");
    };
    let full = mda_free(&vg);
    println!(
        "{} volumes in {:.0?} ({:.0?} each), {} bytes of metadata each; then: {refusal}",
        created.len(),
        started.elapsed(),
        started.elapsed() / created.len() as u32,
        (empty - full) / created.len() as u64,
    );
    assert!(
        created.len() >= 1000,
        "only {} volumes fit: {refusal}",
        created.len()
    );
    match &refusal {
        Error::Exhausted(msg) => assert!(msg.contains("metadata area"), "{msg}"),
        other => panic!("not RESOURCE_EXHAUSTED: {other:?}"),
    }
    // The driver refused first: lvm2 still takes changes, and deleting makes room.
    for id in created.drain(..10) {
        backend.delete(&id).expect("delete");
    }
    let record = k8s_record(5000);
    backend.create(&record).expect("room again after deletes");
    assert_eq!(
        backend.list().expect("list").len(),
        created.len() + 1,
        "every volume is listed"
    );
}
