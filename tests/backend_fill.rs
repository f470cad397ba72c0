//! Volumes filled by their caller (`Backend::create_filled`) and the bytes of
//! a local snapshot (`Backend::snapshot_bytes`), on real backends: a loop
//! directory and an LVM volume group on a loop device. What the fill writes
//! reads back through a later attach; the rest of the volume reads as zeros,
//! even on extents a deleted volume held; a failed or interrupted fill leaves
//! nothing behind; the fill never reaches another volume's bytes.

#[path = "common/vg.rs"]
mod vg;

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kennel::backend::loop_files::{LoopBackend, LoopConfig, Provisioning};
use kennel::backend::lvm::params::DeviceClass;
use kennel::backend::lvm::{Activation, LvmBackend, LvmConfig};
use kennel::backend::{Backend, ByteRange, GroupMembership, SnapshotRecord, VolumeRecord};
use kennel::error::Error;
use kennel::model::volume_size::CapacityRange;
use kennel::model::{GroupSnapshotId, SnapshotId, VolumeId};
use vg::{can_run, device_mapper, lvm_ok, skip, TestVg};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;

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
        node_id: "fill-test".into(),
        machine_id: "m".into(),
        created_unix: 1,
        source: None,
    }
}

fn snapshot(source: &VolumeId, group: Option<GroupMembership>) -> SnapshotRecord {
    SnapshotRecord {
        id: SnapshotId::generate(),
        name: "snap".into(),
        source_volume: source.clone(),
        size_bytes: SIZE,
        created_unix: 1,
        group,
    }
}

fn pattern(seed: u8, len: u64) -> Vec<u8> {
    (0..len as usize)
        .map(|i| (i % 251) as u8 ^ seed | 1)
        .collect()
}

fn read_range(range: &ByteRange) -> Vec<u8> {
    let mut buf = vec![0u8; range.len as usize];
    File::open(&range.device)
        .expect("open the range's device")
        .read_exact_at(&mut buf, range.offset)
        .expect("read the range");
    buf
}

/// Write `bytes` at `at` inside the range, as a caller of `create_filled` does.
fn write_range(range: &ByteRange, at: u64, bytes: &[u8]) {
    assert!(
        at + bytes.len() as u64 <= range.len,
        "the test stays inside"
    );
    let file = OpenOptions::new()
        .write(true)
        .open(&range.device)
        .expect("the range's device opens for writing");
    file.write_all_at(bytes, range.offset + at)
        .expect("write into the range");
    file.sync_all().expect("sync");
}

fn read_volume(b: &dyn Backend, id: &VolumeId) -> Vec<u8> {
    let record = b.get(id).expect("get").expect("the volume exists");
    let device = b.attach(id).expect("attach");
    let mut buf = vec![0u8; record.capacity_bytes as usize];
    File::open(&device)
        .expect("open the attached device")
        .read_exact_at(&mut buf, 0)
        .expect("read the volume whole");
    b.detach(id).expect("detach");
    buf
}

fn write_volume(b: &dyn Backend, id: &VolumeId, bytes: &[u8]) {
    let device = b.attach(id).expect("attach");
    let file = OpenOptions::new()
        .write(true)
        .open(&device)
        .expect("open the attached device");
    file.write_all_at(bytes, 0).expect("write the volume");
    file.sync_all().expect("sync");
    drop(file);
    b.detach(id).expect("detach");
}

fn nonzero(bytes: &[u8]) -> usize {
    bytes.iter().filter(|&&b| b != 0).count()
}

/// What a backend leaves on the host for a volume ID (an LV, an image or a record file).
type Traces<'a> = &'a dyn Fn(&VolumeId) -> Vec<String>;

/// A fill's bytes read back through attach; the volume is hidden until the fill returns;
/// a second call does not fill again.
fn fill_reads_back_and_is_idempotent(b: &dyn Backend) {
    let rec = record("filled", SIZE);
    let head = pattern(1, 64 * 1024);
    let tail = pattern(2, 4096);
    let mut calls = 0;
    b.create_filled(&rec, &mut |range| {
        calls += 1;
        assert_eq!(range.len, SIZE, "the range is the whole volume");
        assert_eq!(b.get(&rec.id)?, None, "not a volume while filling");
        assert_eq!(b.find_by_name("filled")?, None);
        assert!(!b.list()?.iter().any(|r| r.id == rec.id));
        assert_eq!(nonzero(&read_range(range)), 0, "a blank volume");
        write_range(range, 0, &head);
        write_range(range, SIZE - tail.len() as u64, &tail);
        Ok(())
    })
    .expect("create_filled");
    assert_eq!(calls, 1);
    let got = b.get(&rec.id).expect("get").expect("a volume once filled");
    assert_eq!(got.capacity_bytes, SIZE);
    assert_eq!(
        b.find_by_name("filled").expect("find").map(|r| r.id),
        Some(rec.id.clone())
    );

    let seen = read_volume(b, &rec.id);
    assert_eq!(&seen[..head.len()], &head[..]);
    assert_eq!(&seen[seen.len() - tail.len()..], &tail[..]);
    assert_eq!(
        nonzero(&seen[head.len()..seen.len() - tail.len()]),
        0,
        "unwritten bytes read as zeros"
    );

    b.create_filled(&rec, &mut |_| {
        calls += 1;
        Ok(())
    })
    .expect("again");
    assert_eq!(calls, 1, "a committed volume is not filled again");
    assert_eq!(read_volume(b, &rec.id), seen, "and is left as it was");
    b.delete(&rec.id).expect("delete");
}

/// A failing fill leaves nothing (its bytes neither: a retry starts blank).
fn failed_fill_leaves_nothing(b: &dyn Backend, traces: Traces<'_>) {
    let rec = record("fails", SIZE);
    let before = b.capacity(&BTreeMap::new()).expect("capacity");
    let failed = b.create_filled(&rec, &mut |range| {
        write_range(range, 0, &pattern(3, MIB));
        Err(Error::Unavailable("the peer went away".into()))
    });
    assert!(
        matches!(failed, Err(Error::Unavailable(_))),
        "the fill's error is returned: {failed:?}"
    );
    assert_eq!(b.get(&rec.id).expect("get"), None);
    assert_eq!(b.find_by_name("fails").expect("find"), None);
    assert!(b.list().expect("list").is_empty());
    assert_eq!(traces(&rec.id), Vec::<String>::new(), "nothing on the host");
    assert_eq!(
        b.capacity(&BTreeMap::new()).expect("capacity"),
        before,
        "its room is back"
    );

    let mut seen = None;
    b.create_filled(&rec, &mut |range| {
        seen = Some(nonzero(&read_range(range)));
        Ok(())
    })
    .expect("a retry succeeds");
    assert_eq!(seen, Some(0), "the retry starts blank");
    b.delete(&rec.id).expect("delete");
}

/// Blank bytes of a filled volume on a deleted volume's space read as zeros, and a fill
/// that writes its whole range touches no other volume.
fn no_byte_of_another_volume(b: &dyn Backend, vg: Option<&TestVg>) {
    let old = record("old-tenant", SIZE);
    let neighbour = record("neighbour", SIZE);
    b.create(&old).expect("create");
    b.create(&neighbour).expect("create");
    write_volume(b, &old.id, &vec![0xaa; SIZE as usize]);
    let kept = pattern(5, SIZE);
    write_volume(b, &neighbour.id, &kept);
    let old_place = vg.map(|vg| vg.lv_offset(old.id.as_str()).expect("contiguous LV"));
    b.delete(&old.id).expect("delete");

    let new = record("new-tenant", SIZE);
    let prefix = pattern(6, 4096);
    b.create_filled(&new, &mut |range| {
        write_range(range, 0, &prefix);
        Ok(())
    })
    .expect("create_filled");
    if let Some(vg) = vg {
        assert_eq!(
            vg.lv_offset(new.id.as_str()),
            old_place,
            "the new volume is on the deleted one's extents"
        );
    }
    let seen = read_volume(b, &new.id);
    assert_eq!(&seen[..prefix.len()], &prefix[..]);
    let leaked = nonzero(&seen[prefix.len()..]);
    assert_eq!(
        leaked, 0,
        "{leaked} bytes of the deleted volume are readable"
    );

    let whole = record("whole", SIZE);
    b.create_filled(&whole, &mut |range| {
        write_range(range, 0, &vec![0xcc; range.len as usize]);
        Ok(())
    })
    .expect("create_filled");
    assert_eq!(read_volume(b, &whole.id), vec![0xcc; SIZE as usize]);
    assert_eq!(
        read_volume(b, &neighbour.id),
        kept,
        "the neighbour is intact"
    );
    assert_eq!(&read_volume(b, &new.id)[..], &seen[..], "so is the other");
    for id in [&neighbour.id, &new.id, &whole.id] {
        b.delete(id).expect("delete");
    }
}

/// A snapshot's bytes are the source's at the cut; unknown and incomplete ones are None.
fn snapshot_bytes_are_the_cut(b: &dyn Backend) {
    let source = record("source", SIZE);
    b.create(&source).expect("create");
    let at_cut = pattern(7, SIZE);
    write_volume(b, &source.id, &at_cut);
    let snap = snapshot(&source.id, None);
    b.create_snapshot(&snap).expect("snapshot");
    write_volume(b, &source.id, &pattern(8, SIZE));

    let range = b
        .snapshot_bytes(&snap.id)
        .expect("snapshot_bytes")
        .expect("a local snapshot");
    assert!(range.len >= SIZE, "{range:?}");
    assert_eq!(&read_range(&range)[..SIZE as usize], &at_cut[..]);
    assert_eq!(
        b.snapshot_bytes(&SnapshotId::generate())
            .expect("snapshot_bytes"),
        None
    );

    // A group missing a member (an interrupted deletion) exposes none of its members.
    let other = record("other", SIZE);
    b.create(&other).expect("create");
    let group = GroupMembership {
        id: GroupSnapshotId::generate(),
        members: 2,
    };
    let members = [
        snapshot(&source.id, Some(group.clone())),
        snapshot(&other.id, Some(group)),
    ];
    b.create_group_snapshot(&members).expect("group snapshot");
    assert!(b
        .snapshot_bytes(&members[0].id)
        .expect("snapshot_bytes")
        .is_some());
    b.delete_snapshot(&members[1].id).expect("delete a member");
    assert_eq!(
        b.snapshot_bytes(&members[0].id).expect("snapshot_bytes"),
        None,
        "a member of an incomplete group"
    );

    b.delete_snapshot(&members[0].id).expect("delete");
    b.delete_snapshot(&snap.id).expect("delete");
    b.delete(&source.id).expect("delete");
    b.delete(&other.id).expect("delete");
}

fn can_loop() -> bool {
    if !nix::unistd::geteuid().is_root() {
        return !skip::cannot_run("attaching loop devices needs root");
    }
    if !Path::new("/dev/loop-control").exists() {
        return !skip::cannot_run("/dev/loop-control is missing");
    }
    true
}

fn open_loop(dir: &Path, provisioning: Provisioning) -> LoopBackend {
    LoopBackend::open(LoopConfig {
        dir: dir.to_owned(),
        capacity: Some(256 * MIB),
        reserve: Some(0),
        provisioning,
    })
    .expect("open the loop backend")
}

fn loop_traces(dir: &Path) -> impl Fn(&VolumeId) -> Vec<String> + '_ {
    move |id| {
        ["img", "json"]
            .iter()
            .map(|ext| dir.join(format!("{id}.{ext}")))
            .filter(|p| p.exists())
            .map(|p| p.display().to_string())
            .collect()
    }
}

#[test]
fn loop_fill_and_snapshot_bytes() {
    if !can_loop() {
        return;
    }
    for provisioning in [Provisioning::Sparse, Provisioning::Preallocated] {
        let dir = tempfile::tempdir().expect("temp dir");
        let b = open_loop(dir.path(), provisioning);
        let images = b.dir().to_owned();
        fill_reads_back_and_is_idempotent(&b);
        failed_fill_leaves_nothing(&b, &loop_traces(&images));
        no_byte_of_another_volume(&b, None);
        snapshot_bytes_are_the_cut(&b);
    }
}

#[test]
fn loop_snapshot_still_being_cut_is_not_exposed() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let b = open_loop(dir.path(), Provisioning::Sparse);
    // An image without its record: a cut in progress.
    let cutting = SnapshotId::generate();
    std::fs::write(
        b.dir().join("snapshots").join(format!("{cutting}.img")),
        vec![7u8; MIB as usize],
    )
    .expect("an uncommitted image");
    assert_eq!(b.snapshot_bytes(&cutting).expect("snapshot_bytes"), None);
}

#[test]
fn loop_fill_interrupted_by_a_crash_is_swept_at_the_next_start() {
    if !can_loop() {
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let rec = record("crashed", SIZE);
    let image: PathBuf;
    {
        let b = open_loop(dir.path(), Provisioning::Sparse);
        image = b.dir().join(format!("{}.img", rec.id));
        let crashed = catch_unwind(AssertUnwindSafe(|| {
            b.create_filled(&rec, &mut |range| {
                write_range(range, 0, &pattern(9, MIB));
                panic!("the process dies mid-fill");
            })
        }));
        assert!(crashed.is_err());
        assert!(image.exists(), "the half-filled image is still there");
        assert_eq!(b.get(&rec.id).expect("get"), None, "but no volume");
    }
    let b = open_loop(dir.path(), Provisioning::Sparse);
    assert!(!image.exists(), "the next start removed it");
    assert!(b.list().expect("list").is_empty());
}

fn lvm_config(vg: &TestVg, locks: &Path) -> LvmConfig {
    LvmConfig {
        classes: vec![DeviceClass::parse(&vg.name).expect("VG name")],
        activation: Activation::Auto,
        thin_overprovision_ratio: 1.0,
        lock_dir: locks.to_owned(),
        refresh_interval: Duration::from_secs(3600),
    }
}

fn lv_traces(vg: &TestVg) -> impl Fn(&VolumeId) -> Vec<String> + '_ {
    move |id| vg.lv(id.as_str()).map(|lv| lv.name).into_iter().collect()
}

#[test]
fn lvm_fill_and_snapshot_bytes() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let b = LvmBackend::open(lvm_config(&vg, locks.path())).expect("open the backend");
    fill_reads_back_and_is_idempotent(&b);
    failed_fill_leaves_nothing(&b, &lv_traces(&vg));
    no_byte_of_another_volume(&b, Some(&vg));
    snapshot_bytes_are_the_cut(&b);
    assert!(vg.lvs().is_empty(), "{:?}", vg.lvs());
}

#[test]
fn lvm_pending_snapshot_is_not_exposed() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let b = LvmBackend::open(lvm_config(&vg, locks.path())).expect("open the backend");
    // A snapshot LV whose copy is still running: the owner and pending tags only.
    let cutting = SnapshotId::generate();
    lvm_ok(
        "lvcreate",
        &[
            if device_mapper() { "-ay" } else { "-an" },
            "-y",
            "-Wn",
            "-Zn",
            "-L",
            "8m",
            "--addtag",
            "kennel.csi.dev",
            "--addtag",
            "kennel.csi.dev/pending",
            "-n",
            cutting.as_str(),
            &vg.name,
        ],
    );
    assert_eq!(b.snapshot_bytes(&cutting).expect("snapshot_bytes"), None);
}

#[test]
fn lvm_fill_interrupted_by_a_crash_is_swept_at_the_next_start() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let rec = record("crashed", SIZE);
    let place;
    {
        let b = LvmBackend::open(lvm_config(&vg, locks.path())).expect("open the backend");
        let crashed = catch_unwind(AssertUnwindSafe(|| {
            b.create_filled(&rec, &mut |range| {
                write_range(range, 0, &vec![0xaa; range.len as usize]);
                panic!("the process dies mid-fill");
            })
        }));
        assert!(crashed.is_err());
        let lv = vg.lv(rec.id.as_str()).expect("the half-filled LV is there");
        assert!(
            lv.tags.iter().any(|t| t == "kennel.csi.dev/pending"),
            "{lv:?}"
        );
        assert_eq!(b.get(&rec.id).expect("get"), None, "but no volume");
        place = vg.lv_offset(rec.id.as_str());
    }
    let b = LvmBackend::open(lvm_config(&vg, locks.path())).expect("reopen the backend");
    assert!(
        vg.lv(rec.id.as_str()).is_none(),
        "the next start removed it"
    );
    assert!(b.list().expect("list").is_empty());
    // Zeroed before it went: a new volume on its extents reads as zeros.
    let next = record("next", SIZE);
    b.create(&next).expect("create");
    assert_eq!(vg.lv_offset(next.id.as_str()), place);
    assert_eq!(nonzero(&read_volume(&b, &next.id)), 0);
    b.delete(&next.id).expect("delete");
}

#[test]
fn lvm_thin_fill_and_snapshot_bytes_need_device_mapper() {
    if !can_run() {
        return;
    }
    let vg = TestVg::new("1G");
    let locks = tempfile::tempdir().expect("temp dir");
    let b = LvmBackend::open(lvm_config(&vg, locks.path())).expect("open the backend");
    let mut thin = record("thin", SIZE);
    thin.params.backend = [("type", "thin"), ("thinPool", "pool")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if !device_mapper() {
        let mut called = false;
        let refused = b.create_filled(&thin, &mut |_| {
            called = true;
            Ok(())
        });
        assert!(
            matches!(&refused, Err(Error::Precondition(msg)) if msg.contains("device-mapper")),
            "{refused:?}"
        );
        assert!(!called);
        assert!(vg.lvs().is_empty(), "{:?}", vg.lvs());
        return;
    }
    lvm_ok(
        "lvcreate",
        &["-y", "-L", "128m", "-T", &format!("{}/pool", vg.name)],
    );
    let prefix = pattern(10, MIB);
    b.create_filled(&thin, &mut |range| {
        assert_eq!(range.len, SIZE);
        assert_eq!(nonzero(&read_range(range)), 0, "a blank thin volume");
        write_range(range, 0, &prefix);
        Ok(())
    })
    .expect("create_filled of a thin volume");
    let seen = read_volume(&b, &thin.id);
    assert_eq!(&seen[..prefix.len()], &prefix[..]);
    assert_eq!(nonzero(&seen[prefix.len()..]), 0);

    let snap = snapshot(&thin.id, None);
    b.create_snapshot(&snap).expect("thin snapshot");
    write_volume(&b, &thin.id, &pattern(11, SIZE));
    let range = b
        .snapshot_bytes(&snap.id)
        .expect("snapshot_bytes")
        .expect("a thin snapshot");
    assert_eq!(&read_range(&range)[..SIZE as usize], &seen[..]);
    b.delete_snapshot(&snap.id).expect("delete");
    b.delete(&thin.id).expect("delete");
}
