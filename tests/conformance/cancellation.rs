//! Callers that give up: a CSI sidecar abandons a call at its `--timeout` and retries at once.
//! The work goes on to its end under its lock; a retry meanwhile answers ABORTED, a retry after
//! it answers with the one object the work made. Each operation is held at every one of its
//! steps in turn (the driver's pause points, see `kennel::faults`), its caller dropped there,
//! and the result counted on the host: exactly one object, nothing leaked.

use std::collections::BTreeSet;
use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::common::*;
use kennel::csi::pb;
use kennel::faults::{ARM_FILE, PAUSED_FILE, PAUSE_DIR_ENV};
use pb::volume_content_source::{SnapshotSource, Type, VolumeSource};
use tonic::{Code, Request, Status};

pub(super) const T: u64 = 600;
/// How long a caller waits on a held step before it gives up.
const GIVE_UP: Duration = Duration::from_millis(300);
/// More steps than any operation has: a sign the pause points stopped ending.
pub(super) const MAX_STEPS: u64 = 40;

/// The driver's pause directory.
pub(super) struct Pauses {
    dir: tempfile::TempDir,
}

impl Pauses {
    pub(super) fn new() -> Self {
        Pauses {
            dir: tempfile::tempdir().expect("pause dir"),
        }
    }

    pub(super) fn opts(&self, capacity: &str) -> DriverOpts {
        let mut opts = DriverOpts::sparse(capacity);
        opts.env.push((
            PAUSE_DIR_ENV.to_owned(),
            self.dir.path().display().to_string(),
        ));
        opts
    }

    pub(super) fn arm(&self, step: u64) {
        fs::write(self.dir.path().join(ARM_FILE), step.to_string()).unwrap();
    }

    pub(super) fn disarm(&self) {
        let _ = fs::remove_file(self.dir.path().join(ARM_FILE));
    }

    /// The step being held, if one is.
    pub(super) fn held(&self) -> Option<String> {
        fs::read_to_string(self.dir.path().join(PAUSED_FILE)).ok()
    }

    pub(super) fn release(&self) {
        fs::remove_file(self.dir.path().join(PAUSED_FILE)).expect("a held step to release");
    }
}

/// Arm step `step`, make the call as a caller that gives up after [`GIVE_UP`], retry while the
/// step is held (ABORTED), release it and retry until answered. Returns the final answer and
/// whether the step was reached (false: the operation has fewer steps).
pub(super) async fn cut_at<F, Fut>(
    pauses: &Pauses,
    step: u64,
    what: &str,
    call: F,
) -> (String, bool)
where
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = Result<String, Status>>,
{
    pauses.arm(step);
    // Boxed so it can be dropped below: the client then resets the stream and the server drops
    // the request's handler.
    let mut first = Box::pin(call(Duration::from_secs(120)));
    let held = loop {
        tokio::select! {
            answer = &mut first => {
                assert!(pauses.held().is_none(), "{what}: answered while held");
                pauses.disarm();
                let answer = answer.unwrap_or_else(|s| panic!("{what}: {s:?}"));
                return (answer, false);
            }
            _ = tokio::time::sleep(Duration::from_millis(5)) => {
                if let Some(held) = pauses.held() {
                    break held;
                }
            }
        }
    };
    // The caller gives up while the work is held there: its call is dropped, as a sidecar's
    // is at its --timeout.
    assert!(
        tokio::time::timeout(GIVE_UP, &mut first).await.is_err(),
        "{what}: answered while held at {held:?}"
    );
    drop(first);
    // A retry while the first call's work is held must not start a second one.
    match call(Duration::from_secs(30)).await {
        Err(s) if s.code() == Code::Aborted => {}
        other => panic!("{what}: retry while {held:?} is held answered {other:?}, not ABORTED"),
    }
    pauses.release();
    let answer = loop {
        match call(Duration::from_secs(60)).await {
            Err(s) if s.code() == Code::Aborted => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(s) => panic!("{what}: retry after {held:?} was released: {s:?}"),
            Ok(answer) => break answer,
        }
    };
    (answer, true)
}

pub(super) fn timed<T>(message: T, deadline: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(deadline);
    request
}

/// Every object of volumes and snapshots on the host: LVs, or image and record files.
pub(super) fn objects(td: &TestDriver) -> BTreeSet<String> {
    let mut all = td.host_objects();
    if td.vg.is_none() {
        if let Ok(dir) = fs::read_dir(td.loop_dir.join("snapshots")) {
            all.extend(
                dir.flatten()
                    .map(|e| format!("snapshots/{}", e.file_name().to_string_lossy())),
            );
        }
    }
    all
}

/// Host objects of one snapshot.
pub(super) fn objects_per_snapshot(td: &TestDriver) -> usize {
    if td.vg.is_some() {
        1
    } else {
        2
    }
}

pub(super) fn added(before: &BTreeSet<String>, after: &BTreeSet<String>) -> Vec<String> {
    after.difference(before).cloned().collect()
}

fn with_source(mut req: pb::CreateVolumeRequest, source: Type) -> pb::CreateVolumeRequest {
    req.volume_content_source = Some(pb::VolumeContentSource {
        r#type: Some(source),
    });
    req
}

async fn create_volume(
    td: &TestDriver,
    req: pb::CreateVolumeRequest,
    deadline: Duration,
) -> Result<String, Status> {
    td.controller()
        .create_volume(timed(req, deadline))
        .await
        .map(|r| r.into_inner().volume.expect("a volume").volume_id)
}

async fn snapshot(td: &TestDriver, name: &str, source: &str) -> String {
    td.controller()
        .create_snapshot(pb::CreateSnapshotRequest {
            name: name.to_owned(),
            source_volume_id: source.to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|s| panic!("CreateSnapshot {name}: {s:?}"))
        .into_inner()
        .snapshot
        .expect("a snapshot")
        .snapshot_id
}

async fn delete_snapshot(td: &TestDriver, id: &str, deadline: Duration) -> Result<String, Status> {
    td.controller()
        .delete_snapshot(timed(
            pb::DeleteSnapshotRequest {
                snapshot_id: id.to_owned(),
                ..Default::default()
            },
            deadline,
        ))
        .await
        .map(|_| String::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_volume_abandoned_at_any_step_makes_exactly_one_volume() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let pauses = Pauses::new();
        let td = TestDriver::start_with(pauses.opts("1GiB")).await;
        let origin = td.create("origin", 16 * MIB, block_cap()).await;
        let snap = snapshot(&td, "origin-snap", &origin.volume_id).await;
        let sources = [
            ("empty", None),
            (
                "restore",
                Some(Type::Snapshot(SnapshotSource {
                    snapshot_id: snap.clone(),
                })),
            ),
            (
                "clone",
                Some(Type::Volume(VolumeSource {
                    volume_id: origin.volume_id.clone(),
                })),
            ),
        ];
        for (kind, source) in sources {
            let mut steps_seen = 0;
            for step in 1..=MAX_STEPS {
                let name = format!("pvc-{kind}-{step}");
                let mut req = create_req(&name, 16 * MIB, vec![block_cap()]);
                if let Some(source) = &source {
                    req = with_source(req, source.clone());
                }
                let before = objects(&td);
                let what = format!("CreateVolume ({kind}) held at step {step}");
                let (id, held) =
                    cut_at(&pauses, step, &what, |d| create_volume(&td, req.clone(), d)).await;
                let new = added(&before, &objects(&td));
                assert_eq!(
                    new.len(),
                    td.objects_per_volume(),
                    "{what}: objects made {new:?}"
                );
                assert!(
                    new.iter().any(|o| o.contains(&id)),
                    "{what}: {new:?} vs {id}"
                );
                assert!(
                    objects(&td).is_superset(&before),
                    "{what}: other objects went away"
                );
                // Asked again, the same one.
                let again = create_volume(&td, req.clone(), Duration::from_secs(30))
                    .await
                    .unwrap();
                assert_eq!(again, id, "{what}: a second volume for one name");
                td.delete(&id).await;
                assert_eq!(objects(&td), before, "{what}: delete left something");
                if !held {
                    break;
                }
                steps_seen = step;
            }
            assert!(
                steps_seen >= 2,
                "CreateVolume ({kind}) has {steps_seen} steps"
            );
        }
        delete_snapshot(&td, &snap, Duration::from_secs(30))
            .await
            .unwrap();
        td.delete(&origin.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_snapshot_abandoned_at_any_step_makes_exactly_one_snapshot() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let pauses = Pauses::new();
        let td = TestDriver::start_with(pauses.opts("1GiB")).await;
        let origin = td.create("origin", 32 * MIB, block_cap()).await;
        let mut steps_seen = 0;
        for step in 1..=MAX_STEPS {
            let name = format!("snap-{step}");
            let req = pb::CreateSnapshotRequest {
                name: name.clone(),
                source_volume_id: origin.volume_id.clone(),
                ..Default::default()
            };
            let before = objects(&td);
            let what = format!("CreateSnapshot held at step {step}");
            let (id, held) = cut_at(&pauses, step, &what, |d| {
                let mut c = td.controller();
                let req = req.clone();
                async move {
                    c.create_snapshot(timed(req, d))
                        .await
                        .map(|r| r.into_inner().snapshot.expect("a snapshot").snapshot_id)
                }
            })
            .await;
            let new = added(&before, &objects(&td));
            assert_eq!(
                new.len(),
                objects_per_snapshot(&td),
                "{what}: objects made {new:?}"
            );
            // Objects are named by the bare ID; the CO's names the node after `@`.
            let bare = id.split('@').next().unwrap_or_default();
            assert!(
                new.iter().any(|o| o.contains(bare)),
                "{what}: {new:?} vs {id}"
            );
            let listed = td
                .controller()
                .list_snapshots(pb::ListSnapshotsRequest {
                    source_volume_id: origin.volume_id.clone(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .entries;
            assert_eq!(listed.len(), 1, "{what}: {listed:?}");
            delete_snapshot(&td, &id, Duration::from_secs(30))
                .await
                .unwrap();
            assert_eq!(objects(&td), before, "{what}: delete left something");
            if !held {
                break;
            }
            steps_seen = step;
        }
        assert!(steps_seen >= 2, "CreateSnapshot has {steps_seen} steps");
        td.delete(&origin.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_abandoned_at_any_step_deletes_once_and_completely() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let pauses = Pauses::new();
        let td = TestDriver::start_with(pauses.opts("1GiB")).await;
        let empty = objects(&td);
        for what_kind in ["volume", "snapshot"] {
            let mut steps_seen = 0;
            for step in 1..=MAX_STEPS {
                let vol = td
                    .create(&format!("pvc-{what_kind}-{step}"), 16 * MIB, block_cap())
                    .await;
                let snap = snapshot(&td, &format!("snap-{step}"), &vol.volume_id).await;
                let what = format!("Delete{what_kind} held at step {step}");
                let (_, held) = match what_kind {
                    "volume" => {
                        // The snapshot is kept: it is deleted after the volume.
                        cut_at(&pauses, step, &what, |d| {
                            let mut c = td.controller();
                            let id = vol.volume_id.clone();
                            async move {
                                c.delete_volume(timed(
                                    pb::DeleteVolumeRequest {
                                        volume_id: id,
                                        ..Default::default()
                                    },
                                    d,
                                ))
                                .await
                                .map(|_| String::new())
                            }
                        })
                        .await
                    }
                    _ => cut_at(&pauses, step, &what, |d| delete_snapshot(&td, &snap, d)).await,
                };
                let left = objects(&td);
                let gone_expected = match what_kind {
                    "volume" => td.objects_per_volume(),
                    _ => objects_per_snapshot(&td),
                };
                assert_eq!(
                    left.len(),
                    empty.len() + td.objects_per_volume() + objects_per_snapshot(&td)
                        - gone_expected,
                    "{what}: {left:?}"
                );
                assert!(
                    !left.iter().any(|o| o.contains(match what_kind {
                        "volume" => vol.volume_id.as_str(),
                        _ => snap.as_str(),
                    })),
                    "{what}: {left:?}"
                );
                // Whatever is left goes the ordinary way.
                let _ = delete_snapshot(&td, &snap, Duration::from_secs(30)).await;
                let _ = td
                    .controller()
                    .delete_volume(pb::DeleteVolumeRequest {
                        volume_id: vol.volume_id.clone(),
                        ..Default::default()
                    })
                    .await;
                assert_eq!(objects(&td), empty, "{what}");
                if !held {
                    break;
                }
                steps_seen = step;
            }
            assert!(steps_seen >= 1, "Delete{what_kind} has {steps_seen} steps");
        }
        td.assert_no_leaks();
    })
    .await
}

/// The size the mounted filesystem reports (its log not included).
fn fs_bytes(path: &Path) -> i64 {
    let total = nix::sys::statvfs::statvfs(path).unwrap();
    total.blocks() as i64 * total.fragment_size() as i64
}

fn mounts_under(path: &Path) -> usize {
    mounts_at(path).len()
}

fn expand_request(
    td: &TestDriver,
    id: &str,
    path: &Path,
    to: i64,
    fs_type: &str,
) -> pb::NodeExpandVolumeRequest {
    pb::NodeExpandVolumeRequest {
        volume_id: id.to_owned(),
        volume_path: path.display().to_string(),
        capacity_range: Some(pb::CapacityRange {
            required_bytes: to,
            limit_bytes: 0,
        }),
        staging_target_path: td.staging_path(id).display().to_string(),
        volume_capability: Some(mount_cap(fs_type)),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_or_node_expand_abandoned_at_any_step_finishes_once() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let pauses = Pauses::new();
        let td = TestDriver::start_with(pauses.opts("2GiB")).await;

        let mut steps_seen = 0;
        for step in 1..=MAX_STEPS {
            let vol = td
                .create(&format!("pvc-stage-{step}"), 16 * MIB, mount_cap("ext4"))
                .await;
            let id = vol.volume_id.clone();
            let staging = td.staging_path(&id);
            fs::create_dir_all(&staging).unwrap();
            let what = format!("NodeStageVolume held at step {step}");
            let req = td.stage_req(&id, mount_cap("ext4"));
            let (_, held) = cut_at(&pauses, step, &what, |d| {
                let mut n = td.node();
                let req = req.clone();
                async move {
                    n.node_stage_volume(timed(req, d))
                        .await
                        .map(|_| String::new())
                }
            })
            .await;
            assert_eq!(
                mounts_under(&staging),
                1,
                "{what}: {:?}",
                mounts_at(&staging)
            );
            write_file(&staging.join("f"), b"staged once");
            td.unstage(&id).await;
            td.delete(&id).await;
            if !held {
                break;
            }
            steps_seen = step;
        }
        assert!(steps_seen >= 2, "NodeStageVolume has {steps_seen} steps");

        // xfs grows online without CAP_SYS_RESOURCE.
        let mut steps_seen = 0;
        for step in 1..=MAX_STEPS {
            let from = 320 * MIB;
            let to = from + 64 * MIB;
            let vol = td
                .create(&format!("pvc-grow-{step}"), from, mount_cap("xfs"))
                .await;
            let id = vol.volume_id.clone();
            let staging: PathBuf = td.stage(&id, mount_cap("xfs")).await;
            let before = fs_bytes(&staging);
            let grown = td
                .controller()
                .controller_expand_volume(pb::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(pb::CapacityRange {
                        required_bytes: to,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert!(grown.capacity_bytes >= to);
            let what = format!("NodeExpandVolume held at step {step}");
            let req = expand_request(&td, &id, &staging, to, "xfs");
            let (bytes, held) = cut_at(&pauses, step, &what, |d| {
                let mut n = td.node();
                let req = req.clone();
                async move {
                    n.node_expand_volume(timed(req, d))
                        .await
                        .map(|r| r.into_inner().capacity_bytes.to_string())
                }
            })
            .await;
            assert!(bytes.parse::<i64>().unwrap() >= to, "{what}: {bytes}");
            let after = fs_bytes(&staging);
            assert!(
                after >= before + 48 * MIB,
                "{what}: the filesystem grew from {before} to {after} bytes"
            );
            assert_eq!(mounts_under(&staging), 1, "{what}");
            td.unstage(&id).await;
            td.delete(&id).await;
            if !held {
                break;
            }
            steps_seen = step;
        }
        assert!(steps_seen >= 1, "NodeExpandVolume has {steps_seen} steps");
        assert!(objects(&td).is_empty(), "{:?}", objects(&td));
        td.assert_no_leaks();
    })
    .await
}
