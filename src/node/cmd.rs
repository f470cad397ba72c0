//! Running host tools: always an argument list, never a shell.

use std::ffi::OsStr;
use std::process::{Command, Output};

use crate::error::{Error, Result};

/// Run `program args...`, returning its output when it exits 0.
pub fn run<I, S>(program: &str, args: I) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let output = output(program, args)?;
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
    Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| Error::Command {
            command: program.to_owned(),
            status: "not started".to_owned(),
            stderr: e.to_string(),
        })
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
