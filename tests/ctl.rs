//! `kennel ctl` against a real driver: JSON output, snapshots and clones, and
//! the gRPC code of a failed call on stderr with a non-zero exit.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/skip.rs"]
mod skip;

const KENNEL: &str = env!("CARGO_BIN_EXE_kennel");

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sparse images only: no loop device, mount or root needed.
fn start(dir: &Path) -> (Driver, String) {
    let endpoint = format!("unix://{}", dir.join("csi.sock").display());
    let child = Command::new(KENNEL)
        .args(["driver", "--endpoint", &endpoint, "--node-id", "ctl-node"])
        .args([
            "--provisioning",
            "sparse",
            "--capacity",
            "1GiB",
            "--reserve",
            "0",
        ])
        .arg("--loop-dir")
        .arg(dir.join("loop"))
        .arg("--kubelet-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .spawn()
        .expect("start driver");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("csi.sock").exists() {
        assert!(
            Instant::now() < deadline,
            "driver did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (Driver(child), endpoint)
}

fn ctl(endpoint: &str, args: &[&str]) -> Output {
    Command::new(KENNEL)
        .args(["ctl", "--endpoint", endpoint, "--json"])
        .args(args)
        .output()
        .expect("run kennel ctl")
}

fn ctl_json(endpoint: &str, args: &[&str]) -> Value {
    let out = ctl(endpoint, args);
    assert!(
        out.status.success(),
        "kennel ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

#[test]
fn snapshot_restore_and_errors_through_ctl() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The driver serves only a kubelet directory on a shared mount; making
    // one takes root unless the temporary directory already is on one.
    let _kubelet = match kennel::node::mount::SharedMount::new(dir.path()) {
        Ok(kubelet) => kubelet,
        Err(e) if skip::cannot_run(&format!("no shared mount for the kubelet directory: {e}")) => {
            return
        }
        Err(e) => panic!("{e}"),
    };
    let (_driver, endpoint) = start(dir.path());

    let volume = ctl_json(
        &endpoint,
        &["create", "www-web-0", "--size", "8Mi", "--block"],
    );
    let id = volume["volume_id"].as_str().expect("volume id").to_owned();
    assert_eq!(volume["capacity_bytes"], 8 << 20);

    let snap = ctl_json(&endpoint, &["snapshot", "snap-a", &id]);
    let snap_id = snap["snapshot_id"]
        .as_str()
        .expect("snapshot id")
        .to_owned();
    assert_eq!(snap["source_volume_id"], id.as_str());
    let listed = ctl_json(&endpoint, &["snapshots", "--volume-id", &id]);
    assert_eq!(listed["snapshots"].as_array().map(Vec::len), Some(1));

    let restored = ctl_json(
        &endpoint,
        &[
            "create",
            "restored",
            "--size",
            "16Mi",
            "--block",
            "--from-snapshot",
            &snap_id,
        ],
    );
    assert_eq!(restored["capacity_bytes"], 16 << 20);
    let volumes = ctl_json(&endpoint, &["list"]);
    assert_eq!(volumes["volumes"].as_array().map(Vec::len), Some(2));

    ctl_json(&endpoint, &["delete-snapshot", &snap_id]);
    let listed = ctl_json(&endpoint, &["snapshots"]);
    assert_eq!(listed["snapshots"].as_array().map(Vec::len), Some(0));

    // A failed call exits non-zero and names its gRPC code.
    let missing = ctl(
        &endpoint,
        &[
            "stats",
            "kv-000000000000000000000000",
            "--path",
            "/nonexistent",
        ],
    );
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
}
