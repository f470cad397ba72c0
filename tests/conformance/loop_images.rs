//! Behaviour of the loop backend's image files: preallocated versus sparse
//! images, and the debris an interrupted create leaves beside them. Only the
//! loop target includes this module (tests/lvm_crash.rs covers pending LVs).

use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::common::*;
use kennel::csi::pb;
use tonic::Code;

const T: u64 = 240;

/// `KENNEL_TEST_BACKEND=lvm` on the loop target: these tests have nothing to test.
fn loop_images_do_not_apply() -> bool {
    Backend::current() == Backend::Lvm && cannot_run("loop image tests need the loop backend")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_volume_preallocated_allocates_and_sparse_does_not() {
    if loop_images_do_not_apply() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::preallocated("256MiB")).await;
        let vol = td.create("pvc-pre", 32 * MIB, block_cap()).await;
        let meta = fs::metadata(td.image_path(&vol.volume_id)).unwrap();
        assert_eq!(meta.len(), 32 * MIB as u64);
        assert!(
            meta.blocks() * 512 >= 32 * MIB as u64,
            "preallocated image has only {} bytes allocated",
            meta.blocks() * 512
        );
        drop(td);

        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-sparse", 32 * MIB, block_cap()).await;
        let meta = fs::metadata(td.image_path(&vol.volume_id)).unwrap();
        assert_eq!(meta.len(), 32 * MIB as u64);
        assert!(
            meta.blocks() * 512 < MIB as u64,
            "sparse image has {} bytes allocated",
            meta.blocks() * 512
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debris_of_an_interrupted_create_is_not_a_volume() {
    if loop_images_do_not_apply() {
        return;
    }
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::preallocated("64MiB")).await;
        let kept = td.create("pvc-kept", 16 * MIB, block_cap()).await;
        td.kill();
        // An image whose record was never committed, and a half-written record.
        let orphan = "kv-zzzzzzzzzzzzzzzzzzzzzzzz";
        let orphan_image = td.image_path(orphan);
        fs::write(&orphan_image, vec![0u8; 4096]).unwrap();
        let temp_record = td.loop_dir.join("kv-yyyyyyyyyyyyyyyyyyyyyyyy.json.tmp");
        fs::write(&temp_record, b"{\"id\": \"kv-yy").unwrap();
        td.start_again().await;
        assert_eq!(td.list_all().await, vec![kept]);
        assert_eq!(td.available_capacity(None).await, 48 * MIB);
        assert!(!orphan_image.exists(), "orphan image not removed");
        assert!(!temp_record.exists(), "temporary record not removed");
        // The pool is whole: the orphan does not count against it.
        td.create("pvc-fill", 48 * MIB, block_cap()).await;
    })
    .await
}

/// A volume whose record is lost (its JSON removed, then a restart) while
/// staged and published: unpublish and unstage still take down what is
/// Kennel's at those paths and answer OK, so the pod can terminate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_and_unstage_clean_up_a_volume_whose_record_is_lost() {
    if loop_images_do_not_apply() || !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let mut volumes = Vec::new();
        for cap in [mount_cap("ext4"), block_cap()] {
            let block = is_block(&cap);
            let vol = td
                .create(&format!("pvc-lost-{block}"), 16 * MIB, cap.clone())
                .await;
            td.stage(&vol.volume_id, cap.clone()).await;
            let target = td.publish(&vol.volume_id, cap.clone(), block).await;
            volumes.push((vol.volume_id, block, target));
        }
        td.kill();
        for (id, _, _) in &volumes {
            fs::remove_file(td.loop_dir.join(format!("{id}.json"))).unwrap();
        }
        td.start_again().await;
        let mut node = td.node();
        for (id, block, target) in &volumes {
            node.node_unpublish_volume(td.unpublish_req(id, *block))
                .await
                .unwrap_or_else(|s| panic!("unpublish without a record: {s:?}"));
            assert!(
                mounts_at(target).is_empty(),
                "{} still mounted",
                target.display()
            );
            node.node_unstage_volume(td.unstage_req(id))
                .await
                .unwrap_or_else(|s| panic!("unstage without a record: {s:?}"));
            assert!(mounts_at(&td.staging_path(id)).is_empty());
            // Nothing of it is left here now: the volume is simply unknown.
            assert_code(
                node.node_unstage_volume(td.unstage_req(id)).await,
                Code::NotFound,
                "unstage again",
            );
        }
        td.assert_no_leaks();
    })
    .await
}

/// An xfs filesystem with reflinks (mkfs.xfs `-m reflink=1`) on a sparse file, mounted through a
/// loop device until dropped.
struct ReflinkFs {
    mount: tempfile::TempDir,
    _file: tempfile::NamedTempFile,
}

impl ReflinkFs {
    fn new(bytes: u64) -> ReflinkFs {
        let file = tempfile::NamedTempFile::new().expect("backing file");
        file.as_file()
            .set_len(bytes)
            .expect("size the backing file");
        let made = std::process::Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(file.path())
            .status()
            .expect("run mkfs.xfs (xfsprogs)");
        assert!(made.success(), "mkfs.xfs -m reflink=1 failed");
        let mount = tempfile::tempdir().expect("mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-o", "loop"])
            .arg(file.path())
            .arg(mount.path())
            .status()
            .expect("run mount");
        assert!(mounted.success(), "mount -o loop of the xfs file failed");
        ReflinkFs { mount, _file: file }
    }

    fn dir(&self) -> &std::path::Path {
        self.mount.path()
    }
}

impl Drop for ReflinkFs {
    fn drop(&mut self) {
        // The loop device mount(8) set up is freed with the mount (autoclear).
        let _ = std::process::Command::new("umount")
            .arg(self.mount.path())
            .status();
    }
}

/// Whether `filefrag -v` (FIEMAP) reports extents of `path` shared with another file.
fn shares_extents(path: &std::path::Path) -> bool {
    let out = std::process::Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .expect("run filefrag (e2fsprogs)");
    assert!(out.status.success(), "filefrag -v {}", path.display());
    String::from_utf8_lossy(&out.stdout).contains("shared")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_xfs_a_staged_volume_is_snapshotted_by_reflink_whatever_its_size() {
    if loop_images_do_not_apply() {
        return;
    }
    with_timeout(T, async {
        let xfs = ReflinkFs::new(4 << 30);
        let mut opts = DriverOpts::sparse("3GiB");
        opts.loop_dir = Some(xfs.dir().join("loop"));
        // No full copy of this much data fits in the budget; a reflink does.
        opts.extra_args = vec!["--freeze-budget".into(), "100ms".into()];
        let td = TestDriver::start_with(opts).await;
        let origin = td.create("origin", 768 * MIB, mount_cap("ext4")).await;
        td.stage(&origin.volume_id, mount_cap("ext4")).await;
        let target = td
            .publish(&origin.volume_id, mount_cap("ext4"), false)
            .await;
        let data: Vec<u8> = (0..384 * MIB as usize)
            .map(|i| (i * 13 + i / 4096) as u8)
            .collect();
        write_file(&target.join("big.bin"), &data);

        let snap = td
            .controller()
            .create_snapshot(pb::CreateSnapshotRequest {
                source_volume_id: origin.volume_id.clone(),
                name: "instant".into(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| panic!("CreateSnapshot on xfs: {s:?}\n{}", td.log_tail(20)))
            .into_inner()
            .snapshot
            .expect("snapshot");
        let image = td
            .loop_dir
            .join("snapshots")
            // The CO's ID names the node; the image is named by the bare ID.
            .join(format!(
                "{}.img",
                snap.snapshot_id.split('@').next().unwrap_or_default()
            ));
        assert!(shares_extents(&image), "the snapshot's image is a reflink");
        write_file(&target.join("after.txt"), b"not blocked");

        let mut req = create_req("restored", 768 * MIB, vec![mount_cap("ext4")]);
        req.volume_content_source = Some(pb::VolumeContentSource {
            r#type: Some(pb::volume_content_source::Type::Snapshot(
                pb::volume_content_source::SnapshotSource {
                    snapshot_id: snap.snapshot_id.clone(),
                },
            )),
        });
        let restored = td
            .controller()
            .create_volume(req)
            .await
            .expect("restore")
            .into_inner()
            .volume
            .expect("volume");
        td.stage(&restored.volume_id, mount_cap("ext4")).await;
        let at = td
            .publish(&restored.volume_id, mount_cap("ext4"), false)
            .await;
        assert!(
            read_file(&at.join("big.bin")) == data,
            "restored data differs"
        );
        assert!(!at.join("after.txt").exists(), "written after the snapshot");
        for id in [&restored.volume_id, &origin.volume_id] {
            td.unpublish(id, false).await;
            td.unstage(id).await;
        }
        td.controller()
            .delete_snapshot(pb::DeleteSnapshotRequest {
                snapshot_id: snap.snapshot_id.clone(),
                ..Default::default()
            })
            .await
            .expect("DeleteSnapshot");
        td.delete(&restored.volume_id).await;
        td.delete(&origin.volume_id).await;
        td.assert_no_leaks();
        drop(td);
        drop(xfs);
    })
    .await
}
