//! gRPC clients other than Go's against the real driver. grpc C-core 1.57+ (Python `grpcio`)
//! sends a Unix socket's path as `:authority`; the HTTP/2 library under tonic rejects that
//! authority before any Kennel code runs, so the client must set its default authority to
//! `localhost` (README, Troubleshooting). Both halves are checked here: the documented failure
//! and the documented fix. The client comes from `hack/setup-ops.sh` (a venv under target/).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

#[path = "common/skip.rs"]
mod skip;

const KENNEL: &str = env!("CARGO_BIN_EXE_kennel");

/// One raw unary call (no generated stubs: the empty request serializes to no bytes); prints
/// `OK <hex of the response>` or `ERR <code> <details>`.
const CLIENT: &str = r#"
import sys, grpc
target, method, authority = sys.argv[1], sys.argv[2], sys.argv[3]
options = [("grpc.default_authority", authority)] if authority else []
channel = grpc.insecure_channel(target, options=options)
call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
try:
    print("OK", call(b"", timeout=10).hex())
except grpc.RpcError as e:
    print("ERR", e.code().name, e.details())
"#;

struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python() -> Option<PathBuf> {
    let path = std::env::var_os("KENNEL_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyvenv/bin/python"));
    let has_grpc = Command::new(&path)
        .args(["-c", "import grpc"])
        .status()
        .is_ok_and(|s| s.success());
    has_grpc.then_some(path)
}

fn call(python: &Path, endpoint: &str, method: &str, authority: &str) -> String {
    let out = Command::new(python)
        .args(["-c", CLIENT, endpoint, method, authority])
        .output()
        .expect("run the Python client");
    assert!(
        out.status.success(),
        "client crashed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn python_grpcio_needs_the_localhost_authority() {
    let Some(python) = python() else {
        skip::cannot_run("no Python with grpcio: run hack/setup-ops.sh");
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    // The driver serves only a kubelet directory on a shared mount.
    let _kubelet = match kennel::node::shared_mount::SharedMount::new(dir.path()) {
        Ok(kubelet) => kubelet,
        Err(e) => {
            skip::cannot_run(&format!("no shared mount for the kubelet directory: {e}"));
            return;
        }
    };
    let socket = dir.path().join("csi.sock");
    let endpoint = format!("unix://{}", socket.display());
    let _driver = Driver(
        Command::new(KENNEL)
            .args(["driver", "--endpoint", &endpoint, "--node-id", "py-node"])
            .args([
                "--provisioning",
                "sparse",
                "--capacity",
                "1GiB",
                "--reserve",
                "0",
            ])
            .arg("--loop-dir")
            .arg(dir.path().join("loop"))
            .arg("--kubelet-dir")
            .arg(dir.path())
            .env("RUST_LOG", "warn")
            .spawn()
            .expect("start driver"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            Instant::now() < deadline,
            "driver did not create its socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The fix: with `grpc.default_authority=localhost` every call works.
    let info = call(
        &python,
        &endpoint,
        "/csi.v1.Identity/GetPluginInfo",
        "localhost",
    );
    let hex_name: String = "kennel.csi.dev"
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert!(
        info.starts_with("OK ") && info.contains(&hex_name),
        "{info}"
    );
    let probe = call(&python, &endpoint, "/csi.v1.Identity/Probe", "localhost");
    assert!(probe.starts_with("OK"), "{probe}");

    // The failure the troubleshooting table describes: the socket path as authority is reset
    // with an HTTP/2 PROTOCOL_ERROR (code 1) and surfaces as INTERNAL.
    let refused = call(&python, &endpoint, "/csi.v1.Identity/GetPluginInfo", "");
    assert!(refused.starts_with("ERR INTERNAL"), "{refused}");
    assert!(refused.contains("RST_STREAM"), "{refused}");
    assert!(refused.contains("error code 1"), "{refused}");
}
