//! Crash safety: the driver dies after each lvm2 command (or data copy) of
//! an operation; after a restart the retried call leaves exactly one
//! complete, correctly tagged volume and nothing else. The hook is compiled
//! in only with the `crash-injection` feature, which `cargo test` enables
//! through the crate's dev-dependency on itself.

mod lvm_support;

use std::time::Duration;

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
                // A snapshot's LV is its bare ID (the CO's names the node after `@`).
                assert!(vg.lv(&snapshot_lv(&id)).is_some());
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

/// Kills for the random soak: `KENNEL_CRASH_KILLS`, else 500 on the host and 50 in the
/// device-mapper lane (software emulation is several times slower).
fn soak_kills() -> u64 {
    std::env::var("KENNEL_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if device_mapper() { 50 } else { 500 })
}

/// The soak's seed: `KENNEL_CRASH_SEED` replays a run; otherwise a new one, printed.
fn soak_seed() -> u64 {
    std::env::var("KENNEL_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// One RPC of a lifecycle, as a value so it can be retried after a crash.
#[derive(Debug, Clone)]
enum Call {
    Create(pb::CreateVolumeRequest),
    Snapshot {
        name: String,
        source: String,
    },
    Stage {
        id: String,
        cap: pb::VolumeCapability,
    },
    Publish {
        id: String,
        cap: pb::VolumeCapability,
    },
    Unpublish {
        id: String,
        block: bool,
    },
    Unstage {
        id: String,
    },
    DeleteSnapshot(String),
    Delete(String),
}

impl Call {
    /// Make the call; the answer is the new object's ID where there is one.
    async fn make(&self, driver: &LvmDriver) -> Result<String, tonic::Status> {
        let (mut c, mut n) = (driver.controller(), driver.node());
        match self.clone() {
            Call::Create(req) => c
                .create_volume(req)
                .await
                .map(|r| r.into_inner().volume.expect("volume").volume_id),
            Call::Snapshot { name, source } => c
                .create_snapshot(pb::CreateSnapshotRequest {
                    name,
                    source_volume_id: source,
                    ..Default::default()
                })
                .await
                .map(|r| r.into_inner().snapshot.expect("snapshot").snapshot_id),
            Call::Stage { id, cap } => {
                let staging = driver.staging_path(&id);
                std::fs::create_dir_all(&staging).expect("staging dir");
                n.node_stage_volume(pb::NodeStageVolumeRequest {
                    volume_id: id,
                    staging_target_path: staging.display().to_string(),
                    volume_capability: Some(cap),
                    ..Default::default()
                })
                .await
                .map(|_| String::new())
            }
            Call::Publish { id, cap } => {
                let block = matches!(
                    cap.access_type,
                    Some(pb::volume_capability::AccessType::Block(_))
                );
                n.node_publish_volume(pb::NodePublishVolumeRequest {
                    volume_id: id.clone(),
                    staging_target_path: driver.staging_path(&id).display().to_string(),
                    target_path: driver.target_path(&id, block).display().to_string(),
                    volume_capability: Some(cap),
                    ..Default::default()
                })
                .await
                .map(|_| String::new())
            }
            Call::Unpublish { id, block } => n
                .node_unpublish_volume(pb::NodeUnpublishVolumeRequest {
                    target_path: driver.target_path(&id, block).display().to_string(),
                    volume_id: id,
                })
                .await
                .map(|_| String::new()),
            Call::Unstage { id } => n
                .node_unstage_volume(pb::NodeUnstageVolumeRequest {
                    staging_target_path: driver.staging_path(&id).display().to_string(),
                    volume_id: id,
                })
                .await
                .map(|_| String::new()),
            Call::DeleteSnapshot(id) => c
                .delete_snapshot(pb::DeleteSnapshotRequest {
                    snapshot_id: id,
                    ..Default::default()
                })
                .await
                .map(|_| String::new()),
            Call::Delete(id) => c
                .delete_volume(pb::DeleteVolumeRequest {
                    volume_id: id,
                    ..Default::default()
                })
                .await
                .map(|_| String::new()),
        }
    }
}

/// Runs calls, killing the driver (SIGKILL) at random moments of them, and retries every
/// interrupted call to completion after a restart.
struct Chaos {
    driver: LvmDriver,
    rng: rand::rngs::StdRng,
    kills: u64,
    log: Vec<String>,
}

impl Chaos {
    async fn call(&mut self, call: Call) -> String {
        use rand::Rng;
        // Most calls get a kill somewhere in their first tens of milliseconds, where the
        // lvm2 commands, copies, mkfs and mounts are.
        let kill_after = self
            .rng
            .random_bool(0.6)
            .then(|| Duration::from_micros(self.rng.random_range(0..60_000)));
        let answer = match kill_after {
            None => call.make(&self.driver).await,
            Some(after) => {
                let pid = self.driver.pid();
                let killer = tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                });
                let first = call.make(&self.driver).await;
                killer.await.unwrap();
                self.kills += 1;
                self.log
                    .push(format!("kill {} {after:?} into {call:?}", self.kills));
                self.driver.restart().await;
                match first {
                    Ok(id) => {
                        // Answered before the kill: the retry must give the same answer.
                        let again = self.retry(&call).await;
                        assert_eq!(again, id, "{call:?}: another answer after a restart");
                        Ok(id)
                    }
                    Err(_) => Ok(self.retry(&call).await),
                }
            }
        };
        answer.unwrap_or_else(|s| panic!("{call:?}: {s:?}\n{}", self.driver.log_tail(40)))
    }

    /// Retry until answered: ABORTED only while a killed call's tool is still running.
    async fn retry(&mut self, call: &Call) -> String {
        for _ in 0..600 {
            match call.make(&self.driver).await {
                Ok(answer) => return answer,
                Err(s) if s.code() == tonic::Code::Aborted => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(s) => panic!(
                    "{call:?} retried after a kill: {s:?}\n{}",
                    self.driver.log_tail(40)
                ),
            }
        }
        panic!("{call:?} stayed ABORTED for 30 s after a kill");
    }
}

/// The volume's data as a pod sees it: the block device or a file on the filesystem.
fn data_path(target: &std::path::Path, block: bool) -> std::path::PathBuf {
    if block {
        target.to_owned()
    } else {
        target.join("data")
    }
}

fn write_data(path: &std::path::Path, data: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open for writing");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

fn read_data(path: &std::path::Path, len: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0; len];
    std::fs::File::open(path)
        .expect("open for reading")
        .read_exact(&mut buf)
        .expect("read");
    buf
}

fn marker(round: u64, len: usize) -> Vec<u8> {
    let line = format!("round {round} of the crash soak. ");
    line.bytes().cycle().take(len).collect()
}

/// SIGKILLs at random (seeded, logged, replayable) moments of Block and Filesystem
/// lifecycles — create, stage, publish, write, snapshot, restore, read back, tear down —
/// each interrupted call retried to completion: nothing lost, nothing leaked, no pending LV,
/// no device left suspended.
#[tokio::test(flavor = "multi_thread")]
async fn random_kills_during_lifecycles_lose_and_leak_nothing() {
    use rand::{Rng, SeedableRng};
    if !can_run() {
        return;
    }
    let (kills, seed) = (soak_kills(), soak_seed());
    println!("crash soak: {kills} kills, KENNEL_CRASH_SEED={seed} replays this run");
    with_timeout(60 + kills * 3 * timeout_scale(), async {
        let vg = TestVg::new("2G");
        let mut chaos = Chaos {
            driver: LvmDriver::start(&vg).await,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            kills: 0,
            log: Vec::new(),
        };
        let mut round = 0;
        while chaos.kills < kills {
            round += 1;
            let block = chaos.rng.random_bool(0.5);
            let cap = if block {
                block_cap()
            } else {
                mount_cap("ext4")
            };
            let data = marker(round, 64 << 10);
            let name = format!("soak-{round}");
            let origin = chaos
                .call(Call::Create(create_req(&name, 16 * MIB, &[])))
                .await;
            let mut ids = vec![origin.clone()];
            chaos
                .call(Call::Stage {
                    id: origin.clone(),
                    cap: cap.clone(),
                })
                .await;
            chaos
                .call(Call::Publish {
                    id: origin.clone(),
                    cap: cap.clone(),
                })
                .await;
            write_data(
                &data_path(&chaos.driver.target_path(&origin, block), block),
                &data,
            );
            let snap = chaos
                .call(Call::Snapshot {
                    name: format!("{name}-snap"),
                    source: origin.clone(),
                })
                .await;
            chaos
                .call(Call::Unpublish {
                    id: origin.clone(),
                    block,
                })
                .await;
            chaos.call(Call::Unstage { id: origin.clone() }).await;
            let restored = chaos
                .call(Call::Create(from_snapshot(
                    create_req(&format!("{name}-restored"), 16 * MIB, &[]),
                    &snap,
                )))
                .await;
            ids.push(restored.clone());
            for id in &ids {
                chaos
                    .call(Call::Stage {
                        id: id.clone(),
                        cap: cap.clone(),
                    })
                    .await;
                chaos
                    .call(Call::Publish {
                        id: id.clone(),
                        cap: cap.clone(),
                    })
                    .await;
                let path = data_path(&chaos.driver.target_path(id, block), block);
                assert!(
                    read_data(&path, data.len()) == data,
                    "round {round}: {id} lost its data (seed {seed})"
                );
                chaos
                    .call(Call::Unpublish {
                        id: id.clone(),
                        block,
                    })
                    .await;
                chaos.call(Call::Unstage { id: id.clone() }).await;
            }
            chaos.call(Call::DeleteSnapshot(snap)).await;
            for id in ids {
                chaos.call(Call::Delete(id)).await;
            }
            let left = vg.lvs();
            assert!(
                left.is_empty(),
                "round {round} (seed {seed}) left LVs: {left:#?}\n{}",
                chaos.log.join("\n")
            );
        }
        let mounts = mounts_under(&chaos.driver.root);
        assert!(mounts.is_empty(), "leaked mounts: {mounts:?}");
        assert!(
            windows_of(&vg.pv).is_empty(),
            "leaked loop windows: {:?}",
            windows_of(&vg.pv)
        );
        if device_mapper() {
            let info = std::process::Command::new("dmsetup")
                .args(["info", "-c", "--noheadings", "-o", "name,suspended"])
                .output()
                .expect("dmsetup");
            let info = String::from_utf8_lossy(&info.stdout);
            assert!(
                !info.lines().any(|l| l.contains("Suspended")),
                "devices left suspended:\n{info}"
            );
        }
        println!(
            "crash soak: {} kills over {round} lifecycles, seed {seed}: nothing lost or leaked",
            chaos.kills
        );
    })
    .await;
}
