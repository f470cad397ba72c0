//! A request naming the wrong volume must never unmount another volume's
//! staging or publication.

use crate::common::*;
use kennel::csi::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unpublish_and_unstage_refuse_another_volumes_mounts() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(60, async {
        let td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let mut node = td.node();
        for cap in [mount_cap("ext4"), block_cap()] {
            let block = is_block(&cap);
            let a = td
                .create(&format!("a-{block}"), 16 * MIB, cap.clone())
                .await;
            let b = td
                .create(&format!("b-{block}"), 16 * MIB, cap.clone())
                .await;
            let staging = td.stage(&a.volume_id, cap.clone()).await;
            let target = td.publish(&a.volume_id, cap.clone(), false).await;
            if block {
                write_block(&target, 0, b"mine");
            } else {
                write_file(&target.join("data"), b"mine");
            }

            let wrong_unpublish = pb::NodeUnpublishVolumeRequest {
                volume_id: b.volume_id.clone(),
                target_path: target.display().to_string(),
            };
            assert_code(
                node.node_unpublish_volume(wrong_unpublish).await,
                Code::FailedPrecondition,
                "unpublish of another volume's target",
            );
            let wrong_unstage = pb::NodeUnstageVolumeRequest {
                volume_id: b.volume_id.clone(),
                staging_target_path: staging.display().to_string(),
            };
            assert_code(
                node.node_unstage_volume(wrong_unstage).await,
                Code::FailedPrecondition,
                "unstage of another volume's staging path",
            );

            // A is untouched.
            if block {
                assert_eq!(read_block(&target, 0, 4), b"mine");
            } else {
                assert_eq!(read_file(&target.join("data")), b"mine");
            }
            td.unpublish(&a.volume_id, block).await;
            td.unstage(&a.volume_id).await;
        }
        td.assert_no_leaks();
    })
    .await;
}
