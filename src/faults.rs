//! Pause points for tests: an operation can be held at any of its steps, so a test can make
//! its caller give up there, retry, and check what exists — deterministically, not by racing a
//! timer.
//!
//! Compiled in only with the `crash-injection` feature (which `cargo test` turns on through the
//! crate's dev-dependency on itself); without it [`step`] is empty. With it, a driver started with
//! `KENNEL_PAUSE_DIR=<dir>` counts steps while `<dir>/arm` exists: the file holds N, and the N-th
//! step from then on removes it, writes `<dir>/paused` naming the step and waits until a test
//! removes `paused`. Steps are the boundaries of a volume operation: its locks taken, each host
//! tool it runs, each file it creates or commits.

/// Environment variable naming the directory of the pause files.
pub const PAUSE_DIR_ENV: &str = "KENNEL_PAUSE_DIR";
/// In the pause directory: how many steps from now to pause at.
pub const ARM_FILE: &str = "arm";
/// In the pause directory: present while a step is held; it names the step.
pub const PAUSED_FILE: &str = "paused";

/// A step of an operation: held here if a test armed a pause for it.
#[cfg(feature = "crash-injection")]
pub fn step(what: &str) {
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::Duration;

    // One step at a time decides whether it is the armed one.
    static COUNTING: Mutex<()> = Mutex::new(());
    let Some(dir) = std::env::var_os(PAUSE_DIR_ENV).map(PathBuf::from) else {
        return;
    };
    let (arm, paused) = (dir.join(ARM_FILE), dir.join(PAUSED_FILE));
    {
        let _one = COUNTING.lock().unwrap_or_else(|p| p.into_inner());
        let Ok(text) = std::fs::read_to_string(&arm) else {
            return;
        };
        let left: u64 = text.trim().parse().unwrap_or(1);
        if left > 1 {
            let _ = std::fs::write(&arm, (left - 1).to_string());
            return;
        }
        // Disarm first: a test that sees the pause may kill this process at once, and a
        // restarted driver must not find the step still armed.
        let _ = std::fs::remove_file(&arm);
        let _ = std::fs::write(&paused, what);
    }
    tracing::warn!(step = what, "paused on request (fault injection)");
    while paused.exists() {
        std::thread::sleep(Duration::from_millis(10));
    }
    tracing::warn!(step = what, "released (fault injection)");
}

/// A step of an operation (pause points are compiled out of this build).
#[cfg(not(feature = "crash-injection"))]
#[inline(always)]
pub fn step(_what: &str) {}
