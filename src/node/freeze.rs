//! Quiescing a mounted filesystem so a copy of its device is consistent.
//!
//! A frozen filesystem blocks every writer of the workload, so a freeze is bounded: a watchdog
//! thaws it when the freeze budget (`--freeze-budget`) runs out, and the copy made under it is
//! then refused. An instant step (a reflink, a thin snapshot) fits in any budget; a full copy of
//! a large volume does not, and fails with FAILED_PRECONDITION instead of stalling the workload
//! for minutes. A driver killed mid-freeze leaves the filesystem frozen: start-up thaws every
//! Kennel filesystem ([`thaw`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::error::{Error, IoContext, Result};

nix::ioctl_readwrite!(fifreeze, b'X', 119, libc::c_int);
nix::ioctl_readwrite!(fithaw, b'X', 120, libc::c_int);

/// Default of `--freeze-budget`.
pub const DEFAULT_BUDGET: Duration = Duration::from_secs(5);

static BUDGET_MS: AtomicU64 = AtomicU64::new(DEFAULT_BUDGET.as_millis() as u64);

/// Sets the longest time a workload's filesystem may stay frozen (`--freeze-budget`).
pub fn set_budget(budget: Duration) {
    BUDGET_MS.store(budget.as_millis() as u64, Ordering::Relaxed);
}

fn budget() -> Duration {
    Duration::from_millis(BUDGET_MS.load(Ordering::Relaxed))
}

/// Run `work` while the filesystem mounted at `mount_point` is frozen: all dirty data is on the
/// device and new writes wait. Thawed when `work` ends, fails, or outlives the freeze budget;
/// in the last case the result of `work` is discarded and the call fails.
pub fn while_frozen<T>(mount_point: &Path, work: impl FnOnce() -> Result<T>) -> Result<T> {
    while_all_frozen(&[mount_point.to_owned()], work)
}

/// [`while_frozen`] for several filesystems at once (a group snapshot): every one is frozen
/// before `work` starts and stays frozen until it ends, so what `work` copies is one instant
/// across all of them. A freeze that fails thaws the ones already frozen; the budget covers
/// the whole of `work`.
pub fn while_all_frozen<T>(
    mount_points: &[PathBuf],
    work: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let mut points: Vec<&PathBuf> = mount_points.iter().collect();
    points.sort();
    points.dedup();
    let dirs = points
        .iter()
        .map(|p| File::open(p).ctx("open", p.as_path()))
        .collect::<Result<Vec<_>>>()?;
    for (i, dir) in dirs.iter().enumerate() {
        if let Err(e) = ioctl(dir, fifreeze) {
            thaw_all(&dirs[..i]);
            return Err(Error::io("FIFREEZE", points[i], e.into()));
        }
    }
    let budget = budget();
    let (done, finished) = mpsc::channel::<()>();
    let (result, thawed_early) = std::thread::scope(|scope| {
        let dirs = &dirs;
        let watchdog = scope.spawn(move || match finished.recv_timeout(budget) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => false,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Thawing early unblocks the workload; the copy is refused.
                thaw_all(dirs);
                true
            }
        });
        let result = work();
        let _ = done.send(());
        (result, watchdog.join().unwrap_or(true))
    });
    let shown = || {
        points
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if thawed_early {
        return Err(Error::Precondition(format!(
            "the copy of the volume mounted at {} did not finish within the freeze budget of {budget:?}, so the filesystem was thawed and the copy discarded; copy it while it is not staged, keep its storage on a filesystem with reflinks (xfs, btrfs) or on LVM with device-mapper, or raise --freeze-budget",
            shown()
        )));
    }
    let mut thaw_error = None;
    for (dir, point) in dirs.iter().zip(&points) {
        if let Err(e) = ioctl(dir, fithaw) {
            thaw_error.get_or_insert(Error::io("FITHAW", point, e.into()));
        }
    }
    match (result, thaw_error) {
        (Err(e), _) => Err(e),
        (Ok(_), Some(e)) => Err(e),
        (Ok(value), None) => Ok(value),
    }
}

type FreezeIoctl = unsafe fn(libc::c_int, *mut libc::c_int) -> nix::Result<libc::c_int>;

fn ioctl(dir: &File, op: FreezeIoctl) -> nix::Result<libc::c_int> {
    let mut arg: libc::c_int = 0;
    // SAFETY: FIFREEZE and FITHAW ignore their argument beyond reading an int.
    unsafe { op(dir.as_raw_fd(), &mut arg) }
}

/// Best effort: a filesystem left frozen is thawed at the next start at the latest.
fn thaw_all(dirs: &[File]) {
    for dir in dirs {
        let _ = ioctl(dir, fithaw);
    }
}

/// Thaws the filesystem at `mount_point` if it is frozen (a driver killed mid-freeze leaves it
/// so). Returns whether it was frozen.
pub fn thaw(mount_point: &Path) -> Result<bool> {
    let dir = File::open(mount_point).ctx("open", mount_point)?;
    let mut arg: libc::c_int = 0;
    // SAFETY: FITHAW ignores its argument beyond reading an int.
    match unsafe { fithaw(dir.as_raw_fd(), &mut arg) } {
        Ok(_) => Ok(true),
        // Not frozen.
        Err(nix::errno::Errno::EINVAL) => Ok(false),
        Err(e) => Err(Error::io("FITHAW", mount_point, e.into())),
    }
}
