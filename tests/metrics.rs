//! `kennel driver --metrics-addr`: the real binary on a temporary socket and loop directory, a
//! `kennel ctl` lifecycle against it, and the Prometheus text read back over HTTP.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/skip.rs"]
mod skip;

use kennel::csi::client::CsiClient;
use kennel::csi::pb;
use kennel::metrics::http_get;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_kennel");

struct Driver {
    child: Child,
    dir: PathBuf,
    endpoint: String,
    addr: SocketAddr,
}

impl Drop for Driver {
    fn drop(&mut self) {
        // After a failed assertion: leave no mounts behind in the temporary directory.
        for sub in ["target", "staging"] {
            let _ = nix::mount::umount2(&self.dir.join(sub), nix::mount::MntFlags::MNT_DETACH);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("driver.log")).unwrap_or_default();
            eprintln!("driver log:\n{log}");
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn start(dir: &Path) -> Driver {
    let endpoint = format!("unix://{}", dir.join("csi.sock").display());
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("driver.log")).unwrap();
    let child = Command::new(BIN)
        .args([
            "driver",
            "--endpoint",
            &endpoint,
            "--node-id",
            "metrics-node",
        ])
        .arg("--loop-dir")
        .arg(dir.join("loop"))
        .arg("--kubelet-dir")
        .arg(dir)
        .args([
            "--capacity",
            "256MiB",
            "--reserve",
            "0",
            "--provisioning",
            "sparse",
        ])
        .args(["--metrics-addr", &addr.to_string()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start kennel driver");
    let mut driver = Driver {
        child,
        dir: dir.to_owned(),
        endpoint,
        addr,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = driver.child.try_wait().unwrap() {
            panic!("driver exited with {status} before serving");
        }
        if matches!(http_get(addr, "/healthz").await, Ok((200, _)))
            && CsiClient::connect(&driver.endpoint).await.is_ok()
        {
            return driver;
        }
        assert!(Instant::now() < deadline, "driver did not start serving");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ctl(endpoint: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["ctl", "--endpoint", endpoint, "--json"])
        .args(args)
        .output()
        .expect("run kennel ctl");
    assert!(
        out.status.success(),
        "kennel ctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// The value of the sample line starting with `series ` (0 when absent).
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .map(|v| v.parse().expect("sample value"))
        .unwrap_or(0.0)
}

async fn scrape(addr: SocketAddr) -> String {
    let (status, body) = http_get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_a_ctl_lifecycle() {
    if (!nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists())
        && skip::cannot_run("needs root and loop devices")
    {
        return;
    }
    let tmp = tempfile::Builder::new()
        .prefix("kennel-metrics-")
        .tempdir()
        .unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    let _kubelet = kennel::node::mount::SharedMount::new(&dir).expect("shared kubelet dir");
    let driver = start(&dir).await;
    let (e, addr) = (driver.endpoint.clone(), driver.addr);

    assert_eq!(
        http_get(addr, "/readyz").await.unwrap().0,
        200,
        "loop backend answers"
    );
    assert_eq!(http_get(addr, "/nope").await.unwrap().0, 404);
    let before = scrape(addr).await;
    assert_eq!(value(&before, "kennel_backend_up{backend=\"loop\"}"), 1.0);
    assert_eq!(
        value(&before, "kennel_pool_capacity_bytes{backend=\"loop\"}"),
        268_435_456.0
    );
    assert_eq!(
        value(&before, "kennel_csi_rpc_total{rpc=\"CreateVolume\"}"),
        0.0
    );

    let staging = dir.join("staging");
    let target = dir.join("target");
    std::fs::create_dir_all(&staging).unwrap();
    let (staging, target) = (staging.display().to_string(), target.display().to_string());
    let created = ctl(
        &e,
        &[
            "create",
            "metrics-vol",
            "--size",
            "64Mi",
            "--fs-type",
            "ext4",
        ],
    );
    let id = created["volume_id"].as_str().expect("volume_id").to_owned();

    let mid = scrape(addr).await;
    assert_eq!(
        value(&mid, "kennel_volumes{backend=\"loop\",class=\"default\"}"),
        1.0,
        "{mid}"
    );
    assert_eq!(
        value(
            &mid,
            "kennel_volume_bytes{backend=\"loop\",class=\"default\"}"
        ),
        67_108_864.0
    );
    assert_eq!(
        value(&mid, "kennel_pool_provisioned_bytes{backend=\"loop\"}"),
        67_108_864.0
    );

    ctl(
        &e,
        &["stage", &id, "--staging", &staging, "--fs-type", "ext4"],
    );
    ctl(
        &e,
        &[
            "publish",
            &id,
            "--staging",
            &staging,
            "--target",
            &target,
            "--fs-type",
            "ext4",
        ],
    );
    ctl(&e, &["unpublish", &id, "--target", &target]);
    ctl(&e, &["unstage", &id, "--staging", &staging]);
    ctl(&e, &["delete", &id]);

    // A deliberate NOT_FOUND: the volume is gone.
    let mut client = CsiClient::connect(&e).await.unwrap();
    let gone = client
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: id.clone(),
        })
        .await
        .expect_err("deleted volume");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");

    let after = scrape(addr).await;
    for rpc in [
        "CreateVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "NodeUnpublishVolume",
        "NodeUnstageVolume",
        "DeleteVolume",
        "ControllerGetVolume",
    ] {
        let calls = value(&after, &format!("kennel_csi_rpc_total{{rpc=\"{rpc}\"}}"));
        assert!(calls >= 1.0, "{rpc} not counted:\n{after}");
        let timed = value(
            &after,
            &format!("kennel_csi_rpc_duration_seconds_count{{rpc=\"{rpc}\"}}"),
        );
        assert_eq!(timed, calls, "{rpc}: every call is timed");
        let inf = value(
            &after,
            &format!("kennel_csi_rpc_duration_seconds_bucket{{rpc=\"{rpc}\",le=\"+Inf\"}}"),
        );
        assert_eq!(inf, calls);
    }
    assert_eq!(
        value(
            &after,
            "kennel_csi_rpc_errors_total{rpc=\"ControllerGetVolume\",code=\"NotFound\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        value(
            &after,
            "kennel_csi_rpc_errors_total{rpc=\"CreateVolume\",code=\"NotFound\"}"
        ),
        0.0
    );
    assert!(
        !after.contains("kennel_csi_rpc_errors_total{rpc=\"DeleteVolume\""),
        "{after}"
    );
    assert_eq!(
        value(&after, "kennel_volumes{backend=\"loop\",class=\"default\"}"),
        0.0
    );
    assert_eq!(
        value(&after, "kennel_pool_provisioned_bytes{backend=\"loop\"}"),
        0.0
    );
    assert!(after.contains("# TYPE kennel_csi_rpc_duration_seconds histogram"));
    drop(driver);
}
