//! The one runner of host tools: always an argument list, never a shell; each tool in its own
//! process group with its output captured; and what a deadline may do to a tool depends on what
//! the tool does to the disk.
//!
//! - A [`Effect::ReadOnly`] tool (lvs, blkid, e2fsck -n…) that outlives its deadline gets
//!   SIGTERM, a short grace, then SIGKILL, each sent to its whole process group (tools such as
//!   lvm2 fork helpers that would keep running and hold the output pipes open); the call fails
//!   with [`Error::DeadlineExceeded`] naming the command and what it wrote to stderr.
//! - A [`Effect::ChangesMetadata`] tool (every lvm2 change, mkfs, resize2fs, e2fsck -p/-f…) is
//!   never killed: a kill between two of its writes (or between a device-mapper suspend and
//!   resume) can leave a filesystem half-resized or a device suspended. Past its deadline it is
//!   logged, with its pid and how long it has run, and waited for.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Default for `--command-timeout`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Extra time per GiB of device for tools whose work grows with the device (mkfs, fsck,
/// resize): a 1 TiB mkfs may take minutes where a 1 GiB one takes a second.
const PER_GIB: Duration = Duration::from_secs(1);
/// How long a read-only tool has between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(2);
/// How often a tool still changing metadata past its deadline is logged again.
const REMIND_EVERY: Duration = Duration::from_secs(60);

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

/// What a tool does to on-disk state, which decides what its deadline may do to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Only reads: killed with its process group at its deadline.
    ReadOnly,
    /// May write on-disk metadata: never killed; past its deadline it is logged and waited for.
    ChangesMetadata,
}

/// One tool run being built: program, arguments, environment, deadline.
#[derive(Debug)]
pub struct Tool {
    program: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    effect: Effect,
    deadline: Duration,
}

impl Tool {
    /// A tool that only reads: killed at its deadline.
    pub fn read_only(program: &str) -> Self {
        Self::new(program, Effect::ReadOnly)
    }

    /// A tool that may change on-disk metadata: waited for, whatever its deadline.
    pub fn changes_metadata(program: &str) -> Self {
        Self::new(program, Effect::ChangesMetadata)
    }

    pub fn new(program: &str, effect: Effect) -> Self {
        Tool {
            program: program.to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            effect,
            deadline: timeout(),
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Replaces the default deadline (`--command-timeout`).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The command line, for messages.
    pub fn display(&self) -> String {
        let mut line = self.program.clone();
        for arg in &self.args {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    }

    /// Run it, returning its output when it exits 0.
    pub fn run(self) -> Result<Output> {
        let program = self.program.clone();
        let output = self.output()?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(failure(&program, &output))
        }
    }

    /// Run it and return its output whatever the exit status (for callers that give exit
    /// codes a meaning, like blkid's 2 for "nothing found").
    pub fn output(self) -> Result<Output> {
        let mut child = Command::new(&self.program)
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a signal on expiry reaches every process it started.
            .process_group(0)
            .spawn()
            .map_err(|e| Error::Command {
                command: self.program.clone(),
                status: "not started".to_owned(),
                stderr: e.to_string(),
            })?;
        let stdout = drain(child.stdout.take());
        let stderr = drain(child.stderr.take());
        let expired = self.wait_for_exit(&child);
        let status = child
            .wait()
            .map_err(|e| Error::Internal(format!("wait for {}: {e}", self.program)))?;
        let output = Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        };
        if self.effect == Effect::ChangesMetadata {
            crate::faults::step(&format!("{} ended", self.program));
        }
        if expired {
            return Err(Error::DeadlineExceeded {
                command: self.program,
                after: self.deadline,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            });
        }
        Ok(output)
    }

    /// Waits until the child has exited (leaving it unreaped, so its pid, which is also its
    /// process group's id, cannot be reused while signals may still go to that group).
    /// A read-only tool is stopped at its deadline (`true`); a changing one is waited for.
    fn wait_for_exit(&self, child: &Child) -> bool {
        let pid = Pid::from_raw(child.id() as i32);
        let started = Instant::now();
        let mut next_look = self.deadline;
        let mut pause = Duration::from_millis(1);
        loop {
            if has_exited(pid) {
                if self.effect == Effect::ChangesMetadata && started.elapsed() > self.deadline {
                    tracing::info!(
                        command = %self.display(),
                        pid = pid.as_raw(),
                        took = ?started.elapsed(),
                        "a tool that ran past its deadline has finished"
                    );
                }
                return false;
            }
            let ran = started.elapsed();
            if ran >= next_look {
                match self.effect {
                    Effect::ReadOnly => {
                        stop_group(pid);
                        return true;
                    }
                    Effect::ChangesMetadata => {
                        tracing::warn!(
                            command = %self.display(),
                            pid = pid.as_raw(),
                            running_for = ?ran,
                            deadline = ?self.deadline,
                            "tool past its deadline; not killed because it changes on-disk metadata, waiting for it to end"
                        );
                        next_look = ran + REMIND_EVERY;
                    }
                }
            }
            thread::sleep(pause.min(next_look.saturating_sub(ran)));
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }
}

/// Whether the child `pid` has exited, without reaping it.
fn has_exited(pid: Pid) -> bool {
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(pid), flags) {
        Ok(WaitStatus::StillAlive) => false,
        Ok(_) => true,
        Err(nix::errno::Errno::EINTR) => false,
        // Nothing left to wait for: the reaping wait says why.
        Err(_) => true,
    }
}

/// SIGTERM to the group, up to [`GRACE`] for the leader to exit, then SIGKILL to the group
/// (whatever the leader did: a helper it started may ignore SIGTERM).
fn stop_group(pid: Pid) {
    let _ = killpg(pid, Signal::SIGTERM);
    let until = Instant::now() + GRACE;
    while Instant::now() < until && !has_exited(pid) {
        thread::sleep(Duration::from_millis(10));
    }
    let _ = killpg(pid, Signal::SIGKILL);
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

/// The error of a tool that exited non-zero: its stderr (or stdout when stderr is empty).
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
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    /// An executable shell script at `dir/name` (tests only: production code runs no shell).
    fn script(dir: &Path, name: &str, body: &str) -> String {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}")).expect("test setup");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("test setup");
        path.to_str().expect("test setup").to_owned()
    }

    #[test]
    fn output_and_exit_status_come_back() {
        let out = Tool::read_only("printf")
            .args(["%s", "hello"])
            .run()
            .expect("printf runs");
        assert_eq!(out.stdout, b"hello");
        let err = Tool::read_only("ls")
            .arg("/nonexistent-kennel-path")
            .run()
            .expect_err("an error");
        assert!(
            matches!(&err, Error::Command { command, stderr, .. } if command == "ls" && stderr.contains("nonexistent")),
            "{err:?}"
        );
        let out = Tool::read_only("ls")
            .arg("/nonexistent-kennel-path")
            .output()
            .expect("the output whatever the status");
        assert_eq!(out.status.code(), Some(2));
        let err = Tool::changes_metadata("kennel-no-such-tool")
            .arg("x")
            .run()
            .expect_err("an error");
        assert!(matches!(&err, Error::Command { status, .. } if status == "not started"));
        let out = Tool::read_only("sh")
            .args(["-c", "printf %s \"$KENNEL_X\""])
            .env("KENNEL_X", "passed")
            .run()
            .expect("sh runs");
        assert_eq!(out.stdout, b"passed");
    }

    #[test]
    fn a_read_only_tool_past_its_deadline_gets_sigterm_then_sigkill_with_its_group() {
        let dir = tempfile::tempdir().expect("test setup");
        let termed = dir.path().join("termed");
        let late = dir.path().join("late");
        // Says something on stderr, starts a helper that ignores SIGTERM and would write
        // `late` after 4 s, notes the SIGTERM it gets and carries on regardless.
        let tool = script(
            dir.path(),
            "stuck-reader",
            &format!(
                "echo stuck-on-purpose >&2\n(trap '' TERM; sleep 4; touch '{late}') &\n\
                 trap 'touch \"{termed}\"' TERM\nwhile :; do sleep 0.1; done\n",
                late = late.display(),
                termed = termed.display()
            ),
        );
        let started = Instant::now();
        let err = Tool::read_only(&tool)
            .deadline(Duration::from_millis(300))
            .output()
            .expect_err("an error");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) + GRACE && took < Duration::from_millis(3500),
            "SIGKILL follows SIGTERM after the grace: {took:?}"
        );
        match &err {
            Error::DeadlineExceeded {
                command,
                after,
                stderr,
            } => {
                assert_eq!(command, &tool);
                assert_eq!(*after, Duration::from_millis(300));
                // (then the shell's note that SIGTERM ended its `sleep`)
                assert!(stderr.starts_with("stuck-on-purpose"), "{stderr}");
            }
            other => panic!("expected DeadlineExceeded, got {other:?}"),
        }
        assert!(termed.exists(), "SIGTERM came first");
        thread::sleep(Duration::from_secs(4) - took + Duration::from_millis(700));
        assert!(
            !late.exists(),
            "the helper outlived the deadline and ran on"
        );
    }

    #[test]
    fn a_read_only_tool_that_obeys_sigterm_ends_without_the_grace() {
        let started = Instant::now();
        let err = Tool::read_only("sleep")
            .arg("30")
            .deadline(Duration::from_millis(200))
            .output()
            .expect_err("an error");
        assert!(matches!(err, Error::DeadlineExceeded { .. }), "{err:?}");
        assert!(
            started.elapsed() < Duration::from_millis(200) + GRACE,
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn a_tool_changing_metadata_past_its_deadline_is_waited_for_not_killed() {
        let dir = tempfile::tempdir().expect("test setup");
        // Ignores nothing: any signal would end it early and without `done`.
        let tool = script(
            dir.path(),
            "slow-writer",
            "sleep 1.5\necho written >&2\necho done\n",
        );
        let started = Instant::now();
        let out = Tool::changes_metadata(&tool)
            .deadline(Duration::from_millis(200))
            .run()
            .expect("a changing tool runs to its end");
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(out.stdout, b"done\n");
        assert_eq!(out.stderr, b"written\n");
        // Its failure past the deadline is its own failure, not a deadline.
        let failing = script(
            dir.path(),
            "slow-failure",
            "sleep 0.5\necho bad >&2\nexit 3\n",
        );
        let err = Tool::changes_metadata(&failing)
            .deadline(Duration::from_millis(100))
            .run()
            .expect_err("an error");
        assert!(
            matches!(&err, Error::Command { stderr, status, .. } if stderr == "bad" && status.contains('3')),
            "{err:?}"
        );
    }

    #[test]
    fn bigger_devices_get_longer_deadlines() {
        assert_eq!(timeout_for_bytes(0), timeout());
        assert_eq!(timeout_for_bytes(1), timeout() + PER_GIB);
        assert_eq!(timeout_for_bytes(1024 << 30), timeout() + PER_GIB * 1024);
    }
}
