use super::*;
use crate::model::volume_size::CapacityRange;

fn record(name: &str, size: u64) -> VolumeRecord {
    VolumeRecord {
        id: VolumeId::generate(),
        name: name.to_owned(),
        capacity_bytes: size,
        requested: CapacityRange::default(),
        capabilities: vec![],
        params: Default::default(),
        node_id: "n".into(),
        machine_id: "m".into(),
        created_unix: 0,
        source: None,
    }
}

fn open(dir: &Path, capacity: u64, provisioning: Provisioning) -> LoopBackend {
    LoopBackend::open(LoopConfig {
        dir: dir.to_owned(),
        capacity: Some(capacity),
        reserve: Some(0),
        provisioning,
    })
    .expect("test setup")
}

#[test]
fn create_persists_and_reopen_recovers() {
    let dir = tempfile::tempdir().expect("test setup");
    let rec = record("a", 4 * MIB);
    {
        let backend = open(dir.path(), 64 * MIB, Provisioning::Preallocated);
        backend.create(&rec).expect("test setup");
        let meta = fs::metadata(backend.volumes.image_path(&rec.id)).expect("test setup");
        assert_eq!(meta.len(), 4 * MIB);
        // Preallocated: the blocks are really there.
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 >= 4 * MIB);
    }
    let backend = open(dir.path(), 64 * MIB, Provisioning::Preallocated);
    assert_eq!(
        backend.find_by_name("a").expect("test setup"),
        Some(rec.clone())
    );
    assert_eq!(
        backend
            .capacity(&BTreeMap::new())
            .expect("test setup")
            .available_bytes,
        60 * MIB
    );
    backend.delete(&rec.id).expect("test setup");
    backend.delete(&rec.id).expect("test setup");
    assert!(!backend.volumes.image_path(&rec.id).exists());
    assert_eq!(backend.list().expect("test setup"), vec![]);
}

#[test]
fn only_one_driver_per_directory() {
    let dir = tempfile::tempdir().expect("test setup");
    let _first = open(dir.path(), 64 * MIB, Provisioning::Sparse);
    let second = LoopBackend::open(LoopConfig {
        dir: dir.path().to_owned(),
        capacity: Some(MIB),
        reserve: Some(0),
        provisioning: Provisioning::Sparse,
    });
    assert!(matches!(second, Err(Error::Precondition(_))));
}

#[test]
fn pool_limits_creation_and_expansion() {
    let dir = tempfile::tempdir().expect("test setup");
    let backend = open(dir.path(), 10 * MIB, Provisioning::Sparse);
    let a = record("a", 8 * MIB);
    backend.create(&a).expect("test setup");
    assert!(matches!(
        backend.create(&record("b", 4 * MIB)),
        Err(Error::Exhausted(_))
    ));
    assert!(matches!(
        backend.expand(&a.id, 12 * MIB),
        Err(Error::Exhausted(_))
    ));
    let grown = backend.expand(&a.id, 10 * MIB).expect("test setup");
    assert_eq!(grown.capacity_bytes, 10 * MIB);
    assert_eq!(
        fs::metadata(backend.volumes.image_path(&a.id))
            .expect("test setup")
            .len(),
        10 * MIB
    );
    drop(backend);
    let backend = open(dir.path(), 10 * MIB, Provisioning::Sparse);
    assert_eq!(
        backend
            .get(&a.id)
            .expect("test setup")
            .expect("test setup")
            .capacity_bytes,
        10 * MIB
    );
    assert_eq!(
        backend
            .capacity(&BTreeMap::new())
            .expect("test setup")
            .available_bytes,
        0
    );
}

#[test]
fn snapshots_and_clones_copy_data() {
    let dir = tempfile::tempdir().expect("test setup");
    let backend = open(dir.path(), 64 * MIB, Provisioning::Sparse);
    let origin = record("origin", 4 * MIB);
    backend.create(&origin).expect("test setup");
    let origin_image = backend.volumes.image_path(&origin.id);
    fs::write(&origin_image, b"precious data").expect("test setup");
    let snap = SnapshotRecord {
        id: SnapshotId::generate(),
        name: "snap".into(),
        source_volume: origin.id.clone(),
        size_bytes: 4 * MIB,
        created_unix: 0,
        group: None,
    };
    backend.create_snapshot(&snap).expect("test setup");
    backend.create_snapshot(&snap).expect("test setup");
    fs::write(&origin_image, b"overwritten!!").expect("test setup");

    let mut restored = record("restored", 8 * MIB);
    restored.source = Some(ContentSource::Snapshot(snap.id.clone()));
    backend.create(&restored).expect("test setup");
    let data = fs::read(backend.volumes.image_path(&restored.id)).expect("test setup");
    assert_eq!(&data[..13], b"precious data");
    assert_eq!(data.len() as u64, 8 * MIB);

    let mut clone = record("clone", 4 * MIB);
    clone.source = Some(ContentSource::Volume(origin.id.clone()));
    backend.create(&clone).expect("test setup");
    assert_eq!(
        &fs::read(backend.volumes.image_path(&clone.id)).expect("test setup")[..13],
        b"overwritten!!"
    );

    let mut missing = record("missing", 4 * MIB);
    missing.source = Some(ContentSource::Snapshot(SnapshotId::generate()));
    assert!(matches!(backend.create(&missing), Err(Error::NotFound(_))));
    assert_eq!(
        backend.list_snapshots().expect("test setup"),
        vec![snap.clone()]
    );
    backend.delete_snapshot(&snap.id).expect("test setup");
    backend.delete_snapshot(&snap.id).expect("test setup");
    assert!(backend.list_snapshots().expect("test setup").is_empty());
}

#[test]
fn unknown_parameters_are_refused() {
    let dir = tempfile::tempdir().expect("test setup");
    let backend = open(dir.path(), 64 * MIB, Provisioning::Sparse);
    let params = BTreeMap::from([("thinPool".to_owned(), "x".to_owned())]);
    assert!(matches!(
        backend.check_params(&params),
        Err(Error::InvalidArgument(_))
    ));
    assert!(backend.check_params(&BTreeMap::new()).is_ok());
}
