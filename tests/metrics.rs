//! `kennel driver --metrics-addr`: the real binary on a temporary socket and loop directory, a
//! `kennel ctl` lifecycle against it, the Prometheus text read back over HTTP, and the log it
//! wrote: one INFO line per state change, JSON fields intact, no colour codes in a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/skip.rs"]
mod skip;

use kennel::csi::client::CsiClient;
use kennel::csi::pb;
use kennel::metrics_endpoint::http_get;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_kennel");

struct Driver {
    child: Child,
    dir: PathBuf,
    endpoint: String,
    addr: SocketAddr,
    /// The driver serves only a kubelet directory on a shared mount.
    _kubelet: kennel::node::shared_mount::SharedMount,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // After a failed assertion: leave no mount or loop device behind.
        if let Err(e) = kennel::node::cleanup::release_all_under(&self.dir) {
            eprintln!("cleaning up {}: {e}", self.dir.display());
        }
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

/// A temporary directory and its canonical path (the driver wants one).
fn temp_dir(prefix: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    let dir = std::fs::canonicalize(tmp.path()).unwrap();
    (tmp, dir)
}

/// The driver, or `None` where it cannot run (no root for its kubelet mount).
async fn start(dir: &Path, log_format: &str) -> Option<Driver> {
    let kubelet = match kennel::node::shared_mount::SharedMount::new(dir) {
        Ok(kubelet) => kubelet,
        Err(e) if skip::cannot_run(&format!("no shared mount for the kubelet directory: {e}")) => {
            return None;
        }
        Err(e) => panic!("a shared mount for the kubelet directory: {e}"),
    };
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
        .args(["--log-format", log_format])
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
        _kubelet: kubelet,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = driver.child.try_wait().unwrap() {
            panic!("driver exited with {status} before serving");
        }
        if matches!(http_get(addr, "/healthz").await, Ok((200, _)))
            && CsiClient::connect(&driver.endpoint).await.is_ok()
        {
            return Some(driver);
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

/// Gauges follow the backend a moment after a change (a background observation, not the
/// scrape, reads it): scrape until `series` shows `want`.
async fn scrape_until(addr: SocketAddr, series: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(addr).await;
        if value(&text, series) == want {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {want}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The JSON log lines the driver wrote so far.
fn json_log(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("driver.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_with_a_ctl_lifecycle() {
    if (!nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists())
        && skip::cannot_run("needs root and loop devices")
    {
        return;
    }
    let (_tmp, dir) = temp_dir("kennel-metrics-");
    let Some(driver) = start(&dir, "json").await else {
        return;
    };
    let (e, addr) = (driver.endpoint.clone(), driver.addr);

    let before = scrape_until(addr, "kennel_backend_up{backend=\"loop\"}", 1.0).await;
    assert_eq!(
        http_get(addr, "/readyz").await.unwrap().0,
        200,
        "loop backend answers"
    );
    assert_eq!(http_get(addr, "/nope").await.unwrap().0, 404);
    assert_eq!(
        value(
            &before,
            "kennel_pool_capacity_bytes{backend=\"loop\",device_class=\"default\"}"
        ),
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
            "--param",
            "csi.storage.k8s.io/pvc/name=data-db-0",
            "--param",
            "csi.storage.k8s.io/pvc/namespace=shop",
        ],
    );
    let id = created["volume_id"].as_str().expect("volume_id").to_owned();

    let mid = scrape_until(
        addr,
        "kennel_volumes{backend=\"loop\",class=\"default\"}",
        1.0,
    )
    .await;
    assert_eq!(
        value(
            &mid,
            "kennel_volume_bytes{backend=\"loop\",class=\"default\"}"
        ),
        67_108_864.0
    );
    assert_eq!(
        value(
            &mid,
            "kennel_pool_provisioned_bytes{backend=\"loop\",device_class=\"default\"}"
        ),
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
    // `kennel ctl list` sees the volume staged and published on this node.
    let listed = ctl(&e, &["list"]);
    assert_eq!(
        listed["volumes"][0]["node_state"],
        serde_json::json!({"attached": true, "staged": true, "published": 1, "fs_type": "ext4"}),
        "{listed}"
    );
    // Controller side only: growing a mounted ext4 needs CAP_SYS_RESOURCE, which CI may lack.
    ctl(&e, &["expand", &id, "--size", "80Mi"]);
    let snapshot = ctl(&e, &["snapshot", "metrics-snap", &id]);
    let snapshot_id = snapshot["snapshot_id"].as_str().expect("snapshot_id");
    ctl(&e, &["delete-snapshot", snapshot_id]);
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
            &format!("kennel_csi_rpc_duration_seconds_bucket{{le=\"+Inf\",rpc=\"{rpc}\"}}"),
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
    let after = scrape_until(
        addr,
        "kennel_pool_provisioned_bytes{backend=\"loop\",device_class=\"default\"}",
        0.0,
    )
    .await;
    assert!(
        !after.contains("kennel_volumes{"),
        "no volume left to count:\n{after}"
    );
    assert!(after.contains("# TYPE kennel_csi_rpc_duration_seconds histogram"));

    // The log: every state change once at INFO, with the volume, its claim, paths, duration.
    let log = json_log(&dir);
    let info = |message: &str| -> Vec<&serde_json::Value> {
        log.iter()
            .filter(|l| l["level"] == "INFO" && l["message"] == message)
            .collect()
    };
    let expected = [
        ("volume created", &[][..]),
        ("volume staged", &["staging_path"][..]),
        ("volume published", &["staging_path", "target_path"][..]),
        ("volume expanded", &["bytes"][..]),
        ("snapshot created", &["snapshot_id"][..]),
        ("volume unpublished", &["target_path"][..]),
        ("volume unstaged", &["staging_path"][..]),
        ("volume deleted", &[][..]),
    ];
    for (message, fields) in expected {
        let lines = info(message);
        assert_eq!(lines.len(), 1, "one INFO line for {message:?}: {lines:#?}");
        let line = lines[0];
        assert_eq!(line["volume_id"], id.as_str(), "{line}");
        assert_eq!(line["claim"], "shop/data-db-0", "{line}");
        assert!(line["duration_ms"].is_u64(), "{line}");
        for field in fields {
            assert!(!line[*field].is_null(), "{message}: no {field} in {line}");
        }
    }
    assert_eq!(info("volume staged")[0]["staging_path"], staging.as_str());
    assert_eq!(info("volume published")[0]["target_path"], target.as_str());
    assert_eq!(info("volume expanded")[0]["bytes"], 80 << 20);
    let deleted = info("snapshot deleted");
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0]["snapshot_id"], snapshot_id);
    // No other INFO line repeats a state change (the backend's own lines stay at debug).
    let changes = log
        .iter()
        .filter(|l| l["level"] == "INFO")
        .filter(|l| {
            let m = l["message"].as_str().unwrap_or_default();
            m.starts_with("volume ") || m.starts_with("snapshot ")
        })
        .count();
    assert_eq!(changes, expected.len() + 1, "{log:#?}");
    // The claim name survives in the span: CreateVolume's span has its own `name`
    // (the function) and the volume's name under another key.
    let created = info("volume created")[0];
    let span = created["spans"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "create_volume"))
        .unwrap_or_else(|| panic!("create_volume span in {created}"));
    assert_eq!(span["volume_name"], "metrics-vol", "{created}");
    // The NOT_FOUND is one line too, with its code and message.
    let failed = info("failed");
    assert_eq!(failed.len(), 1, "{failed:#?}");
    assert_eq!(failed[0]["code"], "NotFound");
    assert!(failed[0]["error"]
        .as_str()
        .unwrap_or_default()
        .contains(&id));
    drop(driver);
}

/// Text logs written to a file (as in a container) carry no ANSI colour codes.
/// The `kennel_volume_condition` series of `id` with `message`, as text encodes it.
fn condition_series(id: &str, claim: &str, message: &str) -> String {
    let message = message.replace('\\', "\\\\").replace('"', "\\\"");
    format!(
        "kennel_volume_condition{{backend=\"loop\",volume_id=\"{id}\",claim=\"{claim}\",message=\"{message}\"}}"
    )
}

/// A loop image truncated, then deleted, behind a staged and published volume: `kennel ctl
/// list` (ListVolumes), `kennel ctl stats` (NodeGetVolumeStats) and the metric all say so, with
/// one message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_image_shows_in_ctl_and_the_condition_metric() {
    if (!nix::unistd::geteuid().is_root() || !Path::new("/dev/loop-control").exists())
        && skip::cannot_run("needs root and loop devices")
    {
        return;
    }
    let (_tmp, dir) = temp_dir("kennel-metrics-");
    let Some(driver) = start(&dir, "json").await else {
        return;
    };
    let (e, addr) = (driver.endpoint.clone(), driver.addr);
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let target = dir.join("target").display().to_string();
    let staging = staging.display().to_string();
    let created = ctl(
        &e,
        &[
            "create",
            "damaged",
            "--size",
            "32Mi",
            "--param",
            "csi.storage.k8s.io/pvc/name=data-db-0",
            "--param",
            "csi.storage.k8s.io/pvc/namespace=shop",
        ],
    );
    let id = created["volume_id"].as_str().expect("volume_id").to_owned();
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
    scrape_until(
        addr,
        &condition_series(&id, "shop/data-db-0", "volume is healthy"),
        0.0,
    )
    .await;
    assert_eq!(
        ctl(&e, &["stats", &id, "--path", &target])["abnormal"],
        false
    );

    let image = dir.join("loop").join(format!("{id}.img"));
    for (damage, expect) in [
        ("truncated", "is 16777216 bytes, not 33554432"),
        ("gone", "is gone"),
    ] {
        match damage {
            "truncated" => std::fs::OpenOptions::new()
                .write(true)
                .open(&image)
                .unwrap()
                .set_len(16 << 20)
                .unwrap(),
            _ => std::fs::remove_file(&image).unwrap(),
        }
        let listed = ctl(&e, &["list"]);
        let entry = &listed["volumes"][0];
        assert_eq!(entry["abnormal"], true, "{damage}: {listed}");
        let message = entry["condition"].as_str().unwrap().to_owned();
        assert!(message.contains(expect), "{damage}: {message}");
        let stats = ctl(&e, &["stats", &id, "--path", &target]);
        assert_eq!(stats["abnormal"], true, "{damage}: {stats}");
        assert_eq!(stats["message"], message.as_str(), "{damage}");
        // Any call that may change state prompts an observation: a no-op delete.
        ctl(&e, &["delete", "kv-000000000000000000000000"]);
        scrape_until(
            addr,
            &condition_series(&id, "shop/data-db-0", &message),
            1.0,
        )
        .await;
    }
    ctl(&e, &["unpublish", &id, "--target", &target]);
    ctl(&e, &["unstage", &id, "--staging", &staging]);
    ctl(&e, &["delete", &id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_log_in_a_file_has_no_colour_codes() {
    let (_tmp, dir) = temp_dir("kennel-log-");
    let Some(driver) = start(&dir, "text").await else {
        return;
    };
    // Sparse images: creating one needs no root.
    ctl(
        &driver.endpoint,
        &["create", "plain", "--size", "8Mi", "--block"],
    );
    let log = std::fs::read_to_string(dir.join("driver.log")).unwrap();
    let created = log
        .lines()
        .find(|l| l.contains("volume created"))
        .unwrap_or_else(|| panic!("no creation line in\n{log}"));
    assert!(created.contains(" INFO "), "{created}");
    assert!(created.contains("volume_id=kv-"), "{created}");
    assert!(!log.contains('\x1b'), "colour codes in a file:\n{log:?}");
    drop(driver);
}

/// Metric names a text exposition defines: a counter `x` is sampled as `x_total`, a histogram
/// as `x_bucket`, `x_sum` and `x_count`, an info metric `x` as `x_info`.
fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut parts = rest.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// `kennel_...` names in a PromQL expression.
fn referenced_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("kennel_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Every metric the shipped dashboard and alerts use is one the driver or the retention
/// controller exports: compared with a live scrape of the driver and of the controller's
/// registry (the controller itself needs a cluster; its registry is the one it serves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_exported_metrics() {
    let (_tmp, dir) = temp_dir("kennel-dash-");
    let Some(driver) = start(&dir, "text").await else {
        return;
    };
    // A family shows once it has a sample: one call that succeeds, one that fails.
    ctl(
        &driver.endpoint,
        &["create", "dash", "--size", "8Mi", "--block"],
    );
    let mut client = CsiClient::connect(&driver.endpoint).await.unwrap();
    let missing = client
        .controller
        .controller_get_volume(pb::ControllerGetVolumeRequest {
            volume_id: "kv-000000000000000000000000".into(),
        })
        .await;
    assert_eq!(missing.expect_err("no such volume").code(), Code::NotFound);
    let driver_text = scrape_until(
        driver.addr,
        "kennel_volumes{backend=\"loop\",class=\"default\"}",
        1.0,
    )
    .await;
    let mut exported = exported_names(&driver_text);

    let retention = std::sync::Arc::new(kennel::retention::retention_metrics::Metrics::default());
    retention.reconciled();
    retention.action("claim_owners");
    retention.failure("conflict");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let retention_addr = listener.local_addr().unwrap();
    tokio::spawn(kennel::metrics_endpoint::serve_listener(
        listener, retention,
    ));
    let (status, retention_text) = http_get(retention_addr, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    exported.extend(exported_names(&retention_text));
    for name in [
        "kennel_csi_rpc_total",
        "kennel_csi_rpc_errors_total",
        "kennel_csi_rpc_duration_seconds_bucket",
        "kennel_pool_free_bytes",
        "kennel_build_info",
        "kennel_retention_failures_total",
    ] {
        assert!(exported.contains(name), "{name} not exported: {exported:?}");
    }

    let monitoring = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring");
    let read = |file: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(monitoring.join(file)).unwrap())
            .unwrap_or_else(|e| panic!("{file}: {e}"))
    };
    let mut expressions: Vec<(String, String)> = Vec::new();
    let dashboard = read("kennel-dashboard.json");
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("target expr");
            expressions.push((format!("panel {}", panel["title"]), expr.to_owned()));
        }
    }
    let rules = read("prometheusrule.json");
    assert_eq!(rules["kind"], "PrometheusRule");
    for group in rules["spec"]["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let alert = rule["alert"].as_str().expect("alert name");
            assert!(rule["labels"]["severity"].is_string(), "{alert}: severity");
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{alert}: summary"
            );
            let expr = rule["expr"].as_str().expect("alert expr");
            expressions.push((format!("alert {alert}"), expr.to_owned()));
        }
    }
    assert!(expressions.len() >= 20, "{expressions:?}");
    for (origin, expr) in &expressions {
        let names = referenced_names(expr);
        assert!(!names.is_empty(), "{origin} uses no Kennel metric: {expr}");
        for name in names {
            assert!(
                exported.contains(&name),
                "{origin} uses {name}, which nothing exports\n{expr}"
            );
        }
    }
    // The alerts that matter for local storage are all there.
    let alerts: Vec<&str> = expressions
        .iter()
        .filter_map(|(o, _)| o.strip_prefix("alert "))
        .collect();
    for alert in [
        "KennelPoolNearlyFull",
        "KennelCSIErrorRatioHigh",
        "KennelSlowStage",
        "KennelOrphanVolumes",
        "KennelRetentionFailing",
    ] {
        assert!(alerts.contains(&alert), "{alert} missing: {alerts:?}");
    }
    assert_eq!(
        referenced_names("rate(kennel_a_total[5m]) / kennel_b"),
        ["kennel_a_total", "kennel_b"]
    );
    drop(driver);
}
