//! `kennel retention` beside Kubernetes' own StatefulSet PVC retention, on
//! the default (current) release where it is GA and cannot be turned off:
//! Kennel must detect it, stay passive where it acts, never fight it, and
//! refuse `--builtin-retention=off` unless forced.

mod cluster_support;

use cluster_support::procs::{run, tail, wait_for};
use cluster_support::retention::*;
use cluster_support::workload::*;
use cluster_support::{run_scenarios, Backend, Cluster, ClusterOpts};

const B: Backend = Backend::Loop;

#[test]
fn retention_beside_the_builtin() {
    run_scenarios(
        ClusterOpts::default(),
        B,
        &[
            ("off-refused-where-ga", off_refused_where_ga),
            ("builtin-on-detected", builtin_on_detected),
            ("builtin-acts-kennel-passive", builtin_acts_kennel_passive),
        ],
    );
}

fn off_refused_where_ga(cluster: &mut Cluster) {
    let out = run(retention_command(cluster, &["--builtin-retention=off"]), 60);
    let stderr =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        !out.status.success(),
        "--builtin-retention=off started on a cluster where the built-in is GA:\n{stderr}"
    );
    assert!(
        stderr.contains("--builtin-retention=off refused")
            && stderr.contains("--force-builtin-retention-off"),
        "the refusal must say why and how to force it:\n{stderr}"
    );
    // Forced (a cluster without the StatefulSet controller): it runs, writing itself.
    start_retention_with(
        cluster,
        &["--builtin-retention=off", "--force-builtin-retention-off"],
    );
    let log = retention_log(cluster);
    assert!(
        log.contains("rule=Never"),
        "forced off must write itself:\n{log}"
    );
    stop_retention(cluster);
}

fn builtin_on_detected(cluster: &mut Cluster) {
    start_retention(cluster);
    let logs = cluster.logs.join("kennel-retention.log");
    wait_for(
        "kennel retention to state the rule for a GA server",
        30,
        || retention_log(cluster).contains("rule=Always").then_some(()),
        || tail(&logs, 20),
    );
}

fn builtin_acts_kennel_passive(cluster: &mut Cluster) {
    if !cluster.extra.iter().any(|d| d.name == "kennel-retention") {
        start_retention(cluster);
    }
    let ns = cluster.namespace("builtin");
    let (service, set) = set_with_policy(B, "web", 3, "Delete", "Delete", &[]);
    cluster.kubectl.apply(Some(&ns), &service);
    cluster.kubectl.apply(Some(&ns), &set);
    wait_pods_ready(cluster, &ns, &ordinals("web", 3), 240);
    let stored = cluster
        .kubectl
        .get(&["statefulset", "web", "-n", &ns])
        .expect("set");
    assert_eq!(
        stored["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"], "Delete",
        "the API server keeps the policy field (GA)"
    );
    cluster
        .kubectl
        .run(&["scale", "statefulset", "web", "-n", &ns, "--replicas=1"]);
    wait_claims(cluster, &ns, &["www-web-0"], 90);
    cluster
        .kubectl
        .run(&["delete", "statefulset", "web", "-n", &ns, "--wait=false"]);
    wait_claims(cluster, &ns, &[], 90);
    let writes = events(cluster, &ns, "ClaimOwnersUpdated");
    assert!(
        writes.is_empty(),
        "Kennel wrote owner references the built-in controller writes: {writes:?}"
    );
    let problems = retention_problems(&retention_log(cluster));
    assert!(
        problems.is_empty(),
        "kennel retention logged problems:\n{}",
        problems.join("\n")
    );
    let log = retention_log(cluster);
    assert!(
        !log.contains("409") && !log.contains("Conflict"),
        "conflicting writes:\n{log}"
    );
    cluster
        .kubectl
        .run(&["delete", "namespace", &ns, "--wait=false"]);
}
