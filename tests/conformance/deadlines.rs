//! Long operations: a host tool that hangs is killed at its deadline and the call answers
//! DEADLINE_EXCEEDED naming it; a second call on the busy volume answers ABORTED instead of
//! queueing; the volume is left as it was and the retry works.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use tonic::Code;

const T: u64 = 120;

/// The real tool of that name on the PATH.
fn real_tool(name: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} not found (hack/setup.sh installs it)"))
}

/// A stand-in `mkfs.ext4` in `dir`: while `dir/hang` exists it records its PID, says something
/// on stderr and hangs; otherwise it runs the real tool.
fn hanging_mkfs(dir: &Path) {
    let script = format!(
        "#!/bin/sh\nif [ -e '{dir}/hang' ]; then\n  echo $$ > '{dir}/pid'\n  echo 'zeroing inode tables' >&2\n  sleep 60\nfi\nexec '{real}' \"$@\"\n",
        dir = dir.display(),
        real = real_tool("mkfs.ext4").display()
    );
    let path = dir.join("mkfs.ext4");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_mkfs_is_killed_at_its_deadline_and_a_second_call_is_aborted() {
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let tools = tempfile::tempdir().unwrap();
        hanging_mkfs(tools.path());
        let mut opts = DriverOpts::sparse("256MiB");
        opts.extra_args = vec!["--command-timeout".into(), "4s".into()];
        let path = format!(
            "{}:{}",
            tools.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        opts.env = vec![("PATH".into(), path)];
        let td = TestDriver::start_with(opts).await;
        let vol = td.create("pvc-stuck", 16 * MIB, mount_cap("ext4")).await;
        let id = vol.volume_id.clone();
        fs::create_dir_all(td.staging_path(&id)).unwrap();

        fs::write(tools.path().join("hang"), b"").unwrap();
        let first = {
            let mut node = td.node();
            let req = td.stage_req(&id, mount_cap("ext4"));
            let started = Instant::now();
            tokio::spawn(async move { (node.node_stage_volume(req).await, started.elapsed()) })
        };
        let pid_file = tools.path().join("pid");
        while !pid_file.exists() {
            // A stage that ends before the stand-in ran never reached it.
            assert!(
                !first.is_finished(),
                "the stage ended before the stand-in mkfs ran: {:?}",
                first.await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // The kubelet retries: while the first stage runs, a second one answers ABORTED.
        let second = td
            .node()
            .node_stage_volume(td.stage_req(&id, mount_cap("ext4")))
            .await
            .expect_err("a second stage while mkfs runs");
        assert_eq!(second.code(), Code::Aborted, "{second:?}");
        assert!(second.message().contains("in progress"), "{second:?}");

        let (result, took) = first.await.unwrap();
        let status = result.expect_err("the stage whose mkfs hangs");
        assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
        assert!(
            status.message().contains("mkfs.ext4")
                && status.message().contains("zeroing inode tables"),
            "{status:?}"
        );
        assert!(took < Duration::from_secs(30), "took {took:?}");
        let pid = fs::read_to_string(&pid_file).unwrap();
        assert!(
            !Path::new(&format!("/proc/{}", pid.trim())).exists(),
            "the hung mkfs (pid {pid}) survived its deadline"
        );
        // Left as it was: nothing mounted, and the retry formats and stages it.
        assert!(mounts_at(&td.staging_path(&id)).is_empty());
        fs::remove_file(tools.path().join("hang")).unwrap();
        td.stage(&id, mount_cap("ext4")).await;
        assert_eq!(mounts_at(&td.staging_path(&id)).len(), 1);
        td.unstage(&id).await;
        td.assert_no_leaks();
        td.delete(&id).await;
    })
    .await
}
