//! Behaviour of the loop backend's image files: preallocated versus sparse
//! images, and the debris an interrupted create leaves beside them. Only the
//! loop target includes this module (tests/lvm_crash.rs covers pending LVs).

use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::common::*;

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
