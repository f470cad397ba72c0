//! Crash safety: the driver dies after each lvm2 command (or data copy) of
//! an operation; after a restart the retried call leaves exactly one
//! complete, correctly tagged volume and nothing else. The hook is compiled
//! in only with the `crash-injection` feature, which `cargo test` enables
//! through the crate's dev-dependency on itself.

mod lvm_support;

use kennel::csi::pb;
use lvm_support::*;

const ABORT_ENV: &str = "KENNEL_LVM_ABORT_AFTER_STEP";

fn snapshots_made(vg: &TestVg) -> usize {
    vg.lvs()
        .iter()
        .filter(|lv| lv.name.starts_with("ks-"))
        .count()
}

fn assert_clean(vg: &TestVg, expected: usize) {
    let lvs = vg.lvs();
    assert_eq!(lvs.len(), expected, "LVs leaked or lost: {lvs:#?}");
    for lv in &lvs {
        assert!(lv.tags.iter().any(|t| t == OWNER_TAG), "{lv:?}");
        assert!(!lv.tags.iter().any(|t| t == PENDING_TAG), "{lv:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_step_of_create_restore_and_snapshot_survives_a_crash() {
    if !can_run() {
        return;
    }
    with_timeout(600, async {
        let vg = TestVg::new("2G");
        let mut driver = LvmDriver::start(&vg).await;
        let origin = driver.create(create_req("origin", 16 * MIB, &[])).await;
        let snap = driver.snapshot("snap", &origin.volume_id).await;
        let mut expected = 2;

        #[derive(Clone, Copy, Debug)]
        enum Op {
            Create,
            Restore,
            Snapshot,
        }
        for op in [Op::Create, Op::Restore, Op::Snapshot] {
            for step in 1.. {
                let name = format!("{op:?}-{step}").to_lowercase();
                driver
                    .restart_with(vec![(ABORT_ENV.to_owned(), step.to_string())])
                    .await;
                let call = |c: kennel::csi::client::CsiClient| {
                    let name = name.clone();
                    let (origin, snap) = (origin.volume_id.clone(), snap.snapshot_id.clone());
                    async move {
                        match op {
                            Op::Create => c
                                .controller
                                .clone()
                                .create_volume(create_req(&name, 16 * MIB, &[]))
                                .await
                                .map(|r| r.into_inner().volume.unwrap().volume_id),
                            Op::Restore => c
                                .controller
                                .clone()
                                .create_volume(from_snapshot(
                                    create_req(&name, 24 * MIB, &[]),
                                    &snap,
                                ))
                                .await
                                .map(|r| r.into_inner().volume.unwrap().volume_id),
                            Op::Snapshot => c
                                .controller
                                .clone()
                                .create_snapshot(pb::CreateSnapshotRequest {
                                    name: name.clone(),
                                    source_volume_id: origin,
                                    ..Default::default()
                                })
                                .await
                                .map(|r| r.into_inner().snapshot.unwrap().snapshot_id),
                        }
                    }
                };
                let first = call(driver.client.clone()).await;
                let crashed = driver
                    .wait_exit(if first.is_ok() { 0 } else { 20 })
                    .is_some();
                if first.is_ok() && !crashed {
                    // The operation has fewer steps than `step`: done with it.
                    // A plain create is one `lvcreate`; copies take several.
                    match op {
                        Op::Create => assert_eq!(step, 2, "a create is one lvm2 step"),
                        _ => assert!(
                            step > 2,
                            "{op:?} took {} step(s); expected several",
                            step - 1
                        ),
                    }
                    expected += 1;
                    assert_clean(&vg, expected);
                    break;
                }
                assert!(
                    crashed,
                    "{op:?} step {step}: call failed but the driver lives: {first:?}"
                );
                driver.restart().await;
                let id = call(driver.client.clone())
                    .await
                    .unwrap_or_else(|s| panic!("{op:?} retry after crash at step {step}: {s:?}"));
                let again = call(driver.client.clone()).await.unwrap();
                assert_eq!(id, again, "retry is idempotent");
                expected += 1;
                assert_clean(&vg, expected);
                assert!(vg.lv(&id).is_some());
                assert!(step < 10, "{op:?} never finished");
            }
        }
        let names: Vec<String> = driver
            .list_all()
            .await
            .into_iter()
            .map(|v| v.volume_id)
            .collect();
        // The origin plus one volume per attempted create and restore.
        assert_eq!(
            names.len(),
            expected - snapshots_made(&vg),
            "volumes: {names:?}"
        );
    })
    .await;
}
