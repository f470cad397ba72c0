//! Running host tools: always an argument list, never a shell, and always with a deadline.
//!
//! A child that outlives its deadline is killed with its whole process group (tools such as
//! lvm2 fork helpers that would keep the output pipes open) and the call fails with
//! [`Error::DeadlineExceeded`], naming the command and what it wrote to stderr.

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Default for `--command-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Extra time per GiB of device for tools whose work grows with the device (mkfs, fsck,
/// resize): a 1 TiB mkfs may take minutes where a 1 GiB one takes a second.
const PER_GIB: Duration = Duration::from_secs(1);

static TIMEOUT_MS: AtomicU64 = AtomicU64::new(DEFAULT_TIMEOUT.as_millis() as u64);

/// Sets the deadline of every tool run from now on (`--command-timeout`).
pub fn set_timeout(timeout: Duration) {
    TIMEOUT_MS.store(timeout.as_millis().max(1) as u64, Ordering::Relaxed);
}

/// The deadline of a tool whose work does not depend on a device's size.
pub fn timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed))
}

/// The deadline of a tool that works through a device of `bytes` bytes.
pub fn timeout_for_bytes(bytes: u64) -> Duration {
    let gib = u32::try_from(bytes.div_ceil(1 << 30)).unwrap_or(u32::MAX);
    timeout().saturating_add(PER_GIB.saturating_mul(gib))
}

/// Run `program args...` within the default deadline, returning its output when it exits 0.
pub fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_within(program, args, timeout())
}

/// Run within `deadline`, returning its output when it exits 0.
pub fn run_within<I, S>(program: &str, args: I, deadline: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = output_within(program, args, deadline)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(failure(program, &output))
    }
}

/// Run and return the output whatever the exit status (callers that give
/// exit codes a meaning, like blkid's 2 for "nothing found").
pub fn output<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    output_within(program, args, timeout())
}

/// Run within `deadline` and return the output whatever the exit status.
pub fn output_within<I, S>(program: &str, args: I, deadline: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so a kill on expiry reaches every process it started.
        .process_group(0)
        .spawn()
        .map_err(|e| Error::Command {
            command: program.to_owned(),
            status: "not started".to_owned(),
            stderr: e.to_string(),
        })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_within(&mut child, deadline);
    let expired = status.is_none();
    if expired {
        let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    }
    let status = match status {
        Some(status) => status,
        None => child
            .wait()
            .map_err(|e| Error::Internal(format!("wait for {program}: {e}")))?,
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if expired {
        return Err(Error::DeadlineExceeded {
            command: program.to_owned(),
            after: deadline,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// Reads a pipe to its end on a thread of its own, so a chatty child never blocks on a full pipe.
fn drain(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        bytes
    })
}

/// The child's exit status, or `None` if it is still running at the deadline.
fn wait_within(child: &mut Child, deadline: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    let mut pause = Duration::from_millis(1);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            // Nothing left to wait for: report it as running so the caller kills and reaps.
            Err(_) => return None,
        }
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            return None;
        }
        thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(25));
    }
}

pub fn failure(program: &str, output: &Output) -> Error {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let message = if stderr.trim().is_empty() {
        stdout
    } else {
        stderr
    };
    Error::Command {
        command: program.to_owned(),
        status: output.status.to_string(),
        stderr: message.trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_exit_status_come_back() {
        let out = run("printf", ["%s", "hello"]).expect("printf runs");
        assert_eq!(out.stdout, b"hello");
        let err = run("ls", ["/nonexistent-kennel-path"]).expect_err("an error");
        assert!(
            matches!(&err, Error::Command { command, stderr, .. } if command == "ls" && stderr.contains("nonexistent")),
            "{err:?}"
        );
        let err = run("kennel-no-such-tool", ["x"]).expect_err("an error");
        assert!(matches!(&err, Error::Command { status, .. } if status == "not started"));
    }

    #[test]
    fn a_child_past_its_deadline_is_killed_with_its_children() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("test setup");
        let marker_path = dir.path().join("marker");
        // A tool that says something on stderr, forks a grandchild that would write the
        // marker after 2 s, and hangs.
        let tool = dir.path().join("stuck-tool");
        std::fs::write(
            &tool,
            format!(
                "#!/bin/sh\necho stuck-on-purpose >&2\n(sleep 2; touch '{}') &\nsleep 30\n",
                marker_path.display()
            ),
        )
        .expect("test setup");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755))
            .expect("test setup");
        let tool = tool.to_str().expect("test setup");
        let started = Instant::now();
        let err = output_within(tool, Vec::<&str>::new(), Duration::from_millis(300))
            .expect_err("an error");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        match &err {
            Error::DeadlineExceeded {
                command,
                after,
                stderr,
            } => {
                assert_eq!(command, tool);
                assert_eq!(*after, Duration::from_millis(300));
                assert_eq!(stderr, "stuck-on-purpose");
            }
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
        thread::sleep(Duration::from_millis(2500));
        assert!(
            !marker_path.exists(),
            "the grandchild outlived the deadline and ran on"
        );
    }

    #[test]
    fn bigger_devices_get_longer_deadlines() {
        assert_eq!(timeout_for_bytes(0), timeout());
        assert_eq!(timeout_for_bytes(1), timeout() + PER_GIB);
        assert_eq!(timeout_for_bytes(1024 << 30), timeout() + PER_GIB * 1024);
    }
}
