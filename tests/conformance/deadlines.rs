//! Long operations: a host tool that changes on-disk metadata (here mkfs) is never killed, so a
//! hung one outlives the caller's deadline and `--command-timeout`. The caller's wait ends at its
//! deadline with DEADLINE_EXCEEDED; the work goes on and the volume stays locked until it ends,
//! so a retry meanwhile answers ABORTED; once the tool ends the stage completes on a sound
//! filesystem and the retry finds it done.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::*;
use tonic::Code;

const T: u64 = 120;
/// Test deadlines grow with `KENNEL_TEST_TIMEOUT_SCALE` (the emulated VM lane).
fn scaled(secs: u64) -> Duration {
    Duration::from_secs(secs * crate::common::vg::timeout_scale())
}

/// The driver's `--command-timeout` in this test.
fn command_timeout() -> Duration {
    scaled(4)
}

/// The gRPC deadline of the caller (as a sidecar's or the kubelet's `--timeout`).
fn caller_deadline() -> Duration {
    scaled(2)
}

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

/// A stand-in `mkfs.ext4` in `dir`: it records its PID, says something on stderr, waits while
/// `dir/hang` exists, then becomes the real tool (same PID).
fn hanging_mkfs(dir: &Path) {
    let script = format!(
        "#!/bin/sh\necho $$ > '{dir}/pid'\necho 'zeroing inode tables' >&2\nwhile [ -e '{dir}/hang' ]; do sleep 0.1; done\nexec '{real}' \"$@\"\n",
        dir = dir.display(),
        real = real_tool("mkfs.ext4").display()
    );
    let path = dir.join("mkfs.ext4");
    fs::write(&path, script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
}

/// Whether `pid` names a live process (not a zombie waiting to be reaped).
fn alive(pid: &str) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let state = stat.rsplit_once(')')?.1.trim_start().chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Whether the call ended because the caller's own deadline ran out. A Go client (the kubelet,
/// the sidecars) reports that as DEADLINE_EXCEEDED; tonic's client enforces `set_timeout` itself
/// and reports it as CANCELLED "Timeout expired", its source a `TimeoutExpired`.
fn caller_deadline_ran_out(status: &tonic::Status) -> bool {
    if status.code() == Code::DeadlineExceeded {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return status.code() == Code::Cancelled;
        }
        source = e.source();
    }
    false
}

fn stage_within(
    td: &TestDriver,
    id: &str,
    deadline: Duration,
) -> tonic::Request<kennel::csi::pb::NodeStageVolumeRequest> {
    let mut req = tonic::Request::new(td.stage_req(id, mount_cap("ext4")));
    req.set_timeout(deadline);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_mkfs_is_never_killed_the_caller_stops_waiting_and_a_retry_is_aborted_until_it_ends()
{
    if !can_use_loop_devices() {
        return;
    }
    with_timeout(T, async {
        let tools = tempfile::tempdir().unwrap();
        hanging_mkfs(tools.path());
        let mut opts = DriverOpts::sparse("256MiB");
        opts.extra_args = vec![
            "--command-timeout".into(),
            format!("{}s", command_timeout().as_secs()),
        ];
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

        let hang = tools.path().join("hang");
        fs::write(&hang, b"").unwrap();
        let first = {
            let mut node = td.node();
            let req = stage_within(&td, &id, caller_deadline());
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
        let mkfs_started = Instant::now();
        let pid = fs::read_to_string(&pid_file).unwrap().trim().to_owned();

        // The caller's deadline ends the caller's wait, not the tool.
        let (result, took) = first.await.unwrap();
        let status = result.expect_err("the stage whose mkfs hangs");
        assert!(caller_deadline_ran_out(&status), "{status:?}");
        assert!(
            took < caller_deadline() + scaled(2),
            "the caller waited {took:?}"
        );

        // Past --command-timeout and the grace a read-only tool would get, the mkfs runs on,
        // and the driver says why.
        tokio::time::sleep(
            (command_timeout() + kennel::node::cmd::GRACE + Duration::from_secs(1))
                .saturating_sub(mkfs_started.elapsed()),
        )
        .await;
        assert!(
            alive(&pid),
            "the hung mkfs (pid {pid}) was killed\n{}",
            td.log_tail(30)
        );
        let log = td.log_tail(200);
        assert!(
            log.lines().any(
                |l| l.contains("not killed because it changes on-disk metadata")
                    && l.contains("mkfs.ext4")
                    && l.contains(&pid)
            ),
            "no warning naming the mkfs and its pid:\n{log}"
        );

        // The kubelet retries: while the mkfs runs, the volume is still busy.
        let second = td
            .node()
            .node_stage_volume(stage_within(&td, &id, caller_deadline()))
            .await
            .expect_err("a second stage while mkfs runs");
        assert_eq!(second.code(), Code::Aborted, "{second:?}");
        assert!(second.message().contains("in progress"), "{second:?}");
        assert!(alive(&pid), "the hung mkfs (pid {pid}) was killed");

        // The disk recovers: the tool finishes, the stage that outlived its caller completes,
        // and the kubelet's retry (again while ABORTED, with a backoff) finds it staged.
        fs::remove_file(&hang).unwrap();
        let until = Instant::now() + scaled(60);
        while alive(&pid) {
            assert!(Instant::now() < until, "mkfs (pid {pid}) never finished");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let staged = td.staging_path(&id);
        while mounts_at(&staged).is_empty() {
            assert!(
                Instant::now() < until,
                "the stage never completed after its mkfs ended\n{}",
                td.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        loop {
            match td
                .node()
                .node_stage_volume(td.stage_req(&id, mount_cap("ext4")))
                .await
            {
                Ok(_) => break,
                Err(s) if s.code() == Code::Aborted && Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(s) => panic!("the retry after mkfs ended: {s:?}\n{}", td.log_tail(30)),
            }
        }
        let mounts = mounts_at(&staged);
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        assert_eq!(mounts[0].fs_type, "ext4", "{mounts:?}");
        write_file(&staged.join("kept"), b"survives a restage");
        td.unstage(&id).await;
        let staged = td.stage(&id, mount_cap("ext4")).await;
        assert_eq!(read_file(&staged.join("kept")), b"survives a restage");
        td.unstage(&id).await;
        td.assert_no_leaks();
        td.delete(&id).await;
    })
    .await
}
