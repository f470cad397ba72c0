//! Locking between calls, against the real loop backend (image files only, no root) with
//! a gate that holds a create or a snapshot copy open for as long as the test wants.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::*;
use crate::backend::loop_files::{LoopBackend, LoopConfig, Provisioning};
use crate::model::spec::{AccessMode, AccessType};
use crate::model::volume_size::MIB;
use crate::volume::locks::LockMap;

/// Forwards to the loop backend; `create` and `create_snapshot` wait while the gate is shut.
struct Gated {
    inner: LoopBackend,
    /// (shut, creates and snapshots waiting at the gate)
    gate: Mutex<(bool, usize)>,
    changed: Condvar,
}

impl Gated {
    fn pass(&self) {
        let mut g = self.gate.lock().unwrap();
        g.1 += 1;
        self.changed.notify_all();
        while g.0 {
            g = self.changed.wait(g).unwrap();
        }
        g.1 -= 1;
    }
    fn shut(&self, shut: bool) {
        self.gate.lock().unwrap().0 = shut;
        self.changed.notify_all();
    }
    fn wait_for_one_held(&self) {
        let mut g = self.gate.lock().unwrap();
        while g.1 == 0 {
            g = self.changed.wait(g).unwrap();
        }
    }
}

impl Backend for Gated {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn create_filled(
        &self,
        record: &VolumeRecord,
        fill: &mut dyn FnMut(&crate::backend::ByteRange) -> Result<()>,
    ) -> Result<()> {
        self.inner.create_filled(record, fill)
    }
    fn snapshot_bytes(&self, id: &SnapshotId) -> Result<Option<crate::backend::ByteRange>> {
        self.inner.snapshot_bytes(id)
    }
    fn granularity(&self) -> u64 {
        self.inner.granularity()
    }
    fn list(&self) -> Result<Vec<VolumeRecord>> {
        self.inner.list()
    }
    fn get(&self, id: &VolumeId) -> Result<Option<VolumeRecord>> {
        self.inner.get(id)
    }
    fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>> {
        self.inner.find_by_name(name)
    }
    fn create(&self, record: &VolumeRecord) -> Result<()> {
        self.pass();
        self.inner.create(record)
    }
    fn delete(&self, id: &VolumeId) -> Result<()> {
        self.inner.delete(id)
    }
    fn expand(&self, id: &VolumeId, new_size: u64) -> Result<VolumeRecord> {
        self.inner.expand(id, new_size)
    }
    fn set_io_limits(
        &self,
        id: &VolumeId,
        limits: crate::model::io_limits::IoLimits,
    ) -> Result<VolumeRecord> {
        self.inner.set_io_limits(id, limits)
    }
    fn capacity(&self, params: &BTreeMap<String, String>) -> Result<PoolCapacity> {
        self.inner.capacity(params)
    }
    fn check_params(&self, params: &BTreeMap<String, String>) -> Result<()> {
        self.inner.check_params(params)
    }
    fn create_snapshot(&self, snapshot: &SnapshotRecord) -> Result<()> {
        self.pass();
        self.inner.create_snapshot(snapshot)
    }
    fn create_group_snapshot(&self, members: &[SnapshotRecord]) -> Result<()> {
        self.pass();
        self.inner.create_group_snapshot(members)
    }
    fn delete_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.inner.delete_snapshot(id)
    }
    fn list_snapshots(&self) -> Result<Vec<SnapshotRecord>> {
        self.inner.list_snapshots()
    }
    fn attach(&self, id: &VolumeId) -> Result<PathBuf> {
        self.inner.attach(id)
    }
    fn detach(&self, id: &VolumeId) -> Result<()> {
        self.inner.detach(id)
    }
    fn attached_device(&self, id: &VolumeId) -> Result<Option<PathBuf>> {
        self.inner.attached_device(id)
    }
    fn refresh_device(&self, id: &VolumeId) -> Result<()> {
        self.inner.refresh_device(id)
    }
    fn health(&self, record: &VolumeRecord) -> Option<String> {
        self.inner.health(record)
    }
}

fn controller(dir: &std::path::Path) -> (Controller, Arc<Gated>) {
    let inner = LoopBackend::open(LoopConfig {
        dir: dir.to_owned(),
        capacity: Some(256 * MIB),
        reserve: Some(0),
        provisioning: Provisioning::Sparse,
    })
    .expect("loop backend on a temp dir");
    let gated = Arc::new(Gated {
        inner,
        gate: Mutex::new((false, 0)),
        changed: Condvar::new(),
    });
    let identity = NodeIdentity {
        node_id: "n1".into(),
        machine_id: "0123456789abcdef".into(),
        topology: Segment::new(),
    };
    let work = Work::new(LockMap::with_wait(Duration::from_millis(100)));
    (Controller::new(gated.clone(), work, identity), gated)
}

fn request(name: &str, source: Option<ContentSource>) -> CreateRequest {
    CreateRequest {
        name: name.into(),
        capacity: CapacityRange {
            required: 8 * MIB,
            limit: 0,
        },
        capabilities: vec![Capability {
            access_type: AccessType::Block,
            access_mode: AccessMode::SingleNodeWriter,
        }],
        params: VolumeParams::default(),
        requisite: vec![],
        source,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_on_a_busy_volume_answers_busy_instead_of_queueing() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, gate) = controller(dir.path());
    let controller = Arc::new(controller);
    gate.shut(true);
    let first = tokio::spawn({
        let c = controller.clone();
        async move { c.create(request("pvc-slow", None)).await }
    });
    tokio::task::spawn_blocking({
        let gate = gate.clone();
        move || gate.wait_for_one_held()
    })
    .await
    .unwrap();
    // The same name while the first create runs: ABORTED, not a second volume or a wait.
    match controller.create(request("pvc-slow", None)).await {
        Err(Error::Busy(key)) => assert!(key.contains("pvc-slow"), "{key}"),
        other => panic!("expected Busy, got {other:?}"),
    }
    gate.shut(false);
    let made = first.await.unwrap().expect("the first create finishes");
    // Once it is done, the retry is answered from the volume that exists.
    let again = controller.create(request("pvc-slow", None)).await.unwrap();
    assert_eq!(made.id, again.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_of_a_copy_cannot_be_deleted_mid_copy() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, gate) = controller(dir.path());
    let controller = Arc::new(controller);
    let source = controller
        .create(request("pvc-source", None))
        .await
        .unwrap();
    let snapshot = controller
        .create_snapshot("snap-1".into(), source.id.as_str())
        .await
        .unwrap();

    // A clone of the volume and a restore of the snapshot, both held mid-copy.
    gate.shut(true);
    let clone = tokio::spawn({
        let c = controller.clone();
        let from = ContentSource::Volume(source.id.clone());
        async move { c.create(request("pvc-clone", Some(from))).await }
    });
    let restore = tokio::spawn({
        let c = controller.clone();
        let from = ContentSource::Snapshot(snapshot.id.clone());
        async move { c.create(request("pvc-restore", Some(from))).await }
    });
    let mut held = 0;
    while held < 2 {
        held = gate.gate.lock().unwrap().1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deleted = controller.delete(source.id.as_str()).await;
    assert!(matches!(deleted, Err(Error::Busy(_))), "{deleted:?}");
    let deleted = controller.delete_snapshot(snapshot.id.as_str()).await;
    assert!(matches!(deleted, Err(Error::Busy(_))), "{deleted:?}");
    assert!(
        gate.inner.get(&source.id).unwrap().is_some(),
        "source deleted mid-copy"
    );

    gate.shut(false);
    clone.await.unwrap().expect("clone finishes");
    restore.await.unwrap().expect("restore finishes");
    // Free again once the copies are done.
    controller
        .delete_snapshot(snapshot.id.as_str())
        .await
        .unwrap();
    controller.delete(source.id.as_str()).await.unwrap();
}

/// A modify whose caller gives up still stores and applies the limits, holding the
/// volume's lock to the end: a publish or another modify meanwhile is told it is busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modify_outlives_its_caller_under_the_volumes_lock() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, gate) = controller(dir.path());
    let volume = controller.create(request("pvc-io", None)).await.unwrap();
    let params: BTreeMap<String, String> = [("writeIOPS".to_owned(), "100".to_owned())].into();
    let (entered_tx, entered) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (applied_tx, applied) = std::sync::mpsc::channel::<IoLimits>();
    let apply = move |_: &dyn Backend, record: &VolumeRecord| {
        entered_tx.send(()).unwrap();
        released.recv().unwrap();
        applied_tx.send(record.params.io_limits).unwrap();
        Ok(())
    };
    let caller = controller.modify(volume.id.as_str(), params.clone(), apply);
    // The caller's deadline passes while the limits are being applied.
    let gave_up = tokio::time::timeout(Duration::from_millis(200), caller).await;
    assert!(gave_up.is_err(), "the modify cannot have finished yet");
    tokio::task::spawn_blocking(move || entered.recv().unwrap())
        .await
        .unwrap();
    let retry = controller
        .modify(
            volume.id.as_str(),
            params,
            |_: &dyn Backend, _: &VolumeRecord| Ok(()),
        )
        .await;
    assert!(matches!(retry, Err(Error::Busy(_))), "{retry:?}");

    release.send(()).unwrap();
    let limits = tokio::task::spawn_blocking(move || applied.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(
        limits.write_iops,
        Some(100),
        "the stored limits are applied"
    );
    let stored = gate.inner.get(&volume.id).unwrap().unwrap();
    assert_eq!(stored.params.io_limits, limits);
}

fn ids(group: &GroupSnapshot) -> Vec<String> {
    group.members.iter().map(|m| m.id.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_snapshots_follow_the_spec_from_create_to_delete() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, _gate) = controller(dir.path());
    let a = controller.create(request("pvc-a", None)).await.unwrap();
    let b = controller.create(request("pvc-b", None)).await.unwrap();
    let both = vec![b.id.to_string(), a.id.to_string()];

    let group = controller
        .create_group_snapshot("g1".into(), &both)
        .await
        .unwrap();
    assert_eq!(group.members.len(), 2);
    let sources: BTreeSet<_> = group
        .members
        .iter()
        .map(|m| m.source_volume.clone())
        .collect();
    assert_eq!(sources, BTreeSet::from([a.id.clone(), b.id.clone()]));
    for member in &group.members {
        assert_eq!(member.group_id(), Some(&group.id));
        assert_eq!(member.created_unix, group.created_unix);
    }
    // Idempotent by name, whatever the order of the sources.
    let again = controller
        .create_group_snapshot("g1".into(), &[a.id.to_string(), b.id.to_string()])
        .await
        .unwrap();
    assert_eq!(again, group);
    // The same name for other sources is ALREADY_EXISTS.
    let other = controller
        .create_group_snapshot("g1".into(), &[a.id.to_string()])
        .await;
    assert!(matches!(other, Err(Error::AlreadyExists(_))), "{other:?}");
    // A CreateSnapshot of the same name is another object: members are no plain snapshots.
    let plain = controller
        .create_snapshot("g1".into(), a.id.as_str())
        .await
        .unwrap();
    assert!(plain.group.is_none());
    assert!(!ids(&group).contains(&plain.id.to_string()));

    // Bad sources.
    let elsewhere = VolumeId::generate().to_string();
    match controller
        .create_group_snapshot("g2".into(), &[a.id.to_string(), elsewhere.clone()])
        .await
    {
        Err(Error::Precondition(m)) => {
            assert!(m.contains(&elsewhere) && m.contains("one node"), "{m}")
        }
        other => panic!("a volume of another node: {other:?}"),
    }
    let twice = controller
        .create_group_snapshot("g2".into(), &[a.id.to_string(), a.id.to_string()])
        .await;
    assert!(matches!(twice, Err(Error::InvalidArgument(_))), "{twice:?}");
    let hostile = controller
        .create_group_snapshot("g2".into(), &["../../etc".into()])
        .await;
    assert!(
        matches!(hostile, Err(Error::VolumeNotFound(_))),
        "{hostile:?}"
    );
    for (name, sources) in [
        ("", both.clone()),
        ("g2", vec![]),
        ("g2", vec![String::new()]),
    ] {
        let r = controller
            .create_group_snapshot(name.into(), &sources)
            .await;
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{name:?} {sources:?}: {r:?}"
        );
    }
    assert!(
        controller
            .list_snapshots("", "", "", 0)
            .await
            .unwrap()
            .0
            .len()
            == 3
    );

    // Members are listed with their group and cannot be deleted alone.
    let (listed, _) = controller
        .list_snapshots("", a.id.as_str(), "", 0)
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .filter(|s| s.group_id() == Some(&group.id))
            .count(),
        1
    );
    let member = group.members[0].id.to_string();
    let alone = controller.delete_snapshot(&member).await;
    assert!(
        matches!(alone, Err(Error::InvalidArgument(ref m)) if m.contains(group.id.as_str())),
        "{alone:?}"
    );

    // A member restores like any snapshot.
    let restored = controller
        .create(request(
            "pvc-restored",
            Some(ContentSource::Snapshot(group.members[0].id.clone())),
        ))
        .await
        .unwrap();

    // Get and Delete check snapshot_ids when given.
    let gid = group.id.to_string();
    assert_eq!(
        controller
            .get_group_snapshot(&gid, &ids(&group))
            .await
            .unwrap(),
        group
    );
    assert_eq!(
        controller.get_group_snapshot(&gid, &[]).await.unwrap(),
        group
    );
    let one = vec![member.clone()];
    for wrong in [one.clone(), vec![member.clone(), plain.id.to_string()]] {
        let r = controller.get_group_snapshot(&gid, &wrong).await;
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{wrong:?}: {r:?}"
        );
        let r = controller.delete_group_snapshot(&gid, &wrong).await;
        assert!(
            matches!(r, Err(Error::InvalidArgument(_))),
            "{wrong:?}: {r:?}"
        );
    }
    let r = controller
        .get_group_snapshot(&SnapshotId::generate().to_string(), &[])
        .await;
    assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    let r = controller.get_group_snapshot("", &[]).await;
    assert!(matches!(r, Err(Error::InvalidArgument(_))), "{r:?}");
    controller
        .delete_group_snapshot(&gid, &ids(&group))
        .await
        .unwrap();
    controller
        .delete_group_snapshot(&gid, &ids(&group))
        .await
        .unwrap();
    controller
        .delete_group_snapshot("not-a-group", &[])
        .await
        .unwrap();
    let r = controller.get_group_snapshot(&gid, &[]).await;
    assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");
    let (left, _) = controller.list_snapshots("", "", "", 0).await.unwrap();
    assert_eq!(
        left,
        vec![plain],
        "the group's members are gone, nothing else"
    );
    controller.delete(restored.id.as_str()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_group_is_never_shown_and_the_retry_cuts_it_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, gate) = controller(dir.path());
    let a = controller.create(request("pvc-a", None)).await.unwrap();
    let b = controller.create(request("pvc-b", None)).await.unwrap();
    // What a driver killed mid-cut leaves: one member of two.
    let debris = SnapshotRecord {
        id: SnapshotId::generate(),
        name: "g1".into(),
        source_volume: a.id.clone(),
        size_bytes: 8 * MIB,
        created_unix: 1,
        group: Some(crate::backend::GroupMembership {
            id: crate::model::GroupSnapshotId::generate(),
            members: 2,
        }),
    };
    gate.inner.create_snapshot(&debris).unwrap();
    assert!(controller
        .list_snapshots("", "", "", 0)
        .await
        .unwrap()
        .0
        .is_empty());
    let r = controller
        .get_group_snapshot(debris.group_id().unwrap().as_str(), &[])
        .await;
    assert!(matches!(r, Err(Error::NotFound(_))), "{r:?}");

    let both = vec![a.id.to_string(), b.id.to_string()];
    let group = controller
        .create_group_snapshot("g1".into(), &both)
        .await
        .unwrap();
    assert_ne!(Some(&group.id), debris.group_id());
    let (all, _) = controller.list_snapshots("", "", "", 0).await.unwrap();
    assert_eq!(
        all, group.members,
        "the debris went, the new group is whole"
    );
    assert!(gate.inner.get_snapshot(&debris.id).unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_group_snapshot_holds_its_name_and_every_source() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, gate) = controller(dir.path());
    let controller = Arc::new(controller);
    let a = controller.create(request("pvc-a", None)).await.unwrap();
    let b = controller.create(request("pvc-b", None)).await.unwrap();
    let both = vec![a.id.to_string(), b.id.to_string()];
    gate.shut(true);
    let first = tokio::spawn({
        let c = controller.clone();
        let both = both.clone();
        async move { c.create_group_snapshot("g1".into(), &both).await }
    });
    tokio::task::spawn_blocking({
        let gate = gate.clone();
        move || gate.wait_for_one_held()
    })
    .await
    .unwrap();
    let retry = controller.create_group_snapshot("g1".into(), &both).await;
    assert!(matches!(retry, Err(Error::Busy(_))), "{retry:?}");
    let delete = controller.delete(b.id.as_str()).await;
    assert!(
        matches!(delete, Err(Error::Busy(ref k)) if k == b.id.as_str()),
        "{delete:?}"
    );
    gate.shut(false);
    let made = first.await.unwrap().unwrap();
    let again = controller
        .create_group_snapshot("g1".into(), &both)
        .await
        .unwrap();
    assert_eq!(made, again);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_read_by_peers_is_not_deleted_until_every_read_ends() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, _gate) = controller(dir.path());
    let source = controller.create(request("pvc-src", None)).await.unwrap();
    let snap = controller
        .create_snapshot("snap".into(), source.id.as_str())
        .await
        .unwrap();
    // Two nodes restore it at once: both reads are served.
    let first = controller
        .hold_snapshot(&snap.id)
        .await
        .unwrap()
        .expect("held");
    let second = controller
        .hold_snapshot(&snap.id)
        .await
        .unwrap()
        .expect("held");
    assert_eq!(first.record.id, snap.id);
    assert_eq!(first.bytes.len, 8 * MIB);
    match controller.delete_snapshot(snap.id.as_str()).await {
        Err(Error::Busy(why)) => assert!(why.contains("being read"), "{why}"),
        other => panic!("deleted under a reader: {other:?}"),
    }
    drop(first);
    assert!(matches!(
        controller.delete_snapshot(snap.id.as_str()).await,
        Err(Error::Busy(_))
    ));
    drop(second);
    controller.delete_snapshot(snap.id.as_str()).await.unwrap();
    // Gone: a later read finds nothing.
    assert!(controller.hold_snapshot(&snap.id).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filled_volume_exists_only_once_filled_and_a_retry_finds_it() {
    let dir = tempfile::tempdir().unwrap();
    let (controller, _gate) = controller(dir.path());
    let failed = controller
        .create_filled(request("pvc-pulled", None), 4 * MIB, |_| {
            Err(Error::Unavailable("the peer went away".into()))
        })
        .await;
    assert!(matches!(failed, Err(Error::Unavailable(_))), "{failed:?}");
    assert!(
        controller.list("", 0).await.unwrap().0.is_empty(),
        "nothing left"
    );
    let made = controller
        .create_filled(request("pvc-pulled", None), 4 * MIB, |range| {
            let io = |e: std::io::Error| Error::Internal(e.to_string());
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&range.device)
                .map_err(io)?;
            std::os::unix::fs::FileExt::write_all_at(&f, b"pulled", range.offset).map_err(io)
        })
        .await
        .unwrap();
    assert_eq!(
        made.capacity_bytes,
        8 * MIB,
        "the request's size, above the content's"
    );
    let again = controller
        .create_filled(request("pvc-pulled", None), 4 * MIB, |_| {
            panic!("a retry of a filled volume fills nothing")
        })
        .await
        .unwrap();
    assert_eq!(again.id, made.id);
    // A local source is not the caller's to fill.
    let snap = controller
        .create_snapshot("s".into(), made.id.as_str())
        .await
        .unwrap();
    let wrong = controller
        .create_filled(
            request("pvc-other", Some(ContentSource::Snapshot(snap.id))),
            0,
            |_| Ok(()),
        )
        .await;
    assert!(matches!(wrong, Err(Error::Internal(_))), "{wrong:?}");
}
