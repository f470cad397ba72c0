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
    "lvm_node",
    "lvm_controller",
    "lvm_crash",
    "conformance_lvm",
];
/// QEMU is killed after this long (TCG: a slow machine).
const LANE_TIMEOUT_SECS: u64 = 1800;

/// Progress on the real stdout (past cargo's capture): the lane is long.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "vm lane: {line}");
    let _ = out.flush();
}

/// The suites' test executables, built (or found fresh) by cargo with the
/// profile this test was built with.
fn test_binaries() -> BTreeMap<String, PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let exe = std::env::current_exe().expect("current exe");
    let release = exe
        .ancestors()
        .any(|p| p.file_name().is_some_and(|n| n == "release"));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(vm_lane::repo())
        .args(["test", "--no-run", "--locked", "--message-format=json"]);
    if release {
        cmd.arg("--release");
    }
    for suite in SUITES {
        cmd.args(["--test", suite]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .expect("run cargo test --no-run");
    assert!(out.status.success(), "building the LVM suites failed");
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (
            msg["target"]["name"].as_str(),
            msg["executable"].as_str(),
        ) else {
            continue;
        };
        if SUITES.contains(&name) && msg["profile"]["test"].as_bool() == Some(true) {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    for suite in SUITES {
        assert!(found.contains_key(*suite), "cargo built no {suite} test");
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
            if failed.is_empty() { "the run".to_owned() } else { failed.join(", ") },
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
        !log.contains("KENNEL-SKIP"),
        "a test skipped inside the VM lane:\n{log}"
    );
}
