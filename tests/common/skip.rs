//! Loud skips. A test that cannot run on this host (no root, no lvm2, no
//! loop devices) fails, because a silent pass would hide that nothing was
//! checked. With `KENNEL_ALLOW_SKIP=1` it is skipped instead, and says so on
//! the real stdout (past cargo's capture) so skips can be counted:
//! `cargo test 2>&1 | grep -c '^KENNEL-SKIP'`.

use std::io::Write;

/// Whether this test must stop here. Panics (the test fails) unless skips
/// are allowed; returns true after printing the skip when they are.
pub fn cannot_run(reason: &str) -> bool {
    let test = std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_owned();
    if std::env::var("KENNEL_ALLOW_SKIP").as_deref() != Ok("1") {
        panic!("{test} cannot run: {reason} (set KENNEL_ALLOW_SKIP=1 to skip it instead)");
    }
    // `std::io::stdout()` is not captured by the test harness, unlike `println!`.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "KENNEL-SKIP {test}: {reason}");
    let _ = out.flush();
    true
}
