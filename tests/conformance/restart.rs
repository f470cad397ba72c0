//! The driver dies (SIGKILL) or is stopped (SIGTERM/SIGINT) between any two
//! steps: everything must come back from disk and the host, every call must
//! stay idempotent, data must be intact, and nothing may leak.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::time::{Duration, Instant};

use crate::common::*;
use kennel::csi::pb;
use nix::sys::signal::Signal;

const T: u64 = 240;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_after_create_keeps_the_volume() {
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::preallocated("256MiB")).await;
        let vol = td.create("pvc-survivor", 16 * MIB, mount_cap("ext4")).await;
        let other = td.create("pvc-other", 8 * MIB, block_cap()).await;
        let capacity = td.available_capacity(None).await;
        td.restart().await;

        // Same name, same volume; nothing new allocated.
        let again = td.create("pvc-survivor", 16 * MIB, mount_cap("ext4")).await;
        assert_eq!(again, vol);
        assert_eq!(td.available_capacity(None).await, capacity);
        let mut listed = td.list_all().await;
        listed.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        let mut expected = vec![vol.clone(), other.clone()];
        expected.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        assert_eq!(listed, expected);
        let got = td
            .controller()
            .controller_get_volume(pb::ControllerGetVolumeRequest {
                volume_id: vol.volume_id.clone(),
            })
            .await
            .expect("ControllerGetVolume after restart")
            .into_inner();
        assert_eq!(got.volume, Some(vol.clone()));

        // And it is usable.
        if can_use_loop_devices() {
            td.stage(&vol.volume_id, mount_cap("ext4")).await;
            let target = td.publish(&vol.volume_id, mount_cap("ext4"), false).await;
            write_file(&target.join("a"), b"a");
            td.unpublish(&vol.volume_id, false).await;
            td.unstage(&vol.volume_id).await;
        }
        td.delete(&vol.volume_id).await;
        td.delete(&other.volume_id).await;
        td.restart().await;
        assert!(td.list_all().await.is_empty());
        assert_eq!(td.available_capacity(None).await, 256 * MIB);
        td.assert_no_leaks();
    })
    .await
}

/// create, stage, publish, write, unpublish, unstage, delete with a SIGKILL
/// restart after each step, each step repeated after the restart.
async fn crash_between_every_step(block: bool) {
    let mut td = TestDriver::start_with(DriverOpts::preallocated("256MiB")).await;
    let capability = if block {
        block_cap()
    } else {
        mount_cap("ext4")
    };
    let vol = td.create("pvc-crashy", 32 * MIB, capability.clone()).await;
    let id = vol.volume_id.clone();
    td.restart().await;
    assert_eq!(
        td.create("pvc-crashy", 32 * MIB, capability.clone()).await,
        vol
    );

    let staging = td.stage(&id, capability.clone()).await;
    let staged_at = if block {
        staging.join("device")
    } else {
        staging.clone()
    };
    td.restart().await;
    td.stage(&id, capability.clone()).await;
    assert_eq!(
        mounts_at(&staged_at).len(),
        1,
        "stage after restart stacked a mount"
    );
    assert_eq!(
        td.attachments(&id).len(),
        1,
        "stage after restart attached again"
    );

    let target = td.publish(&id, capability.clone(), false).await;
    td.restart().await;
    td.publish(&id, capability.clone(), false).await;
    assert_eq!(
        mounts_at(&target).len(),
        1,
        "publish after restart stacked a mount"
    );

    let data = pattern(42, 64 * 1024);
    if block {
        write_block(&target, 4096, &data);
    } else {
        write_file(&target.join("data.bin"), &data);
    }
    td.restart().await;
    // The publish outlived the driver: data readable through it.
    if block {
        assert_eq!(read_block(&target, 4096, data.len()), data);
    } else {
        assert_eq!(read_file(&target.join("data.bin")), data);
    }
    let stats = td
        .node()
        .node_get_volume_stats(pb::NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats after restart")
        .into_inner();
    assert!(!stats.volume_condition.expect("condition").abnormal);

    td.unpublish(&id, block).await;
    td.restart().await;
    td.unpublish(&id, block).await;
    assert!(mounts_at(&target).is_empty());

    td.unstage(&id).await;
    td.restart().await;
    td.unstage(&id).await;
    assert!(mounts_at(&staged_at).is_empty());
    assert!(
        td.attachments_after_release(&id).is_empty(),
        "loop device left after unstage"
    );

    // Up again after the restarts: the data is still there.
    td.stage(&id, capability.clone()).await;
    let target = td.publish(&id, capability.clone(), false).await;
    if block {
        assert_eq!(read_block(&target, 4096, data.len()), data);
    } else {
        assert_eq!(read_file(&target.join("data.bin")), data);
    }
    td.unpublish(&id, block).await;
    td.unstage(&id).await;

    td.delete(&id).await;
    td.restart().await;
    td.delete(&id).await;
    assert!(td.list_all().await.is_empty());
    assert!(!td.stored(&id));
    td.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_every_step_filesystem() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, crash_between_every_step(false)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_every_step_block() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, crash_between_every_step(true)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_stage_then_unstage_without_publish() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let fs_vol = td.create("pvc-fs", 16 * MIB, mount_cap("")).await;
        let block_vol = td.create("pvc-block", 16 * MIB, block_cap()).await;
        td.stage(&fs_vol.volume_id, mount_cap("")).await;
        td.stage(&block_vol.volume_id, block_cap()).await;
        td.restart().await;
        // The unstage is the first call the new driver sees for these volumes.
        td.unstage(&fs_vol.volume_id).await;
        td.unstage(&block_vol.volume_id).await;
        td.assert_no_leaks();
        td.delete(&fs_vol.volume_id).await;
        td.delete(&block_vol.volume_id).await;
        assert!(td.list_all().await.is_empty());
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_attach_and_mount_reuses_the_loop_device() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-half", 16 * MIB, mount_cap("ext4")).await;
        td.kill();
        // What a driver killed right after attaching leaves behind.
        let device = td.attach_by_hand(&vol.volume_id);
        td.start_again().await;
        td.stage(&vol.volume_id, mount_cap("ext4")).await;
        let loops = td.attachments(&vol.volume_id);
        assert_eq!(loops, vec![device], "stage attached a second device");
        td.unstage(&vol.volume_id).await;
        td.assert_no_leaks();
        td.delete(&vol.volume_id).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_zero_removes_socket_and_keeps_mounts() {
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("256MiB")).await;
        let vol = td.create("pvc-term", 16 * MIB, mount_cap("")).await;
        let staged = can_use_loop_devices();
        if staged {
            let staging = td.stage(&vol.volume_id, mount_cap("")).await;
            write_file(&staging.join("f"), b"kept");
        }
        td.stop_gracefully().await;
        if staged {
            // Stopping the driver must not take volumes away from running pods.
            let staging = td.staging_path(&vol.volume_id);
            assert_eq!(
                mounts_at(&staging).len(),
                1,
                "SIGTERM unmounted a staged volume"
            );
            assert_eq!(read_file(&staging.join("f")), b"kept");
        }
        td.start_again().await;
        assert_eq!(td.list_all().await, vec![vol.clone()]);
        if staged {
            td.unstage(&vol.volume_id).await;
        }
        td.delete(&vol.volume_id).await;
        td.assert_no_leaks();
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_exits_zero_and_removes_socket() {
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        let status = td.signal_and_wait(Signal::SIGINT).await;
        assert!(status.success(), "exit after SIGINT: {status:?}");
        assert!(!td.socket.exists(), "socket left after SIGINT");
        td.start_again().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_and_a_stale_socket_is_replaced() {
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        let meta = fs::symlink_metadata(&td.socket).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(mode_of(&td.socket), 0o600, "socket mode");

        // SIGKILL leaves the socket file; the next start replaces it.
        td.kill();
        assert!(td.socket.exists(), "expected a stale socket after SIGKILL");
        td.start_again().await;
        assert_eq!(mode_of(&td.socket), 0o600, "socket mode after restart");

        // A stale socket nobody listens on, made by someone else.
        td.stop_gracefully().await;
        drop(std::os::unix::net::UnixListener::bind(&td.socket).unwrap());
        assert!(td.socket.exists());
        td.start_again().await;
        td.identity()
            .probe(pb::ProbeRequest {})
            .await
            .expect("Probe on the replaced socket");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regular_file_at_the_endpoint_is_not_replaced() {
    with_timeout(T, async {
        let mut td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        td.stop_gracefully().await;
        fs::write(&td.socket, b"not a socket").unwrap();
        let mut child = td.spawn_other(&td.opts.clone(), &td.endpoint.clone());
        let status = wait_exit(&mut child, Duration::from_secs(15)).await;
        assert!(!status.success(), "driver started over a regular file");
        assert_eq!(fs::read(&td.socket).unwrap(), b"not a socket");
        fs::remove_file(&td.socket).unwrap();
        td.start_again().await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_driver_on_the_same_directory_is_refused() {
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        let vol = td.create("pvc-first", 4 * MIB, block_cap()).await;
        let other_endpoint = format!("unix://{}", td.root.join("run/other.sock").display());
        let mut child = td.spawn_other(&td.opts, &other_endpoint);
        let status = wait_exit(&mut child, Duration::from_secs(15)).await;
        assert!(!status.success(), "two drivers served one loop directory");
        // The first one is unharmed.
        assert_eq!(td.list_all().await, vec![vol]);
    })
    .await
}

async fn wait_exit(child: &mut std::process::Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("driver kept running for {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Mounts below a kubelet directory on a private mount never reach the pods:
/// the driver refuses to start there, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_dir_without_shared_propagation_is_refused() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let td = TestDriver::start_with(DriverOpts::sparse("64MiB")).await;
        let private = td.root.join("private-kubelet");
        fs::create_dir_all(&private).unwrap();
        use nix::mount::{mount, MsFlags};
        mount(
            Some(&private),
            &private,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .expect("bind");
        mount(
            None::<&str>,
            &private,
            None::<&str>,
            MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make private");
        let log = td.root.join("private.log");
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kennel"))
            .arg("driver")
            .arg("--endpoint")
            .arg(format!(
                "unix://{}",
                td.root.join("run/private.sock").display()
            ))
            .arg("--loop-dir")
            .arg(td.root.join("private-loop"))
            .args(["--capacity", "64MiB", "--reserve", "0"])
            .arg("--kubelet-dir")
            .arg(&private)
            .stdout(std::process::Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn driver");
        let status = wait_exit(&mut child, Duration::from_secs(15)).await;
        let _ = nix::mount::umount2(&private, nix::mount::MntFlags::empty());
        assert!(!status.success(), "driver served a private kubelet dir");
        let said = fs::read_to_string(&log).unwrap();
        assert!(said.contains("mount propagation is not shared"), "{said}");
        assert!(said.contains(&private.display().to_string()), "{said}");
        assert!(!td.root.join("run/private.sock").exists());
    })
    .await
}
