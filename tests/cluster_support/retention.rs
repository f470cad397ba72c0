//! `kennel retention` as a process under `deploy/`'s ServiceAccount and
//! ClusterRole (a token of kennel-system/kennel-retention), so the API
//! server itself checks its RBAC; and the claims, events and node moves the
//! retention scenarios look at.

use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use super::procs::{wait_for, Daemon};
use super::workload::{self, describe};
use super::{Backend, Cluster};

/// How long a pod must wait on a lost node before Kennel recreates its
/// claim, in these tests.
pub const NODE_LOSS_GRACE: &str = "5s";

/// Start (or restart) `kennel retention`; its log accumulates across restarts.
pub fn start_retention(cluster: &mut Cluster) {
    start_retention_with(cluster, &[]);
}

/// `kennel retention` under the kennel-retention ServiceAccount, with `extra` flags.
pub fn retention_command(cluster: &Cluster, extra: &[&str]) -> Command {
    let kubeconfig = cluster.service_account_kubeconfig("kennel-retention");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kennel"));
    cmd.arg("retention")
        .arg("--leader-election=false")
        .arg(format!("--node-loss-grace={NODE_LOSS_GRACE}"))
        .arg("--resync-interval=30s")
        .args(extra)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "kennel=debug,info")
        .env("NO_COLOR", "1");
    cmd
}

/// Start (or restart) `kennel retention` with `extra` flags.
pub fn start_retention_with(cluster: &mut Cluster, extra: &[&str]) {
    let cmd = retention_command(cluster, extra);
    start_retention_command(cluster, cmd);
}

/// Start (or restart) `kennel retention` able to stop at its steps (src/faults.rs): pause
/// files in `pause_dir`.
pub fn start_retention_pausable(cluster: &mut Cluster, pause_dir: &std::path::Path) {
    let mut cmd = retention_command(cluster, &[]);
    cmd.env(kennel::faults::PAUSE_DIR_ENV, pause_dir);
    start_retention_command(cluster, cmd);
}

fn start_retention_command(cluster: &mut Cluster, cmd: Command) {
    stop_retention(cluster);
    let daemon = Daemon::spawn("kennel-retention", cmd, &cluster.logs);
    cluster.extra.push(daemon);
    let log = cluster.logs.join("kennel-retention.log");
    wait_for(
        "kennel retention to start",
        60,
        || {
            retention(cluster).assert_running();
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("built-in StatefulSet retention")
                .then_some(())
        },
        || super::procs::tail(&log, 30),
    );
}

fn retention(cluster: &mut Cluster) -> &mut Daemon {
    cluster
        .extra
        .iter_mut()
        .find(|d| d.name == "kennel-retention")
        .expect("kennel retention started")
}

/// SIGKILL `kennel retention` (as a crash would).
pub fn kill_retention(cluster: &mut Cluster) {
    if let Some(d) = cluster
        .extra
        .iter_mut()
        .find(|d| d.name == "kennel-retention")
    {
        d.kill();
    }
}

pub fn stop_retention(cluster: &mut Cluster) {
    cluster.extra.retain_mut(|d| {
        if d.name == "kennel-retention" {
            d.stop(Duration::from_secs(5));
            false
        } else {
            true
        }
    });
}

pub fn retention_log(cluster: &Cluster) -> String {
    std::fs::read_to_string(cluster.logs.join("kennel-retention.log")).unwrap_or_default()
}

/// Lines of Kennel's log at WARN or ERROR level.
pub fn retention_problems(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| {
            l.contains(" WARN ")
                || l.contains(" ERROR ")
                // Only an API status names a refusal: a bare "403" also
                // turns up inside timestamps and UIDs.
                || l.contains("code: 403")
                || l.contains("Forbidden")
        })
        .map(str::to_owned)
        .collect()
}

/// The webserver set with Kennel's retention annotations (honoured when
/// the built-in retention is off) or the spec field, and `extra`
/// annotations.
pub fn set_with_policy(
    backend: Backend,
    name: &str,
    replicas: u32,
    when_deleted: &str,
    when_scaled: &str,
    annotations: &[(&str, &str)],
) -> (Value, Value) {
    let (service, mut set) = workload::webserver(backend, name, replicas);
    set["spec"]["persistentVolumeClaimRetentionPolicy"] =
        json!({"whenDeleted": when_deleted, "whenScaled": when_scaled});
    let mut notes = serde_json::Map::new();
    notes.insert("kennel.csi.dev/when-deleted".into(), json!(when_deleted));
    notes.insert("kennel.csi.dev/when-scaled".into(), json!(when_scaled));
    for (k, v) in annotations {
        notes.insert((*k).into(), json!(v));
    }
    set["metadata"]["annotations"] = Value::Object(notes);
    (service, set)
}

/// Names of the claims in `ns`.
pub fn claims(cluster: &Cluster, ns: &str) -> Vec<String> {
    let mut names: Vec<String> = cluster
        .kubectl
        .list(&["pvc", "-n", ns])
        .iter()
        .filter(|c| c["metadata"]["deletionTimestamp"].is_null())
        .map(|c| super::kube::name_of(c).to_owned())
        .collect();
    names.sort();
    names
}

/// Wait until the live claims of `ns` are exactly `expected`.
#[track_caller]
pub fn wait_claims(cluster: &Cluster, ns: &str, expected: &[&str], secs: u64) {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(
        &format!("claims of {ns} to be exactly {want:?}"),
        secs,
        || (claims(cluster, ns) == want).then_some(()),
        || describe(cluster, ns) + &retention_tail(cluster),
    );
}

/// Assert the claims stay exactly `expected` for `secs`.
#[track_caller]
pub fn hold_claims(cluster: &Cluster, ns: &str, expected: &[&str], secs: u64) {
    let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    want.sort();
    let until = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < until {
        let now = claims(cluster, ns);
        assert_eq!(
            now,
            want,
            "claims of {ns} changed\n{}",
            describe(cluster, ns)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

pub fn retention_tail(cluster: &Cluster) -> String {
    format!(
        "\n---- kennel retention ----\n{}",
        super::procs::tail(&cluster.logs.join("kennel-retention.log"), 40)
    )
}

/// Events of `ns` with `reason`: their messages.
pub fn events(cluster: &Cluster, ns: &str, reason: &str) -> Vec<String> {
    cluster
        .kubectl
        .list(&["events", "-n", ns])
        .iter()
        .filter(|e| e["reason"] == reason)
        .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
        .collect()
}
