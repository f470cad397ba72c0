//! `kennel ctl` against a real driver: JSON output, snapshots and clones, tables and readable
//! text, and the gRPC code of a failed call on stderr with a non-zero exit.

use std::path::Path;
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

#[path = "common/skip.rs"]
mod skip;

const KENNEL: &str = env!("CARGO_BIN_EXE_kennel");

/// The driver process and the shared mount its kubelet directory needs.
struct Driver {
    child: Child,
    _kubelet: kennel::node::shared_mount::SharedMount,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sparse images only: no loop device, mount or root needed.
/// A driver serving `dir`, or `None` when it cannot run here and skips are allowed.
fn start(dir: &Path) -> Option<(Driver, String)> {
    // The driver serves only a kubelet directory on a shared mount; making
    // one takes root unless the temporary directory already is on one.
    let kubelet = match kennel::node::shared_mount::SharedMount::new(dir) {
        Ok(kubelet) => kubelet,
        Err(e) if skip::cannot_run(&format!("no shared mount for the kubelet directory: {e}")) => {
            return None
        }
        Err(e) => panic!("{e}"),
    };
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
    Some((
        Driver {
            child,
            _kubelet: kubelet,
        },
        endpoint,
    ))
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
    let Some((_driver, endpoint)) = start(dir.path()) else {
        return;
    };

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

fn ctl_text(endpoint: &str, args: &[&str]) -> String {
    let out = Command::new(KENNEL)
        .args(["ctl", "--endpoint", endpoint])
        .args(args)
        .output()
        .expect("run kennel ctl");
    assert!(
        out.status.success(),
        "kennel ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

#[test]
fn tables_and_readable_text_by_default() {
    let dir = tempfile::tempdir().expect("temp dir");
    let Some((_driver, endpoint)) = start(dir.path()) else {
        return;
    };
    let volume = ctl_json(
        &endpoint,
        &[
            "create",
            "data-db-0",
            "--size",
            "64Mi",
            "--block",
            "--param",
            "csi.storage.k8s.io/pvc/name=data-db-0",
            "--param",
            "csi.storage.k8s.io/pvc/namespace=shop",
            "--param",
            "csi.storage.k8s.io/pv/name=pvc-123",
        ],
    );
    let id = volume["volume_id"].as_str().expect("volume id").to_owned();

    // JSON for machines: stable names, bytes as numbers, the claim and this node's view.
    let listed = ctl_json(&endpoint, &["list"]);
    let entry = &listed["volumes"][0];
    assert_eq!(entry["volume_id"], id.as_str());
    assert_eq!(entry["capacity_bytes"], 64 << 20);
    assert_eq!(entry["claim"], "shop/data-db-0");
    assert_eq!(entry["pv"], "pvc-123");
    assert_eq!(entry["node"], "ctl-node");
    assert_eq!(entry["abnormal"], false);
    // Not attached anywhere: a sparse image no one staged.
    assert_eq!(
        entry["node_state"],
        serde_json::json!({"attached": false, "staged": false, "published": 0, "fs_type": null})
    );

    let table = ctl_text(&endpoint, &["list"]);
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().expect("header").split_whitespace().collect();
    assert_eq!(
        header,
        ["ID", "SIZE", "TYPE", "CLAIM", "STATE", "CONDITION"]
    );
    let row: Vec<&str> = lines.next().expect("one row").split_whitespace().collect();
    assert_eq!(
        row,
        [
            id.as_str(),
            "64",
            "MiB",
            "-",
            "shop/data-db-0",
            "-",
            "healthy"
        ]
    );
    assert_eq!(lines.next(), None, "{table}");
    let wide = ctl_text(&endpoint, &["list", "-o", "wide"]);
    assert!(
        wide.lines()
            .next()
            .unwrap()
            .ends_with("PV        NODE       PARAMETERS"),
        "{wide}"
    );
    assert!(wide.contains("pvc-123"), "{wide}");
    // `-o json` is `--json`.
    let json: Value = serde_json::from_str(&ctl_text(&endpoint, &["list", "-o", "json"]))
        .expect("JSON from -o json");
    assert_eq!(json["volumes"][0]["volume_id"], id.as_str());

    let info = ctl_text(&endpoint, &["info"]);
    assert!(!info.contains("Some("), "{info}");
    assert!(info.contains("CONTROLLER_SERVICE"), "{info}");
    assert!(info.contains("node_id:"), "{info}");
    let info_json = ctl_json(&endpoint, &["info"]);
    assert!(info_json["plugin_capabilities"]
        .as_array()
        .expect("capability list")
        .iter()
        .any(|c| c == "VOLUME_ACCESSIBILITY_CONSTRAINTS"));

    // 1 GiB pool with 64 MiB promised: sizes in binary units.
    let capacity = ctl_text(&endpoint, &["capacity"]);
    assert!(capacity.contains("available:"), "{capacity}");
    assert!(capacity.contains("960 MiB"), "{capacity}");
    assert!(!capacity.contains("_bytes"), "{capacity}");

    let snapshots = ctl_text(&endpoint, &["snapshots"]);
    assert_eq!(snapshots, "No snapshots.\n");
    ctl_json(&endpoint, &["snapshot", "s1", &id]);
    let snapshots = ctl_text(&endpoint, &["snapshots"]);
    let header: Vec<&str> = snapshots
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["ID", "SOURCE", "SIZE", "READY", "CREATED"]);
    assert!(snapshots.contains(&id), "{snapshots}");

    // Every command explains itself.
    let help = Command::new(KENNEL)
        .args(["ctl", "--help"])
        .output()
        .expect("ctl --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for command in ["delete ", "unpublish ", "unstage ", "delete-snapshot "] {
        let line = help
            .lines()
            .find(|l| l.trim_start().starts_with(command))
            .unwrap_or_else(|| panic!("{command} missing from\n{help}"));
        assert!(
            line.trim_start().len() > command.len() + 5,
            "no help text: {line}"
        );
    }
}
