//! The VM lane: the LVM suites inside a QEMU guest whose kernel has
//! device-mapper (`hack/vm/`), all in one boot. On the host the same suites
//! run without device-mapper (loop windows); here they run with it, and
//! `lvm_dm` (thin pools, thin snapshots, activation) runs only here.

#[path = "common/skip.rs"]
mod skip;
#[path = "common/vm_lane.rs"]
mod vm_lane;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The suites the guest runs, in order (device-mapper-only tests first).
const SUITES: &[&str] = &[
    "lvm_dm",
    "lvm_health",
    "lvm_index",
    "lvm_node",
    "lvm_controller",
    "lvm_crash",
    "conformance_lvm",
];
/// Tests the host leaves to the lane (KENNEL-VM-LANE there), by name: each
/// must pass here, not just its suite.
const LANE_TESTS: &[&str] = &["io_limits_reach_the_pods_io_max"];
/// QEMU is killed after this long (TCG: a slow machine).
const LANE_TIMEOUT_SECS: u64 = 3600;

/// Progress on the real stdout (past cargo's capture): the lane is long.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "vm lane: {line}");
    let _ = out.flush();
}

/// The suites' test executables: built by the same `cargo test` as this
/// test, beside it in `deps/`. A missing or stale one (a source file newer
/// than it, by its cargo dep-info) fails the lane rather than testing old
/// code: build them with `cargo test --no-run`.
fn test_binaries() -> BTreeMap<String, PathBuf> {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir").to_owned();
    let mut found = BTreeMap::new();
    for suite in SUITES {
        let newest = fs::read_dir(&deps)
            .expect("read deps dir")
            .flatten()
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(&format!("{suite}-")).is_some_and(|hash| {
                    hash.len() == 16 && hash.chars().all(|c| c.is_ascii_hexdigit())
                })
            })
            .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
            .max();
        let Some((built, path)) = newest else {
            panic!(
                "no {suite} test executable in {} (run `cargo test --no-run`)",
                deps.display()
            );
        };
        let dep_info = fs::read_to_string(path.with_extension("d")).unwrap_or_default();
        let sources = dep_info
            .lines()
            .next()
            .and_then(|l| l.split_once(": "))
            .map(|(_, deps)| {
                deps.split_whitespace()
                    .map(PathBuf::from)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        assert!(!sources.is_empty(), "no dep-info for {}", path.display());
        for source in sources {
            let changed = fs::metadata(&source).and_then(|m| m.modified());
            assert!(
                changed.is_ok_and(|t| t <= built),
                "{} is older than {} (run `cargo test --no-run`, or the whole `cargo test`)",
                path.display(),
                source.display()
            );
        }
        found.insert((*suite).to_owned(), path);
    }
    found
}

/// The guest script: every suite, each with its exit status, whatever the
/// others do.
fn guest_script(binaries: &BTreeMap<String, PathBuf>) -> String {
    let mut script = String::from("failed=0\n");
    for suite in SUITES {
        let exe = binaries[*suite].display();
        script.push_str(&format!(
            "echo '=== suite {suite}'\nstart=$(date +%s)\n'{exe}' --test-threads=2\nstatus=$?\n\
             echo \"=== status {suite} $status $(($(date +%s) - start))s\"\n\
             [ $status = 0 ] || failed=1\n"
        ));
    }
    script.push_str("exit $failed\n");
    script
}

struct SuiteResult {
    status: i32,
    duration: String,
    summary: String,
}

fn parse(log: &str) -> BTreeMap<String, SuiteResult> {
    let mut results = BTreeMap::new();
    let mut summary = String::new();
    for line in log.lines() {
        if let Some(rest) = line.strip_prefix("=== suite ") {
            let _ = rest;
            summary.clear();
        } else if line.starts_with("test result:") {
            summary = line.to_owned();
        } else if let Some(rest) = line.strip_prefix("=== status ") {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            if let [suite, status, duration] = fields[..] {
                results.insert(
                    suite.to_owned(),
                    SuiteResult {
                        status: status.parse().unwrap_or(-1),
                        duration: duration.to_owned(),
                        summary: summary.clone(),
                    },
                );
            }
        }
    }
    results
}

#[test]
fn lvm_suites_pass_inside_a_vm_with_device_mapper() {
    if let Some(why) = vm_lane::unavailable() {
        skip::cannot_run(&why);
        return;
    }
    let binaries = test_binaries();
    let dir = tempfile::Builder::new()
        .prefix("kennel-vm-lane-")
        .tempdir()
        .expect("temp dir");
    let script = dir.path().join("lane.sh");
    fs::write(&script, guest_script(&binaries)).expect("write the guest script");
    let results_dir = dir.path().join("results");
    let repo = vm_lane::repo();
    let log_path = repo.join("target/vm/lane.log");
    let log_file = fs::File::create(&log_path).expect("create the lane log");

    let mut cmd = Command::new(repo.join("hack/vm/run.sh"));
    cmd.arg("-t")
        .arg(LANE_TIMEOUT_SECS.to_string())
        .arg("-e")
        .arg(format!("{}=1", vm_lane::LANE_ENV))
        .arg("-e")
        .arg("RUST_BACKTRACE=1")
        // Software emulation: deadlines written for real hardware, times 4.
        .arg("-e")
        .arg("KENNEL_TEST_TIMEOUT_SCALE=4")
        .arg("-p")
        .arg(env!("CARGO_BIN_EXE_kennel"))
        .arg("-o")
        .arg(&results_dir);
    for exe in binaries.values() {
        cmd.arg("-p").arg(exe);
    }
    cmd.arg("-p").arg(&script).arg("--").arg("sh").arg(&script);
    say(&format!(
        "booting a guest for {} (console: {})",
        SUITES.join(", "),
        log_path.display()
    ));
    let started = std::time::Instant::now();
    let status = cmd
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("dup"))
        .stderr(log_file)
        .status()
        .expect("run hack/vm/run.sh");
    let console = fs::read_to_string(&log_path).unwrap_or_default();
    let boot = console
        .lines()
        .find_map(|l| l.strip_prefix("kennel-vm: up after "))
        .unwrap_or("?")
        .to_owned();
    let log = fs::read_to_string(results_dir.join("log")).unwrap_or_else(|_| console.clone());
    let results = parse(&log);
    for suite in SUITES {
        match results.get(*suite) {
            Some(r) => say(&format!(
                "{suite}: {} in {} ({})",
                if r.status == 0 { "ok" } else { "FAILED" },
                r.duration,
                r.summary
            )),
            None => say(&format!("{suite}: did not finish")),
        }
    }
    // Measurements the suites made, for the person running the lane.
    for line in log.lines().filter(|l| l.starts_with("KENNEL-REPORT ")) {
        say(line);
    }
    say(&format!(
        "guest booted in {boot}, lane took {}s",
        started.elapsed().as_secs()
    ));

    let failed: Vec<&str> = SUITES
        .iter()
        .copied()
        .filter(|s| results.get(*s).is_none_or(|r| r.status != 0))
        .collect();
    if !failed.is_empty() || !status.success() {
        println!("{log}");
        panic!(
            "VM lane: {} failed (run.sh exit {status}); the guest's output is above and in {}",
            if failed.is_empty() {
                "the run".to_owned()
            } else {
                failed.join(", ")
            },
            log_path.display()
        );
    }
    // A suite that ran no test proves nothing.
    for suite in SUITES {
        let summary = &results[*suite].summary;
        assert!(
            summary.starts_with("test result: ok.") && !summary.contains(" 0 passed"),
            "{suite}: {summary}"
        );
    }
    assert!(
        !log.contains("KENNEL-SKIP") && !log.contains("KENNEL-VM-LANE"),
        "a test skipped inside the VM lane:\n{log}"
    );
    for test in LANE_TESTS {
        assert!(
            log.lines()
                .any(|l| l.starts_with("test ") && l.contains(&format!("::{test} ... ok"))),
            "{test} did not pass inside the VM lane:\n{log}"
        );
    }
}
